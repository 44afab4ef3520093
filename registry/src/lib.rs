//! `ociblk-registry` reads OS images from an OCI registry (distribution API
//! v2) into a content-addressed host cache, payload chunk by payload chunk,
//! each chunk verified against its sha256 before it is stored.
//!
//! - [`ImageSource::parse`] decides whether an argument is a local layout
//!   or a registry [`Reference`].
//! - [`RegistryImage::open`] resolves a tag to its manifest digest once,
//!   fetches (or takes from the [`Cache`]) manifest and config, verified by
//!   digest and size, and works offline when everything is cached.
//! - [`BlobCache::ensure_chunk`] makes one payload chunk present in the
//!   cached sparse file [`BlobCache::path`], fetching it with a `Range`
//!   request when needed.
//! - [`Cache::info`] and [`Cache::gc`] report and bound the cache.
//! - [`AccessRecord`] lists the chunks a guest read, in order, for
//!   prefetching them on a later start.
//!
//! The cache layout and its locking are described in [`cache`].

pub mod access_record;
pub mod cache;
pub mod challenge;
pub mod client;
pub mod credentials;
pub mod digest;
pub mod error;
pub mod fetch;
pub mod image;
pub mod limiter;
pub mod mirrors;
pub mod options;
pub mod reference;
pub mod retry;
pub mod source;
pub mod sources;
pub mod tls;

pub use access_record::{AccessRecord, ChunkRef};
pub use cache::{BlobCache, BlobSpec, Cache, CacheInfo, GcReport};
pub use digest::{ChunkHashes, Digest};
pub use error::{Error, Result};
pub use fetch::FetchStats;
pub use image::{Layer, Manifest, RegistryImage};
pub use options::Options;
pub use reference::Reference;
pub use source::ImageSource;
