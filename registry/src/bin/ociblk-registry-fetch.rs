//! Fetches chunks of one payload blob of a registry image into the host
//! cache: for pre-warming a cache by hand, and for exercising many
//! processes filling one cache at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ociblk_registry::cache::DirPolicy;
use ociblk_registry::{BlobSpec, Cache, ChunkHashes, Digest, Options, Reference, RegistryImage};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Cache directory (default: /var/cache/ociblk as root, else
    /// $XDG_CACHE_HOME/ociblk or ~/.cache/ociblk).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Use a cache directory although another user owns it or group or
    /// others may write it.
    #[arg(long)]
    allow_insecure_cache_dir: bool,
    /// A registry reached over plain HTTP although not on loopback.
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Bound on fetching one chunk, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    // Not a doc comment: rustdoc would read the brackets as links.
    #[arg(help = "HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]")]
    reference: String,
    /// The payload layer's digest.
    layer: String,
    /// Chunk size the hashes are for (the payload's hash_chunk_size).
    chunk_size: u64,
    /// File of the chunks' sha256, one lowercase hex line per chunk.
    hashes: PathBuf,
    /// Chunk indexes to fetch; all chunks when none is given.
    indexes: Vec<u64>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ociblk-registry-fetch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let reference = Reference::parse(&args.reference)?;
    let dir = args
        .cache
        .or_else(Cache::default_dir)
        .ok_or("no cache directory: pass --cache")?;
    let cache = Cache::open_with(
        dir,
        DirPolicy {
            allow_insecure: args.allow_insecure_cache_dir,
        },
    )?;
    let options = Options {
        insecure_registries: args.insecure_registry,
        chunk_timeout: Duration::from_secs(args.timeout_secs),
        ..Options::default()
    };
    let image = RegistryImage::open(&reference, &cache, &options)?;
    let digest: Digest = args.layer.parse()?;
    let layer = image
        .layers
        .iter()
        .find(|l| l.digest == digest)
        .ok_or_else(|| format!("{} has no layer {digest}", image.reference))?;
    let text = std::fs::read_to_string(&args.hashes)
        .map_err(|e| format!("{}: {e}", args.hashes.display()))?;
    let hashes = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            parse_hex(line.trim()).ok_or_else(|| {
                format!(
                    "{}: line {}: not a sha256 in hex",
                    args.hashes.display(),
                    i + 1
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let table = ChunkHashes::new(layer.size, args.chunk_size, hashes)
        .map_err(|e| format!("{}: {e}", args.hashes.display()))?;
    let blob = BlobSpec::new(digest, Arc::new(table));
    let indexes = if args.indexes.is_empty() {
        (0..blob.chunks()).collect()
    } else {
        args.indexes
    };
    for index in indexes {
        image.blobs.ensure_chunk(&blob, index)?;
    }
    Ok(())
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}
