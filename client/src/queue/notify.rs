// SPDX-License-Identifier: Apache-2.0

//! Notifications both ways: kicking the device (skipping the kicks it suppressed) and
//! sleeping on its call eventfd, bounded, while watching for the backend to go away.

use std::os::fd::AsRawFd;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;

use super::BlkQueue;
use crate::ClientError;

/// `vring_need_event()`: whether moving an index from `old` to `new` crosses `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl BlkQueue {
    /// Notifies the device of requests published since the last notification, unless it
    /// suppressed notifications (only honoured with `kick_suppression`; otherwise every
    /// call with new requests writes the kick eventfd).
    pub fn kick(&mut self) -> Result<(), ClientError> {
        if self.next_avail == self.notified_at {
            return Ok(());
        }
        // The new avail index must be visible before reading the device's suppression
        // state, or both sides could decide not to act.
        fence(Ordering::SeqCst);
        let needed = if !self.settings.kick_suppression {
            true
        } else if self.settings.event_idx {
            let event = self
                .split
                .avail_event(self.ram.mem())
                .map_err(|e| self.gmem_err(self.split.avail_event_addr(), e))?;
            need_event(event, self.next_avail, self.notified_at)
        } else {
            let flags = self
                .split
                .used_flags(self.ram.mem())
                .map_err(|e| self.gmem_err(self.split.used_flags_addr(), e))?;
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        self.notified_at = self.next_avail;
        if needed {
            self.kick.write(1).map_err(|source| ClientError::EventFd {
                queue: self.index,
                what: "kick",
                source,
            })?;
            self.stats.kicks += 1;
        }
        Ok(())
    }

    /// Consumes a pending call signal without blocking; true if there was one.
    fn drain_call(&mut self) -> Result<bool, ClientError> {
        match self.call.read() {
            Ok(_) => {
                self.stats.calls += 1;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(source) => Err(ClientError::EventFd {
                queue: self.index,
                what: "call",
                source,
            }),
        }
    }

    /// Blocks until the device signals the call eventfd (`Ok(true)`) or `timeout`
    /// passes (`Ok(false)`). Fails with [`ClientError::Disconnected`] when the backend
    /// closes the connection. Call [`poll_completions`](Self::poll_completions) before
    /// sleeping so that `EVENT_IDX` asks for the next call.
    pub fn wait_call(&mut self, timeout: Duration) -> Result<bool, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let remaining = deadline.saturating_duration_since(Instant::now());
            let millis = remaining
                .as_micros()
                .div_ceil(1000)
                .min(libc::c_int::MAX as u128) as libc::c_int;
            // SAFETY: `fds` is a valid array of two pollfd structs for the whole call, and
            // its length is passed alongside; both descriptors are owned by `self`.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ClientError::Poll {
                    queue: self.index,
                    source: err,
                });
            }
            if fds[0].revents & libc::POLLIN != 0 && self.drain_call()? {
                return Ok(true);
            }
            if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL)
                != 0
            {
                return Err(ClientError::Disconnected { queue: self.index });
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_virtio_semantics() {
        // Device asked to be kicked when index 5 is published.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 4));
        assert!(!need_event(5, 5, 4));
        assert!(!need_event(5, 9, 6));
        // Wrap-around.
        assert!(need_event(u16::MAX, 0, u16::MAX));
    }
}
