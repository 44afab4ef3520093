//! Byte-range locks on a chunk map: one lock per chunk, shared by threads
//! and processes alike (Linux open-file-description locks).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// An exclusive lock on byte `index` of a chunk map, held by its own open
/// file description; released when dropped (the file is closed).
#[derive(Debug)]
pub struct ChunkLock {
    _file: File,
}

impl ChunkLock {
    /// Locks byte `index` of the file at `path`, waiting until `deadline`.
    /// `Ok(None)` when the lock is still held by another at the deadline.
    pub fn acquire(path: &Path, index: u64, deadline: Instant) -> io::Result<Option<Self>> {
        // A fresh open file description per lock: OFD locks taken through
        // the same description do not exclude each other.
        let file = File::options().read(true).write(true).open(path)?;
        let mut wait = Duration::from_millis(1);
        loop {
            if try_lock_byte(&file, index)? {
                return Ok(Some(ChunkLock { _file: file }));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Polling keeps the wait bounded by the deadline; a blocking
            // F_OFD_SETLKW could not be.
            std::thread::sleep(wait.min(left));
            wait = (wait * 2).min(Duration::from_millis(50));
        }
    }
}

/// Tries to take the write lock on one byte; `false` when another holds it.
fn try_lock_byte(file: &File, index: u64) -> io::Result<bool> {
    let start = libc::off_t::try_from(index)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "chunk index too large"))?;
    // SAFETY: flock is plain data; zeroed is a valid value (l_pid must be 0
    // for OFD locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start;
    lock.l_len = 1;
    // SAFETY: the descriptor is open for the duration of the call and `lock`
    // is a valid flock the kernel only reads.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_same_byte_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("map");
        std::fs::write(&path, [0u8; 4]).expect("write");
        let now = Instant::now;
        let held = ChunkLock::acquire(&path, 1, now())
            .expect("lock")
            .expect("free");
        assert!(ChunkLock::acquire(&path, 1, now()).expect("lock").is_none());
        assert!(ChunkLock::acquire(&path, 2, now()).expect("lock").is_some());
        drop(held);
        assert!(ChunkLock::acquire(&path, 1, now()).expect("lock").is_some());
    }
}
