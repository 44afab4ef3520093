//! `ociblk serve`: the vhost-user-blk server for one node.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use ociblk_layout::Layout;
use ociblk_overlay::{FlushMode, OverlayError};
use ociblk_registry::{AccessRecord, Digest};

use super::serve_args::{FlushArg, ServeArgs};
use crate::node_disk::{NodeDisk, OpenDiskError, OverlayOpening, OverlayRequest, open_parts};
use crate::payload::{ChunkFetcher, PayloadOptions};
use crate::prefetch::{PrefetchPlan, Prefetcher};
use ociblk_server::daemon::{SocketClaim, serve_claimed};
use ociblk_server::{ServerOptions, ShutdownSignal};

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
    let opts = server_options(args);
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
    if args.no_verify {
        warn_no_verify(fetcher.is_some());
    }
    let payloads = PayloadOptions {
        verify: !args.no_verify,
        record: args.record_access.is_some(),
    };
    let parts =
        open_parts(&loaded, layout, payloads, overlay_request(args)).map_err(with_layer_hint)?;
    if let OverlayOpening::Deferred(_) = parts.overlay {
        info!(
            wait_s = args.wait_for_overlay,
            "the overlay is opened at the disk's first request"
        );
    }
    let disk = Arc::new(NodeDisk::new(parts, args.read_only));
    info!(
        image = %loaded.origin.display(),
        seed = %args.layout.seed,
        fingerprint = %disk.layout().fingerprint_hex(),
        overlay = ?args.overlay,
        verify = disk.payloads().verifies(),
        layers = disk.overlay().map_or(0, |o| o.chain().layers().len()),
        "node disk ready"
    );
    let shutdown = ShutdownSignal::new()?;
    shutdown.trigger_on_termination_signals()?;
    let prefetcher = plan.map(|plan| start_prefetch(plan, &disk)).transpose()?;
    let served = serve_claimed(disk.clone(), socket, &opts, shutdown)
        .with_context(|| format!("serving on {}", args.socket.display()));
    if let Some(p) = prefetcher {
        p.stop(PREFETCH_STOP_WAIT);
    }
    // Written also when serving failed after the guest read something:
    // that is still worth prefetching. A server that never served keeps
    // an earlier record.
    if let (Some(path), Some(recorder)) = (&args.record_access, disk.payloads().recorder())
        && (served.is_ok() || !recorder.is_empty())
    {
        write_record(path, recorder.record(manifest.clone()), fetcher.as_deref())?;
    }
    served?;
    log_totals(&disk, fetcher.as_deref());
    info!("stopped");
    Ok(())
}

/// The server's options from `args`.
fn server_options(args: &ServeArgs) -> ServerOptions {
    ServerOptions {
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
    }
}

/// What `--no-verify` leaves unchecked, for a registry image or not.
fn warn_no_verify(registry: bool) {
    if registry {
        warn!(
            "--no-verify: cached chunks are served without checking them again; \
             chunks fetched from the registry are still verified before they are cached"
        );
    } else {
        warn!("--no-verify: payload bytes are served without checking their chunk hashes");
    }
}

/// Starts replaying `plan` in the background against `disk`'s payloads.
fn start_prefetch(plan: PrefetchPlan, disk: &NodeDisk) -> Result<Prefetcher> {
    info!(
        record = %plan.path().display(),
        chunks = plan.len(),
        "prefetching recorded chunks in the background"
    );
    Prefetcher::start(plan, disk.payloads().clone()).context("cannot start prefetching")
}

/// The closing log lines: each payload's verification, and what was
/// fetched from the registry.
fn log_totals(disk: &NodeDisk, fetcher: Option<&ChunkFetcher>) {
    for (payload, counts) in disk.payloads().verification_counts() {
        info!(
            payload = %payload,
            chunks = counts.chunks,
            verified = counts.verified,
            hashed = counts.hashed,
            "payload verification"
        );
    }
    if let Some(f) = fetcher {
        let stats = f.stats();
        info!(
            requests = stats.requests,
            bytes = stats.bytes,
            "fetched from the registry"
        );
    }
}

/// How `args` ask for the overlay to be opened.
fn overlay_request(args: &ServeArgs) -> Option<OverlayRequest> {
    let path = args.overlay.clone()?;
    let layers = (!args.layers.is_empty()).then(|| args.layers.clone());
    let flush = match args.flush {
        FlushArg::Safe => FlushMode::Safe,
        FlushArg::Unsafe => FlushMode::Unsafe,
    };
    Some(match (args.wait_for_overlay, args.read_only) {
        (Some(seconds), _) => OverlayRequest::Deferred {
            path,
            flush,
            layers,
            wait: Duration::from_secs(seconds),
        },
        (None, true) => OverlayRequest::ReadOnly { path, layers },
        (None, false) => OverlayRequest::ReadWrite {
            path,
            flush,
            layers,
        },
    })
}

/// A layer the overlay records that is gone may only have moved: the
/// error says how to name it where it is now.
fn with_layer_hint(e: OpenDiskError) -> anyhow::Error {
    match e {
        OpenDiskError::Overlay(
            e @ OverlayError::LayerMissing {
                overlay: Some(_), ..
            },
        ) => anyhow::anyhow!(
            "{e}; if it was moved, give the overlay's whole chain where it is now, \
             bottom first: --layer NEWPATH for each layer (the digests must match the record)"
        )
        .context("cannot open the overlay"),
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
        return Ok(Some(PrefetchPlan::load(path, manifest, layout)?));
    }
    let Some(fetcher) = fetcher.filter(|_| !args.no_prefetch) else {
        return Ok(None);
    };
    let path = fetcher.access_record_path();
    if !path.exists() {
        return Ok(None);
    }
    match PrefetchPlan::load(&path, manifest, layout) {
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
