//! The recording layer: the order in which a guest first reads payload
//! chunks (`ociblk serve --record-access`), for prefetching them on a
//! later start (see [`crate::prefetch`]).
//!
//! Each payload has a bitmap of the chunks read so far; the first read of
//! a chunk (one atomic `fetch_or` that finds the bit clear) appends it to
//! the recorder's list. Reads of recorded chunks cost one atomic load
//! each; without `--record-access` there is no bitmap at all.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use ociblk_registry::{AccessRecord, ChunkRef, Digest};

use super::chunk_bits::ChunkBits;
use super::table::BlobTable;

/// The chunks first read so far, in order, by blob index and chunk.
#[derive(Debug)]
pub struct AccessRecorder {
    /// The digest of each blob that is a payload, and the chunks of it read
    /// so far.
    blobs: Vec<Option<(Digest, ChunkBits)>>,
    order: Mutex<Vec<(usize, u64)>>,
}

impl AccessRecorder {
    /// A recorder for the payloads of `blobs`.
    pub(crate) fn new(blobs: &BlobTable) -> Self {
        AccessRecorder {
            blobs: blobs
                .iter()
                .map(|b| {
                    let p = b.payload.as_ref()?;
                    Some((p.digest.clone(), ChunkBits::new(p.table.count())))
                })
                .collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Notes a guest read of chunks `chunks` of blob `id`, recording those
    /// read for the first time.
    pub(crate) fn touch(&self, id: usize, chunks: Range<u64>) {
        let Some(Some((_, read))) = self.blobs.get(id) else {
            return;
        };
        for c in chunks {
            // The bit only decides who records the chunk.
            if !read.get(c) && read.set(c) {
                self.note(id, c);
            }
        }
    }

    fn note(&self, source: usize, chunk: u64) {
        self.order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((source, chunk));
    }

    /// Chunks recorded so far.
    pub fn len(&self) -> usize {
        self.order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record of the chunks read so far, for the image whose manifest
    /// digest is `manifest`. Two sources over one blob (a kernel placed
    /// twice on the ESP) give each chunk once.
    pub fn record(&self, manifest: Digest) -> AccessRecord {
        let order = self
            .order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let chunks = order.into_iter().filter_map(|(source, index)| {
            let (blob, _) = self.blobs.get(source)?.as_ref()?;
            Some(ChunkRef {
                blob: blob.clone(),
                index,
            })
        });
        AccessRecord::new(manifest, chunks)
    }
}
