//! Per-chunk fetch locks: a byte-range lock on the chunk map (one byte per
//! chunk, shared by threads and processes alike: Linux open-file-description
//! locks), and beside it a lease that makes holding the lock observable.
//!
//! The lease file has one 16-byte slot per chunk: the holder's pid (u32
//! LE), 4 reserved bytes, and the time (u64 LE, ms since the Unix epoch) the
//! holder last renewed it; all zero when nobody holds the chunk. A holder
//! renews its slot every [`RENEW`] from a thread of its process while it
//! holds the lock. A process that stops (SIGSTOP, a debugger) keeps its
//! lock but renews nothing: a waiter that sees a slot unchanged for the
//! lease time takes the chunk over and fetches it itself. That is safe
//! because the lock only saves duplicate fetches: every fetcher stores only
//! bytes that match the chunk's hash, so two fetchers write the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::file::{self, Access};

/// Bytes per chunk in a lease file.
pub(crate) const LEASE_SLOT: u64 = 16;
/// How often a holder renews its leases.
const RENEW: Duration = Duration::from_millis(250);
/// Longest a waiter watches an unchanged lease before it takes over.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(3);

/// A held chunk: the lock (when taken normally) and the lease renewed
/// while it lives; released (lease cleared, lock dropped) when dropped.
#[derive(Debug)]
pub struct ChunkLock {
    _lock: Option<File>,
    _lease: Lease,
}

/// How a chunk was taken.
#[derive(Debug)]
pub enum Taken {
    /// The lock was free or came free.
    Locked(ChunkLock),
    /// The holder (pid, 0 if unknown) renewed nothing for the lease time:
    /// the chunk is fetched here, beside it.
    Overtaken(ChunkLock, u32),
    /// `done()` said the chunk is there now.
    Done,
}

impl ChunkLock {
    /// Takes chunk `index` of the map at `map_path` (leases in `leases`),
    /// waiting until `deadline`. While waiting it polls `done` (another
    /// fetcher stored the chunk) and the holder's lease: unchanged for
    /// `lease_time`, the chunk is taken over. `Ok(None)` at the deadline.
    pub fn acquire(
        map_path: &Path,
        leases: &Arc<File>,
        index: u64,
        deadline: Instant,
        lease_time: Duration,
        done: &dyn Fn() -> io::Result<bool>,
    ) -> io::Result<Option<Taken>> {
        // A fresh open file description per lock: OFD locks taken through
        // the same description do not exclude each other.
        let file = file::open(map_path, Access::ReadWrite)?;
        let mut wait = Duration::from_millis(1);
        // The holder's slot as last seen, and since when it is unchanged.
        let mut seen: Option<([u8; LEASE_SLOT as usize], Instant)> = None;
        loop {
            if try_lock_byte(&file, index)? {
                return Ok(Some(Taken::Locked(ChunkLock {
                    _lock: Some(file),
                    _lease: Lease::start(leases, index)?,
                })));
            }
            if done()? {
                return Ok(Some(Taken::Done));
            }
            let mut slot = [0u8; LEASE_SLOT as usize];
            // A short read (a lease file from before a resize) reads as free.
            let _ = leases.read_at(&mut slot, index * LEASE_SLOT);
            let now = Instant::now();
            match seen {
                Some((before, since)) if before == slot => {
                    if now.duration_since(since) >= lease_time {
                        let pid = u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]);
                        return Ok(Some(Taken::Overtaken(
                            ChunkLock {
                                _lock: None,
                                _lease: Lease::start(leases, index)?,
                            },
                            pid,
                        )));
                    }
                }
                _ => seen = Some((slot, now)),
            }
            let left = deadline.saturating_duration_since(now);
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

/// The holder of chunk `index` (pid) and how long ago it renewed its
/// lease, read from the lease file at `path`; `None` when nobody holds it.
pub fn lease_holder(path: &Path, index: u64) -> io::Result<Option<(u32, Duration)>> {
    let leases = file::open(path, Access::Read)?;
    let mut slot = [0u8; LEASE_SLOT as usize];
    if leases.read_at(&mut slot, index * LEASE_SLOT)? < slot.len() {
        return Ok(None);
    }
    let pid = u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]);
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&slot[8..]);
    let ms = u64::from_le_bytes(ms);
    if ms == 0 {
        return Ok(None);
    }
    let age = now_ms().saturating_sub(ms);
    Ok(Some((pid, Duration::from_millis(age))))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .max(1)
}

fn slot_bytes(ms: u64) -> [u8; LEASE_SLOT as usize] {
    let mut slot = [0u8; LEASE_SLOT as usize];
    if ms != 0 {
        slot[..4].copy_from_slice(&std::process::id().to_le_bytes());
        slot[8..].copy_from_slice(&ms.to_le_bytes());
    }
    slot
}

/// One lease this process renews.
#[derive(Debug)]
struct Lease {
    id: u64,
}

type Renewed = HashMap<u64, (Arc<File>, u64)>;

/// The leases this process holds, renewed by one thread.
fn renewed() -> &'static Mutex<Renewed> {
    static LEASES: OnceLock<Mutex<Renewed>> = OnceLock::new();
    LEASES.get_or_init(|| {
        // The renewing thread lives as long as the process; it renews
        // nothing while no lease is held. Failing to start it costs only
        // takeovers by other processes (duplicate fetches).
        let _ = std::thread::Builder::new()
            .name("chunk-lease".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(RENEW);
                    let slot = slot_bytes(now_ms());
                    let leases = renewed().lock().unwrap_or_else(PoisonError::into_inner);
                    for (file, offset) in leases.values() {
                        let _ = file.write_all_at(&slot, *offset);
                    }
                }
            });
        Mutex::new(HashMap::new())
    })
}

impl Lease {
    fn start(leases: &Arc<File>, index: u64) -> io::Result<Lease> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let offset = index * LEASE_SLOT;
        leases.write_all_at(&slot_bytes(now_ms()), offset)?;
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        renewed()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (leases.clone(), offset));
        Ok(Lease { id })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let entry = renewed()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        if let Some((file, offset)) = entry {
            let _ = file.write_all_at(&slot_bytes(0), offset);
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

    fn leases(dir: &Path) -> Arc<File> {
        let path = dir.join("leases");
        let f = file::open(&path, Access::Create).expect("leases");
        f.set_len(4 * LEASE_SLOT).expect("size");
        Arc::new(f)
    }

    fn take(path: &Path, l: &Arc<File>, i: u64, wait: Duration) -> Option<Taken> {
        let never = || Ok(false);
        ChunkLock::acquire(path, l, i, Instant::now() + wait, MAX_LEASE, &never).expect("lock")
    }

    #[test]
    fn excludes_same_byte_only_and_shows_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("map");
        std::fs::write(&path, [0u8; 4]).expect("write");
        let l = leases(dir.path());
        let held = take(&path, &l, 1, Duration::ZERO).expect("free");
        assert!(matches!(held, Taken::Locked(_)));
        let (pid, age) = lease_holder(&dir.path().join("leases"), 1)
            .expect("read")
            .expect("held");
        assert_eq!(pid, std::process::id());
        assert!(age < MAX_LEASE, "{age:?}");
        assert!(take(&path, &l, 1, Duration::ZERO).is_none());
        assert!(take(&path, &l, 2, Duration::ZERO).is_some());
        drop(held);
        assert_eq!(
            lease_holder(&dir.path().join("leases"), 1).expect("read"),
            None
        );
        assert!(take(&path, &l, 1, Duration::ZERO).is_some());
    }

    #[test]
    fn a_lease_nobody_renews_is_taken_over_and_a_stored_chunk_ends_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("map");
        std::fs::write(&path, [0u8; 4]).expect("write");
        let l = leases(dir.path());
        // A holder that renews nothing: the lock taken, the lease stamped
        // once by hand.
        let stalled = file::open(&path, Access::ReadWrite).expect("open");
        assert!(try_lock_byte(&stalled, 0).expect("lock"));
        l.write_all_at(&slot_bytes(now_ms()), 0).expect("stamp");
        let never = || Ok(false);
        let short = Duration::from_millis(100);
        let start = Instant::now();
        let taken =
            ChunkLock::acquire(&path, &l, 0, start + Duration::from_secs(10), short, &never)
                .expect("lock")
                .expect("taken over");
        assert!(matches!(taken, Taken::Overtaken(_, pid) if pid == std::process::id()));
        drop(taken);
        let done = || Ok(true);
        let found = ChunkLock::acquire(&path, &l, 0, Instant::now(), MAX_LEASE, &done)
            .expect("lock")
            .expect("done");
        assert!(matches!(found, Taken::Done));
    }
}
