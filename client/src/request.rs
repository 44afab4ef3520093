// SPDX-License-Identifier: Apache-2.0

//! Request and completion types: typed virtio-blk requests and raw descriptor chains.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const BLK_HEADER_SIZE: usize = 16;

/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const BLK_SEGMENT_SIZE: usize = 16;

/// Size of the device ID returned by `VIRTIO_BLK_T_GET_ID`.
pub const BLK_ID_SIZE: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Byte the client fills device-writable buffers with before submitting (status
/// buffers always; data buffers unless poisoning is turned off): a device that never
/// writes the status leaves this value, reported as [`BlkStatus::Other`].
pub const POISON_BYTE: u8 = 0xff;

/// Outcome of a virtio-blk request, from the status byte the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlkStatus {
    /// `VIRTIO_BLK_S_OK`.
    Ok,
    /// `VIRTIO_BLK_S_IOERR`.
    IoErr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
    /// Any other byte, e.g. [`POISON_BYTE`] when the device did not write it.
    Other(u8),
}

impl From<u8> for BlkStatus {
    fn from(byte: u8) -> Self {
        match u32::from(byte) {
            VIRTIO_BLK_S_OK => Self::Ok,
            VIRTIO_BLK_S_IOERR => Self::IoErr,
            VIRTIO_BLK_S_UNSUPP => Self::Unsupp,
            _ => Self::Other(byte),
        }
    }
}

/// Identifies a submitted request on its queue; unique per queue for the client's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub(crate) u64);

impl Token {
    /// The token's number (increasing in submission order).
    pub fn id(self) -> u64 {
        self.0
    }
}

/// A well-formed virtio-blk request. Offsets and lengths are in bytes; offsets must be
/// multiples of the 512-byte sector (the header addresses sectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// `VIRTIO_BLK_T_IN`: read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// `VIRTIO_BLK_T_IN` into a buffer the caller reserved with
    /// [`BlkQueue::reserve_buffers`](crate::BlkQueue::reserve_buffers): the data stays
    /// in guest memory (nothing is copied out, [`Completion::data`] is empty), where
    /// [`BlkQueue::buffer_contents`](crate::BlkQueue::buffer_contents) can read it.
    /// The caller must not hand the same buffer to two requests in flight.
    ReadInto {
        /// Byte offset.
        offset: u64,
        /// Where the device writes the data; reads `buffer.len()` bytes.
        buffer: GuestBuffer,
    },
    /// `VIRTIO_BLK_T_OUT`: write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes to write.
        data: &'a [u8],
    },
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the 20-byte device ID.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD` with one segment.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes to discard (a multiple of 512).
        len: u64,
    },
    /// `VIRTIO_BLK_T_WRITE_ZEROES` with one segment.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes to zero (a multiple of 512).
        len: u64,
        /// Set `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
        unmap: bool,
    },
}

impl Request<'_> {
    /// The `VIRTIO_BLK_T_*` request type.
    pub fn request_type(&self) -> u32 {
        match self {
            Request::Read { .. } | Request::ReadInto { .. } => VIRTIO_BLK_T_IN,
            Request::Write { .. } => VIRTIO_BLK_T_OUT,
            Request::Flush => VIRTIO_BLK_T_FLUSH,
            Request::GetId => VIRTIO_BLK_T_GET_ID,
            Request::Discard { .. } => VIRTIO_BLK_T_DISCARD,
            Request::WriteZeroes { .. } => VIRTIO_BLK_T_WRITE_ZEROES,
        }
    }
}

/// A data buffer in guest memory that a queue reserved for its caller's requests
/// ([`BlkQueue::reserve_buffers`](crate::BlkQueue::reserve_buffers)); it stays reserved
/// for the queue's life and is reused for as many requests as the caller likes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestBuffer {
    pub(crate) addr: u64,
    pub(crate) len: u32,
}

impl GuestBuffer {
    /// Guest physical address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the buffer holds no byte (never true of a reserved buffer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Bytes of a `struct virtio_blk_outhdr` (little endian, ioprio 0).
pub fn blk_header(request_type: u32, sector: u64) -> [u8; BLK_HEADER_SIZE] {
    let mut hdr = [0u8; BLK_HEADER_SIZE];
    hdr[0..4].copy_from_slice(&request_type.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    hdr
}

/// Bytes of a `struct virtio_blk_discard_write_zeroes` segment.
pub fn blk_segment(sector: u64, num_sectors: u32, unmap: bool) -> [u8; BLK_SEGMENT_SIZE] {
    let mut seg = [0u8; BLK_SEGMENT_SIZE];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    let flags = if unmap {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    seg
}

/// Outcome of a typed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's token.
    pub token: Token,
    /// The status byte the device wrote.
    pub status: BlkStatus,
    /// The `len` of the used ring entry (bytes the device says it wrote).
    pub used_len: u32,
    /// Data the device returned: the read buffer for reads, the ID for `GetId`;
    /// empty for other requests.
    pub data: Vec<u8>,
}

impl Completion {
    /// Whether the status is [`BlkStatus::Ok`].
    pub fn is_ok(&self) -> bool {
        self.status == BlkStatus::Ok
    }
}

/// Where a raw descriptor's buffer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawData {
    /// A buffer the client allocates in guest memory, holding these bytes.
    Bytes(Vec<u8>),
    /// A buffer of this many bytes the client allocates, filled with [`POISON_BYTE`],
    /// for the device to write.
    Space(u32),
    /// A descriptor with this guest physical address and length, pointing wherever
    /// (also outside guest memory); nothing is allocated.
    Addr {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A `VRING_DESC_F_INDIRECT` descriptor whose table the client allocates and fills
    /// with these descriptors (chained in order with `VRING_DESC_F_NEXT`).
    Indirect(Vec<RawDesc>),
}

/// One descriptor of a raw chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// The buffer.
    pub data: RawData,
    /// Set `VRING_DESC_F_WRITE` (device writes the buffer).
    pub writable: bool,
}

impl RawDesc {
    /// A device-readable buffer holding `bytes`.
    pub fn readable(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            data: RawData::Bytes(bytes.into()),
            writable: false,
        }
    }

    /// A device-writable buffer of `len` bytes.
    pub fn writable(len: u32) -> Self {
        Self {
            data: RawData::Space(len),
            writable: true,
        }
    }

    /// A readable virtio-blk request header.
    pub fn header(request_type: u32, sector: u64) -> Self {
        Self::readable(blk_header(request_type, sector))
    }

    /// A writable one-byte status buffer.
    pub fn status() -> Self {
        Self::writable(1)
    }

    /// A descriptor with an arbitrary address and length.
    pub fn addr(addr: u64, len: u32, writable: bool) -> Self {
        Self {
            data: RawData::Addr { addr, len },
            writable,
        }
    }

    /// An indirect descriptor for a table holding `descs`.
    pub fn indirect(descs: Vec<RawDesc>) -> Self {
        Self {
            data: RawData::Indirect(descs),
            writable: false,
        }
    }
}

/// Outcome of a raw request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCompletion {
    /// The request's token.
    pub token: Token,
    /// The `len` of the used ring entry.
    pub used_len: u32,
    /// Contents of every writable descriptor's buffer, in chain order (descriptors
    /// inside indirect tables included). Buffers outside guest memory read as empty.
    pub writable: Vec<Vec<u8>>,
}

impl RawCompletion {
    /// The last byte of the last non-empty writable buffer: where a well-formed
    /// virtio-blk request keeps its status.
    pub fn status_byte(&self) -> Option<u8> {
        self.writable
            .iter()
            .rev()
            .find(|b| !b.is_empty())
            .and_then(|b| b.last().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_byte() {
        assert_eq!(BlkStatus::from(0), BlkStatus::Ok);
        assert_eq!(BlkStatus::from(1), BlkStatus::IoErr);
        assert_eq!(BlkStatus::from(2), BlkStatus::Unsupp);
        assert_eq!(BlkStatus::from(POISON_BYTE), BlkStatus::Other(0xff));
    }

    #[test]
    fn header_and_segment_layout() {
        let hdr = blk_header(VIRTIO_BLK_T_OUT, 0x0102);
        assert_eq!(hdr, [1, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        let seg = blk_segment(3, 8, true);
        assert_eq!(seg, [3, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0]);
    }
}
