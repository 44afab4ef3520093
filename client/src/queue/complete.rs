// SPDX-License-Identifier: Apache-2.0

//! Reaping the used ring: each used entry finishes the request its id heads, whose
//! writable buffers are read back; an id or index the device should not have written
//! is an error, never a panic.

use std::sync::atomic::{Ordering, fence};

use super::BlkQueue;
use super::chain::{InFlight, Kind};
use crate::ClientError;
use crate::request::{BlkStatus, Completion, POISON_BYTE, RawCompletion};

/// A finished request on its way to the caller.
enum Finished {
    Typed(Completion),
    Raw(RawCompletion),
}

impl BlkQueue {
    /// Takes the used entry at `last_used` and finishes its request.
    fn complete_one(&mut self) -> Result<(), ClientError> {
        let (id, used_len) = self
            .split
            .used_elem(self.ram.mem(), self.last_used)
            .map_err(|e| self.gmem_err(self.split.used_elem_addr(self.last_used), e))?;
        self.last_used = self.last_used.wrapping_add(1);
        self.stats.completed += 1;
        let flight = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or(ClientError::BadUsedId {
                queue: self.index,
                id,
            })?;
        self.in_flight_count -= 1;
        let outcome = self.collect(&flight, used_len);
        self.recycle(flight.lists);
        match outcome? {
            Finished::Typed(c) => self.done.push_back(c),
            Finished::Raw(c) => {
                self.raw_done.insert(c.token, c);
            }
        }
        Ok(())
    }

    fn collect(&self, flight: &InFlight, used_len: u32) -> Result<Finished, ClientError> {
        match flight.kind {
            Kind::Typed { has_data } => {
                let status = match flight.lists.writable.last() {
                    Some(&(addr, len)) if len > 0 => {
                        self.read_obj::<u8>(addr + u64::from(len) - 1)?
                    }
                    _ => POISON_BYTE,
                };
                // Every writable buffer but the status byte's, in order.
                let mut data = Vec::new();
                if has_data && let Some((_, buffers)) = flight.lists.writable.split_last() {
                    for &(addr, len) in buffers {
                        data.extend(self.read_mem(addr, len)?);
                    }
                }
                Ok(Finished::Typed(Completion {
                    token: flight.token,
                    status: BlkStatus::from(status),
                    used_len,
                    data,
                }))
            }
            Kind::Raw => {
                let mut buffers = Vec::with_capacity(flight.lists.writable.len());
                for &(addr, len) in &flight.lists.writable {
                    buffers.push(if self.in_guest_memory(addr, len) {
                        self.read_mem(addr, len)?
                    } else {
                        Vec::new()
                    });
                }
                Ok(Finished::Raw(RawCompletion {
                    token: flight.token,
                    used_len,
                    writable: buffers,
                }))
            }
        }
    }

    /// The used ring's index (acquire: the entries it covers are visible).
    fn used_idx(&self) -> Result<u16, ClientError> {
        self.split
            .used_idx(self.ram.mem())
            .map_err(|e| self.gmem_err(self.split.used_idx_addr(), e))
    }

    /// Reaps every used entry the device has published; with `EVENT_IDX`, also asks
    /// for a call on the next completion. Returns how many entries were reaped.
    pub(super) fn reap(&mut self) -> Result<usize, ClientError> {
        let mut reaped = 0;
        loop {
            let used_idx = self.used_idx()?;
            let pending = used_idx.wrapping_sub(self.last_used);
            if usize::from(pending) > self.in_flight_count {
                return Err(ClientError::BadUsedIndex {
                    queue: self.index,
                    last_used: self.last_used,
                    used_idx,
                    in_flight: self.in_flight_count,
                });
            }
            if pending == 0 {
                if !self.settings.event_idx {
                    return Ok(reaped);
                }
                self.split
                    .set_used_event(self.ram.mem(), self.last_used)
                    .map_err(|e| self.gmem_err(self.split.used_event_addr(), e))?;
                // used_event must be visible before re-reading the used index, or a
                // completion racing with it would be neither seen nor signalled.
                fence(Ordering::SeqCst);
                let again = self.used_idx()?;
                if again == self.last_used {
                    return Ok(reaped);
                }
                continue;
            }
            for _ in 0..pending {
                self.complete_one()?;
                reaped += 1;
            }
        }
    }

    /// Reaps the used ring without blocking and moves finished typed requests to `out`
    /// (in completion order). Raw requests stay queued for [`wait`](Self::wait).
    /// Returns how many completions were appended.
    pub fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<usize, ClientError> {
        self.reap()?;
        let n = self.done.len();
        out.extend(self.done.drain(..));
        Ok(n)
    }
}
