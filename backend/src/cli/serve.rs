//! `ociblk serve`: the vhost-user-blk server for one node.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use ociblk_layout::Layout;
use ociblk_overlay::{FlushMode, Overlay, OverlayConfig, OverlayError};
use ociblk_registry::{AccessRecord, Digest};

use super::serve_args::{FlushArg, ServeArgs};
use crate::access::AccessRecorder;
use crate::image_source::ChunkFetcher;
use crate::node_disk::{DeferredOverlay, NodeDisk};
use crate::prefetch::{PrefetchPlan, Prefetcher};
use crate::verifier::Verifiers;
use ociblk_layout::DiskReader;
use ociblk_server::daemon::{SocketClaim, serve_claimed};
use ociblk_server::{ServerOptions, ShutdownSignal};

/// The overlay: opened at start, or at the disk's first request.
enum Opening {
    Now(Option<Overlay>),
    Deferred(DeferredOverlay),
}

/// How long a stopping server waits for the prefetch thread to finish the
/// chunk it is fetching.
const PREFETCH_STOP_WAIT: Duration = Duration::from_secs(2);

/// Checks that `path` can take a file written at shutdown: its directory
/// exists and it is not a directory itself.
fn check_record_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("--record-access {}: is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--record-access {}: no directory {}",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let opts = ServerOptions {
        queues: args.queues,
        queue_size: args.queue_size,
        read_only: args.read_only,
        serial: args
            .serial
            .clone()
            .unwrap_or_else(|| args.layout.seed.clone()),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        io_threads: usize::from(args.io_threads),
        poll_max_us: args.poll_max_us,
        ..ServerOptions::default()
    };
    // Every argument is checked before any file is created (the overlay
    // may be new): the socket path is claimed (its lock file taken, which
    // goes again on any error) and bound once the disk is open.
    opts.validate()?;
    if let Some(path) = &args.record_access {
        check_record_path(path)?;
    }
    let socket = SocketClaim::take(&args.socket)?;
    let (loaded, layout) = args.layout.load()?;
    let fetcher = loaded.fetcher.clone();
    let manifest = loaded.image.manifest_digest.clone();
    let plan = prefetch_plan(args, fetcher.as_deref(), &manifest, &layout)?;
    // The payloads are opened before the overlay, which may be a new file.
    let reader = DiskReader::open(layout).context("cannot open the image's payloads")?;
    let layout = &reader.layout;
    let overlay = match &args.overlay {
        Some(path) => {
            let cfg = OverlayConfig {
                disk_size: layout.size,
                fingerprint: layout.fingerprint,
                flush: match args.flush {
                    FlushArg::Safe => FlushMode::Safe,
                    FlushArg::Unsafe => FlushMode::Unsafe,
                },
            };
            let layers = (!args.layers.is_empty()).then_some(args.layers.as_slice());
            if let Some(seconds) = args.wait_for_overlay {
                let wait = Duration::from_secs(seconds);
                let layers = layers.map(<[PathBuf]>::to_vec);
                Opening::Deferred(DeferredOverlay::new(path.clone(), cfg, layers, wait))
            } else {
                let overlay = if args.read_only {
                    Overlay::open_read_only_over(path, cfg, layers)
                } else {
                    Overlay::open_over(path, cfg, layers)
                };
                Opening::Now(Some(
                    overlay
                        .map_err(with_layer_hint)
                        .context("cannot open the overlay")?,
                ))
            }
        }
        None => Opening::Now(None),
    };
    if args.no_verify {
        match &fetcher {
            None => {
                warn!("--no-verify: payload bytes are served without checking their chunk hashes")
            }
            Some(_) => warn!(
                "--no-verify: cached chunks are served without checking them again; \
                 chunks fetched from the registry are still verified before they are cached"
            ),
        }
    }
    let recorder = args
        .record_access
        .as_ref()
        .map(|_| Arc::new(AccessRecorder::new(layout)));
    let verifiers = Verifiers::recording(
        layout,
        &loaded.origin,
        fetcher.as_ref(),
        !args.no_verify,
        recorder.as_ref(),
    );
    let disk = match overlay {
        Opening::Now(overlay) => NodeDisk::open(reader, overlay, args.read_only, verifiers),
        Opening::Deferred(overlay) => {
            info!(
                wait_s = args.wait_for_overlay,
                "the overlay is opened at the disk's first request"
            );
            NodeDisk::open_deferred(reader, overlay, verifiers)
        }
    };
    info!(
        image = %loaded.origin.display(),
        seed = %args.layout.seed,
        fingerprint = %disk.layout().fingerprint_hex(),
        overlay = ?args.overlay,
        verify = disk.verifiers().is_enabled(),
        layers = disk.overlay().map_or(0, |o| o.chain().layers().len()),
        "node disk ready"
    );
    let shutdown = ShutdownSignal::new()?;
    shutdown.trigger_on_termination_signals()?;
    let prefetcher = match plan {
        Some(plan) => {
            info!(
                record = %plan.path().display(),
                chunks = plan.len(),
                "prefetching recorded chunks in the background"
            );
            Some(
                Prefetcher::start(plan, disk.layout(), disk.verifiers())
                    .context("cannot start prefetching")?,
            )
        }
        None => None,
    };
    let disk = Arc::new(disk);
    let served = serve_claimed(disk.clone(), socket, &opts, shutdown)
        .with_context(|| format!("serving on {}", args.socket.display()));
    if let Some(p) = prefetcher {
        p.stop(PREFETCH_STOP_WAIT);
    }
    // Written also when serving failed after the guest read something:
    // that is still worth prefetching. A server that never served keeps
    // an earlier record.
    if let (Some(path), Some(recorder)) = (&args.record_access, &recorder)
        && (served.is_ok() || !recorder.is_empty())
    {
        write_record(path, recorder.record(manifest.clone()), fetcher.as_deref())?;
    }
    served?;
    for v in disk.verifiers().iter() {
        info!(
            payload = %v.payload(),
            chunks = v.hashes().count(),
            verified = v.verified_count(),
            hashed = v.hashed_count(),
            "payload verification"
        );
    }
    if let Some(f) = &fetcher {
        let stats = f.stats();
        info!(
            requests = stats.requests,
            bytes = stats.bytes,
            "fetched from the registry"
        );
    }
    info!("stopped");
    Ok(())
}

/// A layer the overlay records that is gone may only have moved: the
/// error says how to name it where it is now.
fn with_layer_hint(e: OverlayError) -> anyhow::Error {
    match e {
        OverlayError::LayerMissing {
            overlay: Some(_), ..
        } => anyhow::anyhow!(
            "{e}; if it was moved, give the overlay's whole chain where it is now, \
             bottom first: --layer NEWPATH for each layer (the digests must match the record)"
        ),
        e => anyhow::Error::new(e),
    }
}

/// The record to prefetch: `--prefetch FILE` (refused when it does not fit
/// the image), else for a registry image the one the cache holds (ignored
/// with a warning when it does not fit), unless `--no-prefetch`.
fn prefetch_plan(
    args: &ServeArgs,
    fetcher: Option<&ChunkFetcher>,
    manifest: &Digest,
    layout: &Layout,
) -> Result<Option<PrefetchPlan>> {
    if let Some(path) = &args.prefetch {
        if fetcher.is_none() && args.no_verify {
            bail!(
                "--prefetch {}: a local layout is prefetched by verifying its chunks ahead, \
                 and --no-verify turns that off; leave out one of the two",
                path.display()
            );
        }
        return Ok(Some(PrefetchPlan::load(path, manifest.hex(), layout)?));
    }
    let Some(fetcher) = fetcher.filter(|_| !args.no_prefetch) else {
        return Ok(None);
    };
    let path = fetcher.access_record_path();
    if !path.exists() {
        return Ok(None);
    }
    match PrefetchPlan::load(&path, manifest.hex(), layout) {
        Ok(plan) => Ok(Some(plan)),
        Err(e) => {
            warn!("not prefetching from the cache's access record: {e}");
            Ok(None)
        }
    }
}

/// Writes the access record to `path` and, for a registry image, to the
/// cache (where a failure costs only a warning).
fn write_record(path: &Path, record: AccessRecord, fetcher: Option<&ChunkFetcher>) -> Result<()> {
    record
        .write(path)
        .with_context(|| format!("cannot write the access record {}", path.display()))?;
    info!(
        record = %path.display(),
        chunks = record.chunks.len(),
        "access record written"
    );
    // An empty record would only replace a useful one.
    if let Some(f) = fetcher.filter(|_| !record.chunks.is_empty()) {
        let cached = f.access_record_path();
        if let Err(e) = record.write(&cached) {
            warn!("cannot keep the access record in the cache: {e}");
        }
    }
    Ok(())
}
