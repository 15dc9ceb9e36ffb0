//! Capped exponential backoff with full jitter (the "Full Jitter" variant of the AWS
//! architecture blog's comparison): the delay is uniform in `[0, min(cap, base * 2^n)]`.
//! Spreading retries over the whole interval is what keeps a fleet of clients from
//! reconnecting in lock step to a broker that just restarted.

use std::time::Duration;

/// Backoff state: how many attempts failed since the last good connection.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`; `seed` drives the jitter.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// The ceiling for the next delay: `min(max, initial * 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; counts the failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        // Uniform in [0, nanos]; the modulo bias is irrelevant at these magnitudes.
        Duration::from_nanos(self.next_u64() % (nanos + 1))
    }

    /// A good connection: start again from `initial`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Attempts failed since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: plenty for spreading retries, no dependency.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A seed that differs between processes and between clients of one process.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 7);
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay();
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 12345);
        let mut seen = Vec::new();
        for _ in 0..1000 {
            b.reset();
            for _ in 0..7 {
                b.next_delay();
            }
            // Eighth attempt: ceiling is the 60 s cap.
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(60));
            seen.push(d.as_millis());
        }
        // Full jitter spreads over the interval: both halves are used, and the values are
        // not all equal (aligned retries are what we avoid).
        let low = seen.iter().filter(|&&ms| ms < 30_000).count();
        assert!((350..650).contains(&low), "low half: {low} of 1000");
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 900);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 1);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
        assert_eq!(b.failures(), 100);
    }
}
