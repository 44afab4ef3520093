//! Resetting an overlay no server holds: every block back to `Base`, its
//! data freed, in an order a crash midway leaves recoverable.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ociblk_io::sys;

use super::check::{read_overlay_header, zero_map_crc};
use super::lock::{Access, open_locked};
use crate::format::{self, Header};
use crate::map::MAP_CHUNK;
use crate::{Overlay, OverlayError, io_err, live};

impl Overlay {
    /// Returns every block of the overlay at `path` to `Base` and frees its
    /// data. Fails if a server has it open. An empty regular file is left
    /// alone (it already reads as the base disk).
    pub fn reset(path: impl AsRef<Path>) -> Result<(), OverlayError> {
        let path = path.as_ref();
        let (file, _, len) = open_locked(path, Access::Existing)?;
        if len == 0 {
            return Ok(());
        }
        let header = read_overlay_header(&file, path, len)?;
        let fd = file.as_fd();
        let set_clean = |clean: bool| {
            file.write_all_at(&[u8::from(clean)], format::CLEAN_OFFSET as u64)
                .and_then(|()| file.sync_data())
        };
        // Not clean while the map and data disagree with the flag, so that
        // an interrupted reset is finished by the next open's reclaim.
        set_clean(false).map_err(io_err(path, "mark in use"))?;
        // Whatever a dead server's live map held is discarded too.
        live::clear(&file, &header).map_err(io_err(path, "clear the live map"))?;
        zero_map(&file, &header).map_err(io_err(path, "clear map"))?;
        file.write_all_at(
            &format::encode_map_crc(Some(zero_map_crc(header.map_len))),
            format::MAP_CRC_FIELD_OFFSET as u64,
        )
        .map_err(io_err(path, "record map checksum"))?;
        file.sync_data().map_err(io_err(path, "sync"))?;
        // The data area and the live map region with it.
        let end = len.max(header.file_len());
        match sys::punch_hole(fd, header.data_offset, end - header.data_offset) {
            Err(e) if !sys::unsupported(&e) => return Err(io_err(path, "free data")(e)),
            _ => {}
        }
        set_clean(true).map_err(io_err(path, "mark clean"))
    }
}

/// Sets every map entry to `Base` (zero).
fn zero_map(file: &File, header: &Header) -> io::Result<()> {
    match sys::punch_hole(file.as_fd(), header.map_offset, header.map_len) {
        Err(e) if sys::unsupported(&e) => {}
        r => return r,
    }
    let zeros = vec![0u8; MAP_CHUNK.min(header.map_len) as usize];
    let mut done = 0;
    while done < header.map_len {
        let n = MAP_CHUNK.min(header.map_len - done);
        file.write_all_at(&zeros[..n as usize], header.map_offset + done)?;
        done += n;
    }
    Ok(())
}
