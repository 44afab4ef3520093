//! Reading the computed disk through the layout's source files.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::disk::Layout;
use crate::error::{Error, Result};

/// A layout with its source files opened read-only (buffered: nodes share
/// the page cache of the payload blobs).
#[derive(Debug)]
pub struct DiskReader {
    pub layout: Layout,
    pub files: Vec<File>,
}

impl DiskReader {
    /// Opens every source of `layout` and checks that its size still matches.
    pub fn open(layout: Layout) -> Result<Self> {
        let mut files = Vec::with_capacity(layout.sources.len());
        for s in &layout.sources {
            let f = File::open(&s.path).map_err(|e| Error::io(&s.path, e))?;
            let len = f.metadata().map_err(|e| Error::io(&s.path, e))?.len();
            if len != s.size {
                return Err(Error::BlobSize {
                    path: s.path.clone(),
                    digest: s.digest.hex().to_owned(),
                    expected: s.size,
                    actual: len,
                });
            }
            files.push(f);
        }
        Ok(DiskReader { layout, files })
    }

    /// Fills `buf` with the disk's bytes at `offset`; bytes past the end of
    /// the disk read as zeros. A source file that has shrunk is an error,
    /// never silent zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.layout
            .extents
            .read_with(offset, buf, |source, off, dst| {
                let f = self
                    .files
                    .get(source)
                    .ok_or_else(|| io::Error::other("unknown source"))?;
                f.read_exact_at(dst, off).map_err(|e| {
                    let path = &self.layout.sources[source].path;
                    io::Error::new(e.kind(), format!("{}: read at {off}: {e}", path.display()))
                })
            })
    }
}
