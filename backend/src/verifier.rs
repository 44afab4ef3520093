//! Lazy verification of payload bytes against the image's chunk hashes.
//!
//! The first read that touches chunk *c* of a payload reads the whole chunk
//! from the blob, hashes it and compares it with `chunk_hashes_sha256[c]`;
//! only then are bytes of that chunk served. A verified chunk is a set bit:
//! later reads cost an atomic load per chunk and take no lock. The stripe
//! locks are taken only on a miss, so that two queues touching the same new
//! chunk hash it once.
//!
//! A mismatch leaves the chunk unverified: every later read tries again, so
//! a blob fixed on disk recovers without a restart. A blob changed after
//! its chunk was verified is not checked again.
//!
//! For a registry image the blob is the cache's sparse file: before a
//! chunk is hashed it is made present ([`ChunkFetcher::ensure_chunk_as`],
//! which verifies what it fetches too). A cached chunk that does not match
//! (torn by a crash) is dropped from the cache and fetched once more. A
//! chunk that cannot be fetched fails the read; a later read tries again.
//! When a read misses several chunks, they are fetched side by side first
//! ([`ChunkFetcher::ensure_chunks`]), under one deadline for the read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ociblk_layout::chunk_hashes::hex;
use ociblk_layout::{ChunkHashes, ChunkMismatch, Layout, Source};
use ociblk_registry::BlobSpec;
use ociblk_registry::limiter::Priority;
use sha2::{Digest as _, Sha256};
use tracing::{error, warn};

use crate::access::{AccessRecorder, Touched};
use crate::image_source::ChunkFetcher;

/// Bytes read per `pread` while hashing a chunk: small enough to stay in
/// the CPU cache between the read and the hash.
const READ_PIECE: usize = 128 << 10;
/// Locks that serialise the hashing of new chunks (chunk index modulo this).
const STRIPES: usize = 16;

/// Why a chunk could not be verified.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("payload {payload:?} ({}): {mismatch}", path.display())]
    Mismatch {
        payload: String,
        path: PathBuf,
        mismatch: Box<ChunkMismatch>,
    },
    #[error(
        "payload {payload:?} ({}): chunk {chunk} (bytes {}..{}): the blob ends at byte {at}",
        path.display(), range.start, range.end
    )]
    Truncated {
        payload: String,
        path: PathBuf,
        chunk: u64,
        range: std::ops::Range<u64>,
        at: u64,
    },
    #[error("payload {payload:?} ({}): reading chunk {chunk}: {source}", path.display())]
    Read {
        payload: String,
        path: PathBuf,
        chunk: u64,
        #[source]
        source: io::Error,
    },
    #[error("payload {payload:?}: fetching chunk {chunk}: {source}")]
    Fetch {
        payload: String,
        chunk: u64,
        #[source]
        source: Box<ociblk_registry::Error>,
    },
}

impl VerifyError {
    /// The chunk that failed.
    pub fn chunk(&self) -> u64 {
        match self {
            VerifyError::Mismatch { mismatch, .. } => mismatch.chunk,
            VerifyError::Truncated { chunk, .. }
            | VerifyError::Read { chunk, .. }
            | VerifyError::Fetch { chunk, .. } => *chunk,
        }
    }
}

impl From<VerifyError> for io::Error {
    fn from(e: VerifyError) -> Self {
        let kind = match &e {
            VerifyError::Mismatch { .. } => io::ErrorKind::InvalidData,
            VerifyError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            VerifyError::Read { source, .. } => source.kind(),
            VerifyError::Fetch { .. } => io::ErrorKind::TimedOut,
        };
        io::Error::new(kind, e)
    }
}

/// Reads chunk `c` of the payload in `file` and compares its sha256 with
/// the expected one. Stateless: for `ociblk verify` and the verifier below.
pub fn check_chunk(
    payload: &str,
    path: &Path,
    file: &File,
    hashes: &ChunkHashes,
    c: u64,
) -> Result<(), VerifyError> {
    let range = hashes.range(c);
    let mut buf = vec![0u8; READ_PIECE.min((range.end - range.start) as usize)];
    let mut hasher = Sha256::new();
    let mut pos = range.start;
    while pos < range.end {
        let n = ((range.end - pos) as usize).min(buf.len());
        match file.read_at(&mut buf[..n], pos) {
            Ok(0) => {
                return Err(VerifyError::Truncated {
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
                return Err(VerifyError::Read {
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
        .map_err(|mismatch| VerifyError::Mismatch {
            payload: payload.to_owned(),
            path: path.to_path_buf(),
            mismatch: Box::new(mismatch),
        })
}

/// Where a registry image's payload chunks come from.
#[derive(Debug)]
struct Fetch {
    fetcher: Arc<ChunkFetcher>,
    blob: BlobSpec,
}

/// The verified-chunk bitmap of one payload.
#[derive(Debug)]
pub struct PayloadVerifier {
    image: PathBuf,
    payload: String,
    path: PathBuf,
    hashes: Arc<ChunkHashes>,
    /// For a registry image: fetches a chunk into the cache before it is
    /// hashed.
    fetch: Option<Fetch>,
    /// Whether chunks are hashed here (off with `--no-verify`, which for a
    /// registry image still fetches, and the fetch still verifies).
    hash: bool,
    verified: Box<[AtomicU64]>,
    /// Chunks hashed, counting failures and re-checks.
    hashed: AtomicU64,
    stripes: [Mutex<()>; STRIPES],
    /// With `--record-access`: the chunks read so far, and where their
    /// first reads are recorded.
    touched: Option<Touched>,
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

impl PayloadVerifier {
    /// A verifier for `source`, or `None` for a source without chunk hashes
    /// (loader, node parameters). `image` names the image in log lines.
    pub fn new(image: &Path, source: &Source) -> Option<Self> {
        Self::with_fetch(image, source, None, true, None)
    }

    /// A verifier that, when `fetcher` holds `source`'s blob, fetches each
    /// chunk before hashing it; with `hash` false it only fetches. With
    /// `recorder` (the source's index in the layout and the recorder) the
    /// first read of each chunk is recorded.
    pub fn with_fetch(
        image: &Path,
        source: &Source,
        fetcher: Option<&Arc<ChunkFetcher>>,
        hash: bool,
        recorder: Option<(usize, &Arc<AccessRecorder>)>,
    ) -> Option<Self> {
        let hashes = source.chunk_hashes.clone()?;
        let fetch = fetcher.and_then(|f| {
            f.blob(&source.path).map(|blob| Fetch {
                fetcher: f.clone(),
                blob: blob.clone(),
            })
        });
        if !hash && fetch.is_none() && recorder.is_none() {
            return None;
        }
        let words = hashes.count().div_ceil(64) as usize;
        let touched = recorder.map(|(index, r)| Touched::new(r.clone(), index, hashes.count()));
        Some(PayloadVerifier {
            image: image.to_path_buf(),
            payload: source.name.clone(),
            path: source.path.clone(),
            hashes,
            fetch,
            hash,
            verified: (0..words).map(|_| AtomicU64::new(0)).collect(),
            hashed: AtomicU64::new(0),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            touched,
        })
    }

    pub fn payload(&self) -> &str {
        &self.payload
    }

    pub fn hashes(&self) -> &ChunkHashes {
        &self.hashes
    }

    fn bit(c: u64) -> (usize, u64) {
        ((c / 64) as usize, 1 << (c % 64))
    }

    /// Whether chunk `c` was verified.
    pub fn is_verified(&self, c: u64) -> bool {
        let (word, mask) = Self::bit(c);
        // Acquire pairs with the Release in `verify`: a set bit is seen
        // only after the hashing that set it.
        self.verified
            .get(word)
            .is_some_and(|w| w.load(Ordering::Acquire) & mask != 0)
    }

    /// Chunks verified so far.
    pub fn verified_count(&self) -> u64 {
        self.verified
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Chunks hashed so far (a chunk that failed is hashed again when it
    /// is read again).
    pub fn hashed_count(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Makes sure every chunk that payload bytes `[offset, offset + len)`
    /// touch is verified, hashing those that are not yet. On a mismatch the
    /// chunk stays unverified.
    pub fn ensure(&self, file: &File, offset: u64, len: u64) -> Result<(), VerifyError> {
        let chunks = self
            .hashes
            .chunks_touching(offset..offset.saturating_add(len));
        for c in self.fetch_side_by_side(chunks.clone())? {
            self.set_verified(c);
        }
        for c in chunks {
            if let Some(t) = &self.touched {
                t.touch(c);
            }
            if !self.is_verified(c) {
                self.verify(file, c)?;
            }
        }
        Ok(())
    }

    /// For a registry image, fetches the chunks of `chunks` not yet
    /// verified that are missing from the cache, side by side and under
    /// one deadline for the read (`--fetch-timeout`), before they are
    /// verified one by one. One missing chunk is left to that. Returns the
    /// chunks fetched: the cache checked them against the same hashes
    /// before storing them, so they are verified without a second hash.
    fn fetch_side_by_side(&self, chunks: std::ops::Range<u64>) -> Result<Vec<u64>, VerifyError> {
        let Some(fetch) = &self.fetch else {
            return Ok(Vec::new());
        };
        let unverified: Vec<u64> = chunks.filter(|&c| !self.is_verified(c)).collect();
        if unverified.len() < 2 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + fetch.fetcher.timeout();
        fetch
            .fetcher
            .ensure_chunks(&fetch.blob, &unverified, deadline)
            .map_err(|(c, source)| self.fetch_error(c, source))
    }

    /// Verifies chunk `c` (the miss path).
    pub fn verify(&self, file: &File, c: u64) -> Result<(), VerifyError> {
        self.verify_as(file, c, Priority::Foreground).map(|_| ())
    }

    /// Verifies chunk `c` ahead of any read of it, fetching it first at
    /// background priority (for a registry image). Not recorded as read.
    pub fn prefetch(&self, file: &File, c: u64) -> Result<Prefetched, VerifyError> {
        if c >= self.hashes.count() {
            // The caller checked the index against the image; keep it safe.
            return Ok(Prefetched::Present);
        }
        self.verify_as(file, c, Priority::Background)
    }

    /// [`PayloadVerifier::verify`] fetching at `priority`.
    fn verify_as(
        &self,
        file: &File,
        c: u64,
        priority: Priority,
    ) -> Result<Prefetched, VerifyError> {
        if self.is_verified(c) {
            return Ok(Prefetched::Present);
        }
        // Fetching waits on the network: outside the stripe lock, so that a
        // slow chunk holds up no other. The cache fetches each chunk once
        // however many threads and processes ask.
        let fetched = self.fetch_chunk(c, priority)?;
        let stripe = &self.stripes[(c % STRIPES as u64) as usize];
        // A prefetch runs at the lowest CPU priority: it takes no stripe
        // lock, so that a guest read never waits for it (at worst a chunk
        // both read is hashed twice). A poisoned lock guards nothing: the
        // bitmap is the state.
        let _guard = (priority == Priority::Foreground)
            .then(|| stripe.lock().unwrap_or_else(|p| p.into_inner()));
        let outcome = if fetched {
            Prefetched::Fetched
        } else {
            Prefetched::Present
        };
        if self.is_verified(c) {
            return Ok(outcome);
        }
        // A chunk this call fetched was checked against the same hash by the
        // cache before it was stored, and a stored chunk is never rewritten:
        // every chunk is hashed once. Only one found in the cache (stored by
        // another process, perhaps torn by a crash) is hashed here.
        if self.hash && !fetched {
            self.hashed.fetch_add(1, Ordering::Relaxed);
            match (
                check_chunk(&self.payload, &self.path, file, &self.hashes, c),
                &self.fetch,
            ) {
                (Ok(()), _) => {}
                (Err(e @ VerifyError::Mismatch { .. }), Some(fetch)) => {
                    // A cached chunk torn by a crash: drop it, fetch it again
                    // and check once more.
                    warn!(image = %self.image.display(), "{e}; fetching the chunk again");
                    fetch
                        .fetcher
                        .invalidate_chunk(&fetch.blob, c)
                        .map_err(|source| self.fetch_error(c, source))?;
                    self.fetch_chunk(c, priority)?;
                    self.hashed.fetch_add(1, Ordering::Relaxed);
                    check_chunk(&self.payload, &self.path, file, &self.hashes, c)?;
                }
                (Err(e), _) => return Err(e),
            }
        }
        self.set_verified(c);
        Ok(outcome)
    }

    /// Marks chunk `c` verified: its bytes may be served from now on.
    fn set_verified(&self, c: u64) {
        let (word, mask) = Self::bit(c);
        // A chunk past the end has no expected hash, so it never gets here.
        if let Some(w) = self.verified.get(word) {
            w.fetch_or(mask, Ordering::Release);
        }
    }

    /// Makes chunk `c` present in the cache for a registry image; `true`
    /// when this call fetched it.
    fn fetch_chunk(&self, c: u64, priority: Priority) -> Result<bool, VerifyError> {
        match &self.fetch {
            Some(fetch) => fetch
                .fetcher
                .ensure_chunk_as(&fetch.blob, c, priority)
                .map_err(|source| self.fetch_error(c, source)),
            None => Ok(false),
        }
    }

    fn fetch_error(&self, chunk: u64, source: ociblk_registry::Error) -> VerifyError {
        VerifyError::Fetch {
            payload: self.payload.clone(),
            chunk,
            source: Box::new(source),
        }
    }

    /// The log line for a chunk that was not served.
    pub fn log_failure(&self, e: &VerifyError) {
        let c = e.chunk();
        let range = self.hashes.range(c);
        let expected = self.hashes.expected(c).map(hex).unwrap_or_default();
        let blob = self.path.display().to_string();
        // A fetch failure names the registry blob, whose bytes never came;
        // a verification failure the cached file and the hash it missed.
        let (blob, expected, actual, what) = match e {
            VerifyError::Fetch { source, .. } => {
                let digest = self
                    .fetch
                    .as_ref()
                    .map(|f| f.blob.digest.to_string())
                    .unwrap_or_default();
                let what = format!("could not be fetched, not served: {source}");
                (digest, None, None, what)
            }
            VerifyError::Mismatch { mismatch, .. } => {
                let what = "failed verification, not served".to_owned();
                (blob, Some(expected), Some(hex(&mismatch.actual)), what)
            }
            _ => {
                let what = format!("failed verification, not served: {e}");
                (blob, Some(expected), None, what)
            }
        };
        error!(
            image = %self.image.display(),
            payload = %self.payload,
            blob = %blob,
            chunk = c,
            bytes = %format_args!("{}..{}", range.start, range.end),
            expected_sha256 = expected.map(tracing::field::display),
            actual_sha256 = actual.map(tracing::field::display),
            "payload chunk {what}"
        );
    }
}

/// One optional verifier per source of a layout, by source index.
#[derive(Debug, Default)]
pub struct Verifiers(Vec<Option<Arc<PayloadVerifier>>>);

impl Verifiers {
    /// Verifiers for an image whose payloads `fetcher` fetches from a
    /// registry (`None`: a local layout). With `hash` false (`--no-verify`)
    /// local payloads are served unchecked; registry chunks are still
    /// fetched, and the fetch verifies them before they are cached.
    pub fn for_image(
        layout: &Layout,
        image: &Path,
        fetcher: Option<&Arc<ChunkFetcher>>,
        hash: bool,
    ) -> Self {
        Self::recording(layout, image, fetcher, hash, None)
    }

    /// [`Verifiers::for_image`] that, with `recorder`, records the first
    /// read of every payload chunk (also with `--no-verify`).
    pub fn recording(
        layout: &Layout,
        image: &Path,
        fetcher: Option<&Arc<ChunkFetcher>>,
        hash: bool,
        recorder: Option<&Arc<AccessRecorder>>,
    ) -> Self {
        Verifiers(
            layout
                .sources
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    PayloadVerifier::with_fetch(image, s, fetcher, hash, recorder.map(|r| (i, r)))
                        .map(Arc::new)
                })
                .collect(),
        )
    }

    /// No verification: every source is served as it is.
    pub fn disabled() -> Self {
        Verifiers(Vec::new())
    }

    /// Whether payload chunks are hashed before they are served.
    pub fn is_enabled(&self) -> bool {
        self.iter().any(|v| v.hash)
    }

    /// Every payload verifier.
    pub fn iter(&self) -> impl Iterator<Item = &PayloadVerifier> {
        self.0.iter().flatten().map(|v| &**v)
    }

    /// The verifier of source `source`, if it is a verified payload.
    pub fn get(&self, source: usize) -> Option<&PayloadVerifier> {
        self.0.get(source).and_then(Option::as_deref)
    }

    /// The verifier of source `source`, to use beside the disk (prefetch).
    pub fn shared(&self, source: usize) -> Option<Arc<PayloadVerifier>> {
        self.0.get(source).and_then(Option::clone)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use base64::Engine as _;

    use super::*;

    fn source(dir: &Path, data: &[u8], chunk: u64) -> (Source, File) {
        let path = dir.join("blob");
        let mut f = File::create(&path).expect("create blob");
        f.write_all(data).expect("write blob");
        let enc: Vec<String> = data
            .chunks(chunk as usize)
            .map(|c| base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(c)))
            .collect();
        let hashes =
            ChunkHashes::decode(Path::new("cfg"), "f", data.len() as u64, chunk, &enc).expect("ok");
        let s = Source {
            name: "system".into(),
            path: path.clone(),
            size: data.len() as u64,
            sha256: String::new(),
            chunk_hashes: Some(Arc::new(hashes)),
        };
        (s, File::open(&path).expect("open blob"))
    }

    #[test]
    fn bad_chunk_is_refused_until_fixed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (s, f) = source(dir.path(), &data, 4096);
        let v = PayloadVerifier::new(Path::new("img"), &s).expect("payload");
        let mut bad = data.clone();
        bad[5000] ^= 1;
        std::fs::write(&s.path, &bad).expect("corrupt");
        v.ensure(&f, 0, 10).expect("chunk 0 is fine");
        let err = v.ensure(&f, 4095, 2).expect_err("chunk 1 is bad");
        assert_eq!(err.chunk(), 1);
        assert!(matches!(err, VerifyError::Mismatch { .. }));
        assert!(
            err.to_string().contains("chunk 1 (bytes 4096..8192)"),
            "{err}"
        );
        assert!(v.is_verified(0) && !v.is_verified(1) && !v.is_verified(2));
        v.ensure(&f, 9000, 1000).expect("short last chunk is fine");
        std::fs::write(&s.path, &data).expect("fix");
        v.ensure(&f, 4096, 1).expect("fixed chunk verifies");
        assert_eq!(v.verified_count(), 3);
    }

    #[test]
    fn concurrent_first_reads_hash_each_chunk_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Chunks large enough that hashing one takes a while: without the
        // stripe locks, threads would hash the same chunk side by side.
        const CHUNK: u64 = 256 << 10;
        let data: Vec<u8> = (0..10 * CHUNK as u32).map(|i| (i % 251) as u8).collect();
        let (s, f) = source(dir.path(), &data, CHUNK);
        let v = PayloadVerifier::new(Path::new("img"), &s).expect("payload");
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let (v, f, start) = (&v, &f, &start);
                scope.spawn(move || {
                    start.wait();
                    // Every thread reads every chunk, in different orders.
                    for i in 0..10u64 {
                        let c = (i + t) % 10;
                        v.ensure(f, c * CHUNK, 1).expect("good chunk");
                    }
                });
            }
        });
        assert_eq!(v.verified_count(), 10);
        assert_eq!(v.hashed_count(), 10, "each chunk hashed once");
    }

    #[test]
    fn prefetch_verifies_ahead_and_only_guest_reads_are_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 3) as u8).collect();
        let (s, f) = source(dir.path(), &data, 4096);
        let blob = ociblk_registry::Digest::of(b"blob");
        let recorder = Arc::new(AccessRecorder::for_blobs(vec![None, Some(blob.clone())]));
        let v = PayloadVerifier::with_fetch(Path::new("img"), &s, None, true, Some((1, &recorder)))
            .expect("payload");
        assert_eq!(v.prefetch(&f, 2).expect("good"), Prefetched::Present);
        assert!(v.is_verified(2) && v.hashed_count() == 1);
        assert!(recorder.is_empty(), "a prefetch is not a guest read");
        // Guest reads: chunk 2 costs no second hash; each chunk recorded
        // once, in the order first read.
        v.ensure(&f, 2 * 4096, 10).expect("read");
        v.ensure(&f, 0, 4097).expect("read");
        v.ensure(&f, 8191, 2).expect("read");
        assert_eq!(v.hashed_count(), 3);
        let order: Vec<u64> = recorder
            .record(ociblk_registry::Digest::of(b"manifest"))
            .chunks
            .iter()
            .map(|c| {
                assert_eq!(c.chunk.blob, blob);
                c.chunk.index
            })
            .collect();
        assert_eq!(order, [2, 0, 1]);
        // Past the end: nothing to do, nothing recorded.
        assert_eq!(
            v.prefetch(&f, 3).expect("past the end"),
            Prefetched::Present
        );
    }

    #[test]
    fn truncated_blob_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = vec![7u8; 10_000];
        let (s, f) = source(dir.path(), &data, 4096);
        let v = PayloadVerifier::new(Path::new("img"), &s).expect("payload");
        File::options()
            .write(true)
            .open(&s.path)
            .and_then(|w| w.set_len(6000))
            .expect("truncate");
        let err = v.ensure(&f, 8192, 10).expect_err("truncated");
        assert!(matches!(err, VerifyError::Truncated { chunk: 2, .. }));
        assert!(err.to_string().contains("ends at byte 8192"), "{err}");
    }
}
