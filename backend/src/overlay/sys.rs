//! Thin wrappers over the syscalls the overlay needs and std lacks.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most iovecs one preadv/pwritev call accepts on Linux.
const IOV_MAX: usize = 1024;

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Drops the first `n` bytes from an iovec list.
fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iovs.iter_mut() {
        if n < v.iov_len {
            // SAFETY: n < iov_len, so the pointer stays inside the range.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        drop += 1;
    }
    iovs.drain(..drop);
}

/// Writes every byte of `iovs` at `offset`, retrying short writes.
///
/// # Safety
/// Every iovec must be valid for reads for the duration of the call.
pub unsafe fn pwritev_all(
    fd: BorrowedFd<'_>,
    mut iovs: Vec<libc::iovec>,
    mut offset: u64,
) -> io::Result<()> {
    iovs.retain(|v| v.iov_len > 0);
    while !iovs.is_empty() {
        let cnt = iovs.len().min(IOV_MAX);
        // SAFETY: the caller guarantees the iovecs are readable; cnt is
        // within the list; offset fits off_t because the overlay bounds
        // every offset below i64::MAX.
        let n = unsafe {
            libc::pwritev(
                fd.as_raw_fd(),
                iovs.as_ptr(),
                cnt as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = last_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(&mut iovs, n as usize);
        offset += n as u64;
    }
    Ok(())
}

/// Fills every byte of `iovs` from `offset`, retrying short reads.
///
/// # Safety
/// Every iovec must be valid for writes for the duration of the call.
pub unsafe fn preadv_all(
    fd: BorrowedFd<'_>,
    mut iovs: Vec<libc::iovec>,
    mut offset: u64,
) -> io::Result<()> {
    iovs.retain(|v| v.iov_len > 0);
    while !iovs.is_empty() {
        let cnt = iovs.len().min(IOV_MAX);
        // SAFETY: the caller guarantees the iovecs are writable; cnt is
        // within the list; offset fits off_t (see pwritev_all).
        let n = unsafe {
            libc::preadv(
                fd.as_raw_fd(),
                iovs.as_ptr(),
                cnt as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = last_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        advance(&mut iovs, n as usize);
        offset += n as u64;
    }
    Ok(())
}

/// Deallocates `[offset, offset + len)`; the range reads back as zeros and
/// the file keeps its size.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    loop {
        // SAFETY: fallocate takes no pointers; the fd is open for writing.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = last_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether a punch failed only because the filesystem cannot punch holes.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync takes no pointers.
        if unsafe { libc::fdatasync(fd.as_raw_fd()) } == 0 {
            return Ok(());
        }
        let e = last_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes an exclusive lock without waiting; `Ok(false)` if someone holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    loop {
        // SAFETY: flock takes no pointers.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = last_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// `lseek(SEEK_DATA / SEEK_HOLE)`; `Ok(None)` when no data follows `offset`.
fn seek(fd: BorrowedFd<'_>, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek takes no pointers. It moves the shared file position,
    // which the overlay never uses (all I/O is positional).
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = last_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
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
