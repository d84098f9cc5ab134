//! Statistics and progress events that migration engines report.
//!
//! Engines fill these in as they go; a VMM shows them (a progress bar, a JSON report) and an
//! orchestrator reads them to decide whether to wait, throttle harder or give up. The types
//! are plain data so that any front end can use them.

use std::time::Duration;

/// Pages by the encoding they were sent in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages sent as "all zero", with no payload.
    pub zero: u64,
    /// Pages sent as they are.
    pub raw: u64,
    /// Pages sent zstd-compressed.
    pub zstd: u64,
    /// Pages sent as a delta against their previously sent copy.
    pub delta: u64,
}

impl PageCounts {
    /// All pages, whatever their encoding.
    pub fn total(&self) -> u64 {
        self.zero + self.raw + self.zstd + self.delta
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &PageCounts) {
        self.zero += other.zero;
        self.raw += other.raw;
        self.zstd += other.zstd;
        self.delta += other.delta;
    }
}

/// What one pass over guest RAM did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationStats {
    /// 0 for the first, full pass.
    pub iteration: u32,
    /// Pages sent in this pass, by encoding.
    pub pages: PageCounts,
    /// Bytes written to the transport in this pass, framing included.
    pub bytes_on_wire: u64,
    /// Wall time of the pass.
    pub duration: Duration,
    /// Pages found dirty by the sync that ended this pass (what the next pass has to send).
    pub dirty_pages_after: u64,
    /// Dirtying rate of the guest measured over this pass, in bytes per second.
    pub dirty_rate_bps: f64,
    /// Bandwidth estimate at the end of this pass, in bytes per second.
    pub bandwidth_bps: f64,
    /// Downtime the engine expected, had it stopped the guest after this pass.
    pub expected_downtime: Duration,
    /// vCPU throttle in force during the pass, in percent.
    pub throttle_pct: u8,
}

/// The phase a migration is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Connecting, exchanging configuration.
    Setup,
    /// Mirroring disks to the destination before RAM moves.
    StorageMirror,
    /// The first, full pass over RAM.
    BulkCopy,
    /// Re-sending pages dirtied since the previous pass.
    Iterating,
    /// Guest paused: the last dirty pages and the device state are sent.
    StopAndCopy,
    /// The destination runs the guest and fetches what it still misses.
    Postcopy,
    /// Post-copy connection lost: both sides wait for it to come back.
    PostcopyPaused,
    /// Everything sent; waiting for the destination's verdict.
    AwaitingVerdict,
    /// The destination runs the guest.
    Completed,
    /// The migration failed; the guest runs on the source.
    Failed,
    /// The user cancelled; the guest runs on the source.
    Cancelled,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Setup => "setup",
            Phase::StorageMirror => "storage-mirror",
            Phase::BulkCopy => "bulk-copy",
            Phase::Iterating => "iterating",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Postcopy => "postcopy",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::AwaitingVerdict => "awaiting-verdict",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        })
    }
}

/// Something an engine reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// The migration entered `phase`.
    Phase(Phase),
    /// Periodic progress within a phase.
    Progress {
        /// Bytes written to the transport so far.
        bytes_on_wire: u64,
        /// Pages sent so far, all passes together.
        pages_sent: u64,
        /// Pages still to send in the current pass.
        pages_remaining: u64,
        /// Pages of guest RAM in all.
        pages_total: u64,
        /// Current bandwidth estimate, bytes per second.
        bandwidth_bps: f64,
        /// Current dirty-rate estimate, bytes per second.
        dirty_rate_bps: f64,
    },
    /// A pass over RAM ended.
    IterationDone(IterationStats),
    /// Auto-converge changed the vCPU throttle.
    Throttle {
        /// The new throttle, in percent.
        percent: u8,
    },
    /// A post-copy page fault was served.
    PageFault {
        /// Global page index.
        page: u64,
        /// From the fault on the destination to the page being in place.
        latency: Duration,
    },
}

/// Totals of a whole migration, as an engine reports them at the end.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationStats {
    /// From the start of setup to the verdict.
    pub total_time: Duration,
    /// Time the guest ran nowhere: from the source's pause to the destination's resume.
    pub downtime: Duration,
    /// The downtime the engine expected when it decided to stop the guest.
    pub expected_downtime: Duration,
    /// Bytes written to the transport, framing included.
    pub bytes_on_wire: u64,
    /// Pages sent, by encoding.
    pub pages: PageCounts,
    /// Bytes of device state sent.
    pub device_state_bytes: u64,
    /// Every pass over RAM, in order.
    pub iterations: Vec<IterationStats>,
    /// Highest vCPU throttle auto-converge applied, in percent.
    pub max_throttle_pct: u8,
}

impl MigrationStats {
    /// Adds one pass's figures to the totals.
    pub fn record_iteration(&mut self, it: IterationStats) {
        self.pages.add(&it.pages);
        self.max_throttle_pct = self.max_throttle_pct.max(it.throttle_pct);
        self.iterations.push(it);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_follow_iterations() {
        let mut s = MigrationStats::default();
        s.record_iteration(IterationStats {
            pages: PageCounts {
                zero: 3,
                raw: 2,
                zstd: 0,
                delta: 0,
            },
            throttle_pct: 20,
            ..Default::default()
        });
        s.record_iteration(IterationStats {
            iteration: 1,
            pages: PageCounts {
                zero: 0,
                raw: 1,
                zstd: 4,
                delta: 5,
            },
            throttle_pct: 10,
            ..Default::default()
        });
        assert_eq!(s.pages.total(), 15);
        assert_eq!(s.pages.delta, 5);
        assert_eq!(s.max_throttle_pct, 20);
        assert_eq!(s.iterations.len(), 2);
    }
}
