//! `ociblk pull`: fetch every chunk of a registry image into the host
//! cache, to warm a host before its nodes start (or to run them offline).

use anyhow::{Result, bail};
use clap::Args;

use super::layout_args::RegistryArgs;
use super::verify::check_every_chunk;
use crate::image_source::open_image;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Registry reference HOST[:PORT]/REPO[:TAG|@sha256:DIGEST].
    #[arg(value_name = "REF")]
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn run(args: &PullArgs) -> Result<()> {
    let arg = std::path::Path::new(&args.reference);
    let loaded = open_image(arg, &args.registry.settings())?;
    let Some(fetcher) = loaded.fetcher.clone() else {
        bail!(
            "{} is a local directory, not a registry reference: nothing to pull",
            args.reference
        );
    };
    let summary = check_every_chunk(&loaded)?;
    let stats = fetcher.stats();
    println!(
        "{} ({}): {}; fetched {} bytes in {} requests",
        args.reference,
        loaded.origin.display(),
        summary.line(),
        stats.bytes,
        stats.requests
    );
    summary.result(&loaded)
}
