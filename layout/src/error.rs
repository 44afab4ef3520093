//! The one error type of the layout crate.

use std::io;
use std::path::PathBuf;

/// Everything that can be wrong with an OS image or with the disk asked for.
///
/// Messages name the file and the field at fault, so that a user can fix the
/// input without reading code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is the source, not part of the message: `{:#}` prints
    // the chain, and would print it twice.
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: invalid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(
        "{}: blob {digest} has {actual} bytes, but its descriptor says {expected}",
        path.display()
    )]
    BlobSize {
        path: PathBuf,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{}: sha256 of blob is {actual}, but its descriptor says {expected}",
        path.display()
    )]
    BlobDigest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("OS image has no payload {0:?}")]
    MissingPayload(String),
    #[error(
        "payload {name:?} is compressed ({media_type}); only uncompressed payloads \
         (application/octet-stream) can be served in place: rebuild the image without compression"
    )]
    CompressedPayload { name: String, media_type: String },
    #[error(
        "payload {name:?} has {size} bytes, larger than partition {partition} ({capacity} bytes)"
    )]
    PayloadTooLarge {
        name: String,
        size: u64,
        partition: String,
        capacity: u64,
    },
    #[error("ESP content too large: {0}")]
    EspContentTooLarge(String),
    #[error("ESP too small for FAT32: {sectors} sectors, at least {minimum} needed")]
    EspTooSmall { sectors: u64, minimum: u64 },
    #[error("disk too small for the partitions: {0}")]
    DiskTooSmall(String),
    #[error("invalid disk parameter {param}: {message}")]
    Param {
        param: &'static str,
        message: String,
    },
    #[error("unsupported architecture {0:?} in product_info.variant (x86_64 or aarch64)")]
    Architecture(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result with the layout crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
