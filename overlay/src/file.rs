//! The overlay file: opening and locking it, creating it, reading and
//! checking its header and map, reclaiming space after a crash, and
//! reporting on or resetting an overlay that no server holds.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, RwLock};

use ociblk_io::sys;

use super::chain::{Chain, short};
use super::format::{
    self, BLOCK_SIZE as BS, BlockState, ChainEntry, FormatError, Header, Kind, MAX_LAYER_PATH,
    parse_header,
};
use super::map::{BlockMap, MAP_CHUNK, StateCounts};
use super::{
    FlushMode, MapCheck, OVERLAY_MODE, Overlay, OverlayConfig, OverlayError, OverlayInfo, STRIPES,
    io_err, live,
};

impl Overlay {
    /// Opens the overlay at `path` read-write, creating it (mode 0600) if
    /// it does not exist, and locks it exclusively for this process.
    ///
    /// An existing empty file, or one whose header was never written (what
    /// a crash right after creation leaves; nothing in it was ever
    /// flushed), is initialised as a new overlay, with a log line. Anything
    /// else must carry a valid header. An existing overlay must match
    /// `cfg`'s disk size and fingerprint, unless no block was ever written
    /// or zeroed in it (a new or reset overlay holds nothing of its old
    /// disk): such a file is made anew for `cfg`. After a clean close the
    /// map must match the checksum recorded then.
    pub fn open(path: impl AsRef<Path>, cfg: OverlayConfig) -> Result<Overlay, OverlayError> {
        Self::open_over(path, cfg, None)
    }

    /// [`Overlay::open`] over a chain of layers. `layers` (bottom first)
    /// is the chain a new overlay is created over; an existing overlay
    /// must have been made over the same layers (the same digests in the
    /// same order; their paths may differ); `None` takes the chain its
    /// header records (none for a new overlay).
    pub fn open_over(
        path: impl AsRef<Path>,
        cfg: OverlayConfig,
        layers: Option<&[PathBuf]>,
    ) -> Result<Overlay, OverlayError> {
        let path = path.as_ref();
        let Opening {
            file,
            created,
            len,
            unwritten,
            mut given,
        } = Opening::start(path, &cfg, layers, Access::Create)?;
        let mut fresh = unwritten;
        if fresh && !created {
            tracing::info!(
                path = %path.display(),
                bytes = len,
                "initialising an existing file without an overlay header as a new overlay"
            );
        }
        let (header, chain) = if fresh {
            let chain = given.take().unwrap_or_default();
            file.set_len(0).map_err(io_err(path, "truncate"))?;
            (create(&file, path, &cfg, &chain)?, chain)
        } else {
            let header = read_overlay_header(&file, path, len)?;
            match mismatch(&header, &cfg) {
                None => {
                    let chain = resolve_chain(&file, path, &header, &cfg, given)?;
                    (header, chain)
                }
                Some(what) => {
                    let counts = current_counts(&file, path, &header, len)?;
                    check_unused(path, &header, &counts, what)?;
                    let chain = given.take().unwrap_or_default();
                    tracing::info!(path = %path.display(), "re-creating unused overlay for another disk");
                    file.set_len(0).map_err(io_err(path, "truncate"))?;
                    fresh = true;
                    (create(&file, path, &cfg, &chain)?, chain)
                }
            }
        };
        if fresh && !chain.is_empty() {
            // Unlike an empty overlay over the base disk, this one must not
            // come back as a new file without its chain after a crash: the
            // node's disk would lose the layers.
            make_durable(&file, path)?;
        }
        // The block states live in the live map region from here on (see
        // `live`): a new map is all `Base`; after a server died on this boot
        // of the host its live map is newer than the map on disk.
        let map = if fresh {
            live::create(&file, path, &header, None)?
        } else {
            let (disk, _) = read_checked_map(&file, path, &header)?;
            match live::adopt(&file, path, &header, len)? {
                Some(map) => {
                    let newer = map.mark_differences(&disk);
                    tracing::info!(
                        path = %path.display(),
                        blocks = newer,
                        "the last server died: taking its live map, which holds every write it completed"
                    );
                    map
                }
                None => live::create(&file, path, &header, Some(&disk))?,
            }
        };
        let access = Opened::ReadWrite { created: fresh };
        let ov = Overlay::assemble(file, path, cfg.flush, header, map, chain, access);
        if fresh {
            // Created in use (clean flag 0) with nothing to reclaim.
        } else if !ov.header.clean {
            tracing::info!(path = %path.display(), "overlay was not closed cleanly; reclaiming unused space");
            ov.reclaim().map_err(io_err(path, "reclaim space"))?;
        } else {
            ov.set_clean(false).map_err(io_err(path, "mark in use"))?;
        }
        Ok(ov)
    }

    /// Opens the overlay at `path` for reading only: the file is opened
    /// read-only (a 0400 file or a read-only mount will do), locked shared
    /// (no server can write it meanwhile, other readers can share it) and
    /// never modified, not even its clean flag. An empty file or one whose
    /// header was never written holds no writes: it reads as the base disk.
    pub fn open_read_only(
        path: impl AsRef<Path>,
        cfg: OverlayConfig,
    ) -> Result<Overlay, OverlayError> {
        Self::open_read_only_over(path, cfg, None)
    }

    /// [`Overlay::open_read_only`] over a chain of layers, checked as by
    /// [`Overlay::open_over`]. A file without a header reads as the chain.
    pub fn open_read_only_over(
        path: impl AsRef<Path>,
        cfg: OverlayConfig,
        layers: Option<&[PathBuf]>,
    ) -> Result<Overlay, OverlayError> {
        let path = path.as_ref();
        let Opening {
            file,
            len,
            unwritten,
            mut given,
            ..
        } = Opening::start(path, &cfg, layers, Access::ReadOnly)?;
        let all_base = |header: &Header| {
            BlockMap::all_base(header.map_len).map_err(io_err(path, "allocate the map"))
        };
        let (header, map, chain) = if unwritten {
            tracing::info!(path = %path.display(), "overlay has no header yet: serving the base disk and layers given");
            let header = Header::new(cfg.disk_size, cfg.fingerprint);
            let map = all_base(&header)?;
            (header, map, given.take().unwrap_or_default())
        } else {
            let header = read_overlay_header(&file, path, len)?;
            let (disk, mut counts) = read_checked_map(&file, path, &header)?;
            // A server that died on this boot left newer states in its live
            // map: read what the next server would serve.
            let states = match live::read_live_states(&file, path, &header, len)? {
                Some(states) => {
                    counts = StateCounts::default();
                    format::count_states(&states, 0, &mut counts)
                        .map_err(|e| OverlayError::format(path, e))?;
                    states
                }
                None => disk,
            };
            if let Some(what) = mismatch(&header, &cfg) {
                check_unused(path, &header, &counts, what)?;
                // Nothing written: reads as the base disk, whatever it is.
                let header = Header::new(cfg.disk_size, cfg.fingerprint);
                let map = all_base(&header)?;
                (header, map, given.take().unwrap_or_default())
            } else {
                let chain = resolve_chain(&file, path, &header, &cfg, given)?;
                let map =
                    BlockMap::from_bytes(&states).map_err(io_err(path, "allocate the map"))?;
                (header, map, chain)
            }
        };
        let access = Opened::ReadOnly;
        Ok(Overlay::assemble(
            file, path, cfg.flush, header, map, chain, access,
        ))
    }

    /// Deallocates the data of every block that is not `Data`: after a
    /// crash, blocks written but never published in the durable map keep
    /// their bytes allocated.
    fn reclaim(&self) -> io::Result<()> {
        let fd = self.file.as_fd();
        let start = self.header.data_offset;
        let end = self.header.file_len();
        let mut pos = start;
        while pos < end {
            let Some((s, e)) = sys::next_data(fd, pos)? else {
                break;
            };
            if s >= end {
                break;
            }
            let (b0, b1) = ((s - start) / BS, (e.min(end) - start).div_ceil(BS));
            let mut b = b0;
            while b < b1 {
                if self.map.get(b) == BlockState::Data {
                    b += 1;
                    continue;
                }
                let first = b;
                while b < b1 && self.map.get(b) != BlockState::Data {
                    b += 1;
                }
                match sys::punch_hole(fd, start + first * BS, (b - first) * BS) {
                    Err(e) if sys::unsupported(&e) => return Ok(()),
                    r => r?,
                }
            }
            pos = start + b1 * BS;
        }
        Ok(())
    }

    /// Reports on the overlay at `path` without locking it; works while a
    /// server uses it (the map is then as of its last flush).
    ///
    /// A file without a header (empty, or whose header was never written)
    /// is [`OverlayError::NotInitialised`]: `open` makes it a new overlay.
    /// After a clean close the map must match its recorded checksum.
    pub fn info(path: impl AsRef<Path>) -> Result<OverlayInfo, OverlayError> {
        let path = path.as_ref();
        let (file, _) = open_file(path, Access::ReadOnly)?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if meta.len() == 0 || header_never_written(&file, path, meta.len())? {
            return Err(OverlayError::NotInitialised {
                path: path.to_path_buf(),
            });
        }
        let mut header = read_header(&file, path, meta.len())?;
        let (counts, computed) = read_counts(&file, path, &header)?;
        let chain = read_chain(&file, path, &header)?;
        // Open the recorded chain as a server would, to tell what is wrong.
        let chain_problem = if chain.is_empty() {
            None
        } else {
            let cfg = OverlayConfig {
                disk_size: header.disk_size,
                fingerprint: header.fingerprint,
                flush: super::FlushMode::Unsafe,
            };
            resolve_chain(&file, path, &header, &cfg, None)
                .err()
                .map(|e| e.to_string())
        };
        let map_check = if header.layer().is_some() {
            // A layer's map is checked by its metadata digest, which covers
            // the header fields too.
            super::chain::Layer::open(path, None)?;
            MapCheck::Verified
        } else {
            match check_map_crc(path, &header, computed) {
                // A server may have opened it and changed the map while it
                // was read: then it is in use, not corrupt.
                Err(e) if !read_header(&file, path, meta.len()).is_ok_and(|h| h.clean) => {
                    tracing::debug!(path = %path.display(), "map changed while read: {e}");
                    header.clean = false;
                    MapCheck::NotClosedCleanly
                }
                r => r?,
            }
        };
        Ok(OverlayInfo {
            disk_size: header.disk_size,
            fingerprint: header.fingerprint,
            block_size: BS,
            blocks: header.blocks(),
            written: counts.data,
            zeroed: counts.zero,
            allocated_bytes: meta.blocks() * 512,
            file_size: meta.len(),
            clean: header.clean,
            map_check,
            chain,
            chain_problem,
            layer: header.layer().copied(),
        })
    }

    /// Returns every block of the overlay at `path` to `Base` and frees its
    /// data. Fails if a server has it open. An empty regular file is left
    /// alone (it already reads as the base disk).
    pub fn reset(path: impl AsRef<Path>) -> Result<(), OverlayError> {
        let path = path.as_ref();
        let (file, _, len) = open_locked(path, Access::Existing)?;
        if len == 0 {
            return Ok(());
        }
        let header = read_overlay_header(&file, path, len)?;
        let fd = file.as_fd();
        let set_clean = |clean: bool| {
            file.write_all_at(&[u8::from(clean)], format::CLEAN_OFFSET as u64)
                .and_then(|()| file.sync_data())
        };
        // Not clean while the map and data disagree with the flag, so that
        // an interrupted reset is finished by the next open's reclaim.
        set_clean(false).map_err(io_err(path, "mark in use"))?;
        // Whatever a dead server's live map held is discarded too.
        live::clear(&file, &header).map_err(io_err(path, "clear the live map"))?;
        zero_map(&file, &header).map_err(io_err(path, "clear map"))?;
        file.write_all_at(
            &format::encode_map_crc(Some(zero_map_crc(header.map_len))),
            format::MAP_CRC_FIELD_OFFSET as u64,
        )
        .map_err(io_err(path, "record map checksum"))?;
        file.sync_data().map_err(io_err(path, "sync"))?;
        // The data area and the live map region with it.
        let end = len.max(header.file_len());
        match sys::punch_hole(fd, header.data_offset, end - header.data_offset) {
            Err(e) if !sys::unsupported(&e) => return Err(io_err(path, "free data")(e)),
            _ => {}
        }
        set_clean(true).map_err(io_err(path, "mark clean"))
    }
}

/// How an [`Overlay`] was opened.
#[derive(Debug, Clone, Copy)]
enum Opened {
    /// Read-write; `created` when this open laid it out anew.
    ReadWrite {
        created: bool,
    },
    ReadOnly,
}

impl Overlay {
    fn assemble(
        file: File,
        path: &Path,
        mode: FlushMode,
        header: Header,
        map: BlockMap,
        chain: Chain,
        access: Opened,
    ) -> Overlay {
        Overlay {
            file,
            path: path.to_path_buf(),
            mode,
            map,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            flush_lock: Mutex::new(()),
            sync_failed: AtomicBool::new(false),
            leaked: AtomicBool::new(false),
            new_entry: AtomicBool::new(matches!(access, Opened::ReadWrite { created: true })),
            writable: matches!(access, Opened::ReadWrite { .. }),
            closed: false,
            header,
            chain,
        }
    }
}

/// Differences between an overlay's header and the disk it is opened for.
fn mismatch(h: &Header, cfg: &OverlayConfig) -> Option<String> {
    let mut what = Vec::new();
    if h.disk_size != cfg.disk_size {
        what.push(format!("size {} != {} bytes", h.disk_size, cfg.disk_size));
    }
    if h.fingerprint != cfg.fingerprint {
        what.push(format!(
            "fingerprint {}.. != {}..",
            &format::hex(&h.fingerprint)[..12],
            &format::hex(&cfg.fingerprint)[..12]
        ));
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// Refuses a frozen layer where an overlay is wanted.
/// An overlay for another disk (`what` differs) may stand for the
/// configured one only while it holds nothing of its own disk: no block
/// written or zeroed, no chain of layers.
fn check_unused(
    path: &Path,
    header: &Header,
    counts: &StateCounts,
    what: String,
) -> Result<(), OverlayError> {
    if counts.any_written() || header.chain_len() != 0 {
        return Err(OverlayError::Mismatch {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(())
}

/// Reads the header of the overlay file at `path` and refuses a layer.
fn read_overlay_header(file: &File, path: &Path, len: u64) -> Result<Header, OverlayError> {
    let header = read_header(file, path, len)?;
    match header.kind {
        Kind::Layer(_) => Err(OverlayError::IsALayer {
            path: path.to_path_buf(),
        }),
        Kind::Overlay { .. } => Ok(header),
    }
}

/// Makes layer paths absolute (without resolving links), as the chain
/// records them.
pub(super) fn absolute_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, OverlayError> {
    paths
        .iter()
        .map(|p| std::path::absolute(p).map_err(io_err(p, "make the layer path absolute")))
        .collect()
}

/// Reads the chain an overlay's header records (empty for none).
pub(super) fn read_chain(
    file: &File,
    path: &Path,
    header: &Header,
) -> Result<Vec<ChainEntry>, OverlayError> {
    let Kind::Overlay {
        chain_len,
        chain_bytes,
        chain_crc,
    } = header.kind
    else {
        return Ok(Vec::new());
    };
    if chain_len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; chain_bytes as usize];
    file.read_exact_at(&mut buf, format::HEADER_SIZE as u64)
        .map_err(io_err(path, "read chain"))?;
    format::parse_chain(&buf, chain_len, chain_crc).map_err(|e| OverlayError::format(path, e))
}

/// Opens the layers given for an overlay (made absolute), if any.
/// What both opens start from.
struct Opening {
    file: File,
    /// The file was created by this open.
    created: bool,
    len: u64,
    /// The file never got a header: empty, or a zero header (what a crash
    /// right after creation leaves).
    unwritten: bool,
    /// The layers given, opened and checked.
    given: Option<Chain>,
}

impl Opening {
    /// Checks `cfg` and the layers given (before any file is created),
    /// then opens and locks the file.
    fn start(
        path: &Path,
        cfg: &OverlayConfig,
        layers: Option<&[PathBuf]>,
        access: Access,
    ) -> Result<Opening, OverlayError> {
        check_config(path, cfg)?;
        let given = open_given(layers, cfg)?;
        let (file, created, len) = open_locked(path, access)?;
        let unwritten = len == 0 || header_never_written(&file, path, len)?;
        Ok(Opening {
            file,
            created,
            len,
            unwritten,
            given,
        })
    }
}

fn open_given(
    layers: Option<&[PathBuf]>,
    cfg: &OverlayConfig,
) -> Result<Option<Chain>, OverlayError> {
    layers
        .map(|l| Chain::open(&absolute_paths(l)?, cfg.disk_size, &cfg.fingerprint, None))
        .transpose()
}

/// Opens the chain of an existing overlay. `given` layers (already
/// opened) must be the recorded ones: as many, with the same digests in
/// the same order (their paths may differ: moved layers can be named where
/// they are now, the header keeps the recorded paths). Without, the
/// recorded paths are opened and each must still hold the recorded digest.
pub(super) fn resolve_chain(
    file: &File,
    path: &Path,
    header: &Header,
    cfg: &OverlayConfig,
    given: Option<Chain>,
) -> Result<Chain, OverlayError> {
    use std::os::unix::ffi::OsStrExt;
    let recorded = read_chain(file, path, header)?;
    let describe = |n: usize| match n {
        0 => "no layers".to_string(),
        1 => "1 layer".to_string(),
        n => format!("{n} layers"),
    };
    if let Some(given) = &given
        && given.layers().len() != recorded.len()
    {
        return Err(OverlayError::ChainMismatch {
            path: path.to_path_buf(),
            what: format!(
                "it records {}, --layer gives {}",
                describe(recorded.len()),
                describe(given.layers().len())
            ),
        });
    }
    let was_given = given.is_some();
    let chain = match given {
        Some(chain) => chain,
        None => {
            let paths: Vec<PathBuf> = recorded
                .iter()
                .map(|e| PathBuf::from(std::ffi::OsStr::from_bytes(&e.path)))
                .collect();
            Chain::open(&paths, cfg.disk_size, &cfg.fingerprint, Some(path))?
        }
    };
    for (i, (layer, want)) in chain.layers().iter().zip(&recorded).enumerate() {
        if layer.digest() == want.digest {
            if layer.path().as_os_str().as_bytes() != want.path.as_slice() {
                tracing::info!(
                    overlay = %path.display(),
                    layer = %layer.path().display(),
                    recorded = %String::from_utf8_lossy(&want.path),
                    "layer given at another path than recorded; same digest"
                );
            }
            continue;
        }
        let recorded_path = String::from_utf8_lossy(&want.path);
        return Err(if was_given {
            OverlayError::ChainMismatch {
                path: path.to_path_buf(),
                what: format!(
                    "layer {} is {}, but it records {} ({recorded_path}) as layer {}",
                    layer.path().display(),
                    short(&layer.digest()),
                    short(&want.digest),
                    i + 1
                ),
            }
        } else {
            OverlayError::LayerModified {
                path: layer.path().to_path_buf(),
                what: format!(
                    "its digest is {}, overlay {} records {}",
                    short(&layer.digest()),
                    path.display(),
                    short(&want.digest)
                ),
            }
        });
    }
    Ok(chain)
}

/// How [`open_file`] opens an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Read-write, created (mode 0600) when missing.
    Create,
    /// Read-write, must exist.
    Existing,
    /// Read-only, must exist.
    ReadOnly,
}

/// Opens an overlay file, which must be a regular file: anything else is
/// [`OverlayError::NotRegular`]. The type is checked before opening (so
/// that a directory or a device is never opened for writing) and again on
/// the open descriptor (the path may have changed meanwhile). `O_NONBLOCK`
/// keeps the open of a FIFO from waiting for a writer; it means nothing
/// for a regular file. Returns whether the file was created.
pub(super) fn open_file(path: &Path, access: Access) -> Result<(File, bool), OverlayError> {
    match fs::metadata(path) {
        Ok(meta) => check_regular(path, &meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && access == Access::Create => {}
        Err(e) => return Err(io_err(path, "open")(e)),
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(access != Access::ReadOnly)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    let mut created = false;
    let opened = if access == Access::Create {
        match options
            .clone()
            .create_new(true)
            .mode(OVERLAY_MODE)
            .open(path)
        {
            Ok(file) => {
                created = true;
                // The umask may have taken bits away, never added: set
                // exactly 0600, whatever it is.
                file.set_permissions(fs::Permissions::from_mode(OVERLAY_MODE))
                    .map_err(io_err(path, "set mode"))?;
                Ok(file)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options.open(path),
            Err(e) => Err(e),
        }
    } else {
        options.open(path)
    };
    let file = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::EISDIR) => OverlayError::NotRegular {
            path: path.to_path_buf(),
            kind: "a directory",
        },
        _ => io_err(path, "open")(e),
    })?;
    check_regular(path, &file.metadata().map_err(io_err(path, "stat"))?)?;
    Ok((file, created))
}

/// [`open_file`], then the lock without waiting: shared for reading,
/// exclusive for writing. Returns the file, whether it was created and its
/// length.
///
/// The file locked must still be the one at `path`: a freeze (or anyone)
/// may replace the file between the open and the lock, and a lock on the
/// replaced, unlinked file would let a server write where nobody will ever
/// read. Then the open starts again on the new file, a few times at most.
pub(super) fn open_locked(path: &Path, access: Access) -> Result<(File, bool, u64), OverlayError> {
    const ATTEMPTS: usize = 4;
    for _ in 0..ATTEMPTS {
        let (file, created) = open_file(path, access)?;
        #[cfg(test)]
        tests::between_open_and_lock(path);
        let locked = match access {
            Access::ReadOnly => sys::try_lock_shared(&file),
            Access::Create | Access::Existing => sys::try_lock_exclusive(&file),
        };
        if !locked.map_err(io_err(path, "lock"))? {
            return Err(OverlayError::Locked {
                path: path.to_path_buf(),
            });
        }
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        let linked = fs::metadata(path)
            .is_ok_and(|at| (at.dev(), at.ino()) == (meta.dev(), meta.ino()) && meta.nlink() > 0);
        if linked {
            return Ok((file, created, meta.len()));
        }
        tracing::info!(path = %path.display(), "overlay was replaced while it was being opened; opening the new file");
    }
    Err(OverlayError::Replaced {
        path: path.to_path_buf(),
        attempts: ATTEMPTS,
    })
}

fn check_regular(path: &Path, meta: &fs::Metadata) -> Result<(), OverlayError> {
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(OverlayError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

fn check_config(path: &Path, cfg: &OverlayConfig) -> Result<(), OverlayError> {
    format::check_disk_size(cfg.disk_size).map_err(|reason| OverlayError::Config {
        path: path.to_path_buf(),
        reason,
    })
}

/// Lays out a new overlay over `chain` in an empty, locked file. Nothing
/// is synced here: a new overlay holds nothing worth keeping until the
/// first flush, which makes the header (and, see [`Overlay::flush`], the
/// directory entry) durable. A crash before it leaves an empty file or a
/// zero header, which `open` treats as a new overlay: launching a node
/// costs no sync.
pub(super) fn create(
    file: &File,
    path: &Path,
    cfg: &OverlayConfig,
    chain: &Chain,
) -> Result<Header, OverlayError> {
    let (mut header, section) = new_header(path, cfg, &chain.entries())?;
    header.clean = false;
    write_new(file, path, &header, &section)?;
    Ok(header)
}

/// The header of a new, empty overlay over the chain `entries`, and the
/// chain section that follows it.
pub(super) fn new_header(
    path: &Path,
    cfg: &OverlayConfig,
    entries: &[ChainEntry],
) -> Result<(Header, Vec<u8>), OverlayError> {
    if let Some(e) = entries.iter().find(|e| e.path.len() > MAX_LAYER_PATH) {
        return Err(OverlayError::Config {
            path: path.to_path_buf(),
            reason: FormatError::Invalid(format!(
                "layer path {} is longer than {MAX_LAYER_PATH} bytes",
                String::from_utf8_lossy(&e.path)
            )),
        });
    }
    let section = format::encode_chain(entries);
    let kind = Kind::Overlay {
        chain_len: entries.len() as u32,
        chain_bytes: section.len() as u64,
        chain_crc: crc32fast::hash(&section),
    };
    Ok((
        Header::with_kind(cfg.disk_size, cfg.fingerprint, kind),
        section,
    ))
}

/// Writes a new overlay's `header` and chain `section` to an empty file
/// and sizes it; nothing is synced.
pub(super) fn write_new(
    file: &File,
    path: &Path,
    header: &Header,
    section: &[u8],
) -> Result<(), OverlayError> {
    // The map is a hole, which reads as all `Base`; the data area too.
    file.set_len(header.file_len())
        .map_err(io_err(path, "set size"))?;
    if !section.is_empty() {
        file.write_all_at(section, format::HEADER_SIZE as u64)
            .map_err(io_err(path, "write chain"))?;
    }
    file.write_all_at(&header.encode(), 0)
        .map_err(io_err(path, "write header"))
}

/// Syncs a new file and its directory entry.
fn make_durable(file: &File, path: &Path) -> Result<(), OverlayError> {
    file.sync_all().map_err(io_err(path, "sync"))?;
    sys::sync_dir(sys::parent_dir(path)).map_err(io_err(path, "sync its directory"))
}

/// Whether the file starts with a header that was never written (all
/// zeros): what a crash right after creation can leave.
fn header_never_written(file: &File, path: &Path, len: u64) -> Result<bool, OverlayError> {
    let mut buf = vec![0u8; format::HEADER_SIZE.min(len as usize)];
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err(path, "read header"))?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// Reads and checks the header, and that the file holds all it describes.
pub(super) fn read_header(file: &File, path: &Path, len: u64) -> Result<Header, OverlayError> {
    let mut buf = vec![0u8; format::HEADER_SIZE];
    let n = (len as usize).min(buf.len());
    file.read_exact_at(&mut buf[..n], 0)
        .map_err(io_err(path, "read header"))?;
    buf.truncate(n);
    let header = parse_header(&buf).map_err(|e| OverlayError::format(path, e))?;
    if len < header.file_len() {
        return Err(OverlayError::format(
            path,
            FormatError::Truncated {
                what: "map and data area",
                need: header.file_len(),
                have: len,
            },
        ));
    }
    Ok(header)
}

pub(super) enum MapError {
    Io(io::Error),
    Format(FormatError),
}

impl MapError {
    pub(super) fn at(self, path: &Path) -> OverlayError {
        match self {
            MapError::Io(e) => io_err(path, "read map")(e),
            MapError::Format(e) => OverlayError::format(path, e),
        }
    }
}

/// Visits the on-disk map in chunks: `f(first_block, bytes)`.
pub(super) fn for_map_chunks(
    file: &File,
    header: &Header,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), FormatError>,
) -> Result<(), MapError> {
    let mut buf = vec![0u8; MAP_CHUNK.min(header.map_len) as usize];
    let mut first = 0;
    while first < header.map_len {
        let n = MAP_CHUNK.min(header.map_len - first) as usize;
        file.read_exact_at(&mut buf[..n], header.map_offset + first)
            .map_err(MapError::Io)?;
        f(first, &buf[..n]).map_err(MapError::Format)?;
        first += n as u64;
    }
    Ok(())
}

/// Reads the map, counts its states and checks it against the checksum
/// recorded at the last clean close.
fn read_checked_map(
    file: &File,
    path: &Path,
    header: &Header,
) -> Result<(Vec<u8>, StateCounts), OverlayError> {
    let mut states = Vec::with_capacity(header.map_len as usize);
    let mut counts = StateCounts::default();
    let mut hasher = crc32fast::Hasher::new();
    for_map_chunks(file, header, |first, b| {
        hasher.update(b);
        format::count_states(b, first, &mut counts)?;
        states.extend_from_slice(b);
        Ok(())
    })
    .map_err(|e| e.at(path))?;
    check_map_crc(path, header, hasher.finalize())?;
    Ok((states, counts))
}

/// Blocks per state as the next server would find them: those of the
/// live map a server of this boot left, else of the map on disk.
fn current_counts(
    file: &File,
    path: &Path,
    header: &Header,
    len: u64,
) -> Result<StateCounts, OverlayError> {
    match live::read_live_states(file, path, header, len)? {
        Some(states) => {
            let mut counts = StateCounts::default();
            format::count_states(&states, 0, &mut counts)
                .map_err(|e| OverlayError::format(path, e))?;
            Ok(counts)
        }
        None => Ok(read_counts(file, path, header)?.0),
    }
}

/// Blocks per state on disk, and the map's CRC32.
fn read_counts(
    file: &File,
    path: &Path,
    header: &Header,
) -> Result<(StateCounts, u32), OverlayError> {
    let mut counts = StateCounts::default();
    let mut hasher = crc32fast::Hasher::new();
    for_map_chunks(file, header, |first, b| {
        hasher.update(b);
        format::count_states(b, first, &mut counts)
    })
    .map_err(|e| e.at(path))?;
    Ok((counts, hasher.finalize()))
}

/// Compares the map's CRC32 with the one recorded at the last clean close.
/// Only a cleanly closed overlay is checked: while in use, or after a crash,
/// the map legitimately differs from what was recorded.
fn check_map_crc(path: &Path, header: &Header, computed: u32) -> Result<MapCheck, OverlayError> {
    match (header.clean, header.map_crc) {
        (true, Some(recorded)) if recorded != computed => Err(OverlayError::Corrupt {
            path: path.to_path_buf(),
            reason: FormatError::MapCrc { recorded, computed },
        }),
        (true, Some(_)) => Ok(MapCheck::Verified),
        (true, None) => {
            tracing::info!(
                path = %path.display(),
                "no map checksum recorded (closed by an older ociblk): map not verified"
            );
            Ok(MapCheck::NotRecorded)
        }
        (false, _) => {
            tracing::info!(
                path = %path.display(),
                "overlay not closed cleanly: map checksum not verified"
            );
            Ok(MapCheck::NotClosedCleanly)
        }
    }
}

/// CRC32 of a map of `len` `Base` entries.
pub(super) fn zero_map_crc(len: u64) -> u32 {
    let zeros = vec![0u8; MAP_CHUNK.min(len) as usize];
    let mut hasher = crc32fast::Hasher::new();
    let mut done = 0;
    while done < len {
        let n = MAP_CHUNK.min(len - done);
        hasher.update(&zeros[..n as usize]);
        done += n;
    }
    hasher.finalize()
}

/// Sets every map entry to `Base` (zero).
fn zero_map(file: &File, header: &Header) -> io::Result<()> {
    match sys::punch_hole(file.as_fd(), header.map_offset, header.map_len) {
        Err(e) if sys::unsupported(&e) => {}
        r => return r,
    }
    let zeros = vec![0u8; MAP_CHUNK.min(header.map_len) as usize];
    let mut done = 0;
    while done < header.map_len {
        let n = MAP_CHUNK.min(header.map_len - done);
        file.write_all_at(&zeros[..n as usize], header.map_offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::RefCell;
    use std::path::Path;

    type Hook = Box<dyn FnOnce(&Path)>;

    thread_local! {
        static BETWEEN_OPEN_AND_LOCK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `hook` once, in this thread's next open, after the file is
    /// opened and before it is locked: where a server can be held up.
    pub(crate) fn hold_between_open_and_lock(hook: impl FnOnce(&Path) + 'static) {
        BETWEEN_OPEN_AND_LOCK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    }

    pub(super) fn between_open_and_lock(path: &Path) {
        if let Some(hook) = BETWEEN_OPEN_AND_LOCK.with(|h| h.borrow_mut().take()) {
            hook(path);
        }
    }
}
