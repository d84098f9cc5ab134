//! What post-copy measures: fault latency as a log2 histogram, vCPU blocktime, pages by
//! origin, recoveries.

use std::time::Duration;

/// Linear sub-buckets per power of two in [`LatencyHistogram`].
const SUB: u64 = 8;
/// `log2(SUB)`.
const SUB_BITS: u32 = 3;
/// Buckets of [`LatencyHistogram`]: one per nanosecond below 8 ns, then 8 per power of two
/// up to 2^64 ns.
pub const LATENCY_BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

/// Latencies in log2 buckets of nanoseconds, each power of two split into 8 linear
/// sub-buckets (so a bucket is at most 12.5 % wide), with exact count, sum and maximum.
/// Constant size, no allocation per sample; percentiles are read off the buckets (the
/// upper bound of the bucket the percentile falls in, but never above the maximum seen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: [u64; LATENCY_BUCKETS],
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Adds one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The mean, or zero without samples.
    pub fn mean(&self) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(
            u64::try_from(self.sum_ns / u128::from(self.count)).unwrap_or(u64::MAX),
        )
    }

    /// The `q`-quantile (`0.5` for the median, `0.99`), as the upper bound of the bucket
    /// it falls in, capped by the maximum; zero without samples.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (_, upper) = bounds_of(i);
                return Duration::from_nanos(upper.min(self.max_ns));
            }
        }
        self.max()
    }

    /// `(lower bound in ns, count)` of every non-empty bucket, in order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (bounds_of(i).0, *n))
    }
}

/// The bucket of a latency of `ns` nanoseconds.
fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros(); // at least SUB_BITS
    let sub = (ns >> (e - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(e - SUB_BITS) * SUB + sub) as usize
}

/// The smallest and largest latency (ns) bucket `i` holds.
fn bounds_of(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let e = (i - SUB) / SUB + u64::from(SUB_BITS);
    let sub = (i - SUB) % SUB;
    let shift = e - u64::from(SUB_BITS);
    let lower = (SUB + sub) << shift;
    (lower, lower.saturating_add((1u64 << shift) - 1))
}

/// Where a page that reached the destination came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Received during pre-copy and not discarded.
    Precopied,
    /// Pushed by the source in the background.
    Pushed,
    /// Sent in answer to a page request.
    Requested,
}

/// Pages by where they came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagesByOrigin {
    /// Received during pre-copy and kept.
    pub precopied: u64,
    /// Pushed in the background during post-copy.
    pub pushed: u64,
    /// Sent in answer to a fault.
    pub requested: u64,
}

/// One recovery from a broken connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// From the break to page service again.
    pub duration: Duration,
    /// Connection attempts it took.
    pub attempts: u32,
}

/// What the destination of a post-copy migration measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostcopyStats {
    /// From a fault read to its page placed.
    pub fault_latency: LatencyHistogram,
    /// Faults read from the userfaultfd.
    pub faults: u64,
    /// Page requests sent.
    pub requests: u64,
    /// Faults on pages already requested or in flight, that sent no second request.
    pub duplicate_requests_avoided: u64,
    /// Faults on pages that were present by the time the fault was read.
    pub faults_already_served: u64,
    /// Pages placed, by origin.
    pub pages: PagesByOrigin,
    /// Pages that arrived twice (a push racing a request) and were placed once.
    pub duplicate_pages: u64,
    /// Time each faulting thread spent waiting for pages, by thread (kernel thread id,
    /// or 0 where the kernel does not say).
    pub blocktime_by_thread: Vec<(u32, Duration)>,
    /// Time during which at least one thread waited for a page.
    pub blocked_any: Duration,
    /// From the commit to every page present.
    pub postcopy_time: Duration,
    /// Recoveries from broken connections.
    pub recoveries: Vec<Recovery>,
}

impl PostcopyStats {
    /// Blocktime summed over all threads.
    pub fn blocktime_total(&self) -> Duration {
        self.blocktime_by_thread.iter().map(|(_, d)| *d).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantiles_come_from_the_buckets_and_never_exceed_the_maximum() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for us in [10u64, 20, 30, 40, 1000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 5);
        assert_eq!(h.max(), Duration::from_micros(1000));
        assert_eq!(h.mean(), Duration::from_micros(220));
        // 30 µs is in [28672, 30720) ns: the seventh eighth of [2^14, 2^15).
        assert_eq!(h.quantile(0.5), Duration::from_nanos(30719));
        assert_eq!(bounds_of(bucket_of(30_000)), (28_672, 30_719));
        assert_eq!(bounds_of(bucket_of(5)), (5, 5));
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(h.quantile(0.99), Duration::from_micros(1000));
        assert_eq!(h.buckets().map(|(_, n)| n).sum::<u64>(), 5);
        let mut g = LatencyHistogram::default();
        g.record(Duration::ZERO);
        g.merge(&h);
        assert_eq!(g.count(), 6);
        assert_eq!(g.buckets().next(), Some((0, 1)));
    }

    proptest! {
        /// A quantile is within a bucket (12.5 %) of the exact one, above it (the bucket's
        /// upper bound), and ordered with the others; every latency falls in the bucket
        /// whose bounds hold it.
        #[test]
        fn quantiles_are_within_a_bucket_of_the_truth(mut xs in proptest::collection::vec(1u64..1 << 40, 1..200), q in 0.01f64..1.0) {
            let mut h = LatencyHistogram::default();
            for &x in &xs {
                h.record(Duration::from_nanos(x));
            }
            xs.sort_unstable();
            let rank = ((q * xs.len() as f64).ceil() as usize).max(1);
            let exact = xs[rank - 1];
            let got = h.quantile(q).as_nanos() as u64;
            prop_assert!(got >= exact && got <= exact + exact / 8 + 1, "{got} vs {exact}");
            for &x in &xs {
                let (lo, hi) = bounds_of(bucket_of(x));
                prop_assert!(lo <= x && x <= hi);
            }
            prop_assert!(h.quantile(0.5) <= h.quantile(0.99));
            prop_assert!(h.quantile(1.0) == h.max());
        }
    }
}
