//! `ociblk export`: the node disk as a sparse raw file.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::layout_args::LayoutArgs;
use crate::export::{Input, OutputFile, apply_overlay, export_disk};
use crate::node_disk::{DiskParts, OverlayOpening, OverlayRequest, open_parts};
use crate::payload::PayloadOptions;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Raw disk file to write: a new path, or a regular file, which is
    /// replaced. The disk is written to a new file (mode 0600) in FILE's
    /// directory and renamed to FILE only once it is whole, so a file that
    /// was there keeps its content and mode until then and is never
    /// changed, and a failed export leaves nothing. Refused: a symbolic
    /// link, directory, device, FIFO or socket, and a file the export
    /// reads (the overlay, a layer under it, a payload blob).
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
    if let Some(path) = &args.overlay {
        anyhow::ensure!(path.exists(), "overlay {} does not exist", path.display());
    }
    let payloads = PayloadOptions {
        verify: !args.no_verify,
        record: false,
    };
    let overlay = args
        .overlay
        .clone()
        .map(|path| OverlayRequest::ReadOnly { path, layers: None });
    let DiskParts {
        layout,
        payloads,
        overlay,
    } = open_parts(&loaded, layout, payloads, overlay)?;
    let overlay = match overlay {
        OverlayOpening::Open(overlay) => Some(overlay),
        OverlayOpening::None | OverlayOpening::Deferred(_) => None,
    };
    // The output must be none of the files this export reads.
    let mut inputs = Vec::new();
    if let (Some(path), Some(overlay)) = (&args.overlay, &overlay) {
        inputs.push(Input::at("the overlay", path).with_context(|| path.display().to_string())?);
        for layer in overlay.chain().layers() {
            inputs.push(
                Input::at("a layer under the overlay", layer.path())
                    .with_context(|| layer.path().display().to_string())?,
            );
        }
    }
    for (id, source) in layout.sources.iter().enumerate() {
        let Some(blob) = payloads.blob(id) else {
            continue;
        };
        let meta = blob
            .metadata()
            .with_context(|| source.path.display().to_string())?;
        inputs.push(Input::opened(source_role(source), &source.path, &meta));
    }
    let output = OutputFile::create(&args.output, &inputs).context("cannot write the disk")?;
    let out = output.file();
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(layout.extents.summary().file_bytes);
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
    // A partial disk must not pass for the node's disk: on an error the
    // new file goes again (dropping `output`), the output is left as it was.
    let stats = export_disk(&layout, &payloads, out, |n| {
        if let Some(bar) = &progress {
            bar.inc(n);
        }
    })
    .with_context(|| format!("cannot write {} (left as it was)", args.output.display()))?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if let Some(overlay) = &overlay {
        let n = apply_overlay(overlay, out).with_context(|| {
            format!(
                "cannot apply the overlay to {} (left as it was)",
                args.output.display()
            )
        })?;
        eprintln!("applied {} bytes of overlay data", n);
    }
    output.commit().context("cannot write the disk")?;
    eprintln!(
        "wrote {} ({} bytes; {} bytes of payloads copied{}, {} bytes of metadata)",
        args.output.display(),
        layout.size,
        stats.copied,
        if payloads.verifies() {
            " and verified"
        } else {
            ""
        },
        stats.generated
    );
    Ok(())
}

/// What a source of the disk is, for a message.
fn source_role(source: &ociblk_layout::Source) -> String {
    if source.chunk_hashes.is_some() {
        format!("the blob of payload {:?}", source.name)
    } else {
        format!("the {} file", source.name)
    }
}
