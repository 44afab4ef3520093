//! Thin wrappers over the file syscalls the overlay, the export and the
//! server's lock files need and neither std nor vmm-sys-util covers as
//! needed. vmm-sys-util's `SeekHole` wants a `&mut File` (it moves the
//! file position), hence `next_data` here; neither has `FICLONERANGE` or
//! `copy_file_range`. Locks are std's `flock`s, with the non-blocking
//! tries answered as a `bool`; syncs are std's `File::sync_data`.
//! Return codes are read with vmm-sys-util's `SyscallReturnCode`.

use std::fs::{File, TryLockError};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vmm_sys_util::fallocate::{FallocateMode, fallocate};
use vmm_sys_util::syscall::SyscallReturnCode;

/// Runs `call` again for as long as it fails with `EINTR`.
fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

fn invalid_input() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

/// Deallocates `[offset, offset + len)`; the range reads back as zeros and
/// the file keeps its size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    retry_interrupted(|| {
        fallocate(&fd, FallocateMode::PunchHole, true, offset, len).map_err(io::Error::from)
    })
}

/// Zeroes `[offset, offset + len)` and allocates it (`FALLOC_FL_ZERO_RANGE`),
/// so that later writes through a shared mapping need no new blocks.
pub fn zero_range(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    retry_interrupted(|| {
        fallocate(&fd, FallocateMode::ZeroRange, true, offset, len).map_err(io::Error::from)
    })
}

/// Whether a punch failed only because the filesystem cannot punch holes.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Takes an exclusive lock without waiting; `Ok(false)` if someone holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    try_lock(|| file.try_lock())
}

/// Takes a shared lock without waiting; `Ok(false)` if someone holds it
/// exclusively.
pub fn try_lock_shared(file: &File) -> io::Result<bool> {
    try_lock(|| file.try_lock_shared())
}

/// One non-blocking `flock` attempt, tried again only if interrupted.
fn try_lock(mut attempt: impl FnMut() -> Result<(), TryLockError>) -> io::Result<bool> {
    loop {
        match attempt() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// `lseek(SEEK_DATA / SEEK_HOLE)`; `Ok(None)` when no data follows `offset`.
fn seek(fd: BorrowedFd<'_>, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| invalid_input())?;
    // SAFETY: lseek takes no pointers. It moves the shared file position,
    // which the overlay never uses (all I/O is positional).
    match SyscallReturnCode(unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) }).into_result() {
        Ok(position) => Ok(u64::try_from(position).ok()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The next allocated extent `[start, end)` at or after `offset`.
pub fn next_data(fd: BorrowedFd<'_>, offset: u64) -> io::Result<Option<(u64, u64)>> {
    let Some(start) = seek(fd, offset, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    // A hole always follows data: at worst the virtual one at end of file.
    let end = seek(fd, start, libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
    Ok(Some((start, end)))
}

/// Shares `len` bytes of `src` at `src_off` into `dst` at `dst_off`
/// (`FICLONERANGE`: a reflink, no data copied). Offsets and length must
/// be multiples of the file system block size, except a length reaching
/// the end of `src`. Fails with `EOPNOTSUPP`, `EXDEV` or `EINVAL` where the
/// file system cannot share extents.
pub fn clone_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: u64,
) -> io::Result<()> {
    let arg = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    retry_interrupted(|| {
        // SAFETY: `arg` is a valid file_clone_range that outlives the call;
        // the kernel only reads it.
        let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &raw const arg) };
        SyscallReturnCode(r).into_empty_result()
    })
}

/// `copy_file_range` of up to `len` bytes between positions; returns the
/// bytes copied (0 at the end of `src`). The kernel copies in place, and
/// shares extents where the file system can.
pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut s = libc::loff_t::try_from(src_off).map_err(|_| invalid_input())?;
    let mut d = libc::loff_t::try_from(dst_off).map_err(|_| invalid_input())?;
    let copied = retry_interrupted(|| {
        // SAFETY: both descriptors are open and the offset pointers are
        // valid locals for the duration of the call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &raw mut s,
                dst.as_raw_fd(),
                &raw mut d,
                len,
                0,
            )
        };
        SyscallReturnCode(n).into_result()
    })?;
    usize::try_from(copied).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Makes the entries of the directory `dir` durable: what a create, link
/// or rename in it needs before the new name survives a host crash.
pub fn sync_dir(dir: &std::path::Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The directory that holds `path`: its parent, or `.` for a bare name.
pub fn parent_dir(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    }
}

/// What kind of file a file type is, for an error message ("a FIFO", ...).
pub fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_answer_whether_the_lock_was_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let open = || File::create(&path).unwrap();
        let (first, second) = (open(), open());
        assert!(try_lock_shared(&first).unwrap());
        assert!(
            try_lock_shared(&second).unwrap(),
            "a shared lock excluded another"
        );
        assert!(!try_lock_exclusive(&open()).unwrap(), "shared lock ignored");
        drop((first, second));
        let holder = open();
        assert!(try_lock_exclusive(&holder).unwrap());
        assert!(
            !try_lock_exclusive(&open()).unwrap(),
            "exclusive lock ignored"
        );
        assert!(!try_lock_shared(&open()).unwrap(), "exclusive lock ignored");
        drop(holder);
        assert!(
            try_lock_exclusive(&open()).unwrap(),
            "lock kept after close"
        );
    }
}
