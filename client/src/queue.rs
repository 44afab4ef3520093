// SPDX-License-Identifier: Apache-2.0

//! Driver side of one split virtqueue: ring layout, descriptor management, submission,
//! notification (with `VIRTIO_RING_F_EVENT_IDX`) and completion reaping.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::ClientError;
use super::config::SECTOR_SIZE;
use super::memory::{Block, BufferPool, GUEST_MEMORY_BASE, PAGE_SIZE, SharedRam, align_up};
use super::request::{
    BLK_ID_SIZE, BlkStatus, Completion, GuestBuffer, POISON_BYTE, RawCompletion, RawData, RawDesc,
    Request, Token, blk_header, blk_segment,
};
use super::ring::{DESC_SIZE, SplitRing};

/// How long a completion found without a call is given for the call to arrive before
/// it counts as a missed notification.
const NOTIFICATION_GRACE: Duration = Duration::from_millis(200);

/// Guest-memory footprint of a split ring of `size` entries, each part page aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingLayout {
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) end: u64,
}

impl RingLayout {
    /// Lays out a ring of `size` entries starting at guest address `start`.
    pub(crate) fn new(start: u64, size: u16) -> Self {
        let desc = align_up(start, PAGE_SIZE);
        let avail = align_up(desc + SplitRing::desc_table_bytes(size), PAGE_SIZE);
        let used = align_up(avail + SplitRing::avail_ring_bytes(size), PAGE_SIZE);
        let end = align_up(used + SplitRing::used_ring_bytes(size), PAGE_SIZE);
        Self {
            desc,
            avail,
            used,
            end,
        }
    }

    /// The ring of `size` entries this layout places.
    pub(crate) fn split_ring(&self, size: u16) -> SplitRing {
        SplitRing::new(self.desc, self.avail, self.used, size)
    }
}

/// `vring_need_event()`: whether moving an index from `old` to `new` crosses `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

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

/// Where a planned descriptor's buffer comes from, before allocation.
enum Source<'a> {
    Bytes(&'a [u8]),
    Space { len: u32, fill: Option<u8> },
    Addr { addr: u64, len: u32 },
    Indirect(Vec<Segment<'a>>),
}

struct Segment<'a> {
    source: Source<'a>,
    writable: bool,
}

impl<'a> Segment<'a> {
    fn from_raw(desc: &'a RawDesc) -> Self {
        let source = match &desc.data {
            RawData::Bytes(bytes) => Source::Bytes(bytes),
            RawData::Space(len) => Source::Space {
                len: *len,
                fill: Some(POISON_BYTE),
            },
            RawData::Addr { addr, len } => Source::Addr {
                addr: *addr,
                len: *len,
            },
            RawData::Indirect(descs) => {
                Source::Indirect(descs.iter().map(Self::from_raw).collect())
            }
        };
        Self {
            source,
            writable: desc.writable,
        }
    }
}

/// A descriptor ready to be written: address, length and flags (without `NEXT`).
#[derive(Clone, Copy, Debug)]
struct PlannedDesc {
    addr: u64,
    len: u32,
    flags: u16,
}

/// What the client does with a request's buffers on completion.
#[derive(Debug)]
enum Kind {
    /// A typed request: writable buffers are `[data?, status]`.
    Typed { has_data: bool },
    /// A raw request: every writable buffer is returned.
    Raw,
}

/// Book-keeping for a request in flight, indexed by its head descriptor.
#[derive(Debug)]
struct InFlight {
    token: Token,
    lists: ChainLists,
    kind: Kind,
}

/// The lists a request in flight keeps: emptied and reused for later requests once it
/// completes, so that completions allocate nothing.
#[derive(Debug, Default)]
struct ChainLists {
    ring_descs: Vec<u16>,
    blocks: Vec<Block>,
    writable: Vec<(u64, u32)>,
}

impl ChainLists {
    fn clear(&mut self) {
        self.ring_descs.clear();
        self.blocks.clear();
        self.writable.clear();
    }
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

    /// Allocates and fills the buffers of `segments`, returning the descriptors to put
    /// in the ring (or in an indirect table). Allocations are appended to `blocks` and
    /// writable buffers to `writable`, in chain order.
    fn plan(
        &mut self,
        segments: &[Segment<'_>],
        blocks: &mut Vec<Block>,
        writable: &mut Vec<(u64, u32)>,
    ) -> Result<Vec<PlannedDesc>, ClientError> {
        let mut planned = Vec::with_capacity(segments.len());
        for seg in segments {
            let write_flag = if seg.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let desc = match &seg.source {
                Source::Bytes(bytes) => {
                    let len = self.buffer_len(bytes.len() as u64)?;
                    let block = self.alloc(u64::from(len), blocks)?;
                    self.write_mem(block.addr, bytes)?;
                    PlannedDesc {
                        addr: block.addr,
                        len,
                        flags: write_flag,
                    }
                }
                Source::Space { len, fill } => {
                    let block = self.alloc(u64::from(*len), blocks)?;
                    if let Some(byte) = fill {
                        self.fill(block.addr, *len, *byte)?;
                    }
                    PlannedDesc {
                        addr: block.addr,
                        len: *len,
                        flags: write_flag,
                    }
                }
                Source::Addr { addr, len } => PlannedDesc {
                    addr: *addr,
                    len: *len,
                    flags: write_flag,
                },
                Source::Indirect(inner) => {
                    let table = self.plan(inner, blocks, writable)?;
                    let len = self.buffer_len(DESC_SIZE * table.len() as u64)?;
                    let block = self.alloc(u64::from(len), blocks)?;
                    for (i, desc) in table.iter().enumerate() {
                        let next = (i + 1 < table.len()).then_some(i as u16 + 1);
                        self.write_desc(block.addr + DESC_SIZE * i as u64, desc, next)?;
                    }
                    PlannedDesc {
                        addr: block.addr,
                        len,
                        flags: VRING_DESC_F_INDIRECT as u16 | write_flag,
                    }
                }
            };
            if seg.writable && !matches!(seg.source, Source::Indirect(_)) {
                writable.push((desc.addr, desc.len));
            }
            planned.push(desc);
        }
        Ok(planned)
    }

    fn buffer_len(&self, len: u64) -> Result<u32, ClientError> {
        u32::try_from(len).map_err(|_| {
            ClientError::InvalidRequest(format!("buffer of {len} bytes exceeds a descriptor"))
        })
    }

    fn alloc(&mut self, len: u64, blocks: &mut Vec<Block>) -> Result<Block, ClientError> {
        let block = self.pool.alloc(len).ok_or(ClientError::OutOfBufferMemory {
            queue: self.index,
            requested: len,
        })?;
        blocks.push(block);
        Ok(block)
    }

    /// Writes descriptor `desc` at `addr`, chaining to `next` if given.
    fn write_desc(
        &self,
        addr: u64,
        desc: &PlannedDesc,
        next: Option<u16>,
    ) -> Result<(), ClientError> {
        let mut flags = desc.flags;
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        SplitRing::write_desc_at(
            self.ram.mem(),
            addr,
            desc.addr,
            desc.len,
            flags,
            next.unwrap_or(0),
        )
        .map_err(|e| self.gmem_err(addr, e))
    }

    /// Plans, writes and publishes one chain, then notifies if auto-kick is on.
    fn submit_segments(
        &mut self,
        segments: &[Segment<'_>],
        kind: Kind,
    ) -> Result<Token, ClientError> {
        if segments.is_empty() {
            return Err(ClientError::InvalidRequest("empty descriptor chain".into()));
        }
        let needed = segments.len();
        let free = self.free_descs.len();
        if needed > free {
            return Err(ClientError::QueueFull {
                queue: self.index,
                needed,
                free,
            });
        }
        let mut lists = self.spare_lists.pop().unwrap_or_default();
        let planned = match self.plan(segments, &mut lists.blocks, &mut lists.writable) {
            Ok(planned) => planned,
            Err(e) => {
                self.recycle(lists);
                return Err(e);
            }
        };
        lists
            .ring_descs
            .extend((0..needed).filter_map(|_| self.free_descs.pop()));
        let ids = &lists.ring_descs;
        let mut result = Ok(());
        for (i, desc) in planned.iter().enumerate() {
            let addr = self.split.desc_addr(ids[i]);
            result = self.write_desc(addr, desc, ids.get(i + 1).copied());
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result {
            self.recycle(lists);
            return Err(e);
        }

        let head = ids[0];
        let token = Token(self.next_token);
        self.next_token += 1;
        self.in_flight[usize::from(head)] = Some(InFlight { token, lists, kind });
        self.in_flight_count += 1;

        // Release: descriptors and the ring entry are visible before the new index.
        self.next_avail = self
            .split
            .publish(self.ram.mem(), self.next_avail, head)
            .map_err(|e| self.gmem_err(self.ring.avail, e))?;
        self.stats.submitted += 1;
        if self.auto_kick {
            self.kick()?;
        }
        Ok(token)
    }

    /// Gives a chain's descriptors and buffers back and keeps its lists for reuse.
    fn recycle(&mut self, mut lists: ChainLists) {
        self.free_descs.extend(lists.ring_descs.iter().rev());
        for &block in &lists.blocks {
            self.pool.free(block);
        }
        lists.clear();
        self.spare_lists.push(lists);
    }

    /// Reserves `count` buffers of `len` bytes each in this queue's guest memory, for
    /// [`Request::ReadInto`]; they stay reserved while the queue lives. Fails with
    /// [`ClientError::OutOfBufferMemory`] (reserving nothing) when they do not fit
    /// beside the room requests need for headers and status bytes.
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
    /// [`Request::ReadInto`]).
    pub fn buffer_contents(&self, buffer: &GuestBuffer) -> Result<Vec<u8>, ClientError> {
        self.read_mem(buffer.addr, buffer.len)
    }

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

    /// Submits a typed request and returns its token.
    pub fn submit(&mut self, request: Request<'_>) -> Result<Token, ClientError> {
        let sector = |offset: u64| {
            if !offset.is_multiple_of(SECTOR_SIZE) {
                Err(ClientError::InvalidRequest(format!(
                    "offset {offset} is not a multiple of {SECTOR_SIZE}"
                )))
            } else {
                Ok(offset / SECTOR_SIZE)
            }
        };
        let sectors = |len: u64| {
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(ClientError::InvalidRequest(format!(
                    "length {len} is not a multiple of {SECTOR_SIZE}"
                )));
            }
            u32::try_from(len / SECTOR_SIZE).map_err(|_| {
                ClientError::InvalidRequest(format!("length {len} exceeds one segment"))
            })
        };
        let data_fill = self.settings.poison.then_some(POISON_BYTE);
        let piece = self.settings.size_max.unwrap_or(u32::MAX);
        let (header, middle, has_data) = match request {
            Request::Read { offset, len } => (
                blk_header(request.request_type(), sector(offset)?),
                (0..len)
                    .step_by(piece as usize)
                    .map(|at| Segment {
                        source: Source::Space {
                            len: (len - at).min(piece),
                            fill: data_fill,
                        },
                        writable: true,
                    })
                    .collect(),
                len > 0,
            ),
            Request::ReadInto { offset, buffer } => {
                if !self.in_guest_memory(buffer.addr, buffer.len) {
                    return Err(ClientError::InvalidRequest(format!(
                        "buffer {:#x}+{} is outside guest memory",
                        buffer.addr, buffer.len
                    )));
                }
                if let Some(byte) = data_fill {
                    self.fill(buffer.addr, buffer.len, byte)?;
                }
                (
                    blk_header(request.request_type(), sector(offset)?),
                    (0..buffer.len)
                        .step_by(piece as usize)
                        .map(|at| Segment {
                            source: Source::Addr {
                                addr: buffer.addr + u64::from(at),
                                len: (buffer.len - at).min(piece),
                            },
                            writable: true,
                        })
                        .collect(),
                    // The data stays where it is: nothing to copy out on completion.
                    false,
                )
            }
            Request::Write { offset, data } => (
                blk_header(request.request_type(), sector(offset)?),
                data.chunks(piece as usize)
                    .map(|chunk| Segment {
                        source: Source::Bytes(chunk),
                        writable: false,
                    })
                    .collect(),
                false,
            ),
            Request::Flush => (blk_header(request.request_type(), 0), Vec::new(), false),
            Request::GetId => (
                blk_header(request.request_type(), 0),
                vec![Segment {
                    source: Source::Space {
                        len: BLK_ID_SIZE as u32,
                        fill: Some(0),
                    },
                    writable: true,
                }],
                true,
            ),
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                let unmap = matches!(request, Request::WriteZeroes { unmap: true, .. });
                let segment = blk_segment(sector(offset)?, sectors(len)?, unmap);
                return self.submit_typed(
                    blk_header(request.request_type(), 0),
                    vec![Segment {
                        source: Source::Bytes(&segment),
                        writable: false,
                    }],
                    false,
                );
            }
        };
        self.submit_typed(header, middle, has_data)
    }

    fn submit_typed(
        &mut self,
        header: [u8; 16],
        middle: Vec<Segment<'_>>,
        has_data: bool,
    ) -> Result<Token, ClientError> {
        let mut segments = Vec::with_capacity(middle.len() + 2);
        segments.push(Segment {
            source: Source::Bytes(&header),
            writable: false,
        });
        segments.extend(middle);
        segments.push(Segment {
            source: Source::Space {
                len: 1,
                fill: Some(POISON_BYTE),
            },
            writable: true,
        });
        let kind = Kind::Typed { has_data };
        if self.settings.indirect {
            let table = Segment {
                source: Source::Indirect(segments),
                writable: false,
            };
            self.submit_segments(std::slice::from_ref(&table), kind)
        } else {
            self.submit_segments(&segments, kind)
        }
    }

    /// Submits an arbitrary descriptor chain (possibly malformed) and returns its
    /// token; wait for it with [`wait`](Self::wait).
    pub fn submit_raw(&mut self, descriptors: &[RawDesc]) -> Result<Token, ClientError> {
        let segments: Vec<Segment<'_>> = descriptors.iter().map(Segment::from_raw).collect();
        self.submit_segments(&segments, Kind::Raw)
    }

    /// Whether guest memory holds `[addr, addr + len)`.
    fn in_guest_memory(&self, addr: u64, len: u32) -> bool {
        addr >= GUEST_MEMORY_BASE
            && addr
                .checked_add(u64::from(len))
                .is_some_and(|end| end <= GUEST_MEMORY_BASE + self.ram.size())
    }

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
    fn reap(&mut self) -> Result<usize, ClientError> {
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

/// A finished request on its way to the caller.
enum Finished {
    Typed(Completion),
    Raw(RawCompletion),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};

    const SIZE: u16 = 16;

    /// A queue over fresh guest memory, plus the peer end of its "vhost-user socket".
    fn queue(event_idx: bool, indirect: bool, kick_suppression: bool) -> (BlkQueue, UnixStream) {
        let ram: SharedRam = Arc::new(GuestRam::new(1 << 20).expect("guest ram"));
        let ring = RingLayout::new(GUEST_MEMORY_BASE, SIZE);
        let pool = BufferPool::new(ring.end, GUEST_MEMORY_BASE + (1 << 20));
        let (ours, peer) = UnixStream::pair().expect("socket pair");
        let settings = QueueSettings {
            size: SIZE,
            event_idx,
            kick_suppression,
            indirect,
            poison: true,
            timeout: Duration::from_secs(5),
            size_max: None,
        };
        let q = BlkQueue::new(0, settings, ram, ring, pool, Arc::new(ours)).expect("queue");
        (q, peer)
    }

    /// The device side: virtio-queue's own `Queue`, as a backend uses it, over the
    /// client's rings.
    struct Device {
        ram: SharedRam,
        queue: Queue,
        ring: SplitRing,
    }

    impl Device {
        fn new(q: &BlkQueue) -> Self {
            let mut queue = Queue::new(SIZE).expect("device queue");
            let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
            let (lo, hi) = split(q.ring.desc);
            queue.set_desc_table_address(lo, hi);
            let (lo, hi) = split(q.ring.avail);
            queue.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(q.ring.used);
            queue.set_used_ring_address(lo, hi);
            queue.set_event_idx(q.settings.event_idx);
            queue.set_ready(true);
            assert!(queue.is_valid(q.ram.mem()), "the client's rings are valid");
            Self {
                ram: Arc::clone(&q.ram),
                queue,
                ring: q.split,
            }
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.ram
                .mem()
                .read_slice(&mut buf, GuestAddress(addr))
                .expect("device read");
            buf
        }

        fn write(&self, addr: u64, bytes: &[u8]) {
            self.ram
                .mem()
                .write_slice(bytes, GuestAddress(addr))
                .expect("device write");
        }

        fn load(&self, addr: u64) -> u16 {
            self.ram
                .mem()
                .load(GuestAddress(addr), Ordering::Acquire)
                .expect("device load")
        }

        /// Descriptor `index` of the ring's own table.
        fn desc(&self, index: u16) -> Descriptor {
            self.ram
                .mem()
                .read_obj(GuestAddress(self.ring.desc_addr(index)))
                .expect("descriptor")
        }

        /// Pops the next available chain: (head, its descriptors, indirect tables
        /// followed).
        fn pop(&mut self) -> Option<(u16, Vec<Descriptor>)> {
            let chain = self.queue.pop_descriptor_chain(self.ram.mem())?;
            Some((chain.head_index(), chain.collect()))
        }

        /// Publishes a used entry for `id` (without signalling).
        fn push(&mut self, id: u16, len: u32) {
            self.queue
                .add_used(self.ram.mem(), id, len)
                .expect("used entry");
        }

        /// Publishes a used entry whatever its id, as a broken device would.
        fn push_raw(&mut self, id: u32, len: u32) {
            let next = self.queue.next_used();
            let entry = self.ring.used_elem_addr(next);
            let mem = self.ram.mem();
            mem.write_obj(id.to_le(), GuestAddress(entry))
                .expect("used id");
            mem.write_obj(len.to_le(), GuestAddress(entry + 4))
                .expect("used len");
            let next = next.wrapping_add(1);
            mem.store(
                next.to_le(),
                GuestAddress(self.ring.used_idx_addr()),
                Ordering::Release,
            )
            .expect("used idx");
            self.queue.set_next_used(next);
        }

        /// Pops one chain, writes `status` into its last descriptor and publishes it.
        fn complete_next(&mut self, status: u8) {
            let (head, chain) = self.pop().expect("a chain is available");
            let last = chain.last().expect("non-empty chain");
            self.write(last.addr().0 + u64::from(last.len()) - 1, &[status]);
            self.push(head, 1);
        }
    }

    /// Writes a ring field as the device would.
    fn store_u16(q: &BlkQueue, addr: u64, value: u16) {
        q.ram
            .mem()
            .store(value.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("ring field");
    }

    fn signal(q: &BlkQueue) {
        q.call_fd().write(1).expect("call");
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn ring_layout_is_page_aligned() {
        let layout = RingLayout::new(GUEST_MEMORY_BASE, 256);
        assert_eq!(layout.desc, GUEST_MEMORY_BASE);
        assert_eq!(layout.avail, GUEST_MEMORY_BASE + 4096);
        assert_eq!(layout.used, GUEST_MEMORY_BASE + 8192);
        assert_eq!(layout.end, GUEST_MEMORY_BASE + 8192 + 4096);
    }

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

    #[test]
    fn queue_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<BlkQueue>();
    }

    #[test]
    fn read_chain_layout_and_out_of_order_completion() {
        let (mut q, _peer) = queue(false, false, false);
        let tokens: Vec<Token> = (0..3)
            .map(|i| {
                q.submit(Request::Read {
                    offset: 512 * i,
                    len: 1024,
                })
                .expect("submit")
            })
            .collect();
        assert_eq!(q.in_flight(), 3);
        assert_eq!(q.free_descriptors(), usize::from(SIZE) - 9);
        assert_eq!(q.stats().kicks, 3);

        let mut dev = Device::new(&q);
        let mut chains = Vec::new();
        while let Some(chain) = dev.pop() {
            chains.push(chain);
        }
        assert_eq!(chains.len(), 3);
        for (i, (_, chain)) in chains.iter().enumerate() {
            assert_eq!(chain.len(), 3);
            let hdr = dev.read(chain[0].addr().0, chain[0].len() as usize);
            assert_eq!(hdr, blk_header(VIRTIO_BLK_T_IN, i as u64));
            assert_eq!(chain[0].flags(), VRING_DESC_F_NEXT as u16);
            let data_flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
            assert_eq!((chain[1].len(), chain[1].flags()), (1024, data_flags));
            assert_eq!(
                (chain[2].len(), chain[2].flags()),
                (1, VRING_DESC_F_WRITE as u16)
            );
            // Unwritten buffers carry the poison.
            assert_eq!(dev.read(chain[2].addr().0, 1), [POISON_BYTE]);
            dev.write(chain[1].addr().0, &[i as u8; 1024]);
            let status = if i == 1 {
                VIRTIO_BLK_S_IOERR
            } else {
                VIRTIO_BLK_S_OK
            };
            dev.write(chain[2].addr().0, &[status as u8]);
        }
        // Complete in the order 2, 0, 1.
        for &i in &[2usize, 0, 1] {
            dev.push(chains[i].0, 1025);
        }
        signal(&q);

        let mut out = Vec::new();
        assert_eq!(q.poll_completions(&mut out).expect("poll"), 3);
        let order: Vec<Token> = out.iter().map(|c| c.token).collect();
        assert_eq!(order, [tokens[2], tokens[0], tokens[1]]);
        assert_eq!(out[0].data, vec![2u8; 1024]);
        assert_eq!(out[1].status, BlkStatus::Ok);
        assert_eq!(out[2].status, BlkStatus::IoErr);
        assert_eq!(out[2].used_len, 1025);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), usize::from(SIZE));
    }

    #[test]
    fn read_into_reserved_buffers_leaves_the_data_in_guest_memory() {
        let (mut q, _peer) = queue(false, false, false);
        let buffers = q.reserve_buffers(2, 4096).expect("reserve");
        assert_ne!(buffers[0].addr(), buffers[1].addr());
        let mut dev = Device::new(&q);
        // The same two buffers, used in turn by four reads.
        for round in 0..4u8 {
            let buffer = buffers[usize::from(round % 2)];
            let token = q
                .submit(Request::ReadInto {
                    offset: 4096 * u64::from(round),
                    buffer,
                })
                .expect("submit");
            let (head, chain) = dev.pop().expect("chain");
            assert_eq!(chain.len(), 3);
            assert_eq!(
                dev.read(chain[0].addr().0, chain[0].len() as usize),
                blk_header(VIRTIO_BLK_T_IN, 8 * u64::from(round))
            );
            // The device writes straight into the caller's buffer.
            assert_eq!((chain[1].addr().0, chain[1].len()), (buffer.addr(), 4096));
            assert_eq!(
                chain[1].flags(),
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16
            );
            dev.write(chain[1].addr().0, &[round + 1; 4096]);
            dev.write(chain[2].addr().0, &[VIRTIO_BLK_S_OK as u8]);
            dev.push(head, 4097);
            signal(&q);
            let done = q.wait_completion(token, soon()).expect("wait");
            assert!(done.is_ok());
            assert!(done.data.is_empty(), "nothing is copied out");
            assert_eq!(
                q.buffer_contents(&buffer).expect("contents"),
                vec![round + 1; 4096]
            );
        }
        assert_eq!(q.free_descriptors(), usize::from(SIZE));
        // Poisoning covers reserved buffers too.
        q.submit(Request::ReadInto {
            offset: 0,
            buffer: buffers[0],
        })
        .expect("submit");
        assert_eq!(
            q.buffer_contents(&buffers[0]).expect("contents"),
            vec![POISON_BYTE; 4096]
        );
    }

    #[test]
    fn reserving_more_than_fits_reserves_nothing() {
        let (mut q, _peer) = queue(false, false, false);
        assert!(matches!(
            q.reserve_buffers(1000, 4096),
            Err(ClientError::OutOfBufferMemory { .. })
        ));
        // Everything came back: the pool still holds nearly all of its megabyte.
        assert_eq!(q.reserve_buffers(200, 4096).expect("reserve").len(), 200);
        assert!(matches!(
            q.reserve_buffers(1, 0),
            Err(ClientError::InvalidRequest(_))
        ));
    }

    #[test]
    fn indirect_request_uses_one_ring_descriptor() {
        let (mut q, _peer) = queue(false, true, false);
        q.submit(Request::Write {
            offset: 4096,
            data: &[7; 512],
        })
        .expect("submit");
        assert_eq!(q.free_descriptors(), usize::from(SIZE) - 1);
        let mut dev = Device::new(&q);
        // The device follows the indirect table: three descriptors.
        let (head, table) = dev.pop().expect("chain");
        assert_eq!(table.len(), 3);
        let ring_desc = dev.desc(head);
        assert!(!ring_desc.has_next(), "one ring descriptor");
        assert_eq!(ring_desc.flags(), VRING_DESC_F_INDIRECT as u16);
        assert_eq!(ring_desc.len(), 48);
        assert_eq!(table[0].flags(), VRING_DESC_F_NEXT as u16);
        assert_eq!((table[0].next(), table[1].next()), (1, 2));
        assert_eq!(table[1].flags(), VRING_DESC_F_NEXT as u16);
        assert_eq!(dev.read(table[1].addr().0, 512), vec![7; 512]);
        assert_eq!(table[2].flags(), VRING_DESC_F_WRITE as u16);
    }

    #[test]
    fn raw_chain_reports_writable_buffers() {
        let (mut q, _peer) = queue(false, false, false);
        let token = q
            .submit_raw(&[
                RawDesc::readable(vec![1, 2, 3]),
                RawDesc::writable(4),
                RawDesc::addr(0, 8, true),
                RawDesc::status(),
            ])
            .expect("submit");
        let mut dev = Device::new(&q);
        let (head, chain) = dev.pop().expect("chain");
        assert_eq!(chain.len(), 4);
        assert_eq!((chain[2].addr().0, chain[2].len()), (0, 8));
        dev.write(chain[1].addr().0, &[9, 9, 9, 9]);
        dev.write(chain[3].addr().0, &[0]);
        dev.push(head, 5);
        signal(&q);
        // Typed polling leaves raw completions for wait().
        let mut out = Vec::new();
        assert_eq!(q.poll_completions(&mut out).expect("poll"), 0);
        let done = q.wait(token, soon()).expect("wait");
        assert_eq!(done.used_len, 5);
        assert_eq!(done.writable, vec![vec![9, 9, 9, 9], vec![], vec![0]]);
        assert_eq!(done.status_byte(), Some(0));
        assert!(matches!(
            q.wait(token, soon()),
            Err(ClientError::UnknownToken { .. })
        ));
    }

    #[test]
    fn completion_already_published_needs_no_call() {
        let (mut q, _peer) = queue(true, false, false);
        let token = q.submit(Request::Flush).expect("submit");
        let mut dev = Device::new(&q);
        dev.complete_next(0);
        assert!(q.wait_completion(token, soon()).expect("wait").is_ok());
    }

    #[test]
    fn missed_notification_is_an_error() {
        let (mut q, _peer) = queue(true, false, false);
        let token = q.submit(Request::Flush).expect("submit");
        let mut dev = Device::new(&q);
        let used_event = q.split.used_event_addr();
        std::thread::scope(|s| {
            s.spawn(|| {
                // Complete while the client sleeps, and never signal.
                std::thread::sleep(Duration::from_millis(50));
                dev.complete_next(0);
            });
            let r = q.wait_completion(token, Instant::now() + Duration::from_secs(1));
            assert!(
                matches!(r, Err(ClientError::MissedNotification { .. })),
                "{r:?}"
            );
        });
        // EVENT_IDX asked for a call on the next completion after the one reaped.
        assert_eq!(dev.load(used_event), 1);
    }

    #[test]
    fn signalled_completion_wakes_the_waiter() {
        let (mut q, _peer) = queue(true, false, false);
        let token = q.submit(Request::Flush).expect("submit");
        let mut dev = Device::new(&q);
        let call = q.call_fd().try_clone().expect("clone call");
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                dev.complete_next(0);
                call.write(1).expect("signal");
            });
            let done = q.wait_completion(token, soon()).expect("wait");
            assert!(done.is_ok());
        });
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(q.stats().calls, 1);
    }

    #[test]
    fn bad_used_entries_are_errors_not_panics() {
        let (mut q, _peer) = queue(false, false, false);
        let token = q.submit(Request::Flush).expect("submit");
        let mut dev = Device::new(&q);
        dev.pop().expect("chain");
        // An id that heads nothing.
        dev.push(7, 1);
        signal(&q);
        assert!(matches!(
            q.wait_completion(token, soon()),
            Err(ClientError::BadUsedId { id: 7, .. })
        ));
        // An id far outside the table.
        dev.push_raw(u32::MAX, 1);
        let mut out = Vec::new();
        assert!(matches!(
            q.poll_completions(&mut out),
            Err(ClientError::BadUsedId { id: u32::MAX, .. })
        ));
        // A used index running ahead of what is in flight.
        store_u16(&q, q.split.used_idx_addr(), 100);
        assert!(matches!(
            q.poll_completions(&mut out),
            Err(ClientError::BadUsedIndex { used_idx: 100, .. })
        ));
    }

    #[test]
    fn unanswered_request_times_out() {
        let (mut q, _peer) = queue(true, false, false);
        let token = q.submit(Request::Flush).expect("submit");
        let start = Instant::now();
        let r = q.wait_completion(token, start + Duration::from_millis(100));
        assert!(matches!(r, Err(ClientError::Timeout { .. })), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(q.in_flight(), 1);
    }

    #[test]
    fn backend_disconnect_ends_the_wait() {
        let (mut q, peer) = queue(false, false, false);
        let token = q.submit(Request::Flush).expect("submit");
        drop(peer);
        let start = Instant::now();
        let r = q.wait_completion(token, start + Duration::from_secs(5));
        assert!(
            matches!(r, Err(ClientError::Disconnected { queue: 0 })),
            "{r:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn queue_full_and_pool_exhaustion_leave_no_trace() {
        let (mut q, _peer) = queue(false, false, false);
        for _ in 0..5 {
            q.submit(Request::Read {
                offset: 0,
                len: 512,
            })
            .expect("submit");
        }
        assert_eq!(q.free_descriptors(), 1);
        assert!(matches!(
            q.submit(Request::Flush),
            Err(ClientError::QueueFull {
                needed: 2,
                free: 1,
                ..
            })
        ));
        assert!(matches!(
            q.submit_raw(&[RawDesc::writable(u32::MAX)]),
            Err(ClientError::OutOfBufferMemory { .. })
        ));
        assert_eq!(q.free_descriptors(), 1);
        assert_eq!(q.in_flight(), 5);
    }

    #[test]
    fn event_idx_kick_suppression() {
        let (mut q, _peer) = queue(true, false, true);
        // avail_event = 0: the device wants a kick when index 0 is published.
        q.submit(Request::Flush).expect("submit");
        assert_eq!(q.stats().kicks, 1);
        // avail_event still 0: index 1 does not cross it.
        q.submit(Request::Flush).expect("submit");
        assert_eq!(q.stats().kicks, 1);
        // The device asks for a kick at index 2.
        store_u16(&q, q.split.avail_event_addr(), 2);
        q.submit(Request::Flush).expect("submit");
        assert_eq!(q.stats().kicks, 2);
        assert_eq!(q.kick.read().expect("kick count"), 2);
    }

    #[test]
    fn no_notify_flag_suppresses_kicks_without_event_idx() {
        let (mut q, _peer) = queue(false, false, true);
        store_u16(&q, q.split.used_flags_addr(), VRING_USED_F_NO_NOTIFY as u16);
        q.submit(Request::Flush).expect("submit");
        assert_eq!(q.stats().kicks, 0);
        store_u16(&q, q.split.used_flags_addr(), 0);
        q.submit(Request::Flush).expect("submit");
        assert_eq!(q.stats().kicks, 1);
    }
}
