//! What the commands report, as typed structs: printed as JSON with `--json`, as text
//! otherwise, carried by the control protocol, and read back by the demo and the tests.

use std::fmt;

use migration_core::stats::PageCounts;
use migration_precopy::Placement;
use serde::{Deserialize, Serialize};

use crate::cli::TransportKind;
use crate::control::VcpuStats;
use crate::layout::{Fill, Order};
use crate::oracle::VcpuVerdict;
use crate::protocol::RunState;
use crate::vm::GuestKind;

/// Pages by encoding.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PagesReport {
    /// Zero pages.
    pub zero: u64,
    /// Raw pages.
    pub raw: u64,
    /// zstd pages.
    pub zstd: u64,
    /// Delta pages.
    pub delta: u64,
}

impl PagesReport {
    /// All pages.
    pub fn total(&self) -> u64 {
        self.zero + self.raw + self.zstd + self.delta
    }
}

impl From<PageCounts> for PagesReport {
    fn from(p: PageCounts) -> Self {
        PagesReport {
            zero: p.zero,
            raw: p.raw,
            zstd: p.zstd,
            delta: p.delta,
        }
    }
}

/// One pass over RAM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PassReport {
    /// Pass number (0: bulk).
    pub iteration: u32,
    /// Pages by encoding.
    pub pages: PagesReport,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Duration, ms.
    pub ms: f64,
    /// Dirty pages found after it.
    pub dirty_after: u64,
    /// Dirty rate, bytes/s.
    pub dirty_rate_bps: f64,
    /// Bandwidth, bytes/s.
    pub bandwidth_bps: f64,
    /// Throttle in force, %.
    pub throttle_pct: u8,
}

/// How a migration moved the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Iterative pre-copy alone (also a hybrid that converged before any switch).
    Precopy,
    /// Pure post-copy: the guest moved first, every page followed.
    Postcopy,
    /// Pre-copy, then a switch to post-copy for the pages still missing.
    Hybrid,
}

impl MigrationMode {
    /// `"precopy"`, `"postcopy"` or `"hybrid"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Precopy => "precopy",
            MigrationMode::Postcopy => "postcopy",
            MigrationMode::Hybrid => "hybrid",
        }
    }

    /// Whether the guest moved by post-copy (pure or hybrid).
    pub fn is_postcopy(self) -> bool {
        self != MigrationMode::Precopy
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationMode::Precopy => "pre-copy",
            MigrationMode::Postcopy => "post-copy",
            MigrationMode::Hybrid => "hybrid (pre-copy, then post-copy)",
        })
    }
}

/// One recovery of a post-copy from a broken connection.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct RecoveryReport {
    /// From the break to page service again, ms.
    pub ms: f64,
    /// Connection attempts it took (the destination counts the ones that reached it).
    pub attempts: u32,
}

impl From<&migration_postcopy::stats::Recovery> for RecoveryReport {
    fn from(r: &migration_postcopy::stats::Recovery) -> Self {
        RecoveryReport {
            ms: ms(r.duration),
            attempts: r.attempts,
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The source's side of a post-copy (the post-copy half of a hybrid, or a pure one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourcePostcopyReport {
    /// Why pre-copy handed over (a hybrid: `a switch on command`, the limit reached...);
    /// none for a pure post-copy.
    pub switch_reason: Option<String>,
    /// From the source's pause to its commit written, ms: the guest runs on the
    /// destination as soon as it reads the commit.
    pub downtime_ms: f64,
    /// From the commit to the destination's final verdict (every page there), ms.
    pub postcopy_ms: f64,
    /// Pages pushed in the background.
    pub pages_pushed: u64,
    /// Pages sent in answer to the destination's requests.
    pub pages_requested: u64,
    /// Page requests served.
    pub requests: u64,
    /// Bytes written during post-copy, both connections.
    pub bytes: u64,
    /// Pages the discard list named (dirtied since pre-copy sent them).
    pub discarded: u64,
    /// Recoveries from broken connections.
    pub recoveries: Vec<RecoveryReport>,
}

impl From<&migration_postcopy::source::SourceReport> for SourcePostcopyReport {
    fn from(r: &migration_postcopy::source::SourceReport) -> Self {
        SourcePostcopyReport {
            switch_reason: (!r.switch_reason.is_empty()).then(|| r.switch_reason.clone()),
            downtime_ms: ms(r.downtime),
            postcopy_ms: ms(r.postcopy_time),
            pages_pushed: r.pages_pushed,
            pages_requested: r.pages_requested,
            requests: r.requests,
            bytes: r.bytes,
            discarded: r.discarded,
            recoveries: r.recoveries.iter().map(RecoveryReport::from).collect(),
        }
    }
}

/// Pages that reached a post-copy destination, by where they came from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PagesByOriginReport {
    /// Received during pre-copy and kept (not discarded).
    pub precopied: u64,
    /// Pushed by the source in the background during post-copy.
    pub pushed: u64,
    /// Sent in answer to a page request: the pages that came by fault.
    pub requested: u64,
}

/// One bucket of a latency histogram: samples in `[from_ns, 2 * from_ns)` (the first
/// bucket from 0).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LatencyBucket {
    /// Lower bound, ns.
    pub from_ns: u64,
    /// Samples.
    pub count: u64,
}

/// Post-copy fault latency, from the fault read to its page placed: a log2 histogram and
/// its percentiles (each the upper bound of the bucket it falls in, capped by the
/// maximum).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyReport {
    /// Faults timed.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// Mean, µs.
    pub mean_us: f64,
    /// The non-empty buckets, in order.
    pub buckets: Vec<LatencyBucket>,
}

impl From<&migration_postcopy::stats::LatencyHistogram> for LatencyReport {
    fn from(h: &migration_postcopy::stats::LatencyHistogram) -> Self {
        LatencyReport {
            count: h.count(),
            p50_us: us(h.quantile(0.5)),
            p99_us: us(h.quantile(0.99)),
            max_us: us(h.max()),
            mean_us: us(h.mean()),
            buckets: h
                .buckets()
                .map(|(from_ns, count)| LatencyBucket { from_ns, count })
                .collect(),
        }
    }
}

/// Time a thread that was not a vCPU spent waiting for post-copy pages.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ThreadBlocktime {
    /// Kernel thread id (0: the kernel did not say which thread faulted).
    pub tid: u32,
    /// Time blocked, ms.
    pub ms: f64,
}

/// Post-copy blocktime: how long faulting threads waited for their pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BlocktimeReport {
    /// Summed over all threads, ms.
    pub total_ms: f64,
    /// Time during which at least one thread waited, ms.
    pub any_ms: f64,
    /// Each vCPU's, by vCPU index, ms.
    pub vcpus_ms: Vec<f64>,
    /// Threads that are not vCPUs (the VMM's own accesses to guest RAM), or whose id
    /// the kernel did not give.
    pub other_threads: Vec<ThreadBlocktime>,
}

impl BlocktimeReport {
    /// Splits `by_thread` into the vCPUs (`vcpu_tids[i]` is vCPU `i`'s thread) and the
    /// other threads.
    pub fn new(
        by_thread: &[(u32, std::time::Duration)],
        any: std::time::Duration,
        vcpu_tids: &[u32],
    ) -> BlocktimeReport {
        let mut r = BlocktimeReport {
            total_ms: by_thread.iter().map(|(_, d)| ms(*d)).sum(),
            any_ms: ms(any),
            vcpus_ms: vec![0.0; vcpu_tids.len()],
            other_threads: Vec::new(),
        };
        for &(tid, d) in by_thread {
            match vcpu_tids.iter().position(|&t| t != 0 && t == tid) {
                Some(i) => r.vcpus_ms[i] += ms(d),
                None => r.other_threads.push(ThreadBlocktime { tid, ms: ms(d) }),
            }
        }
        r
    }
}

/// The destination's side of a post-copy: what its fault path measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PostcopyReport {
    /// Faults read from userfaultfd (vCPUs, KVM on their behalf, the VMM).
    pub faults: u64,
    /// Page requests sent to the source.
    pub requests: u64,
    /// Faults on pages already requested or in flight, which sent no second request.
    pub duplicate_requests_avoided: u64,
    /// Faults on pages that were present by the time the fault was read.
    pub faults_already_served: u64,
    /// Pages by where they came from (`requested`: by fault).
    pub pages: PagesByOriginReport,
    /// Pages that arrived twice (a push racing a request) and were placed once.
    pub duplicate_pages: u64,
    /// Fault latency.
    pub fault_latency: LatencyReport,
    /// Blocktime, per vCPU.
    pub blocktime: BlocktimeReport,
    /// From the switch record to the guest running here, ms.
    pub switchover_ms: f64,
    /// From the commit to every page present, ms.
    pub postcopy_ms: f64,
    /// Recoveries from broken connections.
    pub recoveries: Vec<RecoveryReport>,
    /// The oracle over RAM once every page was there, with the guest paused for it, ms
    /// (the demo's check, not the engine's).
    pub check_ms: f64,
}

impl PostcopyReport {
    /// The report of `stats`, whose faulting threads are named by kernel thread id; vCPU
    /// `i` ran on thread `vcpu_tids[i]`.
    pub fn new(
        stats: &migration_postcopy::stats::PostcopyStats,
        switchover: std::time::Duration,
        vcpu_tids: &[u32],
    ) -> PostcopyReport {
        PostcopyReport {
            faults: stats.faults,
            requests: stats.requests,
            duplicate_requests_avoided: stats.duplicate_requests_avoided,
            faults_already_served: stats.faults_already_served,
            pages: PagesByOriginReport {
                precopied: stats.pages.precopied,
                pushed: stats.pages.pushed,
                requested: stats.pages.requested,
            },
            duplicate_pages: stats.duplicate_pages,
            fault_latency: LatencyReport::from(&stats.fault_latency),
            blocktime: BlocktimeReport::new(
                &stats.blocktime_by_thread,
                stats.blocked_any,
                vcpu_tids,
            ),
            switchover_ms: ms(switchover),
            postcopy_ms: ms(stats.postcopy_time),
            recoveries: stats.recoveries.iter().map(RecoveryReport::from).collect(),
            check_ms: 0.0,
        }
    }
}

/// What the source reports about a completed migration (the `return` of the control
/// socket's `migrate`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    /// How the guest moved: `"precopy"`, `"postcopy"` or `"hybrid"`.
    pub mode: MigrationMode,
    /// Which vCPUs ran the guest.
    pub guest: GuestKind,
    /// Dirty tracker used.
    pub tracker: String,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Where to.
    pub to: String,
    /// From connect to the verdict, ms.
    pub total_ms: f64,
    /// From the source's pause to the destination's `Running` verdict, as the engine
    /// timed it, ms. The demo's oracle checks run inside it (the source's hash,
    /// [`source_hash_ms`](Self::source_hash_ms), and the destination's checks, which only
    /// the destination times): `vmm-demo demo` reports the engine's pause without them.
    pub paused_with_checks_ms: f64,
    /// The downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// The downtime the engine expected when it stopped the guest, ms (none when it did
    /// not estimate one).
    pub expected_downtime_ms: Option<f64>,
    /// Time the source spent hashing RAM for the oracle while the guest was paused, ms.
    pub source_hash_ms: f64,
    /// Bytes written to the connection.
    pub bytes_on_wire: u64,
    /// Pages by encoding.
    pub pages: PagesReport,
    /// Passes over RAM (the bulk copy, the iterations, the final pass).
    pub iterations: usize,
    /// Each pass.
    pub passes: Vec<PassReport>,
    /// Highest throttle, %.
    pub max_throttle_pct: u8,
    /// Device state sent, bytes.
    pub device_state_bytes: u64,
    /// The storage-policy verdict, when the VM has disks.
    pub storage: Option<String>,
    /// The storage copy, when the disks were copied (--copy-storage-all/-inc).
    #[serde(default)]
    pub storage_copy: Option<StorageCopyReport>,
    /// The post-copy's figures, when the guest moved by post-copy (`bytes_on_wire`
    /// counts its bytes too; `pages`, `iterations` and `passes` are pre-copy's alone).
    #[serde(default)]
    pub postcopy: Option<SourcePostcopyReport>,
}

/// What a storage copy did (the source's side).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StorageCopyReport {
    /// `"all"` (every disk whole) or `"inc"` (what changed since the destination's copy).
    pub kind: String,
    /// The mirror's copy mode at the start.
    pub mirror_mode: crate::cli::MirrorMode,
    /// From the prepare request to every mirror in sync, ms.
    pub mirror_ms: f64,
    /// Completing the mirrors inside the guest's pause, ms.
    pub complete_ms: f64,
    /// Where the destination exported the disks.
    pub nbd: String,
    /// Each disk.
    pub disks: Vec<crate::migration::storage::DiskCopyReport>,
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.postcopy {
            None => write!(
                f,
                "migrated to {}: {:.0} ms, {} bytes on the wire, {} passes; guest paused {:.1} ms until the verdict, oracle checks included (source hash {:.1} ms)",
                self.to,
                self.total_ms,
                self.bytes_on_wire,
                self.iterations,
                self.paused_with_checks_ms,
                self.source_hash_ms
            ),
            Some(p) => write!(
                f,
                "migrated to {} by {}: {:.0} ms, {} bytes on the wire, {} pre-copy passes{}; guest paused {:.1} ms until the commit; post-copy {:.0} ms: {} pages pushed, {} requested in {} requests, {} recoveries",
                self.to,
                self.mode,
                self.total_ms,
                self.bytes_on_wire,
                self.iterations,
                p.switch_reason
                    .as_deref()
                    .map(|r| format!(" (switched: {r})"))
                    .unwrap_or_default(),
                self.paused_with_checks_ms,
                p.postcopy_ms,
                p.pages_pushed,
                p.pages_requested,
                p.requests,
                p.recoveries.len()
            ),
        }
    }
}

/// The disk part of a report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskRunReport {
    /// The image.
    pub path: String,
    /// Its sectors.
    pub sectors: u64,
    /// Sectors the workload writes every pass.
    pub working_set_sectors: u64,
    /// Working-set sectors the disk oracle checked.
    pub sectors_checked: u64,
    /// Bytes outside the working set the oracle read and found as they started (zero, or
    /// the `--disk-prefill` pattern).
    #[serde(default)]
    pub untouched_bytes_checked: u64,
    /// Per vCPU: pass and sectors of this pass written.
    pub verdicts: Vec<crate::disk_oracle::DiskVerdict>,
    /// The device's counters.
    pub device: crate::virtio_blk::BlkStats,
}

/// The destination's disk (shared storage: the source's image, opened here): what its
/// checks found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationDiskReport {
    /// The image.
    pub path: String,
    /// Its sectors.
    pub sectors: u64,
    /// Sectors the workload writes every pass.
    pub working_set_sectors: u64,
    /// Working-set sectors the disk oracle checked at a pre-copy switchover, before the
    /// guest ran here; none where there was no check there (post-copy, --no-hash-check).
    pub sectors_checked_at_switch: Option<u64>,
    /// The image's hash here equalled the source's at the switch; none where it was not
    /// compared.
    pub hash_at_switch_equal: Option<bool>,
    /// Working-set sectors checked once every post-copy page had arrived.
    pub sectors_checked_after_postcopy: Option<u64>,
    /// Working-set sectors checked after the guest ran here.
    pub sectors_checked: u64,
    /// Bytes outside the working set found as they started in that last check (zero, or
    /// the `--disk-prefill` pattern).
    #[serde(default)]
    pub untouched_bytes_checked: u64,
    /// Per vCPU at the end: pass and sectors of this pass written.
    pub verdicts: Vec<crate::disk_oracle::DiskVerdict>,
    /// What the device did here.
    pub device: crate::virtio_blk::BlkStats,
}

/// What `vmm-demo run` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    /// The guest's disk, when it has one: what the disk oracle found and what the device
    /// did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRunReport>,
    /// Always `"run"`.
    pub mode: String,
    /// Which vCPUs ran the guest.
    pub guest: GuestKind,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// RAM regions.
    pub ram_regions: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Working set in bytes.
    pub working_set_bytes: u64,
    /// Initial content of the rest of RAM.
    pub fill: Fill,
    /// Order of each vCPU's walk over its share (sequential in reports from before
    /// scattered walks).
    #[serde(default)]
    pub order: Order,
    /// Wall time from resume to pause, in milliseconds.
    pub total_ms: f64,
    /// Passes each vCPU completed.
    pub passes: Vec<u64>,
    /// Passes per second of each vCPU.
    pub pass_rate_per_s: Vec<f64>,
    /// Working-set pages incremented per second, all vCPUs together.
    pub pages_per_s: f64,
    /// The throttle that was in force.
    pub throttle_pct: u8,
    /// Per vCPU run, throttle and exit counters.
    pub vcpu_stats: Vec<VcpuStats>,
    /// Console lines the guest printed.
    pub console_lines: u64,
    /// Console lines not shown because the terminal was slower than the guest.
    pub console_dropped: u64,
    /// Hash of all guest RAM at the end, in hex.
    pub ram_hash: String,
    /// The oracle's view of each vCPU, when it passed.
    pub oracle: Option<Vec<VcpuVerdict>>,
    /// What the oracle or a vCPU found wrong, or why the guest was left paused.
    pub error: Option<String>,
    /// True only if the oracle checks passed, no vCPU failed and no failed migration
    /// left the guest paused.
    pub verified: bool,
    /// How the run ended, before `run` paused the guest to check it: `running` (it ran
    /// here to the end), `migrated`, or `paused` with the reason.
    #[serde(flatten)]
    pub status: RunState,
    /// The guest was migrated away (this VM stayed paused since the switchover).
    pub migrated: bool,
    /// The migration's report, when it was.
    pub migration: Option<MigrationReport>,
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} guest, {} MiB RAM, {} vCPU(s), working set {} KiB walked in {} order, ran {:.0} ms{}",
            self.guest,
            self.mem_bytes >> 20,
            self.vcpus,
            self.working_set_bytes >> 10,
            self.order,
            self.total_ms,
            if self.throttle_pct > 0 {
                format!(", throttled {} %", self.throttle_pct)
            } else {
                String::new()
            }
        )?;
        for (i, (p, r)) in self.passes.iter().zip(&self.pass_rate_per_s).enumerate() {
            writeln!(f, "  vcpu{i}: {p} passes, {r:.1} passes/s")?;
        }
        writeln!(
            f,
            "  {:.0} pages/s dirtied, RAM hash {}",
            self.pages_per_s, self.ram_hash
        )?;
        match &self.error {
            None => write!(
                f,
                "verified: every page holds pass N or N+1 of its vCPU, the rest of RAM is intact"
            )?,
            Some(e) => write!(f, "NOT verified: {e}")?,
        }
        match (&self.status, &self.migration) {
            (RunState::Migrated, Some(m)) => {
                write!(f, "\n{m}; the guest runs there, this copy stayed paused")
            }
            (RunState::Paused { reason }, _) => {
                write!(f, "\nthe guest is PAUSED here, not running: {reason}")
            }
            _ => Ok(()),
        }
    }
}

/// What `vmm-demo destination` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DestinationReport {
    /// `"destination"`.
    pub mode: String,
    /// Which vCPUs run the guest, once known.
    pub guest: Option<GuestKind>,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Order of the guest's walk, from the machine description that came with the
    /// migration, once known: what the oracle checked the pages against.
    #[serde(default)]
    pub order: Option<Order>,
    /// Bytes received.
    pub bytes_received: u64,
    /// Pages applied by encoding.
    pub pages: PagesReport,
    /// How pages went into untouched guest RAM, once known: `write`, `prefault` or
    /// `userfaultfd`.
    #[serde(with = "crate::names::placement")]
    pub placement: Placement,
    /// Guest RAM was allocated and populated before the migration (`--prealloc`).
    pub preallocated: bool,
    /// From `Complete` to the guest resumed, ms.
    pub switchover_ms: f64,
    /// The demo's oracle checks before the verdict (the oracle over RAM, the RAM hash
    /// against the source's), ms, inside the guest's pause.
    pub verify_ms: f64,
    /// The RAM hash was compared with the source's (and was equal).
    pub hash_checked: bool,
    /// The guest ran here.
    pub ran_guest: bool,
    /// Pass counters at the switchover.
    pub passes_at_switchover: Vec<u64>,
    /// Pass counters when the destination paused the guest at the end.
    pub passes_at_end: Vec<u64>,
    /// Console lines the guest printed here.
    pub console_lines: u64,
    /// True only if the switchover checks passed, the guest ran, made progress, and the
    /// oracle passed again at the end.
    pub verified: bool,
    /// What went wrong, with its causes.
    pub error: Option<String>,
    /// How the guest came, once it did: `precopy`, `postcopy` (pure) or `hybrid`.
    #[serde(default)]
    pub migration_mode: Option<MigrationMode>,
    /// What the post-copy fault path measured, when the guest came by post-copy.
    #[serde(default)]
    pub postcopy: Option<PostcopyReport>,
    /// The storage copy, when the source copied its disks here.
    #[serde(default)]
    pub storage: Option<DestinationStorageReport>,
    /// Served on a control socket after the migration in (`--control`): the migration
    /// that took the guest on from here, if one did.
    #[serde(default)]
    pub migrated_away: Option<MigrationReport>,
    /// A post-copy failed after its commit (the source did not come back in time): the
    /// guest ran here and is paused, with pages missing that only the source had.
    #[serde(default)]
    pub paused_after_commit: bool,
    /// The guest's disk, when it has one, as far as the checks got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DestinationDiskReport>,
}

impl DestinationReport {
    /// A report of nothing yet, for `placement` asked.
    pub fn new(placement: Placement) -> DestinationReport {
        DestinationReport {
            mode: "destination".into(),
            guest: None,
            mem_bytes: 0,
            order: None,
            bytes_received: 0,
            pages: PagesReport::default(),
            placement,
            preallocated: false,
            switchover_ms: 0.0,
            verify_ms: 0.0,
            hash_checked: false,
            ran_guest: false,
            passes_at_switchover: Vec::new(),
            passes_at_end: Vec::new(),
            console_lines: 0,
            verified: false,
            error: None,
            migration_mode: None,
            postcopy: None,
            paused_after_commit: false,
            disk: None,
            storage: None,
            migrated_away: None,
        }
    }
}

/// What a storage copy did on the destination.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DestinationStorageReport {
    /// Where the NBD exports were.
    pub nbd: String,
    /// The images, in the VM's order.
    pub images: Vec<String>,
    /// Whether each was created here (a full copy) or the older copy kept here.
    pub created: Vec<bool>,
    /// The exports stopped and the images synced before the guest ran here.
    pub finished: bool,
    /// What was done with the images when the migration failed.
    pub cleanup: Vec<String>,
    /// The base the guest's writes are recorded against from now on, for a later
    /// incremental copy back.
    pub base: Option<String>,
}

impl fmt::Display for DestinationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.error, &self.postcopy) {
            (None, Some(p)) => write!(
                f,
                "destination: {} guest verified after {} ({} pages by fault, {} pushed, {} pre-copied; fault latency p50 {:.0} us, p99 {:.0} us; blocktime {:.1} ms) and after running: passes {:?} -> {:?}",
                self.guest.map_or("?", GuestKind::as_str),
                self.migration_mode.unwrap_or(MigrationMode::Postcopy),
                p.pages.requested,
                p.pages.pushed,
                p.pages.precopied,
                p.fault_latency.p50_us,
                p.fault_latency.p99_us,
                p.blocktime.total_ms,
                self.passes_at_switchover,
                self.passes_at_end
            ),
            (None, None) => write!(
                f,
                "destination: {} guest verified at switchover (oracle{}, {:.1} ms) and after running: passes {:?} -> {:?}",
                self.guest.map_or("?", GuestKind::as_str),
                if self.hash_checked {
                    " and RAM hash"
                } else {
                    ""
                },
                self.verify_ms,
                self.passes_at_switchover,
                self.passes_at_end
            ),
            (Some(e), _) if self.paused_after_commit => write!(
                f,
                "destination: the guest is PAUSED here, incomplete (it ran here after the post-copy commit): {e}"
            ),
            (Some(e), _) if self.ran_guest => write!(f, "destination: NOT verified: {e}"),
            (Some(e), _) => write!(
                f,
                "destination: migration refused, the guest was not run here: {e}"
            ),
        }
    }
}

/// The demo's oracle checks, which run while the guest is paused for the switchover but
/// are not the engine's: the demo reports them apart from the downtime.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct OracleChecks {
    /// The source hashing all RAM (inside its `save_device_state`), ms.
    pub source_hash_ms: f64,
    /// The destination's oracle over RAM and its hash compare, before its verdict, ms.
    pub destination_check_ms: f64,
}

impl OracleChecks {
    /// Both together, ms.
    pub fn total_ms(&self) -> f64 {
        self.source_hash_ms + self.destination_check_ms
    }
}

/// The figures of a completed demo migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DemoMigration {
    /// From connect to the verdict, ms.
    pub total_ms: f64,
    /// The guest's pause that the engine caused, ms: from the source's pause to the
    /// destination's `Running` verdict, without the demo's oracle checks.
    pub downtime_ms: f64,
    /// The same as `downtime_ms`, under the name scripts read before it became the
    /// headline.
    pub downtime_without_checks_ms: f64,
    /// The guest's whole pause until the verdict, oracle checks included, ms.
    pub paused_with_checks_ms: f64,
    /// The oracle checks inside that pause.
    pub oracle_checks: OracleChecks,
    /// The downtime the engine expected when it stopped the guest, ms.
    pub expected_downtime_ms: Option<f64>,
    /// Bytes written to the connection.
    pub bytes_on_wire: u64,
    /// Pages by encoding.
    pub pages: PagesReport,
    /// Passes over RAM.
    pub iterations: usize,
    /// Each pass.
    pub iteration_details: Vec<PassReport>,
    /// Highest throttle, %.
    pub max_throttle_pct: u8,
    /// Device state sent, bytes.
    pub device_state_bytes: u64,
    /// Dirty tracker used.
    pub tracker: String,
    /// The storage-policy verdict, when the VM has disks (`storage_policy` in JSON: the
    /// report's `storage` is the storage copy's object).
    #[serde(rename = "storage_policy")]
    pub storage: Option<String>,
    /// Bytes on the wire over the total time, MB/s.
    pub throughput_mb_s: f64,
    /// Guest RAM over the total time, MB/s.
    pub ram_throughput_mb_s: f64,
}

impl DemoMigration {
    /// The figures from the source's report and the destination's check time.
    pub fn new(m: &MigrationReport, destination_check_ms: f64) -> DemoMigration {
        let checks = OracleChecks {
            source_hash_ms: m.source_hash_ms,
            destination_check_ms,
        };
        let downtime = (m.paused_with_checks_ms - checks.total_ms()).max(0.0);
        let per_ms = |bytes: u64| {
            if m.total_ms > 0.0 {
                bytes as f64 / m.total_ms / 1e3
            } else {
                0.0
            }
        };
        DemoMigration {
            total_ms: m.total_ms,
            downtime_ms: downtime,
            downtime_without_checks_ms: downtime,
            paused_with_checks_ms: m.paused_with_checks_ms,
            oracle_checks: checks,
            expected_downtime_ms: m.expected_downtime_ms,
            bytes_on_wire: m.bytes_on_wire,
            pages: m.pages,
            iterations: m.iterations,
            iteration_details: m.passes.clone(),
            max_throttle_pct: m.max_throttle_pct,
            device_state_bytes: m.device_state_bytes,
            tracker: m.tracker.clone(),
            storage: m.storage.clone(),
            throughput_mb_s: per_ms(m.bytes_on_wire),
            ram_throughput_mb_s: per_ms(m.mem_bytes),
        }
    }
}

/// The passes the guest printed on the destination's console after the switchover.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsoleSummary {
    /// `vcpu0 pass N` lines seen.
    pub vcpu0_pass_lines: usize,
    /// The first N.
    pub first_pass: Option<u64>,
    /// The last N.
    pub last_pass: Option<u64>,
}

/// The headline figures of a demo's post-copy, from both sides' reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DemoPostcopy {
    /// Why pre-copy handed over (a hybrid); none for a pure post-copy.
    pub switch_reason: Option<String>,
    /// From the commit to every page at the destination, ms (the source's timing).
    pub postcopy_ms: f64,
    /// Faults the destination read.
    pub faults: u64,
    /// Page requests it sent.
    pub requests: u64,
    /// Pages by origin at the destination (`requested`: by fault).
    pub pages: PagesByOriginReport,
    /// Fault latency p50, µs.
    pub fault_p50_us: f64,
    /// Fault latency p99, µs.
    pub fault_p99_us: f64,
    /// Largest fault latency, µs.
    pub fault_max_us: f64,
    /// vCPU blocktime summed over all faulting threads, ms.
    pub blocktime_total_ms: f64,
    /// Each vCPU's blocktime, ms.
    pub blocktime_vcpus_ms: Vec<f64>,
    /// Recoveries from broken connections, as the source timed them.
    pub recoveries: Vec<RecoveryReport>,
}

impl DemoPostcopy {
    /// The figures of `source`'s post-copy and `destination`'s fault path.
    pub fn new(source: &SourcePostcopyReport, destination: &PostcopyReport) -> DemoPostcopy {
        DemoPostcopy {
            switch_reason: source.switch_reason.clone(),
            postcopy_ms: source.postcopy_ms,
            faults: destination.faults,
            requests: destination.requests,
            pages: destination.pages,
            fault_p50_us: destination.fault_latency.p50_us,
            fault_p99_us: destination.fault_latency.p99_us,
            fault_max_us: destination.fault_latency.max_us,
            blocktime_total_ms: destination.blocktime.total_ms,
            blocktime_vcpus_ms: destination.blocktime.vcpus_ms.clone(),
            recoveries: source.recoveries.clone(),
        }
    }
}

/// The demo's disk (shared storage: one image both processes open): the headline of
/// the destination's disk checks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DemoDisk {
    /// The image.
    pub path: String,
    /// The demo created it (`--disk-size`), sparse, in its scratch directory.
    pub created: bool,
    /// The destination's disk oracle passed wherever it ran (at a pre-copy switchover,
    /// once every post-copy page arrived, after running), and the hash at a pre-copy
    /// switch equalled the source's.
    pub verified: bool,
    /// Working-set sectors the disk oracle checked at the end, on the destination.
    pub sectors_checked: u64,
    /// Bytes outside the working set found there as they started (zero, or the
    /// `--disk-prefill` pattern).
    #[serde(default)]
    pub untouched_bytes_checked: u64,
    /// The destination's image hash equalled the source's at the switch; none where
    /// there was no check at the switch (post-copy, --no-hash-check).
    pub hash_at_switch_equal: Option<bool>,
    /// Sectors the guest wrote on the destination.
    pub sectors_written_on_destination: u64,
}

/// The demo's storage copy (`--copy-storage-all`/`-inc`): the mirror's headline, summed
/// over the disks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DemoStorage {
    /// `"all"` or `"inc"`.
    pub kind: String,
    /// Bytes sent as data.
    pub bytes_copied: u64,
    /// Bytes skipped as holes of the source.
    pub bytes_skipped: u64,
    /// Bytes sent as zeroes.
    pub bytes_zeroed: u64,
    /// Bytes copied again after guest writes.
    pub bytes_recopied: u64,
    /// From the prepare request to the mirror in sync, ms.
    pub mirror_ms: f64,
    /// Completing the mirror inside the guest's pause, ms.
    pub complete_ms: f64,
    /// Automatic switches to write-blocking.
    pub mode_switches: u32,
    /// NBD reconnections.
    pub reconnects: u32,
    /// The destination's copy of the disk passed its checks (the disk oracle, the hash
    /// at a pre-copy switch).
    pub disk_verified: bool,
}

impl DemoStorage {
    /// From the source's report; `disk_verified` from the destination's checks.
    pub fn new(r: &StorageCopyReport, disk_verified: bool) -> DemoStorage {
        let mut s = DemoStorage {
            kind: r.kind.clone(),
            mirror_ms: r.mirror_ms,
            complete_ms: r.complete_ms,
            disk_verified,
            ..DemoStorage::default()
        };
        for d in &r.disks {
            s.bytes_copied += d.bytes_copied;
            // Holes of a copy onto a target that reads as zeroes are not sent at all.
            s.bytes_skipped += d.bytes_holes.saturating_sub(d.bytes_zeroed);
            s.bytes_zeroed += d.bytes_zeroed;
            s.bytes_recopied += d.bytes_recopied;
            s.mode_switches += d.mode_switches;
            s.reconnects += d.reconnects;
        }
        s
    }
}

/// What `vmm-demo demo` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DemoReport {
    /// How the guest moved (`"precopy"`, `"postcopy"`, `"hybrid"`); what was asked for
    /// when the migration failed.
    pub mode: MigrationMode,
    /// Which vCPUs ran the guest, once known.
    pub guest: Option<GuestKind>,
    /// Transport between the two processes.
    pub transport: TransportKind,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Working set, bytes.
    pub working_set_bytes: u64,
    /// Initial content of the rest of RAM.
    pub fill: Fill,
    /// Order of each vCPU's walk over its share (sequential in reports from before
    /// scattered walks).
    #[serde(default)]
    pub order: Order,
    /// The downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// The migration's figures, when it completed.
    #[serde(flatten)]
    pub migration: Option<DemoMigration>,
    /// The destination verified the guest (at switchover unless `--no-hash-check`, and
    /// after running it) and the source reported it migrated.
    pub verified: bool,
    /// What went wrong, with its causes.
    pub error: Option<String>,
    /// The phase a failed migration failed in, as the source names it (`storage-mirror`,
    /// `bulk-copy`, `postcopy-switch`, ...); none when it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<String>,
    /// The source's exit status.
    pub source_exit: Option<String>,
    /// The destination's exit status.
    pub destination_exit: Option<String>,
    /// The source's own report (`run --json`).
    pub source: Option<RunReport>,
    /// The destination's own report (`destination --json`).
    pub destination: Option<DestinationReport>,
    /// What the guest printed on the destination.
    pub destination_console: ConsoleSummary,
    /// The post-copy's headline figures, when the guest moved by post-copy.
    #[serde(default)]
    pub postcopy: Option<DemoPostcopy>,
    /// The guest's disk, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DemoDisk>,
    /// The storage copy, when the disks were copied rather than shared.
    #[serde(default)]
    pub storage: Option<DemoStorage>,
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} migration of a {} guest, {} MiB RAM, {} walk, over {}",
            self.mode,
            self.guest.map_or("?", GuestKind::as_str),
            self.mem_bytes >> 20,
            self.order,
            match self.transport {
                TransportKind::Tcp => "tcp",
                TransportKind::Unix => "unix",
            }
        )?;
        let Some(m) = self.migration.as_ref().filter(|_| self.error.is_none()) else {
            match &self.failed_phase {
                Some(phase) => writeln!(
                    f,
                    "FAILED in {phase}: {}",
                    self.error.as_deref().unwrap_or("?")
                )?,
                None => writeln!(f, "FAILED: {}", self.error.as_deref().unwrap_or("?"))?,
            }
            return match self.source.as_ref() {
                Some(s) => match &s.status {
                    RunState::Paused { reason } => write!(
                        f,
                        "the guest is PAUSED on the source, not running: {reason}"
                    ),
                    RunState::Lost { reason } => write!(f, "the guest is LOST: {reason}"),
                    _ if self
                        .destination
                        .as_ref()
                        .is_some_and(|d| d.paused_after_commit) =>
                    {
                        write!(
                            f,
                            "the guest is PAUSED on the destination, incomplete: the source was lost after the post-copy commit"
                        )
                    }
                    _ => write!(
                        f,
                        "the guest stayed on the source; source verified: {}",
                        s.verified
                    ),
                },
                None => write!(f, "the source's report is missing"),
            };
        };
        writeln!(
            f,
            "downtime {:.1} ms (limit {} ms), total {:.0} ms, {:.1} MB on the wire, {:.0} MB/s",
            m.downtime_ms,
            self.downtime_limit_ms,
            m.total_ms,
            m.bytes_on_wire as f64 / 1e6,
            m.throughput_mb_s
        )?;
        writeln!(
            f,
            "oracle checks, apart from the downtime: source hash {:.1} ms, destination check {:.1} ms (guest paused {:.1} ms with them)",
            m.oracle_checks.source_hash_ms,
            m.oracle_checks.destination_check_ms,
            m.paused_with_checks_ms
        )?;
        writeln!(
            f,
            "pages: {} zero, {} raw, {} zstd, {} delta; {} passes; max throttle {} %",
            m.pages.zero,
            m.pages.raw,
            m.pages.zstd,
            m.pages.delta,
            m.iterations,
            m.max_throttle_pct
        )?;
        if let Some(p) = &self.postcopy {
            writeln!(
                f,
                "post-copy {:.0} ms{}: {} faults, {} requests; pages {} by fault, {} pushed, {} pre-copied; fault latency p50 {:.0} us, p99 {:.0} us, max {:.0} us; blocktime {:.1} ms (per vCPU {:?}); {} recoveries",
                p.postcopy_ms,
                p.switch_reason
                    .as_deref()
                    .map(|r| format!(" (switched: {r})"))
                    .unwrap_or_default(),
                p.faults,
                p.requests,
                p.pages.requested,
                p.pages.pushed,
                p.pages.precopied,
                p.fault_p50_us,
                p.fault_p99_us,
                p.fault_max_us,
                p.blocktime_total_ms,
                p.blocktime_vcpus_ms
                    .iter()
                    .map(|m| format!("{m:.1}"))
                    .collect::<Vec<_>>(),
                p.recoveries.len()
            )?;
        }
        if let Some(k) = &self.disk {
            writeln!(
                f,
                "disk {} ({}): verified {}, {} working-set sectors and {} bytes outside them checked on the destination, {} sectors written there; hash at the switch: {}",
                k.path,
                if self.storage.is_some() {
                    "copied"
                } else {
                    "shared"
                },
                k.verified,
                k.sectors_checked,
                k.untouched_bytes_checked,
                k.sectors_written_on_destination,
                match k.hash_at_switch_equal {
                    Some(true) => "equal to the source's",
                    Some(false) => "DIFFERENT from the source's",
                    None => "not compared",
                }
            )?;
        }
        if let Some(s) = &self.storage {
            writeln!(
                f,
                "storage copy ({}): in sync after {:.0} ms, completed in the pause in {:.1} ms; {} bytes copied, {} skipped as holes, {} zeroed, {} copied again after guest writes; {} switches to write-blocking, {} reconnects; the destination's disk verified: {}",
                s.kind,
                s.mirror_ms,
                s.complete_ms,
                s.bytes_copied,
                s.bytes_skipped,
                s.bytes_zeroed,
                s.bytes_recopied,
                s.mode_switches,
                s.reconnects,
                s.disk_verified
            )?;
        }
        let d = self.destination.as_ref();
        if self.postcopy.is_some() {
            return write!(
                f,
                "verified: {} (oracle once every page was there, {:.1} ms, and after running on: passes {:?} -> {:?})",
                self.verified,
                d.and_then(|d| d.postcopy.as_ref())
                    .map_or(0.0, |p| p.check_ms),
                d.map(|d| &d.passes_at_switchover[..]).unwrap_or_default(),
                d.map(|d| &d.passes_at_end[..]).unwrap_or_default()
            );
        }
        write!(
            f,
            "verified: {} (oracle{} at switchover, guest ran on: passes {:?} -> {:?})",
            self.verified,
            if d.is_some_and(|d| d.hash_checked) {
                " and RAM hash"
            } else {
                ""
            },
            d.map(|d| &d.passes_at_switchover[..]).unwrap_or_default(),
            d.map(|d| &d.passes_at_end[..]).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration() -> MigrationReport {
        MigrationReport {
            mode: MigrationMode::Precopy,
            guest: GuestKind::Kvm,
            tracker: "kvm-dirty-log".into(),
            mem_bytes: 64 << 20,
            to: "tcp:127.0.0.1:4444".into(),
            total_ms: 500.0,
            paused_with_checks_ms: 38.0,
            downtime_limit_ms: 300,
            expected_downtime_ms: Some(0.5),
            source_hash_ms: 20.0,
            bytes_on_wire: 50_000_000,
            pages: PagesReport {
                zero: 1,
                raw: 2,
                zstd: 3,
                delta: 4,
            },
            iterations: 2,
            passes: vec![],
            max_throttle_pct: 0,
            device_state_bytes: 9000,
            storage: None,
            storage_copy: None,
            postcopy: None,
        }
    }

    #[test]
    fn the_demo_headline_is_the_engines_pause_and_checks_are_apart() {
        let d = DemoMigration::new(&migration(), 17.0);
        assert!((d.downtime_ms - 1.0).abs() < 1e-9, "{d:?}");
        assert_eq!(d.downtime_without_checks_ms, d.downtime_ms);
        assert_eq!(d.paused_with_checks_ms, 38.0);
        assert_eq!(d.oracle_checks.total_ms(), 37.0);
        assert!((d.throughput_mb_s - 100.0).abs() < 1e-9);
        let report = DemoReport {
            mode: MigrationMode::Precopy,
            guest: Some(GuestKind::Kvm),
            transport: TransportKind::Tcp,
            mem_bytes: 64 << 20,
            vcpus: 1,
            working_set_bytes: 1 << 20,
            fill: Fill::Random,
            order: Order::Scattered,
            downtime_limit_ms: 300,
            migration: Some(d),
            verified: true,
            error: None,
            failed_phase: None,
            source_exit: None,
            destination_exit: None,
            source: None,
            destination: None,
            destination_console: ConsoleSummary::default(),
            postcopy: None,
            disk: None,
            storage: None,
        };
        let text = report.to_string();
        let second = text.lines().nth(1).unwrap();
        assert!(
            second.starts_with("downtime 1.0 ms (limit 300 ms)"),
            "{text}"
        );
        assert!(
            text.contains("source hash 20.0 ms, destination check 17.0 ms"),
            "{text}"
        );
        let j = serde_json::to_value(&report).unwrap();
        assert_eq!(j["downtime_ms"], 1.0);
        assert_eq!(j["oracle_checks"]["source_hash_ms"], 20.0);
        assert_eq!(j["oracle_checks"]["destination_check_ms"], 17.0);
        assert_eq!(j["iteration_details"], serde_json::json!([]));
        let back: DemoReport = serde_json::from_value(j).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn a_failed_demo_reads_back_without_migration_figures() {
        let report = DemoReport {
            mode: MigrationMode::Precopy,
            guest: None,
            transport: TransportKind::Unix,
            mem_bytes: 1,
            vcpus: 1,
            working_set_bytes: 0,
            fill: Fill::Zero,
            order: Order::Sequential,
            downtime_limit_ms: 1,
            migration: None,
            verified: false,
            error: Some("refused".into()),
            failed_phase: Some("storage-policy".into()),
            source_exit: Some("exit status: 0".into()),
            destination_exit: None,
            source: None,
            destination: Some(DestinationReport::new(Placement::Write)),
            destination_console: ConsoleSummary::default(),
            postcopy: None,
            disk: None,
            storage: None,
        };
        let j = serde_json::to_string(&report).unwrap();
        let back: DemoReport = serde_json::from_str(&j).unwrap();
        assert_eq!(back, report);
        assert!(
            report
                .to_string()
                .contains("FAILED in storage-policy: refused"),
            "{report}"
        );
    }
}
