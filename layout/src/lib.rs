//! `ociblk-layout` computes the disk that Monogon's installer writes for a
//! test node — protective MBR, GPT, a FAT32 EFI system partition and raw
//! partitions — from an OCI OS image, as a sorted extent map whose data
//! extents point into the image's payload blobs.
//!
//! Computing a layout reads only the image's metadata; payload bytes are
//! read when the disk is read (see [`DiskReader`]).

pub mod chunk_hashes;
pub mod disk;
pub mod error;
pub mod extent;
pub mod fat32;
pub mod gpt;
pub mod guid;
pub mod image;
pub mod mbr;
pub mod reader;
pub mod size;

pub use disk::{DiskIds, DiskParams, Layout, Source};
pub use error::{Error, Result};
pub use extent::{Content, Extent, ExtentMap, Piece, Segment, SourceId};
pub use guid::Guid;
pub use image::{OsImage, Payload, ProductInfo};
pub use reader::DiskReader;
pub use size::parse_size;

/// Bytes per logical sector of the disk.
pub const SECTOR_SIZE: u64 = 512;
