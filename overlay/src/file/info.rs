//! Reporting on an overlay without locking it (`ociblk overlay info`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::check::{check_map_crc, header_never_written, read_counts, read_header};
use super::lock::{Access, open_file};
use super::recorded_chain::{read_chain, resolve_chain};
use crate::chain::Layer;
use crate::format::BLOCK_SIZE as BS;
use crate::{FlushMode, MapCheck, Overlay, OverlayConfig, OverlayError, OverlayInfo, io_err};

impl Overlay {
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
                flush: FlushMode::Unsafe,
            };
            resolve_chain(&file, path, &header, &cfg, None)
                .err()
                .map(|e| e.to_string())
        };
        let map_check = if header.layer().is_some() {
            // A layer's map is checked by its metadata digest, which covers
            // the header fields too.
            Layer::open(path, None)?;
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
}
