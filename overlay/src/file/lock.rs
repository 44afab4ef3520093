//! Opening an overlay file and locking it: only regular files, shared for
//! reading and exclusive for writing, and only the file still linked at
//! the path.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ociblk_io::sys;

use crate::{OVERLAY_MODE, OverlayError, io_err};

/// How [`open_file`] opens an overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read-write, created (mode 0600) when missing.
    Create,
    /// Read-write, must exist.
    Existing,
    /// Read-only, must exist.
    ReadOnly,
}

/// Opens an overlay file, which must be a regular file: anything else is
/// [`OverlayError::NotRegular`]. The type is checked before opening (so
/// that a directory or a device is never opened for writing) and again on
/// the open descriptor (the path may have changed meanwhile). `O_NONBLOCK`
/// keeps the open of a FIFO from waiting for a writer; it means nothing
/// for a regular file. Returns whether the file was created.
pub(crate) fn open_file(path: &Path, access: Access) -> Result<(File, bool), OverlayError> {
    match fs::metadata(path) {
        Ok(meta) => check_regular(path, &meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && access == Access::Create => {}
        Err(e) => return Err(io_err(path, "open")(e)),
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(access != Access::ReadOnly)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    let mut created = false;
    let opened = if access == Access::Create {
        match options
            .clone()
            .create_new(true)
            .mode(OVERLAY_MODE)
            .open(path)
        {
            Ok(file) => {
                created = true;
                // The umask may have taken bits away, never added: set
                // exactly 0600, whatever it is.
                file.set_permissions(fs::Permissions::from_mode(OVERLAY_MODE))
                    .map_err(io_err(path, "set mode"))?;
                Ok(file)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options.open(path),
            Err(e) => Err(e),
        }
    } else {
        options.open(path)
    };
    let file = opened.map_err(|e| match e.raw_os_error() {
        Some(libc::EISDIR) => OverlayError::NotRegular {
            path: path.to_path_buf(),
            kind: "a directory",
        },
        _ => io_err(path, "open")(e),
    })?;
    check_regular(path, &file.metadata().map_err(io_err(path, "stat"))?)?;
    Ok((file, created))
}

/// [`open_file`], then the lock without waiting: shared for reading,
/// exclusive for writing. Returns the file, whether it was created and its
/// length.
///
/// The file locked must still be the one at `path`: a freeze (or anyone)
/// may replace the file between the open and the lock, and a lock on the
/// replaced, unlinked file would let a server write where nobody will ever
/// read. Then the open starts again on the new file, a few times at most.
pub(crate) fn open_locked(path: &Path, access: Access) -> Result<(File, bool, u64), OverlayError> {
    const ATTEMPTS: usize = 4;
    for _ in 0..ATTEMPTS {
        let (file, created) = open_file(path, access)?;
        #[cfg(test)]
        tests::between_open_and_lock(path);
        let locked = match access {
            Access::ReadOnly => sys::try_lock_shared(&file),
            Access::Create | Access::Existing => sys::try_lock_exclusive(&file),
        };
        if !locked.map_err(io_err(path, "lock"))? {
            return Err(OverlayError::Locked {
                path: path.to_path_buf(),
            });
        }
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        let linked = fs::metadata(path)
            .is_ok_and(|at| (at.dev(), at.ino()) == (meta.dev(), meta.ino()) && meta.nlink() > 0);
        if linked {
            return Ok((file, created, meta.len()));
        }
        tracing::info!(path = %path.display(), "overlay was replaced while it was being opened; opening the new file");
    }
    Err(OverlayError::Replaced {
        path: path.to_path_buf(),
        attempts: ATTEMPTS,
    })
}

fn check_regular(path: &Path, meta: &fs::Metadata) -> Result<(), OverlayError> {
    if meta.is_file() {
        return Ok(());
    }
    Err(OverlayError::NotRegular {
        path: path.to_path_buf(),
        kind: ociblk_io::sys::file_kind(meta.file_type()),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;
    use std::path::Path;

    type Hook = Box<dyn FnOnce(&Path)>;

    thread_local! {
        static BETWEEN_OPEN_AND_LOCK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `hook` once, in this thread's next open, after the file is
    /// opened and before it is locked: where a server can be held up.
    pub(crate) fn hold_between_open_and_lock(hook: impl FnOnce(&Path) + 'static) {
        BETWEEN_OPEN_AND_LOCK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    }

    pub(super) fn between_open_and_lock(path: &Path) {
        if let Some(hook) = BETWEEN_OPEN_AND_LOCK.with(|h| h.borrow_mut().take()) {
            hook(path);
        }
    }
}
