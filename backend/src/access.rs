//! Recording the order in which a guest first reads payload chunks
//! (`ociblk serve --record-access`), for prefetching them on a later start
//! (see [`crate::prefetch`]).
//!
//! Each payload's verifier keeps a bitmap of the chunks read so far; the
//! first read of a chunk (one atomic `fetch_or` that finds the bit clear)
//! appends it to the recorder's list. Reads of recorded chunks cost one
//! atomic load each; without `--record-access` there is no bitmap at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ociblk_layout::Layout;
use ociblk_registry::{AccessRecord, ChunkRef, Digest};

/// The chunks first read so far, in order, by layout source and chunk.
#[derive(Debug)]
pub struct AccessRecorder {
    /// The blob digest of each layout source that is a payload.
    blobs: Vec<Option<Digest>>,
    order: Mutex<Vec<(usize, u64)>>,
}

impl AccessRecorder {
    /// A recorder for the payloads of `layout`.
    pub fn new(layout: &Layout) -> Self {
        Self::for_blobs(
            layout
                .sources
                .iter()
                .map(|s| {
                    s.chunk_hashes.as_ref()?;
                    Digest::from_hex(&s.sha256).ok()
                })
                .collect(),
        )
    }

    /// A recorder for sources with these blob digests (`None`: not a
    /// payload).
    pub(crate) fn for_blobs(blobs: Vec<Option<Digest>>) -> Self {
        AccessRecorder {
            blobs,
            order: Mutex::new(Vec::new()),
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
            let blob = self.blobs.get(source)?.clone()?;
            Some(ChunkRef { blob, index })
        });
        AccessRecord::new(manifest, chunks)
    }
}

/// The chunks of one payload read so far.
#[derive(Debug)]
pub(crate) struct Touched {
    recorder: Arc<AccessRecorder>,
    source: usize,
    bits: Box<[AtomicU64]>,
}

impl Touched {
    pub(crate) fn new(recorder: Arc<AccessRecorder>, source: usize, chunks: u64) -> Self {
        Touched {
            recorder,
            source,
            bits: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Notes a read of chunk `c`; records it when it is the first.
    pub(crate) fn touch(&self, c: u64) {
        let Some(word) = self.bits.get((c / 64) as usize) else {
            return;
        };
        let mask = 1 << (c % 64);
        // Relaxed: the bit only decides who records the chunk.
        if word.load(Ordering::Relaxed) & mask == 0
            && word.fetch_or(mask, Ordering::Relaxed) & mask == 0
        {
            self.recorder.note(self.source, c);
        }
    }
}
