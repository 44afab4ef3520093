// SPDX-License-Identifier: Apache-2.0

//! The client's guest memory: one memfd-backed region shared with the backend, and a
//! size-class allocator handing out per-request buffers inside it.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::ClientError;

/// Guest physical address at which the client's single memory region starts.
///
/// Everything below it is outside guest memory, which makes low addresses handy for
/// crafting descriptors that point nowhere.
pub const GUEST_MEMORY_BASE: u64 = 0x1_0000;

/// Page size used to align rings and large buffers.
pub(crate) const PAGE_SIZE: u64 = 4096;

/// Smallest buffer handed out by [`BufferPool`]; also the alignment of small buffers.
const MIN_BLOCK_SHIFT: u32 = 6;

/// Name of the memfd, visible in `/proc/<pid>/fd` of both ends.
const MEMFD_NAME: &std::ffi::CStr = c"ociblk-client-guest-ram";

/// Rounds `value` up to a multiple of `align` (a power of two).
pub(crate) fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// Guest memory: one shared mapping of a memfd, at [`GUEST_MEMORY_BASE`] for the
/// client.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Creates a memfd of `size` bytes and maps it shared at [`GUEST_MEMORY_BASE`].
    pub fn new(size: usize) -> Result<Self, ClientError> {
        Self::at(GUEST_MEMORY_BASE, size)
    }

    /// Creates a memfd of `size` bytes and maps it shared at guest physical
    /// address `base`.
    pub fn at(base: u64, size: usize) -> Result<Self, ClientError> {
        // SAFETY: `MEMFD_NAME` is a valid NUL-terminated string and the flags are valid;
        // the return value is checked before use.
        let fd = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(ClientError::Memory(format!(
                "memfd_create: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size as u64)
            .map_err(|e| ClientError::Memory(format!("sizing memfd to {size} bytes: {e}")))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| ClientError::Memory(format!("mapping {size} bytes of guest memory: {e}")))?;
        Ok(Self {
            mem,
            size: size as u64,
        })
    }

    /// The vm-memory view of guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Describes the region for `VHOST_USER_SET_MEM_TABLE`.
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo, ClientError> {
        let region = self
            .mem
            .iter()
            .next()
            .ok_or_else(|| ClientError::Memory("guest memory has no region".into()))?;
        VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| ClientError::Memory(format!("describing guest memory region: {e}")))
    }

    /// This process's virtual address of guest physical address `gpa`.
    pub fn host_address(&self, gpa: u64) -> Result<u64, ClientError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| ClientError::Memory(format!("translating {gpa:#x}: {e}")))
    }
}

/// One allocation from a [`BufferPool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    /// Guest physical address of the block.
    pub(crate) addr: u64,
    /// Size class: the block holds `1 << (class + MIN_BLOCK_SHIFT)` bytes.
    class: u32,
}

/// Power-of-two size-class allocator over a range of guest memory.
///
/// New blocks are carved from the range with a bump pointer; freed blocks go to a free
/// list per class and are reused first, so a steady stream of same-sized requests (a
/// benchmark) stops growing after the first round.
#[derive(Debug)]
pub(crate) struct BufferPool {
    next: u64,
    end: u64,
    free: Vec<Vec<u64>>,
}

impl BufferPool {
    /// A pool over `[start, end)` (guest physical addresses).
    pub(crate) fn new(start: u64, end: u64) -> Self {
        Self {
            next: start,
            end,
            free: Vec::new(),
        }
    }

    fn class_of(len: u64) -> u32 {
        let len = len.max(1 << MIN_BLOCK_SHIFT);
        let shift = u64::BITS - (len - 1).leading_zeros();
        shift - MIN_BLOCK_SHIFT
    }

    /// Allocates a block of at least `len` bytes; `None` when the pool is exhausted.
    pub(crate) fn alloc(&mut self, len: u64) -> Option<Block> {
        let class = Self::class_of(len);
        if let Some(addr) = self.free.get_mut(class as usize).and_then(Vec::pop) {
            return Some(Block { addr, class });
        }
        let size = 1u64.checked_shl(class + MIN_BLOCK_SHIFT)?;
        let start = align_up(self.next, size.min(PAGE_SIZE));
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(Block { addr: start, class })
    }

    /// Returns a block to the pool.
    pub(crate) fn free(&mut self, block: Block) {
        let class = block.class as usize;
        if self.free.len() <= class {
            self.free.resize_with(class + 1, Vec::new);
        }
        self.free[class].push(block.addr);
    }
}

/// Shared handle to guest memory, as held by each queue.
pub(crate) type SharedRam = Arc<GuestRam>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_classes_and_reuse() {
        let mut pool = BufferPool::new(0x1000, 0x1000 + 8192);
        let a = pool.alloc(1).expect("small block");
        assert_eq!(a.addr, 0x1000);
        let b = pool.alloc(64).expect("64-byte block");
        assert_eq!(b.addr, 0x1040);
        let c = pool.alloc(65).expect("128-byte block");
        assert_eq!(c.addr, 0x1080);
        pool.free(b);
        assert_eq!(pool.alloc(10), Some(b));
        let page = pool.alloc(4096).expect("page");
        assert_eq!(page.addr, 0x2000);
        assert_eq!(pool.alloc(4096), None);
        pool.free(page);
        assert_eq!(pool.alloc(3000), Some(page));
    }

    #[test]
    fn guest_ram_maps_memfd() {
        let ram = GuestRam::new(1 << 20).expect("guest ram");
        let info = ram.region_info().expect("region info");
        assert_eq!(info.guest_phys_addr, GUEST_MEMORY_BASE);
        assert_eq!(info.memory_size, 1 << 20);
        assert_eq!(info.mmap_offset, 0);
        assert!(info.mmap_handle >= 0);
        assert_eq!(
            ram.host_address(GUEST_MEMORY_BASE).expect("host address"),
            info.userspace_addr
        );
        ram.host_address(0).unwrap_err();
    }
}
