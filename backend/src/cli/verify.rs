//! `ociblk verify`: every chunk of every payload against the image's chunk
//! hashes, before a long test run or in CI.

use std::fs::File;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use ociblk_layout::OsImage;

use crate::verifier::check_chunk;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// OS image: an OCI image layout directory in Monogon's format.
    #[arg(long, value_name = "DIR")]
    pub image: PathBuf,
}

pub fn run(args: &VerifyArgs) -> Result<()> {
    let image = OsImage::open(&args.image)
        .with_context(|| format!("cannot open the OS image {}", args.image.display()))?;
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
    let (mut chunks, mut bytes, mut bad, mut unchecked) = (0u64, 0u64, 0u64, 0usize);
    for p in &image.payloads {
        if !p.is_uncompressed() {
            eprintln!(
                "payload {:?}: compressed ({}), its chunks are not checked",
                p.name, p.media_type
            );
            unchecked += 1;
            continue;
        }
        if let Some(bar) = &progress {
            bar.set_message(p.name.clone());
        }
        let file =
            File::open(&p.path).with_context(|| format!("cannot open {}", p.path.display()))?;
        let hashes = &p.chunk_hashes;
        for c in 0..hashes.count() {
            let range = hashes.range(c);
            if let Err(e) = check_chunk(&p.name, &p.path, &file, hashes, c) {
                let line = format!("BAD {e}");
                match &progress {
                    Some(bar) => bar.println(line),
                    None => println!("{line}"),
                }
                bad += 1;
            }
            chunks += 1;
            bytes += range.end - range.start;
            if let Some(bar) = &progress {
                bar.inc(range.end - range.start);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    println!(
        "{chunks} chunks, {bytes} bytes of {} payloads in {secs:.3} s ({:.2} GB/s): {}",
        image.payloads.len() - unchecked,
        bytes as f64 / 1e9 / secs.max(1e-9),
        if bad == 0 {
            "all match".to_owned()
        } else {
            format!("{bad} bad")
        }
    );
    if bad > 0 {
        bail!(
            "{bad} of {chunks} chunks of {} do not match the image's chunk hashes",
            args.image.display()
        );
    }
    if unchecked > 0 {
        bail!("{unchecked} compressed payloads were not checked");
    }
    Ok(())
}
