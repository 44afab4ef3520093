//! The device's flush thread: device flushes run off the request path,
//! and flushes that arrive while one runs are merged into the next one
//! (group commit across queues).
//!
//! Guarantee: a waiter submitted at time T is answered with the result of
//! a device flush that started after T. [`BlockDevice::flush`] makes every
//! write that completed before it started durable (for the overlay: data
//! first, then the map), so every write completed before the request was
//! received is durable when its waiter runs.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use tracing::debug;

use super::request::catch_panic;
use crate::device::BlockDevice;

/// Called with the result of the device flush that covers the request.
pub type FlushWaiter = Box<dyn FnOnce(&io::Result<()>) + Send>;

/// Name of the flush thread.
const THREAD_NAME: &str = "ociblk-flush";

/// A flush thread for one device; stops (after answering every waiter)
/// when dropped.
pub struct Flusher {
    handle: FlushHandle,
    thread: Option<JoinHandle<()>>,
}

/// Submits flushes to a [`Flusher`]; cheap to clone. Dropping a handle
/// never waits for the thread.
#[derive(Clone)]
pub struct FlushHandle {
    shared: Arc<Shared>,
}

struct Shared {
    device: Arc<dyn BlockDevice>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Waiters for the next device flush.
    waiting: Vec<FlushWaiter>,
    /// Device flushes run so far.
    rounds: u64,
    stop: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Waiters run outside the lock, so a poisoned lock only means a
        // waiter list was being swapped: the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for FlushHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushHandle").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("rounds", &self.rounds())
            .finish_non_exhaustive()
    }
}

impl Flusher {
    /// Starts the flush thread of `device`.
    pub fn new(device: Arc<dyn BlockDevice>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            device,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(THREAD_NAME.to_owned())
                .spawn(move || run(&shared))?
        };
        Ok(Flusher {
            handle: FlushHandle { shared },
            thread: Some(thread),
        })
    }

    /// A handle for submitting flushes.
    pub fn handle(&self) -> FlushHandle {
        self.handle.clone()
    }

    /// Queues `waiter` for the next device flush to start.
    pub fn submit(&self, waiter: FlushWaiter) {
        self.handle.submit(waiter);
    }

    /// Device flushes run so far.
    pub fn rounds(&self) -> u64 {
        self.handle.shared.state().rounds
    }
}

impl FlushHandle {
    /// Queues `waiter` for the next device flush to start. Once the
    /// flusher has stopped, the flush runs on the calling thread.
    pub fn submit(&self, waiter: FlushWaiter) {
        let mut state = self.shared.state();
        if state.stop {
            drop(state);
            waiter(&flush(&self.shared));
            return;
        }
        state.waiting.push(waiter);
        drop(state);
        self.shared.wake.notify_one();
    }
}

/// Flushes the device; a panic in it is the flush's error, so its waiters
/// get IOERR and the flush thread keeps running.
fn flush(shared: &Shared) -> io::Result<()> {
    catch_panic(|| shared.device.flush()).unwrap_or_else(|message| {
        Err(io::Error::other(format!(
            "the device flush panicked: {message}"
        )))
    })
}

fn run(shared: &Shared) {
    loop {
        let batch = {
            let mut state = shared.state();
            while state.waiting.is_empty() && !state.stop {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.waiting.is_empty() {
                return;
            }
            std::mem::take(&mut state.waiting)
        };
        // Everything in `batch` was submitted before this flush starts.
        let result = flush(shared);
        shared.state().rounds += 1;
        debug!(merged = batch.len(), ok = result.is_ok(), "device flush");
        for waiter in batch {
            waiter(&result);
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let shared = &self.handle.shared;
        shared.state().stop = true;
        shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // A panicking waiter already printed its message.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::test_disk::GatedDisk;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[test]
    fn flushes_arriving_during_a_flush_are_merged() {
        let disk = Arc::new(GatedDisk::new(1 << 20));
        disk.close_flushes();
        let flusher = Flusher::new(disk.clone()).unwrap();
        let (done, results) = mpsc::channel();
        let waiter = |name: &'static str| -> FlushWaiter {
            let done = done.clone();
            Box::new(move |r: &io::Result<()>| done.send((name, r.is_ok())).unwrap())
        };
        flusher.submit(waiter("first"));
        disk.wait_for_flush_started(1);
        // These arrive while the first flush runs: it may have missed
        // their writes, so they wait for one more flush, together.
        flusher.submit(waiter("second"));
        flusher.submit(waiter("third"));
        disk.open_flushes();
        let mut got: Vec<_> = (0..3)
            .map(|_| results.recv_timeout(DEADLINE).unwrap())
            .collect();
        assert_eq!(got[0], ("first", true));
        got.sort();
        assert_eq!(got[1..], [("second", true), ("third", true)]);
        assert_eq!(flusher.rounds(), 2);
        assert_eq!(disk.flushes(), 2);
    }

    #[test]
    fn a_failed_flush_fails_its_waiters_and_drop_answers_everyone() {
        let disk = Arc::new(GatedDisk::new(1 << 20));
        disk.inner().fail_next(1);
        let flusher = Flusher::new(disk.clone()).unwrap();
        let (done, results) = mpsc::channel();
        let d = done.clone();
        flusher.submit(Box::new(move |r| d.send(r.is_ok()).unwrap()));
        assert!(!results.recv_timeout(DEADLINE).unwrap());
        flusher.submit(Box::new(move |r| done.send(r.is_ok()).unwrap()));
        drop(flusher);
        assert!(results.recv_timeout(DEADLINE).unwrap());
    }
}
