//! Laying out a new overlay: its header, the chain section of the layers
//! it sits on, a map that is a hole (all `Base`) and an empty data area.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ociblk_io::sys;

use crate::chain::Chain;
use crate::format::{self, ChainEntry, FormatError, Header, Kind, MAX_LAYER_PATH};
use crate::{OverlayConfig, OverlayError, io_err};

/// Lays out a new overlay over `chain` in an empty, locked file. Nothing
/// is synced here: a new overlay holds nothing worth keeping until the
/// first flush, which makes the header (and, see
/// [`Overlay::flush`](crate::Overlay::flush), the directory entry)
/// durable. A crash before it leaves an empty file or a zero header, which
/// `open` treats as a new overlay: launching a node costs no sync.
pub(crate) fn create(
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
pub(crate) fn new_header(
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
pub(crate) fn write_new(
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
pub(super) fn make_durable(file: &File, path: &Path) -> Result<(), OverlayError> {
    file.sync_all().map_err(io_err(path, "sync"))?;
    sys::sync_dir(sys::parent_dir(path)).map_err(io_err(path, "sync its directory"))
}
