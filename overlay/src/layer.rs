//! Frozen layers: freezing a node's overlay into an immutable layer file,
//! creating a new overlay over a chain of layers, and verifying a layer's
//! content digest.
//!
//! A layer has the overlay's layout (header, map, sparse data area) with
//! the layer fields of the header set (see [`super::format`]). It is
//! written once, under a temporary name, synced, made read-only (0400) and
//! linked into place; it is never opened for writing again.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ociblk_io::copy::{FileCopier, Method};
use ociblk_io::sys;
use sha2::{Digest as _, Sha256};

use super::chain::{Layer, entries, open_layers};
use super::file::{
    Access, absolute_paths, new_header, open_file, read_header, resolve_chain, write_new,
    zero_map_crc,
};
use super::format::{self, BLOCK_SIZE as BS, BlockState, ChainEntry, Header, Kind, LayerFields};
use super::{FlushMode, OVERLAY_MODE, Overlay, OverlayConfig, OverlayError, io_err};

/// Mode of a layer file: read-only, private (it holds a node's data).
pub const LAYER_MODE: u32 = 0o400;

/// How the data blocks of a new layer got there, in bytes.
pub use ociblk_io::copy::CopyStats;

/// What [`freeze`] made.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// The new layer, as an absolute path.
    pub layer: PathBuf,
    pub digest: [u8; 32],
    pub parent: Option<[u8; 32]>,
    /// Blocks the layer holds data for, and blocks it zeroes.
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub copy: CopyStats,
    /// The chain the overlay now sits on, bottom first (ends with `layer`).
    pub chain: Vec<PathBuf>,
}

/// Removes a temporary file unless it was kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// A name for a temporary file next to `path`.
fn temp_beside(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = format!(
        ".{}.{what}-{}",
        name.as_deref().unwrap_or("layer"),
        std::process::id()
    );
    path.with_file_name(name)
}

fn sync_dir(path: &Path) -> Result<(), OverlayError> {
    let dir = sys::parent_dir(path);
    sys::sync_dir(dir).map_err(io_err(dir, "sync directory"))
}

/// Reads the header of an existing overlay or layer file.
fn peek_header(path: &Path) -> Result<Header, OverlayError> {
    let (file, _) = open_file(path, Access::ReadOnly)?;
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    let mut first = vec![0u8; format::HEADER_SIZE.min(len as usize)];
    file.read_exact_at(&mut first, 0)
        .map_err(io_err(path, "read header"))?;
    if first.iter().all(|&b| b == 0) {
        return Err(OverlayError::NotInitialised {
            path: path.to_path_buf(),
        });
    }
    read_header(&file, path, len)
}

/// Freezes the overlay at `overlay` into a new layer file at `layer`.
///
/// The overlay must not be in use (its lock is taken exclusively, as by a
/// server). One that was not closed cleanly is first recovered exactly as
/// a restarted server would recover it (its map is valid entry by entry,
/// data a failed write left outside `Data` blocks is freed): the layer
/// holds what the node would see on its next start. The layer records the
/// overlay's disk fingerprint, its map and the data of its `Data` blocks,
/// shared with the overlay by `FICLONERANGE` where the file system can,
/// else copied by `copy_file_range`, else read and written; holes stay
/// holes. Its parent is the top layer of the overlay's chain.
///
/// The overlay is then replaced (atomically, by a rename) by an empty
/// overlay over its chain plus the new layer: the node's disk reads the
/// same, and goes on from there. A crash before that rename leaves the
/// overlay as it was (and the new layer beside it); nothing is lost.
pub fn freeze(overlay: &Path, layer: &Path) -> Result<Frozen, OverlayError> {
    let ov_path = fs::canonicalize(overlay).map_err(io_err(overlay, "open"))?;
    let layer_path = absolute_paths(&[layer.to_path_buf()])?.remove(0);
    if fs::symlink_metadata(&layer_path).is_ok() {
        return Err(OverlayError::LayerExists { path: layer_path });
    }
    let header = peek_header(&ov_path)?;
    if header.layer().is_some() {
        return Err(OverlayError::IsALayer { path: ov_path });
    }
    let cfg = OverlayConfig {
        disk_size: header.disk_size,
        fingerprint: header.fingerprint,
        flush: FlushMode::Safe,
    };
    let mut ov = Overlay::open_over(&ov_path, cfg.clone(), None)?;
    ov.flush().map_err(io_err(&ov_path, "flush"))?;
    let (fields, counts, copy) = write_layer(&ov, &layer_path)?;

    // Re-base the overlay: an empty one over the longer chain, renamed over it.
    let mut chain: Vec<PathBuf> = ov
        .chain
        .layers()
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    chain.push(layer_path.clone());
    let mode = fs::metadata(&ov_path)
        .map_err(io_err(&ov_path, "stat"))?
        .permissions()
        .mode()
        & 0o7777;
    let mut entries = ov.chain.entries();
    entries.push(ChainEntry {
        digest: fields.digest,
        path: layer_path.as_os_str().as_bytes().to_vec(),
    });
    let rebased = temp_beside(&ov_path, "rebasing");
    let mut guard = TempFile(Some(rebased.clone()));
    write_clean_overlay(&rebased, &cfg, &entries, mode)?;
    fs::rename(&rebased, &ov_path)
        .map_err(io_err(&ov_path, "replace with the re-based overlay"))?;
    guard.keep();
    sync_dir(&ov_path)?;
    // The old file is unlinked: release its lock without marking it.
    ov.closed = true;
    drop(ov);
    tracing::info!(
        overlay = %ov_path.display(),
        layer = %layer_path.display(),
        digest = %format::hex(&fields.digest),
        "froze the overlay into a layer; the overlay now sits on it, empty"
    );
    Ok(Frozen {
        layer: layer_path,
        digest: fields.digest,
        parent: fields.parent,
        data_blocks: counts.0,
        zero_blocks: counts.1,
        copy,
        chain,
    })
}

/// Writes the layer for the open overlay `ov` at `path`: under a
/// temporary name, synced, made 0400, then linked into place (never over
/// an existing file).
fn write_layer(
    ov: &Overlay,
    path: &Path,
) -> Result<(LayerFields, (u64, u64), CopyStats), OverlayError> {
    let map = ov.map.snapshot();
    let parent = ov.chain.top_digest();
    let mut hasher = Sha256::new();
    hasher.update(format::digest_prefix(
        ov.header.disk_size,
        &ov.header.fingerprint,
        parent.as_ref(),
        ov.header.map_len,
    ));
    hasher.update(&map);
    let meta_digest: [u8; 32] = hasher.clone().finalize().into();
    let mut header = Header::with_kind(
        ov.header.disk_size,
        ov.header.fingerprint,
        Kind::Layer(LayerFields {
            digest: [0; 32],
            parent,
            meta_digest,
        }),
    );

    let tmp = temp_beside(path, "freezing");
    let mut guard = TempFile(Some(tmp.clone()));
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(OVERLAY_MODE)
        .open(&tmp)
        .map_err(io_err(&tmp, "create"))?;
    out.set_len(header.file_len())
        .map_err(io_err(&tmp, "set size"))?;
    out.write_all_at(&map, header.map_offset)
        .map_err(io_err(&tmp, "write map"))?;

    let mut copier = FileCopier::new(&ov.file, &out, Method::Clone, BS);
    let (mut data_blocks, mut zero_blocks) = (0, 0);
    let mut b = 0u64;
    while b < header.map_len {
        let state = BlockState::from_u8(map[b as usize]);
        if state == Some(BlockState::Zero) {
            zero_blocks += 1;
        }
        if state != Some(BlockState::Data) {
            b += 1;
            continue;
        }
        let first = b;
        while b < header.map_len && map[b as usize] == BlockState::Data as u8 {
            b += 1;
        }
        data_blocks += b - first;
        copier
            .copy_allocated(
                ov.header.data_offset + first * BS,
                header.data_offset + first * BS,
                (b - first) * BS,
            )
            .map_err(io_err(&tmp, "copy data blocks"))?;
    }
    let copy = copier.stats;
    // The digest is of what the layer holds: read its data back.
    hash_data(&out, &header, &map, &mut hasher).map_err(io_err(&tmp, "read data back"))?;
    let fields = LayerFields {
        digest: hasher.finalize().into(),
        parent,
        meta_digest,
    };
    header.kind = Kind::Layer(fields);
    header.clean = true;
    header.map_crc = Some(crc32fast::hash(&map));
    out.write_all_at(&header.encode(), 0)
        .map_err(io_err(&tmp, "write header"))?;
    out.sync_all().map_err(io_err(&tmp, "sync"))?;
    out.set_permissions(fs::Permissions::from_mode(LAYER_MODE))
        .map_err(io_err(&tmp, "set mode"))?;
    drop(out);
    // A link never replaces an existing file, unlike a rename.
    fs::hard_link(&tmp, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            OverlayError::LayerExists {
                path: path.to_path_buf(),
            }
        } else {
            io_err(path, "link into place")(e)
        }
    })?;
    drop(guard.0.take().map(fs::remove_file));
    sync_dir(path)?;
    Ok((fields, (data_blocks, zero_blocks), copy))
}

/// Feeds the data of every `Data` block of `map` (its bytes within the
/// disk) to `hasher`, in block order.
fn hash_data(file: &File, header: &Header, map: &[u8], hasher: &mut Sha256) -> io::Result<()> {
    const CHUNK_BLOCKS: u64 = 256;
    let mut buf = vec![0u8; (CHUNK_BLOCKS * BS) as usize];
    let mut b = 0u64;
    while b < header.map_len {
        if map[b as usize] != BlockState::Data as u8 {
            b += 1;
            continue;
        }
        let first = b;
        while b < header.map_len
            && b - first < CHUNK_BLOCKS
            && map[b as usize] == BlockState::Data as u8
        {
            b += 1;
        }
        let start = first * BS;
        let len = ((b * BS).min(header.disk_size) - start) as usize;
        file.read_exact_at(&mut buf[..len], header.data_offset + start)?;
        hasher.update(&buf[..len]);
    }
    Ok(())
}

/// Creates a new, empty overlay at `path` over `layers` (bottom first),
/// for the disk the layers were frozen from, closed cleanly: what a fork
/// of a node starts from. `path` must not exist.
///
/// The layers are checked as a server opening the overlay checks them
/// (each for the top layer's disk, on the layer below it, its header and
/// map matching its metadata digest), but no index is merged and no
/// overlay is opened: the file is written directly in the state a clean
/// close leaves (all-`Base` map with its checksum, clean flag set). It is
/// written under a temporary name, synced and linked into place, and the
/// directory is synced: when this returns the overlay and its chain are
/// durable, and a crash before leaves no file at `path` (never an overlay
/// without its chain). Two syncs in all.
pub fn create_over(path: &Path, layers: &[PathBuf]) -> Result<(), OverlayError> {
    let Some(top) = layers.last() else {
        return Err(OverlayError::Config {
            path: path.to_path_buf(),
            reason: format::FormatError::Invalid("no layers given".into()),
        });
    };
    let header = peek_header(top).map_err(|e| match e {
        OverlayError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            OverlayError::LayerMissing {
                path: top.clone(),
                overlay: None,
            }
        }
        e => e,
    })?;
    if header.layer().is_none() {
        return Err(OverlayError::NotALayer { path: top.clone() });
    }
    let cfg = OverlayConfig {
        disk_size: header.disk_size,
        fingerprint: header.fingerprint,
        flush: FlushMode::Safe,
    };
    if fs::symlink_metadata(path).is_ok() {
        return Err(already_exists(path));
    }
    let chain = open_layers(
        &absolute_paths(layers)?,
        cfg.disk_size,
        &cfg.fingerprint,
        None,
    )?;
    let tmp = temp_beside(path, "creating");
    let mut guard = TempFile(Some(tmp.clone()));
    write_clean_overlay(&tmp, &cfg, &entries(&chain), OVERLAY_MODE)?;
    // A link never replaces an existing file, unlike a rename.
    fs::hard_link(&tmp, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            already_exists(path)
        } else {
            io_err(path, "link into place")(e)
        }
    })?;
    drop(guard.0.take().map(fs::remove_file));
    sync_dir(path)
}

fn already_exists(path: &Path) -> OverlayError {
    io_err(path, "create")(io::Error::from(io::ErrorKind::AlreadyExists))
}

/// Writes a new, empty overlay over the chain `entries` at `path` (which
/// must not exist) in the state a clean close leaves: all-`Base` map with
/// its checksum, clean flag set, exactly `mode`; synced. The caller puts
/// it into place and syncs the directory.
fn write_clean_overlay(
    path: &Path,
    cfg: &OverlayConfig,
    entries: &[ChainEntry],
    mode: u32,
) -> Result<(), OverlayError> {
    let (mut header, section) = new_header(path, cfg, entries)?;
    header.clean = true;
    header.map_crc = Some(zero_map_crc(header.map_len));
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path, "create"))?;
    // The umask may have taken bits away.
    out.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path, "set mode"))?;
    write_new(&out, path, &header, &section)?;
    out.sync_all().map_err(io_err(path, "sync"))
}

/// A layer whose content digest was recomputed and matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub path: PathBuf,
    pub digest: [u8; 32],
    /// Bytes of data read to check it.
    pub data_bytes: u64,
}

/// Recomputes the content digest of the layer at `path`, or of every
/// layer of the chain the overlay at `path` records (opened and checked
/// as a server would), reading all their data. A mismatch is
/// [`OverlayError::LayerModified`].
pub fn verify(path: &Path) -> Result<Vec<Verified>, OverlayError> {
    let header = peek_header(path)?;
    if header.layer().is_some() {
        return Ok(vec![verify_layer(path)?]);
    }
    let (file, _) = open_file(path, Access::ReadOnly)?;
    let cfg = OverlayConfig {
        disk_size: header.disk_size,
        fingerprint: header.fingerprint,
        flush: FlushMode::Unsafe,
    };
    let chain = resolve_chain(&file, path, &header, &cfg, None)?;
    chain
        .layers()
        .iter()
        .map(|l| verify_layer(l.path()))
        .collect()
}

fn verify_layer(path: &Path) -> Result<Verified, OverlayError> {
    let (layer, map) = Layer::open(path, None)?;
    let h = layer.header();
    let mut hasher = Sha256::new();
    hasher.update(format::digest_prefix(
        h.disk_size,
        &h.fingerprint,
        layer.parent().as_ref(),
        h.map_len,
    ));
    hasher.update(&map);
    hash_data(layer.file(), h, &map, &mut hasher).map_err(io_err(path, "read data"))?;
    let computed: [u8; 32] = hasher.finalize().into();
    if computed != layer.digest() {
        return Err(OverlayError::LayerModified {
            path: path.to_path_buf(),
            what: format!(
                "its data does not match its digest (recorded {}, computed {})",
                super::chain::short(&layer.digest()),
                super::chain::short(&computed)
            ),
        });
    }
    #[allow(
        clippy::naive_bytecount,
        reason = "one pass per verify over a map already in memory: not worth the bytecount crate"
    )]
    let data = map.iter().filter(|&&v| v == BlockState::Data as u8).count() as u64;
    Ok(Verified {
        path: path.to_path_buf(),
        digest: computed,
        data_bytes: data * BS,
    })
}
