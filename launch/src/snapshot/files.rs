//! The file work of saves and forks: directories made and removed again
//! on failure, files copied with their sha256, modes and syncs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ociblk_io::sys;
use ociblk_overlay::{ChainEntry, Overlay};
use sha2::{Digest as _, Sha256};

use super::check::check_file_name;
use super::{DIR_MODE, SnapshotError, io_error};

/// Opens `path` for reading if it is a regular file, without waiting on
/// a FIFO.
pub(super) fn open_regular(path: &Path) -> Result<fs::File, SnapshotError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error(path, "reading"))?;
    let meta = file.metadata().map_err(io_error(path, "reading"))?;
    if !meta.file_type().is_file() {
        return Err(io_error(path, "reading")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(file)
}

/// The chain the overlay at `path` records in its header, bottom first.
pub(super) fn recorded_chain(path: &Path) -> Result<Vec<ChainEntry>, SnapshotError> {
    Overlay::recorded_chain(path).map_err(|source| SnapshotError::RecordedChain {
        path: path.to_owned(),
        source,
    })
}

/// Directories made by a save or a fork, in the order they were made;
/// dropped, it removes them again, last first. A directory made as the
/// target itself ([`MadeDirs::create`]) goes with everything in it; a
/// parent made on the way ([`MadeDirs::create_all`]) only if it is empty
/// by then, so that nothing another process put there is lost.
#[derive(Debug, Default)]
pub(super) struct MadeDirs {
    dirs: Vec<(PathBuf, bool)>,
}

impl MadeDirs {
    /// Creates the new directory `path`, to be removed with its contents.
    pub(super) fn create(&mut self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)?;
        self.dirs.push((path.to_owned(), true));
        Ok(())
    }

    /// Creates `path` and its missing parents, each to be removed only
    /// if empty; a directory that exists already is left alone.
    pub(super) fn create_all(&mut self, path: &Path) -> io::Result<()> {
        let missing: Vec<&Path> = path
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .take_while(|p| fs::symlink_metadata(p).is_err())
            .collect();
        for dir in missing.into_iter().rev() {
            match fs::create_dir(dir) {
                Ok(()) => self.dirs.push((dir.to_owned(), false)),
                // Made by someone else meanwhile: theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) fn forget(&mut self) {
        self.dirs.clear();
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        if self.dirs.is_empty() {
            return;
        }
        let mut removed = Vec::new();
        for (dir, with_contents) in self.dirs.drain(..).rev() {
            let result = if with_contents {
                fs::remove_dir_all(&dir)
            } else {
                fs::remove_dir(&dir)
            };
            match result {
                Ok(()) => removed.push(dir.display().to_string()),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cannot remove the unfinished directory: {e}")
                }
            }
        }
        if !removed.is_empty() {
            tracing::info!("removed the unfinished directories {}", removed.join(", "));
        }
    }
}

pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), SnapshotError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_error(path, "setting the mode of"))
}

/// Copies one regular file (contents only) to the new path `to` with
/// `mode`, synced; returns the sha256 of what it copied.
pub(super) fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<[u8; 32], SnapshotError> {
    let mut source = open_regular(from).map_err(|e| match e {
        SnapshotError::Io { path, source, .. } => SnapshotError::Io {
            path,
            action: "copying",
            source,
        },
        e => e,
    })?;
    // Created with its final mode, so a guest's state is never readable by
    // others, not even for a moment; synced through the same handle.
    let mut dest = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)
        .map_err(io_error(to, "creating"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(from, "copying")(e)),
        };
        hasher.update(&buf[..n]);
        dest.write_all(&buf[..n]).map_err(io_error(to, "writing"))?;
    }
    dest.sync_all().map_err(io_error(to, "syncing"))?;
    Ok(hasher.finalize().into())
}

/// The sha256 of a regular file's content.
pub(super) fn file_digest(path: &Path) -> Result<[u8; 32], SnapshotError> {
    let mut file = open_regular(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, "reading")(e)),
        }
    }
    Ok(hasher.finalize().into())
}

pub(super) fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    sys::sync_dir(path).map_err(io_error(path, "syncing"))
}

/// Copies the regular files of the directory `from` (swtpm's state: flat)
/// into the new directory `to`, leaving out swtpm's lock file; returns
/// each copied file's sha256 by name.
pub(super) fn copy_dir(
    from: &Path,
    to: &Path,
    mode: u32,
) -> Result<BTreeMap<String, [u8; 32]>, SnapshotError> {
    fs::create_dir(to).map_err(io_error(to, "creating"))?;
    let entries = fs::read_dir(from).map_err(io_error(from, "reading"))?;
    let mut copied = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(io_error(from, "reading"))?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_file || check_file_name(&name).is_err() {
            continue;
        }
        let digest = copy_file(&entry.path(), &to.join(&name), mode)?;
        copied.insert(name, digest);
    }
    sync_dir(to)?;
    set_mode(to, DIR_MODE)?;
    Ok(copied)
}
