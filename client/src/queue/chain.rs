// SPDX-License-Identifier: Apache-2.0

//! Descriptor chains: what a request's buffers are, how they are allocated, written
//! into the descriptor table (or an indirect table) and published, and how a finished
//! chain gives its descriptors and buffers back.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::BlkQueue;
use crate::ClientError;
use crate::memory::Block;
use crate::request::{POISON_BYTE, RawData, RawDesc, Token};
use crate::ring::{DESC_SIZE, SplitRing};

/// Where a planned descriptor's buffer comes from, before allocation.
pub(super) enum Source<'a> {
    Bytes(&'a [u8]),
    Space { len: u32, fill: Option<u8> },
    Addr { addr: u64, len: u32 },
    Indirect(Vec<Segment<'a>>),
}

pub(super) struct Segment<'a> {
    pub(super) source: Source<'a>,
    pub(super) writable: bool,
}

impl<'a> Segment<'a> {
    /// A buffer the device reads.
    pub(super) fn readable(source: Source<'a>) -> Self {
        Self {
            source,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub(super) fn writable(source: Source<'a>) -> Self {
        Self {
            source,
            writable: true,
        }
    }

    pub(super) fn from_raw(desc: &'a RawDesc) -> Self {
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
pub(super) enum Kind {
    /// A typed request: writable buffers are `[data?, status]`.
    Typed { has_data: bool },
    /// A raw request: every writable buffer is returned.
    Raw,
}

/// Book-keeping for a request in flight, indexed by its head descriptor.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) token: Token,
    pub(super) lists: ChainLists,
    pub(super) kind: Kind,
}

/// The lists a request in flight keeps: emptied and reused for later requests once it
/// completes, so that completions allocate nothing.
#[derive(Debug, Default)]
pub(super) struct ChainLists {
    ring_descs: Vec<u16>,
    blocks: Vec<Block>,
    pub(super) writable: Vec<(u64, u32)>,
}

impl ChainLists {
    fn clear(&mut self) {
        self.ring_descs.clear();
        self.blocks.clear();
        self.writable.clear();
    }
}

impl BlkQueue {
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
    pub(super) fn submit_segments(
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
    pub(super) fn recycle(&mut self, mut lists: ChainLists) {
        self.free_descs.extend(lists.ring_descs.iter().rev());
        for &block in &lists.blocks {
            self.pool.free(block);
        }
        lists.clear();
        self.spare_lists.push(lists);
    }
}
