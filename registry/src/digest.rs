//! sha256 content digests, the names of blobs and manifests: the one
//! [`Digest`] type, and the check of fetched bytes against one; and the
//! one chunk-hash table of a payload blob, [`ChunkHashes`].

pub use ociblk_digest::{ChunkHashes, Digest};

use crate::error::{Error, Result};

/// The check of fetched bytes against the digest that names them.
pub trait Verify {
    /// Checks that `bytes` (named `what` in the error) has this digest and `size` bytes.
    fn verify(&self, what: &'static str, bytes: &[u8], size: u64) -> Result<()>;
}

impl Verify for Digest {
    fn verify(&self, what: &'static str, bytes: &[u8], size: u64) -> Result<()> {
        if bytes.len() as u64 != size {
            return Err(Error::Size {
                what,
                digest: self.to_string(),
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        let actual = Digest::of(bytes);
        if actual != *self {
            return Err(Error::DigestMismatch {
                what,
                expected: self.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_names_size_and_digest() {
        let d = Digest::of(b"abc");
        d.verify("config", b"abc", 3).unwrap();
        assert!(matches!(
            d.verify("config", b"abc", 4),
            Err(Error::Size { .. })
        ));
        assert!(matches!(
            d.verify("config", b"abd", 3),
            Err(Error::DigestMismatch { .. })
        ));
    }
}
