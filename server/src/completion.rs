//! In-order publication of a virtqueue's completions.
//!
//! # Invariant: used entries are published in the order requests were made available
//!
//! A queue's requests run concurrently (on the I/O pool, and FLUSH on the
//! flush thread) and finish in any order, but their used-ring entries are
//! published strictly in the order the requests were popped from the
//! available ring. So at every moment the used index counts exactly a
//! prefix of the available ring: every request before it is complete,
//! none after it is published.
//!
//! This is what keeps a backend restart exact. vhost-user-backend has no
//! inflight tracking, and QEMU, reconnecting to a restarted server, sets
//! the next available index to the guest's used index and the new server
//! replays every request from there. With in-order publication, that is
//! exactly the set of requests not yet completed: none is lost (the guest
//! would wait forever) and none is completed twice (Linux would mark the
//! ring broken). Requests replayed after having run before are reads and
//! writes of the same data, which are idempotent.
//!
//! The cost: a slow request holds back the completions behind it on its
//! queue (a FLUSH waits for its device flush); other queues keep going.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// A used-ring entry: descriptor chain head and bytes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// A request's place in its queue's publication order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// The requests of one queue popped and not yet published.
#[derive(Debug, Default)]
pub struct Completions {
    window: Mutex<Window>,
    idle: Condvar,
}

/// Popped requests in available-ring order; `slots[0]` has ticket `first`.
#[derive(Debug, Default)]
pub struct Window {
    first: u64,
    slots: VecDeque<Option<Used>>,
}

impl Window {
    /// Takes the next place in the order, for a request just popped from
    /// the available ring. Must be called while the ring is locked, in
    /// the order requests are popped.
    pub fn admit(&mut self) -> Ticket {
        self.slots.push_back(None);
        Ticket(self.first + self.slots.len() as u64 - 1)
    }

    /// Requests popped and not yet published.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }
}

impl Completions {
    /// Locks the window. Lock order: the window before the vring, both
    /// for popping (admit under the vring lock) and for publishing.
    pub fn lock(&self) -> MutexGuard<'_, Window> {
        // Nothing panics while the window is inconsistent.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the request of `ticket` finished with `used`, then
    /// publishes, in order, every finished request that no unfinished one
    /// precedes: `publish` gets them oldest first, called with the window
    /// locked, so publications never interleave.
    pub fn complete(&self, ticket: Ticket, used: Used, publish: impl FnOnce(&[Used])) {
        let mut window = self.lock();
        let Some(slot) = ticket
            .0
            .checked_sub(window.first)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| window.slots.get_mut(at))
        else {
            // A ticket is completed once; anything else is a bug upstream.
            tracing::error!(ticket = ticket.0, "completion for an unknown request");
            return;
        };
        *slot = Some(used);
        let mut ready = Vec::new();
        while let Some(Some(used)) = window.slots.front() {
            ready.push(*used);
            window.slots.pop_front();
            window.first += 1;
        }
        if !ready.is_empty() {
            publish(&ready);
            self.idle.notify_all();
        }
    }

    /// Waits until every admitted request has been published.
    pub fn wait_idle(&self) {
        self.wait_below(1);
    }

    /// Waits until fewer than `limit` admitted requests are unpublished.
    pub fn wait_below(&self, limit: usize) {
        let mut window = self.lock();
        while window.slots.len() >= limit {
            window = self
                .idle
                .wait(window)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(head: u16) -> Used {
        Used { head, len: 1 }
    }

    #[test]
    fn nothing_is_published_before_the_first_request_finishes() {
        let c = Completions::default();
        let (first, second) = {
            let mut w = c.lock();
            (w.admit(), w.admit())
        };
        c.complete(second, used(1), |_| panic!("published out of order"));
        assert_eq!(c.lock().in_flight(), 2);
        let mut published = Vec::new();
        c.complete(first, used(0), |ready| published.extend_from_slice(ready));
        assert_eq!(published, [used(0), used(1)]);
        c.wait_idle();
    }

    #[test]
    fn published_in_admission_order() {
        let c = Completions::default();
        let tickets: Vec<_> = {
            let mut w = c.lock();
            (0..4).map(|_| w.admit()).collect()
        };
        let mut published = Vec::new();
        let mut finish = |ticket, head| {
            c.complete(ticket, used(head), |ready| {
                published.extend(ready.iter().map(|u| u.head));
            });
        };
        finish(tickets[2], 2);
        finish(tickets[1], 1);
        finish(tickets[0], 0);
        finish(tickets[3], 3);
        // Tickets keep counting; an unknown one is ignored.
        let next = c.lock().admit();
        assert_eq!(next, Ticket(4));
        finish(tickets[0], 9);
        assert_eq!(published, [0, 1, 2, 3]);
        assert_eq!(c.lock().in_flight(), 1);
    }
}
