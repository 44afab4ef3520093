//! The block device a vhost-user-blk connection serves.

use std::io;

use ociblk_io::iobuf::IoBufs;

/// A disk as the request handler sees it. Offsets and lengths are bytes and
/// already checked against `size()` by the caller; implementations are
/// shared by all queue threads.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn size(&self) -> u64;
    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool;
    /// Fills all of `dst` with the bytes at `offset`.
    fn read(&self, offset: u64, dst: &IoBufs<'_>) -> io::Result<()>;
    /// Writes all of `src` at `offset`.
    fn write(&self, offset: u64, src: &IoBufs<'_>) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Drops `len` bytes at `offset`; they read back as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes `len` bytes at `offset`.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}
