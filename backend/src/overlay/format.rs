//! The overlay's on-disk format, parsed by pure functions (no I/O) so that a
//! fuzz target can call them on arbitrary bytes.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "OCIBLKOV"
//!      8     4  format version (u32 LE) = 1
//!     12     4  block size (u32 LE) = 4096
//!     16     8  disk size in bytes (u64 LE), a multiple of 512
//!     24    32  layout fingerprint of the base disk
//!     56     8  map offset (u64 LE) = 4096
//!     64     8  map length = number of blocks, one state byte each
//!     72     8  data offset (u64 LE), 1 MiB aligned, after the map
//!     80     4  CRC32 of bytes 0..80
//!     84     1  clean flag: 1 = closed cleanly, 0 = in use or crashed
//!     85     1  map checksum recorded: 1 = bytes 88..92 hold it, 0 = not
//!     86     2  reserved, zero
//!     88     4  CRC32 of the whole map as of the last clean close (u32 LE)
//!     92  4004  reserved, zero
//!   4096     …  block-state map; block i's data at data offset + i * 4096
//! ```
//!
//! The clean flag sits outside the CRC so that it can be flipped with a
//! one-byte write that can never tear the checksummed fields.
//!
//! The map checksum (bytes 85..92) is also outside the header CRC. It is
//! written, and synced, just before the clean flag is set, and only
//! believed while the flag says "closed cleanly": while the overlay is in
//! use the map changes entry by entry (each a one-byte, crash-safe update)
//! and the recorded checksum is stale. Files written before the checksum
//! existed have zeros there, "not recorded"; ociblk releases before it
//! refuse a file that records one ("reserved header byte 85 is not zero").

use std::sync::atomic::AtomicU8;

use super::map::StateCounts;

/// Bytes reserved for the header at the start of the file.
pub const HEADER_SIZE: usize = 4096;
/// Size of one overlay block: the unit of copy-on-write.
pub const BLOCK_SIZE: u64 = 4096;
/// The data area starts on this boundary.
pub const DATA_ALIGN: u64 = 1 << 20;
/// Largest disk an overlay can describe (1 PiB); keeps every file offset
/// far below `i64::MAX` and the in-memory map addressable.
pub const MAX_DISK_SIZE: u64 = 1 << 50;

pub const MAGIC: [u8; 8] = *b"OCIBLKOV";
pub const FORMAT_VERSION: u32 = 1;

const CRC_OFFSET: usize = 80;
pub(crate) const CLEAN_OFFSET: usize = 84;
/// Where the map checksum field (flag, padding, CRC32) starts.
pub(crate) const MAP_CRC_FIELD_OFFSET: usize = 85;
const MAP_CRC_OFFSET: usize = 88;
const RESERVED_START: usize = 92;

/// State of one block, as stored in the map (one byte per block).
///
/// A whole byte per entry (rather than 2 bits) lets every entry be
/// published with a plain atomic store and rewritten in place on disk
/// without touching its neighbours; the map costs 1/4096 of the disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockState {
    /// Read the base disk. Zero so that a hole in the map means "untouched".
    Base = 0,
    /// Read the overlay's data area.
    Data = 1,
    /// Reads as zeros.
    Zero = 2,
}

impl BlockState {
    /// Decodes a map byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Base),
            1 => Some(Self::Data),
            2 => Some(Self::Zero),
            _ => None,
        }
    }
}

/// What is wrong with an overlay's bytes, without the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: {what} needs {need} bytes, found {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("bad magic")]
    BadMagic,
    #[error("format version {0}")]
    Version(u32),
    #[error("header checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Crc { stored: u32, computed: u32 },
    #[error("{0}")]
    Invalid(String),
    #[error("unknown state byte {value} for block {block}")]
    BadState { block: u64, value: u8 },
    #[error(
        "map checksum mismatch (recorded {recorded:08x} at the last clean close, \
         computed {computed:08x}): the map changed while the overlay was closed"
    )]
    MapCrc { recorded: u32, computed: u32 },
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub disk_size: u64,
    pub fingerprint: [u8; 32],
    pub map_offset: u64,
    /// Number of map entries (= blocks).
    pub map_len: u64,
    pub data_offset: u64,
    pub clean: bool,
    /// CRC32 of the map as of the last clean close, if one was recorded.
    pub map_crc: Option<u32>,
}

/// Number of 4 KiB blocks covering `disk_size` bytes.
pub fn block_count(disk_size: u64) -> u64 {
    disk_size.div_ceil(BLOCK_SIZE)
}

impl Header {
    /// The header of a fresh overlay for a disk of `disk_size` bytes.
    /// `disk_size` must be valid (see [`check_disk_size`]).
    pub fn new(disk_size: u64, fingerprint: [u8; 32]) -> Self {
        let map_offset = HEADER_SIZE as u64;
        let map_len = block_count(disk_size);
        Header {
            disk_size,
            fingerprint,
            map_offset,
            map_len,
            data_offset: (map_offset + map_len).next_multiple_of(DATA_ALIGN),
            clean: true,
            map_crc: None,
        }
    }

    /// Blocks in the disk.
    pub fn blocks(&self) -> u64 {
        self.map_len
    }

    /// End of the data area: the file's length.
    pub fn file_len(&self) -> u64 {
        // Cannot overflow: parse_header and check_disk_size bound both terms.
        self.data_offset + self.map_len * BLOCK_SIZE
    }

    /// The 4 KiB header block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        b[24..56].copy_from_slice(&self.fingerprint);
        b[56..64].copy_from_slice(&self.map_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.map_len.to_le_bytes());
        b[72..80].copy_from_slice(&self.data_offset.to_le_bytes());
        let crc = crc32fast::hash(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        b[CLEAN_OFFSET] = u8::from(self.clean);
        b[MAP_CRC_FIELD_OFFSET..RESERVED_START].copy_from_slice(&encode_map_crc(self.map_crc));
        b
    }
}

/// The map checksum field, bytes 85..92 of the header.
pub(crate) fn encode_map_crc(crc: Option<u32>) -> [u8; RESERVED_START - MAP_CRC_FIELD_OFFSET] {
    let mut b = [0u8; RESERVED_START - MAP_CRC_FIELD_OFFSET];
    if let Some(crc) = crc {
        b[0] = 1;
        b[MAP_CRC_OFFSET - MAP_CRC_FIELD_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    }
    b
}

/// Checks a disk size asked for by a caller.
pub fn check_disk_size(disk_size: u64) -> Result<(), FormatError> {
    if disk_size == 0 || !disk_size.is_multiple_of(512) {
        return Err(FormatError::Invalid(format!(
            "disk size {disk_size} is not a positive multiple of 512"
        )));
    }
    if disk_size > MAX_DISK_SIZE {
        return Err(FormatError::Invalid(format!(
            "disk size {disk_size} exceeds the maximum {MAX_DISK_SIZE}"
        )));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and validates the first 4 KiB of an overlay file.
///
/// Checks, in order: length, magic, version (before the CRC, so that a
/// newer format reports its version rather than a checksum error), CRC,
/// block size, disk size, map and data placement, clean flag, reserved
/// bytes.
pub fn parse_header(b: &[u8]) -> Result<Header, FormatError> {
    if b.len() < HEADER_SIZE {
        return Err(FormatError::Truncated {
            what: "header",
            need: HEADER_SIZE as u64,
            have: b.len() as u64,
        });
    }
    if b[0..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let stored = u32_at(b, CRC_OFFSET);
    let computed = crc32fast::hash(&b[..CRC_OFFSET]);
    if stored != computed {
        return Err(FormatError::Crc { stored, computed });
    }
    let block_size = u32_at(b, 12);
    if u64::from(block_size) != BLOCK_SIZE {
        return Err(FormatError::Invalid(format!(
            "block size {block_size}, expected {BLOCK_SIZE}"
        )));
    }
    let disk_size = u64_at(b, 16);
    check_disk_size(disk_size)?;
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&b[24..56]);
    let map_offset = u64_at(b, 56);
    let map_len = u64_at(b, 64);
    let data_offset = u64_at(b, 72);
    let blocks = block_count(disk_size);
    if map_offset < HEADER_SIZE as u64 || !map_offset.is_multiple_of(BLOCK_SIZE) {
        return Err(FormatError::Invalid(format!(
            "map offset {map_offset} is not a 4 KiB boundary after the header"
        )));
    }
    if map_len != blocks {
        return Err(FormatError::Invalid(format!(
            "map has {map_len} entries, but a {disk_size}-byte disk has {blocks} blocks"
        )));
    }
    // The map offset is unbounded in the file, so compute the map end
    // without overflow before comparing.
    let map_end = map_offset
        .checked_add(map_len)
        .ok_or_else(|| FormatError::Invalid(format!("map offset {map_offset} is out of range")))?;
    if !data_offset.is_multiple_of(DATA_ALIGN) || data_offset < map_end {
        return Err(FormatError::Invalid(format!(
            "data offset {data_offset} is not a 1 MiB boundary after the map (which ends at {map_end})"
        )));
    }
    // blocks * 4096 <= MAX_DISK_SIZE + 4095, so only the sum can overflow.
    if data_offset
        .checked_add(blocks * BLOCK_SIZE)
        .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(FormatError::Invalid(format!(
            "data offset {data_offset} is out of range"
        )));
    }
    let clean = match b[CLEAN_OFFSET] {
        0 => false,
        1 => true,
        v => {
            return Err(FormatError::Invalid(format!(
                "clean flag {v} is not 0 or 1"
            )));
        }
    };
    let map_crc = match b[MAP_CRC_FIELD_OFFSET] {
        0 => None,
        1 => Some(u32_at(b, MAP_CRC_OFFSET)),
        v => {
            return Err(FormatError::Invalid(format!(
                "map checksum flag {v} is not 0 or 1"
            )));
        }
    };
    let reserved = (MAP_CRC_FIELD_OFFSET + 1..MAP_CRC_OFFSET).chain(RESERVED_START..HEADER_SIZE);
    if map_crc.is_none() && b[MAP_CRC_OFFSET..RESERVED_START] != [0; 4] {
        return Err(FormatError::Invalid(
            "map checksum bytes are set but not marked recorded".into(),
        ));
    }
    if let Some(i) = reserved.into_iter().find(|&i| b[i] != 0) {
        return Err(FormatError::Invalid(format!(
            "reserved header byte {i} is not zero"
        )));
    }
    Ok(Header {
        disk_size,
        fingerprint,
        map_offset,
        map_len,
        data_offset,
        clean,
        map_crc,
    })
}

/// Decodes the block-state map, rejecting unknown state bytes.
pub fn parse_map(b: &[u8]) -> Result<Vec<AtomicU8>, FormatError> {
    let mut out = Vec::with_capacity(b.len());
    decode_map(b, 0, &mut out)?;
    Ok(out)
}

/// Appends the states of map bytes `b`, which start at block `first`.
pub(crate) fn decode_map(b: &[u8], first: u64, out: &mut Vec<AtomicU8>) -> Result<(), FormatError> {
    for (i, &v) in b.iter().enumerate() {
        let s = BlockState::from_u8(v).ok_or(FormatError::BadState {
            block: first + i as u64,
            value: v,
        })?;
        out.push(AtomicU8::new(s as u8));
    }
    Ok(())
}

/// Adds the blocks of map bytes `b` (starting at block `first`) to
/// `counts`.
pub(crate) fn count_states(
    b: &[u8],
    first: u64,
    counts: &mut StateCounts,
) -> Result<(), FormatError> {
    for (i, &v) in b.iter().enumerate() {
        let s = BlockState::from_u8(v).ok_or(FormatError::BadState {
            block: first + i as u64,
            value: v,
        })?;
        counts.add(s);
    }
    Ok(())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
