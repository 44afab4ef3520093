//! `ociblk cache`: what the host cache of registry images holds, and
//! bounding its size.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ociblk_layout::parse_size;
use serde_json::json;

use ociblk_registry::Cache;
use ociblk_registry::Options;
use ociblk_registry::cache::{CacheInfo, DirPolicy};

use crate::image_source::RegistrySettings;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the images (tags and the digests they resolved to) and payload
    /// blobs in the cache: size, bytes on disk, chunks present, last use;
    /// and the images it keeps an access record for.
    Info {
        /// The cache directory [default: as for serve].
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Read a cache directory although another user owns it or group
        /// or others may write it.
        #[arg(long)]
        allow_insecure_cache_dir: bool,
    },
    /// Remove payload blobs, least recently used first, until they take at
    /// most SIZE on disk. A blob that an ociblk process has open stays.
    Gc {
        /// The cache directory [default: as for serve].
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Bytes of payload blobs to keep at most (K/M/G/T or KiB/MiB/GiB/TiB).
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        max_size: u64,
        /// Collect a cache directory although another user owns it or group
        /// or others may write it.
        #[arg(long)]
        allow_insecure_cache_dir: bool,
    },
}

fn open(cache: &Option<PathBuf>, allow_insecure: bool) -> Result<ociblk_registry::Cache> {
    let settings = RegistrySettings {
        cache: cache.clone(),
        options: Options {
            cache_dir: DirPolicy { allow_insecure },
            ..Options::default()
        },
    };
    Ok(settings.open_cache()?)
}

fn age(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) => format!("{} s ago", d.as_secs()),
        Err(_) => "just now".to_owned(),
    }
}

pub fn run(args: &CacheArgs) -> Result<()> {
    match &args.command {
        CacheCommand::Info {
            cache,
            json,
            allow_insecure_cache_dir,
        } => {
            let cache = open(cache, *allow_insecure_cache_dir)?;
            let info = cache
                .info()
                .with_context(|| format!("cannot read cache {}", cache.dir().display()))?;
            if *json {
                print_info_json(&cache, &info)?;
            } else {
                print_info(&cache, &info);
            }
        }
        CacheCommand::Gc {
            cache,
            max_size,
            allow_insecure_cache_dir,
        } => {
            let cache = open(cache, *allow_insecure_cache_dir)?;
            let report = cache
                .gc(*max_size)
                .with_context(|| format!("cannot collect cache {}", cache.dir().display()))?;
            for d in &report.removed {
                println!("removed {d}");
            }
            for d in &report.in_use {
                println!("in use, kept {d}");
            }
            println!(
                "freed {} bytes; {} bytes of payload blobs remain",
                report.freed, report.remaining
            );
        }
    }
    Ok(())
}

/// `cache info --json`.
fn print_info_json(cache: &Cache, info: &CacheInfo) -> Result<()> {
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "cache": cache.dir(),
            "images": info.images.iter().map(|i| json!({
                "reference": i.reference,
                "manifest_digest": i.manifest_digest.to_string(),
            })).collect::<Vec<_>>(),
            "blobs": info.blobs.iter().map(|b| json!({
                "digest": b.digest.to_string(),
                "size": b.size,
                "allocated_bytes": b.allocated,
                "chunks": b.chunks.iter().map(|(chunk_size, present, total)| json!({
                    "chunk_size": chunk_size,
                    "present": present,
                    "total": total,
                })).collect::<Vec<_>>(),
                "whole": b.whole,
                "last_used_unix": unix(b.last_used),
            })).collect::<Vec<_>>(),
            "access_records": info.access_records.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            "blob_bytes": info.blob_bytes(),
            "metadata_bytes": info.metadata_bytes,
        }))?
    );
    Ok(())
}

/// `cache info`, for a reader.
fn print_info(cache: &Cache, info: &CacheInfo) {
    println!("Cache      {}", cache.dir().display());
    println!("Images");
    for i in &info.images {
        println!("  {}  {}", i.reference, i.manifest_digest);
    }
    println!("Blobs");
    for b in &info.blobs {
        let chunks: Vec<String> = b
            .chunks
            .iter()
            .map(|(size, present, total)| format!("{present}/{total} chunks of {size}"))
            .collect();
        println!(
            "  {}  {} bytes, {} on disk, {}{}, used {}",
            b.digest,
            b.size,
            b.allocated,
            chunks.join(", "),
            if b.whole {
                ", whole (matches its digest)"
            } else {
                ""
            },
            age(b.last_used)
        );
    }
    if !info.access_records.is_empty() {
        println!("Access records (prefetched when the image starts)");
        for d in &info.access_records {
            println!("  {d}");
        }
    }
    println!(
        "Total      {} bytes of payload blobs on disk, {} bytes of manifests and configs",
        info.blob_bytes(),
        info.metadata_bytes
    );
}
