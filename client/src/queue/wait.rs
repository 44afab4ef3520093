// SPDX-License-Identifier: Apache-2.0

//! Waiting for one request: bounded waits by token that tell a lost call notification
//! and a vanished backend from a slow device, and the blocking requests built on them.

use std::time::{Duration, Instant};

use super::BlkQueue;
use crate::ClientError;
use crate::request::{Completion, RawCompletion, Request, Token};

/// How long a completion found without a call is given for the call to arrive before
/// it counts as a missed notification.
const NOTIFICATION_GRACE: Duration = Duration::from_millis(200);

impl BlkQueue {
    fn is_in_flight(&self, token: Token) -> bool {
        self.in_flight.iter().flatten().any(|f| f.token == token)
    }

    fn take_typed(&mut self, token: Token) -> Option<Completion> {
        let pos = self.done.iter().position(|c| c.token == token)?;
        self.done.remove(pos)
    }

    /// Waits until `take` yields the completion of `token`, at most until `deadline`.
    fn wait_for<T>(
        &mut self,
        token: Token,
        deadline: Instant,
        mut take: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, ClientError> {
        let start = Instant::now();
        let timeout = |queue: &Self| ClientError::Timeout {
            queue: queue.index,
            token,
            waited: start.elapsed(),
        };
        loop {
            self.reap()?;
            if let Some(found) = take(self) {
                return Ok(found);
            }
            if !self.is_in_flight(token) {
                return Err(ClientError::UnknownToken {
                    queue: self.index,
                    token,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timeout(self));
            }
            match self.wait_call(deadline - now) {
                Ok(true) => continue,
                Ok(false) => {
                    // No call before the deadline. If the request is done anyway, the
                    // device published it without signalling (give a late call a moment).
                    self.reap()?;
                    return match take(self) {
                        Some(found) => match self.wait_call(NOTIFICATION_GRACE) {
                            Ok(true) => Ok(found),
                            _ => Err(ClientError::MissedNotification {
                                queue: self.index,
                                token,
                            }),
                        },
                        None => Err(timeout(self)),
                    };
                }
                Err(ClientError::Disconnected { .. }) => {
                    // The device may have finished the request before going away.
                    self.reap()?;
                    return take(self).ok_or(ClientError::Disconnected { queue: self.index });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits (at most until `deadline`) for typed request `token` and returns its
    /// completion. Completions of other requests reaped meanwhile stay queued for
    /// [`poll_completions`](Self::poll_completions).
    pub fn wait_completion(
        &mut self,
        token: Token,
        deadline: Instant,
    ) -> Result<Completion, ClientError> {
        if let Some(found) = self.take_typed(token) {
            return Ok(found);
        }
        self.wait_for(token, deadline, |q| q.take_typed(token))
    }

    /// Waits (at most until `deadline`) for raw request `token`.
    pub fn wait(&mut self, token: Token, deadline: Instant) -> Result<RawCompletion, ClientError> {
        if let Some(found) = self.raw_done.remove(&token) {
            return Ok(found);
        }
        self.wait_for(token, deadline, |q| q.raw_done.remove(&token))
    }

    /// Submits `request`, notifies the device and waits for it (bounded by the
    /// client's timeout).
    pub fn execute(&mut self, request: Request<'_>) -> Result<Completion, ClientError> {
        let token = self.submit(request)?;
        self.kick()?;
        self.wait_completion(token, Instant::now() + self.settings.timeout)
    }

    /// Reads `len` bytes at byte `offset`; the data is in [`Completion::data`].
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Completion, ClientError> {
        self.execute(Request::Read { offset, len })
    }

    /// Writes `data` at byte `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Completion, ClientError> {
        self.execute(Request::Write { offset, data })
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<Completion, ClientError> {
        self.execute(Request::Flush)
    }

    /// Discards `len` bytes at byte `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<Completion, ClientError> {
        self.execute(Request::Discard { offset, len })
    }

    /// Zeroes `len` bytes at byte `offset`, allowing unmapping if `unmap`.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<Completion, ClientError> {
        self.execute(Request::WriteZeroes { offset, len, unmap })
    }

    /// Fetches the 20-byte device ID; the ID is in [`Completion::data`].
    pub fn get_id(&mut self) -> Result<Completion, ClientError> {
        self.execute(Request::GetId)
    }
}
