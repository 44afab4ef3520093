//! The input a layer's digests start with (see the format docs): the
//! layer's disk, its parent and its map length, ahead of the map and the
//! data of its `Data` blocks.

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{Immutable, IntoBytes, KnownLayout, Unaligned};

use super::BLOCK_SIZE;

/// Start of a layer's content digest input.
pub const DIGEST_DOMAIN: &[u8; 16] = b"ociblk layer v1\n";

/// The digest input before the map, field by field.
#[derive(IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DigestPrefix {
    domain: [u8; 16],
    disk_size: U64,
    block_size: U32,
    fingerprint: [u8; 32],
    has_parent: u8,
    /// Zero without a parent.
    parent: [u8; 32],
    map_len: U64,
}

const _: () = assert!(size_of::<DigestPrefix>() == 16 + 8 + 4 + 32 + 1 + 32 + 8);

/// The digest input a layer's metadata digest covers: everything before
/// the data of its Data blocks (see the format docs).
pub fn digest_prefix(
    disk_size: u64,
    fingerprint: &[u8; 32],
    parent: Option<&[u8; 32]>,
    map_len: u64,
) -> [u8; size_of::<DigestPrefix>()] {
    zerocopy::transmute!(DigestPrefix {
        domain: *DIGEST_DOMAIN,
        disk_size: U64::new(disk_size),
        block_size: U32::new(BLOCK_SIZE as u32),
        fingerprint: *fingerprint,
        has_parent: u8::from(parent.is_some()),
        parent: parent.copied().unwrap_or([0; 32]),
        map_len: U64::new(map_len),
    })
}
