//! Dirty page logging for live migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD).
//!
//! While QEMU migrates a VM it copies guest memory page by page and copies
//! again every page written since; pages the backend writes it only learns
//! about from the log, a bitmap (one bit per 4 KiB guest page) in a shared
//! memory file it hands over with SET_LOG_BASE. vhost-user-backend maps it
//! and installs it into every guest memory region's bitmap
//! ([`BitmapMmapRegion`]), and vm-memory marks what is written through it:
//! status bytes written with `write_slice`, used-ring entries and event
//! indexes written by virtio-queue.
//!
//! Request data is not written through vm-memory: `preadv` and raw copies
//! put it straight into guest memory ([`ociblk_io::iobuf`]). [`mark_written`]
//! marks a chain's device-writable buffers once the request has written
//! them, before its used entry is published: QEMU reads and clears bits
//! while it migrates, so a bit set before the write landed could be
//! cleared, and the page sent, before the data is in it.
//!
//! [`LogBitmap`] wraps vhost-user-backend's bitmap to check the log the
//! frontend sends: a log file shorter than the size it claims would raise
//! SIGBUS, which ends the whole process, on the first mark in the missing
//! part. Such a log is refused when it arrives.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};

use vhost_user_backend::bitmap::{
    AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace, MemRegionBitmap, MmapLogReg,
};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestUsize, MmapRegion,
};

use super::request::GuestMemoryMmap;

/// Guest bytes per bit of the log (`VHOST_LOG_PAGE`).
const LOG_PAGE: u64 = 0x1000;
/// Pages per byte of the log.
const PAGES_PER_LOG_BYTE: u64 = 8;

/// Set (to anything) in the environment of `ociblk serve`, the server does
/// not mark the request data it writes into guest memory: a migration then
/// silently loses what the guest reads while it runs. For tests only: it
/// shows that the live-migration test notices a missing log. Read once.
pub const SKIP_DATA_LOG_ENV: &str = "OCIBLK_TEST_SKIP_DIRTY_LOG";

static SKIP_DATA_LOG: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os(SKIP_DATA_LOG_ENV).is_some());

/// Whether [`SKIP_DATA_LOG_ENV`] turned marking of request data off.
pub fn data_log_skipped() -> bool {
    *SKIP_DATA_LOG
}

/// The bitmap of one guest memory region: vhost-user-backend's
/// [`BitmapMmapRegion`], which SET_LOG_BASE fills, plus a flag that says
/// whether it has a log, so that requests pay one atomic load while no
/// migration runs.
#[derive(Debug, Clone, Default)]
pub struct LogBitmap {
    inner: BitmapMmapRegion,
    logging: Arc<AtomicBool>,
}

impl LogBitmap {
    /// Whether a log is installed (SET_LOG_BASE was accepted).
    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.is_logging() {
            self.inner.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.inner.dirty_at(offset)
    }

    /// A reference and an offset: vm-memory takes a slice of the bitmap for
    /// every access to guest memory (descriptors, headers, ring entries),
    /// and a slice that cloned the region's reference counts would bounce
    /// their cache lines between the queues' threads on every request.
    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = RefSlice<'a, Self>;
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for LogBitmap {
    type InnerBitmap = CheckedLog;

    fn replace(&self, log: CheckedLog) {
        CURRENT_LOG.with(|current| *current.borrow_mut() = Some(log.logmem));
        self.inner.replace(log.bitmap);
        self.logging.store(true, Ordering::Release);
    }
}

/// A region's part of the frontend's log, checked to be backed by its file.
#[derive(Debug)]
pub struct CheckedLog {
    bitmap: AtomicBitmapMmap,
    logmem: Arc<MmapLogReg>,
}

thread_local! {
    /// The log this connection's message thread last installed, for
    /// regions of a memory table that arrives later (see
    /// [`relog_new_regions`]). vhost-user-backend handles SET_LOG_BASE and
    /// SET_MEM_TABLE on the connection's own thread, which ends with it.
    static CURRENT_LOG: RefCell<Option<Arc<MmapLogReg>>> = const { RefCell::new(None) };
}

impl MemRegionBitmap for CheckedLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        // Refuses a log too small (by its claimed size) for the region.
        let bitmap = AtomicBitmapMmap::new(region, Arc::clone(&logmem))?;
        check_backed(region, &logmem)?;
        Ok(CheckedLog { bitmap, logmem })
    }
}

/// Checks that the file behind the log's bytes for `region` covers them:
/// populating them for writing fails (EFAULT) where a write would raise
/// SIGBUS. The pages are then mapped, which the first marks need anyway.
fn check_backed<R: GuestMemoryRegion>(region: &R, logmem: &MmapLogReg) -> io::Result<()> {
    let start = region.start_addr().raw_value();
    let last = start
        .checked_add(region.len().saturating_sub(1))
        .ok_or_else(|| invalid("the memory region ends past the address space"))?;
    let first_byte = usize::try_from(start / LOG_PAGE / PAGES_PER_LOG_BYTE)
        .map_err(|_| invalid("the memory region lies past the log"))?;
    let last_byte = usize::try_from(last / LOG_PAGE / PAGES_PER_LOG_BYTE)
        .map_err(|_| invalid("the memory region lies past the log"))?;
    // In range: AtomicBitmapMmap::new checked the log covers `last`.
    let first_ptr = std::ptr::from_ref::<AtomicU8>(&logmem[first_byte]) as usize;
    let end_ptr = std::ptr::from_ref::<AtomicU8>(&logmem[last_byte]) as usize + 1;
    // The log's mapping starts on a page boundary, so the rounded-down
    // start stays inside it.
    let page = page_size();
    let aligned = first_ptr & !(page - 1);
    // SAFETY: [aligned, end_ptr) lies within the log's mapping (from its
    // first page to its last byte for this region), which `logmem` keeps
    // mapped; MADV_POPULATE_WRITE only faults pages in, it changes no byte.
    let rc = unsafe {
        libc::madvise(
            aligned as *mut libc::c_void,
            end_ptr - aligned,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EFAULT) => invalid(
                "the dirty log's file is shorter than the size and offset given in SET_LOG_BASE",
            ),
            _ => io::Error::new(e.kind(), format!("cannot map the dirty log: {e}")),
        });
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_owned())
}

/// After a new memory table: installs the log this connection's thread
/// last accepted into the new regions that have none. QEMU sends a new
/// table during a migration without a new SET_LOG_BASE when the log does
/// not need to grow; the log covers all guest memory, and vhost-user-backend
/// gives the new regions fresh, empty bitmaps. Must run on the connection's
/// message thread (`update_memory` does).
pub fn relog_new_regions(mem: &GuestMemoryMmap) -> io::Result<()> {
    let Some(logmem) = CURRENT_LOG.with(|current| current.borrow().clone()) else {
        return Ok(());
    };
    for region in mem.iter() {
        let bitmap = MmapRegion::bitmap(region);
        if !bitmap.is_logging() {
            bitmap.replace(CheckedLog::new(region, Arc::clone(&logmem))?);
        }
    }
    Ok(())
}

/// Marks guest memory `ranges` (guest address, length) dirty in the log,
/// if one is installed. Call it after the bytes are written and before the
/// used entry that hands them to the guest is published.
pub fn mark_written(mem: &GuestMemoryMmap, ranges: &[(GuestAddress, u32)]) {
    if data_log_skipped() {
        return;
    }
    for &(start, len) in ranges {
        let mut addr = start;
        let mut left = GuestUsize::from(len);
        while left > 0 {
            let Some((region, at)) = mem.to_region_addr(addr) else {
                break;
            };
            let n = left.min(region.len() - at.raw_value());
            let bitmap = MmapRegion::bitmap(region);
            if bitmap.is_logging() {
                // Both fit: they lie within one mapped region.
                bitmap.mark_dirty(at.raw_value() as usize, n as usize);
            }
            left -= n;
            match addr.checked_add(n) {
                Some(next) => addr = next,
                None => break,
            }
        }
    }
}
