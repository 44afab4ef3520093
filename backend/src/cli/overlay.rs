//! `ociblk overlay`: look at, empty, freeze or verify a node's overlay file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use ociblk_digest::Digest;
use ociblk_overlay::{Overlay, OverlayError, OverlayInfo, layer};

#[derive(Debug, Args)]
pub struct OverlayArgs {
    #[command(subcommand)]
    pub command: OverlayCommand,
}

#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// Show what the overlay (or frozen layer) holds and the chain of layers
    /// it sits on (works while a server uses it; counts are as of its last
    /// flush). After a clean close the map is checked against the checksum
    /// recorded then; a mismatch is an error. A chain that cannot be opened
    /// (a layer missing or modified) is reported, not an error; so is a
    /// file without a header yet (empty: `serve` initialises it).
    Info {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Forget every write: the node's disk reads as the image again, or as
    /// the layers under the overlay (the chain stays). Refused while a
    /// server uses the overlay.
    Reset { file: PathBuf },
    /// Freeze the overlay into an immutable layer file (mode 0400, named by
    /// a sha256 content digest, never written again), then make OVERLAY an
    /// empty overlay over the layer: the node's disk reads the same. Refused
    /// while a server uses the overlay; one not closed cleanly is first
    /// recovered as a restarted server would. Data blocks are shared with
    /// the overlay where the file system can (FICLONERANGE), else copied
    /// with copy_file_range; holes stay holes. LAYER must not exist.
    Freeze { overlay: PathBuf, layer: PathBuf },
    /// Recompute the content digest of a layer, or of every layer under an
    /// overlay, reading all their data (opening a layer checks only its
    /// header and map).
    Verify { file: PathBuf },
}

pub fn run(args: &OverlayArgs) -> Result<()> {
    match &args.command {
        OverlayCommand::Info { file, json } => {
            let i = match Overlay::info(file) {
                // A valid overlay that holds nothing yet: an answer, not an error.
                Err(e @ OverlayError::NotInitialised { .. }) => {
                    if *json {
                        let v = json!({
                            "file": file,
                            "kind": "overlay",
                            "initialised": false,
                            "state": e.to_string(),
                        });
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        println!("{e}");
                    }
                    return Ok(());
                }
                r => r.with_context(|| format!("cannot read overlay {}", file.display()))?,
            };
            if *json {
                print_json(file, &i)?;
            } else {
                print_text(file, &i);
            }
        }
        OverlayCommand::Reset { file } => {
            Overlay::reset(file)
                .with_context(|| format!("cannot reset overlay {}", file.display()))?;
            println!("reset {}", file.display());
        }
        OverlayCommand::Freeze { overlay, layer: to } => {
            let f = layer::freeze(overlay, to)
                .with_context(|| format!("cannot freeze overlay {}", overlay.display()))?;
            println!("froze {} into {}", overlay.display(), f.layer.display());
            println!("Digest         {}", Digest::from_sha256(&f.digest));
            println!(
                "Parent         {}",
                f.parent
                    .map_or("none (the base disk)".into(), |p| Digest::from_sha256(&p)
                        .to_string())
            );
            println!(
                "Blocks         {} written, {} zeroed",
                f.data_blocks, f.zero_blocks
            );
            println!(
                "Data           {} bytes shared, {} copied in the kernel, {} read and written",
                f.copy.cloned, f.copy.copied, f.copy.written
            );
            println!("Overlay        now empty over {} layer(s)", f.chain.len());
        }
        OverlayCommand::Verify { file } => {
            let verified =
                layer::verify(file).with_context(|| format!("cannot verify {}", file.display()))?;
            if verified.is_empty() {
                println!("{} sits on no layers: nothing to verify", file.display());
            }
            for v in verified {
                println!(
                    "verified {} {} ({} bytes of data)",
                    v.path.display(),
                    Digest::from_sha256(&v.digest),
                    v.data_bytes
                );
            }
        }
    }
    Ok(())
}

fn chain_json(i: &OverlayInfo) -> serde_json::Value {
    i.chain
        .iter()
        .map(|e| {
            json!({
                "digest": Digest::from_sha256(&e.digest).to_string(),
                "path": String::from_utf8_lossy(&e.path),
            })
        })
        .collect()
}

fn print_json(file: &Path, i: &OverlayInfo) -> Result<()> {
    let mut v = json!({
        "file": file,
        "kind": if i.layer.is_some() { "layer" } else { "overlay" },
        "initialised": true,
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
        "chain": chain_json(i),
        "chain_problem": i.chain_problem,
    });
    if let Some(l) = &i.layer {
        v["digest"] = json!(Digest::from_sha256(&l.digest).to_string());
        v["parent"] = json!(l.parent.map(|p| Digest::from_sha256(&p).to_string()));
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn print_text(file: &Path, i: &OverlayInfo) {
    if let Some(l) = &i.layer {
        println!("Layer          {}", file.display());
        println!("Digest         {}", Digest::from_sha256(&l.digest));
        println!(
            "Parent         {}",
            l.parent
                .map_or("none (the base disk)".into(), |p| Digest::from_sha256(&p)
                    .to_string())
        );
    } else {
        println!("Overlay        {}", file.display());
    }
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
    if i.layer.is_some() {
        println!("Map            checked against the layer's digest");
        return;
    }
    println!(
        "Closed cleanly {}",
        if i.clean {
            "yes"
        } else {
            "no (in use, or the server was killed)"
        }
    );
    println!("Map checksum   {}", i.map_check.as_str());
    if i.chain.is_empty() {
        println!("Layers         none (over the base disk)");
    } else {
        println!("Layers         {} (bottom first)", i.chain.len());
        for (n, e) in i.chain.iter().enumerate() {
            println!(
                "  {}. {} {}",
                n + 1,
                Digest::from_sha256(&e.digest),
                String::from_utf8_lossy(&e.path)
            );
        }
        match &i.chain_problem {
            None => println!("Chain          ok (headers and maps checked)"),
            Some(p) => println!("Chain          BROKEN: {p}"),
        }
    }
}
