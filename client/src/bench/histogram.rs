// SPDX-License-Identifier: Apache-2.0

//! A log-bucketed latency histogram with bounded relative error.
//!
//! Values below 2^[`SUB_BITS`] get a bucket each; above, every power-of-two range
//! `[2^e, 2^(e+1))` is split into 2^[`SUB_BITS`] equal buckets, so a bucket is at most
//! 1/128 (0.8 %) of its values wide. Recording is an index computation and an
//! increment; the table has a fixed size and never allocates after construction.

/// Bits of linear resolution inside each power-of-two range.
const SUB_BITS: u32 = 7;
/// Buckets per power-of-two range.
const SUB_COUNT: usize = 1 << SUB_BITS;
/// Buckets needed for the whole `u64` range.
const BUCKETS: usize = (u64::BITS - SUB_BITS) as usize * SUB_COUNT + SUB_COUNT;

/// Histogram of `u64` values (the benchmark records nanoseconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// Index of the bucket holding `value`.
fn bucket_of(value: u64) -> usize {
    if value < SUB_COUNT as u64 {
        return value as usize;
    }
    let exp = u64::BITS - 1 - value.leading_zeros();
    let shift = exp - SUB_BITS;
    // (value >> shift) lies in [SUB_COUNT, 2 * SUB_COUNT).
    shift as usize * SUB_COUNT + (value >> shift) as usize
}

/// Smallest value and width of bucket `index`.
fn bucket_range(index: usize) -> (u64, u64) {
    if index < 2 * SUB_COUNT {
        return (index as u64, 1);
    }
    let shift = (index / SUB_COUNT - 1) as u32;
    let mantissa = (index - shift as usize * SUB_COUNT) as u64;
    (mantissa << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.counts[bucket_of(value)] += 1;
        self.count += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Forgets every value.
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.count = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest value recorded (exact), 0 when empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 { 0 } else { self.min }
    }

    /// Largest value recorded (exact), 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Arithmetic mean (exact), 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at `percentile` (0 to 100): the middle of the bucket holding the
    /// value of that rank, clamped to the exact minimum and maximum (the first and
    /// last ranks are the exact minimum and maximum); 0 when empty.
    pub fn percentile(&self, percentile: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let fraction = (percentile / 100.0).clamp(0.0, 1.0);
        let rank = ((fraction * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == 1 {
            return self.min as f64;
        }
        if rank == self.count {
            return self.max as f64;
        }
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_range(index);
                let middle = low as f64 + (width - 1) as f64 / 2.0;
                return middle.clamp(self.min as f64, self.max as f64);
            }
        }
        self.max as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut expected = 0;
        for value in (0..100_000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let index = bucket_of(value);
            let (low, width) = bucket_range(index);
            assert!(low <= value && value - low < width, "{value} in {index}");
            assert!(width == 1 || (width as f64) / (low as f64) <= 1.0 / 128.0);
            if value < 100_000 {
                assert!(index == expected || index == expected + 1, "{value}");
                expected = index;
            }
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_within_one_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 100_000);
        assert_eq!(h.min(), 1000);
        assert_eq!(h.max(), 100_000_000);
        assert!((h.mean() - 50_000_500.0).abs() < 1.0);
        for (p, exact) in [
            (50.0, 50_000_000.0),
            (90.0, 90_000_000.0),
            (99.9, 99_900_000.0),
        ] {
            let got = h.percentile(p);
            assert!((got - exact).abs() / exact < 0.01, "p{p}: {got} vs {exact}");
        }
        assert_eq!(h.percentile(100.0), 100_000_000.0);
        assert_eq!(h.percentile(0.0), 1000.0);
    }

    #[test]
    fn merge_and_clear() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(5);
        b.record(500);
        b.record(7);
        a.merge(&b);
        assert_eq!((a.count(), a.min(), a.max()), (3, 5, 500));
        assert_eq!(a.percentile(50.0), 7.0);
        a.clear();
        assert_eq!((a.count(), a.min(), a.max(), a.mean()), (0, 0, 0, 0.0));
        assert_eq!(a.percentile(99.0), 0.0);
    }
}
