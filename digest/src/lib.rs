//! The sha256 content digest: the name of a blob, a manifest, an overlay
//! layer. Its text form `sha256:<64 lowercase hex digits>` is printed and
//! parsed here and nowhere else. With it, the other sha256 model of a
//! payload: its chunk-hash table ([`ChunkHashes`]).

pub mod chunks;

pub use chunks::{ChunkHashes, ChunkMismatch, TableError};

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The algorithm prefix of a digest's text form.
const PREFIX: &str = "sha256:";

/// A sha256 digest; the only algorithm OCI images and overlays here use.
/// Prints and parses as `sha256:<64 lowercase hex digits>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    sha256: [u8; 32],
    /// `sha256` in lowercase hex, kept to be lent out as a file name.
    hex: Box<str>,
}

/// Why a text is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text does not start with `sha256:`.
    #[error("{0:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)")]
    Algorithm(String),
    /// The part after `sha256:` (or the whole text, for [`Digest::from_hex`])
    /// is not 64 lowercase hex digits.
    #[error("{0:?} is not 64 lowercase hex digits")]
    Hex(String),
}

impl ParseError {
    /// The text that was refused.
    pub fn text(&self) -> &str {
        match self {
            ParseError::Algorithm(t) | ParseError::Hex(t) => t,
        }
    }
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest::from_sha256(&Sha256::digest(bytes).into())
    }

    /// The digest whose raw sha256 is `sha256`.
    pub fn from_sha256(sha256: &[u8; 32]) -> Self {
        Digest {
            sha256: *sha256,
            hex: hex::encode(sha256).into(),
        }
    }

    /// Parses 64 lowercase hex digits, without the algorithm.
    pub fn from_hex(hex: &str) -> Result<Self, ParseError> {
        let lowercase = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut sha256 = [0u8; 32];
        if !lowercase || hex::decode_to_slice(hex, &mut sha256).is_err() {
            return Err(ParseError::Hex(hex.to_owned()));
        }
        Ok(Digest {
            sha256,
            hex: hex.into(),
        })
    }

    /// The 64 hex digits after `sha256:` in `text`, unchecked, or `None` if
    /// `text` does not start with `sha256:`.
    pub fn strip_algorithm(text: &str) -> Option<&str> {
        text.strip_prefix(PREFIX)
    }

    /// The raw sha256.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The 64 hex digits, without the algorithm: a blob's file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `sha256:` and the first 12 hex digits, for messages.
    pub fn short(&self) -> String {
        format!("{PREFIX}{}..", &self.hex()[..12])
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let hex =
            Digest::strip_algorithm(text).ok_or_else(|| ParseError::Algorithm(text.to_owned()))?;
        Digest::from_hex(hex).map_err(|_| ParseError::Algorithm(text.to_owned()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
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
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d.clone()));
        assert_eq!(Digest::from_hex(d.hex()).ok(), Some(d.clone()));
        assert_eq!(d.short(), "sha256:e3b0c44298fc..");
        for bad in [
            "sha256:E3B0",
            "sha512:00",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:+3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert_eq!(
                bad.parse::<Digest>(),
                Err(ParseError::Algorithm(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!(
            Digest::from_hex("../../etc"),
            Err(ParseError::Hex("../../etc".to_owned()))
        );
    }
}
