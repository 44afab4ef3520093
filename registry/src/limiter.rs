//! A bound on the requests in flight to one registry host, shared by every
//! image and thread of the process.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

/// Who a request is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    /// A read someone waits for (a guest's, `pull`'s).
    #[default]
    Foreground,
    /// Prefetching: takes a slot only while no foreground request waits
    /// for one.
    Background,
}

/// A counting semaphore that serves foreground requests first.
#[derive(Debug)]
pub struct Limiter {
    max: usize,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// Foreground requests waiting for a slot: background ones wait while
    /// there are any.
    foreground_waiting: usize,
}

/// One request slot; released on drop.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Limiter {
    /// The limiter of `host`; the first caller sets its bound.
    pub fn for_host(host: &str, max: usize) -> Arc<Limiter> {
        static HOSTS: OnceLock<Mutex<HashMap<String, Arc<Limiter>>>> = OnceLock::new();
        let mut hosts = HOSTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        hosts
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(Limiter {
                    max: max.max(1),
                    state: Mutex::new(State::default()),
                    freed: Condvar::new(),
                })
            })
            .clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a free slot until `deadline`; `None` when none came free.
    pub fn acquire(self: &Arc<Self>, deadline: Instant) -> Option<Permit> {
        self.acquire_as(deadline, Priority::Foreground)
    }

    /// [`Limiter::acquire`] for a request of `priority`: a background
    /// request gets a slot only when no foreground one is waiting.
    pub fn acquire_as(self: &Arc<Self>, deadline: Instant, priority: Priority) -> Option<Permit> {
        let mut s = self.state();
        let foreground = priority == Priority::Foreground;
        let blocked =
            |s: &State| s.in_flight >= self.max || (!foreground && s.foreground_waiting > 0);
        let mut waiting = false;
        while blocked(&s) {
            if foreground && !waiting {
                s.foreground_waiting += 1;
                waiting = true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                if waiting {
                    s.foreground_waiting -= 1;
                    drop(s);
                    // A background waiter may go now.
                    self.freed.notify_all();
                }
                return None;
            };
            s = self
                .freed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if waiting {
            s.foreground_waiting -= 1;
        }
        s.in_flight += 1;
        Some(Permit {
            limiter: self.clone(),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.state().in_flight -= 1;
        // Every waiter checks whether it may go: foreground ones first.
        self.limiter.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bounds_and_releases() {
        let l = Limiter::for_host("limiter-test.example", 2);
        let soon = || Instant::now() + Duration::from_millis(20);
        let a = l.acquire(soon()).expect("first");
        let _b = l.acquire(soon()).expect("second");
        assert!(l.acquire(soon()).is_none(), "third slot must wait");
        drop(a);
        assert!(l.acquire(soon()).is_some());
    }

    #[test]
    fn background_requests_wait_while_foreground_ones_do() {
        let l = Limiter::for_host("limiter-priority-test.example", 2);
        let soon = || Instant::now() + Duration::from_millis(20);
        let _held = l.acquire(soon()).expect("first");
        let bg = l
            .acquire_as(soon(), Priority::Background)
            .expect("a free slot");
        drop(bg);
        // The moment between a release and the waiting foreground request
        // taking the slot: the background request must not take it.
        l.state().foreground_waiting = 1;
        assert!(l.acquire_as(soon(), Priority::Background).is_none());
        let fg = l.acquire(soon()).expect("foreground goes first");
        l.state().foreground_waiting = 0;
        drop(fg);
        assert!(l.acquire_as(soon(), Priority::Background).is_some());
    }
}
