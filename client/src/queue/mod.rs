// SPDX-License-Identifier: Apache-2.0

//! Driver side of one split virtqueue. One concept a file:
//! - here, the queue itself: its state, settings, counters and guest memory access;
//! - `layout.rs`, where its ring lies in guest memory;
//! - `chain.rs`, descriptor chains: planned, written, published and given back;
//! - `submit.rs`, typed and raw requests turned into chains;
//! - `notify.rs`, kicks (with `VIRTIO_RING_F_EVENT_IDX`) and the call eventfd;
//! - `complete.rs`, reaping the used ring;
//! - `wait.rs`, bounded waits for one request and the blocking requests.

mod chain;
mod complete;
mod layout;
mod notify;
mod submit;
mod wait;

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::ClientError;
use crate::memory::{BufferPool, GUEST_MEMORY_BASE, SharedRam};
use crate::request::{Completion, GuestBuffer, RawCompletion, Token};
use crate::ring::SplitRing;
use chain::{ChainLists, InFlight};
pub(crate) use layout::RingLayout;

/// Per-queue settings derived from the client options and negotiated features.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueSettings {
    pub(crate) size: u16,
    pub(crate) event_idx: bool,
    pub(crate) kick_suppression: bool,
    pub(crate) indirect: bool,
    pub(crate) poison: bool,
    pub(crate) timeout: Duration,
    /// Longest data descriptor, when SIZE_MAX was negotiated.
    pub(crate) size_max: Option<u32>,
}

/// Counters of one queue's activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests made available to the device.
    pub submitted: u64,
    /// Used-ring entries reaped.
    pub completed: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Call eventfd wake-ups consumed.
    pub calls: u64,
}

/// One virtqueue of a [`VhostBlkClient`](super::VhostBlkClient).
///
/// Requests are submitted with [`submit`](Self::submit) or [`submit_raw`](Self::submit_raw),
/// which return a [`Token`]; any number may be in flight (bounded by free descriptors
/// and buffer memory). Completions are reaped in whatever order the device uses them:
/// [`poll_completions`](Self::poll_completions) hands out finished typed requests,
/// [`wait_completion`](Self::wait_completion) and [`wait`](Self::wait) block (bounded)
/// for one token, and [`wait_call`](Self::wait_call) blocks on the call eventfd.
///
/// A queue is `Send`: a benchmark can drive each queue of one client from its own thread
/// (see [`VhostBlkClient::queues_mut`](super::VhostBlkClient::queues_mut)).
#[derive(Debug)]
pub struct BlkQueue {
    index: u16,
    settings: QueueSettings,
    ram: SharedRam,
    ring: RingLayout,
    /// The ring's fields within `ring`.
    split: SplitRing,
    kick: EventFd,
    call: EventFd,
    sock: Arc<UnixStream>,
    free_descs: Vec<u16>,
    next_avail: u16,
    notified_at: u16,
    last_used: u16,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    done: VecDeque<Completion>,
    raw_done: HashMap<Token, RawCompletion>,
    spare_lists: Vec<ChainLists>,
    pool: BufferPool,
    next_token: u64,
    auto_kick: bool,
    stats: QueueStats,
}

impl BlkQueue {
    /// Creates queue `index` with its ring at `ring` and buffers from `pool`.
    pub(crate) fn new(
        index: u16,
        settings: QueueSettings,
        ram: SharedRam,
        ring: RingLayout,
        pool: BufferPool,
        sock: Arc<UnixStream>,
    ) -> Result<Self, ClientError> {
        let eventfd = |what| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| ClientError::EventFd {
                queue: index,
                what,
                source,
            })
        };
        let size = settings.size;
        let mut queue = Self {
            index,
            settings,
            ram,
            ring,
            split: ring.split_ring(size),
            kick: eventfd("kick")?,
            call: eventfd("call")?,
            sock,
            free_descs: (0..size).rev().collect(),
            next_avail: 0,
            notified_at: 0,
            last_used: 0,
            in_flight: (0..size).map(|_| None).collect(),
            in_flight_count: 0,
            done: VecDeque::new(),
            raw_done: HashMap::new(),
            spare_lists: Vec::new(),
            pool,
            next_token: 0,
            auto_kick: true,
            stats: QueueStats::default(),
        };
        queue.reset_ring()?;
        Ok(queue)
    }

    /// Zeroes the ring memory (flags, indices, event fields).
    fn reset_ring(&mut self) -> Result<(), ClientError> {
        self.split
            .reset(self.ram.mem())
            .map_err(|e| self.gmem_err(self.ring.desc, e))
    }

    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue's size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.settings.size
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Descriptors currently free in the descriptor table.
    pub fn free_descriptors(&self) -> usize {
        self.free_descs.len()
    }

    /// Ring descriptors one typed request takes at most: 1 with indirect tables, else
    /// 3 (header, data, status; flush and empty transfers take 2).
    pub fn descriptors_per_request(&self) -> usize {
        if self.settings.indirect { 1 } else { 3 }
    }

    /// Activity counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The eventfd the device signals (for callers with their own poll loop).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The eventfd the client writes to notify the device.
    pub(crate) fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Guest addresses of the descriptor table, avail ring and used ring.
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        self.split.addresses()
    }

    /// With `on` (the default) every submission notifies the device; with `off`
    /// submissions only publish, and [`kick`](Self::kick) notifies once for a batch.
    pub fn set_auto_kick(&mut self, on: bool) {
        self.auto_kick = on;
    }

    fn gmem_err(&self, addr: u64, source: vm_memory::GuestMemoryError) -> ClientError {
        ClientError::GuestMemory {
            queue: self.index,
            addr,
            source,
        }
    }

    fn write_mem(&self, addr: u64, bytes: &[u8]) -> Result<(), ClientError> {
        self.ram
            .mem()
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| self.gmem_err(addr, e))
    }

    fn read_mem(&self, addr: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let mut buf = vec![0u8; len as usize];
        self.ram
            .mem()
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|e| self.gmem_err(addr, e))?;
        Ok(buf)
    }

    fn read_obj<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T, ClientError> {
        self.ram
            .mem()
            .read_obj(GuestAddress(addr))
            .map_err(|e| self.gmem_err(addr, e))
    }

    fn fill(&self, addr: u64, len: u32, byte: u8) -> Result<(), ClientError> {
        self.write_mem(addr, &vec![byte; len as usize])
    }

    /// Reserves `count` buffers of `len` bytes each in this queue's guest memory, for
    /// [`Request::ReadInto`](crate::Request::ReadInto); they stay reserved while the
    /// queue lives. Fails with [`ClientError::OutOfBufferMemory`] (reserving nothing)
    /// when they do not fit beside the room requests need for headers and status bytes.
    pub fn reserve_buffers(
        &mut self,
        count: usize,
        len: u32,
    ) -> Result<Vec<GuestBuffer>, ClientError> {
        if len == 0 {
            return Err(ClientError::InvalidRequest("a buffer of 0 bytes".into()));
        }
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            match self.pool.alloc(u64::from(len)) {
                Some(block) => blocks.push(block),
                None => {
                    for block in blocks {
                        self.pool.free(block);
                    }
                    return Err(ClientError::OutOfBufferMemory {
                        queue: self.index,
                        requested: u64::from(len) * count as u64,
                    });
                }
            }
        }
        Ok(blocks
            .into_iter()
            .map(|block| GuestBuffer {
                addr: block.addr,
                len,
            })
            .collect())
    }

    /// What guest memory holds in `buffer` now (e.g. the data of a finished
    /// [`Request::ReadInto`](crate::Request::ReadInto)).
    pub fn buffer_contents(&self, buffer: &GuestBuffer) -> Result<Vec<u8>, ClientError> {
        self.read_mem(buffer.addr, buffer.len)
    }

    /// Whether guest memory holds `[addr, addr + len)`.
    fn in_guest_memory(&self, addr: u64, len: u32) -> bool {
        addr >= GUEST_MEMORY_BASE
            && addr
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= GUEST_MEMORY_BASE + self.ram.size())
    }
}

#[cfg(test)]
mod tests;
