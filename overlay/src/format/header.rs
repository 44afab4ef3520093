//! The 4 KiB header that starts every overlay and layer file: its bytes
//! as a typed struct ([`RawHeader`], laid out as the table in the
//! [format docs](super)), and the decoded [`Header`] it is parsed into and
//! encoded from.

use std::mem::offset_of;

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::chain::max_chain_bytes;
use super::live::LIVE_HEADER_SIZE;
use super::{BLOCK_SIZE, FormatError, MAX_CHAIN};

/// Bytes reserved for the header at the start of the file.
pub const HEADER_SIZE: usize = 4096;
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

/// The header's bytes, field by field.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    block_size: U32,
    disk_size: U64,
    fingerprint: [u8; 32],
    map_offset: U64,
    map_len: U64,
    data_offset: U64,
    /// CRC32 of the bytes before it and, in version 2, of `v2`.
    crc: U32,
    /// Outside the CRC, so that a one-byte write flips it.
    clean: u8,
    /// Outside the CRC, written just before the clean flag is set.
    map_crc: MapCrcField,
    /// Outside the CRC, like the clean flag.
    live: u8,
    reserved_93: [u8; 3],
    /// All zero in version 1.
    v2: RawV2,
}

/// The map checksum field: whether one is recorded, and which.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct MapCrcField {
    recorded: u8,
    reserved: [u8; 2],
    crc: U32,
}

/// The version 2 fields, covered by the header CRC.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawV2 {
    /// 0: overlay, 1: frozen layer.
    kind: u8,
    reserved_97: [u8; 3],
    /// An overlay's; zero in a layer.
    chain: RawChainFields,
    /// A layer's; zero in an overlay.
    layer: RawLayerFields,
    reserved_224: [u8; HEADER_SIZE - 224],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawChainFields {
    len: U32,
    bytes: U64,
    crc: U32,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLayerFields {
    has_parent: u8,
    reserved_117: [u8; 11],
    digest: [u8; 32],
    parent: [u8; 32],
    meta_digest: [u8; 32],
}

const CRC_OFFSET: usize = offset_of!(RawHeader, crc);
pub(crate) const CLEAN_OFFSET: usize = offset_of!(RawHeader, clean);
/// Where the map checksum field (flag, padding, CRC32) starts.
pub(crate) const MAP_CRC_FIELD_OFFSET: usize = offset_of!(RawHeader, map_crc);
/// The live map flag, outside the header CRC.
pub(crate) const LIVE_FLAG_OFFSET: usize = offset_of!(RawHeader, live);

// The byte format, as the table in the format docs gives it.
const _: () = {
    assert!(size_of::<RawHeader>() == HEADER_SIZE);
    assert!(offset_of!(RawHeader, version) == 8);
    assert!(offset_of!(RawHeader, block_size) == 12);
    assert!(offset_of!(RawHeader, disk_size) == 16);
    assert!(offset_of!(RawHeader, fingerprint) == 24);
    assert!(offset_of!(RawHeader, map_offset) == 56);
    assert!(offset_of!(RawHeader, map_len) == 64);
    assert!(offset_of!(RawHeader, data_offset) == 72);
    assert!(CRC_OFFSET == 80);
    assert!(CLEAN_OFFSET == 84);
    assert!(MAP_CRC_FIELD_OFFSET == 85);
    assert!(offset_of!(RawHeader, map_crc.reserved) == 86);
    assert!(offset_of!(RawHeader, map_crc.crc) == 88);
    assert!(LIVE_FLAG_OFFSET == 92);
    assert!(offset_of!(RawHeader, reserved_93) == 93);
    assert!(offset_of!(RawHeader, v2.kind) == 96);
    assert!(offset_of!(RawHeader, v2.reserved_97) == 97);
    assert!(offset_of!(RawHeader, v2.chain.len) == 100);
    assert!(offset_of!(RawHeader, v2.chain.bytes) == 104);
    assert!(offset_of!(RawHeader, v2.chain.crc) == 112);
    assert!(offset_of!(RawHeader, v2.layer.has_parent) == 116);
    assert!(offset_of!(RawHeader, v2.layer.reserved_117) == 117);
    assert!(offset_of!(RawHeader, v2.layer.digest) == 128);
    assert!(offset_of!(RawHeader, v2.layer.parent) == 160);
    assert!(offset_of!(RawHeader, v2.layer.meta_digest) == 192);
    assert!(offset_of!(RawHeader, v2.reserved_224) == 224);
};

/// What a frozen layer's header records about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerFields {
    /// Content digest: what names the layer (see the format docs).
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
    /// A live map region follows the data area (see the format docs).
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
        let version = self.version();
        let mut raw = RawHeader::new_zeroed();
        raw.magic = MAGIC;
        raw.version = U32::new(version);
        raw.block_size = U32::new(BLOCK_SIZE as u32);
        raw.disk_size = U64::new(self.disk_size);
        raw.fingerprint = self.fingerprint;
        raw.map_offset = U64::new(self.map_offset);
        raw.map_len = U64::new(self.map_len);
        raw.data_offset = U64::new(self.data_offset);
        match &self.kind {
            Kind::Overlay {
                chain_len,
                chain_bytes,
                chain_crc,
            } => {
                raw.v2.chain = RawChainFields {
                    len: U32::new(*chain_len),
                    bytes: U64::new(*chain_bytes),
                    crc: U32::new(*chain_crc),
                };
            }
            Kind::Layer(l) => {
                raw.v2.kind = 1;
                raw.v2.layer.digest = l.digest;
                if let Some(p) = l.parent {
                    raw.v2.layer.has_parent = 1;
                    raw.v2.layer.parent = p;
                }
                raw.v2.layer.meta_digest = l.meta_digest;
            }
        }
        raw.crc = U32::new(raw.crc(version));
        raw.clean = u8::from(self.clean);
        raw.map_crc = MapCrcField::new(self.map_crc);
        raw.live = u8::from(self.live);
        raw.as_bytes().to_vec()
    }
}

impl MapCrcField {
    fn new(crc: Option<u32>) -> Self {
        MapCrcField {
            recorded: u8::from(crc.is_some()),
            reserved: [0; 2],
            crc: U32::new(crc.unwrap_or(0)),
        }
    }
}

/// The map checksum field, bytes 85..92 of the header.
pub(crate) fn encode_map_crc(crc: Option<u32>) -> [u8; size_of::<MapCrcField>()] {
    zerocopy::transmute!(MapCrcField::new(crc))
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

/// Parses and validates the first 4 KiB of an overlay file.
///
/// Checks, in order: length, magic, version (before the CRC, so that a
/// newer format reports its version rather than a checksum error), CRC,
/// block size, disk size, the version 2 fields, map and data placement,
/// clean flag, map checksum and live map flags, reserved bytes.
pub fn parse_header(b: &[u8]) -> Result<Header, FormatError> {
    let (raw, _) = RawHeader::ref_from_prefix(b).map_err(|_| FormatError::Truncated {
        what: "header",
        need: HEADER_SIZE as u64,
        have: b.len() as u64,
    })?;
    let version = raw.check_version()?;
    let block_size = raw.block_size.get();
    if u64::from(block_size) != BLOCK_SIZE {
        return Err(FormatError::Invalid(format!(
            "block size {block_size}, expected {BLOCK_SIZE}"
        )));
    }
    let disk_size = raw.disk_size.get();
    check_disk_size(disk_size)?;
    let kind = raw.v2.kind(version)?;
    raw.check_placement(&kind, disk_size)?;
    let clean = flag(raw.clean, "clean flag")?;
    let map_crc = flag(raw.map_crc.recorded, "map checksum flag")?.then(|| raw.map_crc.crc.get());
    let live = flag(raw.live, "live map flag")?;
    if live && matches!(kind, Kind::Layer(_)) {
        return Err(FormatError::Invalid(
            "a layer's header has the live map flag set".into(),
        ));
    }
    if map_crc.is_none() && raw.map_crc.crc.get() != 0 {
        return Err(FormatError::Invalid(
            "map checksum bytes are set but not marked recorded".into(),
        ));
    }
    raw.check_reserved(version)?;
    Ok(Header {
        disk_size,
        fingerprint: raw.fingerprint,
        map_offset: raw.map_offset.get(),
        map_len: raw.map_len.get(),
        data_offset: raw.data_offset.get(),
        clean,
        map_crc,
        live,
        kind,
    })
}

/// A one-byte flag: 0 or 1.
fn flag(v: u8, what: &str) -> Result<bool, FormatError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(FormatError::Invalid(format!("{what} {v} is not 0 or 1"))),
    }
}

impl RawHeader {
    /// The header CRC: of bytes 0..80, and in version 2 also of 96..4096.
    fn crc(&self, version: u32) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.as_bytes()[..CRC_OFFSET]);
        if version >= FORMAT_VERSION {
            h.update(self.v2.as_bytes());
        }
        h.finalize()
    }

    /// Checks the magic, the version and the CRC; returns the version.
    fn check_version(&self) -> Result<u32, FormatError> {
        if self.magic != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = self.version.get();
        if version != FORMAT_VERSION && version != FORMAT_VERSION_PLAIN {
            return Err(FormatError::Version(version));
        }
        let stored = self.crc.get();
        let computed = self.crc(version);
        if stored != computed {
            return Err(FormatError::Crc { stored, computed });
        }
        Ok(version)
    }

    /// Checks where the map and the data area lie, for a disk of
    /// `disk_size` bytes.
    fn check_placement(&self, kind: &Kind, disk_size: u64) -> Result<(), FormatError> {
        let map_offset = self.map_offset.get();
        let map_len = self.map_len.get();
        let data_offset = self.data_offset.get();
        let blocks = block_count(disk_size);
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
        let map_end = map_offset.checked_add(map_len).ok_or_else(|| {
            FormatError::Invalid(format!("map offset {map_offset} is out of range"))
        })?;
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
        Ok(())
    }

    /// Checks that every reserved byte is zero: in version 1 all of the
    /// version 2 fields are.
    fn check_reserved(&self, version: u32) -> Result<(), FormatError> {
        let mut reserved: Vec<(usize, &[u8])> = vec![
            (
                offset_of!(RawHeader, map_crc.reserved),
                &self.map_crc.reserved,
            ),
            (offset_of!(RawHeader, reserved_93), &self.reserved_93),
        ];
        if version == FORMAT_VERSION {
            reserved.extend([
                (
                    offset_of!(RawHeader, v2.reserved_97),
                    &self.v2.reserved_97[..],
                ),
                (
                    offset_of!(RawHeader, v2.layer.reserved_117),
                    &self.v2.layer.reserved_117[..],
                ),
                (
                    offset_of!(RawHeader, v2.reserved_224),
                    &self.v2.reserved_224[..],
                ),
            ]);
        } else {
            reserved.push((offset_of!(RawHeader, v2), self.v2.as_bytes()));
        }
        for (at, bytes) in reserved {
            if let Some(i) = bytes.iter().position(|&v| v != 0) {
                return Err(FormatError::Invalid(format!(
                    "reserved header byte {} is not zero",
                    at + i
                )));
            }
        }
        Ok(())
    }
}

impl RawV2 {
    /// Decodes the version 2 fields; a version 1 file is an overlay
    /// without a chain.
    fn kind(&self, version: u32) -> Result<Kind, FormatError> {
        if version == FORMAT_VERSION_PLAIN {
            return Ok(Kind::Overlay {
                chain_len: 0,
                chain_bytes: 0,
                chain_crc: 0,
            });
        }
        match self.kind {
            0 => self.overlay_kind(),
            1 => self.layer_kind(),
            v => Err(FormatError::Invalid(format!("file kind {v} is not 0 or 1"))),
        }
    }

    fn overlay_kind(&self) -> Result<Kind, FormatError> {
        let chain_len = self.chain.len.get();
        let chain_bytes = self.chain.bytes.get();
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
        if self.layer.as_bytes().iter().any(|&v| v != 0) {
            return Err(FormatError::Invalid(
                "an overlay's header has layer fields set".into(),
            ));
        }
        Ok(Kind::Overlay {
            chain_len,
            chain_bytes,
            chain_crc: self.chain.crc.get(),
        })
    }

    fn layer_kind(&self) -> Result<Kind, FormatError> {
        if self.chain.as_bytes().iter().any(|&v| v != 0) {
            return Err(FormatError::Invalid(
                "a layer's header has chain fields set".into(),
            ));
        }
        let layer = &self.layer;
        let parent = match layer.has_parent {
            0 if layer.parent == [0; 32] => None,
            0 => {
                return Err(FormatError::Invalid(
                    "parent digest set but not marked present".into(),
                ));
            }
            1 => Some(layer.parent),
            v => {
                return Err(FormatError::Invalid(format!(
                    "parent flag {v} is not 0 or 1"
                )));
            }
        };
        Ok(Kind::Layer(LayerFields {
            digest: layer.digest,
            parent,
            meta_digest: layer.meta_digest,
        }))
    }
}
