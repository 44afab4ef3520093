//! The payload store: the one way payload bytes reach a guest, an export
//! or `ociblk verify`.
//!
//! [`Payloads::ensure`] is the only way to get at a payload's bytes: it
//! returns a [`Servable`], which reads or copies exactly the range it was
//! made for and which nothing else can make. Under it, in order:
//!
//! - the recording layer ([`recorded`]): with `--record-access`, a guest's
//!   first read of each chunk is noted;
//! - the verification layer ([`verified`]): unless the user opted out, a
//!   chunk is served only once it matched the image's chunk hash;
//! - the [`ChunkStore`] the blob lives in, keyed by its digest: a local
//!   image directory ([`LocalBlobs`]), every chunk present, or the registry
//!   cache ([`CachedBlobs`]), which fetches missing chunks and checks each
//!   on its way in.
//!
//! Files the user named (loader, node parameters) have no chunk hashes and
//! are served as they are.

mod cached;
mod chunk_bits;
mod error;
mod recorded;
mod store;
mod table;
mod verified;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ociblk_io::copy::{FileCopier, Method};
use ociblk_io::iobuf::IoBufs;
use ociblk_layout::{DiskReader, Layout};
use ociblk_registry::limiter::Priority;
use tracing::error;

pub use cached::{CachedBlobs, ChunkFetcher};
pub use error::PayloadError;
pub use recorded::AccessRecorder;
pub use store::{ChunkStore, LocalBlobs};
pub use table::Blob;
pub use verified::{VerificationCounts, check_chunk};

use table::BlobTable;
use verified::Verification;

use crate::image_source::LoadedImage;

/// The unit of the holes a plain copy leaves in its output.
const COPY_BLOCK: u64 = 4096;

/// Which layers a store gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadOptions {
    /// Check every chunk against its hash before it is served (off only
    /// with `--no-verify`; a registry chunk is still checked as it is
    /// fetched).
    pub verify: bool,
    /// Record the guest's first read of each chunk (`--record-access`).
    pub record: bool,
}

/// The payload store of one disk: its blobs, by the layout's source index.
#[derive(Debug)]
pub struct Payloads {
    /// Names the image in log lines.
    image: PathBuf,
    blobs: BlobTable,
    store: Box<dyn ChunkStore>,
    verification: Option<Verification>,
    recorder: Option<Arc<AccessRecorder>>,
}

/// What a prefetch of a chunk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetched {
    /// The chunk was fetched from the registry (and verified).
    Fetched,
    /// It was there already: in the cache, in a local layout, or verified
    /// by an earlier read. It is verified now.
    Present,
}

/// Payload bytes that passed every layer of the store: the only handle
/// through which they are read.
#[derive(Debug)]
pub struct Servable<'a> {
    blob: &'a Blob,
    range: Range<u64>,
}

impl Servable<'_> {
    /// Reads the bytes into `dst[at..]` with `preadv`, straight into (guest)
    /// memory.
    pub fn read_into(&self, dst: &IoBufs<'_>, at: usize) -> io::Result<()> {
        let (offset, len) = (
            self.range.start,
            (self.range.end - self.range.start) as usize,
        );
        dst.read_from_file(&self.blob.file, offset, at, len)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: read of {len} bytes at {offset}: {e}",
                        self.blob.path.display()
                    ),
                )
            })
    }

    /// Copies the bytes into `out` at `at` (an export's new sparse file: a
    /// zero block a plain copy leaves out is a hole that reads as zeros);
    /// returns the bytes copied.
    pub fn copy_to(&self, out: &File, at: u64) -> io::Result<u64> {
        let len = self.range.end - self.range.start;
        FileCopier::new(&self.blob.file, out, Method::CopyRange, COPY_BLOCK).copy(
            self.range.start,
            at,
            len,
        )?;
        Ok(len)
    }
}

impl Payloads {
    /// The store of the disk `reader` reads (its sources opened and their
    /// sizes checked), for `image`. Returns the layout with it.
    pub fn open(
        reader: DiskReader,
        image: &LoadedImage,
        options: PayloadOptions,
    ) -> (Layout, Self) {
        let (layout, blobs) = BlobTable::from_reader(reader);
        let store = Self::with_blobs(blobs, &image.origin, image.fetcher.as_ref(), options);
        (layout, store)
    }

    /// The store of `sources` in a local directory, with no layout around
    /// them (for tests and benchmarks); `origin` names the image in logs.
    pub fn of_local_sources(
        origin: &Path,
        sources: &[ociblk_layout::Source],
        options: PayloadOptions,
    ) -> io::Result<Self> {
        let blobs = BlobTable::from_sources(sources)?;
        Ok(Self::with_blobs(blobs, origin, None, options))
    }

    /// The store of every uncompressed payload of `image.image`, whether or
    /// not a disk uses it (`ociblk verify`), verifying.
    pub fn of_image(image: &LoadedImage) -> io::Result<Self> {
        let blobs = BlobTable::from_image(&image.image)?;
        let options = PayloadOptions {
            verify: true,
            record: false,
        };
        let store = Self::with_blobs(blobs, &image.origin, image.fetcher.as_ref(), options);
        Ok(store)
    }

    fn with_blobs(
        blobs: BlobTable,
        origin: &Path,
        fetcher: Option<&Arc<ChunkFetcher>>,
        options: PayloadOptions,
    ) -> Self {
        let store: Box<dyn ChunkStore> = match fetcher {
            Some(fetcher) => Box::new(CachedBlobs(fetcher.clone())),
            None => Box::new(LocalBlobs),
        };
        Payloads {
            image: origin.to_path_buf(),
            verification: options.verify.then(|| Verification::new(&blobs)),
            recorder: options
                .record
                .then(|| Arc::new(AccessRecorder::new(&blobs))),
            blobs,
            store,
        }
    }

    /// Makes bytes `range` of blob `id` ready to serve and returns them:
    /// for a guest read (`Priority::Foreground`, recorded) or a prefetch.
    pub fn ensure(
        &self,
        id: usize,
        range: Range<u64>,
        priority: Priority,
    ) -> Result<Servable<'_>, PayloadError> {
        self.ensure_fetching(id, range, priority)
            .map(|(servable, _)| servable)
    }

    /// [`Payloads::ensure`] for a guest read, with a failure logged (naming
    /// the image, blob, chunk and hashes) and turned into an I/O error.
    pub fn ensure_for_read(&self, id: usize, range: Range<u64>) -> io::Result<Servable<'_>> {
        self.ensure(id, range, Priority::Foreground).map_err(|e| {
            self.log_failure(id, &e);
            e.into()
        })
    }

    /// [`Payloads::ensure`], with the chunks the store fetched for it.
    fn ensure_fetching(
        &self,
        id: usize,
        range: Range<u64>,
        priority: Priority,
    ) -> Result<(Servable<'_>, Vec<u64>), PayloadError> {
        let Some(blob) = self.blobs.get(id) else {
            return Err(PayloadError::NoBlob { id });
        };
        let mut fetched = Vec::new();
        if let Some(payload) = &blob.payload {
            let chunks = payload.table.chunks_touching(range.clone());
            if let Some(recorder) = self
                .recorder
                .as_ref()
                .filter(|_| priority == Priority::Foreground)
            {
                recorder.touch(id, chunks.clone());
            }
            fetched = match &self.verification {
                Some(v) => v.ensure(id, blob, chunks, &*self.store, priority)?,
                None => self.store.ensure(blob, chunks, priority)?,
            };
        }
        Ok((Servable { blob, range }, fetched))
    }

    /// Makes chunk `c` of blob `id` ready ahead of any read of it, fetching
    /// at background priority (for a registry image). Not recorded as read.
    pub fn prefetch(&self, id: usize, c: u64) -> Result<Prefetched, PayloadError> {
        let Some(hashes) = self.hashes(id) else {
            return Ok(Prefetched::Present);
        };
        if c >= hashes.count() {
            // The caller checked the index against the image; keep it safe.
            return Ok(Prefetched::Present);
        }
        let range = hashes.range(c);
        let (_, fetched) = self.ensure_fetching(id, range, Priority::Background)?;
        Ok(if fetched.is_empty() {
            Prefetched::Present
        } else {
            Prefetched::Fetched
        })
    }

    /// Whether a prefetch of blob `id` does anything: it is a payload, and
    /// chunks are verified or fetched.
    pub fn prefetches(&self, id: usize) -> bool {
        self.hashes(id).is_some() && (self.verification.is_some() || self.store.fetches())
    }

    /// The blob with index `id`.
    pub fn blob(&self, id: usize) -> Option<&Blob> {
        self.blobs.get(id)
    }

    /// The chunk hashes of blob `id`, if it is a payload.
    pub fn hashes(&self, id: usize) -> Option<&ociblk_digest::ChunkHashes> {
        Some(&*self.blobs.get(id)?.payload.as_ref()?.table)
    }

    /// Whether payload chunks are hashed before they are served.
    pub fn verifies(&self) -> bool {
        self.verification.is_some()
    }

    /// The recorder of first reads, with `record`.
    pub fn recorder(&self) -> Option<&Arc<AccessRecorder>> {
        self.recorder.as_ref()
    }

    /// Each verified payload's counts: name and counts.
    pub fn verification_counts(&self) -> Vec<(&str, VerificationCounts)> {
        let Some(v) = &self.verification else {
            return Vec::new();
        };
        self.blobs
            .iter()
            .enumerate()
            .filter_map(|(id, b)| {
                Some((b.name.as_str(), v.counts(id, &b.payload.as_ref()?.table)?))
            })
            .collect()
    }

    /// Whether chunk `c` of blob `id` was verified.
    pub fn is_verified(&self, id: usize, c: u64) -> bool {
        self.verification
            .as_ref()
            .is_some_and(|v| v.is_verified(id, c))
    }

    /// The log line for a chunk of blob `id` that was not served.
    pub fn log_failure(&self, id: usize, e: &PayloadError) {
        let (Some(blob), Some(c)) = (self.blobs.get(id), e.chunk()) else {
            error!(image = %self.image.display(), "payload bytes not served: {e}");
            return;
        };
        let hashes = blob.payload.as_ref().map(|p| &p.table);
        let range = hashes.map(|h| h.range(c)).unwrap_or(0..0);
        let expected = hashes
            .and_then(|h| h.expected(c))
            .map(hex::encode)
            .unwrap_or_default();
        // A fetch failure names the registry blob, whose bytes never came;
        // a verification failure the cached file and the hash it missed.
        let (blob_name, expected, actual, what) = match e {
            PayloadError::Fetch { source, .. } => {
                let digest = blob
                    .payload
                    .as_ref()
                    .map(|p| p.digest.to_string())
                    .unwrap_or_default();
                let what = format!("could not be fetched, not served: {source}");
                (digest, None, None, what)
            }
            PayloadError::Mismatch { mismatch, .. } => {
                let what = "failed verification, not served".to_owned();
                (
                    display(&blob.path),
                    Some(expected),
                    Some(mismatch.actual_hex()),
                    what,
                )
            }
            _ => {
                let what = format!("failed verification, not served: {e}");
                (display(&blob.path), Some(expected), None, what)
            }
        };
        error!(
            image = %self.image.display(),
            payload = %blob.name,
            blob = %blob_name,
            chunk = c,
            bytes = %format_args!("{}..{}", range.start, range.end),
            expected_sha256 = expected.map(tracing::field::display),
            actual_sha256 = actual.map(tracing::field::display),
            "payload chunk {what}"
        );
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
