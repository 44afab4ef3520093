//! The chunk-hash table of a payload blob: the sha256 of every
//! `chunk_size` bytes, as a Monogon image config lists them
//! (`hash_chunk_size` and `chunk_hashes_sha256[]`, base64 without padding).
//! The layout checks the bytes it serves against it; the registry cache
//! checks each fetched chunk against it and keys a blob's cached bytes by
//! its [`ChunkHashes::table_digest`].

use std::fmt;
use std::ops::Range;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::Digest;

/// The sha256 of every `chunk_size` bytes of a payload; the last chunk may
/// be shorter. Always one hash per chunk, and a chunk size above zero.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    size: u64,
    chunk_size: u64,
    hashes: Box<[[u8; 32]]>,
}

impl fmt::Debug for ChunkHashes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkHashes")
            .field("size", &self.size)
            .field("chunk_size", &self.chunk_size)
            .field("chunks", &self.hashes.len())
            .finish()
    }
}

/// Why a list of chunk hashes is not the table of a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("chunk size is zero")]
    ZeroChunkSize,
    /// Not one hash per chunk.
    #[error("has {hashes} hashes, {size} bytes in chunks of {chunk_size} need {chunks}")]
    Count {
        hashes: u64,
        size: u64,
        chunk_size: u64,
        chunks: u64,
    },
    /// Entry `index` of the list is not a sha256 in base64 without padding.
    #[error("{message}")]
    Entry { index: usize, message: String },
}

/// A chunk whose bytes do not have the hash the table lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMismatch {
    pub chunk: u64,
    /// Bytes of the payload the chunk covers.
    pub range: Range<u64>,
    pub expected: [u8; 32],
    pub actual: [u8; 32],
}

impl ChunkMismatch {
    /// The expected sha256 in lowercase hex.
    pub fn expected_hex(&self) -> String {
        hex::encode(self.expected)
    }

    /// The sha256 of the bytes in lowercase hex.
    pub fn actual_hex(&self) -> String {
        hex::encode(self.actual)
    }
}

impl fmt::Display for ChunkMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chunk {} (bytes {}..{}) has sha256 {}, the image config says {}",
            self.chunk,
            self.range.start,
            self.range.end,
            self.actual_hex(),
            self.expected_hex()
        )
    }
}

impl std::error::Error for ChunkMismatch {}

impl ChunkHashes {
    /// The table of a payload of `size` bytes in chunks of `chunk_size`
    /// bytes, with `hashes[c]` the sha256 of chunk `c`.
    pub fn new(size: u64, chunk_size: u64, hashes: Vec<[u8; 32]>) -> Result<Self, TableError> {
        check_count(size, chunk_size, hashes.len())?;
        Ok(ChunkHashes {
            size,
            chunk_size,
            hashes: hashes.into(),
        })
    }

    /// Decodes `encoded`, the hashes as Monogon's image builder writes them
    /// (base64 without padding), for a payload of `size` bytes. The count is
    /// checked before any entry.
    pub fn from_base64<S: AsRef<str>>(
        size: u64,
        chunk_size: u64,
        encoded: &[S],
    ) -> Result<Self, TableError> {
        check_count(size, chunk_size, encoded.len())?;
        let hashes = encoded
            .iter()
            .enumerate()
            .map(|(index, text)| {
                decode_base64(text.as_ref()).map_err(|message| TableError::Entry { index, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChunkHashes {
            size,
            chunk_size,
            hashes: hashes.into(),
        })
    }

    /// Bytes of the payload.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn count(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// The sha256 of every chunk, in chunk order.
    pub fn hashes(&self) -> &[[u8; 32]] {
        &self.hashes
    }

    /// The bytes of the payload that chunk `c` covers.
    pub fn range(&self, c: u64) -> Range<u64> {
        let start = c.saturating_mul(self.chunk_size).min(self.size);
        start..start.saturating_add(self.chunk_size).min(self.size)
    }

    /// The chunks that bytes `bytes` of the payload touch (empty for an
    /// empty range; clamped to the payload).
    pub fn chunks_touching(&self, bytes: Range<u64>) -> Range<u64> {
        let end = bytes.end.min(self.size);
        if bytes.start >= end {
            return 0..0;
        }
        bytes.start / self.chunk_size..end.div_ceil(self.chunk_size)
    }

    /// The expected sha256 of chunk `c`.
    pub fn expected(&self, c: u64) -> Option<&[u8; 32]> {
        self.hashes.get(usize::try_from(c).ok()?)
    }

    /// Compares `actual`, the sha256 of chunk `c`'s bytes, with the table.
    pub fn check(&self, c: u64, actual: [u8; 32]) -> Result<(), ChunkMismatch> {
        match self.expected(c) {
            Some(expected) if *expected == actual => Ok(()),
            expected => Err(ChunkMismatch {
                chunk: c,
                range: self.range(c),
                expected: expected.copied().unwrap_or_default(),
                actual,
            }),
        }
    }

    /// Hashes `data`, the whole of chunk `c`, and compares.
    pub fn check_bytes(&self, c: u64, data: &[u8]) -> Result<(), ChunkMismatch> {
        self.check(c, Sha256::digest(data).into())
    }

    /// The digest of the table (size, chunk size and every chunk's sha256):
    /// what the registry cache keys a blob's bytes by, with the blob's
    /// digest, so that images that disagree about a blob's chunks never
    /// share its cached bytes. Existing caches hold files under it: its
    /// bytes never change.
    pub fn table_digest(&self) -> Digest {
        let mut table = Vec::with_capacity(40 + 32 * self.hashes.len());
        table.extend_from_slice(b"ociblk-chunk-table-1\n");
        table.extend_from_slice(&self.size.to_le_bytes());
        table.extend_from_slice(&self.chunk_size.to_le_bytes());
        for h in self.hashes.iter() {
            table.extend_from_slice(h);
        }
        Digest::of(&table)
    }
}

/// Refuses a zero chunk size and a count of hashes that is not one per
/// chunk.
fn check_count(size: u64, chunk_size: u64, hashes: usize) -> Result<(), TableError> {
    if chunk_size == 0 {
        return Err(TableError::ZeroChunkSize);
    }
    let chunks = size.div_ceil(chunk_size);
    if hashes as u64 != chunks {
        return Err(TableError::Count {
            hashes: hashes as u64,
            size,
            chunk_size,
            chunks,
        });
    }
    Ok(())
}

/// One sha256 in base64 without padding; the error says why not.
fn decode_base64(text: &str) -> Result<[u8; 32], String> {
    let mut digest = [0u8; 32];
    // 43 characters carry 32 bytes; anything else cannot be a sha256.
    if text.len() != 43 {
        return Err(format!(
            "{text:?} is not a sha256 in base64 without padding (43 characters)"
        ));
    }
    match STANDARD_NO_PAD.decode_slice(text.as_bytes(), &mut digest) {
        Ok(32) => Ok(digest),
        Ok(n) => Err(format!("{text:?} decodes to {n} bytes, not 32")),
        Err(e) => Err(format!("{text:?} is not base64 without padding: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(data: &[u8], chunk: usize) -> Vec<String> {
        data.chunks(chunk)
            .map(|c| STANDARD_NO_PAD.encode(Sha256::digest(c)))
            .collect()
    }

    #[test]
    fn short_last_chunk() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let h = ChunkHashes::from_base64(2500, 1000, &encode(&data, 1000)).expect("decodes");
        assert_eq!(h.count(), 3);
        assert_eq!(h.range(2), 2000..2500);
        assert_eq!(h.chunks_touching(999..1001), 0..2);
        assert_eq!(h.chunks_touching(2400..9000), 2..3);
        assert_eq!(h.chunks_touching(5..5), 0..0);
        h.check_bytes(2, &data[2000..]).expect("last chunk matches");
        let err = h.check_bytes(1, &data[1000..1999]).expect_err("short data");
        assert_eq!(err.chunk, 1);
        assert_eq!(err.range, 1000..2000);
        assert!(err.to_string().contains("chunk 1 (bytes 1000..2000)"));
    }

    #[test]
    fn bad_entries_are_refused() {
        let good = encode(&[1, 2, 3], 4);
        for (bad, why) in [
            (format!("{}=", good[0]), "43 characters"),
            (format!("{}A", good[0]), "43 characters"),
            ("!".repeat(43), "not base64"),
            // Trailing bits set in the last character: not a canonical encoding.
            (format!("{}B", &good[0][..42]), "not base64"),
        ] {
            match ChunkHashes::from_base64(3, 4, &[bad]) {
                Err(TableError::Entry { index: 0, message }) => {
                    assert!(message.contains(why), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
        // The count is checked first.
        let err = ChunkHashes::from_base64(5, 4, &["!"]).expect_err("count");
        assert_eq!(
            err.to_string(),
            "has 1 hashes, 5 bytes in chunks of 4 need 2"
        );
    }

    #[test]
    fn one_hash_per_chunk_and_a_chunk_size() {
        assert_eq!(
            ChunkHashes::new(2500, 1000, vec![[0; 32]; 2]),
            Err(TableError::Count {
                hashes: 2,
                size: 2500,
                chunk_size: 1000,
                chunks: 3
            })
        );
        assert_eq!(
            ChunkHashes::new(2500, 0, Vec::new()),
            Err(TableError::ZeroChunkSize)
        );
        let empty = ChunkHashes::new(0, 1000, Vec::new()).expect("an empty payload");
        assert_eq!(empty.count(), 0);
        assert_eq!(empty.chunks_touching(0..10), 0..0);
    }

    /// The registry cache keys a blob's files by this digest: it must never
    /// change, or an existing cache would no longer find its blobs.
    #[test]
    fn table_digest_is_pinned() {
        let table =
            ChunkHashes::new(2500, 1000, vec![[0; 32], [1; 32], [0xab; 32]]).expect("3 chunks");
        assert_eq!(
            table.table_digest().to_string(),
            "sha256:3c6cc0f0a68483bb80c6dcc75b28544b408f5d613051a2b18773c727dc9c244a"
        );
    }
}
