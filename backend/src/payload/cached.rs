//! The registry cache as a [`ChunkStore`]: a registry image's payload
//! chunks are fetched into the host cache as they are first needed (each
//! checked against its hash before it is stored), the missing chunks of
//! one read side by side under one deadline.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ociblk_layout::OsImage;
use ociblk_registry::limiter::Priority;
use ociblk_registry::{BlobSpec, Cache, Digest, FetchStats, Options, RegistryImage};

use super::chunk_bits::ChunkBits;
use super::error::PayloadError;
use super::store::ChunkStore;
use super::table::Blob;

/// Fetches payload chunks of one registry image into the cache.
#[derive(Debug)]
pub struct ChunkFetcher {
    registry: RegistryImage,
    cache: Cache,
    /// Uncompressed payload blobs by digest, with the chunks this process
    /// knows are present (a stored chunk stays, until a torn one is
    /// dropped).
    blobs: HashMap<Digest, CachedBlob>,
    /// The bound on fetching what one read needs (`--fetch-timeout`).
    timeout: Duration,
    /// Requests in flight to the registry host at most: the most chunks of
    /// one read worth fetching side by side.
    max_in_flight: usize,
}

/// The missing chunks of one read, fetched side by side by a few threads
/// under the read's one deadline.
#[derive(Debug)]
struct ReadFetch {
    blob: BlobSpec,
    chunks: Vec<u64>,
    /// The index in `chunks` of the next chunk to start.
    next: AtomicUsize,
    deadline: Instant,
    /// What the deadline was set from, for the error.
    timeout: Duration,
    /// Set when the read no longer waits: start no more chunks.
    abandoned: AtomicBool,
}

impl ChunkFetcher {
    pub(crate) fn new(
        registry: RegistryImage,
        image: &OsImage,
        cache: Cache,
        options: &Options,
    ) -> ociblk_registry::Result<Self> {
        let mut blobs = HashMap::new();
        for p in image.payloads.iter().filter(|p| p.is_uncompressed()) {
            // The layout's table of the payload is the cache's.
            let spec = BlobSpec::new(p.digest.clone(), p.chunk_hashes.clone());
            // Creates the sparse file of the blob's size and holds it in use.
            registry.blobs.present_chunks(&spec)?;
            let present = ChunkBits::new(spec.chunks());
            blobs.insert(spec.digest.clone(), CachedBlob { spec, present });
        }
        Ok(ChunkFetcher {
            registry,
            cache,
            blobs,
            timeout: options.chunk_timeout,
            max_in_flight: options.max_in_flight.max(1),
        })
    }

    /// The bound on fetching what one read needs.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Makes chunks `chunks` of `blob` present in the cache for one guest
    /// read: those missing are fetched side by side (as many at once as
    /// the host's request limit lets through), all before `deadline`.
    /// The error names the first chunk that failed, or that was not there
    /// at the deadline.
    ///
    /// The read waits at most until `deadline`; a fetch still running then
    /// finishes in the background (into the cache, for the next read), and
    /// no further one starts.
    ///
    /// Returns the chunks this call fetched: the cache checked each against
    /// its hash before storing it, so their bytes need no second hash.
    pub fn ensure_chunks(
        self: &Arc<Self>,
        blob: &BlobSpec,
        chunks: &[u64],
        deadline: Instant,
    ) -> Result<Vec<u64>, (u64, ociblk_registry::Error)> {
        let missing: Vec<u64> = chunks
            .iter()
            .copied()
            .filter(|&c| !self.chunk_present(blob, c).unwrap_or(false))
            .collect();
        if let [c] = missing[..] {
            return match self.ensure_chunk_as(blob, c, Priority::Foreground) {
                Ok(fetched) => Ok(if fetched { vec![c] } else { Vec::new() }),
                Err(e) => Err((c, e)),
            };
        }
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let job = Arc::new(ReadFetch {
            blob: blob.clone(),
            chunks: missing,
            next: AtomicUsize::new(0),
            deadline,
            timeout: self.timeout,
            abandoned: AtomicBool::new(false),
        });
        let (results, done) = mpsc::channel();
        let workers = job.chunks.len().min(self.max_in_flight);
        let mut started = 0;
        for _ in 0..workers {
            let (fetcher, job, results) = (Arc::clone(self), Arc::clone(&job), results.clone());
            let spawned = std::thread::Builder::new()
                .name("ociblk-fetch".to_owned())
                .spawn(move || fetcher.fetch_for_read(&job, &results));
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!("cannot start a fetch thread: {e}"),
            }
        }
        drop(results);
        if started == 0 {
            // No thread to spare: fetch them here, one after another.
            let (results, here) = mpsc::channel();
            self.fetch_for_read(&job, &results);
            drop(results);
            return collect(&job, &here);
        }
        let outcome = collect(&job, &done);
        job.abandoned.store(true, Ordering::Relaxed);
        outcome
    }

    /// One thread of a read's fetch: starts the next chunk of `job` until
    /// none is left, the deadline has passed or the read gave up.
    fn fetch_for_read(
        &self,
        job: &ReadFetch,
        results: &mpsc::Sender<(u64, ociblk_registry::Result<bool>)>,
    ) {
        while !job.abandoned.load(Ordering::Relaxed) && Instant::now() < job.deadline {
            let Some(&c) = job.chunks.get(job.next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            let result = self.ensure_chunk_as(&job.blob, c, Priority::Foreground);
            if results.send((c, result)).is_err() {
                return;
            }
        }
    }

    /// Makes chunk `c` of `blob` present in the cache, fetching and
    /// verifying it when it is not, taking request slots at `priority`;
    /// `Ok(true)` when this call fetched the chunk.
    pub fn ensure_chunk_as(
        &self,
        blob: &BlobSpec,
        c: u64,
        priority: Priority,
    ) -> ociblk_registry::Result<bool> {
        self.registry.blobs.ensure_chunk_as(blob, c, priority)
    }

    /// Where the cache keeps this image's access record.
    pub fn access_record_path(&self) -> PathBuf {
        self.cache
            .access_record_path(&self.registry.manifest_digest)
    }

    /// Marks a cached chunk whose bytes did not verify absent.
    pub fn invalidate_chunk(&self, blob: &BlobSpec, c: u64) -> ociblk_registry::Result<()> {
        self.registry.blobs.invalidate_chunk(blob, c)
    }

    /// Whether chunk `c` of `blob` is in the cache.
    pub fn chunk_present(&self, blob: &BlobSpec, c: u64) -> ociblk_registry::Result<bool> {
        self.registry.blobs.chunk_present(blob, c)
    }

    /// Requests and bytes fetched from the registry by this process.
    pub fn stats(&self) -> FetchStats {
        self.registry.blobs.fetch_stats()
    }
}

/// Waits for every chunk of `job` until its deadline: the first failure,
/// or the chunks not there at the deadline, fail the read.
fn collect(
    job: &ReadFetch,
    results: &mpsc::Receiver<(u64, ociblk_registry::Result<bool>)>,
) -> Result<Vec<u64>, (u64, ociblk_registry::Error)> {
    let mut pending = job.chunks.clone();
    let mut fetched = Vec::new();
    while !pending.is_empty() {
        let left = job.deadline.saturating_duration_since(Instant::now());
        match results.recv_timeout(left) {
            Ok((c, Ok(by_this_read))) => {
                pending.retain(|&p| p != c);
                if by_this_read {
                    fetched.push(c);
                }
            }
            Ok((c, Err(e))) => return Err((c, e)),
            // The deadline passed, or every thread stopped (at the deadline).
            Err(_) => {
                let list: Vec<String> = pending.iter().map(u64::to_string).collect();
                return Err((
                    pending[0],
                    ociblk_registry::Error::ChunksTimeout {
                        digest: job.blob.digest.to_string(),
                        chunks: list.join(", "),
                        timeout: job.timeout,
                    },
                ));
            }
        }
    }
    Ok(fetched)
}

/// One payload blob of the image in the cache.
#[derive(Debug)]
struct CachedBlob {
    spec: BlobSpec,
    present: ChunkBits,
}

/// The registry cache of one image as the bottom of its payload store.
#[derive(Debug, Clone)]
pub struct CachedBlobs(pub Arc<ChunkFetcher>);

impl CachedBlobs {
    /// `blob` in the cache, by its digest (`None`: not one of the image's
    /// payloads).
    fn cached(&self, blob: &Blob) -> Option<&CachedBlob> {
        self.0.blobs.get(&blob.payload.as_ref()?.digest)
    }
}

impl ChunkStore for CachedBlobs {
    fn ensure(
        &self,
        blob: &Blob,
        chunks: Range<u64>,
        priority: Priority,
    ) -> Result<Vec<u64>, PayloadError> {
        let fetcher = &self.0;
        let Some(cached) = self.cached(blob) else {
            return Ok(Vec::new());
        };
        let missing: Vec<u64> = chunks.filter(|&c| !cached.present.get(c)).collect();
        let fetched = match (&missing[..], priority) {
            ([], _) => Vec::new(),
            // A prefetch fetches one chunk at a time, behind guest reads.
            ([_, _, ..], Priority::Foreground) => {
                let deadline = Instant::now() + fetcher.timeout();
                fetcher
                    .ensure_chunks(&cached.spec, &missing, deadline)
                    .map_err(|(c, source)| fetch_error(blob, c, source))?
            }
            (_, _) => {
                let mut fetched = Vec::new();
                for &c in &missing {
                    if fetcher
                        .ensure_chunk_as(&cached.spec, c, priority)
                        .map_err(|source| fetch_error(blob, c, source))?
                    {
                        fetched.push(c);
                    }
                }
                fetched
            }
        };
        for c in missing {
            cached.present.set(c);
        }
        Ok(fetched)
    }

    fn forget(&self, blob: &Blob, c: u64) -> Result<bool, PayloadError> {
        let fetcher = &self.0;
        let Some(cached) = self.cached(blob) else {
            return Ok(false);
        };
        cached.present.clear(c);
        fetcher
            .invalidate_chunk(&cached.spec, c)
            .map_err(|source| fetch_error(blob, c, source))?;
        Ok(true)
    }

    fn fetches(&self) -> bool {
        true
    }
}

fn fetch_error(blob: &Blob, chunk: u64, source: ociblk_registry::Error) -> PayloadError {
    PayloadError::Fetch {
        payload: blob.name.clone(),
        chunk,
        source: Box::new(source),
    }
}
