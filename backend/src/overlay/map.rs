//! The in-memory block-state map: one [`BlockState`] byte per block, and one
//! dirty bit per map page changed since the last flush wrote it.

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
    states: Box<[AtomicU8]>,
    /// One bit per map page changed since it was last written.
    dirty: Box<[AtomicU64]>,
}

impl BlockMap {
    /// A map holding `states`, none of them dirty.
    pub(super) fn new(states: Vec<AtomicU8>) -> Self {
        let pages = (states.len() as u64).div_ceil(MAP_PAGE);
        BlockMap {
            states: states.into_boxed_slice(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A map of `len` entries, all `Base` (zero). It is allocated zeroed, so
    /// the pages of a big map cost nothing until a block is written.
    pub(super) fn all_base(len: u64) -> Self {
        let mut zeros = std::mem::ManuallyDrop::new(vec![0u8; len as usize]);
        // SAFETY: AtomicU8 has the same size, alignment and bit validity as
        // u8, and the allocation is handed over whole (pointer, length,
        // capacity) from a vector that will not be dropped.
        let states = unsafe {
            Vec::from_raw_parts(
                zeros.as_mut_ptr().cast::<AtomicU8>(),
                zeros.len(),
                zeros.capacity(),
            )
        };
        Self::new(states)
    }

    pub(super) fn get(&self, block: u64) -> BlockState {
        decode(self.states[block as usize].load(Ordering::Acquire))
    }

    /// Publishes a block's state. The caller has already written whatever
    /// data the new state needs; `AcqRel` orders those writes before the
    /// entry for readers (`Acquire` loads) and for `flush`.
    pub(super) fn set(&self, block: u64, state: BlockState) {
        let old = self.states[block as usize].swap(state as u8, Ordering::AcqRel);
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
        let blocks = self.states.len() as u64;
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
                let bytes = self.states[lo as usize..hi as usize]
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
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect()
    }

    /// CRC32 of the map, which after a flush with no writer left is the
    /// map on disk.
    pub(super) fn crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::with_capacity(MAP_CHUNK as usize);
        for chunk in self.states.chunks(MAP_CHUNK as usize) {
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
