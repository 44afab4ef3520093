//! Deciding whether an image argument names a local layout or a registry image.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::reference::Reference;

/// Where an OS image comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// An OCI image layout directory on this host.
    Layout(PathBuf),
    /// An image in an OCI registry.
    Registry(Reference),
}

impl ImageSource {
    /// Reads an image argument:
    ///
    /// 1. an existing directory is an OCI image layout, even when its name
    ///    could also be read as a reference (`localhost:5000/os` as a relative
    ///    path); write `./DIR` or an absolute path to make the intent plain;
    /// 2. anything else must parse as a registry reference
    ///    `HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`, whose first component is a
    ///    host (contains `.` or `:`, or is `localhost`);
    /// 3. otherwise the error names both readings and why each failed.
    pub fn parse(arg: &str) -> Result<Self> {
        let path = PathBuf::from(arg);
        if path.is_dir() {
            return Ok(ImageSource::Layout(path));
        }
        match Reference::parse(arg) {
            Ok(reference) => Ok(ImageSource::Registry(reference)),
            Err(err) => {
                let not_dir = if path.exists() {
                    "it exists but is not a directory".to_string()
                } else {
                    "no such directory".to_string()
                };
                let why = match err {
                    Error::Reference { message, .. } => message,
                    other => other.to_string(),
                };
                Err(Error::ImageSource {
                    arg: arg.to_string(),
                    reason: format!("{not_dir}; as a reference: {why}"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_wins_then_reference_then_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let arg = dir.path().to_str().expect("utf-8 temp path");
        assert_eq!(
            ImageSource::parse(arg).ok(),
            Some(ImageSource::Layout(dir.path().into()))
        );
        assert!(matches!(
            ImageSource::parse("localhost:5000/os:1"),
            Ok(ImageSource::Registry(_))
        ));
        let err = ImageSource::parse("no/such/dir")
            .expect_err("neither")
            .to_string();
        assert!(
            err.contains("no such directory") && err.contains("not a registry host"),
            "{err}"
        );
        let file = dir.path().join("f");
        std::fs::write(&file, b"").expect("write");
        let err = ImageSource::parse(file.to_str().expect("utf-8"))
            .expect_err("file")
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
