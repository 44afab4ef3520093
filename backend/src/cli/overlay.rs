//! `ociblk overlay`: look at or empty a node's overlay file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::overlay::Overlay;

#[derive(Debug, Args)]
pub struct OverlayArgs {
    #[command(subcommand)]
    pub command: OverlayCommand,
}

#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// Show what the overlay holds (works while a server uses it; counts are
    /// as of its last flush). After a clean close the map is checked against
    /// the checksum recorded then; a mismatch is an error.
    Info {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Forget every write: the node's disk reads as the image again. Refused
    /// while a server uses the overlay.
    Reset { file: PathBuf },
}

pub fn run(args: &OverlayArgs) -> Result<()> {
    match &args.command {
        OverlayCommand::Info { file, json } => {
            let i = Overlay::info(file)
                .with_context(|| format!("cannot read overlay {}", file.display()))?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "file": file,
                        "disk_size": i.disk_size,
                        "fingerprint": i.fingerprint_hex(),
                        "block_size": i.block_size,
                        "blocks": i.blocks,
                        "blocks_written": i.written,
                        "blocks_zeroed": i.zeroed,
                        "allocated_bytes": i.allocated_bytes,
                        "file_size": i.file_size,
                        "clean": i.clean,
                        "map_checksum": i.map_check.as_str(),
                    }))?
                );
            } else {
                println!("Overlay        {}", file.display());
                println!("Disk size      {} bytes", i.disk_size);
                println!("Fingerprint    {}", i.fingerprint_hex());
                println!("Blocks         {} x {} bytes", i.blocks, i.block_size);
                println!(
                    "Written        {} blocks ({} bytes)",
                    i.written,
                    i.written * i.block_size
                );
                println!("Zeroed         {} blocks", i.zeroed);
                println!(
                    "Allocated      {} bytes on disk (file size {})",
                    i.allocated_bytes, i.file_size
                );
                println!(
                    "Closed cleanly {}",
                    if i.clean {
                        "yes"
                    } else {
                        "no (in use, or the server was killed)"
                    }
                );
                println!("Map checksum   {}", i.map_check.as_str());
            }
        }
        OverlayCommand::Reset { file } => {
            Overlay::reset(file)
                .with_context(|| format!("cannot reset overlay {}", file.display()))?;
            println!("reset {}", file.display());
        }
    }
    Ok(())
}
