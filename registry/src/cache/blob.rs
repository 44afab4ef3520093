//! Payload blobs in the cache, filled chunk by chunk from a registry.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};

use super::Cache;
use super::chunk_lock::{ChunkLock, LEASE_SLOT, MAX_LEASE, Taken};
use super::file::{self, Access};
use crate::digest::{ChunkHashes, Digest};
use crate::error::{Error, Result};
use crate::fetch::{BlobSource, ChunkRequest, FetchStats};
use crate::limiter::Priority;

/// A payload blob as the image describes it: its digest and its
/// chunk-hash table (size, chunk size and the sha256 of each chunk).
#[derive(Clone, Debug)]
pub struct BlobSpec {
    pub digest: Digest,
    pub table: Arc<ChunkHashes>,
}

/// Largest chunk size accepted: a chunk is held in memory while it is
/// fetched and verified.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

impl BlobSpec {
    pub fn new(digest: Digest, table: Arc<ChunkHashes>) -> Self {
        BlobSpec { digest, table }
    }

    /// Bytes of the blob.
    pub fn size(&self) -> u64 {
        self.table.size()
    }

    pub fn chunk_size(&self) -> u64 {
        self.table.chunk_size()
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.table.count()
    }

    /// The digest of the blob's chunk-hash table (see
    /// [`ChunkHashes::table_digest`]): what the cache keys the blob's bytes
    /// by, with the blob's digest.
    pub fn table_digest(&self) -> Digest {
        self.table.table_digest()
    }

    /// Offset and length of chunk `index` (below [`BlobSpec::chunks`]).
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        let range = self.table.range(index);
        (range.start, range.end - range.start)
    }

    /// Refuses a chunk size too large to hold a chunk in memory, and a
    /// chunk index past the blob. (The table has one hash per chunk and a
    /// chunk size above zero.)
    fn check(&self, index: u64) -> Result<()> {
        let chunks = self.chunks();
        if self.chunk_size() > MAX_CHUNK_SIZE {
            return Err(Error::Invalid {
                what: format!("blob {}", self.digest),
                field: "chunk_size".into(),
                message: format!("{} is not in 1..={MAX_CHUNK_SIZE}", self.chunk_size()),
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
    data_path: PathBuf,
    map: File,
    map_path: PathBuf,
    leases: Arc<File>,
}

impl OpenBlob {
    /// Takes the fetch lock of chunk `index` of `blob` (see
    /// [`ChunkLock::acquire`]) under leases of [`lease_time`] for the
    /// request `timeout`, waiting until `deadline`; `done` says whether the
    /// chunk was stored meanwhile. Still held by another fetcher at the
    /// deadline: [`Error::ChunkBusy`].
    fn lock_chunk(
        &self,
        blob: &BlobSpec,
        index: u64,
        deadline: Instant,
        timeout: Duration,
        done: &dyn Fn() -> std::io::Result<bool>,
    ) -> Result<Taken> {
        ChunkLock::acquire(
            &self.map_path,
            &self.leases,
            index,
            deadline,
            lease_time(timeout),
            done,
        )
        .map_err(|e| Error::io(&self.map_path, e))?
        .ok_or_else(|| Error::ChunkBusy {
            digest: blob.digest.to_string(),
            index,
            timeout,
        })
    }
}

/// How long a chunk's fetch lock is leased at a time, for a request
/// `timeout`: half of it, at most [`MAX_LEASE`].
fn lease_time(timeout: Duration) -> Duration {
    (timeout / 2).min(MAX_LEASE)
}

/// What a blob whose chunks are all present turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wholeness {
    /// Some chunks are still missing.
    Partial,
    /// Its bytes have its digest: linked as the blob, for every image.
    Whole,
    /// Its bytes have another sha256: they stay usable only through the
    /// chunk hashes of the image that fetched them.
    Differs { actual: Digest },
}

/// Map byte of a chunk that is absent.
const ABSENT: u8 = 0;
/// Map byte of a chunk stored after it matched the table's hash.
const STORED: u8 = 1;
/// Map byte of a chunk of a blob taken whole from `<hex>.whole`: never
/// written under this table.
const FROM_WHOLE: u8 = 2;

/// Payload chunks of one repository's blobs: present in the cache, or
/// fetched, verified and stored on demand.
#[derive(Debug)]
pub struct BlobCache {
    cache: Cache,
    source: BlobSource,
    /// The chunk-hash table of each blob, by blob digest, as the image's
    /// config lists it: which of the cache's files [`BlobCache::path`] is.
    tables: HashMap<Digest, Digest>,
    open: Mutex<HashMap<(Digest, Digest), Arc<OpenBlob>>>,
}

impl BlobCache {
    /// Blobs of `source` stored in `cache`, with the chunk-hash table digest
    /// of each blob of the image (see [`BlobSpec::table_digest`]).
    pub fn new(cache: Cache, source: BlobSource, tables: HashMap<Digest, Digest>) -> Self {
        BlobCache {
            cache,
            source,
            tables,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The sparse file holding `digest`'s bytes for this image (keyed by
    /// the image's chunk-hash table of the blob). Only chunks that
    /// [`BlobCache::ensure_chunk`] returned `Ok` for hold the blob's bytes.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        match self.tables.get(digest) {
            Some(table) => self.cache.blob_path(digest, table),
            None => self.cache.whole_path(digest),
        }
    }

    /// The file holding `blob`'s bytes under its own chunk-hash table.
    pub fn path_of(&self, blob: &BlobSpec) -> PathBuf {
        self.cache.blob_path(&blob.digest, &blob.table_digest())
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
    ///
    /// The call that stores a blob's last missing chunk also hashes the
    /// blob whole (see [`BlobCache::check_whole`]).
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
        let done = || is_present(&open, index).map_err(|e| std::io::Error::other(e.to_string()));
        let lease_time = lease_time(timeout);
        let taken = open.lock_chunk(blob, index, deadline, timeout, &done)?;
        let _lock = match taken {
            Taken::Done => return Ok(false),
            Taken::Locked(lock) => lock,
            Taken::Overtaken(lock, pid) => {
                tracing::warn!(digest = %blob.digest, index, pid, ?lease_time,
                    "the fetcher holding this chunk renewed its lease for none of that time \
                     (stopped?); fetching the chunk here");
                lock
            }
        };
        // Another thread or process may have stored it while we waited.
        if is_present(&open, index)? {
            tracing::debug!(digest = %blob.digest, index, "chunk stored by another fetcher while waiting");
            return Ok(false);
        }
        tracing::debug!(digest = %blob.digest, index, "fetching chunk");
        let mut store = |i: u64, bytes: &[u8]| -> Result<()> {
            if let Err(mismatch) = blob.table.check_bytes(i, bytes) {
                let err = Error::ChunkDigest {
                    digest: blob.digest.to_string(),
                    index: i,
                    expected: mismatch.expected_hex(),
                    actual: mismatch.actual_hex(),
                };
                if i == index {
                    return Err(err);
                }
                // A bad neighbour arriving with a whole-blob answer: its own
                // fetch will report it.
                tracing::warn!(%err, "not storing chunk");
                return Ok(());
            }
            // A present chunk is never written again: not by a neighbour's
            // whole-blob answer, nor over bytes a reader verified.
            if is_present(&open, i)? {
                return Ok(());
            }
            let (offset, _) = blob.chunk_range(i);
            open.data
                .write_all_at(bytes, offset)
                .map_err(|e| Error::io(&open.data_path, e))?;
            open.map
                .write_all_at(&[STORED], i)
                .map_err(|e| Error::io(&open.map_path, e))
        };
        let chunk = ChunkRequest {
            blob,
            index,
            deadline,
            priority,
        };
        self.source.fetch_chunk(chunk, held, &mut store)?;
        drop(_lock);
        if let Err(e) = self.check_whole(blob) {
            tracing::warn!(digest = %blob.digest, "cannot check the blob whole: {e}");
        }
        Ok(true)
    }

    /// Once every chunk of `blob` is present (under its table), hashes the
    /// blob whole: when that is its digest, syncs it and links it as the
    /// blob `<hex>.whole` (which images with other chunk hashes may then
    /// use); when not, logs it and leaves it to the image that fetched it.
    pub fn check_whole(&self, blob: &BlobSpec) -> Result<Wholeness> {
        let open = self.open_blob(blob)?;
        let mut map = vec![0u8; blob.chunks() as usize];
        open.map
            .read_exact_at(&mut map, 0)
            .map_err(|e| Error::io(&open.map_path, e))?;
        if map.contains(&ABSENT) {
            return Ok(Wholeness::Partial);
        }
        let whole = self.cache.whole_path(&blob.digest);
        if map.contains(&FROM_WHOLE) || same_file(&open.data, &whole) {
            return Ok(Wholeness::Whole);
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < blob.size() {
            let n = (blob.size() - pos).min(buf.len() as u64) as usize;
            open.data
                .read_exact_at(&mut buf[..n], pos)
                .map_err(|e| Error::io(&open.data_path, e))?;
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        let actual = Digest::from_sha256(&hasher.finalize().into());
        if actual != blob.digest {
            let err = Error::BlobDigest {
                digest: blob.digest.to_string(),
                actual: actual.to_string(),
            };
            tracing::error!(path = %open.data_path.display(), "{err}");
            return Ok(Wholeness::Differs { actual });
        }
        // Durable before it is the blob for every image: a crash must not
        // leave torn bytes under the whole name.
        open.data
            .sync_all()
            .map_err(|e| Error::io(&open.data_path, e))?;
        match std::fs::hard_link(&open.data_path, &whole) {
            Ok(()) => {
                tracing::info!(digest = %blob.digest, "every chunk present and the blob matches its digest");
            }
            // Another fetcher of the blob got there first.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(&whole, e)),
        }
        Ok(Wholeness::Whole)
    }

    /// Marks chunk `index` absent, so that the next `ensure_chunk` fetches it
    /// again: for a reader whose verification of the stored bytes failed
    /// (a chunk torn by a crash). A chunk of a blob taken whole from the
    /// cache is its digest's bytes: it is refused, for the image's chunk
    /// hash is what is wrong.
    pub fn invalidate_chunk(&self, blob: &BlobSpec, index: u64) -> Result<()> {
        blob.check(index)?;
        let open = self.open_blob(blob)?;
        let timeout = self.source.client().timeout();
        let never = || Ok(false);
        let _lock = open.lock_chunk(blob, index, Instant::now() + timeout, timeout, &never)?;
        if map_byte(&open, index)? == FROM_WHOLE {
            return Err(Error::Cache {
                path: open.data_path.clone(),
                message: format!(
                    "chunk {index} does not match the image's chunk hash, but the cached blob \
                     matched its digest {} whole: the image's chunk hashes are wrong",
                    blob.digest
                ),
            });
        }
        tracing::warn!(digest = %blob.digest, index, "cached chunk failed verification; dropping it");
        open.map
            .write_all_at(&[ABSENT], index)
            .map_err(|e| Error::io(&open.map_path, e))
    }

    /// Who holds the fetch of chunk `index` of `blob` (pid) and how long
    /// ago it last renewed its lease; `None` when nobody fetches it.
    pub fn chunk_holder(
        &self,
        blob: &BlobSpec,
        index: u64,
    ) -> Result<Option<(u32, std::time::Duration)>> {
        blob.check(index)?;
        let open = self.open_blob(blob)?;
        let path = open.map_path.with_extension("leases");
        super::chunk_lock::lease_holder(&path, index).map_err(|e| Error::io(path, e))
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
        Ok(map.into_iter().map(|b| b != ABSENT).collect())
    }

    /// Whether chunk `index` is present.
    pub fn chunk_present(&self, blob: &BlobSpec, index: u64) -> Result<bool> {
        blob.check(index)?;
        is_present(&*self.open_blob(blob)?, index)
    }

    /// Opens (creating) the blob's files under its chunk-hash table and
    /// marks it in use. A blob absent under this table but present whole
    /// (checked against its digest) is linked from there, every chunk
    /// marked [`FROM_WHOLE`].
    fn open_blob(&self, blob: &BlobSpec) -> Result<Arc<OpenBlob>> {
        let table = blob.table_digest();
        let key = (blob.digest.clone(), table.clone());
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = open.get(&key) {
            return Ok(o.clone());
        }
        let chunks = blob.chunks();
        let data_path = self.cache.blob_path(&blob.digest, &table);
        let map_path = self
            .cache
            .chunk_map_path(&blob.digest, &table, blob.chunk_size());
        let lease_path = map_path.with_extension("leases");
        let map = create_private(&map_path)?;
        // Setting the blob up is one process's job at a time: whether the
        // data file is new, linked from the whole blob, or there already
        // must agree with the map.
        map.lock().map_err(|e| Error::io(&map_path, e))?;
        let data_exists = match std::fs::symlink_metadata(&data_path) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(&data_path, e)),
        };
        if !data_exists {
            let whole = self.cache.whole_path(&blob.digest);
            match file::open(&whole, Access::Read) {
                Ok(w) if w.metadata().is_ok_and(|m| m.len() == blob.size()) => {
                    map.set_len(0).map_err(|e| Error::io(&map_path, e))?;
                    map.write_all_at(&vec![FROM_WHOLE; chunks as usize], 0)
                        .map_err(|e| Error::io(&map_path, e))?;
                    match std::fs::hard_link(&whole, &data_path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(Error::io(&data_path, e)),
                    }
                    tracing::debug!(digest = %blob.digest, "using the blob checked whole");
                }
                Ok(_) | Err(_) => {
                    // A new blob under this table: no chunk is present.
                    map.set_len(0).map_err(|e| Error::io(&map_path, e))?;
                }
            }
        }
        let data = open_in_use(&data_path)?;
        let len = data.metadata().map_err(|e| Error::io(&data_path, e))?.len();
        if len == 0 && blob.size() > 0 {
            data.set_len(blob.size())
                .map_err(|e| Error::io(&data_path, e))?;
        } else if len != blob.size() {
            return Err(Error::Cache {
                path: data_path,
                message: format!("has {len} bytes, blob {} has {}", blob.digest, blob.size()),
            });
        }
        // The modification time is the blob's last use, for gc.
        data.set_modified(SystemTime::now())
            .map_err(|e| Error::io(&data_path, e))?;
        let map_len = map.metadata().map_err(|e| Error::io(&map_path, e))?.len();
        if map_len < chunks {
            map.set_len(chunks).map_err(|e| Error::io(&map_path, e))?;
        } else if map_len > chunks {
            return Err(Error::Cache {
                path: map_path,
                message: format!("has {map_len} entries, the blob has {chunks} chunks"),
            });
        }
        let leases = create_private(&lease_path)?;
        let leases_len = leases
            .metadata()
            .map_err(|e| Error::io(&lease_path, e))?
            .len();
        if leases_len < chunks * LEASE_SLOT {
            leases
                .set_len(chunks * LEASE_SLOT)
                .map_err(|e| Error::io(&lease_path, e))?;
        }
        map.unlock().map_err(|e| Error::io(&map_path, e))?;
        let o = Arc::new(OpenBlob {
            data,
            data_path,
            map,
            map_path,
            leases: Arc::new(leases),
        });
        open.insert(key, o.clone());
        Ok(o)
    }
}

/// Whether `file` is the file at `path` (same device and inode).
fn same_file(file: &File, path: &std::path::Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn map_byte(open: &OpenBlob, index: u64) -> Result<u8> {
    let mut byte = [0u8];
    open.map
        .read_exact_at(&mut byte, index)
        .map_err(|e| Error::io(&open.map_path, e))?;
    Ok(byte[0])
}

fn is_present(open: &OpenBlob, index: u64) -> Result<bool> {
    Ok(map_byte(open, index)? != ABSENT)
}

fn create_private(path: &std::path::Path) -> Result<File> {
    file::open(path, Access::Create).map_err(|e| Error::io(path, e))
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
        let table = ChunkHashes::new(size, chunk_size, vec![[0; 32]; hashes]).expect("a table");
        BlobSpec::new(Digest::of(b"blob"), Arc::new(table))
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
        // Too few hashes or a zero chunk size: the table refuses them
        // (see `ociblk_digest::chunks`).
        ChunkHashes::new(2500, 1000, vec![[0; 32]; 2]).expect_err("2 hashes for 3 chunks");
        ChunkHashes::new(2500, 0, Vec::new()).expect_err("chunk size 0");
        assert_eq!(
            field(spec(1 << 30, MAX_CHUNK_SIZE * 2, 8).check(0)),
            "chunk_size"
        );
    }

    /// The cache keys a blob's files by this digest: it must never change,
    /// or an existing cache would no longer find its blobs.
    #[test]
    fn table_digest_is_pinned() {
        let table = ChunkHashes::new(2500, 1000, vec![[0; 32], [1; 32], [0xab; 32]]).expect("3");
        let spec = BlobSpec::new(Digest::of(b"blob"), Arc::new(table));
        assert_eq!(
            spec.table_digest().to_string(),
            "sha256:3c6cc0f0a68483bb80c6dcc75b28544b408f5d613051a2b18773c727dc9c244a"
        );
    }
}
