//! What the cache holds (`cache info`) and making room (`gc`).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::Cache;
use super::file::{self, Access};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// A tag record: the image a tag last resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedImage {
    /// `host/repo:tag`
    pub reference: String,
    pub manifest_digest: Digest,
}

/// One payload blob in the cache, with all its files (one per chunk-hash
/// table it was fetched under).
#[derive(Clone, Debug)]
pub struct BlobUsage {
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// Bytes it occupies on disk (its files are sparse; hard links count once).
    pub allocated: u64,
    /// Chunks present / all chunks, for each chunk-hash table it was
    /// fetched under: (chunk size, present, all).
    pub chunks: Vec<(u64, u64, u64)>,
    /// Whether a copy had every chunk and matched the digest whole.
    pub whole: bool,
    pub last_used: SystemTime,
}

/// The cache's contents.
#[derive(Clone, Debug, Default)]
pub struct CacheInfo {
    pub images: Vec<CachedImage>,
    pub blobs: Vec<BlobUsage>,
    /// Bytes of manifests and configs.
    pub metadata_bytes: u64,
    /// Manifest digests of the images the cache keeps an access record for.
    pub access_records: Vec<Digest>,
}

impl CacheInfo {
    /// Bytes on disk of all payload blobs.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.allocated).sum()
    }
}

/// What a `gc` did.
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub removed: Vec<Digest>,
    pub freed: u64,
    /// Blobs that would have gone but are open in some process.
    pub in_use: Vec<Digest>,
    /// Bytes of payload blobs left.
    pub remaining: u64,
}

/// Largest chunk map read: one byte per chunk.
const MAP_LIMIT: u64 = 1 << 26;

/// The files of one blob in a listing of the blob directory.
#[derive(Debug, Default)]
struct BlobFiles {
    /// Files holding the blob's bytes (`<hex>.<table>`, `<hex>.whole`, and
    /// a plain `<hex>` left by an older ociblk).
    data: Vec<PathBuf>,
    /// Chunk maps with their chunk size.
    maps: Vec<(u64, PathBuf)>,
    /// Everything else of the blob (lease files).
    other: Vec<PathBuf>,
    whole: bool,
}

impl BlobFiles {
    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        self.maps
            .iter()
            .map(|(_, p)| p)
            .chain(&self.other)
            .chain(&self.data)
    }
}

/// The blob directory's files by blob digest. Names that belong to no blob
/// (temporary files) are left out.
fn blob_files(listing: &[(String, PathBuf)]) -> BTreeMap<Digest, BlobFiles> {
    let mut blobs: BTreeMap<Digest, BlobFiles> = BTreeMap::new();
    for (name, path) in listing {
        let (Some(hex), rest) = (name.get(..64), name.get(64..).unwrap_or("")) else {
            continue;
        };
        let Ok(digest) = Digest::from_hex(hex) else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with('.')) {
            continue;
        }
        let files = blobs.entry(digest).or_default();
        let parts: Vec<&str> = rest.split('.').skip(1).collect();
        match parts.as_slice() {
            [] => files.data.push(path.clone()),
            ["whole"] => {
                files.whole = true;
                files.data.push(path.clone());
            }
            [table] if table.len() == 64 => files.data.push(path.clone()),
            // `<hex>.<table>.<chunk>.chunks`, or an older `<hex>.<chunk>.chunks`.
            [.., chunk, "chunks"] if chunk.parse::<u64>().is_ok() => {
                let chunk_size = chunk.parse().unwrap_or_default();
                files.maps.push((chunk_size, path.clone()));
            }
            _ => files.other.push(path.clone()),
        }
    }
    blobs
}

impl Cache {
    /// Lists images, blobs with their chunks present, and bytes used.
    pub fn info(&self) -> Result<CacheInfo> {
        let mut info = CacheInfo::default();
        collect_tags(&self.dir.join("tags"), String::new(), &mut info.images)?;
        info.images.sort_by(|a, b| a.reference.cmp(&b.reference));
        for entry in read_dir(&self.dir.join("meta/sha256"))? {
            let path = entry.path();
            info.metadata_bytes += fs::symlink_metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
        }
        let records = self.dir.join("access/sha256");
        if records.is_dir() {
            info.access_records = list(&records)?
                .into_iter()
                .filter_map(|(name, _)| Digest::from_hex(&name).ok())
                .collect();
            info.access_records.sort();
        }
        let listing = list(&self.blob_dir())?;
        for (digest, files) in blob_files(&listing) {
            let mut inodes = HashSet::new();
            let (mut size, mut allocated, mut last_used) = (0, 0, None);
            for path in &files.data {
                let meta = match fs::symlink_metadata(path) {
                    Ok(m) if m.is_file() => m,
                    Ok(_) => continue,
                    // Removed by a concurrent gc.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(path, e)),
                };
                size = size.max(meta.len());
                if inodes.insert((meta.dev(), meta.ino())) {
                    allocated += meta.blocks() * 512;
                }
                let modified = meta.modified().map_err(|e| Error::io(path, e))?;
                last_used = last_used.max(Some(modified));
            }
            let Some(last_used) = last_used else {
                continue;
            };
            let chunks = files
                .maps
                .iter()
                .filter_map(|(chunk_size, map)| {
                    let bytes = file::read_small(map, MAP_LIMIT).ok()??;
                    #[allow(
                        clippy::naive_bytecount,
                        reason = "one byte per chunk: too few to need the bytecount crate"
                    )]
                    let present = bytes.iter().filter(|&&b| b != 0).count() as u64;
                    Some((*chunk_size, present, bytes.len() as u64))
                })
                .collect();
            info.blobs.push(BlobUsage {
                digest,
                size,
                allocated,
                chunks,
                whole: files.whole,
                last_used,
            });
        }
        info.blobs.sort_by_key(|b| b.last_used);
        Ok(info)
    }

    /// Removes least-recently-used payload blobs until they occupy at most
    /// `max_size` bytes. A blob some process holds open is never removed.
    pub fn gc(&self, max_size: u64) -> Result<GcReport> {
        let info = self.info()?;
        let mut report = GcReport {
            remaining: info.blob_bytes(),
            ..GcReport::default()
        };
        let blob_dir = self.blob_dir();
        for blob in &info.blobs {
            if report.remaining <= max_size {
                break;
            }
            let listing = list(&blob_dir)?;
            let Some(files) = blob_files(&listing).remove(&blob.digest) else {
                continue;
            };
            // Every file holding the blob's bytes, each inode locked once:
            // a process using any of them holds it shared.
            let mut locked = Vec::new();
            let mut inodes = HashSet::new();
            let mut in_use = false;
            for path in &files.data {
                let data = match file::open(path, Access::Read) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(path, e)),
                };
                let meta = data.metadata().map_err(|e| Error::io(path, e))?;
                if !inodes.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                match data.try_lock() {
                    Ok(()) => locked.push(data),
                    Err(std::fs::TryLockError::WouldBlock) => {
                        in_use = true;
                        break;
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
                }
            }
            if in_use {
                report.in_use.push(blob.digest.clone());
                continue;
            }
            // Under the exclusive locks no process uses the blob; one that
            // opens it meanwhile waits for the lock, then sees it unlinked.
            for path in files.all() {
                remove(path)?;
            }
            drop(locked);
            tracing::info!(digest = %blob.digest, bytes = blob.allocated, "gc removed blob");
            report.removed.push(blob.digest.clone());
            report.freed += blob.allocated;
            report.remaining -= blob.allocated;
        }
        Ok(report)
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    fs::read_dir(dir)
        .and_then(|it| it.collect())
        .map_err(|e| Error::io(dir, e))
}

/// File names (UTF-8 ones) and paths in `dir`.
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(read_dir(dir)?
        .into_iter()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect())
}

/// Walks `tags/<host>/<repo...>/:<tag>`: files named `:<tag>` are tags,
/// directories path components.
fn collect_tags(dir: &Path, prefix: String, out: &mut Vec<CachedImage>) -> Result<()> {
    for entry in read_dir(dir)? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let is_dir = entry.file_type().map_err(|e| Error::io(&path, e))?.is_dir();
        if is_dir {
            let sub = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            collect_tags(&path, sub, out)?;
        } else if let Some(tag) = name.strip_prefix(':') {
            // A tag record that is not a regular file (a FIFO, a symlink)
            // or not a digest is skipped, never waited on.
            let text = match file::read_small(&path, super::TAG_LIMIT) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("skipping tag record: {e}");
                    continue;
                }
            };
            if let Ok(manifest_digest) = text.trim().parse() {
                out.push(CachedImage {
                    reference: format!("{prefix}:{tag}"),
                    manifest_digest,
                });
            }
        }
    }
    Ok(())
}
