//! `ociblk verify`: every chunk of every payload against the image's chunk
//! hashes, before a long test run or in CI.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use ociblk_registry::limiter::Priority;

use super::layout_args::ImageArgs;
use crate::image_source::LoadedImage;
use crate::payload::{PayloadError, Payloads};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub image: ImageArgs,
}

pub fn run(args: &VerifyArgs) -> Result<()> {
    let loaded = args.image.open()?;
    let summary = check_every_chunk(&loaded)?;
    println!("{}", summary.line());
    summary.result(&loaded)
}

/// What [`check_every_chunk`] found.
#[derive(Debug, Default)]
pub struct Summary {
    pub payloads: usize,
    pub chunks: u64,
    pub bytes: u64,
    pub bad: u64,
    /// Chunks fetched but not stored: the cache's file system is full.
    pub no_space: u64,
    /// Compressed payloads, whose chunks are not checked.
    pub unchecked: usize,
    pub elapsed: Duration,
}

impl Summary {
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        format!(
            "{} chunks, {} bytes of {} payloads in {secs:.3} s ({:.2} GB/s): {}",
            self.chunks,
            self.bytes,
            self.payloads,
            self.bytes as f64 / 1e9 / secs.max(1e-9),
            match (self.bad, self.no_space) {
                (0, 0) => "all match".to_owned(),
                (bad, 0) => format!("{bad} bad"),
                (0, full) => format!("{full} not stored (no space)"),
                (bad, full) => format!("{bad} bad, {full} not stored (no space)"),
            }
        )
    }

    /// Fails when a chunk was bad or a payload could not be checked.
    pub fn result(&self, loaded: &LoadedImage) -> Result<()> {
        if self.no_space > 0 {
            bail!(
                "{} of {} chunks of {} could not be stored: no space left on the cache's \
                 file system (free some, or `ociblk cache gc`){}",
                self.no_space,
                self.chunks,
                loaded.origin.display(),
                if self.bad > 0 {
                    format!("; {} more could not be verified", self.bad)
                } else {
                    String::new()
                }
            );
        }
        if self.bad > 0 {
            bail!(
                "{} of {} chunks of {} could not be verified against the image's chunk hashes",
                self.bad,
                self.chunks,
                loaded.origin.display()
            );
        }
        if self.unchecked > 0 {
            bail!("{} compressed payloads were not checked", self.unchecked);
        }
        Ok(())
    }
}

/// Hashes every chunk of every uncompressed payload (for a registry image:
/// fetching each chunk into the cache first), listing each bad chunk on
/// stdout as `BAD ...`; a progress bar on a terminal.
pub fn check_every_chunk(loaded: &LoadedImage) -> Result<Summary> {
    let image = &loaded.image;
    let total: u64 = image.payloads.iter().map(|p| p.size).sum();
    let progress = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let start = Instant::now();
    let mut summary = Summary::default();
    let payloads = Payloads::of_image(loaded).context("cannot open the image's payloads")?;
    // The store holds the uncompressed payloads, in the image's order.
    let mut id = 0;
    for p in &image.payloads {
        if !p.is_uncompressed() {
            eprintln!(
                "payload {:?}: compressed ({}), its chunks are not checked",
                p.name, p.media_type
            );
            summary.unchecked += 1;
            continue;
        }
        summary.payloads += 1;
        if let Some(bar) = &progress {
            bar.set_message(p.name.clone());
        }
        let hashes = &p.chunk_hashes;
        for c in 0..hashes.count() {
            let range = hashes.range(c);
            if let Err(e) = payloads.ensure(id, range.clone(), Priority::Foreground) {
                let line = match &e {
                    PayloadError::Fetch { source, .. } if source.is_no_space() => {
                        summary.no_space += 1;
                        format!("NO SPACE {e}")
                    }
                    PayloadError::Fetch { source, .. } => {
                        summary.bad += 1;
                        format!("BAD {e}: {source}")
                    }
                    _ => {
                        summary.bad += 1;
                        format!("BAD {e}")
                    }
                };
                match &progress {
                    Some(bar) => bar.println(line),
                    None => println!("{line}"),
                }
            }
            summary.chunks += 1;
            summary.bytes += range.end - range.start;
            if let Some(bar) = &progress {
                bar.inc(range.end - range.start);
            }
        }
        id += 1;
    }
    summary.elapsed = start.elapsed();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(summary)
}
