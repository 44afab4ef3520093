//! The node's disk as the guest sees it: the computed base disk with the
//! node's copy-on-write overlay on top.

use std::fs::File;
use std::io;

use ociblk_layout::{Layout, Piece, Segment};

use crate::device::BlockDevice;
use crate::iobuf::IoBufs;
use crate::overlay::{BlockState, Overlay};
use crate::verifier::Verifiers;

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
    overlay: Option<Overlay>,
    read_only: bool,
}

impl NodeDisk {
    /// Opens the layout's source files. Without an overlay the disk is
    /// read-only. `verifiers` (see [`Verifiers::for_image`]) must have been made
    /// for `layout`, or be [`Verifiers::disabled`].
    pub fn open(
        layout: Layout,
        overlay: Option<Overlay>,
        read_only: bool,
        verifiers: Verifiers,
    ) -> ociblk_layout::Result<Self> {
        let reader = ociblk_layout::DiskReader::open(layout)?;
        let read_only = read_only || overlay.is_none();
        Ok(NodeDisk {
            layout: reader.layout,
            files: reader.files,
            verifiers,
            overlay,
            read_only,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
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
        match (&self.overlay, self.read_only) {
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
        let Some(overlay) = &self.overlay else {
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
        match &self.overlay {
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
