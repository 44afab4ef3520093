//! sha256 content digests, the names of blobs and manifests.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A `sha256:<64 lowercase hex>` digest; the only algorithm OCI images here use.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest {
            hex: hex(&Sha256::digest(bytes)),
        }
    }

    /// The digest whose raw sha256 is `sha256`.
    pub fn from_sha256(sha256: &[u8; 32]) -> Self {
        Digest { hex: hex(sha256) }
    }

    /// The 64 hex digits, without the algorithm: the blob's file name in the cache.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Checks that `bytes` (named `what` in the error) has this digest and `size` bytes.
    pub fn verify(&self, what: &'static str, bytes: &[u8], size: u64) -> Result<()> {
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

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| Error::Digest(s.to_string()))?;
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d));
        for bad in [
            "sha256:E3B0",
            "sha512:00",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

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
