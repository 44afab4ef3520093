//! The verification layer: a payload chunk's bytes are served only once
//! they matched the image's chunk hash.
//!
//! A chunk the store fetched for this read was checked on its way into the
//! cache, and a stored chunk is never rewritten: it is verified without a
//! second hash. Any other chunk (a local blob's, or one an earlier process
//! cached, perhaps torn by a crash) is read whole and hashed at its first
//! use. A verified chunk is a set bit: later reads cost an atomic load per
//! chunk and take no lock. The stripe locks are taken only on a miss, so
//! that two queues touching the same new chunk hash it once.
//!
//! A mismatch leaves the chunk unverified: every later read tries again,
//! so a blob fixed on disk recovers without a restart. A cached chunk that
//! does not match is dropped from the cache and fetched once more. A blob
//! changed after its chunk was verified is not checked again.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ociblk_digest::ChunkHashes;
use ociblk_registry::limiter::Priority;
use sha2::{Digest as _, Sha256};
use tracing::warn;

use super::chunk_bits::ChunkBits;
use super::error::PayloadError;
use super::store::ChunkStore;
use super::table::{Blob, BlobTable};

/// Bytes read per `pread` while hashing a chunk: small enough to stay in
/// the CPU cache between the read and the hash.
const READ_PIECE: usize = 128 << 10;
/// Locks that serialise the hashing of new chunks (chunk index modulo this).
const STRIPES: usize = 16;

/// What verification knows of one payload.
#[derive(Debug)]
struct Checked {
    verified: ChunkBits,
    /// Chunks hashed, counting failures and re-checks.
    hashed: AtomicU64,
    stripes: [Mutex<()>; STRIPES],
}

/// Verification of every payload of a disk, by blob index.
#[derive(Debug)]
pub(crate) struct Verification(Vec<Option<Checked>>);

/// One payload's verification so far, for the server's closing log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerificationCounts {
    pub chunks: u64,
    pub verified: u64,
    pub hashed: u64,
}

impl Verification {
    pub(crate) fn new(blobs: &BlobTable) -> Self {
        Verification(
            blobs
                .iter()
                .map(|b| {
                    b.payload.as_ref().map(|p| Checked {
                        verified: ChunkBits::new(p.table.count()),
                        hashed: AtomicU64::new(0),
                        stripes: std::array::from_fn(|_| Mutex::new(())),
                    })
                })
                .collect(),
        )
    }

    pub(crate) fn counts(&self, id: usize, hashes: &ChunkHashes) -> Option<VerificationCounts> {
        let checked = self.0.get(id)?.as_ref()?;
        Some(VerificationCounts {
            chunks: hashes.count(),
            verified: checked.verified.count(),
            hashed: checked.hashed.load(Ordering::Relaxed),
        })
    }

    /// Whether chunk `c` of blob `id` was verified.
    pub(crate) fn is_verified(&self, id: usize, c: u64) -> bool {
        self.0
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|checked| checked.verified.get(c))
    }

    /// Makes chunks `chunks` of blob `id` present (through `store`) and
    /// verified. Returns the chunks the store fetched for this call.
    pub(crate) fn ensure(
        &self,
        id: usize,
        blob: &Blob,
        chunks: Range<u64>,
        store: &dyn ChunkStore,
        priority: Priority,
    ) -> Result<Vec<u64>, PayloadError> {
        let (Some(Some(checked)), Some(payload)) = (self.0.get(id), &blob.payload) else {
            return store.ensure(blob, chunks, priority);
        };
        if checked.verified.all(chunks.clone()) {
            return Ok(Vec::new());
        }
        // Fetching waits on the network: outside the stripe locks, so that
        // a slow chunk holds up no other.
        let fetched = store.ensure(blob, chunks.clone(), priority)?;
        for &c in &fetched {
            checked.verified.set(c);
        }
        for c in chunks {
            if checked.verified.get(c) {
                continue;
            }
            // A prefetch runs at the lowest CPU priority: it takes no stripe
            // lock, so that a guest read never waits for it (at worst a
            // chunk both read is hashed twice). A poisoned lock guards
            // nothing: the bitmap is the state.
            let stripe = &checked.stripes[(c % STRIPES as u64) as usize];
            let _guard = (priority == Priority::Foreground)
                .then(|| stripe.lock().unwrap_or_else(|p| p.into_inner()));
            if checked.verified.get(c) {
                continue;
            }
            checked.hashed.fetch_add(1, Ordering::Relaxed);
            match check_chunk(&blob.name, &blob.path, &blob.file, &payload.table, c) {
                Ok(()) => {}
                Err(e @ PayloadError::Mismatch { .. }) if store.forget(blob, c)? => {
                    // A cached chunk torn by a crash: dropped, fetched again
                    // and checked once more.
                    warn!("{e}; fetching the chunk again");
                    store.ensure(blob, c..c + 1, priority)?;
                    checked.hashed.fetch_add(1, Ordering::Relaxed);
                    check_chunk(&blob.name, &blob.path, &blob.file, &payload.table, c)?;
                }
                Err(e) => return Err(e),
            }
            checked.verified.set(c);
        }
        Ok(fetched)
    }
}

/// Reads chunk `c` of the payload in `file` and compares its sha256 with
/// the expected one. Stateless.
pub fn check_chunk(
    payload: &str,
    path: &Path,
    file: &File,
    hashes: &ChunkHashes,
    c: u64,
) -> Result<(), PayloadError> {
    let range = hashes.range(c);
    let mut buf = vec![0u8; READ_PIECE.min((range.end - range.start) as usize)];
    let mut hasher = Sha256::new();
    let mut pos = range.start;
    while pos < range.end {
        let n = ((range.end - pos) as usize).min(buf.len());
        match file.read_at(&mut buf[..n], pos) {
            Ok(0) => {
                return Err(PayloadError::Truncated {
                    payload: payload.to_owned(),
                    path: path.to_path_buf(),
                    chunk: c,
                    range,
                    at: pos,
                });
            }
            Ok(k) => {
                hasher.update(&buf[..k]);
                pos += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(PayloadError::Read {
                    payload: payload.to_owned(),
                    path: path.to_path_buf(),
                    chunk: c,
                    source,
                });
            }
        }
    }
    hashes
        .check(c, hasher.finalize().into())
        .map_err(|mismatch| PayloadError::Mismatch {
            payload: payload.to_owned(),
            path: path.to_path_buf(),
            mismatch: Box::new(mismatch),
        })
}
