// SPDX-License-Identifier: Apache-2.0

//! Where a queue's ring lies in guest memory: each part page aligned, as a VMM places
//! a guest driver's rings.

use crate::memory::{PAGE_SIZE, align_up};
use crate::ring::SplitRing;

/// Guest-memory footprint of a split ring of `size` entries, each part page aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingLayout {
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) end: u64,
}

impl RingLayout {
    /// Lays out a ring of `size` entries starting at guest address `start`.
    pub(crate) fn new(start: u64, size: u16) -> Self {
        let desc = align_up(start, PAGE_SIZE);
        let avail = align_up(desc + SplitRing::desc_table_bytes(size), PAGE_SIZE);
        let used = align_up(avail + SplitRing::avail_ring_bytes(size), PAGE_SIZE);
        let end = align_up(used + SplitRing::used_ring_bytes(size), PAGE_SIZE);
        Self {
            desc,
            avail,
            used,
            end,
        }
    }

    /// The ring of `size` entries this layout places.
    pub(crate) fn split_ring(&self, size: u16) -> SplitRing {
        SplitRing::new(self.desc, self.avail, self.used, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GUEST_MEMORY_BASE;

    #[test]
    fn ring_layout_is_page_aligned() {
        let layout = RingLayout::new(GUEST_MEMORY_BASE, 256);
        assert_eq!(layout.desc, GUEST_MEMORY_BASE);
        assert_eq!(layout.avail, GUEST_MEMORY_BASE + 4096);
        assert_eq!(layout.used, GUEST_MEMORY_BASE + 8192);
        assert_eq!(layout.end, GUEST_MEMORY_BASE + 8192 + 4096);
    }
}
