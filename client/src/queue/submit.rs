// SPDX-License-Identifier: Apache-2.0

//! Requests into chains: a typed virtio-blk request becomes header, data and status
//! buffers (split at `size_max`, in an indirect table if asked); a raw chain is taken
//! as it is.

use super::BlkQueue;
use super::chain::{Kind, Segment, Source};
use crate::ClientError;
use crate::config::SECTOR_SIZE;
use crate::request::{BLK_ID_SIZE, POISON_BYTE, RawDesc, Request, Token, blk_header, blk_segment};

/// The sector at byte `offset`, which must be sector aligned.
fn sector_at(offset: u64) -> Result<u64, ClientError> {
    if !offset.is_multiple_of(SECTOR_SIZE) {
        Err(ClientError::InvalidRequest(format!(
            "offset {offset} is not a multiple of {SECTOR_SIZE}"
        )))
    } else {
        Ok(offset / SECTOR_SIZE)
    }
}

/// The sectors in `len` bytes, which must be whole sectors that one segment can count.
fn sectors_in(len: u64) -> Result<u32, ClientError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ClientError::InvalidRequest(format!(
            "length {len} is not a multiple of {SECTOR_SIZE}"
        )));
    }
    u32::try_from(len / SECTOR_SIZE)
        .map_err(|_| ClientError::InvalidRequest(format!("length {len} exceeds one segment")))
}

/// `(start, len)` of each piece of `len` bytes cut at most `piece` long, in order.
fn pieces(len: u32, piece: u32) -> impl Iterator<Item = (u32, u32)> {
    (0..len)
        .step_by(piece as usize)
        .map(move |at| (at, (len - at).min(piece)))
}

impl BlkQueue {
    /// Submits a typed request and returns its token.
    pub fn submit(&mut self, request: Request<'_>) -> Result<Token, ClientError> {
        let data_fill = self.settings.poison.then_some(POISON_BYTE);
        let piece = self.settings.size_max.unwrap_or(u32::MAX);
        let (header, middle, has_data) = match request {
            Request::Read { offset, len } => (
                blk_header(request.request_type(), sector_at(offset)?),
                pieces(len, piece)
                    .map(|(_, len)| {
                        Segment::writable(Source::Space {
                            len,
                            fill: data_fill,
                        })
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
                    blk_header(request.request_type(), sector_at(offset)?),
                    pieces(buffer.len, piece)
                        .map(|(at, len)| {
                            Segment::writable(Source::Addr {
                                addr: buffer.addr + u64::from(at),
                                len,
                            })
                        })
                        .collect(),
                    // The data stays where it is: nothing to copy out on completion.
                    false,
                )
            }
            Request::Write { offset, data } => (
                blk_header(request.request_type(), sector_at(offset)?),
                data.chunks(piece as usize)
                    .map(|chunk| Segment::readable(Source::Bytes(chunk)))
                    .collect(),
                false,
            ),
            Request::Flush => (blk_header(request.request_type(), 0), Vec::new(), false),
            Request::GetId => (
                blk_header(request.request_type(), 0),
                vec![Segment::writable(Source::Space {
                    len: BLK_ID_SIZE as u32,
                    fill: Some(0),
                })],
                true,
            ),
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                let unmap = matches!(request, Request::WriteZeroes { unmap: true, .. });
                let segment = blk_segment(sector_at(offset)?, sectors_in(len)?, unmap);
                return self.submit_typed(
                    blk_header(request.request_type(), 0),
                    vec![Segment::readable(Source::Bytes(&segment))],
                    false,
                );
            }
        };
        self.submit_typed(header, middle, has_data)
    }

    /// Submits `header`, the `middle` buffers and a status byte as one request.
    fn submit_typed(
        &mut self,
        header: [u8; 16],
        middle: Vec<Segment<'_>>,
        has_data: bool,
    ) -> Result<Token, ClientError> {
        let mut segments = Vec::with_capacity(middle.len() + 2);
        segments.push(Segment::readable(Source::Bytes(&header)));
        segments.extend(middle);
        segments.push(Segment::writable(Source::Space {
            len: 1,
            fill: Some(POISON_BYTE),
        }));
        let kind = Kind::Typed { has_data };
        if self.settings.indirect {
            let table = Segment::readable(Source::Indirect(segments));
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
}
