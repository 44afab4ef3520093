//! Opening files and directories of the cache so that nothing planted in
//! it can redirect a write or block a reader.
//!
//! - Files are opened with `O_NOFOLLOW` (a symlink is refused, never
//!   followed) and `O_NONBLOCK` (opening a FIFO does not wait for a
//!   writer), then checked to be regular files; only then is anything read,
//!   written or resized.
//! - Directories ociblk creates are 0700; an existing one must be a real
//!   directory (not a symlink, below the cache directory itself), owned by
//!   the user, and not writable by group or others, unless the user allows
//!   an insecure cache directory.

use std::fs::{DirBuilder, File, Metadata};
use std::io::{self, Read as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

use crate::error::{Error, Result};

/// How a cache file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write, created with mode 0600 when absent.
    Create,
}

/// What kind of file `meta` is, for an error message.
pub(crate) fn kind_of(meta: &Metadata) -> &'static str {
    ociblk_io::sys::file_kind(meta.file_type())
}

fn not_regular(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file (refused)"),
    )
}

/// Opens the cache file `path` as `access` says, never following a
/// symlink at its last component and never blocking on a FIFO; anything
/// but a regular file is refused. `io::ErrorKind::NotFound` passes through
/// for callers that treat an absent file as such.
pub(crate) fn open(path: &Path, access: Access) -> io::Result<File> {
    open_with(path, access, false)
}

/// [`open`] for a file the user named (`--prefetch FILE`): a symlink is
/// followed, a FIFO or device still refused without blocking.
pub(crate) fn open_following(path: &Path) -> io::Result<File> {
    open_with(path, Access::Read, true)
}

fn open_with(path: &Path, access: Access, follow: bool) -> io::Result<File> {
    let mut options = File::options();
    options.read(true);
    match access {
        Access::Read => {}
        Access::ReadWrite => {
            options.write(true);
        }
        Access::Create => {
            options.write(true).create(true).truncate(false).mode(0o600);
        }
    }
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match options.custom_flags(flags).open(path) {
        Ok(f) => f,
        // O_NOFOLLOW on a symlink: ELOOP. Say what it is.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) && !follow => {
            return Err(not_regular("a symbolic link"));
        }
        // Opening a FIFO for writing without a reader: ENXIO.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            let what = std::fs::symlink_metadata(path)
                .map(|m| kind_of(&m))
                .unwrap_or("not a regular file");
            return Err(not_regular(what));
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(kind_of(&meta)));
    }
    Ok(file)
}

/// Reads at most `limit` bytes of the regular file `path` (symlinks
/// refused); `Ok(None)` when it does not exist.
pub(crate) fn read_small(path: &Path, limit: u64) -> Result<Option<Vec<u8>>> {
    let file = match open(path, Access::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    read_to_limit(file, path, limit).map(Some)
}

/// Reads at most `limit` bytes of `file` (a regular file), failing past it.
pub(crate) fn read_to_limit(file: File, path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Cache {
            path: path.to_path_buf(),
            message: format!("more than {limit} bytes"),
        });
    }
    Ok(bytes)
}

/// Whether directories not private to the user are accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirPolicy {
    /// Accept a cache directory (or one inside it) owned by another user
    /// or writable by group or others (`--allow-insecure-cache-dir`).
    pub allow_insecure: bool,
}

/// Creates `path` (mode 0700) if absent, else checks that it is a private
/// directory: see [`check_dir`]. `follow` lets the cache directory itself
/// be a symlink the user made; directories inside it never are.
pub(crate) fn private_dir(path: &Path, follow: bool, policy: DirPolicy) -> Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && follow => {
            // Missing parents of the cache directory itself: created
            // private too, as `ssh` or `gpg` would.
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| Error::io(path, e))?;
        }
        Err(e) => return Err(Error::io(path, e)),
    }
    check_dir(path, follow, policy)
}

/// Refuses `path` unless it is a directory (not a symlink, unless
/// `follow`), owned by the effective user, and not writable by group or
/// others; `policy` may allow the last two.
pub(crate) fn check_dir(path: &Path, follow: bool, policy: DirPolicy) -> Result<()> {
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .map_err(|e| Error::io(path, e))?;
    let refuse = |message: String| Error::InsecureCacheDir {
        path: path.to_path_buf(),
        message,
    };
    if !meta.is_dir() {
        // Never allowed: a symlink here could send writes anywhere.
        return Err(Error::Cache {
            path: path.to_path_buf(),
            message: format!("is {}, not a directory (refused)", kind_of(&meta)),
        });
    }
    if policy.allow_insecure {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(refuse(format!(
            "owned by uid {}, not by this user (uid {euid})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "mode {mode:04o} lets group or others write it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn symlinks_fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for access in [Access::Read, Access::ReadWrite, Access::Create] {
            let err = open(&link, access).expect_err("symlink");
            assert!(err.to_string().contains("symbolic link"), "{err}");
            let err = open(&fifo, access).expect_err("fifo");
            assert!(err.to_string().contains("a FIFO"), "{err}");
            let err = open(dir.path(), access).expect_err("directory");
            assert!(err.to_string().contains("a directory"), "{err}");
        }
        assert_eq!(std::fs::read(&target).expect("read"), b"precious");
        let err = open_following(&fifo).expect_err("fifo");
        assert!(err.to_string().contains("a FIFO"), "{err}");
        assert_eq!(
            read_to_limit(open_following(&link).expect("followed"), &link, 100).expect("read"),
            b"precious"
        );
        assert!(
            read_small(&dir.path().join("none"), 10)
                .expect("absent")
                .is_none()
        );
        read_small(&target, 3).expect_err("over the limit");
    }

    #[test]
    fn directories_are_created_private_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let strict = DirPolicy::default();
        let new = dir.path().join("a/b/cache");
        private_dir(&new, true, strict).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = private_dir(&new, true, strict).expect_err("0777");
        assert!(
            matches!(err, Error::InsecureCacheDir { .. }) && err.to_string().contains("0777"),
            "{err}"
        );
        assert_eq!(mode(&new), 0o777, "an existing directory is not changed");
        private_dir(
            &new,
            true,
            DirPolicy {
                allow_insecure: true,
            },
        )
        .expect("allowed");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&new, &link).expect("symlink");
        let err = private_dir(
            &link,
            false,
            DirPolicy {
                allow_insecure: true,
            },
        )
        .expect_err("symlink inside the cache");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }
}
