//! ociblk: a vhost-user-blk server for computed Monogon OS node disks.
//!
//! The disk is computed by `ociblk-layout` from an OCI OS image; reads come
//! from the image's payload blobs, writes land in a per-node copy-on-write
//! overlay file.

pub mod cli;
pub mod export;
pub mod image_source;
pub mod node_disk;
pub mod payload;
pub mod prefetch;
