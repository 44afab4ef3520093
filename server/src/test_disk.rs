//! A [`MemDisk`] whose reads of one sector and whose flushes can be held
//! back, for tests of request ordering and flushing; and one whose reads
//! of one sector panic, for tests of what a bug behind a request does.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ociblk_io::iobuf::IoBufs;

use crate::device::BlockDevice;
use crate::mem_disk::MemDisk;

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Gates {
    /// Reads at this byte offset wait while `reads_closed`.
    slow_read_offset: Option<u64>,
    reads_closed: bool,
    flushes_closed: bool,
    flushes_started: u64,
    reads_done: u64,
    writes_done: u64,
}

#[derive(Debug)]
pub struct GatedDisk {
    disk: MemDisk,
    gates: Mutex<Gates>,
    changed: Condvar,
}

impl GatedDisk {
    pub fn new(size: usize) -> Self {
        GatedDisk {
            disk: MemDisk::new(size),
            gates: Mutex::new(Gates::default()),
            changed: Condvar::new(),
        }
    }

    pub fn inner(&self) -> &MemDisk {
        &self.disk
    }

    fn gates(&self) -> MutexGuard<'_, Gates> {
        self.gates.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Gates)) {
        f(&mut self.gates());
        self.changed.notify_all();
    }

    /// Waits, on the test's side, until `done` holds. After the deadline
    /// it opens every gate, so that no server thread stays blocked, and
    /// panics.
    fn wait(&self, what: &str, done: impl Fn(&Gates) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut gates = self.gates();
        while !done(&gates) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                gates.reads_closed = false;
                gates.flushes_closed = false;
                drop(gates);
                self.changed.notify_all();
                panic!("timed out waiting for {what}");
            }
            gates = self
                .changed
                .wait_timeout(gates, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Blocks a device call while `closed` holds, at most until the
    /// deadline: a test that failed before opening a gate must still end.
    fn gate(&self, closed: impl Fn(&Gates) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut gates = self.gates();
        while closed(&gates) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            gates = self
                .changed
                .wait_timeout(gates, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Holds back reads at byte `offset` until [`Self::open_reads`].
    pub fn close_reads_at(&self, offset: u64) {
        self.update(|g| {
            g.slow_read_offset = Some(offset);
            g.reads_closed = true;
        });
    }

    pub fn open_reads(&self) {
        self.update(|g| g.reads_closed = false);
    }

    /// Holds back flushes until [`Self::open_flushes`].
    pub fn close_flushes(&self) {
        self.update(|g| g.flushes_closed = true);
    }

    pub fn open_flushes(&self) {
        self.update(|g| g.flushes_closed = false);
    }

    pub fn wait_for_flush_started(&self, n: u64) {
        self.wait("a flush to start", |g| g.flushes_started >= n);
    }

    pub fn wait_for_io(&self, reads: u64, writes: u64) {
        self.wait("reads and writes", |g| {
            g.reads_done >= reads && g.writes_done >= writes
        });
    }

    pub fn reads_done(&self) -> u64 {
        self.gates().reads_done
    }

    pub fn flushes(&self) -> u64 {
        self.disk.flushes()
    }
}

impl BlockDevice for GatedDisk {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, dst: &IoBufs<'_>) -> io::Result<()> {
        self.gate(|g| g.reads_closed && g.slow_read_offset == Some(offset));
        let result = self.disk.read(offset, dst);
        self.update(|g| g.reads_done += 1);
        result
    }

    fn write(&self, offset: u64, src: &IoBufs<'_>) -> io::Result<()> {
        let result = self.disk.write(offset, src);
        self.update(|g| g.writes_done += 1);
        result
    }

    fn flush(&self) -> io::Result<()> {
        self.update(|g| g.flushes_started += 1);
        self.gate(|g| g.flushes_closed);
        self.disk.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.write_zeroes(offset, len)
    }
}

/// A [`MemDisk`] whose reads at one byte offset panic, as a bug behind a
/// request would.
#[derive(Debug)]
pub struct PanickingDisk {
    disk: MemDisk,
    panic_at: u64,
}

impl PanickingDisk {
    pub fn new(size: usize, panic_at: u64) -> Self {
        PanickingDisk {
            disk: MemDisk::new(size),
            panic_at,
        }
    }
}

impl BlockDevice for PanickingDisk {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, dst: &IoBufs<'_>) -> io::Result<()> {
        assert_ne!(offset, self.panic_at, "test-injected panic on a read");
        self.disk.read(offset, dst)
    }

    fn write(&self, offset: u64, src: &IoBufs<'_>) -> io::Result<()> {
        self.disk.write(offset, src)
    }

    fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk.write_zeroes(offset, len)
    }
}
