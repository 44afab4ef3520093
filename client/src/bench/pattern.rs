// SPDX-License-Identifier: Apache-2.0

//! The deterministic write pattern: every sector carries its own disk offset.

use crate::rng::Rng;

/// Bytes between two offset stamps in a write buffer.
pub const STAMP_INTERVAL: usize = 512;

/// A write buffer: pseudo-random bytes from `seed`, then stamped by
/// [`stamp`](WritePattern::stamp) for each write so that every 512-byte sector carries
/// its own disk offset. The disk content after a run depends only on the seed and which
/// offsets were written, never on timing.
#[derive(Clone, Debug)]
pub struct WritePattern {
    buf: Vec<u8>,
    seed: u64,
}

impl WritePattern {
    /// A `len`-byte buffer for `seed`.
    pub fn new(len: usize, seed: u64) -> Self {
        let mut rng = Rng::for_stream(seed, u64::MAX);
        let mut buf = vec![0u8; len];
        for chunk in buf.chunks_mut(8) {
            let bytes = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Self { buf, seed }
    }

    /// Stamps the buffer for a write at disk byte `offset` and returns it. Each sector
    /// starts with `offset_of_sector ^ seed` and its bitwise complement, so no sector
    /// is all zeros.
    #[inline]
    pub fn stamp(&mut self, offset: u64) -> &[u8] {
        for (i, sector) in self.buf.chunks_mut(STAMP_INTERVAL).enumerate() {
            let value = (offset + (i * STAMP_INTERVAL) as u64) ^ self.seed;
            let mut stamp = [0u8; 16];
            stamp[..8].copy_from_slice(&value.to_le_bytes());
            stamp[8..].copy_from_slice(&(!value).to_le_bytes());
            let n = sector.len().min(stamp.len());
            sector[..n].copy_from_slice(&stamp[..n]);
        }
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_stamped_and_not_zero() {
        let mut p = WritePattern::new(4096, 9);
        let first = p.stamp(0).to_vec();
        let second = p.stamp(4096).to_vec();
        assert_ne!(first, second);
        assert_eq!(first[512..520], (512u64 ^ 9).to_le_bytes());
        assert!(first.chunks(512).all(|s| s.iter().any(|&b| b != 0)));
        assert_eq!(first[16..512], second[16..512]);
    }
}
