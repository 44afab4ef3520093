//! GUIDs as GPT stores them, and IDs derived from a seed.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A GUID, held in the byte order of its text form
/// (`C12A7328-F81F-11D2-BA4B-00A0C93EC93B` is `[0xC1, 0x2A, ...]`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses a GUID at compile time; for the constant type GUIDs.
    pub const fn from_u128(v: u128) -> Self {
        Guid(v.to_be_bytes())
    }

    /// The on-disk ("mixed-endian") encoding used by GPT: the first three
    /// fields little-endian, the last two as they are.
    pub fn to_mixed_endian(self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    /// Inverse of [`Guid::to_mixed_endian`].
    pub fn from_mixed_endian(b: [u8; 16]) -> Self {
        Guid([
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ])
    }

    /// A version-4-shaped GUID derived from `seed` for one `purpose`
    /// ("disk", "esp", ...): the same seed always gives the same disk.
    pub fn derive(seed: &str, purpose: &str) -> Self {
        let hash = seed_hash(seed, purpose);
        let mut b = [0u8; 16];
        b.copy_from_slice(&hash[..16]);
        b[6] = (b[6] & 0x0F) | 0x40;
        b[8] = (b[8] & 0x3F) | 0x80;
        Guid(b)
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
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            b[0],
            b[1],
            b[2],
            b[3],
            b[4],
            b[5],
            b[6],
            b[7],
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
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

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseGuidError(s.to_owned());
        let groups: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if groups.len() != lens.len() || groups.iter().zip(lens).any(|(g, l)| g.len() != l) {
            return Err(err());
        }
        let hex: String = groups.concat();
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(err)?, 16)
                .map_err(|_| err())?;
        }
        Ok(Guid(b))
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
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in [
            "",
            "C12A7328F81F11D2BA4B00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93",
            "G12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "C12A7328-F81F-11D2-BA4B00-A0C93EC93B",
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
        assert_eq!(a.0[6] >> 4, 4, "version 4");
        assert_eq!(a.0[8] >> 6, 0b10, "RFC 4122 variant");
    }
}
