//! Payload blobs in the cache, filled chunk by chunk from a registry.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use sha2::{Digest as _, Sha256};

use super::Cache;
use super::chunk_lock::ChunkLock;
use crate::digest::{Digest, hex};
use crate::error::{Error, Result};
use crate::fetch::{BlobSource, FetchStats};
use crate::limiter::Priority;

/// A payload blob as the image describes it: its digest, size and the
/// sha256 of each `chunk_size`-byte chunk (the last one may be shorter).
#[derive(Clone, Debug)]
pub struct BlobSpec {
    pub digest: Digest,
    pub size: u64,
    pub chunk_size: u64,
    pub chunk_sha256: Arc<[[u8; 32]]>,
}

/// Largest chunk size accepted: a chunk is held in memory while it is
/// fetched and verified.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

impl BlobSpec {
    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size.max(1))
    }

    /// Offset and length of chunk `index` (below [`BlobSpec::chunks`]).
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        let start = index * self.chunk_size;
        (start, self.chunk_size.min(self.size - start))
    }

    fn check(&self, index: u64) -> Result<()> {
        let chunks = self.chunks();
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(Error::Invalid {
                what: format!("blob {}", self.digest),
                field: "chunk_size".into(),
                message: format!("{} is not in 1..={MAX_CHUNK_SIZE}", self.chunk_size),
            });
        }
        if self.chunk_sha256.len() as u64 != chunks {
            return Err(Error::Invalid {
                what: format!("blob {}", self.digest),
                field: "chunk_sha256".into(),
                message: format!(
                    "{} chunk hashes for {} bytes in chunks of {} (want {chunks})",
                    self.chunk_sha256.len(),
                    self.size,
                    self.chunk_size
                ),
            });
        }
        if index >= chunks {
            return Err(Error::ChunkIndex {
                digest: self.digest.to_string(),
                index,
                chunks,
            });
        }
        Ok(())
    }
}

/// A blob's files, open while this process uses the blob: the data file
/// carries a shared `flock` so that `gc` leaves it alone.
#[derive(Debug)]
struct OpenBlob {
    data: File,
    map: File,
    map_path: PathBuf,
}

/// Payload chunks of one repository's blobs: present in the cache, or
/// fetched, verified and stored on demand.
#[derive(Debug)]
pub struct BlobCache {
    cache: Cache,
    source: BlobSource,
    open: Mutex<HashMap<(Digest, u64), Arc<OpenBlob>>>,
}

impl BlobCache {
    /// Blobs of `source` stored in `cache`.
    pub fn new(cache: Cache, source: BlobSource) -> Self {
        BlobCache {
            cache,
            source,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The sparse file holding `digest`'s bytes. Only chunks that
    /// [`BlobCache::ensure_chunk`] returned `Ok` for hold the blob's bytes.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.cache.blob_path(digest)
    }

    /// Makes chunk `index` of `blob` present in [`BlobCache::path`]: returns at
    /// once when it is, else fetches it (once, however many threads and
    /// processes ask at the same time), checks its sha256 and stores it.
    ///
    /// Fails within the request timeout, naming the blob and chunk, when
    /// the registry cannot deliver or delivers wrong bytes.
    pub fn ensure_chunk(&self, blob: &BlobSpec, index: u64) -> Result<()> {
        self.ensure_chunk_as(blob, index, Priority::Foreground)
            .map(|_| ())
    }

    /// [`BlobCache::ensure_chunk`] fetching at `priority` (a prefetch takes
    /// a request slot only when no guest read waits for one). `Ok(true)`
    /// when this call fetched the chunk, `Ok(false)` when it was present
    /// (or another fetcher stored it meanwhile).
    pub fn ensure_chunk_as(&self, blob: &BlobSpec, index: u64, priority: Priority) -> Result<bool> {
        blob.check(index)?;
        let open = self.open_blob(blob)?;
        if is_present(&open, index)? {
            return Ok(false);
        }
        let timeout = self.source.client().timeout();
        let deadline = Instant::now() + timeout;
        // A prefetch takes its request slot before the chunk's lock: it
        // must never hold a chunk a guest read waits for while it queues
        // behind guest fetches for a slot. (Waiting for the lock with a
        // slot in hand costs at most that one slot, for one fetch.)
        let held = match priority {
            Priority::Foreground => None,
            Priority::Background => Some(
                self.source
                    .client()
                    .request_slot(deadline, priority)
                    .ok_or_else(|| Error::NoPrefetchSlot {
                        digest: blob.digest.to_string(),
                        index,
                        timeout,
                    })?,
            ),
        };
        let _lock = ChunkLock::acquire(&open.map_path, index, deadline)
            .map_err(|e| Error::io(&open.map_path, e))?
            .ok_or_else(|| Error::ChunkBusy {
                digest: blob.digest.to_string(),
                index,
                timeout,
            })?;
        // Another thread or process may have stored it while we waited.
        if is_present(&open, index)? {
            tracing::debug!(digest = %blob.digest, index, "chunk stored by another fetcher while waiting");
            return Ok(false);
        }
        tracing::debug!(digest = %blob.digest, index, "fetching chunk");
        let data_path = self.path(&blob.digest);
        let mut store = |i: u64, bytes: &[u8]| -> Result<()> {
            let expected = &blob.chunk_sha256[i as usize];
            let actual: [u8; 32] = Sha256::digest(bytes).into();
            if actual != *expected {
                let err = Error::ChunkDigest {
                    digest: blob.digest.to_string(),
                    index: i,
                    expected: hex(expected),
                    actual: hex(&actual),
                };
                if i == index {
                    return Err(err);
                }
                // A bad neighbour arriving with a whole-blob answer: its own
                // fetch will report it.
                tracing::warn!(%err, "not storing chunk");
                return Ok(());
            }
            if i != index && is_present(&open, i)? {
                return Ok(());
            }
            let (offset, _) = blob.chunk_range(i);
            open.data
                .write_all_at(bytes, offset)
                .map_err(|e| Error::io(&data_path, e))?;
            open.map
                .write_all_at(&[1], i)
                .map_err(|e| Error::io(&open.map_path, e))
        };
        self.source
            .fetch_chunk(blob, index, deadline, priority, held, &mut store)?;
        Ok(true)
    }

    /// Marks chunk `index` absent, so that the next `ensure_chunk` fetches it
    /// again: for a reader whose verification of the stored bytes failed
    /// (a chunk torn by a crash).
    pub fn invalidate_chunk(&self, blob: &BlobSpec, index: u64) -> Result<()> {
        blob.check(index)?;
        let open = self.open_blob(blob)?;
        let timeout = self.source.client().timeout();
        let _lock = ChunkLock::acquire(&open.map_path, index, Instant::now() + timeout)
            .map_err(|e| Error::io(&open.map_path, e))?
            .ok_or_else(|| Error::ChunkBusy {
                digest: blob.digest.to_string(),
                index,
                timeout,
            })?;
        tracing::warn!(digest = %blob.digest, index, "cached chunk failed verification; dropping it");
        open.map
            .write_all_at(&[0], index)
            .map_err(|e| Error::io(&open.map_path, e))
    }

    /// Requests and bytes this cache fetched from the registry.
    pub fn fetch_stats(&self) -> FetchStats {
        self.source.stats()
    }

    /// Which chunks of `blob` are present, in chunk order: for a reader
    /// that keeps its own map of chunks it has verified.
    pub fn present_chunks(&self, blob: &BlobSpec) -> Result<Vec<bool>> {
        let open = self.open_blob(blob)?;
        let mut map = vec![0u8; blob.chunks() as usize];
        open.map
            .read_exact_at(&mut map, 0)
            .map_err(|e| Error::io(&open.map_path, e))?;
        Ok(map.into_iter().map(|b| b == 1).collect())
    }

    /// Whether chunk `index` is present.
    pub fn chunk_present(&self, blob: &BlobSpec, index: u64) -> Result<bool> {
        blob.check(index)?;
        is_present(&*self.open_blob(blob)?, index)
    }

    /// Opens (creating) the blob's files and marks it in use.
    fn open_blob(&self, blob: &BlobSpec) -> Result<Arc<OpenBlob>> {
        let key = (blob.digest.clone(), blob.chunk_size);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = open.get(&key) {
            return Ok(o.clone());
        }
        let data_path = self.path(&blob.digest);
        let data = open_in_use(&data_path)?;
        let len = data.metadata().map_err(|e| Error::io(&data_path, e))?.len();
        if len == 0 && blob.size > 0 {
            data.set_len(blob.size)
                .map_err(|e| Error::io(&data_path, e))?;
        } else if len != blob.size {
            return Err(Error::Cache {
                path: data_path,
                message: format!("has {len} bytes, blob {} has {}", blob.digest, blob.size),
            });
        }
        // The modification time is the blob's last use, for gc.
        data.set_modified(SystemTime::now())
            .map_err(|e| Error::io(&data_path, e))?;
        let map_path = self.cache.chunk_map_path(&blob.digest, blob.chunk_size);
        let map = create_private(&map_path)?;
        let map_len = map.metadata().map_err(|e| Error::io(&map_path, e))?.len();
        if map_len < blob.chunks() {
            map.set_len(blob.chunks())
                .map_err(|e| Error::io(&map_path, e))?;
        } else if map_len > blob.chunks() {
            return Err(Error::Cache {
                path: map_path,
                message: format!(
                    "has {map_len} entries, the blob has {} chunks",
                    blob.chunks()
                ),
            });
        }
        let o = Arc::new(OpenBlob {
            data,
            map,
            map_path,
        });
        open.insert(key, o.clone());
        Ok(o)
    }
}

fn is_present(open: &OpenBlob, index: u64) -> Result<bool> {
    let mut byte = [0u8];
    open.map
        .read_exact_at(&mut byte, index)
        .map_err(|e| Error::io(&open.map_path, e))?;
    Ok(byte[0] == 1)
}

fn create_private(path: &std::path::Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Opens (creating) a blob's data file and takes a shared `flock` on it.
/// `gc` may have unlinked the file between our open and our lock: then
/// the lock guards nothing, and the file is opened again.
fn open_in_use(path: &std::path::Path) -> Result<File> {
    for _ in 0..8 {
        let file = create_private(path)?;
        file.lock_shared().map_err(|e| Error::io(path, e))?;
        let linked = file.metadata().map_err(|e| Error::io(path, e))?.nlink() > 0;
        if linked {
            return Ok(file);
        }
    }
    Err(Error::Cache {
        path: path.to_path_buf(),
        message: "removed by a concurrent gc again and again".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64, chunk_size: u64, hashes: usize) -> BlobSpec {
        BlobSpec {
            digest: Digest::of(b"blob"),
            size,
            chunk_size,
            chunk_sha256: vec![[0; 32]; hashes].into(),
        }
    }

    #[test]
    fn chunk_geometry_and_checks() {
        let s = spec(2500, 1000, 3);
        assert_eq!(s.chunks(), 3);
        assert_eq!(s.chunk_range(2), (2000, 500));
        s.check(2).unwrap();
        assert!(matches!(
            s.check(3),
            Err(Error::ChunkIndex {
                index: 3,
                chunks: 3,
                ..
            })
        ));
        let field = |r: Result<()>| match r {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(spec(2500, 1000, 2).check(0)), "chunk_sha256");
        assert_eq!(field(spec(2500, 0, 0).check(0)), "chunk_size");
        assert_eq!(
            field(spec(1 << 30, MAX_CHUNK_SIZE * 2, 8).check(0)),
            "chunk_size"
        );
    }
}
