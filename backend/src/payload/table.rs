//! The files a disk reads, opened once: the payload blobs, each with its
//! digest and chunk hashes, and the user's own files (loader, node
//! parameters), which have neither.

use ociblk_layout::{DiskReader, Layout, OsImage, Source};
use ociblk_registry::BlobSpec;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One file a disk reads.
#[derive(Debug)]
pub struct Blob {
    /// The payload's name, or the role of a user file.
    pub name: String,
    pub path: PathBuf,
    /// Open read-only and read buffered: every node on the host shares its
    /// page cache. Private to the store: its bytes leave only through a
    /// [`Servable`](super::Servable).
    pub(super) file: File,
    /// A payload: its digest and chunk-hash table, the same description
    /// the registry cache keys its bytes by. `None`: a file the user named
    /// on the command line, served as it is.
    pub payload: Option<BlobSpec>,
}

impl Blob {
    /// The open file's metadata (which file it is, for an export that must
    /// not write over what it reads).
    pub fn metadata(&self) -> std::io::Result<std::fs::Metadata> {
        self.file.metadata()
    }
}

/// The blobs of a disk, by the layout's source index.
#[derive(Debug)]
pub(crate) struct BlobTable(Vec<Blob>);

impl BlobTable {
    /// The sources of a layout, opened (and their sizes checked) by
    /// [`DiskReader::open`].
    pub(crate) fn from_reader(reader: DiskReader) -> (Layout, Self) {
        let DiskReader { layout, files } = reader;
        let table = Self::with_files(&layout.sources, files);
        (layout, table)
    }

    /// `sources`, opened (for tests and benchmarks).
    pub(crate) fn from_sources(sources: &[Source]) -> std::io::Result<Self> {
        let files = sources
            .iter()
            .map(|s| File::open(&s.path).map_err(|e| with_path(&s.path, e)))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self::with_files(sources, files))
    }

    fn with_files(sources: &[Source], files: Vec<File>) -> Self {
        let blobs = sources
            .iter()
            .zip(files)
            .map(|(source, file)| Blob {
                name: source.name.clone(),
                path: source.path.clone(),
                file,
                payload: payload_id(source),
            })
            .collect();
        BlobTable(blobs)
    }

    /// Every uncompressed payload of `image` (for `ociblk verify`), opened.
    pub(crate) fn from_image(image: &OsImage) -> std::io::Result<Self> {
        let mut blobs = Vec::new();
        for p in image.payloads.iter().filter(|p| p.is_uncompressed()) {
            let file = File::open(&p.path).map_err(|e| with_path(&p.path, e))?;
            blobs.push(Blob {
                name: p.name.clone(),
                path: p.path.clone(),
                file,
                payload: Some(BlobSpec {
                    digest: p.digest.clone(),
                    table: p.chunk_hashes.clone(),
                }),
            });
        }
        Ok(BlobTable(blobs))
    }

    pub(crate) fn get(&self, id: usize) -> Option<&Blob> {
        self.0.get(id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Blob> {
        self.0.iter()
    }
}

/// A layout source's payload identity; `None` for a user file (one
/// without chunk hashes).
fn payload_id(source: &Source) -> Option<BlobSpec> {
    Some(BlobSpec {
        digest: source.digest.clone(),
        table: source.chunk_hashes.clone()?,
    })
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
