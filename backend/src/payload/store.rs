//! Where payload chunks come from: the bottom of the payload store.

use std::fmt;
use std::ops::Range;

use ociblk_registry::limiter::Priority;

use super::error::PayloadError;
use super::table::Blob;

/// The source of a payload's chunks, keyed by the blob's digest: a local
/// image directory ([`LocalBlobs`]) or the registry cache
/// ([`CachedBlobs`](super::CachedBlobs)). The layers above it
/// ([`Payloads`](super::Payloads)) verify and record.
pub trait ChunkStore: Send + Sync + fmt::Debug {
    /// Makes chunks `chunks` of payload `blob` present in its file, fetching
    /// missing ones at `priority`. Returns the chunks this call fetched:
    /// each was checked against its hash on its way in, and a stored chunk
    /// is never rewritten.
    fn ensure(
        &self,
        blob: &Blob,
        chunks: Range<u64>,
        priority: Priority,
    ) -> Result<Vec<u64>, PayloadError>;

    /// Drops chunk `c` of `blob`, present but not matching its hash (torn
    /// by a crash), so that the next [`ChunkStore::ensure`] fetches it
    /// again. `false`: this store has nowhere to fetch it from.
    fn forget(&self, blob: &Blob, c: u64) -> Result<bool, PayloadError>;

    /// Whether chunks may be missing and fetched (a prefetch then has
    /// something to do even without verification).
    fn fetches(&self) -> bool;
}

/// An OCI image layout directory: every chunk is present, none is fetched.
#[derive(Debug, Default)]
pub struct LocalBlobs;

impl ChunkStore for LocalBlobs {
    fn ensure(&self, _: &Blob, _: Range<u64>, _: Priority) -> Result<Vec<u64>, PayloadError> {
        Ok(Vec::new())
    }

    fn forget(&self, _: &Blob, _: u64) -> Result<bool, PayloadError> {
        Ok(false)
    }

    fn fetches(&self) -> bool {
        false
    }
}
