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
//!
//! # Modules
//! One concept each, all re-exported here: `header` (the 4 KiB header as
//! a typed struct, and the decoded [`Header`]), `chain` (the chain
//! section), `map` (the block-state map's bytes), `live` (the live
//! header) and `digest` (a layer's digest input). Every fixed layout is a
//! `#[repr(C)]` struct of bytes and little-endian integers (`zerocopy`),
//! with its offsets asserted against the tables above at compile time.

mod chain;
mod digest;
mod header;
mod live;
mod map;

pub use chain::{ChainEntry, MAX_CHAIN, MAX_LAYER_PATH, encode_chain, parse_chain};
pub use digest::{DIGEST_DOMAIN, digest_prefix};
pub(crate) use header::{CLEAN_OFFSET, LIVE_FLAG_OFFSET, MAP_CRC_FIELD_OFFSET, encode_map_crc};
pub use header::{
    DATA_ALIGN, FORMAT_VERSION, FORMAT_VERSION_PLAIN, HEADER_SIZE, Header, Kind, LayerFields,
    MAGIC, MAX_DISK_SIZE, block_count, check_disk_size, parse_header,
};
pub use live::{LIVE_HEADER_SIZE, LIVE_HEADER_USED, LIVE_MAGIC, LiveHeader, parse_live_header};
#[cfg(test)]
pub(crate) use map::decode_map;
pub use map::{BlockState, parse_map};
pub(crate) use map::{check_states, count_states};

/// Size of one overlay block: the unit of copy-on-write.
pub const BLOCK_SIZE: u64 = 4096;

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

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
