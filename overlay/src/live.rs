//! The live map region: where a server keeps its block states so that they
//! outlive the server process (see the format's module docs for the bytes).
//!
//! A write's map entry is set in a shared mapping of the region before the
//! write completes, so once its used entry is published the page cache
//! holds both its data and its entry. A server that dies leaves them there;
//! the next server on the overlay, on the same boot of the host, takes the
//! live map as its block states and its first flush makes them durable.
//! After a host crash (another boot id) the live map is ignored: the kernel
//! may have written it back before the data it describes, so only the map
//! written at flushes counts.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use ociblk_io::sys;

use super::format::{
    self, BLOCK_SIZE as BS, Header, LIVE_FLAG_OFFSET, LIVE_HEADER_USED, LiveHeader,
    parse_live_header,
};
use super::map::{BlockMap, MAP_CHUNK};
use super::{OverlayError, io_err};

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The host's boot id, or `None` if it cannot be read (no live map then:
/// nothing could tell a dead server from a host crash).
pub(super) fn boot_id() -> Option<[u8; 16]> {
    #[cfg(test)]
    if let Some(id) = tests::boot_id_override() {
        return Some(id);
    }
    static BOOT_ID: OnceLock<Option<[u8; 16]>> = OnceLock::new();
    *BOOT_ID.get_or_init(|| {
        let id = std::fs::read_to_string(BOOT_ID_PATH)
            .ok()
            .and_then(|s| parse_boot_id(&s));
        if id.is_none() {
            tracing::warn!(
                path = BOOT_ID_PATH,
                "cannot read the host's boot id: writes completed since the last flush \
                 will not survive a server crash"
            );
        }
        id
    })
}

/// Parses the kernel's `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` form.
fn parse_boot_id(s: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = s.trim().bytes().filter(|&c| c != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(digits, &mut id).ok()?;
    Some(id)
}

/// The live map of an overlay that was not closed cleanly, if a server of
/// this boot of the host left one: then it holds every state that server
/// published, and the result is a shared map over it. `None` when there is
/// none to believe (a clean close, a host crash since, an older ociblk, a
/// damaged live header), with a log line saying why where it matters.
pub(super) fn adopt(
    file: &File,
    path: &Path,
    header: &Header,
    len: u64,
) -> Result<Option<BlockMap>, OverlayError> {
    let Some(states) = read_live_states(file, path, header, len)? else {
        return Ok(None);
    };
    // The states were checked when read; the mapping sees the same pages.
    drop(states);
    let map = BlockMap::shared(file, header.live_map_offset(), header.map_len)
        .map_err(io_err(path, "map the live map"))?;
    Ok(Some(map))
}

/// The live map's states, read, if the live map is to be believed (see
/// [`adopt`]). For a read-only open, which must not map the file shared.
pub(super) fn read_live_states(
    file: &File,
    path: &Path,
    header: &Header,
    len: u64,
) -> Result<Option<Vec<u8>>, OverlayError> {
    if header.clean || !header.live {
        return Ok(None);
    }
    let Some(now) = boot_id() else {
        return Ok(None);
    };
    if len < header.live_end() {
        tracing::warn!(path = %path.display(), "live map region is truncated: using the map of the last flush");
        return Ok(None);
    }
    let mut head = [0u8; LIVE_HEADER_USED];
    file.read_exact_at(&mut head, header.live_offset())
        .map_err(io_err(path, "read live header"))?;
    let live = match parse_live_header(&head) {
        Ok(live) => live,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "live header is not valid: using the map of the last flush");
            return Ok(None);
        }
    };
    if live.map_len != header.map_len {
        tracing::warn!(path = %path.display(), "live map has another length: using the map of the last flush");
        return Ok(None);
    }
    if live.boot_id != now {
        tracing::info!(
            path = %path.display(),
            "the host restarted since the overlay was last used: using the map of the last flush"
        );
        return Ok(None);
    }
    let mut states = vec![0u8; header.map_len as usize];
    for (i, chunk) in states.chunks_mut(MAP_CHUNK as usize).enumerate() {
        let first = i as u64 * MAP_CHUNK;
        file.read_exact_at(chunk, header.live_map_offset() + first)
            .map_err(io_err(path, "read live map"))?;
        if let Err(e) = format::check_states(chunk, first) {
            tracing::warn!(path = %path.display(), error = %e, "live map is damaged: using the map of the last flush");
            return Ok(None);
        }
    }
    Ok(Some(states))
}

/// Lays out a fresh live map region holding `disk` (the map on disk; `None`
/// for all `Base`) and returns a shared map over it; sets the live map flag.
/// Without a boot id the map is private to the process instead, and the
/// flag stays clear.
///
/// Order, for a process that dies half-way: the old live header is made
/// invalid first, then the map is written, then the live header, then the
/// flag. Until both the last two are there, the next open uses the map on
/// disk, which is then exactly this open's starting state.
pub(super) fn create(
    file: &File,
    path: &Path,
    header: &Header,
    disk: Option<&[u8]>,
) -> Result<BlockMap, OverlayError> {
    let private = || match disk {
        Some(states) => BlockMap::from_bytes(states),
        None => BlockMap::all_base(header.map_len),
    };
    let Some(boot_id) = boot_id() else {
        return private().map_err(io_err(path, "allocate the map"));
    };
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    if len < header.live_end() {
        file.set_len(header.live_end())
            .map_err(io_err(path, "size the live map"))?;
    }
    invalidate(file, header).map_err(io_err(path, "clear the live header"))?;
    let map_bytes = header.live_end() - header.live_map_offset();
    zero_allocated(file, header.live_map_offset(), map_bytes)
        .map_err(io_err(path, "allocate the live map"))?;
    if let Some(states) = disk {
        write_nonzero_pages(file, header.live_map_offset(), states)
            .map_err(io_err(path, "write the live map"))?;
    }
    let live = LiveHeader {
        boot_id,
        map_len: header.map_len,
    };
    file.write_all_at(&live.encode(), header.live_offset())
        .map_err(io_err(path, "write the live header"))?;
    let map = match BlockMap::shared(file, header.live_map_offset(), header.map_len) {
        Ok(map) => map,
        Err(e) => {
            // E.g. a page size the 4 KiB offsets do not fit: serve, but say
            // what it costs.
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot map the live map: writes completed since the last flush \
                 will not survive a server crash"
            );
            invalidate(file, header).map_err(io_err(path, "clear the live header"))?;
            return private().map_err(io_err(path, "allocate the map"));
        }
    };
    file.write_all_at(&[1], LIVE_FLAG_OFFSET as u64)
        .map_err(io_err(path, "set the live map flag"))?;
    Ok(map)
}

/// Clears the live map flag and the live header: the map on disk is
/// complete again (a clean close, a reset). Nothing is synced here.
pub(super) fn clear(file: &File, header: &Header) -> io::Result<()> {
    file.write_all_at(&[0], LIVE_FLAG_OFFSET as u64)?;
    let len = file.metadata()?.len();
    if len >= header.live_offset() + LIVE_HEADER_USED as u64 {
        invalidate(file, header)?;
    }
    Ok(())
}

fn invalidate(file: &File, header: &Header) -> io::Result<()> {
    file.write_all_at(&[0u8; LIVE_HEADER_USED], header.live_offset())
}

/// Zeroes a region and makes sure its blocks are allocated: a store through
/// the shared mapping must never need a block the file system lacks (that
/// would be SIGBUS, not an error).
fn zero_allocated(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match sys::zero_range(file.as_fd(), offset, len) {
        Err(e) if sys::unsupported(&e) => {
            let zeros = vec![0u8; MAP_CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = MAP_CHUNK.min(len - done);
                file.write_all_at(&zeros[..n as usize], offset + done)?;
                done += n;
            }
            Ok(())
        }
        r => r,
    }
}

/// Writes the 4 KiB pages of `states` that are not all `Base` (zero).
fn write_nonzero_pages(file: &File, offset: u64, states: &[u8]) -> io::Result<()> {
    for (i, page) in states.chunks(BS as usize).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, offset + i as u64 * BS)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;

    thread_local! {
        static BOOT_ID: Cell<Option<[u8; 16]>> = const { Cell::new(None) };
    }

    pub(super) fn boot_id_override() -> Option<[u8; 16]> {
        BOOT_ID.with(Cell::get)
    }

    /// Makes this thread's opens see the host's real boot again.
    pub(crate) fn real_boot() {
        BOOT_ID.with(|b| b.set(None));
    }

    /// Makes this thread's opens see the boot `id`: the boot a file's
    /// live header records, for an open on the boot that wrote it.
    pub(crate) fn simulate_boot(id: [u8; 16]) {
        BOOT_ID.with(|b| b.set(Some(id)));
    }

    /// Makes this thread's opens see a new boot of the host: what a host
    /// crash and restart looks like to the next server.
    pub(crate) fn simulate_reboot() {
        BOOT_ID.with(|b| {
            let next = b.get().map_or(1, |id| id[0].wrapping_add(1));
            b.set(Some([next; 16]));
        });
    }

    #[test]
    fn boot_ids_parse_as_the_kernel_prints_them() {
        assert_eq!(
            super::parse_boot_id("0f4e0b1e-3c1d-4a5b-9c7d-1e2f3a4b5c6d\n"),
            Some([
                0x0f, 0x4e, 0x0b, 0x1e, 0x3c, 0x1d, 0x4a, 0x5b, 0x9c, 0x7d, 0x1e, 0x2f, 0x3a, 0x4b,
                0x5c, 0x6d
            ])
        );
        assert_eq!(super::parse_boot_id("0f4e0b1e-3c1d"), None);
        assert_eq!(
            super::parse_boot_id("zz4e0b1e-3c1d-4a5b-9c7d-1e2f3a4b5c6d"),
            None
        );
        assert!(super::boot_id().is_some(), "this host's boot id");
    }
}
