//! A small persistent pool of I/O threads per device, shared by its queues.
//!
//! A queue worker hands a batch of requests to [`IoPool::run_batch`]: the
//! batch is queued, idle helpers are woken for all but one request, and
//! the worker runs requests itself until the queue is empty. A lone
//! request therefore runs on the worker that popped it, without waking
//! another thread (at queue depth 1 that wake-up would be most of the
//! latency), while a deep queue's requests run on up to `helpers + 1`
//! threads at once. Requests finish in any order; see
//! [`super::completion`] for how they are still published in order.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

/// One request to run.
pub type Job = Box<dyn FnOnce() + Send>;

const THREAD_NAME: &str = "ociblk-io";

/// The pool; its helpers finish the queued jobs and exit when it is dropped.
pub struct IoPool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Helpers waiting for work.
    idle: usize,
    stop: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock: a poisoned lock still holds a valid queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_job(&self) -> Option<Job> {
        self.state().jobs.pop_front()
    }
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("helpers", &self.helpers.len())
            .finish_non_exhaustive()
    }
}

impl IoPool {
    /// A pool with `helpers` threads besides the callers of `run_batch`.
    /// With none, every job runs on the thread that submits it.
    pub fn new(helpers: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let mut pool = IoPool {
            shared,
            helpers: Vec::with_capacity(helpers),
        };
        for _ in 0..helpers {
            let shared = Arc::clone(&pool.shared);
            // On error, dropping `pool` stops the helpers already started.
            let helper = thread::Builder::new()
                .name(THREAD_NAME.to_owned())
                .spawn(move || help(&shared))?;
            pool.helpers.push(helper);
        }
        Ok(pool)
    }

    /// Runs `jobs`: queues them, wakes idle helpers for all but one, and
    /// runs queued jobs on the calling thread until none is left. Jobs of
    /// the batch may still be running on helpers when this returns.
    pub fn run_batch(&self, jobs: Vec<Job>) {
        let wake = {
            let mut state = self.shared.state();
            let extra = jobs.len().saturating_sub(1);
            state.jobs.extend(jobs);
            extra.min(state.idle)
        };
        for _ in 0..wake {
            self.shared.wake.notify_one();
        }
        while let Some(job) = self.shared.next_job() {
            job();
        }
    }
}

fn help(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.state();
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.stop {
                    return;
                }
                state.idle += 1;
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                state.idle -= 1;
            }
        };
        job();
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.state().stop = true;
        self.shared.wake.notify_all();
        for helper in self.helpers.drain(..) {
            // A panicking job already printed its message.
            let _ = helper.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn jobs_of_a_batch_run_at_the_same_time() {
        let pool = IoPool::new(2).unwrap();
        // Three jobs that can only finish together: the batch needs the
        // caller and both helpers at once.
        let barrier = Arc::new(Barrier::new(3));
        let ran = Arc::new(AtomicUsize::new(0));
        let jobs = (0..3)
            .map(|_| {
                let (barrier, ran) = (barrier.clone(), ran.clone());
                Box::new(move || {
                    barrier.wait();
                    ran.fetch_add(1, Ordering::SeqCst);
                }) as Job
            })
            .collect();
        pool.run_batch(jobs);
        drop(pool);
        assert_eq!(ran.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn without_helpers_the_caller_runs_everything() {
        let pool = IoPool::new(0).unwrap();
        let caller = thread::current().id();
        let ran = Arc::new(AtomicUsize::new(0));
        let jobs = (0..4)
            .map(|_| {
                let ran = ran.clone();
                Box::new(move || {
                    assert_eq!(thread::current().id(), caller);
                    ran.fetch_add(1, Ordering::SeqCst);
                }) as Job
            })
            .collect();
        pool.run_batch(jobs);
        assert_eq!(ran.load(Ordering::SeqCst), 4);
    }
}
