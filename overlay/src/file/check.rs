//! Reading an overlay's header and map back and checking them: the header
//! against the file's length, the map's states, and after a clean close
//! the map against the checksum recorded then.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::{self, FormatError, Header, Kind, parse_header};
use crate::map::{MAP_CHUNK, StateCounts};
use crate::{MapCheck, OverlayError, io_err, live};

/// Whether the file starts with a header that was never written (all
/// zeros): what a crash right after creation can leave.
pub(super) fn header_never_written(
    file: &File,
    path: &Path,
    len: u64,
) -> Result<bool, OverlayError> {
    let mut buf = vec![0u8; format::HEADER_SIZE.min(len as usize)];
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err(path, "read header"))?;
    Ok(buf.iter().all(|&b| b == 0))
}

/// Reads and checks the header, and that the file holds all it describes.
pub(crate) fn read_header(file: &File, path: &Path, len: u64) -> Result<Header, OverlayError> {
    let mut buf = vec![0u8; format::HEADER_SIZE];
    let n = (len as usize).min(buf.len());
    file.read_exact_at(&mut buf[..n], 0)
        .map_err(io_err(path, "read header"))?;
    buf.truncate(n);
    let header = parse_header(&buf).map_err(|e| OverlayError::format(path, e))?;
    if len < header.file_len() {
        return Err(OverlayError::format(
            path,
            FormatError::Truncated {
                what: "map and data area",
                need: header.file_len(),
                have: len,
            },
        ));
    }
    Ok(header)
}

/// Reads the header of the overlay file at `path` and refuses a layer.
pub(super) fn read_overlay_header(
    file: &File,
    path: &Path,
    len: u64,
) -> Result<Header, OverlayError> {
    let header = read_header(file, path, len)?;
    match header.kind {
        Kind::Layer(_) => Err(OverlayError::IsALayer {
            path: path.to_path_buf(),
        }),
        Kind::Overlay { .. } => Ok(header),
    }
}

pub(super) enum MapError {
    Io(io::Error),
    Format(FormatError),
}

impl MapError {
    pub(super) fn at(self, path: &Path) -> OverlayError {
        match self {
            MapError::Io(e) => io_err(path, "read map")(e),
            MapError::Format(e) => OverlayError::format(path, e),
        }
    }
}

/// Visits the on-disk map in chunks: `f(first_block, bytes)`.
pub(super) fn for_map_chunks(
    file: &File,
    header: &Header,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), FormatError>,
) -> Result<(), MapError> {
    let mut buf = vec![0u8; MAP_CHUNK.min(header.map_len) as usize];
    let mut first = 0;
    while first < header.map_len {
        let n = MAP_CHUNK.min(header.map_len - first) as usize;
        file.read_exact_at(&mut buf[..n], header.map_offset + first)
            .map_err(MapError::Io)?;
        f(first, &buf[..n]).map_err(MapError::Format)?;
        first += n as u64;
    }
    Ok(())
}

/// Reads the map, counts its states and checks it against the checksum
/// recorded at the last clean close.
pub(super) fn read_checked_map(
    file: &File,
    path: &Path,
    header: &Header,
) -> Result<(Vec<u8>, StateCounts), OverlayError> {
    let mut states = Vec::with_capacity(header.map_len as usize);
    let mut counts = StateCounts::default();
    let mut hasher = crc32fast::Hasher::new();
    for_map_chunks(file, header, |first, b| {
        hasher.update(b);
        format::count_states(b, first, &mut counts)?;
        states.extend_from_slice(b);
        Ok(())
    })
    .map_err(|e| e.at(path))?;
    check_map_crc(path, header, hasher.finalize())?;
    Ok((states, counts))
}

/// Blocks per state as the next server would find them: those of the
/// live map a server of this boot left, else of the map on disk.
pub(super) fn current_counts(
    file: &File,
    path: &Path,
    header: &Header,
    len: u64,
) -> Result<StateCounts, OverlayError> {
    match live::read_live_states(file, path, header, len)? {
        Some(states) => {
            let mut counts = StateCounts::default();
            format::count_states(&states, 0, &mut counts)
                .map_err(|e| OverlayError::format(path, e))?;
            Ok(counts)
        }
        None => Ok(read_counts(file, path, header)?.0),
    }
}

/// Blocks per state on disk, and the map's CRC32.
pub(super) fn read_counts(
    file: &File,
    path: &Path,
    header: &Header,
) -> Result<(StateCounts, u32), OverlayError> {
    let mut counts = StateCounts::default();
    let mut hasher = crc32fast::Hasher::new();
    for_map_chunks(file, header, |first, b| {
        hasher.update(b);
        format::count_states(b, first, &mut counts)
    })
    .map_err(|e| e.at(path))?;
    Ok((counts, hasher.finalize()))
}

/// Compares the map's CRC32 with the one recorded at the last clean close.
/// Only a cleanly closed overlay is checked: while in use, or after a crash,
/// the map legitimately differs from what was recorded.
pub(super) fn check_map_crc(
    path: &Path,
    header: &Header,
    computed: u32,
) -> Result<MapCheck, OverlayError> {
    match (header.clean, header.map_crc) {
        (true, Some(recorded)) if recorded != computed => Err(OverlayError::Corrupt {
            path: path.to_path_buf(),
            reason: FormatError::MapCrc { recorded, computed },
        }),
        (true, Some(_)) => Ok(MapCheck::Verified),
        (true, None) => {
            tracing::info!(
                path = %path.display(),
                "no map checksum recorded (closed by an older ociblk): map not verified"
            );
            Ok(MapCheck::NotRecorded)
        }
        (false, _) => {
            tracing::info!(
                path = %path.display(),
                "overlay not closed cleanly: map checksum not verified"
            );
            Ok(MapCheck::NotClosedCleanly)
        }
    }
}

/// CRC32 of a map of `len` `Base` entries.
pub(crate) fn zero_map_crc(len: u64) -> u32 {
    let zeros = vec![0u8; MAP_CHUNK.min(len) as usize];
    let mut hasher = crc32fast::Hasher::new();
    let mut done = 0;
    while done < len {
        let n = MAP_CHUNK.min(len - done);
        hasher.update(&zeros[..n as usize]);
        done += n;
    }
    hasher.finalize()
}
