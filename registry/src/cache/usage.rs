//! What the cache holds (`cache info`) and making room (`gc`).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::Cache;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// A tag record: the image a tag last resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedImage {
    /// `host/repo:tag`
    pub reference: String,
    pub manifest_digest: Digest,
}

/// One payload blob in the cache.
#[derive(Clone, Debug)]
pub struct BlobUsage {
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// Bytes it occupies on disk (its file is sparse).
    pub allocated: u64,
    /// Chunks present / all chunks, for each chunk size it was fetched with.
    pub chunks: Vec<(u64, u64, u64)>,
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

impl Cache {
    /// Lists images, blobs with their chunks present, and bytes used.
    pub fn info(&self) -> Result<CacheInfo> {
        let mut info = CacheInfo::default();
        collect_tags(&self.dir.join("tags"), String::new(), &mut info.images)?;
        info.images.sort_by(|a, b| a.reference.cmp(&b.reference));
        for entry in read_dir(&self.dir.join("meta/sha256"))? {
            let path = entry.path();
            info.metadata_bytes += fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        }
        let records = self.dir.join("access/sha256");
        if records.is_dir() {
            info.access_records = list(&records)?
                .into_iter()
                .filter_map(|(name, _)| format!("sha256:{name}").parse().ok())
                .collect();
            info.access_records.sort();
        }
        let blob_dir = self.dir.join("blobs/sha256");
        let listing = list(&blob_dir)?;
        for (name, path) in &listing {
            let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            let meta = match fs::metadata(path) {
                Ok(m) => m,
                // Removed by a concurrent gc.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(path, e)),
            };
            let chunks = maps_of(&listing, &digest)
                .into_iter()
                .filter_map(|(chunk_size, map)| {
                    let bytes = fs::read(map).ok()?;
                    #[allow(
                        clippy::naive_bytecount,
                        reason = "one byte per chunk: too few to need the bytecount crate"
                    )]
                    let present = bytes.iter().filter(|&&b| b == 1).count() as u64;
                    Some((chunk_size, present, bytes.len() as u64))
                })
                .collect();
            info.blobs.push(BlobUsage {
                digest,
                size: meta.len(),
                allocated: meta.blocks() * 512,
                chunks,
                last_used: meta.modified().map_err(|e| Error::io(path, e))?,
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
        let blob_dir = self.dir.join("blobs/sha256");
        for blob in &info.blobs {
            if report.remaining <= max_size {
                break;
            }
            let path = self.blob_path(&blob.digest);
            let file = match File::options().read(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(path, e)),
            };
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    report.in_use.push(blob.digest.clone());
                    continue;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
            }
            // Under the exclusive lock no process uses the blob; one that
            // opens it meanwhile waits for the lock, then sees it unlinked.
            for (_, map) in maps_of(&list(&blob_dir)?, &blob.digest) {
                remove(&map)?;
            }
            remove(&path)?;
            drop(file);
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

/// The chunk maps of `digest` in a listing of the blob directory:
/// (chunk size, path).
fn maps_of(listing: &[(String, PathBuf)], digest: &Digest) -> Vec<(u64, PathBuf)> {
    let prefix = format!("{}.", digest.hex());
    listing
        .iter()
        .filter_map(|(name, path)| {
            let chunk_size = name
                .strip_prefix(&prefix)?
                .strip_suffix(".chunks")?
                .parse()
                .ok()?;
            Some((chunk_size, path.clone()))
        })
        .collect()
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
        } else if let Some(tag) = name.strip_prefix(':')
            && let Ok(text) = fs::read_to_string(&path)
            && let Ok(manifest_digest) = text.trim().parse()
        {
            out.push(CachedImage {
                reference: format!("{prefix}:{tag}"),
                manifest_digest,
            });
        }
    }
    Ok(())
}
