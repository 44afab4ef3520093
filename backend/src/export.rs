//! Materialising a computed disk as a sparse raw file.
//!
//! The disk goes into a new file next to the output ([`OutputFile`]),
//! renamed into place only once it is whole: an export never truncates,
//! changes or removes a file that was there before it ran, and a failed
//! one leaves nothing.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ociblk_io::iobuf::IoBufs;
use ociblk_io::sys;
use ociblk_layout::{Content, Layout};
use ociblk_overlay::{BlockState, Overlay};
use ociblk_registry::limiter::Priority;

use crate::payload::Payloads;

/// Bytes written by [`export_disk`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ExportStats {
    /// Payload bytes copied from source files.
    pub copied: u64,
    /// Generated metadata bytes written.
    pub generated: u64,
}

/// Writes the disk `layout` describes to `out`, a new empty file: it gets
/// the disk's size, zero extents stay holes, payload ranges are copied
/// from `payloads` with `copy_file_range` (reflinked where the file system
/// can), one chunk at a time, each once the store let it through (hashed
/// before its bytes are copied, unless the store does not verify); a
/// chunk that fails stops the export with an error naming it. `progress`
/// gets copied byte counts.
pub fn export_disk(
    layout: &Layout,
    payloads: &Payloads,
    out: &File,
    mut progress: impl FnMut(u64),
) -> io::Result<ExportStats> {
    let map = &layout.extents;
    out.set_len(map.size())?;
    let mut stats = ExportStats::default();
    let mut buf = Vec::new();
    for e in map.extents() {
        match e.content {
            Content::Zero => {}
            Content::File { source, offset } => {
                for piece in chunk_pieces(payloads, source, offset..offset + e.len) {
                    let servable = payloads.ensure(source, piece.clone(), Priority::Foreground)?;
                    let len = servable.copy_to(out, e.start + (piece.start - offset))?;
                    progress(len);
                }
                stats.copied += e.len;
            }
            Content::Metadata { .. } | Content::FatChain { .. } => {
                buf.resize(e.len as usize, 0);
                map.read_with(e.start, &mut buf, |_, _, _| {
                    Err(io::Error::other("a metadata extent reads no payload"))
                })?;
                out.write_all_at(&buf, e.start)?;
                stats.generated += e.len;
            }
        }
    }
    out.sync_all()?;
    Ok(stats)
}

/// `range` of blob `source` cut at its chunk boundaries (whole, for a file
/// without chunk hashes): each piece is checked, then copied while its
/// bytes are still in the page cache.
fn chunk_pieces(
    payloads: &Payloads,
    source: usize,
    range: std::ops::Range<u64>,
) -> Vec<std::ops::Range<u64>> {
    let Some(hashes) = payloads.hashes(source) else {
        return vec![range];
    };
    hashes
        .chunks_touching(range.clone())
        .map(|c| {
            let chunk = hashes.range(c);
            chunk.start.max(range.start)..chunk.end.min(range.end)
        })
        .collect()
}

/// Applies `overlay` on top of an exported base disk in `out`: written
/// blocks are copied in, zeroed blocks become holes. Returns the bytes copied.
pub fn apply_overlay(overlay: &Overlay, out: &File) -> io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut copied = 0;
    for run in overlay.runs(0, overlay.disk_size()) {
        match run.state {
            BlockState::Base => {}
            BlockState::Data => {
                let mut done = 0;
                while done < run.len {
                    let n = (run.len - done).min(CHUNK) as usize;
                    overlay.read_data(
                        run.offset + done,
                        &IoBufs::from_slice(&mut buf[..n]),
                        0,
                        n,
                    )?;
                    out.write_all_at(&buf[..n], run.offset + done)?;
                    done += n as u64;
                }
                copied += run.len;
            }
            BlockState::Zero => punch_hole(out, run.offset, run.len)?,
        }
    }
    out.sync_all()?;
    Ok(copied)
}

/// Deallocates a range so it reads as zeros; writes zeros where the file
/// system cannot punch holes.
fn punch_hole(out: &File, offset: u64, len: u64) -> io::Result<()> {
    match sys::punch_hole(out.as_fd(), offset, len) {
        Err(e) if sys::unsupported(&e) => {}
        other => return other,
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        out.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Mode of an exported disk: it holds the node's data, like the overlay.
pub const OUTPUT_MODE: u32 = 0o600;

/// A file an export reads, which its output must not be.
#[derive(Debug, Clone)]
pub struct Input {
    /// What it is, for the message: `the overlay`, `payload "system"`, ...
    pub what: String,
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Input {
    /// The input `what` at `path`, whose open file has metadata `meta`.
    pub fn opened(what: impl Into<String>, path: &Path, meta: &fs::Metadata) -> Input {
        Input::with_metadata(what, path, meta)
    }

    /// The input `what` at `path` (symbolic links followed, as when it
    /// was opened).
    pub fn at(what: impl Into<String>, path: &Path) -> io::Result<Input> {
        Ok(Input::with_metadata(what, path, &fs::metadata(path)?))
    }

    fn with_metadata(what: impl Into<String>, path: &Path, meta: &fs::Metadata) -> Input {
        Input {
            what: what.into(),
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Why an export's output cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "{} exists and is {kind}: the output must be a new path or a regular file",
        path.display()
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{} is {what} ({}), which this export reads: write the disk to another file",
        path.display(),
        input.display()
    )]
    IsAnInput {
        path: PathBuf,
        what: String,
        input: PathBuf,
    },
    #[error("{} was created or replaced while the export ran: it is left as it is", path.display())]
    Changed { path: PathBuf },
    #[error("{}: {action}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

fn output_io(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> OutputError {
    let path = path.to_owned();
    move |source| OutputError::Io {
        path,
        action,
        source,
    }
}

/// The output of an export: a new file (mode [`OUTPUT_MODE`]) under a
/// temporary name in the output's directory, linked or renamed to the
/// output by [`OutputFile::commit`]. Dropped before that, it removes the
/// temporary file and nothing else.
#[derive(Debug)]
pub struct OutputFile {
    path: PathBuf,
    temp: PathBuf,
    file: File,
    /// Device and inode of the regular file at `path` when the export
    /// started (it is replaced), or `None` for a new path.
    existing: Option<(u64, u64)>,
    committed: bool,
}

impl OutputFile {
    /// Checks `path` and creates the temporary file beside it. `path` must
    /// be a new path or a regular file (not a symbolic link, device, FIFO,
    /// socket or directory), and no file of `inputs`.
    pub fn create(path: &Path, inputs: &[Input]) -> Result<OutputFile, OutputError> {
        let existing = match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_file() => Some((meta.dev(), meta.ino())),
            Ok(meta) => {
                return Err(OutputError::NotRegular {
                    path: path.to_owned(),
                    kind: ociblk_io::sys::file_kind(meta.file_type()),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(output_io(path, "checking")(e)),
        };
        if let Some((dev, ino)) = existing
            && let Some(input) = inputs.iter().find(|i| (i.dev, i.ino) == (dev, ino))
        {
            return Err(OutputError::IsAnInput {
                path: path.to_owned(),
                what: input.what.clone(),
                input: input.path.clone(),
            });
        }
        let name = path
            .file_name()
            .ok_or_else(|| OutputError::NotRegular {
                path: path.to_owned(),
                kind: "not a file name",
            })?
            .to_string_lossy()
            .into_owned();
        let dir = sys::parent_dir(path);
        // A name of this process's own; one left by a killed export of the
        // same PID is never reused, the next suffix is taken.
        let mut attempt = 0u32;
        let (temp, file) = loop {
            let temp = dir.join(format!(".{name}.export-{}-{attempt}", std::process::id()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(OUTPUT_MODE)
                .custom_flags(libc::O_CLOEXEC)
                .open(&temp)
            {
                Ok(file) => break (temp, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(e) => return Err(output_io(path, "creating a new file beside it")(e)),
            }
        };
        let output = OutputFile {
            path: path.to_owned(),
            temp,
            file,
            existing,
            committed: false,
        };
        // The umask may have taken bits away; the file is ours alone.
        output
            .file
            .set_permissions(fs::Permissions::from_mode(OUTPUT_MODE))
            .map_err(output_io(&output.temp, "setting its mode"))?;
        Ok(output)
    }

    /// The new file to write the disk to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The output's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the written file into place: linked to a new path (never over
    /// a file that appeared meanwhile), or renamed over the regular file
    /// that was there (if it still is the same), then the directory is
    /// synced. The caller has synced the file.
    pub fn commit(mut self) -> Result<(), OutputError> {
        let path = self.path.clone();
        match self.existing {
            None => {
                fs::hard_link(&self.temp, &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        OutputError::Changed { path: path.clone() }
                    } else {
                        output_io(&path, "linking the new file into place")(e)
                    }
                })?;
                let _ = fs::remove_file(&self.temp);
            }
            Some(before) => {
                let now = fs::symlink_metadata(&path)
                    .ok()
                    .filter(|m| m.file_type().is_file())
                    .map(|m| (m.dev(), m.ino()));
                if now != Some(before) {
                    return Err(OutputError::Changed { path });
                }
                fs::rename(&self.temp, &path)
                    .map_err(output_io(&path, "renaming the new file into place"))?;
            }
        }
        self.committed = true;
        sys::sync_dir(sys::parent_dir(&path)).map_err(output_io(&path, "syncing its directory"))
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}
