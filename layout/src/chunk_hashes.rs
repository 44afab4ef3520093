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
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use sha2::{Digest as _, Sha256};

    use super::*;

    fn encode(data: &[u8], chunk: usize) -> Vec<String> {
        data.chunks(chunk)
            .map(|c| STANDARD_NO_PAD.encode(Sha256::digest(c)))
            .collect()
    }

    fn decode(size: u64, chunk: u64, enc: &[String]) -> Result<ChunkHashes> {
        super::decode(
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
