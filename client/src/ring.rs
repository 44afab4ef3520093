// SPDX-License-Identifier: Apache-2.0

//! The driver's view of one split virtqueue's memory: where the descriptor table, the
//! avail ring and the used ring put each field, and the driver's reads and writes of
//! them. Sizes and offsets come from virtio-bindings' `vring_desc`, `vring_avail`,
//! `vring_used_elem` and `vring_used`.
//!
//! [`BlkQueue`](crate::BlkQueue) keeps its rings through a [`SplitRing`]; tests that
//! speak raw vhost-user use one at addresses of their choosing to place any descriptor
//! (well-formed or not) and any index.

use std::mem::{offset_of, size_of};
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{vring_avail, vring_desc, vring_used, vring_used_elem};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Size of one descriptor (`struct vring_desc`).
pub const DESC_SIZE: u64 = size_of::<vring_desc>() as u64;
/// Size of one used-ring element (`struct vring_used_elem`).
const USED_ELEM_SIZE: u64 = size_of::<vring_used_elem>() as u64;
/// Size of one avail-ring entry (a descriptor index).
const AVAIL_ENTRY_SIZE: u64 = size_of::<u16>() as u64;
/// Size of the event field after either ring's entries (`used_event`, `avail_event`).
const EVENT_SIZE: u64 = size_of::<u16>() as u64;

/// Where one split ring of `size` entries lies in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRing {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
}

impl SplitRing {
    /// A ring of `size` entries with its descriptor table, avail ring and used ring at
    /// these guest addresses. Nothing is checked: a test may place a ring anywhere.
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        Self {
            desc,
            avail,
            used,
            size,
        }
    }

    /// Bytes of a descriptor table of `size` entries.
    pub fn desc_table_bytes(size: u16) -> u64 {
        DESC_SIZE * u64::from(size)
    }

    /// Bytes of an avail ring of `size` entries: flags, idx, ring, `used_event`.
    pub fn avail_ring_bytes(size: u16) -> u64 {
        size_of::<vring_avail>() as u64 + AVAIL_ENTRY_SIZE * u64::from(size) + EVENT_SIZE
    }

    /// Bytes of a used ring of `size` entries: flags, idx, ring, `avail_event`.
    pub fn used_ring_bytes(size: u16) -> u64 {
        size_of::<vring_used>() as u64 + USED_ELEM_SIZE * u64::from(size) + EVENT_SIZE
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor table, avail ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Address of descriptor `index` of the ring's own table.
    pub fn desc_addr(&self, index: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(index)
    }

    /// Address of the avail entry that avail index `pos` fills.
    pub fn avail_entry_addr(&self, pos: u16) -> u64 {
        let slot = u64::from(pos % self.size);
        self.avail + offset_of!(vring_avail, ring) as u64 + AVAIL_ENTRY_SIZE * slot
    }

    /// Address of the avail ring's `idx`.
    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + offset_of!(vring_avail, idx) as u64
    }

    /// Address of `used_event`, after the avail ring's entries.
    pub fn used_event_addr(&self) -> u64 {
        self.avail + offset_of!(vring_avail, ring) as u64 + AVAIL_ENTRY_SIZE * u64::from(self.size)
    }

    /// Address of the used ring's `flags`.
    pub fn used_flags_addr(&self) -> u64 {
        self.used + offset_of!(vring_used, flags) as u64
    }

    /// Address of the used ring's `idx`.
    pub fn used_idx_addr(&self) -> u64 {
        self.used + offset_of!(vring_used, idx) as u64
    }

    /// Address of the used element that used index `pos` fills.
    pub fn used_elem_addr(&self, pos: u16) -> u64 {
        let slot = u64::from(pos % self.size);
        self.used + offset_of!(vring_used, ring) as u64 + USED_ELEM_SIZE * slot
    }

    /// Address of `avail_event`, after the used ring's elements.
    pub fn avail_event_addr(&self) -> u64 {
        self.used + offset_of!(vring_used, ring) as u64 + USED_ELEM_SIZE * u64::from(self.size)
    }

    /// Writes a descriptor at guest address `at` (an entry of any table: the ring's
    /// own, an indirect one, or wherever a test puts one).
    pub fn write_desc_at(
        mem: &GuestMemoryMmap,
        at: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), GuestMemoryError> {
        let mut bytes = [0u8; DESC_SIZE as usize];
        let mut put = |offset: usize, field: &[u8]| {
            bytes[offset..offset + field.len()].copy_from_slice(field);
        };
        put(offset_of!(vring_desc, addr), &addr.to_le_bytes());
        put(offset_of!(vring_desc, len), &len.to_le_bytes());
        put(offset_of!(vring_desc, flags), &flags.to_le_bytes());
        put(offset_of!(vring_desc, next), &next.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(at))
    }

    /// Writes descriptor `index` of the ring's own table.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), GuestMemoryError> {
        Self::write_desc_at(mem, self.desc_addr(index), addr, len, flags, next)
    }

    /// Zeroes the descriptor table and both rings (flags, indexes, event fields).
    pub fn reset(&self, mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
        for (at, len) in [
            (self.desc, Self::desc_table_bytes(self.size)),
            (self.avail, Self::avail_ring_bytes(self.size)),
            (self.used, Self::used_ring_bytes(self.size)),
        ] {
            mem.write_slice(&vec![0u8; len as usize], GuestAddress(at))?;
        }
        Ok(())
    }

    /// Makes chain `head` available as avail index `pos` and publishes `pos + 1`,
    /// which it returns. The entry is visible before the new index (release).
    pub fn publish(
        &self,
        mem: &GuestMemoryMmap,
        pos: u16,
        head: u16,
    ) -> Result<u16, GuestMemoryError> {
        mem.store(
            head.to_le(),
            GuestAddress(self.avail_entry_addr(pos)),
            Ordering::Relaxed,
        )?;
        let next = pos.wrapping_add(1);
        self.set_avail_idx(mem, next)?;
        Ok(next)
    }

    /// Writes the avail ring's `idx` (any value), after everything written before it.
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) -> Result<(), GuestMemoryError> {
        mem.store(
            idx.to_le(),
            GuestAddress(self.avail_idx_addr()),
            Ordering::Release,
        )
    }

    /// The used ring's `idx`; the elements it covers are visible once it is (acquire).
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, GuestMemoryError> {
        let idx: u16 = mem.load(GuestAddress(self.used_idx_addr()), Ordering::Acquire)?;
        Ok(u16::from_le(idx))
    }

    /// The used element of used index `pos`: descriptor id and length written.
    pub fn used_elem(
        &self,
        mem: &GuestMemoryMmap,
        pos: u16,
    ) -> Result<(u32, u32), GuestMemoryError> {
        let elem = self.used_elem_addr(pos);
        let id: u32 = mem.read_obj(GuestAddress(elem + offset_of!(vring_used_elem, id) as u64))?;
        let len: u32 =
            mem.read_obj(GuestAddress(elem + offset_of!(vring_used_elem, len) as u64))?;
        Ok((u32::from_le(id), u32::from_le(len)))
    }

    /// The used ring's `flags` (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self, mem: &GuestMemoryMmap) -> Result<u16, GuestMemoryError> {
        let flags: u16 = mem.load(GuestAddress(self.used_flags_addr()), Ordering::Relaxed)?;
        Ok(u16::from_le(flags))
    }

    /// `avail_event` (with `VIRTIO_RING_F_EVENT_IDX`): the avail index at which the
    /// device wants the next kick, which is how far it has consumed the avail ring.
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> Result<u16, GuestMemoryError> {
        let event: u16 = mem.load(GuestAddress(self.avail_event_addr()), Ordering::Relaxed)?;
        Ok(u16::from_le(event))
    }

    /// Writes `used_event` (with `VIRTIO_RING_F_EVENT_IDX`): the used index at which
    /// the driver wants the next call.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) -> Result<(), GuestMemoryError> {
        mem.store(
            idx.to_le(),
            GuestAddress(self.used_event_addr()),
            Ordering::Relaxed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_the_virtio_split_ring_layout() {
        let ring = SplitRing::new(0x1000, 0x2000, 0x3000, 256);
        assert_eq!(DESC_SIZE, 16);
        assert_eq!(ring.desc_addr(3), 0x1000 + 48);
        assert_eq!(ring.avail_idx_addr(), 0x2002);
        assert_eq!(ring.avail_entry_addr(0), 0x2004);
        assert_eq!(ring.avail_entry_addr(257), 0x2006);
        assert_eq!(ring.used_event_addr(), 0x2004 + 2 * 256);
        assert_eq!(ring.used_flags_addr(), 0x3000);
        assert_eq!(ring.used_idx_addr(), 0x3002);
        assert_eq!(ring.used_elem_addr(1), 0x3004 + 8);
        assert_eq!(ring.avail_event_addr(), 0x3004 + 8 * 256);
        assert_eq!(SplitRing::avail_ring_bytes(256), 4 + 2 * 256 + 2);
        assert_eq!(SplitRing::used_ring_bytes(256), 4 + 8 * 256 + 2);
    }
}
