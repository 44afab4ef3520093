//! The chain of layers an overlay's header records: read back, and
//! matched with the layers given or opened from the recorded paths.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::check::read_overlay_header;
use super::lock::{Access, open_file};
use crate::chain::{Chain, short};
use crate::format::{self, ChainEntry, Header, Kind};
use crate::{Overlay, OverlayConfig, OverlayError, io_err};

/// Makes layer paths absolute (without resolving links), as the chain
/// records them.
pub(crate) fn absolute_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, OverlayError> {
    paths
        .iter()
        .map(|p| std::path::absolute(p).map_err(io_err(p, "make the layer path absolute")))
        .collect()
}

/// Reads the chain an overlay's header records (empty for none).
pub(crate) fn read_chain(
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

impl Overlay {
    /// The chain of layers the overlay file at `path` records, bottom
    /// first (empty for none): the paths and the digests its layers had
    /// when they were checked, as the overlay was made over them or frozen.
    /// Reads the header alone, without locking the file or opening a
    /// layer; a frozen layer is refused.
    pub fn recorded_chain(path: impl AsRef<Path>) -> Result<Vec<ChainEntry>, OverlayError> {
        let path = path.as_ref();
        let (file, _) = open_file(path, Access::ReadOnly)?;
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let header = read_overlay_header(&file, path, len)?;
        read_chain(&file, path, &header)
    }
}

/// Opens the chain of an existing overlay. `given` layers (already
/// opened) must be the recorded ones: as many, with the same digests in
/// the same order (their paths may differ: moved layers can be named where
/// they are now, the header keeps the recorded paths). Without, the
/// recorded paths are opened and each must still hold the recorded digest.
pub(crate) fn resolve_chain(
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
