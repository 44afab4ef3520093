// SPDX-License-Identifier: Apache-2.0

//! The one seeded pseudo-random generator of the client, the bench and the tests:
//! reproducible offsets, operations and data, with no data files.

/// Odd constant of the 64-bit golden ratio, used to spread seeds.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// xorshift64 (shifts 13, 7, 17): small state, fast, plenty for picking offsets and
/// filling buffers. Not for anything secret.
///
/// The byte stream of [`Rng::new`] is pinned: tests hash disks built from it.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `seed`. Seeds differing only in the lowest bit give the same
    /// sequence (the state must be odd); use [`Rng::for_stream`] for unrelated streams.
    pub fn new(seed: u64) -> Self {
        Self { state: seed | 1 }
    }

    /// A generator for `seed` and `stream` (e.g. a queue index): different streams of
    /// one seed, and nearby seeds, give unrelated sequences.
    pub fn for_stream(seed: u64, stream: u64) -> Self {
        let mut state = seed ^ stream.wrapping_add(1).wrapping_mul(GOLDEN);
        // One splitmix64 step, so that nearby seeds do not start out correlated.
        state = (state ^ (state >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        state = (state ^ (state >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        state ^= state >> 31;
        Self::new(state)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A value in `0..bound` (`bound` > 0), from the high bits and without division.
    #[inline]
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with a chance of `percent` in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fills `buf`, eight bytes (little endian) per step.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.fill(&mut out);
        out
    }
}

/// `len` deterministic pseudo-random bytes for `seed`: test data without data files.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_and_repeat() {
        let mut a = Rng::for_stream(1, 0);
        let mut b = Rng::for_stream(1, 1);
        let mut a2 = Rng::for_stream(1, 0);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let xs2: Vec<u64> = (0..4).map(|_| a2.next_u64()).collect();
        assert_ne!(xs, ys);
        assert_eq!(xs, xs2);
        let mut r = Rng::for_stream(0, 0);
        for _ in 0..10_000 {
            assert!(r.below(7) < 7);
            assert!((3..=5).contains(&r.range(3, 5)));
        }
    }

    #[test]
    fn the_byte_stream_is_pinned() {
        // Golden disk hashes depend on these bytes.
        assert_eq!(
            pseudo_random(10, 1),
            [0x41, 0x20, 0x82, 0x40, 0x00, 0x00, 0x00, 0x00, 0x41, 0x14]
        );
        assert_eq!(pseudo_random(10, 10), pseudo_random(10, 11));
    }
}
