//! The node's disk as the guest sees it: the computed base disk with the
//! node's copy-on-write overlay on top.

mod deferred;
mod open;

use std::io;
use std::sync::{Arc, OnceLock};

use ociblk_io::iobuf::IoBufs;
use ociblk_layout::{Layout, Piece, Segment};
use ociblk_overlay::{BlockState, Overlay};
use ociblk_server::device::BlockDevice;

pub use deferred::DeferredOverlay;
pub use open::{DiskParts, OpenDiskError, OverlayOpening, OverlayRequest, open_parts};

use crate::payload::Payloads;

/// Bytes of FAT entries generated per copy when a read covers a FAT chain.
const FAT_CHUNK: usize = 4096;

/// Base disk + overlay. Payload bytes are read only through the payload
/// store, which serves a chunk's bytes only once every layer let them
/// through (see [`crate::payload`]).
#[derive(Debug)]
pub struct NodeDisk {
    layout: Layout,
    payloads: Arc<Payloads>,
    /// The overlay, once open: from the start, or at the first use of a
    /// [`DeferredOverlay`].
    overlay: OnceLock<Overlay>,
    deferred: Option<DeferredOverlay>,
    read_only: bool,
}

impl NodeDisk {
    /// The node's disk from its parts ([`open_parts`]). Without an overlay
    /// the disk is read-only; a deferred overlay is opened at the disk's
    /// first read, write, discard or write-zeroes (a flush before that has
    /// nothing to flush).
    pub fn new(parts: DiskParts, read_only: bool) -> Self {
        let overlay = OnceLock::new();
        let (deferred, read_only) = match parts.overlay {
            OverlayOpening::None => (None, true),
            OverlayOpening::Open(o) => {
                let _ = overlay.set(o);
                (None, read_only)
            }
            OverlayOpening::Deferred(d) => (Some(d), read_only),
        };
        NodeDisk {
            layout: parts.layout,
            payloads: parts.payloads,
            overlay,
            deferred,
            read_only,
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

    /// The payload store the disk reads.
    pub fn payloads(&self) -> &Arc<Payloads> {
        &self.payloads
    }

    /// Reads base-disk bytes `[offset, offset + len)` into `dst[at..]`.
    fn read_base(&self, offset: u64, dst: &IoBufs<'_>, at: usize, len: usize) -> io::Result<()> {
        let mut pos = at;
        for seg in self.layout.extents.segments(offset..offset + len as u64) {
            let n = seg.len as usize;
            match seg.piece {
                Piece::File { source, offset } => {
                    self.payloads
                        .ensure_for_read(source, offset..offset + n as u64)?
                        .read_into(dst, pos)?;
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
