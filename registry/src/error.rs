//! The one error type of the registry crate.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong reading an image from a registry or the host cache.
///
/// Messages name the reference, URL, digest, chunk or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{reference:?} is not an image reference: {message}")]
    Reference { reference: String, message: String },
    #[error(
        "{arg:?} is neither an OCI image layout directory nor a registry reference \
         (HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]): {reason}"
    )]
    ImageSource { arg: String, reason: String },
    #[error(transparent)]
    Digest(#[from] ociblk_digest::ParseError),
    #[error("GET {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("GET {url}: HTTP {status}{}", detail_suffix(detail))]
    Status {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("GET {url}: not done within {timeout:?} ({last})")]
    Timeout {
        url: String,
        timeout: Duration,
        last: String,
    },
    #[error(
        "blob {digest} chunk {index}: another fetch of this chunk (in this or another \
         process) did not finish within {timeout:?}"
    )]
    ChunkBusy {
        digest: String,
        index: u64,
        timeout: Duration,
    },
    #[error(
        "blob {digest} chunk {index}: no request slot for a prefetch came free within \
         {timeout:?} (guest fetches go first)"
    )]
    NoPrefetchSlot {
        digest: String,
        index: u64,
        timeout: Duration,
    },
    #[error("GET {url}: {message}")]
    Protocol { url: String, message: String },
    /// A connection the transport rules forbid (plain HTTP to a host that
    /// is neither loopback nor `--insecure-registry`), refused before it
    /// is made.
    #[error("GET {url}: refused: {message}")]
    Refused { url: String, message: String },
    #[error(
        "blob {digest}: chunks {chunks} of one read were not all fetched within {timeout:?} \
         (one bound for the whole read)"
    )]
    ChunksTimeout {
        digest: String,
        chunks: String,
        timeout: Duration,
    },
    /// A certificate problem in the TLS handshake: final, never retried.
    #[error("GET {url}: TLS: {message}")]
    Tls { url: String, message: String },
    /// A file of a registry's certificate directory that cannot be used.
    #[error("certificate file {}: {message}", path.display())]
    CertFile { path: PathBuf, message: String },
    #[error("credential helper {program} ({}, {field}): {message}", file.display())]
    CredentialHelper {
        program: String,
        file: PathBuf,
        field: String,
        message: String,
    },
    #[error("GET {url}: authentication: {message}")]
    Auth { url: String, message: String },
    #[error("{what} {digest}: {actual} bytes, but {expected} expected")]
    Size {
        what: &'static str,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: sha256 of the bytes is {actual}, but {expected} expected")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("blob {digest} chunk {index}: sha256 is {actual}, but the image says {expected}")]
    ChunkDigest {
        digest: String,
        index: u64,
        expected: String,
        actual: String,
    },
    #[error("blob {digest}: chunk {index} is past the end ({chunks} chunks)")]
    ChunkIndex {
        digest: String,
        index: u64,
        chunks: u64,
    },
    #[error("{what}: field {field}: {message}")]
    Invalid {
        what: String,
        field: String,
        message: String,
    },
    #[error(
        "{reference}: registry unreachable ({source}) and the image is not in the cache {}",
        cache.display()
    )]
    Offline {
        reference: String,
        cache: PathBuf,
        #[source]
        source: Box<Error>,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {message}", path.display())]
    Cache { path: PathBuf, message: String },
    #[error(
        "cache directory {}: {message}; make it private to you (owned by you, \
         chmod go-w) or pass --allow-insecure-cache-dir",
        path.display()
    )]
    InsecureCacheDir { path: PathBuf, message: String },
    #[error(
        "blob {digest}: every chunk was fetched, but the blob's sha256 is {actual}: \
         the registry serves other bytes under this digest (they stay usable only \
         through the chunk hashes of the image that fetched them)"
    )]
    BlobDigest { digest: String, actual: String },
    #[error("access record {}: line {line}: {message}", path.display())]
    AccessRecord {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether a write to the cache failed for want of space (`ENOSPC`,
    /// `EDQUOT`): a full file system, not bad bytes.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }

    /// Whether the registry could not be reached at all (as opposed to a
    /// refusal or wrong bytes): only then may a cached image be used instead.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::Http { source, .. } => matches!(
                **source,
                ureq::Error::Io(_)
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::HostNotFound
                    | ureq::Error::Timeout(_)
            ),
            Error::Timeout { .. } | Error::ChunksTimeout { .. } => true,
            Error::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
