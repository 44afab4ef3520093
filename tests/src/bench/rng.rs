// SPDX-License-Identifier: Apache-2.0

//! Seeded pseudo-random numbers (xorshift64*) and the deterministic write pattern.

/// Odd constant of the 64-bit golden ratio, used to spread seeds.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// xorshift64* generator: fast, small state, plenty for picking offsets.
#[derive(Clone, Debug)]
pub struct XorShift {
    state: u64,
}

impl XorShift {
    /// A generator for `seed` and `stream` (e.g. the queue index): different streams of
    /// one seed give unrelated sequences.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut state = seed ^ stream.wrapping_add(1).wrapping_mul(GOLDEN);
        // Scramble so that nearby seeds do not start out correlated (splitmix64 step).
        state = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        state = (state ^ (state >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        state ^= state >> 31;
        Self {
            state: if state == 0 { GOLDEN } else { state },
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound` (`bound` > 0), without division.
    #[inline]
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

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
        let mut rng = XorShift::new(seed, u64::MAX);
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
    fn streams_differ_and_repeat() {
        let mut a = XorShift::new(1, 0);
        let mut b = XorShift::new(1, 1);
        let mut a2 = XorShift::new(1, 0);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let xs2: Vec<u64> = (0..4).map(|_| a2.next_u64()).collect();
        assert_ne!(xs, ys);
        assert_eq!(xs, xs2);
        let mut r = XorShift::new(0, 0);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
        }
    }

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
