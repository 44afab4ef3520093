//! One bit per chunk of a payload, set once and read without a lock: what
//! a layer of the payload store knows of each chunk (present in the cache,
//! verified, read by the guest).

use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap over the chunks of one payload.
#[derive(Debug)]
pub(crate) struct ChunkBits {
    words: Box<[AtomicU64]>,
    chunks: u64,
}

impl ChunkBits {
    /// All clear, for `chunks` chunks.
    pub(crate) fn new(chunks: u64) -> Self {
        ChunkBits {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks,
        }
    }

    fn word(&self, c: u64) -> Option<(&AtomicU64, u64)> {
        if c >= self.chunks {
            return None;
        }
        let word = self.words.get(usize::try_from(c / 64).ok()?)?;
        Some((word, 1 << (c % 64)))
    }

    /// Whether chunk `c` is set. Acquire pairs with the Release of
    /// [`ChunkBits::set`]: a set bit is seen only after the work that set it.
    pub(crate) fn get(&self, c: u64) -> bool {
        self.word(c)
            .is_some_and(|(w, mask)| w.load(Ordering::Acquire) & mask != 0)
    }

    /// Whether every chunk of `chunks` is set.
    pub(crate) fn all(&self, chunks: std::ops::Range<u64>) -> bool {
        chunks.into_iter().all(|c| self.get(c))
    }

    /// Sets chunk `c`; `true` when this call set it (it was clear). A chunk
    /// past the end is never set.
    pub(crate) fn set(&self, c: u64) -> bool {
        self.word(c)
            .is_some_and(|(w, mask)| w.fetch_or(mask, Ordering::Release) & mask == 0)
    }

    /// Clears chunk `c`.
    pub(crate) fn clear(&self, c: u64) {
        if let Some((w, mask)) = self.word(c) {
            w.fetch_and(!mask, Ordering::Release);
        }
    }

    /// Chunks set.
    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear_and_count_across_words() {
        let bits = ChunkBits::new(130);
        assert!(bits.set(0) && bits.set(64) && bits.set(129));
        assert!(!bits.set(64), "set twice: the second call did not set it");
        assert!(bits.get(129) && !bits.get(128));
        assert!(!bits.set(130) && !bits.get(130), "past the end");
        assert_eq!(bits.count(), 3);
        assert!(bits.all(64..65) && !bits.all(63..65));
        bits.clear(64);
        assert!(!bits.get(64));
        assert_eq!(bits.count(), 2);
    }
}
