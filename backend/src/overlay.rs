//! The per-node copy-on-write overlay: one file holding every block the
//! guest wrote, zeroed or discarded, over a read-only base disk.
//!
//! The file has a 4 KiB header, a block-state map with one byte per 4 KiB
//! block ([`BlockState`]), and a sparse data area in which block `i` lives
//! at `data_offset + i * 4096` (see [`format`] for the offsets). Reads split
//! a range into runs of equal state with [`Overlay::runs`]; the caller reads
//! `Base` runs from the base disk, `Data` runs with [`Overlay::read_data`]
//! and zero-fills `Zero` runs.
//!
//! # Concurrency
//! All methods take `&self`; one worker thread per virtqueue shares the
//! overlay. Reads take no lock: they load map entries with `Acquire`, and
//! writers publish an entry with `Release` only after the block's data is in
//! the file, so a reader that sees `Data` reads the new bytes. Writers lock
//! one of 64 stripes per block: whole-block writes and zeroing take their
//! stripes shared (they never read the block, so they need not exclude each
//! other: a write racing a zeroing of the same block ends as one of the two
//! orders, because a `Data` entry over a punched block reads zeros),
//! read-modify-write of a partial block takes its stripe exclusive,
//! so that no other writer changes the block between the read and the write
//! back. Shared stripes are taken in ascending order and an exclusive holder
//! takes nothing else, so there is no deadlock.

pub mod format;
pub(crate) mod sys;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use format::{BLOCK_SIZE, BlockState, FormatError, Header, parse_header, parse_map};

use crate::iobuf::IoBufs;

/// Reads base-disk bytes: fills the buffer with the base at the offset.
pub type BaseReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> io::Result<()>;

const STRIPES: usize = 64;
/// Map entries covered by one dirty bit: one 4 KiB page of the map.
const MAP_PAGE: u64 = 4096;
/// Map bytes read at a time when loading or counting.
const MAP_CHUNK: u64 = 1 << 20;
const BS: u64 = BLOCK_SIZE;
/// Mode of a new overlay: it holds the guest's data, only our user reads it.
pub const OVERLAY_MODE: u32 = 0o600;

/// Whether flushes reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// `fdatasync` on flush: acknowledged flushes survive power loss.
    Safe,
    /// No syncs (like QEMU's cache=unsafe): flushed writes survive the
    /// process being killed, not the host losing power.
    Unsafe,
}

/// What the overlay must match and how it flushes.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// Size of the disk in bytes, a multiple of 512.
    pub disk_size: u64,
    /// Identifies the base disk; an overlay is only valid over the disk it
    /// was made for.
    pub fingerprint: [u8; 32],
    pub flush: FlushMode,
}

/// A maximal byte range of one state, from [`Overlay::runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub state: BlockState,
}

/// What [`Overlay::info`] reports. The counts are those of the map on
/// disk: for an overlay in use, as of its last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayInfo {
    pub disk_size: u64,
    pub fingerprint: [u8; 32],
    pub block_size: u64,
    pub blocks: u64,
    /// Blocks in state `Data`.
    pub written: u64,
    /// Blocks in state `Zero`.
    pub zeroed: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`).
    pub allocated_bytes: u64,
    /// Apparent file size.
    pub file_size: u64,
    /// Whether the last user closed it cleanly (false while in use).
    pub clean: bool,
    /// What became of the map checksum.
    pub map_check: MapCheck,
}

/// Whether the map was checked against the checksum recorded at the last
/// clean close. A mismatch is an error, never a value of this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapCheck {
    /// Closed cleanly and the map matches its recorded checksum.
    Verified,
    /// Closed cleanly by an ociblk that recorded no checksum.
    NotRecorded,
    /// In use, or not closed cleanly: the map may legitimately differ from
    /// the checksum recorded at the last clean close.
    NotClosedCleanly,
}

impl MapCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            MapCheck::Verified => "verified",
            MapCheck::NotRecorded => "not recorded",
            MapCheck::NotClosedCleanly => "not checked (in use or not closed cleanly)",
        }
    }
}

impl OverlayInfo {
    pub fn fingerprint_hex(&self) -> String {
        format::hex(&self.fingerprint)
    }
}

/// Why an overlay cannot be opened, inspected or reset.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    // The cause is the source, not part of the message: `{:#}` prints
    // the chain, and would print it twice.
    #[error("overlay {}: {op}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} is not an ociblk overlay (bad magic): delete it or use another file", path.display())]
    BadMagic { path: PathBuf },
    #[error(
        "overlay {} has format version {found}, this ociblk reads version {}",
        path.display(),
        format::FORMAT_VERSION
    )]
    Version { path: PathBuf, found: u32 },
    #[error("overlay {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: FormatError },
    #[error(
        "overlay {} was made for a different disk ({what}): use `ociblk overlay reset {}` or another file",
        path.display(),
        path.display()
    )]
    Mismatch { path: PathBuf, what: String },
    #[error("overlay {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("overlay {}: {reason}", path.display())]
    Config { path: PathBuf, reason: FormatError },
    #[error("overlay {} is not a regular file (it is {kind})", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "overlay {} has no header yet: nothing was ever written to it, \
         `ociblk serve` initialises it as a new overlay",
        path.display()
    )]
    NotInitialised { path: PathBuf },
}

impl OverlayError {
    fn format(path: &Path, e: FormatError) -> Self {
        let path = path.to_path_buf();
        match e {
            FormatError::BadMagic => Self::BadMagic { path },
            FormatError::Version(found) => Self::Version { path, found },
            reason => Self::Corrupt { path, reason },
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> OverlayError {
    let path = path.to_path_buf();
    move |source| OverlayError::Io { path, op, source }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Decodes an in-memory map entry; only valid values are ever stored.
fn decode(v: u8) -> BlockState {
    BlockState::from_u8(v).unwrap_or(BlockState::Base)
}

/// Part of a request range: a partial block, or a run of whole blocks.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u64,
    whole: bool,
}

/// What a partial-block update writes.
#[derive(Clone, Copy)]
enum Fill<'a, 'b> {
    /// Bytes of a scatter list from this position.
    Bytes(&'a IoBufs<'b>, usize),
    Zeros,
}

/// A copy-on-write overlay file, open and locked for one server.
pub struct Overlay {
    file: File,
    path: PathBuf,
    header: Header,
    mode: FlushMode,
    /// One [`BlockState`] per block.
    states: Box<[AtomicU8]>,
    /// One bit per map page changed since it was last written.
    dirty: Box<[AtomicU64]>,
    stripes: Box<[RwLock<()>]>,
    /// Serialises flushes: a flush must not return while another one still
    /// holds map pages it took from `dirty` but has not written.
    flush_lock: Mutex<()>,
    /// An fdatasync failed: the kernel may have dropped dirty pages, so no
    /// later flush can promise that earlier writes are durable. Sticky, unlike
    /// write errors (ENOSPC on a write only fails that request).
    sync_failed: AtomicBool,
    /// A failed write may have left bytes in the data area of a block that
    /// is not `Data`; the next open reclaims them.
    leaked: AtomicBool,
    /// The file was created by this open: the first safe flush also makes
    /// its directory entry durable.
    new_entry: AtomicBool,
    /// Opened read-write. A read-only overlay is never written, synced or
    /// marked, not even at close.
    writable: bool,
    closed: bool,
}

impl fmt::Debug for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("disk_size", &self.header.disk_size)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Overlay {
    /// Opens the overlay at `path` read-write, creating it (mode 0600) if
    /// it does not exist, and locks it exclusively for this process.
    ///
    /// An existing empty file, or one whose header was never written (what
    /// a crash right after creation leaves; nothing in it was ever
    /// flushed), is initialised as a new overlay, with a log line. Anything
    /// else must carry a valid header. An existing overlay must match
    /// `cfg`'s disk size and fingerprint, unless no block was ever written
    /// or zeroed in it (a new or reset overlay holds nothing of its old
    /// disk): such a file is made anew for `cfg`. After a clean close the
    /// map must match the checksum recorded then.
    pub fn open(path: impl AsRef<Path>, cfg: OverlayConfig) -> Result<Overlay, OverlayError> {
        let path = path.as_ref();
        check_config(path, &cfg)?;
        let (file, created) = open_file(path, Access::Create)?;
        if !sys::try_lock_exclusive(file.as_fd()).map_err(io_err(path, "lock"))? {
            return Err(OverlayError::Locked {
                path: path.to_path_buf(),
            });
        }
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut fresh = len == 0 || header_never_written(&file, path, len)?;
        if fresh && !created {
            tracing::info!(
                path = %path.display(),
                bytes = len,
                "initialising an existing file without an overlay header as a new overlay"
            );
        }
        let header = if fresh {
            file.set_len(0).map_err(io_err(path, "truncate"))?;
            create(&file, path, &cfg)?
        } else {
            let header = read_header(&file, path, len)?;
            match mismatch(&header, &cfg) {
                None => header,
                Some(what) => {
                    let (counts, _) = read_counts(&file, path, &header)?;
                    if counts[1] + counts[2] != 0 {
                        return Err(OverlayError::Mismatch {
                            path: path.to_path_buf(),
                            what,
                        });
                    }
                    tracing::info!(path = %path.display(), "re-creating unused overlay for another disk");
                    file.set_len(0).map_err(io_err(path, "truncate"))?;
                    fresh = true;
                    create(&file, path, &cfg)?
                }
            }
        };
        // A new map is all `Base`: nothing to read.
        let states = if fresh {
            base_map(header.map_len)
        } else {
            read_checked_map(&file, path, &header)?.0
        };
        let pages = header.blocks().div_ceil(MAP_PAGE);
        let ov = Overlay {
            file,
            path: path.to_path_buf(),
            mode: cfg.flush,
            states: states.into_boxed_slice(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            flush_lock: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            leaked: AtomicBool::new(false),
            new_entry: AtomicBool::new(fresh),
            writable: true,
            closed: false,
            header,
        };
        if fresh {
            // Created in use (clean flag 0) with nothing to reclaim.
        } else if !ov.header.clean {
            tracing::info!(path = %path.display(), "overlay was not closed cleanly; reclaiming unused space");
            ov.reclaim().map_err(io_err(path, "reclaim space"))?;
        } else {
            ov.set_clean(false).map_err(io_err(path, "mark in use"))?;
        }
        Ok(ov)
    }

    /// Opens the overlay at `path` for reading only: the file is opened
    /// read-only (a 0400 file or a read-only mount will do), locked shared
    /// (no server can write it meanwhile, other readers can share it) and
    /// never modified, not even its clean flag. An empty file or one whose
    /// header was never written holds no writes: it reads as the base disk.
    pub fn open_read_only(
        path: impl AsRef<Path>,
        cfg: OverlayConfig,
    ) -> Result<Overlay, OverlayError> {
        let path = path.as_ref();
        check_config(path, &cfg)?;
        let (file, _) = open_file(path, Access::ReadOnly)?;
        if !sys::try_lock_shared(file.as_fd()).map_err(io_err(path, "lock"))? {
            return Err(OverlayError::Locked {
                path: path.to_path_buf(),
            });
        }
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let unwritten = len == 0 || header_never_written(&file, path, len)?;
        let (header, states) = if unwritten {
            tracing::info!(path = %path.display(), "overlay has no header yet: serving the base disk");
            let header = Header::new(cfg.disk_size, cfg.fingerprint);
            let states = base_map(header.map_len);
            (header, states)
        } else {
            let header = read_header(&file, path, len)?;
            let (states, counts) = read_checked_map(&file, path, &header)?;
            if let Some(what) = mismatch(&header, &cfg) {
                if counts[1] + counts[2] != 0 {
                    return Err(OverlayError::Mismatch {
                        path: path.to_path_buf(),
                        what,
                    });
                }
                // Nothing written: reads as the base disk, whatever it is.
                let header = Header::new(cfg.disk_size, cfg.fingerprint);
                let states = base_map(header.map_len);
                (header, states)
            } else {
                (header, states)
            }
        };
        let pages = header.blocks().div_ceil(MAP_PAGE);
        Ok(Overlay {
            file,
            path: path.to_path_buf(),
            mode: cfg.flush,
            states: states.into_boxed_slice(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            flush_lock: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            leaked: AtomicBool::new(false),
            new_entry: AtomicBool::new(false),
            writable: false,
            closed: false,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the overlay was opened read-write.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("overlay {} is open read-only", self.path.display()),
            ))
        }
    }

    pub fn disk_size(&self) -> u64 {
        self.header.disk_size
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.header.fingerprint
    }

    pub fn flush_mode(&self) -> FlushMode {
        self.mode
    }

    fn state(&self, block: u64) -> BlockState {
        decode(self.states[block as usize].load(Ordering::Acquire))
    }

    /// Publishes a block's state. The caller has already written whatever
    /// data the new state needs; `AcqRel` orders those writes before the
    /// entry for readers (`Acquire` loads) and for `flush`.
    fn set_state(&self, block: u64, state: BlockState) {
        let old = self.states[block as usize].swap(state as u8, Ordering::AcqRel);
        if old != state as u8 {
            self.mark_dirty(block / MAP_PAGE);
        }
    }

    /// Splits a byte range into maximal runs of equal state. The range is
    /// clipped to the disk.
    pub fn runs(&self, offset: u64, len: u64) -> Runs<'_> {
        let end = offset.saturating_add(len).min(self.header.disk_size);
        Runs {
            overlay: self,
            pos: offset.min(end),
            end,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.disk_size => Ok(end),
            _ => Err(invalid(format!(
                "range {offset}+{len} is beyond the {}-byte disk",
                self.header.disk_size
            ))),
        }
    }

    fn check_bufs(bufs: &IoBufs<'_>, at: usize, len: usize) -> io::Result<()> {
        match at.checked_add(len) {
            Some(end) if end <= bufs.len() => Ok(()),
            _ => Err(invalid(format!(
                "buffer range {at}+{len} is beyond its {} bytes",
                bufs.len()
            ))),
        }
    }

    /// Reads `len` bytes of the data area at disk offset `offset` into
    /// `dst[at..]`. Meaningful for `Data` runs only.
    pub fn read_data(
        &self,
        offset: u64,
        dst: &IoBufs<'_>,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        Self::check_bufs(dst, at, len)?;
        dst.read_from_file(&self.file, self.header.data_offset + offset, at, len)
    }

    /// Writes `src[at..at + len]` at disk offset `offset`. `base` reads the
    /// base disk for partial blocks that were never written.
    ///
    /// On error, each block keeps its previous state; bytes of blocks that
    /// were already `Data` may be partly overwritten, like a failed write
    /// to a real disk.
    pub fn write(
        &self,
        offset: u64,
        src: &IoBufs<'_>,
        at: usize,
        len: usize,
        base: BaseReader<'_>,
    ) -> io::Result<()> {
        self.check_writable()?;
        let end = self.check_range(offset, len as u64)?;
        Self::check_bufs(src, at, len)?;
        for p in self.split(offset, end).into_iter().flatten() {
            let pos = at + (p.offset - offset) as usize;
            if p.whole {
                self.write_whole(p, src, pos)?;
            } else {
                self.write_partial(p, Fill::Bytes(src, pos), base)?;
            }
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: whole blocks become
    /// `Zero` and their data is deallocated, partial blocks are rewritten.
    pub fn write_zeroes(&self, offset: u64, len: u64, base: BaseReader<'_>) -> io::Result<()> {
        self.check_writable()?;
        let end = self.check_range(offset, len)?;
        for p in self.split(offset, end).into_iter().flatten() {
            if p.whole {
                self.zero_whole(p)?;
            } else {
                self.write_partial(p, Fill::Zeros, base)?;
            }
        }
        Ok(())
    }

    /// Drops `len` bytes at `offset`. Same as [`Self::write_zeroes`]: the
    /// base underneath must never show through again.
    pub fn discard(&self, offset: u64, len: u64, base: BaseReader<'_>) -> io::Result<()> {
        self.write_zeroes(offset, len, base)
    }

    /// Splits `[offset, end)` into a partial head block, whole blocks and
    /// a partial tail block. The disk's last block counts as whole when
    /// the range reaches the end of the disk.
    fn split(&self, offset: u64, end: u64) -> [Option<Piece>; 3] {
        let size = self.header.disk_size;
        let block_end = |p: u64| ((p / BS + 1) * BS).min(size);
        let mut out = [None; 3];
        let mut pos = offset;
        if pos < end && (!pos.is_multiple_of(BS) || end < block_end(pos)) {
            let e = end.min(block_end(pos));
            out[0] = Some(Piece {
                offset: pos,
                len: e - pos,
                whole: false,
            });
            pos = e;
        }
        let whole_end = if end == size { end } else { end / BS * BS };
        if pos < whole_end {
            out[1] = Some(Piece {
                offset: pos,
                len: whole_end - pos,
                whole: true,
            });
            pos = whole_end;
        }
        if pos < end {
            out[2] = Some(Piece {
                offset: pos,
                len: end - pos,
                whole: false,
            });
        }
        out
    }

    /// Locks the stripes of blocks `[b0, b1)` shared, in ascending order.
    fn lock_shared(&self, b0: u64, b1: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let mut mask = if b1 - b0 >= STRIPES as u64 {
            u64::MAX
        } else {
            (b0..b1).fold(0u64, |m, b| m | 1 << (b % STRIPES as u64))
        };
        let mut guards = Vec::with_capacity(mask.count_ones() as usize);
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            guards.push(
                self.stripes[i]
                    .read()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            mask &= mask - 1;
        }
        guards
    }

    fn lock_exclusive(&self, block: u64) -> RwLockWriteGuard<'_, ()> {
        self.stripes[(block % STRIPES as u64) as usize]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_whole(&self, p: Piece, src: &IoBufs<'_>, at: usize) -> io::Result<()> {
        let (b0, b1) = (p.offset / BS, (p.offset + p.len).div_ceil(BS));
        let _locks = self.lock_shared(b0, b1);
        let r = src.write_to_file(
            &self.file,
            self.header.data_offset + p.offset,
            at,
            p.len as usize,
        );
        if let Err(e) = r {
            self.leaked.store(true, Ordering::Relaxed);
            return Err(e);
        }
        for b in b0..b1 {
            self.set_state(b, BlockState::Data);
        }
        Ok(())
    }

    fn zero_whole(&self, p: Piece) -> io::Result<()> {
        let (b0, b1) = (p.offset / BS, (p.offset + p.len).div_ceil(BS));
        let _locks = self.lock_shared(b0, b1);
        // Punch before publishing `Zero`: if the punch fails the blocks keep
        // their state. A reader that sees `Data` meanwhile gets old bytes or
        // zeros, either a valid result for a read racing the zeroing.
        self.punch(self.header.data_offset + b0 * BS, (b1 - b0) * BS)?;
        for b in b0..b1 {
            self.set_state(b, BlockState::Zero);
        }
        Ok(())
    }

    /// Deallocates part of the data area. Reads never depend on it (the map
    /// says `Zero`), so a filesystem without hole punching only costs space.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        match sys::punch_hole(self.file.as_fd(), offset, len) {
            Err(e) if sys::unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// Updates part of one block under its exclusive stripe lock.
    fn write_partial(&self, p: Piece, fill: Fill<'_, '_>, base: BaseReader<'_>) -> io::Result<()> {
        let block = p.offset / BS;
        let block_start = block * BS;
        let start = (p.offset - block_start) as usize;
        let len = p.len as usize;
        let data_pos = self.header.data_offset + block_start;
        let _lock = self.lock_exclusive(block);
        let state = self.state(block);
        match (state, fill) {
            (BlockState::Zero, Fill::Zeros) => return Ok(()),
            // The rest of the block is already in the data area: write in
            // place, nothing to read.
            (BlockState::Data, Fill::Bytes(src, at)) => {
                return src.write_to_file(&self.file, data_pos + start as u64, at, len);
            }
            (BlockState::Data, Fill::Zeros) => {
                return self
                    .file
                    .write_all_at(&vec![0u8; len], data_pos + start as u64);
            }
            _ => {}
        }
        let valid = (self.header.disk_size - block_start).min(BS) as usize;
        let mut buf = vec![0u8; valid];
        if state == BlockState::Base {
            base(block_start, &mut buf)?;
        }
        match fill {
            Fill::Bytes(src, at) => src.copy_to(at, &mut buf[start..start + len]),
            Fill::Zeros => buf[start..start + len].fill(0),
        }
        if buf.iter().all(|&b| b == 0) {
            // Keeps zeroing a sector of a fresh block from allocating it.
            self.punch(data_pos, BS)?;
            self.set_state(block, BlockState::Zero);
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(&buf, data_pos) {
            self.leaked.store(true, Ordering::Relaxed);
            return Err(e);
        }
        self.set_state(block, BlockState::Data);
        Ok(())
    }

    /// Makes every completed write durable (with [`FlushMode::Safe`]).
    ///
    /// Order: take a snapshot of the dirty map pages, `fdatasync` (every
    /// `Data` entry in the snapshot was published after its data was
    /// written, so that data is now durable), write the snapshot over the
    /// map in place, `fdatasync` again. Updating entries in place is
    /// crash-safe: an entry is one byte, so after a crash each reads either
    /// its old or its new value, and both are valid: a new `Data` entry's
    /// data is already durable, a `Zero` entry needs no data, and an old
    /// `Data` entry whose block was since zeroed reads either its old bytes
    /// or the hole punched over them. Entries changed after the snapshot
    /// stay dirty for the next flush.
    ///
    /// With [`FlushMode::Unsafe`] the map is written without the syncs: it
    /// reaches the page cache and survives the process, not the host.
    ///
    /// A read-only overlay has nothing to flush.
    pub fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _flush = self
            .flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.sync_failed.load(Ordering::Relaxed) {
            return Err(io::Error::other(format!(
                "an earlier fdatasync of overlay {} failed; written data may be lost",
                self.path.display()
            )));
        }
        let safe = self.mode == FlushMode::Safe;
        let pages = self.take_dirty();
        if safe {
            self.sync()?;
            if self.new_entry.load(Ordering::Relaxed) {
                self.sync_directory()?;
                self.new_entry.store(false, Ordering::Relaxed);
            }
        }
        for (i, (page, bytes)) in pages.iter().enumerate() {
            let at = self.header.map_offset + page * MAP_PAGE;
            if let Err(e) = self.file.write_all_at(bytes, at) {
                for (page, _) in &pages[i..] {
                    self.mark_dirty(*page);
                }
                return Err(e);
            }
        }
        if safe && !pages.is_empty() {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        sys::fdatasync(self.file.as_fd()).inspect_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "fdatasync failed");
            self.sync_failed.store(true, Ordering::Relaxed);
        })
    }

    /// Makes the file's directory entry durable, once, for a new overlay.
    fn sync_directory(&self) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all())
    }

    fn mark_dirty(&self, page: u64) {
        // Release: a flush that takes this bit sees the entries before it.
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Clears the dirty bits and copies the pages they cover.
    fn take_dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let blocks = self.header.blocks();
        let mut out = Vec::new();
        for (w, word) in self.dirty.iter().enumerate() {
            // Acquire: pairs with the Release in set_state, so the entries
            // behind each taken bit are visible below.
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let lo = page * MAP_PAGE;
                let hi = (lo + MAP_PAGE).min(blocks);
                let bytes = self.states[lo as usize..hi as usize]
                    .iter()
                    .map(|s| s.load(Ordering::Acquire))
                    .collect();
                out.push((page, bytes));
            }
        }
        out
    }

    fn set_clean(&self, clean: bool) -> io::Result<()> {
        self.file
            .write_all_at(&[u8::from(clean)], format::CLEAN_OFFSET as u64)?;
        if self.mode == FlushMode::Safe {
            self.sync()?;
        }
        Ok(())
    }

    /// Deallocates the data of every block that is not `Data`: after a
    /// crash, blocks written but never published in the durable map keep
    /// their bytes allocated.
    fn reclaim(&self) -> io::Result<()> {
        let fd = self.file.as_fd();
        let start = self.header.data_offset;
        let end = self.header.file_len();
        let mut pos = start;
        while pos < end {
            let Some((s, e)) = sys::next_data(fd, pos)? else {
                break;
            };
            if s >= end {
                break;
            }
            let (b0, b1) = ((s - start) / BS, (e.min(end) - start).div_ceil(BS));
            let mut b = b0;
            while b < b1 {
                if self.state(b) == BlockState::Data {
                    b += 1;
                    continue;
                }
                let first = b;
                while b < b1 && self.state(b) != BlockState::Data {
                    b += 1;
                }
                match sys::punch_hole(fd, start + first * BS, (b - first) * BS) {
                    Err(e) if sys::unsupported(&e) => return Ok(()),
                    r => r?,
                }
            }
            pos = start + b1 * BS;
        }
        Ok(())
    }

    /// Flushes, records the map's checksum and marks the overlay cleanly
    /// closed. The map and then the checksum are durable before the flag,
    /// in both flush modes: a clean flag on disk always comes with the
    /// checksum of the map on disk. (With [`FlushMode::Unsafe`] a clean
    /// flag over a map the host lost would otherwise read as corruption
    /// after a host crash.) Only the clean flag itself is left unsynced in
    /// unsafe mode; losing it only costs a reclaim at the next open.
    fn shutdown(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush()?;
        if !self.leaked.load(Ordering::Relaxed) {
            self.sync()?;
            let crc = self.map_crc();
            self.file.write_all_at(
                &format::encode_map_crc(Some(crc)),
                format::MAP_CRC_FIELD_OFFSET as u64,
            )?;
            self.sync()?;
            self.set_clean(true)?;
        }
        Ok(())
    }

    /// CRC32 of the in-memory map, which after a flush with no writer
    /// left is the map on disk.
    fn map_crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::with_capacity(MAP_CHUNK as usize);
        for chunk in self.states.chunks(MAP_CHUNK as usize) {
            buf.clear();
            buf.extend(chunk.iter().map(|s| s.load(Ordering::Acquire)));
            hasher.update(&buf);
        }
        hasher.finalize()
    }

    /// Flushes the map and closes the file, releasing the lock.
    pub fn close(mut self) -> Result<(), OverlayError> {
        self.closed = true;
        self.shutdown().map_err(io_err(&self.path, "close"))
    }

    /// Reports on the overlay at `path` without locking it; works while a
    /// server uses it (the map is then as of its last flush).
    ///
    /// A file without a header (empty, or whose header was never written)
    /// is [`OverlayError::NotInitialised`]: `open` makes it a new overlay.
    /// After a clean close the map must match its recorded checksum.
    pub fn info(path: impl AsRef<Path>) -> Result<OverlayInfo, OverlayError> {
        let path = path.as_ref();
        let (file, _) = open_file(path, Access::ReadOnly)?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if meta.len() == 0 || header_never_written(&file, path, meta.len())? {
            return Err(OverlayError::NotInitialised {
                path: path.to_path_buf(),
            });
        }
        let mut header = read_header(&file, path, meta.len())?;
        let (counts, computed) = read_counts(&file, path, &header)?;
        let map_check = match check_map_crc(path, &header, computed) {
            // A server may have opened it and changed the map while it was
            // read: then it is in use, not corrupt.
            Err(e) if !read_header(&file, path, meta.len()).is_ok_and(|h| h.clean) => {
                tracing::debug!(path = %path.display(), "map changed while read: {e}");
                header.clean = false;
                MapCheck::NotClosedCleanly
            }
            r => r?,
        };
        Ok(OverlayInfo {
            disk_size: header.disk_size,
            fingerprint: header.fingerprint,
            block_size: BS,
            blocks: header.blocks(),
            written: counts[BlockState::Data as usize],
            zeroed: counts[BlockState::Zero as usize],
            allocated_bytes: meta.blocks() * 512,
            file_size: meta.len(),
            clean: header.clean,
            map_check,
        })
    }

    /// Returns every block of the overlay at `path` to `Base` and frees its
    /// data. Fails if a server has it open. An empty regular file is left
    /// alone (it already reads as the base disk).
    pub fn reset(path: impl AsRef<Path>) -> Result<(), OverlayError> {
        let path = path.as_ref();
        let (file, _) = open_file(path, Access::Existing)?;
        if !sys::try_lock_exclusive(file.as_fd()).map_err(io_err(path, "lock"))? {
            return Err(OverlayError::Locked {
                path: path.to_path_buf(),
            });
        }
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        if len == 0 {
            return Ok(());
        }
        let header = read_header(&file, path, len)?;
        let fd = file.as_fd();
        let set_clean = |clean: bool| {
            file.write_all_at(&[u8::from(clean)], format::CLEAN_OFFSET as u64)
                .and_then(|()| sys::fdatasync(fd))
        };
        // Not clean while the map and data disagree with the flag, so that
        // an interrupted reset is finished by the next open's reclaim.
        set_clean(false).map_err(io_err(path, "mark in use"))?;
        zero_map(&file, &header).map_err(io_err(path, "clear map"))?;
        file.write_all_at(
            &format::encode_map_crc(Some(zero_map_crc(header.map_len))),
            format::MAP_CRC_FIELD_OFFSET as u64,
        )
        .map_err(io_err(path, "record map checksum"))?;
        sys::fdatasync(fd).map_err(io_err(path, "sync"))?;
        match sys::punch_hole(fd, header.data_offset, header.blocks() * BS) {
            Err(e) if !sys::unsupported(&e) => return Err(io_err(path, "free data")(e)),
            _ => {}
        }
        set_clean(true).map_err(io_err(path, "mark clean"))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.closed || !self.writable {
            return;
        }
        if let Err(e) = self.shutdown() {
            tracing::error!(path = %self.path.display(), error = %e, "closing overlay failed");
        }
    }
}

/// Iterator over the [`Run`]s of a byte range; see [`Overlay::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    overlay: &'a Overlay,
    pos: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.pos >= self.end {
            return None;
        }
        let mut block = self.pos / BS;
        let state = self.overlay.state(block);
        let mut run_end = (block + 1) * BS;
        while run_end < self.end && self.overlay.state(block + 1) == state {
            block += 1;
            run_end += BS;
        }
        let run_end = run_end.min(self.end);
        let run = Run {
            offset: self.pos,
            len: run_end - self.pos,
            state,
        };
        self.pos = run_end;
        Some(run)
    }
}

/// Differences between an overlay's header and the disk it is opened for.
fn mismatch(h: &Header, cfg: &OverlayConfig) -> Option<String> {
    let mut what = Vec::new();
    if h.disk_size != cfg.disk_size {
        what.push(format!("size {} != {} bytes", h.disk_size, cfg.disk_size));
    }
    if h.fingerprint != cfg.fingerprint {
        what.push(format!(
            "fingerprint {}.. != {}..",
            &format::hex(&h.fingerprint)[..12],
            &format::hex(&cfg.fingerprint)[..12]
        ));
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// How [`open_file`] opens an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read-write, created (mode 0600) when missing.
    Create,
    /// Read-write, must exist.
    Existing,
    /// Read-only, must exist.
    ReadOnly,
}

/// Opens an overlay file, which must be a regular file: anything else is
/// [`OverlayError::NotRegular`]. The type is checked before opening (so
/// that a directory or a device is never opened for writing) and again on
/// the open descriptor (the path may have changed meanwhile). `O_NONBLOCK`
/// keeps the open of a FIFO from waiting for a writer; it means nothing
/// for a regular file. Returns whether the file was created.
fn open_file(path: &Path, access: Access) -> Result<(File, bool), OverlayError> {
    match fs::metadata(path) {
        Ok(meta) => check_regular(path, &meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && access == Access::Create => {}
        Err(e) => return Err(io_err(path, "open")(e)),
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(access != Access::ReadOnly)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    let mut created = false;
    let opened = if access == Access::Create {
        match options
            .clone()
            .create_new(true)
            .mode(OVERLAY_MODE)
            .open(path)
        {
            Ok(file) => {
                created = true;
                // The umask may have taken bits away, never added: set
                // exactly 0600, whatever it is.
                file.set_permissions(fs::Permissions::from_mode(OVERLAY_MODE))
                    .map_err(io_err(path, "set mode"))?;
                Ok(file)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options.open(path),
            Err(e) => Err(e),
        }
    } else {
        options.open(path)
    };
    let file = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::EISDIR) => OverlayError::NotRegular {
            path: path.to_path_buf(),
            kind: "a directory",
        },
        _ => io_err(path, "open")(e),
    })?;
    check_regular(path, &file.metadata().map_err(io_err(path, "stat"))?)?;
    Ok((file, created))
}

fn check_regular(path: &Path, meta: &fs::Metadata) -> Result<(), OverlayError> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(OverlayError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

fn check_config(path: &Path, cfg: &OverlayConfig) -> Result<(), OverlayError> {
    format::check_disk_size(cfg.disk_size).map_err(|reason| OverlayError::Config {
        path: path.to_path_buf(),
        reason,
    })
}

/// Lays out a new overlay in an empty, locked file. Nothing is synced here:
/// a new overlay holds nothing worth keeping until the first flush, which
/// makes the header (and, see [`Overlay::flush`], the directory entry)
/// durable. A crash before it leaves an empty file or a zero header, which
/// `open` treats as a new overlay: launching a node costs no sync.
fn create(file: &File, path: &Path, cfg: &OverlayConfig) -> Result<Header, OverlayError> {
    let mut header = Header::new(cfg.disk_size, cfg.fingerprint);
    // The map is a hole, which reads as all `Base`; the data area too.
    file.set_len(header.file_len())
        .map_err(io_err(path, "set size"))?;
    header.clean = false;
    file.write_all_at(&header.encode(), 0)
        .map_err(io_err(path, "write header"))?;
    Ok(header)
}

/// Whether the file starts with a header that was never written (all
/// zeros): what a crash right after creation can leave.
fn header_never_written(file: &File, path: &Path, len: u64) -> Result<bool, OverlayError> {
    let mut buf = vec![0u8; format::HEADER_SIZE.min(len as usize)];
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err(path, "read header"))?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// Reads and checks the header, and that the file holds all it describes.
fn read_header(file: &File, path: &Path, len: u64) -> Result<Header, OverlayError> {
    let mut buf = vec![0u8; format::HEADER_SIZE];
    let n = (len as usize).min(buf.len());
    file.read_exact_at(&mut buf[..n], 0)
        .map_err(io_err(path, "read header"))?;
    buf.truncate(n);
    let header = parse_header(&buf).map_err(|e| OverlayError::format(path, e))?;
    if len < header.file_len() {
        return Err(OverlayError::format(
            path,
            FormatError::Truncated {
                what: "map and data area",
                need: header.file_len(),
                have: len,
            },
        ));
    }
    Ok(header)
}

enum MapError {
    Io(io::Error),
    Format(FormatError),
}

impl MapError {
    fn at(self, path: &Path) -> OverlayError {
        match self {
            MapError::Io(e) => io_err(path, "read map")(e),
            MapError::Format(e) => OverlayError::format(path, e),
        }
    }
}

/// Visits the on-disk map in chunks: `f(first_block, bytes)`.
fn for_map_chunks(
    file: &File,
    header: &Header,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), FormatError>,
) -> Result<(), MapError> {
    let mut buf = vec![0u8; MAP_CHUNK.min(header.map_len) as usize];
    let mut first = 0;
    while first < header.map_len {
        let n = MAP_CHUNK.min(header.map_len - first) as usize;
        file.read_exact_at(&mut buf[..n], header.map_offset + first)
            .map_err(MapError::Io)?;
        f(first, &buf[..n]).map_err(MapError::Format)?;
        first += n as u64;
    }
    Ok(())
}

/// A map of `len` entries, all `Base` (zero). It is allocated zeroed, so
/// the pages of a big map cost nothing until a block is written.
fn base_map(len: u64) -> Vec<AtomicU8> {
    let mut zeros = std::mem::ManuallyDrop::new(vec![0u8; len as usize]);
    // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8,
    // and the allocation is handed over whole (pointer, length, capacity)
    // from a vector that will not be dropped.
    unsafe {
        Vec::from_raw_parts(
            zeros.as_mut_ptr().cast::<AtomicU8>(),
            zeros.len(),
            zeros.capacity(),
        )
    }
}

/// Reads the map, counts its states and checks it against the checksum
/// recorded at the last clean close.
fn read_checked_map(
    file: &File,
    path: &Path,
    header: &Header,
) -> Result<(Vec<AtomicU8>, [u64; 3]), OverlayError> {
    let mut states = Vec::with_capacity(header.map_len as usize);
    let mut counts = [0u64; 3];
    let mut hasher = crc32fast::Hasher::new();
    for_map_chunks(file, header, |first, b| {
        hasher.update(b);
        format::count_states(b, first, &mut counts)?;
        format::decode_map(b, first, &mut states)
    })
    .map_err(|e| e.at(path))?;
    check_map_crc(path, header, hasher.finalize())?;
    Ok((states, counts))
}

/// Blocks per state on disk, `[base, data, zero]`, and the map's CRC32.
fn read_counts(file: &File, path: &Path, header: &Header) -> Result<([u64; 3], u32), OverlayError> {
    let mut counts = [0u64; 3];
    let mut hasher = crc32fast::Hasher::new();
    for_map_chunks(file, header, |first, b| {
        hasher.update(b);
        format::count_states(b, first, &mut counts)
    })
    .map_err(|e| e.at(path))?;
    Ok((counts, hasher.finalize()))
}

/// Compares the map's CRC32 with the one recorded at the last clean close.
/// Only a cleanly closed overlay is checked: while in use, or after a crash,
/// the map legitimately differs from what was recorded.
fn check_map_crc(path: &Path, header: &Header, computed: u32) -> Result<MapCheck, OverlayError> {
    match (header.clean, header.map_crc) {
        (true, Some(recorded)) if recorded != computed => Err(OverlayError::Corrupt {
            path: path.to_path_buf(),
            reason: FormatError::MapCrc { recorded, computed },
        }),
        (true, Some(_)) => Ok(MapCheck::Verified),
        (true, None) => {
            tracing::info!(
                path = %path.display(),
                "no map checksum recorded (closed by an older ociblk): map not verified"
            );
            Ok(MapCheck::NotRecorded)
        }
        (false, _) => {
            tracing::info!(
                path = %path.display(),
                "overlay not closed cleanly: map checksum not verified"
            );
            Ok(MapCheck::NotClosedCleanly)
        }
    }
}

/// CRC32 of a map of `len` `Base` entries.
fn zero_map_crc(len: u64) -> u32 {
    let zeros = vec![0u8; MAP_CHUNK.min(len) as usize];
    let mut hasher = crc32fast::Hasher::new();
    let mut done = 0;
    while done < len {
        let n = MAP_CHUNK.min(len - done);
        hasher.update(&zeros[..n as usize]);
        done += n;
    }
    hasher.finalize()
}

/// Sets every map entry to `Base` (zero).
fn zero_map(file: &File, header: &Header) -> io::Result<()> {
    match sys::punch_hole(file.as_fd(), header.map_offset, header.map_len) {
        Err(e) if sys::unsupported(&e) => {}
        r => return r,
    }
    let zeros = vec![0u8; MAP_CHUNK.min(header.map_len) as usize];
    let mut done = 0;
    while done < header.map_len {
        let n = MAP_CHUNK.min(header.map_len - done);
        file.write_all_at(&zeros[..n as usize], header.map_offset + done)?;
        done += n;
    }
    Ok(())
}
