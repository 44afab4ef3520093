//! The overlay's on-disk format, parsed by pure functions (no I/O) so that a
//! fuzz target can call them on arbitrary bytes.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "OCIBLKOV"
//!      8     4  format version (u32 LE): 1, or 2 for a file with a chain
//!                 of layers below it or for a frozen layer
//!     12     4  block size (u32 LE) = 4096
//!     16     8  disk size in bytes (u64 LE), a multiple of 512
//!     24    32  layout fingerprint of the base disk
//!     56     8  map offset (u64 LE): 4096, or after the chain section
//!     64     8  map length = number of blocks, one state byte each
//!     72     8  data offset (u64 LE), 1 MiB aligned, after the map
//!     80     4  CRC32 of bytes 0..80 (version 2: of 0..80 and 96..4096)
//!     84     1  clean flag: 1 = closed cleanly, 0 = in use or crashed
//!     85     1  map checksum recorded: 1 = bytes 88..92 hold it, 0 = not
//!     86     2  reserved, zero
//!     88     4  CRC32 of the whole map as of the last clean close (u32 LE)
//!     92     1  live map flag: 1 = a live map follows the data area and,
//!                 while the clean flag is 0, may be newer than this map
//!     93     3  reserved, zero
//!   version 2 only (zero in version 1):
//!     96     1  kind: 0 = overlay, 1 = frozen layer
//!     97     3  reserved, zero
//!    100     4  overlay: layers in its chain (u32 LE); layer: 0
//!    104     8  overlay: bytes of the chain section at 4096 (u64 LE)
//!    112     4  overlay: CRC32 of the chain section (u32 LE)
//!    116     1  layer: 1 = it has a parent layer, 0 = it sits on the base
//!    117    11  reserved, zero
//!    128    32  layer: content digest (sha256, see below)
//!    160    32  layer: parent's content digest (zero without a parent)
//!    192    32  layer: metadata digest (sha256 of the digest input up to
//!                 the end of the map)
//!    224  3872  reserved, zero
//!   4096     …  overlay with a chain: the chain section, bottom layer
//!                 first, per layer: content digest (32), path length
//!                 (u32 LE), absolute path (bytes)
//!   map offset  block-state map; block i's data at data offset + i * 4096
//!  data end     live map region, while the live map flag is set (below)
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
//!
//! The live map flag (byte 92) is outside the CRC for the same reason as
//! the clean flag. ociblk releases before it refuse a file that sets it
//! ("reserved header byte 92 is not zero"): they would lose the writes
//! only the live map holds. A clean close clears it.
//!
//! # The live map region
//! Every server keeps its block states in a shared file mapping of a
//! region after the data area (at `data offset + blocks * 4096`), so that
//! each state it publishes is in the page cache at once and outlives the
//! process. The page cache does not outlive the host, and the kernel
//! writes these pages back whenever it likes (before the data they
//! describe is durable), so the region is believed only by a server of
//! the same boot of the host:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "OCIBLKLM"
//!      8     4  live format version (u32 LE) = 1
//!     12     4  reserved, zero
//!     16    16  boot id of the host that wrote it
//!                 (/proc/sys/kernel/random/boot_id)
//!     32     8  map length (u64 LE), the header's
//!     40     4  CRC32 of bytes 0..40
//!     44  4052  reserved, zero
//!   4096     …  the live map: one state byte per block, as the map
//! ```
//!
//! After an unclean close, an open whose host has the recorded boot id
//! takes the live map as the block states (the process died, the page
//! cache kept every state and every data block it wrote). Any other open
//! uses the map above, written at flushes only: after a host crash each
//! block reads as of the last flush or as written since.
//!
//! An overlay without a chain is still written as version 1, which every
//! ociblk reads. Version 2 is written only for an overlay over layers and
//! for a layer: an ociblk that reads only version 1 refuses it ("format
//! version 2"), rather than serving the base disk without the layers.
//!
//! # Layer digests
//! A layer's content digest is the sha256 of, in this order:
//!
//! ```text
//! "ociblk layer v1\n"            16 bytes
//! disk size                      u64 LE
//! block size                     u32 LE
//! fingerprint                    32 bytes
//! has parent                     1 byte (0 or 1)
//! parent digest                  32 bytes (zero without a parent)
//! map length                     u64 LE
//! the map                        map length bytes
//! each Data block, ascending     its bytes within the disk (4096, or
//!                                fewer for a partial last block)
//! ```
//!
//! None of the file's offsets enter it: the digest names the disk content
//! a layer adds, not how the file lays it out. The metadata digest is the
//! same hash stopped after the map; it is checked at every open (it costs
//! reading the map, which the open reads anyway), the content digest by
//! `ociblk overlay verify` (it reads every data block).

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
/// The newest format version: files with a chain or frozen layers.
pub const FORMAT_VERSION: u32 = 2;
/// The version of an overlay without layers, which older ociblk read too.
pub const FORMAT_VERSION_PLAIN: u32 = 1;
/// Most layers a chain may have (the merged index names a layer in a byte).
pub const MAX_CHAIN: usize = 64;
/// Longest layer path recorded in a chain.
pub const MAX_LAYER_PATH: usize = 4096;
/// Start of a layer's content digest input.
pub const DIGEST_DOMAIN: &[u8; 16] = b"ociblk layer v1\n";

const CRC_OFFSET: usize = 80;
pub(crate) const CLEAN_OFFSET: usize = 84;
/// Where the map checksum field (flag, padding, CRC32) starts.
pub(crate) const MAP_CRC_FIELD_OFFSET: usize = 85;
const MAP_CRC_OFFSET: usize = 88;
const RESERVED_START: usize = 92;
/// The live map flag, outside the header CRC.
pub(crate) const LIVE_FLAG_OFFSET: usize = 92;
/// Version 2 fields, covered by the header CRC.
const V2_START: usize = 96;
const KIND_OFFSET: usize = 96;
const CHAIN_COUNT_OFFSET: usize = 100;
const CHAIN_BYTES_OFFSET: usize = 104;
const CHAIN_CRC_OFFSET: usize = 112;
const HAS_PARENT_OFFSET: usize = 116;
const DIGEST_OFFSET: usize = 128;
const PARENT_OFFSET: usize = 160;
const META_DIGEST_OFFSET: usize = 192;
const V2_END: usize = 224;

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
    #[error("chain section checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    ChainCrc { stored: u32, computed: u32 },
}

/// What a frozen layer's header records about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerFields {
    /// Content digest: what names the layer (see the module docs).
    pub digest: [u8; 32],
    /// The content digest of the layer below it, if any.
    pub parent: Option<[u8; 32]>,
    /// Digest of the same input stopped after the map.
    pub meta_digest: [u8; 32],
}

/// What kind of file a header describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A node's overlay, over `chain_len` layers (0: over the base disk).
    Overlay {
        chain_len: u32,
        /// Bytes of the chain section at [`HEADER_SIZE`].
        chain_bytes: u64,
        chain_crc: u32,
    },
    /// A frozen, immutable layer.
    Layer(LayerFields),
}

/// One layer of a chain as an overlay records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    pub digest: [u8; 32],
    /// Absolute path, as bytes.
    pub path: Vec<u8>,
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
    /// A live map region follows the data area (see the module docs).
    pub live: bool,
    pub kind: Kind,
}

/// Number of 4 KiB blocks covering `disk_size` bytes.
pub fn block_count(disk_size: u64) -> u64 {
    disk_size.div_ceil(BLOCK_SIZE)
}

impl Header {
    /// The header of a fresh overlay for a disk of `disk_size` bytes.
    /// `disk_size` must be valid (see [`check_disk_size`]).
    pub fn new(disk_size: u64, fingerprint: [u8; 32]) -> Self {
        Self::with_kind(
            disk_size,
            fingerprint,
            Kind::Overlay {
                chain_len: 0,
                chain_bytes: 0,
                chain_crc: 0,
            },
        )
    }

    /// The header of a fresh file of `kind`; the map follows the chain
    /// section, if any.
    pub fn with_kind(disk_size: u64, fingerprint: [u8; 32], kind: Kind) -> Self {
        let chain_bytes = match kind {
            Kind::Overlay { chain_bytes, .. } => chain_bytes,
            Kind::Layer(_) => 0,
        };
        let map_offset = HEADER_SIZE as u64 + chain_bytes.next_multiple_of(BLOCK_SIZE);
        let map_len = block_count(disk_size);
        Header {
            disk_size,
            fingerprint,
            map_offset,
            map_len,
            data_offset: (map_offset + map_len).next_multiple_of(DATA_ALIGN),
            clean: true,
            map_crc: None,
            live: false,
            kind,
        }
    }

    /// The version this header is written as: 1 unless it needs 2.
    pub fn version(&self) -> u32 {
        match self.kind {
            Kind::Overlay { chain_len: 0, .. } => FORMAT_VERSION_PLAIN,
            _ => FORMAT_VERSION,
        }
    }

    /// The layer fields, for a frozen layer.
    pub fn layer(&self) -> Option<&LayerFields> {
        match &self.kind {
            Kind::Layer(l) => Some(l),
            Kind::Overlay { .. } => None,
        }
    }

    /// Layers below an overlay (0 for a layer, which records only its parent).
    pub fn chain_len(&self) -> usize {
        match self.kind {
            Kind::Overlay { chain_len, .. } => chain_len as usize,
            Kind::Layer(_) => 0,
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

    /// Where the live map region starts: right after the data area.
    pub fn live_offset(&self) -> u64 {
        self.file_len()
    }

    /// Where the live map itself starts, after the live header.
    pub fn live_map_offset(&self) -> u64 {
        self.live_offset() + LIVE_HEADER_SIZE as u64
    }

    /// End of the live map region: the file's length while it has one.
    pub fn live_end(&self) -> u64 {
        self.live_map_offset() + self.map_len.next_multiple_of(BLOCK_SIZE)
    }

    /// The 4 KiB header block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        let version = self.version();
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        b[24..56].copy_from_slice(&self.fingerprint);
        b[56..64].copy_from_slice(&self.map_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.map_len.to_le_bytes());
        b[72..80].copy_from_slice(&self.data_offset.to_le_bytes());
        match &self.kind {
            Kind::Overlay {
                chain_len,
                chain_bytes,
                chain_crc,
            } => {
                b[CHAIN_COUNT_OFFSET..CHAIN_COUNT_OFFSET + 4]
                    .copy_from_slice(&chain_len.to_le_bytes());
                b[CHAIN_BYTES_OFFSET..CHAIN_BYTES_OFFSET + 8]
                    .copy_from_slice(&chain_bytes.to_le_bytes());
                b[CHAIN_CRC_OFFSET..CHAIN_CRC_OFFSET + 4].copy_from_slice(&chain_crc.to_le_bytes());
            }
            Kind::Layer(l) => {
                b[KIND_OFFSET] = 1;
                b[DIGEST_OFFSET..DIGEST_OFFSET + 32].copy_from_slice(&l.digest);
                if let Some(p) = &l.parent {
                    b[HAS_PARENT_OFFSET] = 1;
                    b[PARENT_OFFSET..PARENT_OFFSET + 32].copy_from_slice(p);
                }
                b[META_DIGEST_OFFSET..META_DIGEST_OFFSET + 32].copy_from_slice(&l.meta_digest);
            }
        }
        let crc = header_crc(&b, version);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        b[CLEAN_OFFSET] = u8::from(self.clean);
        b[MAP_CRC_FIELD_OFFSET..RESERVED_START].copy_from_slice(&encode_map_crc(self.map_crc));
        b[LIVE_FLAG_OFFSET] = u8::from(self.live);
        b
    }
}

/// The header CRC: of bytes 0..80, and in version 2 also of 96..4096.
fn header_crc(b: &[u8], version: u32) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..CRC_OFFSET]);
    if version >= FORMAT_VERSION {
        h.update(&b[V2_START..HEADER_SIZE]);
    }
    h.finalize()
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
    if version != FORMAT_VERSION && version != FORMAT_VERSION_PLAIN {
        return Err(FormatError::Version(version));
    }
    let stored = u32_at(b, CRC_OFFSET);
    let computed = header_crc(b, version);
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
    let kind = parse_kind(b, version)?;
    let chain_end = match kind {
        Kind::Overlay { chain_bytes, .. } => HEADER_SIZE as u64 + chain_bytes,
        Kind::Layer(_) => HEADER_SIZE as u64,
    };
    if map_offset < chain_end || !map_offset.is_multiple_of(BLOCK_SIZE) {
        return Err(FormatError::Invalid(format!(
            "map offset {map_offset} is not a 4 KiB boundary after the header and chain \
             (which end at {chain_end})"
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
    let live = match (b[LIVE_FLAG_OFFSET], &kind) {
        (0, _) => false,
        (1, Kind::Overlay { .. }) => true,
        (1, Kind::Layer(_)) => {
            return Err(FormatError::Invalid(
                "a layer's header has the live map flag set".into(),
            ));
        }
        (v, _) => {
            return Err(FormatError::Invalid(format!(
                "live map flag {v} is not 0 or 1"
            )));
        }
    };
    let v2_reserved = if version == FORMAT_VERSION {
        (KIND_OFFSET + 1..CHAIN_COUNT_OFFSET)
            .chain(HAS_PARENT_OFFSET + 1..DIGEST_OFFSET)
            .chain(V2_END..HEADER_SIZE)
            .collect::<Vec<_>>()
    } else {
        (V2_START..HEADER_SIZE).collect()
    };
    let reserved = (MAP_CRC_FIELD_OFFSET + 1..MAP_CRC_OFFSET)
        .chain(LIVE_FLAG_OFFSET + 1..V2_START)
        .chain(v2_reserved);
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
        live,
        kind,
    })
}

/// Decodes the version 2 fields; a version 1 file is an overlay without
/// a chain.
fn parse_kind(b: &[u8], version: u32) -> Result<Kind, FormatError> {
    if version == FORMAT_VERSION_PLAIN {
        return Ok(Kind::Overlay {
            chain_len: 0,
            chain_bytes: 0,
            chain_crc: 0,
        });
    }
    let digest_at = |at: usize| {
        let mut d = [0u8; 32];
        d.copy_from_slice(&b[at..at + 32]);
        d
    };
    match b[KIND_OFFSET] {
        0 => {
            let chain_len = u32_at(b, CHAIN_COUNT_OFFSET);
            let chain_bytes = u64_at(b, CHAIN_BYTES_OFFSET);
            if chain_len == 0 || chain_len as usize > MAX_CHAIN {
                return Err(FormatError::Invalid(format!(
                    "chain of {chain_len} layers: a version 2 overlay has 1 to {MAX_CHAIN}"
                )));
            }
            if chain_bytes > max_chain_bytes(chain_len as usize) {
                return Err(FormatError::Invalid(format!(
                    "chain section of {chain_bytes} bytes is too long for {chain_len} layers"
                )));
            }
            if b[HAS_PARENT_OFFSET..V2_END].iter().any(|&v| v != 0) {
                return Err(FormatError::Invalid(
                    "an overlay's header has layer fields set".into(),
                ));
            }
            Ok(Kind::Overlay {
                chain_len,
                chain_bytes,
                chain_crc: u32_at(b, CHAIN_CRC_OFFSET),
            })
        }
        1 => {
            if b[CHAIN_COUNT_OFFSET..HAS_PARENT_OFFSET]
                .iter()
                .any(|&v| v != 0)
            {
                return Err(FormatError::Invalid(
                    "a layer's header has chain fields set".into(),
                ));
            }
            let parent = match b[HAS_PARENT_OFFSET] {
                0 if b[PARENT_OFFSET..PARENT_OFFSET + 32].iter().all(|&v| v == 0) => None,
                0 => {
                    return Err(FormatError::Invalid(
                        "parent digest set but not marked present".into(),
                    ));
                }
                1 => Some(digest_at(PARENT_OFFSET)),
                v => {
                    return Err(FormatError::Invalid(format!(
                        "parent flag {v} is not 0 or 1"
                    )));
                }
            };
            Ok(Kind::Layer(LayerFields {
                digest: digest_at(DIGEST_OFFSET),
                parent,
                meta_digest: digest_at(META_DIGEST_OFFSET),
            }))
        }
        v => Err(FormatError::Invalid(format!("file kind {v} is not 0 or 1"))),
    }
}

fn max_chain_bytes(layers: usize) -> u64 {
    (layers * (32 + 4 + MAX_LAYER_PATH)) as u64
}

/// Encodes a chain section (bottom layer first).
pub fn encode_chain(chain: &[ChainEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in chain {
        b.extend_from_slice(&e.digest);
        b.extend_from_slice(&(e.path.len() as u32).to_le_bytes());
        b.extend_from_slice(&e.path);
    }
    b
}

/// Decodes a chain section of `count` entries whose CRC32 is `crc`.
pub fn parse_chain(b: &[u8], count: u32, crc: u32) -> Result<Vec<ChainEntry>, FormatError> {
    let computed = crc32fast::hash(b);
    if computed != crc {
        return Err(FormatError::ChainCrc {
            stored: crc,
            computed,
        });
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = 0usize;
    let truncated = |i: u32| FormatError::Invalid(format!("chain entry {i} is truncated"));
    for i in 0..count {
        let head = b.get(pos..pos + 36).ok_or_else(|| truncated(i))?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&head[..32]);
        let len = u32_at(head, 32) as usize;
        if len == 0 || len > MAX_LAYER_PATH {
            return Err(FormatError::Invalid(format!(
                "chain entry {i} has a path of {len} bytes"
            )));
        }
        let path = b
            .get(pos + 36..pos + 36 + len)
            .ok_or_else(|| truncated(i))?;
        if path[0] != b'/' || path.contains(&0) {
            return Err(FormatError::Invalid(format!(
                "chain entry {i}'s path is not absolute"
            )));
        }
        out.push(ChainEntry {
            digest,
            path: path.to_vec(),
        });
        pos += 36 + len;
    }
    if pos != b.len() {
        return Err(FormatError::Invalid(format!(
            "chain section has {} bytes after its {count} entries",
            b.len() - pos
        )));
    }
    Ok(out)
}

/// The digest input a layer's metadata digest covers: everything before
/// the data of its Data blocks (see the module docs).
pub fn digest_prefix(
    disk_size: u64,
    fingerprint: &[u8; 32],
    parent: Option<&[u8; 32]>,
    map_len: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 8 + 4 + 32 + 1 + 32 + 8);
    b.extend_from_slice(DIGEST_DOMAIN);
    b.extend_from_slice(&disk_size.to_le_bytes());
    b.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    b.extend_from_slice(fingerprint);
    b.push(u8::from(parent.is_some()));
    b.extend_from_slice(parent.unwrap_or(&[0u8; 32]));
    b.extend_from_slice(&map_len.to_le_bytes());
    b
}

/// Bytes of the live header that starts the live map region.
pub const LIVE_HEADER_SIZE: usize = 4096;
pub const LIVE_MAGIC: [u8; 8] = *b"OCIBLKLM";
const LIVE_VERSION: u32 = 1;
const LIVE_CRC_OFFSET: usize = 40;
/// The live header's fields and CRC; the rest of its 4 KiB is zero.
pub const LIVE_HEADER_USED: usize = 44;

/// What a live header records (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveHeader {
    /// The boot of the host whose page cache the live map is valid in.
    pub boot_id: [u8; 16],
    pub map_len: u64,
}

impl LiveHeader {
    /// The used bytes of the live header; the rest of it is zero.
    pub fn encode(&self) -> [u8; LIVE_HEADER_USED] {
        let mut b = [0u8; LIVE_HEADER_USED];
        b[0..8].copy_from_slice(&LIVE_MAGIC);
        b[8..12].copy_from_slice(&LIVE_VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.boot_id);
        b[32..40].copy_from_slice(&self.map_len.to_le_bytes());
        let crc = crc32fast::hash(&b[..LIVE_CRC_OFFSET]);
        b[LIVE_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Parses the start of a live header. Anything but a whole, checksummed
/// version 1 header is an error: the caller then does not use the live map.
pub fn parse_live_header(b: &[u8]) -> Result<LiveHeader, FormatError> {
    if b.len() < LIVE_HEADER_USED {
        return Err(FormatError::Truncated {
            what: "live header",
            need: LIVE_HEADER_USED as u64,
            have: b.len() as u64,
        });
    }
    if b[0..8] != LIVE_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let stored = u32_at(b, LIVE_CRC_OFFSET);
    let computed = crc32fast::hash(&b[..LIVE_CRC_OFFSET]);
    if stored != computed {
        return Err(FormatError::Crc { stored, computed });
    }
    let version = u32_at(b, 8);
    if version != LIVE_VERSION {
        return Err(FormatError::Version(version));
    }
    if u32_at(b, 12) != 0 {
        return Err(FormatError::Invalid(
            "reserved live header bytes are not zero".into(),
        ));
    }
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&b[16..32]);
    Ok(LiveHeader {
        boot_id,
        map_len: u64_at(b, 32),
    })
}

/// Decodes the block-state map, rejecting unknown state bytes.
pub fn parse_map(b: &[u8]) -> Result<Vec<AtomicU8>, FormatError> {
    let mut out = Vec::with_capacity(b.len());
    decode_map(b, 0, &mut out)?;
    Ok(out)
}

/// Checks that every byte of map bytes `b`, which start at block `first`,
/// is a [`BlockState`].
pub(crate) fn check_states(b: &[u8], first: u64) -> Result<(), FormatError> {
    // A maximum, not a search: it runs at memory speed. The bad entry is
    // looked for only when there is one.
    let highest = b.iter().fold(0u8, |m, &v| m.max(v));
    if BlockState::from_u8(highest).is_some() {
        return Ok(());
    }
    match b
        .iter()
        .enumerate()
        .find(|&(_, &v)| BlockState::from_u8(v).is_none())
    {
        Some((i, &value)) => Err(FormatError::BadState {
            block: first + i as u64,
            value,
        }),
        None => Ok(()),
    }
}

/// Appends the states of map bytes `b`, which start at block `first`.
pub(crate) fn decode_map(b: &[u8], first: u64, out: &mut Vec<AtomicU8>) -> Result<(), FormatError> {
    check_states(b, first)?;
    out.extend(b.iter().map(|&v| AtomicU8::new(v)));
    Ok(())
}

/// Adds the blocks of map bytes `b` (starting at block `first`) to
/// `counts`.
pub(crate) fn count_states(
    b: &[u8],
    first: u64,
    counts: &mut StateCounts,
) -> Result<(), FormatError> {
    check_states(b, first)?;
    let data = count_byte(b, BlockState::Data as u8);
    let zero = count_byte(b, BlockState::Zero as u8);
    counts.data += data;
    counts.zero += zero;
    counts.base += b.len() as u64 - data - zero;
    Ok(())
}

/// How many bytes of `b` are `v`: counted in a byte per run of 255, a
/// loop that vectorizes over whole vector registers (a count in a wider
/// type spends most of them widening).
fn count_byte(b: &[u8], v: u8) -> u64 {
    b.chunks(255)
        .map(|run| u64::from(run.iter().fold(0u8, |n, &x| n + u8::from(x == v))))
        .sum()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
