//! Seeded permutations that never change: SplitMix64 feeding a Fisher–Yates shuffle.
//!
//! Written out here rather than taken from `rand` because a training run is resumed from a
//! checkpoint that stores only a seed and a step: the order of examples must be the same in every
//! build, whatever `rand`'s version. SplitMix64 (Steele, Lea & Flood 2014) is the generator Java's
//! `SplittableRandom` and xoshiro's seeding use; its output for a given seed is fixed forever.

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A stream from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A stream for one of many uses of the same seed (`stream` = the epoch, say): the two
    /// numbers are mixed so that neighbouring streams share nothing visible.
    pub(crate) fn for_stream(seed: u64, stream: u64) -> Self {
        let mut first = SplitMix64::new(seed);
        let mixed = first.next_u64() ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        SplitMix64::new(mixed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (`n > 0`), without modulo bias (rejection sampling).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        // Largest multiple of n that fits; draws at or above it are redrawn.
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// `0..n` in an order fixed by `(seed, stream)`.
pub(crate) fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::for_stream(seed, stream);
    // Fisher–Yates, from the back.
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs for seed 1234567 from the reference C implementation
        // (https://prng.di.unimi.it/splitmix64.c).
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(rng.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn permutation_is_a_permutation_and_depends_on_seed_and_stream() {
        let a = permutation(100, 7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, permutation(100, 7, 0));
        assert_ne!(a, permutation(100, 8, 0));
        assert_ne!(a, permutation(100, 7, 1));
        assert!(permutation(0, 7, 0).is_empty());
        assert_eq!(permutation(1, 7, 0), vec![0]);
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = SplitMix64::new(3);
        let mut seen = [false; 5];
        for _ in 0..200 {
            seen[rng.below(5) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
