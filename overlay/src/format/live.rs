//! The live header that starts the live map region after the data area
//! (see the format docs): which boot of the host the live map behind it is
//! valid in.

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::FormatError;

/// Bytes of the live header that starts the live map region.
pub const LIVE_HEADER_SIZE: usize = 4096;
pub const LIVE_MAGIC: [u8; 8] = *b"OCIBLKLM";
const LIVE_VERSION: u32 = 1;
/// The live header's fields and CRC; the rest of its 4 KiB is zero.
pub const LIVE_HEADER_USED: usize = size_of::<RawLiveHeader>();

/// The used bytes of the live header, field by field.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLiveHeader {
    magic: [u8; 8],
    version: U32,
    reserved: [u8; 4],
    boot_id: [u8; 16],
    map_len: U64,
    /// CRC32 of the bytes before it.
    crc: U32,
}

const LIVE_CRC_OFFSET: usize = std::mem::offset_of!(RawLiveHeader, crc);

// The byte format, as the table in the format docs gives it.
const _: () = {
    assert!(LIVE_HEADER_USED == 44);
    assert!(std::mem::offset_of!(RawLiveHeader, version) == 8);
    assert!(std::mem::offset_of!(RawLiveHeader, reserved) == 12);
    assert!(std::mem::offset_of!(RawLiveHeader, boot_id) == 16);
    assert!(std::mem::offset_of!(RawLiveHeader, map_len) == 32);
    assert!(LIVE_CRC_OFFSET == 40);
};

impl RawLiveHeader {
    fn crc(&self) -> u32 {
        crc32fast::hash(&self.as_bytes()[..LIVE_CRC_OFFSET])
    }
}

/// What a live header records (see the format docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveHeader {
    /// The boot of the host whose page cache the live map is valid in.
    pub boot_id: [u8; 16],
    pub map_len: u64,
}

impl LiveHeader {
    /// The used bytes of the live header; the rest of it is zero.
    pub fn encode(&self) -> [u8; LIVE_HEADER_USED] {
        let mut raw = RawLiveHeader {
            magic: LIVE_MAGIC,
            version: U32::new(LIVE_VERSION),
            reserved: [0; 4],
            boot_id: self.boot_id,
            map_len: U64::new(self.map_len),
            crc: U32::new(0),
        };
        raw.crc = U32::new(raw.crc());
        zerocopy::transmute!(raw)
    }
}

/// Parses the start of a live header. Anything but a whole, checksummed
/// version 1 header is an error: the caller then does not use the live map.
pub fn parse_live_header(b: &[u8]) -> Result<LiveHeader, FormatError> {
    let (raw, _) = RawLiveHeader::ref_from_prefix(b).map_err(|_| FormatError::Truncated {
        what: "live header",
        need: LIVE_HEADER_USED as u64,
        have: b.len() as u64,
    })?;
    if raw.magic != LIVE_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let stored = raw.crc.get();
    let computed = raw.crc();
    if stored != computed {
        return Err(FormatError::Crc { stored, computed });
    }
    let version = raw.version.get();
    if version != LIVE_VERSION {
        return Err(FormatError::Version(version));
    }
    if raw.reserved != [0; 4] {
        return Err(FormatError::Invalid(
            "reserved live header bytes are not zero".into(),
        ));
    }
    Ok(LiveHeader {
        boot_id: raw.boot_id,
        map_len: raw.map_len.get(),
    })
}
