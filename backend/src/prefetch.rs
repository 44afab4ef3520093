//! Replaying an access record (`ociblk serve --prefetch`): one background
//! thread walks the recorded chunks in order and makes each present and
//! verified before the guest asks for it.
//!
//! It goes through the same path as a guest read (the payload store:
//! the cache's per-chunk locks, the fetch's verification, the registry
//! host's request limit), with these differences: its requests take a slot
//! only while no guest fetch waits for one (so it holds at most one slot,
//! behind guest reads), the thread runs at the lowest CPU priority and
//! takes no lock a guest read could wait on other than the cache's lock on
//! the chunk it is fetching, and its reads are not recorded as the guest's. A chunk the guest reads first is
//! simply found verified. For a local layout a prefetch reads and verifies
//! the chunks ahead, warming the page cache and taking the hashing off the
//! guest's first reads.
//!
//! The thread checks for shutdown between chunks; the server waits for it
//! only a bounded time (a fetch in progress can take up to the fetch
//! timeout), and it holds no part of the node's disk, so the overlay is
//! closed cleanly either way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ociblk_layout::Layout;
use ociblk_registry::{AccessRecord, Digest};
use tracing::{info, warn};

use crate::payload::{Payloads, Prefetched};

/// Consecutive failed chunks after which a prefetch gives up (the registry
/// is down or refuses): each failure may have taken the fetch timeout.
const GIVE_UP_AFTER: u32 = 3;

/// Why an access record cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error(transparent)]
    Read(#[from] ociblk_registry::Error),
    #[error(
        "access record {}: made for the image with manifest {recorded}, but this image is {image}",
        path.display()
    )]
    OtherImage {
        path: PathBuf,
        recorded: Digest,
        image: Digest,
    },
    #[error(
        "access record {}: line {line}: chunk {index} of blob {blob} is past the blob's end ({chunks} chunks)",
        path.display()
    )]
    ChunkIndex {
        path: PathBuf,
        line: usize,
        blob: Digest,
        index: u64,
        chunks: u64,
    },
}

/// The chunks of a record that are on this disk, by layout source.
#[derive(Debug)]
pub struct PrefetchPlan {
    path: PathBuf,
    chunks: Vec<(usize, u64)>,
    /// Recorded chunks of payloads this disk does not use.
    not_on_disk: usize,
}

impl PrefetchPlan {
    /// Reads the record at `path` and maps it onto `layout` of the image
    /// with manifest digest `manifest`. A record for
    /// another image, a chunk past its blob's end, or a malformed record is
    /// refused, naming the file (and line).
    pub fn load(path: &Path, manifest: &Digest, layout: &Layout) -> Result<Self, PrefetchError> {
        let record = AccessRecord::read(path)?;
        if record.manifest != *manifest {
            return Err(PrefetchError::OtherImage {
                path: path.to_path_buf(),
                recorded: record.manifest,
                image: manifest.clone(),
            });
        }
        let mut sources: HashMap<&Digest, (usize, u64)> = HashMap::new();
        for (i, s) in layout.sources.iter().enumerate() {
            if let Some(h) = &s.chunk_hashes {
                sources.entry(&s.digest).or_insert((i, h.count()));
            }
        }
        let mut chunks = Vec::with_capacity(record.chunks.len());
        let mut not_on_disk = 0;
        for r in record.chunks {
            let Some(&(source, count)) = sources.get(&r.chunk.blob) else {
                not_on_disk += 1;
                continue;
            };
            if r.chunk.index >= count {
                return Err(PrefetchError::ChunkIndex {
                    path: path.to_path_buf(),
                    line: r.line,
                    blob: r.chunk.blob,
                    index: r.chunk.index,
                    chunks: count,
                });
            }
            chunks.push((source, r.chunk.index));
        }
        Ok(PrefetchPlan {
            path: path.to_path_buf(),
            chunks,
            not_on_disk,
        })
    }

    /// Chunks to prefetch.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a prefetch did, for its closing log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchReport {
    pub fetched: u64,
    pub present: u64,
    pub failed: u64,
    /// Recorded chunks left out: of payloads not on this disk, or not
    /// served through a verifier (a local layout with `--no-verify`).
    pub skipped: u64,
    pub stopped: bool,
}

/// The running prefetch thread.
#[derive(Debug)]
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<PrefetchReport>>,
}

impl Prefetcher {
    /// Starts replaying `plan` against `payloads`, the store of the disk
    /// being served.
    pub fn start(plan: PrefetchPlan, payloads: Arc<Payloads>) -> std::io::Result<Self> {
        let mut skipped = plan.not_on_disk as u64;
        let mut chunks = Vec::with_capacity(plan.chunks.len());
        for &(source, c) in &plan.chunks {
            if payloads.prefetches(source) {
                chunks.push((source, c));
            } else {
                skipped += 1;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new().name("prefetch".into()).spawn({
            let stop = stop.clone();
            let path = plan.path.clone();
            move || {
                lower_priority();
                let start = Instant::now();
                let mut report = run(&chunks, &payloads, &stop);
                report.skipped = skipped;
                info!(
                    record = %path.display(),
                    chunks = chunks.len(),
                    fetched = report.fetched,
                    already_present = report.present,
                    failed = report.failed,
                    skipped = report.skipped,
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "{}",
                    if report.stopped { "prefetch stopped" } else { "prefetch done" }
                );
                let _ = tx.send(());
                report
            }
        })?;
        Ok(Prefetcher {
            stop,
            done,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop and waits for it at most `bound`; `None`
    /// when it was still busy with a chunk (it is left to the process's
    /// exit: it holds nothing that needs closing).
    pub fn stop(mut self, bound: Duration) -> Option<PrefetchReport> {
        self.stop.store(true, Ordering::Relaxed);
        match self.done.recv_timeout(bound) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.thread.take().and_then(|t| t.join().ok())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!("prefetch still fetching a chunk after {bound:?}; not waiting for it");
                None
            }
        }
    }
}

fn run(chunks: &[(usize, u64)], payloads: &Payloads, stop: &AtomicBool) -> PrefetchReport {
    let mut report = PrefetchReport::default();
    let mut failures_in_a_row = 0;
    for &(source, c) in chunks {
        if stop.load(Ordering::Relaxed) {
            report.stopped = true;
            break;
        }
        match payloads.prefetch(source, c) {
            Ok(Prefetched::Fetched) => report.fetched += 1,
            Ok(Prefetched::Present) => report.present += 1,
            Err(e) => {
                report.failed += 1;
                failures_in_a_row += 1;
                let payload = payloads.blob(source).map_or("", |b| b.name.as_str());
                warn!(payload = %payload, chunk = c, "prefetch of a chunk failed: {e}");
                if failures_in_a_row >= GIVE_UP_AFTER {
                    warn!("prefetch gives up after {GIVE_UP_AFTER} failed chunks in a row");
                    break;
                }
                continue;
            }
        }
        failures_in_a_row = 0;
    }
    report
}

/// Makes the calling thread the last to get a CPU (nice 19): prefetching
/// must not slow the queue workers down.
fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority only reads its arguments; with PRIO_PROCESS and a
    // thread id, Linux changes that thread's nice value alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc != 0 {
        tracing::debug!(
            "prefetch thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
