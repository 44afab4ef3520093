//! The in-memory block-state map: one [`BlockState`] byte per block, and one
//! dirty bit per map page changed since the last flush wrote it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::format::BlockState;

/// Map entries covered by one dirty bit: one 4 KiB page of the map.
pub(super) const MAP_PAGE: u64 = 4096;
/// Map bytes handled at a time when loading, counting or hashing.
pub(super) const MAP_CHUNK: u64 = 1 << 20;

/// Blocks per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StateCounts {
    pub(crate) base: u64,
    pub(crate) data: u64,
    pub(crate) zero: u64,
}

impl StateCounts {
    /// Whether any block was ever written or zeroed.
    pub(crate) fn any_written(&self) -> bool {
        self.data + self.zero != 0
    }
}

/// The states of every block, shared by all worker threads.
pub(super) struct BlockMap {
    /// One [`BlockState`] per block.
    states: MapMemory,
    /// One bit per map page changed since it was last written.
    dirty: Box<[AtomicU64]>,
}

impl BlockMap {
    fn with_memory(states: MapMemory) -> Self {
        let pages = (states.len() as u64).div_ceil(MAP_PAGE);
        BlockMap {
            states,
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A private map of `len` entries, all `Base` (zero). Its pages cost
    /// nothing until a block is written.
    pub(super) fn all_base(len: u64) -> io::Result<Self> {
        Ok(Self::with_memory(MapMemory::anonymous(len)?))
    }

    /// A private map holding `states`, none of them dirty. The caller has
    /// checked that each byte is a [`BlockState`].
    pub(super) fn from_bytes(states: &[u8]) -> io::Result<Self> {
        let map = Self::all_base(states.len() as u64)?;
        map.fill(0, states);
        Ok(map)
    }

    /// A map of `len` entries kept in `file` at `offset` (the live map
    /// region), shared with the page cache: every state set is in the page
    /// cache at once, and outlives the process. The caller has checked that
    /// each byte there is a [`BlockState`], and keeps the file at least
    /// `offset + len` long while the map lives.
    pub(super) fn shared(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        Ok(Self::with_memory(MapMemory::shared(file, offset, len)?))
    }

    /// Number of entries.
    pub(super) fn len(&self) -> u64 {
        self.states.len() as u64
    }

    /// Stores `bytes` as the states of blocks `first..`, marking nothing
    /// dirty: for filling a map before it is shared.
    pub(super) fn fill(&self, first: u64, bytes: &[u8]) {
        for (s, &v) in self.states.as_slice()[first as usize..].iter().zip(bytes) {
            s.store(v, Ordering::Relaxed);
        }
    }

    /// Marks dirty every map page in which this map differs from `disk`
    /// (the map on disk), so that the next flush writes it; returns how
    /// many entries differ.
    pub(super) fn mark_differences(&self, disk: &[u8]) -> u64 {
        let mut differ = 0;
        for (page, (mine, theirs)) in self
            .states
            .as_slice()
            .chunks(MAP_PAGE as usize)
            .zip(disk.chunks(MAP_PAGE as usize))
            .enumerate()
        {
            let n = mine
                .iter()
                .zip(theirs)
                .filter(|(a, b)| a.load(Ordering::Relaxed) != **b)
                .count() as u64;
            if n != 0 {
                self.mark_dirty(page as u64);
                differ += n;
            }
        }
        differ
    }

    pub(super) fn get(&self, block: u64) -> BlockState {
        decode(self.states.as_slice()[block as usize].load(Ordering::Acquire))
    }

    /// Publishes a block's state. The caller has already written whatever
    /// data the new state needs; `AcqRel` orders those writes before the
    /// entry for readers (`Acquire` loads) and for `flush`.
    ///
    /// An entry that already holds `state` is not stored again: the map is
    /// a shared file mapping, and a store, even of the same value, would
    /// dirty its page (a fault after each flush cleaned it, and a page
    /// written back at the next one) for every rewrite of a written block.
    /// The caller's data writes still come first for a reader: the entry it
    /// sees already says where they are.
    pub(super) fn set(&self, block: u64, state: BlockState) {
        let entry = &self.states.as_slice()[block as usize];
        if entry.load(Ordering::Acquire) == state as u8 {
            return;
        }
        let old = entry.swap(state as u8, Ordering::AcqRel);
        if old != state as u8 {
            self.mark_dirty(block / MAP_PAGE);
        }
    }

    pub(super) fn mark_dirty(&self, page: u64) {
        // Release: a flush that takes this bit sees the entries before it.
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Clears the dirty bits and copies the pages they cover.
    pub(super) fn take_dirty(&self) -> Vec<(u64, Vec<u8>)> {
        let blocks = self.len();
        let mut out = Vec::new();
        for (w, word) in self.dirty.iter().enumerate() {
            // Acquire: pairs with the Release in mark_dirty, so the entries
            // behind each taken bit are visible below.
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let lo = page * MAP_PAGE;
                let hi = (lo + MAP_PAGE).min(blocks);
                let bytes = self.states.as_slice()[lo as usize..hi as usize]
                    .iter()
                    .map(|s| s.load(Ordering::Acquire))
                    .collect();
                out.push((page, bytes));
            }
        }
        out
    }

    /// The map's bytes as they are now.
    pub(super) fn snapshot(&self) -> Vec<u8> {
        self.states
            .as_slice()
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect()
    }

    /// CRC32 of the map, which after a flush with no writer left is the
    /// map on disk.
    pub(super) fn crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::with_capacity(MAP_CHUNK as usize);
        for chunk in self.states.as_slice().chunks(MAP_CHUNK as usize) {
            buf.clear();
            buf.extend(chunk.iter().map(|s| s.load(Ordering::Acquire)));
            hasher.update(&buf);
        }
        hasher.finalize()
    }
}

/// Decodes an in-memory map entry; only valid values are ever stored.
fn decode(v: u8) -> BlockState {
    BlockState::from_u8(v).unwrap_or(BlockState::Base)
}

/// Memory mapped for block states: private and anonymous, or shared with
/// a region of the overlay file. Unmapped on drop.
struct MapMemory {
    ptr: NonNull<AtomicU8>,
    /// Entries.
    len: usize,
    /// Bytes mapped (`len` rounded up to whole pages).
    mapped: usize,
}

// SAFETY: the mapping is owned by this value alone and only ever accessed
// as `AtomicU8`s, which are `Sync`.
unsafe impl Send for MapMemory {}
// SAFETY: as above; shared access goes through atomics.
unsafe impl Sync for MapMemory {}

impl MapMemory {
    fn anonymous(len: u64) -> io::Result<Self> {
        Self::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    }

    fn shared(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Self::map(len, libc::MAP_SHARED, file.as_raw_fd(), offset)
    }

    fn map(len: u64, flags: libc::c_int, fd: libc::c_int, offset: libc::off_t) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // A map always has an entry (a disk has a block); mmap refuses 0.
        let mapped = len.max(1).next_multiple_of(MAP_PAGE as usize);
        // SAFETY: a new mapping at an address of the kernel's choosing
        // touches no existing memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(MapMemory { ptr, len, mapped })
    }

    fn as_slice(&self) -> &[AtomicU8] {
        // SAFETY: the mapping is readable and writable, `mapped >= len`
        // bytes long and lives as long as `self`; AtomicU8 has the size,
        // alignment and bit validity of u8, and every access is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for MapMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing
        // references any more (borrows of it end with `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
    }
}
