//! A bound on the requests in flight to one registry host, shared by every
//! image and thread of the process.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Instant;

/// A counting semaphore.
#[derive(Debug)]
pub struct Limiter {
    max: usize,
    in_flight: Mutex<usize>,
    freed: Condvar,
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
                    in_flight: Mutex::new(0),
                    freed: Condvar::new(),
                })
            })
            .clone()
    }

    /// Waits for a free slot until `deadline`; `None` when none came free.
    pub fn acquire(self: &Arc<Self>, deadline: Instant) -> Option<Permit> {
        let mut n = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *n >= self.max {
            let left = deadline.checked_duration_since(Instant::now())?;
            n = self
                .freed
                .wait_timeout(n, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *n += 1;
        Some(Permit {
            limiter: self.clone(),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut n = self
            .limiter
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *n -= 1;
        self.limiter.freed.notify_one();
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
}
