//! GUIDs as GPT stores them, and IDs derived from a seed.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use uuid::{Builder, Uuid};

/// A GUID. GPT stores it "mixed-endian" (the first three fields little
/// endian), which is `uuid`'s `_le` byte order; it prints in upper case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(Uuid);

impl Guid {
    /// A GUID from its text form read as one big-endian number; for the
    /// constant type GUIDs.
    pub const fn from_u128(v: u128) -> Self {
        Guid(Uuid::from_u128(v))
    }

    /// The bytes in the order of the text form
    /// (`C12A7328-F81F-11D2-BA4B-00A0C93EC93B` is `[0xC1, 0x2A, ...]`).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The on-disk ("mixed-endian") encoding used by GPT: the first three
    /// fields little-endian, the last two as they are.
    pub fn to_mixed_endian(self) -> [u8; 16] {
        self.0.to_bytes_le()
    }

    /// Inverse of [`Guid::to_mixed_endian`].
    pub fn from_mixed_endian(b: [u8; 16]) -> Self {
        Guid(Uuid::from_bytes_le(b))
    }

    /// A version 4 GUID derived from `seed` for one `purpose` ("disk",
    /// "esp", ...): the same seed always gives the same disk.
    pub fn derive(seed: &str, purpose: &str) -> Self {
        let hash = seed_hash(seed, purpose);
        let mut b = [0u8; 16];
        b.copy_from_slice(&hash[..16]);
        Guid(Builder::from_random_bytes(b).into_uuid())
    }
}

/// sha256 over a domain-separated (purpose, seed) pair.
pub(crate) fn seed_hash(seed: &str, purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ociblk-id-v1\0");
    h.update(purpose.as_bytes());
    h.update(b"\0");
    h.update(seed.as_bytes());
    h.finalize().into()
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::UpperHex::fmt(self.0.as_hyphenated(), f)
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A GUID string that is not of the form `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid GUID {0:?}: expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX (hex digits)")]
pub struct ParseGuidError(pub String);

impl FromStr for Guid {
    type Err = ParseGuidError;

    /// Only the hyphenated form: `uuid` also reads the simple, braced and
    /// URN forms, which are not GUIDs as GPT tools print them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hyphenated = s.len() == uuid::fmt::Hyphenated::LENGTH;
        match Uuid::try_parse(s) {
            Ok(u) if hyphenated => Ok(Guid(u)),
            _ => Err(ParseGuidError(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_endian_matches_gpt_spec() {
        let esp: Guid = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B".parse().unwrap();
        assert_eq!(
            esp.to_mixed_endian(),
            [
                0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E,
                0xC9, 0x3B
            ]
        );
        assert_eq!(Guid::from_mixed_endian(esp.to_mixed_endian()), esp);
        assert_eq!(esp.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(esp, Guid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B));
        assert_eq!(esp.as_bytes()[..2], [0xC1, 0x2A]);
        // Lower case parses too; it prints in upper case.
        let lower: Guid = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".parse().unwrap();
        assert_eq!(lower, esp);
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "",
            "C12A7328F81F11D2BA4B00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93",
            "G12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B00-A0C93EC93B",
            "{C12A7328-F81F-11D2-BA4B-00A0C93EC93B}",
            "urn:uuid:C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B ",
        ] {
            assert!(bad.parse::<Guid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = Guid::derive("node0", "disk");
        assert_eq!(a, Guid::derive("node0", "disk"));
        assert_ne!(a, Guid::derive("node1", "disk"));
        assert_ne!(a, Guid::derive("node0", "esp"));
        assert_eq!(a.as_bytes()[6] >> 4, 4, "version 4");
        assert_eq!(a.as_bytes()[8] >> 6, 0b10, "RFC 4122 variant");
    }
}
