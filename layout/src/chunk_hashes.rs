//! The chunk hashes of a payload: `hash_chunk_size` and
//! `chunk_hashes_sha256[]` of the image config, decoded and checked once when
//! the image is opened so that the read path only compares bytes.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A sha256 digest.
pub type Sha256Digest = [u8; 32];

/// The sha256 of every `chunk_size` bytes of a payload; the last chunk may
/// be shorter.
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    size: u64,
    chunk_size: u64,
    hashes: Vec<Sha256Digest>,
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

/// A chunk whose bytes do not have the hash the image config lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMismatch {
    pub chunk: u64,
    /// Bytes of the payload the chunk covers.
    pub range: Range<u64>,
    pub expected: Sha256Digest,
    pub actual: Sha256Digest,
}

impl fmt::Display for ChunkMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chunk {} (bytes {}..{}) has sha256 {}, the image config says {}",
            self.chunk,
            self.range.start,
            self.range.end,
            hex(&self.actual),
            hex(&self.expected)
        )
    }
}

impl std::error::Error for ChunkMismatch {}

/// Lowercase hex of a digest.
pub fn hex(digest: &Sha256Digest) -> String {
    hex::encode(digest)
}

impl ChunkHashes {
    /// Decodes `encoded` (base64 without padding, as Monogon's image builder
    /// writes them) for a payload of `size` bytes. `config` and `field`
    /// (e.g. `payloads[1].chunk_hashes_sha256`) name the source in errors.
    pub fn decode(
        config: &Path,
        field: &str,
        size: u64,
        chunk_size: u64,
        encoded: &[String],
    ) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::invalid(config, field, "chunk size is zero"));
        }
        let count = size.div_ceil(chunk_size);
        if encoded.len() as u64 != count {
            return Err(Error::invalid(
                config,
                field,
                format!(
                    "has {} hashes, {size} bytes in chunks of {chunk_size} need {count}",
                    encoded.len()
                ),
            ));
        }
        let mut hashes = Vec::with_capacity(encoded.len());
        for (j, s) in encoded.iter().enumerate() {
            let bad = |why: String| Error::invalid(config, format!("{field}[{j}]"), why);
            let mut digest = Sha256Digest::default();
            // 43 characters carry 32 bytes; anything else cannot be a sha256.
            if s.len() != 43 {
                return Err(bad(format!(
                    "{s:?} is not a sha256 in base64 without padding (43 characters)"
                )));
            }
            match STANDARD_NO_PAD.decode_slice(s.as_bytes(), &mut digest) {
                Ok(32) => {}
                Ok(n) => return Err(bad(format!("{s:?} decodes to {n} bytes, not 32"))),
                Err(e) => {
                    return Err(bad(format!("{s:?} is not base64 without padding: {e}")));
                }
            }
            hashes.push(digest);
        }
        Ok(ChunkHashes {
            size,
            chunk_size,
            hashes,
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
    pub fn expected(&self, c: u64) -> Option<&Sha256Digest> {
        self.hashes.get(usize::try_from(c).ok()?)
    }

    /// Compares `actual`, the sha256 of chunk `c`'s bytes, with the config.
    pub fn check(&self, c: u64, actual: Sha256Digest) -> Result<(), ChunkMismatch> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(data: &[u8], chunk: usize) -> Vec<String> {
        data.chunks(chunk)
            .map(|c| STANDARD_NO_PAD.encode(Sha256::digest(c)))
            .collect()
    }

    fn decode(size: u64, chunk: u64, enc: &[String]) -> Result<ChunkHashes> {
        ChunkHashes::decode(
            Path::new("cfg"),
            "payloads[0].chunk_hashes_sha256",
            size,
            chunk,
            enc,
        )
    }

    #[test]
    fn short_last_chunk() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let h = decode(2500, 1000, &encode(&data, 1000)).expect("decodes");
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
    fn bad_entries_are_named() {
        let good = encode(&[1, 2, 3], 4);
        for (bad, why) in [
            (format!("{}=", good[0]), "43 characters"),
            (format!("{}A", good[0]), "43 characters"),
            ("!".repeat(43), "not base64"),
            // Trailing bits set in the last character: not a canonical encoding.
            (format!("{}B", &good[0][..42]), "not base64"),
        ] {
            let err = decode(3, 4, &[bad]).expect_err("refused").to_string();
            assert!(
                err.contains("payloads[0].chunk_hashes_sha256[0]") && err.contains(why),
                "{err}"
            );
        }
        let err = decode(5, 4, &good).expect_err("count").to_string();
        assert!(err.contains("has 1 hashes"), "{err}");
    }
}
