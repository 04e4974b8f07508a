//! The one backoff of HydraFlow: delays that double from a first one up to a
//! cap, without jitter (so tests and logs are deterministic), built with
//! `backon`. Used for retries of an issue, probes of a pause, restarts of a
//! crashed loop or a failed worker instance, and retries of a clone.

use std::time::Duration;

use backon::BackoffBuilder as _;

/// `first`, `2 × first`, `4 × first`, … up to `max`, forever.
pub fn doubling(first: Duration, max: Duration) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(first.min(max))
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// The `n`-th delay (from 0) of [`doubling`].
pub fn nth(first: Duration, max: Duration, n: u32) -> Duration {
    doubling(first, max).nth(n as usize).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap() {
        let secs: Vec<u64> = doubling(Duration::from_secs(1), Duration::from_secs(10))
            .take(6)
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
        assert_eq!(
            nth(Duration::from_millis(500), Duration::from_secs(60), 3),
            Duration::from_secs(4)
        );
    }
}
