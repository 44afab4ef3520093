//! The chunk hashes of a payload: `hash_chunk_size` and
//! `chunk_hashes_sha256[]` of the image config, decoded into the shared
//! [`ChunkHashes`] table and checked once when the image is opened, so that
//! the read path only compares bytes.

use std::path::Path;

use ociblk_digest::{ChunkHashes, TableError};

use crate::error::{Error, Result};

/// Decodes `encoded` (base64 without padding, as Monogon's image builder
/// writes them) for a payload of `size` bytes. `config` and `field`
/// (e.g. `payloads[1].chunk_hashes_sha256`) name the source in errors.
pub fn decode(
    config: &Path,
    field: &str,
    size: u64,
    chunk_size: u64,
    encoded: &[String],
) -> Result<ChunkHashes> {
    ChunkHashes::from_base64(size, chunk_size, encoded).map_err(|e| match e {
        TableError::Entry { index, message } => {
            Error::invalid(config, format!("{field}[{index}]"), message)
        }
        e @ (TableError::ZeroChunkSize | TableError::Count { .. }) => {
            Error::invalid(config, field, e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(size: u64, chunk: u64, enc: &[String]) -> Result<ChunkHashes> {
        super::decode(
            Path::new("cfg"),
            "payloads[0].chunk_hashes_sha256",
            size,
            chunk,
            enc,
        )
    }

    /// Each kind of refusal names the config field and entry (the table's
    /// own tests in ociblk-digest try every malformed entry).
    #[test]
    fn bad_entries_are_named() {
        // 32 zero bytes: a well-formed entry.
        let good = ["A".repeat(43)];
        for (bad, why) in [
            ("short".to_owned(), "43 characters"),
            ("!".repeat(43), "not base64"),
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
