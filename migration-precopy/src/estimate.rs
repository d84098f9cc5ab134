//! Live estimates of link bandwidth and guest dirty rate.
//!
//! Both are measured, never configured: bandwidth from the bytes the transport really
//! accepted over a sliding window (a write returns once the kernel has the bytes, so with
//! socket buffers full this is the link's pace), dirty rate from how many pages each sync
//! found dirty over the time since the previous sync.

use std::collections::VecDeque;
use std::time::Duration;

/// Bandwidth over a sliding window of `(time, cumulative bytes)` samples.
#[derive(Debug, Clone)]
pub struct BandwidthEstimator {
    window: Duration,
    samples: VecDeque<(Duration, u64)>,
}

impl BandwidthEstimator {
    /// An estimator averaging over the last `window` of samples.
    pub fn new(window: Duration) -> Self {
        BandwidthEstimator {
            window,
            samples: VecDeque::with_capacity(64),
        }
    }

    /// Records that `total_bytes` had been sent by time `now` (monotonic).
    pub fn sample(&mut self, now: Duration, total_bytes: u64) {
        if let Some(&(t, b)) = self.samples.back() {
            if now < t || total_bytes < b {
                // A clock or counter going backwards means a new measurement series.
                self.samples.clear();
            }
        }
        self.samples.push_back((now, total_bytes));
        // Keep one sample older than the window so the window is always fully spanned.
        while self.samples.len() > 2 && now.saturating_sub(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
        // Bound memory whatever the sampling rate: thin out the oldest half.
        if self.samples.len() > 4096 {
            let keep: VecDeque<_> = self.samples.iter().copied().step_by(2).collect();
            self.samples = keep;
        }
    }

    /// Bytes per second over the window, or `None` before two samples a measurable time
    /// apart exist.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let (&(t0, b0), &(t1, b1)) = (self.samples.front()?, self.samples.back()?);
        let dt = t1.checked_sub(t0)?.as_secs_f64();
        (dt > 1e-4).then(|| (b1 - b0) as f64 / dt)
    }
}

/// Time to move `bytes` at `bytes_per_sec`.
pub fn transfer_time(bytes: u64, bytes_per_sec: f64) -> Duration {
    if bytes == 0 {
        return Duration::ZERO;
    }
    if bytes_per_sec.is_nan() || bytes_per_sec <= 0.0 {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(bytes as f64 / bytes_per_sec).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn steady_rate_is_measured_exactly() {
        let mut e = BandwidthEstimator::new(ms(1000));
        assert_eq!(e.bytes_per_sec(), None);
        for i in 0..=50 {
            e.sample(ms(i * 100), i * 10_000_000);
        }
        let bw = e.bytes_per_sec().unwrap();
        assert!((bw - 100e6).abs() < 1.0, "{bw}");
    }

    #[test]
    fn window_forgets_an_old_fast_phase() {
        let mut e = BandwidthEstimator::new(ms(1000));
        let mut total = 0;
        for i in 0..20 {
            total += 100_000_000; // 1 GB/s for 2 s
            e.sample(ms(i * 100), total);
        }
        for i in 20..60 {
            total += 1_000_000; // then 10 MB/s for 4 s
            e.sample(ms(i * 100), total);
        }
        let bw = e.bytes_per_sec().unwrap();
        assert!((bw - 10e6).abs() < 1e3, "{bw}");
    }

    #[test]
    fn backwards_counter_restarts_the_series() {
        let mut e = BandwidthEstimator::new(ms(1000));
        e.sample(ms(0), 1000);
        e.sample(ms(100), 2000);
        e.sample(ms(200), 10);
        assert_eq!(e.bytes_per_sec(), None);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_samples() {
        let mut e = BandwidthEstimator::new(Duration::from_secs(3600));
        for i in 0..100_000u64 {
            e.sample(Duration::from_micros(i), i);
        }
        assert!(e.samples.len() <= 4096);
        let bw = e.bytes_per_sec().unwrap();
        assert!((bw - 1e6).abs() < 1.0, "{bw}");
    }

    #[test]
    fn transfer_time_edges() {
        assert_eq!(transfer_time(0, 0.0), Duration::ZERO);
        assert_eq!(transfer_time(1, 0.0), Duration::MAX);
        assert_eq!(transfer_time(1_000_000, 1e6), Duration::from_secs(1));
    }
}
