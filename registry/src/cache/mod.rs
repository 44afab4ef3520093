//! The host cache: one directory shared by every `ociblk` process.
//!
//! ```text
//! DIR/                                  0700, owned by the user
//!   blobs/sha256/<hex>.<table>          payload blob <hex> as fetched for the
//!                                       images whose chunk-hash table has
//!                                       digest <table>: sparse, its full size 0600
//!   blobs/sha256/<hex>.<table>.<chunk>.chunks
//!                                       one byte per chunk of <chunk> bytes:
//!                                       1 = present, matched <table> when stored;
//!                                       2 = present, from <hex>.whole
//!   blobs/sha256/<hex>.<table>.<chunk>.leases
//!                                       16 bytes per chunk: the pid fetching it
//!                                       and when it last renewed its lease
//!   blobs/sha256/<hex>.whole            a hard link to a <hex>.<table> whose
//!                                       every chunk was present and whose
//!                                       bytes, whole, have sha256 <hex>
//!   meta/sha256/<hex>                   manifests and configs, whole, verified
//!   tags/<host>/<repo>/:<tag>           "sha256:<hex>" the tag last resolved to
//!                                       (':' keeps tag files apart from
//!                                       repository path components)
//!   access/sha256/<manifest hex>        the image's latest access record
//!                                       (see [`crate::access_record`])
//! ```
//!
//! Integrity, for a cache shared by images from any registries:
//! - a blob's bytes are trusted only through the chunk hashes of the image
//!   that fetched them, so cached bytes are keyed by the pair (blob digest,
//!   digest of the chunk-hash table, [`BlobSpec::table_digest`]): two
//!   images that disagree about a blob's chunk hashes never share bytes,
//!   and whoever fetches first cannot lock the other out;
//! - a chunk is stored only when it matches its table's hash, and a present
//!   chunk is never rewritten (unless a reader finds it torn by a crash and
//!   drops it: then only bytes with the same hash replace it);
//! - a blob whose chunks are all present is hashed whole once; only when
//!   that matches its digest is it linked as `<hex>.whole`, which images
//!   with another table for the same digest then use as it is (chunks
//!   marked 2, never written: a chunk that does not match their table is
//!   their image's fault, and fails their reads).
//!
//! Every file is opened with `O_NOFOLLOW` and `O_NONBLOCK` and must be a
//! regular file; every directory must be a real, private directory (see
//! the private `file` module).
//!
//! Locking, all advisory and per open file, so threads and processes follow
//! the same rules:
//! - fetching chunk `i` holds an OFD write lock on byte `i` of the chunk
//!   map; the fetcher re-reads the byte under the lock, so each chunk is
//!   fetched once however many threads and processes want it;
//! - a process using a blob holds a shared `flock` on its data file; `gc`
//!   removes a blob only under an exclusive `flock`, taken without waiting,
//!   and a user that finds its file unlinked after locking opens it anew;
//! - small files (manifests, configs, tag records) are written to a
//!   temporary file and renamed into place.
//!
//! Crash safety: a chunk's bytes are written before its map byte, without
//! fsync. A crash may leave a map byte set over torn bytes, so the reader
//! verifies every chunk against its sha256 before use and calls
//! [`BlobCache::invalidate_chunk`] when it does not match; the next
//! [`BlobCache::ensure_chunk`] fetches it again. A blob is synced before it
//! is linked as `<hex>.whole`.

mod blob;
mod chunk_lock;
pub(crate) mod file;
mod usage;

pub use blob::{BlobCache, BlobSpec, Wholeness};
pub use file::DirPolicy;
pub use usage::{BlobUsage, CacheInfo, CachedImage, GcReport};

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::digest::{Digest, Verify as _};
use crate::error::{Error, Result};
use crate::reference::Reference;

/// Largest manifest or config accepted into the cache.
pub const METADATA_LIMIT: u64 = 4 << 20;
/// Largest tag record read: a digest and a newline, with room to spare.
const TAG_LIMIT: u64 = 4096;

/// An opened cache directory.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
    policy: DirPolicy,
}

impl Cache {
    /// Opens (creating, mode 0700) the cache at `dir`, refusing an existing
    /// one that is not private to the user (see [`Cache::open_with`]).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        Cache::open_with(dir, DirPolicy::default())
    }

    /// Opens (creating, mode 0700) the cache at `dir`. An existing cache
    /// directory, or one of its subdirectories, owned by another user or
    /// writable by group or others is refused unless `policy` allows it;
    /// a subdirectory that is a symlink (or not a directory) always is.
    pub fn open_with(dir: impl Into<PathBuf>, policy: DirPolicy) -> Result<Self> {
        let dir = dir.into();
        file::private_dir(&dir, true, policy)?;
        let mut path = dir.clone();
        for sub in [
            "blobs",
            "blobs/sha256",
            "meta",
            "meta/sha256",
            "tags",
            "access",
            "access/sha256",
        ] {
            path.clone_from(&dir);
            path.push(sub);
            file::private_dir(&path, false, policy)?;
        }
        Ok(Cache { dir, policy })
    }

    /// The default cache directory: `/var/cache/ociblk` for root, else
    /// `$XDG_CACHE_HOME/ociblk`, else `~/.cache/ociblk`.
    pub fn default_dir() -> Option<PathBuf> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return Some(PathBuf::from("/var/cache/ociblk"));
        }
        if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(xdg).join("ociblk"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ociblk"))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_dir(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    /// The file of blob `digest` as fetched under the chunk-hash table
    /// with digest `table`.
    pub(crate) fn blob_path(&self, digest: &Digest, table: &Digest) -> PathBuf {
        self.blob_dir()
            .join(format!("{}.{}", digest.hex(), table.hex()))
    }

    /// The blob `digest`, once checked whole against its digest.
    pub(crate) fn whole_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(format!("{}.whole", digest.hex()))
    }

    pub(crate) fn chunk_map_path(
        &self,
        digest: &Digest,
        table: &Digest,
        chunk_size: u64,
    ) -> PathBuf {
        self.blob_dir().join(format!(
            "{}.{}.{chunk_size}.chunks",
            digest.hex(),
            table.hex()
        ))
    }

    fn meta_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("meta/sha256").join(digest.hex())
    }

    fn tag_path(&self, reference: &Reference) -> PathBuf {
        self.dir
            .join("tags")
            .join(&reference.host)
            .join(&reference.repository)
            .join(format!(":{}", reference.tag_or_default()))
    }

    /// A cached manifest or config, verified against `digest` (and `size`
    /// when known); `Ok(None)` when absent. A cached file that does not
    /// verify is removed and reported absent.
    pub fn metadata(&self, digest: &Digest, size: Option<u64>) -> Result<Option<Vec<u8>>> {
        let path = self.meta_path(digest);
        let Some(bytes) = file::read_small(&path, METADATA_LIMIT)? else {
            return Ok(None);
        };
        let expected = size.unwrap_or(bytes.len() as u64);
        if let Err(err) = digest.verify("cached metadata", &bytes, expected) {
            tracing::warn!(path = %path.display(), %err, "removing damaged cache file");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Stores verified metadata `bytes` under their digest, unless the
    /// cache holds them already (a start from a full cache file system
    /// writes nothing it has).
    pub fn store_metadata(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        if matches!(self.metadata(digest, Some(bytes.len() as u64)), Ok(Some(_))) {
            return Ok(());
        }
        write_atomic(&self.meta_path(digest), bytes)
    }

    /// Where the access record of the image with manifest digest
    /// `manifest` is kept: `ociblk serve --record-access` stores a copy
    /// there, and a later start of the image prefetches what it lists.
    pub fn access_record_path(&self, manifest: &Digest) -> PathBuf {
        self.dir.join("access/sha256").join(manifest.hex())
    }

    /// The digest a tag last resolved to, if recorded.
    pub fn tag(&self, reference: &Reference) -> Result<Option<Digest>> {
        let path = self.tag_path(reference);
        let Some(bytes) = file::read_small(&path, TAG_LIMIT)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        text.trim().parse().map(Some).map_err(|_| Error::Cache {
            path,
            message: format!("not a digest: {:?}", text.trim()),
        })
    }

    /// Records that `reference`'s tag resolved to `digest`, unless the
    /// record says so already.
    pub fn store_tag(&self, reference: &Reference, digest: &Digest) -> Result<()> {
        if matches!(self.tag(reference), Ok(Some(d)) if d == *digest) {
            return Ok(());
        }
        let path = self.tag_path(reference);
        // tags/<host>/<repo...>/: each created private, none a symlink.
        let tags = self.dir.join("tags");
        if let Some(parent) = path.parent()
            && let Ok(below) = parent.strip_prefix(&tags)
        {
            let mut dir = tags.clone();
            for component in below.components() {
                dir.push(component);
                file::private_dir(&dir, false, self.policy)?;
            }
        }
        write_atomic(&path, format!("{digest}\n").as_bytes())
    }
}

/// Writes `bytes` to `path` through a private temporary file in the same
/// directory and a rename, so readers see the old or the new file whole.
/// (The temporary file is created exclusively, and the rename replaces
/// whatever `path` names without following it.)
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn metadata_and_tags_round_trip_privately() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path().join("c")).expect("open");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(cache.dir()), 0o700);
        let d = Digest::of(b"{}");
        assert_eq!(cache.metadata(&d, Some(2)).expect("read"), None);
        cache.store_metadata(&d, b"{}").expect("store");
        assert_eq!(
            cache.metadata(&d, Some(2)).expect("read").as_deref(),
            Some(&b"{}"[..])
        );
        assert_eq!(mode(&cache.meta_path(&d)), 0o600);
        // A damaged file is dropped, not served.
        fs::write(cache.meta_path(&d), b"{ }").expect("damage");
        assert_eq!(cache.metadata(&d, None).expect("read"), None);

        let r = Reference::parse("127.0.0.1:5000/a/b:t").expect("ref");
        assert_eq!(cache.tag(&r).expect("read"), None);
        cache.store_tag(&r, &d).expect("store");
        assert_eq!(cache.tag(&r).expect("read"), Some(d.clone()));
        assert_eq!(mode(&cache.tag_path(&r)), 0o600);
        // Repository a/b/t next to tag t of repository a/b.
        let nested = Reference::parse("127.0.0.1:5000/a/b/t").expect("ref");
        cache.store_tag(&nested, &d).expect("store nested");
        let images: Vec<_> = cache
            .info()
            .expect("info")
            .images
            .into_iter()
            .map(|i| i.reference)
            .collect();
        assert_eq!(
            images,
            ["127.0.0.1:5000/a/b/t:latest", "127.0.0.1:5000/a/b:t"]
        );
    }
}
