//! Scatter lists of host memory that requests read into or write from.
//!
//! Guest buffers are host memory mapped from the guest's memory file; the
//! guest may change them at any time, so they are only touched through
//! syscalls (`preadv`/`pwritev`) or byte copies through raw pointers, never
//! through Rust references.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

/// Most iovecs one `preadv` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: libc::c_int = 1024;

/// A list of host memory ranges, in order, seen as one buffer of `len()` bytes.
#[derive(Debug)]
pub struct IoBufs<'a> {
    iovecs: Vec<libc::iovec>,
    len: usize,
    _memory: PhantomData<&'a mut [u8]>,
}

// SAFETY: the ranges are plain memory that stays mapped for 'a; sending the
// list to another thread does not change who may access it.
unsafe impl Send for IoBufs<'_> {}

impl<'a> IoBufs<'a> {
    /// Builds a scatter list from raw ranges.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes for `'a` (for
    /// example guest memory mapped for the whole life of the connection).
    pub unsafe fn from_raw(ranges: impl IntoIterator<Item = (*mut u8, usize)>) -> Self {
        let iovecs: Vec<libc::iovec> = ranges
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(ptr, len)| libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            })
            .collect();
        let len = iovecs.iter().map(|v| v.iov_len).sum();
        IoBufs {
            iovecs,
            len,
            _memory: PhantomData,
        }
    }

    /// A scatter list over one ordinary buffer.
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        // SAFETY: the slice is valid for reads and writes for 'a and is
        // borrowed mutably for as long as the IoBufs lives.
        unsafe { Self::from_raw([(buf.as_mut_ptr(), buf.len())]) }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The iovecs covering bytes `[start, start + len)`, for vectored I/O.
    pub fn iovecs(&self, start: usize, len: usize) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        let mut skip = start;
        let mut want = len;
        for v in &self.iovecs {
            if want == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(want);
            out.push(libc::iovec {
                // SAFETY: skip < iov_len, so the pointer stays in the range.
                iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
                iov_len: n,
            });
            want -= n;
            skip = 0;
        }
        out
    }

    /// Calls `f(ptr, len)` for each contiguous piece of `[start, start + len)`.
    fn for_each_range(&self, start: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut done = 0;
        for v in self.iovecs(start, len) {
            f(v.iov_base.cast(), v.iov_len, done);
            done += v.iov_len;
        }
    }

    /// Writes `src` into the list at byte `at`.
    pub fn copy_from(&self, at: usize, src: &[u8]) {
        self.for_each_range(at, src.len(), |ptr, n, done| {
            // SAFETY: ptr..ptr+n is inside a range valid for writes (see
            // `from_raw`), and src[done..done+n] is in bounds because the
            // pieces add up to src.len().
            unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), ptr, n) }
        });
    }

    /// Reads `dst.len()` bytes of the list from byte `at` into `dst`.
    pub fn copy_to(&self, at: usize, dst: &mut [u8]) {
        self.for_each_range(at, dst.len(), |ptr, n, done| {
            // SAFETY: as in `copy_from`, with the roles swapped.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst[done..].as_mut_ptr(), n) }
        });
    }

    /// Zeroes `len` bytes from byte `at`.
    pub fn fill_zero(&self, at: usize, len: usize) {
        self.for_each_range(at, len, |ptr, n, _| {
            // SAFETY: ptr..ptr+n is inside a range valid for writes.
            unsafe { std::ptr::write_bytes(ptr, 0, n) }
        });
    }
}

impl IoBufs<'_> {
    /// Reads `len` bytes of `file` at `file_offset` into bytes
    /// `[at, at + len)` of the list with `preadv`, straight into the
    /// target memory. A file that ends early is an error, never zeros.
    pub fn read_from_file(
        &self,
        file: &File,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        self.vectored(file, file_offset, at, len, Direction::Read)
    }

    /// Writes bytes `[at, at + len)` of the list to `file` at `file_offset`
    /// with `pwritev`, straight from the source memory.
    pub fn write_to_file(
        &self,
        file: &File,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        self.vectored(file, file_offset, at, len, Direction::Write)
    }

    fn vectored(
        &self,
        file: &File,
        file_offset: u64,
        at: usize,
        len: usize,
        dir: Direction,
    ) -> io::Result<()> {
        let mut iovs = self.iovecs(at, len);
        let mut offset = file_offset;
        while !iovs.is_empty() {
            let cnt = libc::c_int::try_from(iovs.len()).map_or(IOV_MAX, |n| n.min(IOV_MAX));
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let n = match dir {
                // SAFETY: the iovecs point into ranges valid for writes
                // (see `from_raw`) and `cnt` is within the list.
                Direction::Read => unsafe {
                    libc::preadv(file.as_raw_fd(), iovs.as_ptr(), cnt, off)
                },
                // SAFETY: as above; the ranges are valid for reads too.
                Direction::Write => unsafe {
                    libc::pwritev(file.as_raw_fd(), iovs.as_ptr(), cnt, off)
                },
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(match dir {
                    Direction::Read => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("file ends before offset {offset}"),
                    ),
                    Direction::Write => io::ErrorKind::WriteZero.into(),
                });
            }
            offset += n as u64;
            advance(&mut iovs, n as usize);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Drops the first `n` bytes from a list of iovecs.
fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut done = 0;
    for v in iovs.iter_mut() {
        if n < v.iov_len {
            // SAFETY: n < iov_len, so the pointer stays inside the range.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        done += 1;
    }
    iovs.drain(..done);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_across_buffers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        // SAFETY: both arrays outlive the list and are not otherwise used.
        let bufs = unsafe { IoBufs::from_raw([(a.as_mut_ptr(), 3), (b.as_mut_ptr(), 5)]) };
        assert_eq!(bufs.len(), 8);
        bufs.copy_from(1, &[1, 2, 3, 4]);
        let mut out = [0u8; 8];
        bufs.copy_to(0, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 0, 0, 0]);
        bufs.fill_zero(2, 2);
        bufs.copy_to(0, &mut out);
        assert_eq!(out, [0, 1, 0, 0, 4, 0, 0, 0]);
        let v = bufs.iovecs(2, 4);
        assert_eq!(v.iter().map(|v| v.iov_len).collect::<Vec<_>>(), [1, 3]);
        drop(bufs);
        assert_eq!((a, b), ([0, 1, 0], [0, 4, 0, 0, 0]));
    }

    #[test]
    fn read_from_file_fills_and_reports_short_files() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..100u8).collect::<Vec<_>>()).unwrap();
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        // SAFETY: both arrays outlive the list and are not otherwise used.
        let bufs = unsafe { IoBufs::from_raw([(a.as_mut_ptr(), 3), (b.as_mut_ptr(), 5)]) };
        bufs.read_from_file(&f, 10, 1, 6).unwrap();
        let mut got = [0u8; 8];
        bufs.copy_to(0, &mut got);
        assert_eq!(got, [0, 10, 11, 12, 13, 14, 15, 0]);
        let err = bufs.read_from_file(&f, 97, 0, 8).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
