//! Opening an overlay for serving, read-write or read-only: checking it
//! against the disk and the layers it is opened for, laying out a new one,
//! taking a dead server's live map, and assembling the [`Overlay`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, RwLock};

use super::check::{current_counts, header_never_written, read_checked_map, read_overlay_header};
use super::create::{create, make_durable};
use super::lock::{Access, open_locked};
use super::recorded_chain::{absolute_paths, resolve_chain};
use crate::chain::Chain;
use crate::format::{self, Header};
use crate::map::{BlockMap, StateCounts};
use crate::{FlushMode, Overlay, OverlayConfig, OverlayError, STRIPES, io_err, live};

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
        open_as(path.as_ref(), cfg, None, Access::Create)
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
        open_as(path.as_ref(), cfg, layers, Access::Create)
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
        open_as(path.as_ref(), cfg, None, Access::ReadOnly)
    }

    /// [`Overlay::open_read_only`] over a chain of layers, checked as by
    /// [`Overlay::open_over`]. A file without a header reads as the chain.
    pub fn open_read_only_over(
        path: impl AsRef<Path>,
        cfg: OverlayConfig,
        layers: Option<&[PathBuf]>,
    ) -> Result<Overlay, OverlayError> {
        open_as(path.as_ref(), cfg, layers, Access::ReadOnly)
    }
}

/// What every open does first: checks `cfg` and the layers given, opens
/// and locks the file; then serves it as `access` says.
fn open_as(
    path: &Path,
    cfg: OverlayConfig,
    layers: Option<&[PathBuf]>,
    access: Access,
) -> Result<Overlay, OverlayError> {
    let opening = Opening::start(path, &cfg, layers, access)?;
    match access {
        Access::ReadOnly => opening.read_only(path, cfg),
        Access::Create | Access::Existing => opening.read_write(path, cfg),
    }
}

impl Opening {
    /// The rest of [`Overlay::open_over`].
    fn read_write(mut self, path: &Path, cfg: OverlayConfig) -> Result<Overlay, OverlayError> {
        let mut fresh = self.unwritten;
        if fresh && !self.created {
            tracing::info!(
                path = %path.display(),
                bytes = self.len,
                "initialising an existing file without an overlay header as a new overlay"
            );
        }
        let (header, chain) = if fresh {
            let chain = self.given.take().unwrap_or_default();
            self.file.set_len(0).map_err(io_err(path, "truncate"))?;
            (create(&self.file, path, &cfg, &chain)?, chain)
        } else {
            let header = read_overlay_header(&self.file, path, self.len)?;
            match mismatch(&header, &cfg) {
                None => {
                    let chain = resolve_chain(&self.file, path, &header, &cfg, self.given)?;
                    (header, chain)
                }
                Some(what) => {
                    let counts = current_counts(&self.file, path, &header, self.len)?;
                    check_unused(path, &header, &counts, what)?;
                    let chain = self.given.take().unwrap_or_default();
                    tracing::info!(path = %path.display(), "re-creating unused overlay for another disk");
                    self.file.set_len(0).map_err(io_err(path, "truncate"))?;
                    fresh = true;
                    (create(&self.file, path, &cfg, &chain)?, chain)
                }
            }
        };
        if fresh && !chain.is_empty() {
            // Unlike an empty overlay over the base disk, this one must not
            // come back as a new file without its chain after a crash: the
            // node's disk would lose the layers.
            make_durable(&self.file, path)?;
        }
        // The block states live in the live map region from here on (see
        // `live`): a new map is all `Base`; after a server died on this boot
        // of the host its live map is newer than the map on disk.
        let map = if fresh {
            live::create(&self.file, path, &header, None)?
        } else {
            let (disk, _) = read_checked_map(&self.file, path, &header)?;
            match live::adopt(&self.file, path, &header, self.len)? {
                Some(map) => {
                    let newer = map.mark_differences(&disk);
                    tracing::info!(
                        path = %path.display(),
                        blocks = newer,
                        "the last server died: taking its live map, which holds every write it completed"
                    );
                    map
                }
                None => live::create(&self.file, path, &header, Some(&disk))?,
            }
        };
        let access = Opened::ReadWrite { created: fresh };
        let ov = Overlay::assemble(self.file, path, cfg.flush, header, map, chain, access);
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

    /// The rest of [`Overlay::open_read_only_over`].
    fn read_only(mut self, path: &Path, cfg: OverlayConfig) -> Result<Overlay, OverlayError> {
        let all_base = |header: &Header| {
            BlockMap::all_base(header.map_len).map_err(io_err(path, "allocate the map"))
        };
        let (header, map, chain) = if self.unwritten {
            tracing::info!(path = %path.display(), "overlay has no header yet: serving the base disk and layers given");
            let header = Header::new(cfg.disk_size, cfg.fingerprint);
            let map = all_base(&header)?;
            (header, map, self.given.take().unwrap_or_default())
        } else {
            let header = read_overlay_header(&self.file, path, self.len)?;
            let (disk, mut counts) = read_checked_map(&self.file, path, &header)?;
            // A server that died on this boot left newer states in its live
            // map: read what the next server would serve.
            let states = match live::read_live_states(&self.file, path, &header, self.len)? {
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
                (header, map, self.given.take().unwrap_or_default())
            } else {
                let chain = resolve_chain(&self.file, path, &header, &cfg, self.given)?;
                let map =
                    BlockMap::from_bytes(&states).map_err(io_err(path, "allocate the map"))?;
                (header, map, chain)
            }
        };
        let access = Opened::ReadOnly;
        Ok(Overlay::assemble(
            self.file, path, cfg.flush, header, map, chain, access,
        ))
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

/// Opens the layers given for an overlay (made absolute), if any.
fn open_given(
    layers: Option<&[PathBuf]>,
    cfg: &OverlayConfig,
) -> Result<Option<Chain>, OverlayError> {
    layers
        .map(|l| Chain::open(&absolute_paths(l)?, cfg.disk_size, &cfg.fingerprint, None))
        .transpose()
}

fn check_config(path: &Path, cfg: &OverlayConfig) -> Result<(), OverlayError> {
    format::check_disk_size(cfg.disk_size).map_err(|reason| OverlayError::Config {
        path: path.to_path_buf(),
        reason,
    })
}
