//! The per-node copy-on-write overlay: one file holding every block the
//! guest wrote, zeroed or discarded, over a read-only base disk.
//!
//! The file has a 4 KiB header, a block-state map with one byte per 4 KiB
//! block ([`BlockState`]), and a sparse data area in which block `i` lives
//! at `data_offset + i * 4096` (see [`format`](mod@format) for the offsets). Reads split
//! a range into runs of equal state with [`Overlay::runs`]; the caller reads
//! `Base` runs from the base disk, `Data` runs with [`Overlay::read_data`]
//! and zero-fills `Zero` runs.
//!
//! # Concurrency
//! All methods take `&self`; one worker thread per virtqueue shares the
//! overlay. Reads take no lock: they load map entries with `Acquire`, and
//! writers publish an entry with `Release` only after the block's data is in
//! the file, so a reader that sees `Data` reads the new bytes. Writers lock
//! one of 64 stripes per block: whole-block writes and zeroing take their
//! stripes shared (they never read the block, so they need not exclude each
//! other: a write racing a zeroing of the same block ends as one of the two
//! orders, because a `Data` entry over a punched block reads zeros),
//! read-modify-write of a partial block takes its stripe exclusive,
//! so that no other writer changes the block between the read and the write
//! back. Shared stripes are taken in ascending order and an exclusive holder
//! takes nothing else, so there is no deadlock.
//!
//! # Layers
//! An overlay may sit on a chain of frozen layers (see [`layer`]): a
//! `Base` block of the overlay then reads from the topmost layer that holds
//! the block, or from the base disk if none does. The chain is immutable,
//! so one merged index, built at open, answers that in one lookup. Reads
//! of layer data come through [`Overlay::read_data`] like the overlay's
//! own: the caller still sees only `Base`, `Data` and `Zero` runs. Writes
//! only ever go to the overlay; a partial write over a block held by a
//! layer reads the rest of the block from that layer.
//!
//! # Modules
//! [`format`](mod@format) parses and encodes the on-disk header and map; `map` holds
//! the in-memory block states and their dirty pages; `file` opens, locks,
//! creates, checks, reports on and resets the file; `write` splits a write
//! or zeroing into partial and whole blocks and applies it; `chain` opens
//! the layers under an overlay and merges their maps; [`layer`] freezes an
//! overlay into a layer, creates overlays over layers and verifies layers.
//! Flushing and closing live here, next to the state they order.

mod chain;
mod file;
pub mod format;
pub mod layer;
mod live;
mod map;
#[cfg(test)]
mod tests;
mod write;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use ociblk_io::iobuf::IoBufs;
use ociblk_io::sys;

pub use chain::{Chain, Layer};
pub use format::{
    BLOCK_SIZE, BlockState, ChainEntry, FormatError, Header, LayerFields, parse_header, parse_map,
};

use chain::Lower;
use map::BlockMap;

/// Reads base-disk bytes: fills the buffer with the base at the offset.
pub type BaseReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> io::Result<()>;

const STRIPES: usize = 64;
const BS: u64 = BLOCK_SIZE;
/// Mode of a new overlay: it holds the guest's data, only our user reads it.
pub const OVERLAY_MODE: u32 = 0o600;

/// Whether flushes reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// `fdatasync` on flush: acknowledged flushes survive power loss.
    Safe,
    /// No syncs (like QEMU's cache=unsafe): flushed writes survive the
    /// process being killed, not the host losing power.
    Unsafe,
}

/// What the overlay must match and how it flushes.
#[derive(Debug, Clone)]
pub struct OverlayConfig {
    /// Size of the disk in bytes, a multiple of 512.
    pub disk_size: u64,
    /// Identifies the base disk; an overlay is only valid over the disk it
    /// was made for.
    pub fingerprint: [u8; 32],
    pub flush: FlushMode,
}

/// A maximal byte range of one state, from [`Overlay::runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub state: BlockState,
}

/// What [`Overlay::info`] reports. The counts are those of the map on
/// disk: for an overlay in use, as of its last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayInfo {
    pub disk_size: u64,
    pub fingerprint: [u8; 32],
    pub block_size: u64,
    pub blocks: u64,
    /// Blocks in state `Data`.
    pub written: u64,
    /// Blocks in state `Zero`.
    pub zeroed: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`).
    pub allocated_bytes: u64,
    /// Apparent file size.
    pub file_size: u64,
    /// Whether the last user closed it cleanly (false while in use).
    pub clean: bool,
    /// What became of the map checksum.
    pub map_check: MapCheck,
    /// The layers the overlay sits on, bottom first, as its header records
    /// them (empty for a layer and for an overlay over the base disk).
    pub chain: Vec<ChainEntry>,
    /// Why the recorded chain cannot be opened now (a layer missing,
    /// modified, ...), if it cannot.
    pub chain_problem: Option<String>,
    /// For a frozen layer: its digests.
    pub layer: Option<LayerFields>,
}

/// Whether the map was checked against the checksum recorded at the last
/// clean close. A mismatch is an error, never a value of this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapCheck {
    /// Closed cleanly and the map matches its recorded checksum.
    Verified,
    /// Closed cleanly by an ociblk that recorded no checksum.
    NotRecorded,
    /// In use, or not closed cleanly: the map may legitimately differ from
    /// the checksum recorded at the last clean close.
    NotClosedCleanly,
}

impl MapCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            MapCheck::Verified => "verified",
            MapCheck::NotRecorded => "not recorded",
            MapCheck::NotClosedCleanly => "not checked (in use or not closed cleanly)",
        }
    }
}

impl OverlayInfo {
    pub fn fingerprint_hex(&self) -> String {
        format::hex(&self.fingerprint)
    }
}

/// Why an overlay cannot be opened, inspected or reset.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    // The cause is the source, not part of the message: `{:#}` prints
    // the chain, and would print it twice.
    #[error("overlay {}: {op}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} is not an ociblk overlay (bad magic): delete it or use another file", path.display())]
    BadMagic { path: PathBuf },
    #[error(
        "overlay {} has format version {found}, this ociblk reads versions {} and {}",
        path.display(),
        format::FORMAT_VERSION_PLAIN,
        format::FORMAT_VERSION
    )]
    Version { path: PathBuf, found: u32 },
    #[error("overlay {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: FormatError },
    #[error(
        "overlay {} was made for a different disk ({what}): serve it the image it was made for \
         (after a tag moved: that image's digest), or start over with another file or with \
         `ociblk overlay reset {}`, which discards every write in it",
        path.display(),
        path.display()
    )]
    Mismatch { path: PathBuf, what: String },
    #[error("overlay {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error(
        "overlay {} was replaced {attempts} times while it was being opened: is something \
         freezing or re-creating it in a loop?",
        path.display()
    )]
    Replaced { path: PathBuf, attempts: usize },
    #[error("overlay {}: {reason}", path.display())]
    Config { path: PathBuf, reason: FormatError },
    #[error("overlay {} is not a regular file (it is {kind})", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "overlay {} has no header yet: nothing was ever written to it, \
         `ociblk serve` initialises it as a new overlay",
        path.display()
    )]
    NotInitialised { path: PathBuf },
    #[error(
        "{} is a frozen layer, not an overlay: give it with --layer and use a new overlay file",
        path.display()
    )]
    IsALayer { path: PathBuf },
    #[error("{} is an overlay, not a frozen layer (make one with `ociblk overlay freeze`)", path.display())]
    NotALayer { path: PathBuf },
    #[error("layer {} is missing{}", path.display(), recorded_in(overlay))]
    LayerMissing {
        path: PathBuf,
        /// The overlay whose header names it, if it came from there.
        overlay: Option<PathBuf>,
    },
    #[error("layer {} was made for a different disk ({what})", path.display())]
    LayerMismatch { path: PathBuf, what: String },
    #[error("layer {} was modified: {what}", path.display())]
    LayerModified { path: PathBuf, what: String },
    #[error("layer {} does not fit the chain: {what}", path.display())]
    ChainBroken { path: PathBuf, what: String },
    #[error("overlay {} was made over another chain of layers: {what}", path.display())]
    ChainMismatch { path: PathBuf, what: String },
    #[error("layer {} already exists: a layer is never overwritten", path.display())]
    LayerExists { path: PathBuf },
    #[error("layer {} is not a regular file (it is {kind})", path.display())]
    LayerNotRegular { path: PathBuf, kind: &'static str },
}

fn recorded_in(overlay: &Option<PathBuf>) -> String {
    match overlay {
        Some(o) => format!(" (recorded in overlay {})", o.display()),
        None => String::new(),
    }
}

impl OverlayError {
    fn format(path: &Path, e: FormatError) -> Self {
        let path = path.to_path_buf();
        match e {
            FormatError::BadMagic => Self::BadMagic { path },
            FormatError::Version(found) => Self::Version { path, found },
            reason => Self::Corrupt { path, reason },
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> OverlayError {
    let path = path.to_path_buf();
    move |source| OverlayError::Io { path, op, source }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A copy-on-write overlay file, open and locked for one server.
pub struct Overlay {
    file: File,
    path: PathBuf,
    header: Header,
    mode: FlushMode,
    /// Block states and their dirty map pages.
    map: BlockMap,
    /// Writers' locks, [`STRIPES`] of them, block `b` under `b % STRIPES`.
    stripes: Box<[RwLock<()>]>,
    /// Serialises flushes: a flush must not return while another one still
    /// holds map pages it took from the dirty bits but has not written.
    flush_lock: Mutex<()>,
    /// An fdatasync failed: the kernel may have dropped dirty pages, so no
    /// later flush can promise that earlier writes are durable. Sticky, unlike
    /// write errors (ENOSPC on a write only fails that request).
    sync_failed: AtomicBool,
    /// A failed write may have left bytes in the data area of a block that
    /// is not `Data`; the next open reclaims them.
    leaked: AtomicBool,
    /// The file was created by this open: the first safe flush also makes
    /// its directory entry durable.
    new_entry: AtomicBool,
    /// Opened read-write. A read-only overlay is never written, synced or
    /// marked, not even at close.
    writable: bool,
    closed: bool,
    /// The layers under the overlay; empty over the base disk.
    chain: Chain,
}

impl fmt::Debug for Overlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overlay")
            .field("path", &self.path)
            .field("disk_size", &self.header.disk_size)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Overlay {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the overlay was opened read-write.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("overlay {} is open read-only", self.path.display()),
            ))
        }
    }

    pub fn disk_size(&self) -> u64 {
        self.header.disk_size
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.header.fingerprint
    }

    pub fn flush_mode(&self) -> FlushMode {
        self.mode
    }

    /// The layers under the overlay, bottom first.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Where block `block` currently reads from.
    fn source(&self, block: u64) -> Source {
        match self.map.get(block) {
            BlockState::Data => Source::Top,
            BlockState::Zero => Source::Zero,
            BlockState::Base => match self.chain.lower(block) {
                Lower::Base => Source::Base,
                Lower::Zero => Source::Zero,
                Lower::Layer(k) => Source::Layer(k),
            },
        }
    }

    /// Splits a byte range into maximal runs of equal state. The range is
    /// clipped to the disk.
    pub fn runs(&self, offset: u64, len: u64) -> Runs<'_> {
        let end = offset.saturating_add(len).min(self.header.disk_size);
        Runs {
            overlay: self,
            pos: offset.min(end),
            end,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.disk_size => Ok(end),
            _ => Err(invalid(format!(
                "range {offset}+{len} is beyond the {}-byte disk",
                self.header.disk_size
            ))),
        }
    }

    fn check_bufs(bufs: &IoBufs<'_>, at: usize, len: usize) -> io::Result<()> {
        match at.checked_add(len) {
            Some(end) if end <= bufs.len() => Ok(()),
            _ => Err(invalid(format!(
                "buffer range {at}+{len} is beyond its {} bytes",
                bufs.len()
            ))),
        }
    }

    /// Reads `len` bytes of written data at disk offset `offset` into
    /// `dst[at..]`: from the overlay's data area, or from the layer that
    /// holds the block. Meaningful for `Data` runs only. Each block is
    /// looked up again, so a block the overlay wrote or zeroed since the
    /// run was found reads as its new content.
    pub fn read_data(
        &self,
        offset: u64,
        dst: &IoBufs<'_>,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        let end = self.check_range(offset, len as u64)?;
        Self::check_bufs(dst, at, len)?;
        if self.chain.is_empty() {
            return dst.read_from_file(&self.file, self.header.data_offset + offset, at, len);
        }
        let mut pos = offset;
        while pos < end {
            let block = pos / BS;
            let source = self.source(block);
            let mut run_end = ((block + 1) * BS).min(end);
            while run_end < end && self.source(run_end / BS) == source {
                run_end = ((run_end / BS + 1) * BS).min(end);
            }
            let (o, n) = (at + (pos - offset) as usize, (run_end - pos) as usize);
            match source {
                // `Base` cannot be asked for by a caller that read the
                // runs first; read the data area (a hole) as before.
                Source::Top | Source::Base => {
                    dst.read_from_file(&self.file, self.header.data_offset + pos, o, n)?
                }
                Source::Zero => dst.fill_zero(o, n),
                Source::Layer(k) => self.chain.read_layer(k, pos, dst, o, n)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Makes every completed write durable (with [`FlushMode::Safe`]).
    ///
    /// Order: take a snapshot of the dirty map pages, `fdatasync` (every
    /// `Data` entry in the snapshot was published after its data was
    /// written, so that data is now durable), write the snapshot over the
    /// map in place, `fdatasync` again. Updating entries in place is
    /// crash-safe: an entry is one byte, so after a crash each reads either
    /// its old or its new value, and both are valid: a new `Data` entry's
    /// data is already durable, a `Zero` entry needs no data, and an old
    /// `Data` entry whose block was since zeroed reads either its old bytes
    /// or the hole punched over them. Entries changed after the snapshot
    /// stay dirty for the next flush.
    ///
    /// With [`FlushMode::Unsafe`] the map is written without the syncs: it
    /// reaches the page cache and survives the process, not the host.
    ///
    /// A read-only overlay has nothing to flush.
    pub fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _flush = self
            .flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.sync_failed.load(Ordering::Relaxed) {
            return Err(io::Error::other(format!(
                "an earlier fdatasync of overlay {} failed; written data may be lost",
                self.path.display()
            )));
        }
        let safe = self.mode == FlushMode::Safe;
        let pages = self.map.take_dirty();
        #[cfg(test)]
        tests::flush_step(self, "map pages taken");
        if safe {
            self.sync()?;
            if self.new_entry.load(Ordering::Relaxed) {
                self.sync_directory()?;
                self.new_entry.store(false, Ordering::Relaxed);
            }
            #[cfg(test)]
            tests::flush_step(self, "data synced");
        }
        for (i, (page, bytes)) in pages.iter().enumerate() {
            let at = self.header.map_offset + page * map::MAP_PAGE;
            if let Err(e) = self.file.write_all_at(bytes, at) {
                for (page, _) in &pages[i..] {
                    self.map.mark_dirty(*page);
                }
                return Err(e);
            }
            #[cfg(test)]
            tests::flush_step(self, "a map page written");
        }
        if safe && !pages.is_empty() {
            self.sync()?;
            #[cfg(test)]
            tests::flush_step(self, "map synced");
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data().inspect_err(|e| {
            tracing::error!(path = %self.path.display(), error = %e, "fdatasync failed");
            self.sync_failed.store(true, Ordering::Relaxed);
        })
    }

    /// Makes the file's directory entry durable, once, for a new overlay.
    fn sync_directory(&self) -> io::Result<()> {
        sys::sync_dir(sys::parent_dir(&self.path))
    }

    fn set_clean(&self, clean: bool) -> io::Result<()> {
        self.file
            .write_all_at(&[u8::from(clean)], format::CLEAN_OFFSET as u64)?;
        if self.mode == FlushMode::Safe {
            self.sync()?;
        }
        Ok(())
    }

    /// Flushes, records the map's checksum and marks the overlay cleanly
    /// closed. The map and then the checksum are durable before the flag,
    /// in both flush modes: a clean flag on disk always comes with the
    /// checksum of the map on disk. (With [`FlushMode::Unsafe`] a clean
    /// flag over a map the host lost would otherwise read as corruption
    /// after a host crash.) Only the clean flag itself is left unsynced in
    /// unsafe mode; losing it only costs a reclaim at the next open.
    fn shutdown(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush()?;
        if !self.leaked.load(Ordering::Relaxed) {
            self.sync()?;
            let crc = self.map.crc();
            self.file.write_all_at(
                &format::encode_map_crc(Some(crc)),
                format::MAP_CRC_FIELD_OFFSET as u64,
            )?;
            self.sync()?;
            // The map on disk is complete: the live map is no longer needed
            // to recover anything.
            live::clear(&self.file, &self.header)?;
            self.set_clean(true)?;
        }
        Ok(())
    }

    /// Flushes the map and closes the file, releasing the lock.
    pub fn close(mut self) -> Result<(), OverlayError> {
        self.closed = true;
        self.shutdown().map_err(io_err(&self.path, "close"))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.closed || !self.writable {
            return;
        }
        if let Err(e) = self.shutdown() {
            tracing::error!(path = %self.path.display(), error = %e, "closing overlay failed");
        }
    }
}

/// Where a block reads from: what a [`Run`] is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Base,
    Zero,
    /// The overlay's own data area.
    Top,
    /// The data area of layer `k` of the chain.
    Layer(u8),
}

impl Source {
    fn state(self) -> BlockState {
        match self {
            Source::Base => BlockState::Base,
            Source::Zero => BlockState::Zero,
            Source::Top | Source::Layer(_) => BlockState::Data,
        }
    }
}

/// Iterator over the [`Run`]s of a byte range; see [`Overlay::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    overlay: &'a Overlay,
    pos: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.pos >= self.end {
            return None;
        }
        let mut block = self.pos / BS;
        // A run has one source, so that `read_data` reads it from one file.
        let source = self.overlay.source(block);
        let mut run_end = (block + 1) * BS;
        while run_end < self.end && self.overlay.source(block + 1) == source {
            block += 1;
            run_end += BS;
        }
        let run_end = run_end.min(self.end);
        let run = Run {
            offset: self.pos,
            len: run_end - self.pos,
            state: source.state(),
        };
        self.pos = run_end;
        Some(run)
    }
}
