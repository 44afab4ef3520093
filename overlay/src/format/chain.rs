//! The chain section of an overlay over layers: at [`HEADER_SIZE`], per
//! layer, bottom first, its content digest, its path's length and its
//! absolute path.
//!
//! [`HEADER_SIZE`]: super::HEADER_SIZE

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::FormatError;

/// Most layers a chain may have (the merged index names a layer in a byte).
pub const MAX_CHAIN: usize = 64;
/// Longest layer path recorded in a chain.
pub const MAX_LAYER_PATH: usize = 4096;

/// One layer of a chain as an overlay records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    pub digest: [u8; 32],
    /// Absolute path, as bytes.
    pub path: Vec<u8>,
}

/// The fixed start of an entry; the path's bytes follow it.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawEntryHead {
    digest: [u8; 32],
    path_len: U32,
}

const _: () = assert!(size_of::<RawEntryHead>() == 36);

/// Longest chain section of `layers` entries.
pub(super) fn max_chain_bytes(layers: usize) -> u64 {
    (layers * (size_of::<RawEntryHead>() + MAX_LAYER_PATH)) as u64
}

/// Encodes a chain section (bottom layer first).
pub fn encode_chain(chain: &[ChainEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in chain {
        let head = RawEntryHead {
            digest: e.digest,
            path_len: U32::new(e.path.len() as u32),
        };
        b.extend_from_slice(head.as_bytes());
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
    let mut rest = b;
    let truncated = |i: u32| FormatError::Invalid(format!("chain entry {i} is truncated"));
    for i in 0..count {
        let (head, after) = RawEntryHead::ref_from_prefix(rest).map_err(|_| truncated(i))?;
        let len = head.path_len.get() as usize;
        if len == 0 || len > MAX_LAYER_PATH {
            return Err(FormatError::Invalid(format!(
                "chain entry {i} has a path of {len} bytes"
            )));
        }
        let path = after.get(..len).ok_or_else(|| truncated(i))?;
        if path[0] != b'/' || path.contains(&0) {
            return Err(FormatError::Invalid(format!(
                "chain entry {i}'s path is not absolute"
            )));
        }
        out.push(ChainEntry {
            digest: head.digest,
            path: path.to_vec(),
        });
        rest = &after[len..];
    }
    if !rest.is_empty() {
        return Err(FormatError::Invalid(format!(
            "chain section has {} bytes after its {count} entries",
            rest.len()
        )));
    }
    Ok(out)
}
