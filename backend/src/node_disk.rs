//! The node's disk as the guest sees it: the computed base disk with the
//! node's copy-on-write overlay on top.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ociblk_io::iobuf::IoBufs;
use ociblk_layout::{Layout, Piece, Segment};
use ociblk_overlay::{BlockState, Overlay, OverlayConfig, OverlayError};
use tracing::{error, info};

use crate::verifier::Verifiers;
use ociblk_server::device::BlockDevice;

/// How often a deferred overlay open tries the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// An overlay opened (and locked) only when the disk is first used, for
/// a server that takes a node over from another server still holding the
/// overlay: the destination of a live migration. Until then the server
/// answers the frontend's handshake from the layout alone. The first
/// request waits up to `wait` for the lock; once that time has passed,
/// each request tries once and fails with an I/O error while the overlay
/// is still locked.
#[derive(Debug)]
pub struct DeferredOverlay {
    path: PathBuf,
    cfg: OverlayConfig,
    layers: Option<Vec<PathBuf>>,
    wait: Duration,
    /// When the disk was first needed; held while opening, so that one
    /// thread opens and the others wait for it.
    first_need: Mutex<Option<Instant>>,
}

impl DeferredOverlay {
    /// The overlay at `path` (see [`Overlay::open_over`] for `cfg` and
    /// `layers`), opened read-write at the first use of the disk, waiting
    /// up to `wait` for its lock.
    pub fn new(
        path: PathBuf,
        cfg: OverlayConfig,
        layers: Option<Vec<PathBuf>>,
        wait: Duration,
    ) -> Self {
        DeferredOverlay {
            path,
            cfg,
            layers,
            wait,
            first_need: Mutex::new(None),
        }
    }

    /// Opens the overlay into `slot` unless another thread did.
    fn open_into<'a>(&self, slot: &'a OnceLock<Overlay>) -> io::Result<&'a Overlay> {
        let mut first_need = self
            .first_need
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(overlay) = slot.get() {
            return Ok(overlay);
        }
        let deadline = *first_need.get_or_insert_with(Instant::now) + self.wait;
        let waited = Instant::now();
        loop {
            match Overlay::open_over(&self.path, self.cfg.clone(), self.layers.as_deref()) {
                Ok(overlay) => {
                    info!(
                        overlay = %self.path.display(),
                        waited = ?waited.elapsed(),
                        "overlay opened at the disk's first use"
                    );
                    return Ok(slot.get_or_init(|| overlay));
                }
                Err(OverlayError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(e) => {
                    error!(overlay = %self.path.display(), "cannot open the overlay: {e}");
                    return Err(io::Error::other(format!(
                        "overlay {}: {e}",
                        self.path.display()
                    )));
                }
            }
        }
    }
}

/// Bytes of FAT entries generated per copy when a read covers a FAT chain.
const FAT_CHUNK: usize = 4096;

/// Base disk + overlay. Payload files are opened read-only and read
/// buffered, so every node on the host shares their page cache. Payload
/// bytes are served only from chunks that `verifiers` has checked.
#[derive(Debug)]
pub struct NodeDisk {
    layout: Layout,
    files: Vec<File>,
    verifiers: Verifiers,
    /// The overlay, once open: from the start, or at the first use of a
    /// [`DeferredOverlay`].
    overlay: OnceLock<Overlay>,
    deferred: Option<DeferredOverlay>,
    read_only: bool,
}

impl NodeDisk {
    /// The node's disk: the payloads (opened first, before the overlay,
    /// which may be a new file) under the overlay, if any. Without an
    /// overlay the disk is read-only. `verifiers` (see
    /// [`Verifiers::for_image`]) must have been made for the layout, or be
    /// [`Verifiers::disabled`].
    pub fn open(
        reader: ociblk_layout::DiskReader,
        overlay: Option<Overlay>,
        read_only: bool,
        verifiers: Verifiers,
    ) -> Self {
        let read_only = read_only || overlay.is_none();
        let slot = OnceLock::new();
        if let Some(overlay) = overlay {
            let _ = slot.set(overlay);
        }
        NodeDisk {
            layout: reader.layout,
            files: reader.files,
            verifiers,
            overlay: slot,
            deferred: None,
            read_only,
        }
    }

    /// Like [`open`](Self::open) with a writable overlay, but the overlay
    /// is opened at the disk's first read, write, discard or write-zeroes
    /// (see [`DeferredOverlay`]). A flush before that has nothing to flush.
    pub fn open_deferred(
        reader: ociblk_layout::DiskReader,
        overlay: DeferredOverlay,
        verifiers: Verifiers,
    ) -> Self {
        NodeDisk {
            layout: reader.layout,
            files: reader.files,
            verifiers,
            overlay: OnceLock::new(),
            deferred: Some(overlay),
            read_only: false,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The overlay, if it is open.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.get()
    }

    /// The overlay requests go to: opened now if it was deferred.
    fn overlay_for_io(&self) -> io::Result<Option<&Overlay>> {
        match (self.overlay.get(), &self.deferred) {
            (Some(overlay), _) => Ok(Some(overlay)),
            (None, Some(deferred)) => deferred.open_into(&self.overlay).map(Some),
            (None, None) => Ok(None),
        }
    }

    pub fn verifiers(&self) -> &Verifiers {
        &self.verifiers
    }

    /// Reads base-disk bytes `[offset, offset + len)` into `dst[at..]`.
    fn read_base(&self, offset: u64, dst: &IoBufs<'_>, at: usize, len: usize) -> io::Result<()> {
        let mut pos = at;
        for seg in self.layout.extents.segments(offset..offset + len as u64) {
            let n = seg.len as usize;
            match seg.piece {
                Piece::File { source, offset } => {
                    if let Some(v) = self.verifiers.get(source)
                        && let Err(e) = v.ensure(&self.files[source], offset, n as u64)
                    {
                        v.log_failure(&e);
                        return Err(e.into());
                    }
                    dst.read_from_file(&self.files[source], offset, pos, n)
                        .map_err(|e| {
                            let path = &self.layout.sources[source].path;
                            io::Error::new(
                                e.kind(),
                                format!("{}: read of {n} bytes at {offset}: {e}", path.display()),
                            )
                        })?;
                }
                Piece::Zero => dst.fill_zero(pos, n),
                Piece::Bytes(b) => dst.copy_from(pos, b),
                Piece::FatChain {
                    first_cluster,
                    skip,
                } => {
                    // Generated in small chunks: a chain can span megabytes.
                    let mut chunk = [0u8; FAT_CHUNK];
                    let mut done = 0;
                    while done < n {
                        let k = (n - done).min(FAT_CHUNK);
                        let part = Segment {
                            offset: seg.offset + done as u64,
                            len: k as u64,
                            piece: Piece::FatChain {
                                first_cluster,
                                skip: skip + done as u64,
                            },
                        };
                        part.fill(&mut chunk[..k]);
                        dst.copy_from(pos + done, &chunk[..k]);
                        done += k;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Base-disk bytes into an ordinary buffer (for read-modify-write).
    fn base_bytes(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.read_base(offset, &IoBufs::from_slice(buf), 0, len)
    }

    fn writable_overlay(&self) -> io::Result<&Overlay> {
        match (self.overlay_for_io()?, self.read_only) {
            (Some(o), false) => Ok(o),
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            )),
        }
    }
}

impl BlockDevice for NodeDisk {
    fn size(&self) -> u64 {
        self.layout.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, dst: &IoBufs<'_>) -> io::Result<()> {
        let Some(overlay) = self.overlay_for_io()? else {
            return self.read_base(offset, dst, 0, dst.len());
        };
        for run in overlay.runs(offset, dst.len() as u64) {
            let at = (run.offset - offset) as usize;
            let len = run.len as usize;
            match run.state {
                BlockState::Base => self.read_base(run.offset, dst, at, len)?,
                BlockState::Data => overlay.read_data(run.offset, dst, at, len)?,
                BlockState::Zero => dst.fill_zero(at, len),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, src: &IoBufs<'_>) -> io::Result<()> {
        let base = |o: u64, b: &mut [u8]| self.base_bytes(o, b);
        self.writable_overlay()?
            .write(offset, src, 0, src.len(), &base)
    }

    fn flush(&self) -> io::Result<()> {
        // An overlay not opened yet holds nothing of this server's.
        match self.overlay.get() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let base = |o: u64, b: &mut [u8]| self.base_bytes(o, b);
        self.writable_overlay()?.discard(offset, len, &base)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let base = |o: u64, b: &mut [u8]| self.base_bytes(o, b);
        self.writable_overlay()?.write_zeroes(offset, len, &base)
    }
}
