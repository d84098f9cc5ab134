//! When to stop iterating: the convergence decision, without I/O.
//!
//! After each sync of the dirty log the source engine hands the [`Planner`] what it
//! measured and gets back what to do next. Keeping this logic apart from sockets and vCPUs
//! is what lets its tests drive it through thousands of synthetic migrations.
//!
//! The rules:
//! - The downtime to expect is the time to send what is dirty now plus the device state
//!   at the bandwidth measured so far.
//! - When that fits the downtime limit the engine does **not** stop at once, as QEMU does:
//!   it keeps iterating while each pass still shrinks the dirty set markedly, and stops
//!   when what is left is what the guest keeps dirtying anyway (or when almost nothing is
//!   left). An idle guest therefore stops with next to nothing to send, and its downtime
//!   is the pause and the device state, not the limit.
//! - Auto-converge, as in QEMU: when the bytes dirtied in a period exceed half the bytes
//!   sent in it twice in a row, throttle the vCPUs, first by 20 %, then 10 % more each
//!   further time, at most 99 %.
//! - A limit on iterations or on total time ends the iterating with the measurements that
//!   explain why it did not converge.

use std::time::Duration;

use crate::estimate::transfer_time;

/// Convergence settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergenceConfig {
    /// Longest acceptable pause of the guest.
    pub downtime_limit: Duration,
    /// Throttle the guest when it dirties memory faster than the link carries it.
    pub auto_converge: bool,
    /// First throttle step, in percent.
    pub throttle_initial: u8,
    /// Added at each further trigger, in percent.
    pub throttle_increment: u8,
    /// Ceiling of the throttle, in percent.
    pub throttle_max: u8,
    /// Give up (or hand over to post-copy) after this many passes over dirty pages.
    pub max_iterations: Option<u32>,
    /// Give up (or hand over to post-copy) after this much time iterating.
    pub max_time: Option<Duration>,
    /// A pass must shrink the dirty set to at most this fraction of the previous one to
    /// count as progress worth another pass, once the downtime already fits.
    pub min_shrink: f64,
    /// Dirty pages at or below this are "almost nothing": stop as soon as they fit.
    pub tiny_dirty_pages: u64,
    /// Give up (or hand over to post-copy) after this many passes in a row that neither
    /// fit the downtime limit nor shrank the expected downtime to at most `min_shrink` of
    /// the best seen so far: the guest dirties memory as fast as the link carries it, and
    /// more passes will not change that. `None` (the default): iterate until another
    /// limit is reached. The limit a hybrid post-copy switches on by default.
    pub give_up_after_stalled: Option<u32>,
}

impl Default for ConvergenceConfig {
    fn default() -> Self {
        ConvergenceConfig {
            downtime_limit: Duration::from_millis(300),
            auto_converge: false,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_max: 99,
            max_iterations: None,
            max_time: None,
            min_shrink: 0.5,
            tiny_dirty_pages: 16,
            give_up_after_stalled: None,
        }
    }
}

/// What the engine measured over one period (from one sync to the next).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeriodMeasure {
    /// Pages the sync that ends the period found dirty.
    pub dirty_pages: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// Bytes a re-sent page takes on the wire, as the last pass measured it (zero pages,
    /// zstd and deltas make it smaller than a page); `None`: a full page.
    pub wire_bytes_per_page: Option<f64>,
    /// Bytes the transport accepted during the period.
    pub bytes_sent: u64,
    /// Length of the period.
    pub period: Duration,
    /// Bandwidth estimate, bytes per second.
    pub bandwidth_bps: f64,
    /// Expected size of the device state, bytes.
    pub device_state_bytes: u64,
    /// Time since iterating began (after the first full pass).
    pub elapsed: Duration,
    /// Passes over dirty pages done so far (not counting the first, full pass).
    pub iterations: u32,
}

impl PeriodMeasure {
    /// Bytes dirtied per second over the period.
    pub fn dirty_rate_bps(&self) -> f64 {
        let s = self.period.as_secs_f64();
        if s > 0.0 {
            (self.dirty_pages * self.page_size) as f64 / s
        } else {
            0.0
        }
    }

    /// Downtime if the guest were stopped now.
    pub fn expected_downtime(&self) -> Duration {
        let per_page = self
            .wire_bytes_per_page
            .filter(|b| b.is_finite() && *b > 0.0)
            .map_or(self.page_size as f64, |b| {
                b.min(self.page_size as f64 + 16.0)
            });
        transfer_time(
            (self.dirty_pages as f64 * per_page) as u64 + self.device_state_bytes,
            self.bandwidth_bps,
        )
    }
}

/// Why the migration did not converge, in numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct NotConverged {
    /// Which limit ended it.
    pub limit: &'static str,
    /// Passes done.
    pub iterations: u32,
    /// Time spent iterating.
    pub elapsed: Duration,
    /// Dirty rate of the guest, bytes per second.
    pub dirty_rate_bps: f64,
    /// Bandwidth of the link, bytes per second.
    pub bandwidth_bps: f64,
    /// Bytes still dirty.
    pub remaining_bytes: u64,
    /// Downtime if the guest were stopped now.
    pub expected_downtime: Duration,
    /// The configured limit.
    pub downtime_limit: Duration,
    /// Throttle reached, in percent.
    pub throttle_pct: u8,
}

impl std::fmt::Display for NotConverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: f64| b / 1e6;
        write!(
            f,
            "did not converge: {} reached after {} iterations in {:.1} s; the guest dirties {:.1} MB/s \
             and the link carries {:.1} MB/s, so the {:.1} MB still dirty would take {} ms of \
             downtime against a limit of {} ms (throttle {} %)",
            self.limit,
            self.iterations,
            self.elapsed.as_secs_f64(),
            mb(self.dirty_rate_bps),
            mb(self.bandwidth_bps),
            mb(self.remaining_bytes as f64),
            if self.expected_downtime == Duration::MAX {
                "unbounded".to_string()
            } else {
                self.expected_downtime.as_millis().to_string()
            },
            self.downtime_limit.as_millis(),
            self.throttle_pct
        )
    }
}

/// What to do after a sync.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send the dirty pages and sync again.
    Iterate,
    /// Send the dirty pages with the vCPUs throttled to this percentage.
    Throttle(u8),
    /// Pause the guest and send the rest.
    StopAndCopy,
    /// A limit was reached without the downtime fitting.
    LimitReached(NotConverged),
}

/// The convergence state machine.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: ConvergenceConfig,
    prev_dirty: Option<u64>,
    high_dirty_periods: u32,
    throttle: u8,
    /// The smallest expected downtime seen over the limit, and passes since it last
    /// shrank markedly.
    best_expected: Option<Duration>,
    stalled: u32,
}

impl Planner {
    /// A planner for one migration.
    pub fn new(cfg: ConvergenceConfig) -> Self {
        Planner {
            cfg,
            prev_dirty: None,
            high_dirty_periods: 0,
            throttle: 0,
            best_expected: None,
            stalled: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ConvergenceConfig {
        &self.cfg
    }

    /// The throttle currently asked for, in percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Decides what follows the period just measured.
    pub fn decide(&mut self, m: &PeriodMeasure) -> Decision {
        let prev = self.prev_dirty.replace(m.dirty_pages);
        let expected = m.expected_downtime();
        if expected <= self.cfg.downtime_limit {
            let tiny = m.dirty_pages <= self.cfg.tiny_dirty_pages;
            // The first sync has nothing to compare with: one more pass tells.
            let still_shrinking =
                prev.is_none_or(|p| (m.dirty_pages as f64) <= p as f64 * self.cfg.min_shrink);
            let out_of_budget = self.limit_hit(m).is_some();
            if tiny || !still_shrinking || out_of_budget {
                return Decision::StopAndCopy;
            }
            return Decision::Iterate;
        }
        // Over the limit: is it still getting closer?
        match self.best_expected {
            Some(best) if expected.as_secs_f64() > best.as_secs_f64() * self.cfg.min_shrink => {
                self.stalled += 1;
                self.best_expected = Some(best.min(expected));
            }
            _ => {
                self.stalled = 0;
                self.best_expected = Some(expected);
            }
        }
        let stalled = self
            .cfg
            .give_up_after_stalled
            .is_some_and(|n| self.stalled >= n)
            .then_some("the stall limit (pre-copy does not converge)");
        if let Some(limit) = self.limit_hit(m).or(stalled) {
            return Decision::LimitReached(NotConverged {
                limit,
                iterations: m.iterations,
                elapsed: m.elapsed,
                dirty_rate_bps: m.dirty_rate_bps(),
                bandwidth_bps: m.bandwidth_bps,
                remaining_bytes: m.dirty_pages * m.page_size,
                expected_downtime: expected,
                downtime_limit: self.cfg.downtime_limit,
                throttle_pct: self.throttle,
            });
        }
        if self.cfg.auto_converge && self.throttle < self.cfg.throttle_max {
            let dirtied = m.dirty_pages * m.page_size;
            if dirtied > m.bytes_sent / 2 {
                self.high_dirty_periods += 1;
            } else {
                self.high_dirty_periods = 0;
            }
            if self.high_dirty_periods >= 2 {
                self.high_dirty_periods = 0;
                self.throttle = if self.throttle == 0 {
                    self.cfg.throttle_initial
                } else {
                    self.throttle.saturating_add(self.cfg.throttle_increment)
                }
                .min(self.cfg.throttle_max);
                return Decision::Throttle(self.throttle);
            }
        }
        Decision::Iterate
    }

    fn limit_hit(&self, m: &PeriodMeasure) -> Option<&'static str> {
        if self.cfg.max_iterations.is_some_and(|n| m.iterations >= n) {
            return Some("the iteration limit");
        }
        if self.cfg.max_time.is_some_and(|t| m.elapsed >= t) {
            return Some("the time limit");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn measure(dirty_pages: u64, bytes_sent: u64, bw: f64, iterations: u32) -> PeriodMeasure {
        PeriodMeasure {
            dirty_pages,
            page_size: 4096,
            wire_bytes_per_page: None,
            bytes_sent,
            period: Duration::from_secs(1),
            bandwidth_bps: bw,
            device_state_bytes: 64 * 1024,
            elapsed: Duration::from_secs(iterations as u64),
            iterations,
        }
    }

    #[test]
    fn idle_guest_iterates_down_to_almost_nothing() {
        let mut p = Planner::new(ConvergenceConfig::default());
        // 1 GB/s: 1000 dirty pages fit 300 ms easily, but the set is still shrinking.
        assert_eq!(p.decide(&measure(1000, 1 << 30, 1e9, 0)), Decision::Iterate);
        assert_eq!(p.decide(&measure(100, 1 << 22, 1e9, 1)), Decision::Iterate);
        assert_eq!(
            p.decide(&measure(3, 1 << 19, 1e9, 2)),
            Decision::StopAndCopy
        );
    }

    #[test]
    fn steady_working_set_stops_once_it_fits_and_stops_shrinking() {
        let mut p = Planner::new(ConvergenceConfig::default());
        assert_eq!(p.decide(&measure(5000, 1 << 30, 1e9, 0)), Decision::Iterate);
        // Same working set dirtied again: no more progress to make.
        assert_eq!(
            p.decide(&measure(4900, 1 << 25, 1e9, 1)),
            Decision::StopAndCopy
        );
    }

    #[test]
    fn auto_converge_throttles_after_two_high_periods_in_a_row() {
        let cfg = ConvergenceConfig {
            auto_converge: true,
            ..Default::default()
        };
        let mut p = Planner::new(cfg);
        // 3 MB/s link, the guest dirties 40 MB per 1 s period: never fits.
        let m = measure(10_000, 3_000_000, 3e6, 0);
        assert_eq!(p.decide(&m), Decision::Iterate);
        assert_eq!(p.decide(&m), Decision::Throttle(20));
        assert_eq!(p.decide(&m), Decision::Iterate);
        assert_eq!(p.decide(&m), Decision::Throttle(30));
        // A calm period resets the count.
        assert_eq!(
            p.decide(&measure(100, 3_000_000, 3e6, 0)),
            Decision::Iterate
        );
        assert_eq!(p.decide(&m), Decision::Iterate);
        assert_eq!(p.decide(&m), Decision::Throttle(40));
        for _ in 0..40 {
            p.decide(&m);
        }
        assert_eq!(p.throttle(), 99);
    }

    #[test]
    fn no_throttle_without_auto_converge() {
        let mut p = Planner::new(ConvergenceConfig::default());
        let m = measure(10_000, 3_000_000, 3e6, 0);
        for _ in 0..10 {
            assert_eq!(p.decide(&m), Decision::Iterate);
        }
        assert_eq!(p.throttle(), 0);
    }

    #[test]
    fn limits_end_with_the_reason_in_numbers() {
        let cfg = ConvergenceConfig {
            downtime_limit: Duration::from_millis(1),
            max_iterations: Some(5),
            ..Default::default()
        };
        let mut p = Planner::new(cfg);
        let Decision::LimitReached(nc) = p.decide(&measure(10_000, 3_000_000, 3e6, 5)) else {
            panic!("expected the iteration limit");
        };
        assert_eq!(nc.limit, "the iteration limit");
        assert_eq!(nc.remaining_bytes, 10_000 * 4096);
        let text = nc.to_string();
        assert!(text.contains("did not converge"), "{text}");
        assert!(text.contains("dirties 41.0 MB/s"), "{text}");
        assert!(text.contains("carries 3.0 MB/s"), "{text}");

        let cfg = ConvergenceConfig {
            downtime_limit: Duration::from_millis(1),
            max_time: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        let mut p = Planner::new(cfg);
        assert_eq!(
            p.decide(&measure(10_000, 3_000_000, 3e6, 2)),
            Decision::Iterate
        );
        assert!(matches!(
            p.decide(&measure(10_000, 3_000_000, 3e6, 3)),
            Decision::LimitReached(NotConverged {
                limit: "the time limit",
                ..
            })
        ));
    }

    #[test]
    fn a_guest_as_fast_as_the_link_stalls_and_gives_up_where_asked() {
        let cfg = ConvergenceConfig {
            downtime_limit: Duration::from_millis(10),
            give_up_after_stalled: Some(3),
            ..Default::default()
        };
        let mut p = Planner::new(cfg.clone());
        // 10 MB/s link, 10 000 dirty pages a pass: 4 s of downtime, again and again.
        let m = |i| measure(10_000, 10_000_000, 1e7, i);
        for i in 0..3 {
            assert_eq!(p.decide(&m(i)), Decision::Iterate, "pass {i}");
        }
        let Decision::LimitReached(nc) = p.decide(&m(3)) else {
            panic!("expected the stall limit");
        };
        assert!(nc.limit.contains("does not converge"), "{}", nc.limit);

        // A guest that keeps shrinking its dirty set is not stalled, however slowly it
        // gets there.
        let mut p = Planner::new(cfg.clone());
        let mut dirty = 100_000;
        for i in 0..8 {
            assert_eq!(
                p.decide(&measure(dirty, 10_000_000, 1e7, i)),
                Decision::Iterate
            );
            dirty /= 3;
        }
        // Without the option it never gives up on its own.
        let mut p = Planner::new(ConvergenceConfig {
            give_up_after_stalled: None,
            ..cfg
        });
        for i in 0..50 {
            assert_eq!(p.decide(&m(i)), Decision::Iterate);
        }
    }

    proptest! {
        /// Whatever the measurements, the planner never stops the guest when the expected
        /// downtime exceeds the limit, and never throttles beyond the ceiling.
        #[test]
        fn never_stops_over_the_limit(
            steps in proptest::collection::vec((0u64..100_000, 0u64..1 << 32, 1.0f64..1e10), 1..50),
            auto in any::<bool>(),
        ) {
            let mut p = Planner::new(ConvergenceConfig { auto_converge: auto, max_iterations: Some(30), ..Default::default() });
            for (i, (dirty, sent, bw)) in steps.into_iter().enumerate() {
                let m = measure(dirty, sent, bw, i as u32);
                match p.decide(&m) {
                    Decision::StopAndCopy => prop_assert!(m.expected_downtime() <= Duration::from_millis(300)),
                    Decision::Throttle(t) => prop_assert!(auto && t <= 99),
                    Decision::LimitReached(nc) => prop_assert!(nc.expected_downtime > nc.downtime_limit),
                    Decision::Iterate => {}
                }
            }
        }
    }
}
