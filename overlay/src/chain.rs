//! The frozen layers under an overlay: each layer file opened read-only
//! and locked shared, its header and map checked against its metadata
//! digest, the chain's parent links checked, and one merged index built
//! that says for every block which layer (or the base) holds it, so that a
//! read costs one lookup per block whatever the chain's depth.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ociblk_io::iobuf::IoBufs;
use sha2::{Digest as _, Sha256};

use super::file::{Access, open_locked, read_header};
use super::format::{
    self, BLOCK_SIZE as BS, BlockState, ChainEntry, FormatError, Header, LayerFields, MAX_CHAIN,
};
use super::{OverlayError, io_err};

/// Index value of a block a layer zeroed.
const INDEX_ZERO: u8 = u8::MAX;

/// What lies under an overlay's `Base` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lower {
    /// The computed base disk.
    Base,
    /// Zeros: the topmost layer holding the block zeroed it.
    Zero,
    /// The data of layer `k` (0 = bottom).
    Layer(u8),
}

/// One frozen layer, open read-only and locked shared.
#[derive(Debug)]
pub struct Layer {
    file: File,
    path: PathBuf,
    header: Header,
    fields: LayerFields,
}

impl Layer {
    /// Opens the layer at `path` and checks its header and map against its
    /// metadata digest; returns it with its map. `overlay` names the
    /// overlay that recorded the path, for the error when it is missing.
    pub(super) fn open(
        path: &Path,
        overlay: Option<&Path>,
    ) -> Result<(Layer, Vec<u8>), OverlayError> {
        let (file, _, len) = open_locked(path, Access::ReadOnly).map_err(|e| match e {
            OverlayError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                OverlayError::LayerMissing {
                    path: path.to_path_buf(),
                    overlay: overlay.map(Path::to_path_buf),
                }
            }
            OverlayError::NotRegular { path, kind } => OverlayError::LayerNotRegular { path, kind },
            e => e,
        })?;
        let header = read_header(&file, path, len).map_err(|e| match e {
            OverlayError::Corrupt {
                reason: reason @ FormatError::Truncated { .. },
                ..
            } => OverlayError::LayerModified {
                path: path.to_path_buf(),
                what: reason.to_string(),
            },
            e => e,
        })?;
        let Some(fields) = header.layer().copied() else {
            return Err(OverlayError::NotALayer {
                path: path.to_path_buf(),
            });
        };
        if len != header.file_len() {
            return Err(OverlayError::LayerModified {
                path: path.to_path_buf(),
                what: format!(
                    "{len} bytes long, a layer of this disk is {}",
                    header.file_len()
                ),
            });
        }
        let map = read_layer_map(&file, path, &header, &fields)?;
        Ok((
            Layer {
                file,
                path: path.to_path_buf(),
                header,
                fields,
            },
            map,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn digest(&self) -> [u8; 32] {
        self.fields.digest
    }

    pub fn parent(&self) -> Option<[u8; 32]> {
        self.fields.parent
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub(super) fn file(&self) -> &File {
        &self.file
    }
}

/// Reads a layer's map, checks every state and the metadata digest.
/// The map is read whole, in one call: it is kept in memory anyway.
fn read_layer_map(
    file: &File,
    path: &Path,
    header: &Header,
    fields: &LayerFields,
) -> Result<Vec<u8>, OverlayError> {
    let mut map = vec![0u8; header.map_len as usize];
    file.read_exact_at(&mut map, header.map_offset)
        .map_err(io_err(path, "read map"))?;
    format::check_states(&map, 0).map_err(|e| OverlayError::format(path, e))?;
    let mut hasher = Sha256::new();
    hasher.update(format::digest_prefix(
        header.disk_size,
        &header.fingerprint,
        fields.parent.as_ref(),
        header.map_len,
    ));
    hasher.update(&map);
    let computed: [u8; 32] = hasher.finalize().into();
    if computed != fields.meta_digest {
        return Err(OverlayError::LayerModified {
            path: path.to_path_buf(),
            what: format!(
                "its header and map do not match their digest (recorded {}, computed {})",
                short(&fields.meta_digest),
                short(&computed)
            ),
        });
    }
    Ok(map)
}

/// `sha256:` and the first 12 hex digits of a digest, for messages.
pub(super) fn short(d: &[u8; 32]) -> String {
    ociblk_digest::Digest::from_sha256(d).short()
}

/// The layers under an overlay, bottom first, and the merged index.
#[derive(Debug, Default)]
pub struct Chain {
    layers: Vec<Layer>,
    /// Per block: 0 = base, [`INDEX_ZERO`] = zeroed, k = data of layer k-1.
    /// Empty without layers.
    index: Box<[u8]>,
}

impl Chain {
    /// Opens `paths` (bottom first) as a chain over the disk of
    /// `disk_size` bytes with `fingerprint`, checked as by
    /// [`open_layers`], and merges their maps into the index.
    pub(super) fn open(
        paths: &[PathBuf],
        disk_size: u64,
        fingerprint: &[u8; 32],
        overlay: Option<&Path>,
    ) -> Result<Chain, OverlayError> {
        if paths.is_empty() {
            return Ok(Chain::default());
        }
        let blocks = format::block_count(disk_size);
        let mut index = vec![0u8; blocks as usize].into_boxed_slice();
        let layers = visit_layers(paths, disk_size, fingerprint, overlay, |tag, map| {
            const DATA: u8 = BlockState::Data as u8;
            const ZERO: u8 = BlockState::Zero as u8;
            // A select per entry, no branch: the loop vectorizes.
            for (slot, &v) in index.iter_mut().zip(map) {
                *slot = match v {
                    DATA => tag,
                    ZERO => INDEX_ZERO,
                    _ => *slot,
                };
            }
        })?;
        Ok(Chain { layers, index })
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The digest of the top layer: the parent of a layer frozen above.
    pub fn top_digest(&self) -> Option<[u8; 32]> {
        self.layers.last().map(Layer::digest)
    }

    /// The chain as an overlay records it: see [`entries`].
    pub fn entries(&self) -> Vec<ChainEntry> {
        entries(&self.layers)
    }

    /// What the chain holds for `block`.
    pub(super) fn lower(&self, block: u64) -> Lower {
        match self.index.get(block as usize) {
            None | Some(0) => Lower::Base,
            Some(&INDEX_ZERO) => Lower::Zero,
            Some(&k) => Lower::Layer(k - 1),
        }
    }

    /// Reads `len` bytes at disk offset `offset` from layer `k`'s data area.
    pub(super) fn read_layer(
        &self,
        k: u8,
        offset: u64,
        dst: &IoBufs<'_>,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        let layer = &self.layers[k as usize];
        dst.read_from_file(&layer.file, layer.header.data_offset + offset, at, len)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "layer {}: read of {len} bytes at {offset}: {e}",
                        layer.path.display()
                    ),
                )
            })
    }

    /// Fills `buf` with what the chain holds at block-aligned `offset`:
    /// a layer's data, zeros, or the base disk read by `base`.
    pub(super) fn read_lower(
        &self,
        offset: u64,
        buf: &mut [u8],
        base: super::BaseReader<'_>,
    ) -> io::Result<()> {
        match self.lower(offset / BS) {
            Lower::Base => base(offset, buf),
            Lower::Zero => {
                buf.fill(0);
                Ok(())
            }
            Lower::Layer(k) => {
                let len = buf.len();
                self.read_layer(k, offset, &IoBufs::from_slice(buf), 0, len)
            }
        }
    }
}

/// Opens `paths` (bottom first) as the layers of a chain over the disk of
/// `disk_size` bytes with `fingerprint`, without the merged index: what a
/// new overlay over them needs. Every layer is checked as for reading
/// through it: header and map against its metadata digest, for that disk,
/// the bottom one on the base and each other one on the layer below it.
pub(super) fn open_layers(
    paths: &[PathBuf],
    disk_size: u64,
    fingerprint: &[u8; 32],
    overlay: Option<&Path>,
) -> Result<Vec<Layer>, OverlayError> {
    visit_layers(paths, disk_size, fingerprint, overlay, |_, _| {})
}

/// [`open_layers`], handing each layer's map to `merge` with its index
/// tag (1 = bottom).
fn visit_layers(
    paths: &[PathBuf],
    disk_size: u64,
    fingerprint: &[u8; 32],
    overlay: Option<&Path>,
    mut merge: impl FnMut(u8, &[u8]),
) -> Result<Vec<Layer>, OverlayError> {
    if paths.len() > MAX_CHAIN {
        return Err(OverlayError::ChainBroken {
            path: paths[MAX_CHAIN].clone(),
            what: format!("a chain has at most {MAX_CHAIN} layers"),
        });
    }
    let mut layers: Vec<Layer> = Vec::with_capacity(paths.len());
    for (k, path) in paths.iter().enumerate() {
        let (layer, map) = Layer::open(path, overlay)?;
        check_disk(&layer, disk_size, fingerprint)?;
        check_parent(&layer, layers.last())?;
        merge(k as u8 + 1, &map);
        layers.push(layer);
    }
    Ok(layers)
}

/// The chain of `layers` as an overlay records it. Paths are those the
/// layers were opened by, which the caller made absolute.
pub(super) fn entries(layers: &[Layer]) -> Vec<ChainEntry> {
    use std::os::unix::ffi::OsStrExt;
    layers
        .iter()
        .map(|l| ChainEntry {
            digest: l.digest(),
            path: l.path.as_os_str().as_bytes().to_vec(),
        })
        .collect()
}

fn check_disk(layer: &Layer, disk_size: u64, fingerprint: &[u8; 32]) -> Result<(), OverlayError> {
    let h = &layer.header;
    let mut what = Vec::new();
    if h.disk_size != disk_size {
        what.push(format!("size {} != {} bytes", h.disk_size, disk_size));
    }
    if &h.fingerprint != fingerprint {
        what.push(format!(
            "fingerprint {}.. != {}..",
            &format::hex(&h.fingerprint)[..12],
            &format::hex(fingerprint)[..12]
        ));
    }
    if what.is_empty() {
        Ok(())
    } else {
        Err(OverlayError::LayerMismatch {
            path: layer.path.clone(),
            what: what.join(", "),
        })
    }
}

fn check_parent(layer: &Layer, below: Option<&Layer>) -> Result<(), OverlayError> {
    let what = match (layer.parent(), below) {
        (None, None) => return Ok(()),
        (Some(p), Some(b)) if p == b.digest() => return Ok(()),
        (Some(p), None) => format!(
            "it was frozen over layer {}, which must be given below it",
            short(&p)
        ),
        (None, Some(b)) => format!(
            "it sits on the base disk, but is given above layer {} ({})",
            b.path.display(),
            short(&b.digest())
        ),
        (Some(p), Some(b)) => format!(
            "it was frozen over layer {}, but is given above {} ({})",
            short(&p),
            b.path.display(),
            short(&b.digest())
        ),
    };
    Err(OverlayError::ChainBroken {
        path: layer.path.clone(),
        what,
    })
}
