//! Copying a range from one file to another by the best way that works
//! between them: a shared extent (`FICLONERANGE`), the kernel's copy
//! (`copy_file_range`, which may share extents too), or reads and writes.
//! A way that fails as unsupported is dropped for the rest of the copy.
//! All-zero blocks written by the last way stay holes.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::sys;

/// Bytes per `copy_file_range` call: progress is reported between calls.
const KERNEL_COPY_STEP: u64 = 64 << 20;
/// Bytes per read and write of a plain copy.
const PLAIN_STEP: u64 = 1 << 20;

/// How bytes are copied; each falls back to the next for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `FICLONERANGE`: block-aligned ranges on a file system that shares
    /// extents.
    Clone,
    /// `copy_file_range`.
    CopyRange,
    /// `pread` and `pwrite`.
    Plain,
}

/// Bytes copied, by how.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Shared with the source (`FICLONERANGE`): no data copied.
    pub cloned: u64,
    /// Copied by the kernel (`copy_file_range`).
    pub copied: u64,
    /// Read and written (all-zero blocks left as holes).
    pub written: u64,
}

impl CopyStats {
    pub fn total(&self) -> u64 {
        self.cloned + self.copied + self.written
    }
}

/// Whether an error says the method cannot work between these files.
fn cannot(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::EXDEV
                | libc::EINVAL
                | libc::ENOSYS
                | libc::ENOTTY
                | libc::EBADF
                | libc::ETXTBSY
        )
    )
}

/// Copies ranges of `src` into `dst` by the best [`Method`] that works,
/// and counts how.
#[derive(Debug)]
pub struct FileCopier<'a> {
    src: &'a File,
    dst: &'a File,
    /// The method to try first.
    method: Method,
    /// The unit of a clone and of the holes a plain copy leaves.
    block: u64,
    pub stats: CopyStats,
}

impl<'a> FileCopier<'a> {
    /// A copier from `src` to `dst` trying `method` first, in units of
    /// `block` bytes (a power of two).
    pub fn new(src: &'a File, dst: &'a File, method: Method, block: u64) -> Self {
        FileCopier {
            src,
            dst,
            method,
            block: block.max(1),
            stats: CopyStats::default(),
        }
    }

    /// Copies only the allocated extents of `len` bytes at `src_off` to
    /// `dst_off`, whole blocks at a time, so that holes stay holes.
    pub fn copy_allocated(&mut self, src_off: u64, dst_off: u64, len: u64) -> io::Result<()> {
        let end = src_off + len;
        let mut pos = src_off;
        let bs = self.block;
        while pos < end {
            let Some((s, e)) = sys::next_data(self.src.as_fd(), pos)? else {
                break;
            };
            if s >= end {
                break;
            }
            // Whole blocks: a clone works in file system blocks.
            let s = src_off + (s.max(pos) - src_off) / bs * bs;
            let e = (src_off + (e.min(end) - src_off).div_ceil(bs) * bs).min(end);
            self.copy(s, dst_off + (s - src_off), e - s)?;
            pos = e;
        }
        Ok(())
    }

    /// Copies `len` bytes at `src_off` to `dst_off`. A source that ends
    /// early is an `UnexpectedEof` error.
    pub fn copy(&mut self, src_off: u64, dst_off: u64, len: u64) -> io::Result<()> {
        let (src, dst) = (self.src.as_fd(), self.dst.as_fd());
        if self.method == Method::Clone {
            match sys::clone_range(src, src_off, dst, dst_off, len) {
                Ok(()) => {
                    self.stats.cloned += len;
                    return Ok(());
                }
                Err(e) if cannot(&e) => {
                    tracing::debug!(error = %e, "FICLONERANGE unavailable: copying with copy_file_range");
                    self.method = Method::CopyRange;
                }
                Err(e) => return Err(e),
            }
        }
        let mut done = 0;
        if self.method == Method::CopyRange {
            while done < len {
                let want = (len - done).min(KERNEL_COPY_STEP) as usize;
                match sys::copy_file_range(src, src_off + done, dst, dst_off + done, want) {
                    Ok(0) => return Err(ended_early(len - done)),
                    Ok(n) => {
                        done += n as u64;
                        self.stats.copied += n as u64;
                    }
                    Err(e) if cannot(&e) && done == 0 => {
                        tracing::debug!(error = %e, "copy_file_range unavailable: copying plainly");
                        self.method = Method::Plain;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if done == len {
                return Ok(());
            }
        }
        self.copy_plain(src_off + done, dst_off + done, len - done)
    }

    /// Reads and writes, leaving all-zero blocks as holes.
    fn copy_plain(&mut self, src_off: u64, dst_off: u64, len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; PLAIN_STEP.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.src
                .read_exact_at(&mut buf[..n], src_off + done)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => ended_early(len - done),
                    _ => e,
                })?;
            for (i, block) in buf[..n].chunks(self.block as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    let at = dst_off + done + (i as u64) * self.block;
                    self.dst.write_all_at(block, at)?;
                    self.stats.written += block.len() as u64;
                }
            }
            done += n as u64;
        }
        Ok(())
    }
}

fn ended_early(left: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the source ended {left} bytes early"),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn every_method_copies_the_bytes_and_keeps_zero_blocks_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 | 1).collect();
        let src = File::create_new(&src_path).unwrap();
        src.write_all_at(&data, 0).unwrap();
        src.write_all_at(&[0u8; 8192], 3 * 4096).unwrap();
        let src = File::open(&src_path).unwrap();
        for method in [Method::Clone, Method::CopyRange, Method::Plain] {
            let dst_path = dir.path().join(format!("{method:?}"));
            let dst = File::create_new(&dst_path).unwrap();
            dst.set_len(1 << 20).unwrap();
            let mut copier = FileCopier::new(&src, &dst, method, 4096);
            copier.copy(0, 4096, 5 * 4096).unwrap();
            // A plain copy writes the 3 data blocks and leaves the 2 zero
            // blocks out; the kernel copies all 5.
            let expected = if copier.method == Method::Plain { 3 } else { 5 };
            assert_eq!(copier.stats.total(), expected * 4096, "{method:?}");
            let mut got = vec![0u8; 3 * 4096];
            dst.read_exact_at(&mut got, 4096).unwrap();
            assert_eq!(got, data, "{method:?}");
            if method == Method::Plain {
                let blocks = std::fs::metadata(&dst_path).unwrap().blocks() * 512;
                assert!(
                    blocks <= 3 * 4096 + 4096,
                    "{method:?}: {blocks} bytes allocated"
                );
            }
            let err = copier.copy(4 * 4096, 0, 4 * 4096).unwrap_err();
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "{method:?}: {err}"
            );
        }
    }
}
