//! Why payload bytes could not be made ready to serve.

use std::io;
use std::ops::Range;
use std::path::PathBuf;

use ociblk_digest::ChunkMismatch;

/// Why a chunk of a payload was not served.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload {payload:?} ({}): {mismatch}", path.display())]
    Mismatch {
        payload: String,
        path: PathBuf,
        mismatch: Box<ChunkMismatch>,
    },
    #[error(
        "payload {payload:?} ({}): chunk {chunk} (bytes {}..{}): the blob ends at byte {at}",
        path.display(), range.start, range.end
    )]
    Truncated {
        payload: String,
        path: PathBuf,
        chunk: u64,
        range: Range<u64>,
        at: u64,
    },
    #[error("payload {payload:?} ({}): reading chunk {chunk}: {source}", path.display())]
    Read {
        payload: String,
        path: PathBuf,
        chunk: u64,
        #[source]
        source: io::Error,
    },
    #[error("no blob {id} in the disk's payload store")]
    NoBlob { id: usize },
    #[error("payload {payload:?}: fetching chunk {chunk}: {source}")]
    Fetch {
        payload: String,
        chunk: u64,
        #[source]
        source: Box<ociblk_registry::Error>,
    },
}

impl PayloadError {
    /// The chunk that failed, if one did.
    pub fn chunk(&self) -> Option<u64> {
        match self {
            PayloadError::Mismatch { mismatch, .. } => Some(mismatch.chunk),
            PayloadError::Truncated { chunk, .. }
            | PayloadError::Read { chunk, .. }
            | PayloadError::Fetch { chunk, .. } => Some(*chunk),
            PayloadError::NoBlob { .. } => None,
        }
    }
}

impl From<PayloadError> for io::Error {
    fn from(e: PayloadError) -> Self {
        let kind = match &e {
            PayloadError::Mismatch { .. } => io::ErrorKind::InvalidData,
            PayloadError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            PayloadError::Read { source, .. } => source.kind(),
            PayloadError::Fetch { .. } => io::ErrorKind::TimedOut,
            PayloadError::NoBlob { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}
