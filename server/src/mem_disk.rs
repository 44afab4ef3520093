//! An in-memory [`BlockDevice`] for tests, with optional fault injection.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ociblk_io::iobuf::IoBufs;

use crate::device::BlockDevice;

/// A disk held in a `Vec<u8>`.
#[derive(Debug)]
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    /// Number of upcoming I/O calls that fail with EIO.
    fail_next: AtomicU32,
    flushes: AtomicU64,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes (a multiple of 512).
    pub fn new(size: usize) -> Self {
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `data` (its length a multiple of 512).
    pub fn from_bytes(data: Vec<u8>) -> Self {
        MemDisk {
            data: RwLock::new(data),
            read_only: false,
            fail_next: AtomicU32::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// Makes the disk read-only.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Makes the next `count` calls of read, write, flush, discard or
    /// write_zeroes fail with EIO.
    pub fn fail_next(&self, count: u32) {
        self.fail_next.store(count, Ordering::SeqCst);
    }

    /// A copy of `len` bytes at `offset`.
    pub fn contents(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data()[offset..offset + len].to_vec()
    }

    /// Overwrites the bytes at `offset` with `bytes`.
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        self.data_mut()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Number of successful flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn data(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A panicking test thread must not hide the data from the others.
        self.data.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn data_mut(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Consumes one injected fault, if any is pending.
    fn injected_fault(&self) -> io::Result<()> {
        let pending = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match pending {
            Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Err(_) => Ok(()),
        }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        Ok(())
    }
}

/// The byte range `[offset, offset + len)` if it lies within `size`.
fn range(offset: u64, len: u64, size: usize) -> io::Result<Range<usize>> {
    let end = offset
        .checked_add(len)
        .filter(|&end| end <= size as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    // Both fit in usize because they are at most `size`.
    Ok(offset as usize..end as usize)
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, dst: &IoBufs<'_>) -> io::Result<()> {
        self.injected_fault()?;
        let data = self.data();
        let r = range(offset, dst.len() as u64, data.len())?;
        dst.copy_from(0, &data[r]);
        Ok(())
    }

    fn write(&self, offset: u64, src: &IoBufs<'_>) -> io::Result<()> {
        self.injected_fault()?;
        self.writable()?;
        let mut data = self.data_mut();
        let r = range(offset, src.len() as u64, data.len())?;
        src.copy_to(0, &mut data[r]);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.injected_fault()?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.injected_fault()?;
        self.writable()?;
        let mut data = self.data_mut();
        let r = range(offset, len, data.len())?;
        data[r].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_faults() {
        let disk = MemDisk::new(4096);
        let mut buf = [7u8; 512];
        disk.write(512, &IoBufs::from_slice(&mut buf)).unwrap();
        assert_eq!(disk.contents(512, 512), [7u8; 512]);

        disk.fail_next(2);
        let mut out = [0u8; 512];
        assert_eq!(
            disk.read(512, &IoBufs::from_slice(&mut out))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EIO)
        );
        assert!(disk.flush().is_err());
        disk.read(512, &IoBufs::from_slice(&mut out)).unwrap();
        assert_eq!(out, [7u8; 512]);

        disk.discard(512, 512).unwrap();
        assert_eq!(disk.contents(512, 512), [0u8; 512]);
        assert!(disk.write_zeroes(4096, 512).is_err());
    }

    #[test]
    fn read_only_refuses_writes() {
        let disk = MemDisk::new(1024).with_read_only(true);
        assert!(disk.read_only());
        let mut buf = [1u8; 512];
        assert!(disk.write(0, &IoBufs::from_slice(&mut buf)).is_err());
        assert!(disk.write_zeroes(0, 512).is_err());
    }
}
