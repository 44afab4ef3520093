//! `ociblk export`: the node disk as a sparse raw file.

use std::fs::{File, OpenOptions, Permissions};
use std::io::IsTerminal;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::layout_args::LayoutArgs;
use crate::export::{apply_overlay, export_disk};
use crate::overlay::{FlushMode, OVERLAY_MODE, Overlay, OverlayConfig};
use crate::verifier::Verifiers;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Raw disk file to write (created or truncated; mode 0600).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Export the node's current disk: the base with this overlay's writes
    /// on top. The overlay must exist and not be in use by a server; it is
    /// only read.
    #[arg(long, value_name = "FILE")]
    pub overlay: Option<PathBuf>,
    /// Copy payload bytes without checking them against the image's chunk
    /// hashes (by default each chunk is verified before it is copied). A
    /// registry image's chunks are still verified as they are fetched.
    #[arg(long)]
    pub no_verify: bool,
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let (loaded, layout) = args.layout.load()?;
    // Open (and lock) the overlay first: it may not fit this disk.
    let overlay = match &args.overlay {
        Some(path) => {
            anyhow::ensure!(path.exists(), "overlay {} does not exist", path.display());
            let cfg = OverlayConfig {
                disk_size: layout.size,
                fingerprint: layout.fingerprint,
                flush: FlushMode::Unsafe,
            };
            Some(Overlay::open_read_only(path, cfg).context("cannot open the overlay")?)
        }
        None => None,
    };
    let reader =
        ociblk_layout::DiskReader::open(layout).context("cannot open the image's payloads")?;
    // The export holds the node's data: private, like the overlay.
    let out: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(OVERLAY_MODE)
        .open(&args.output)
        .and_then(|f| {
            f.set_permissions(Permissions::from_mode(OVERLAY_MODE))
                .map(|()| f)
        })
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(reader.layout.extents.summary().file_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    if args.no_verify {
        eprintln!(
            "--no-verify: payload bytes are copied without checking their chunk hashes{}",
            if loaded.fetcher.is_some() {
                " (chunks fetched from the registry are still verified before they are cached)"
            } else {
                ""
            }
        );
    }
    let verifiers = Verifiers::for_image(
        &reader.layout,
        &loaded.origin,
        loaded.fetcher.as_ref(),
        !args.no_verify,
    );
    let stats = match export_disk(&reader, &verifiers, &out, |n| {
        if let Some(bar) = &progress {
            bar.inc(n);
        }
    }) {
        Ok(stats) => stats,
        Err(e) => {
            // A partial disk must not pass for the node's disk.
            drop(out);
            let removed = std::fs::remove_file(&args.output).is_ok();
            return Err(anyhow::Error::new(e).context(format!(
                "cannot write {}{}",
                args.output.display(),
                if removed { " (removed)" } else { "" }
            )));
        }
    };
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if let Some(overlay) = &overlay {
        let n = apply_overlay(overlay, &out)
            .with_context(|| format!("cannot apply the overlay to {}", args.output.display()))?;
        eprintln!("applied {} bytes of overlay data", n);
    }
    eprintln!(
        "wrote {} ({} bytes; {} bytes of payloads copied{}, {} bytes of metadata)",
        args.output.display(),
        reader.layout.size,
        stats.copied,
        if verifiers.is_enabled() {
            " and verified"
        } else {
            ""
        },
        stats.generated
    );
    Ok(())
}
