//! Live migration of the demo VM: the pre-copy engine wired to [`Vm`], with the oracle at
//! switchover, the storage-policy check, and the reports.
//!
//! The source adds one device-state blob of its own, `oracle` (version 1): the hash of all
//! guest RAM and the pass counters, taken while the guest is paused for the switchover.
//! The destination loads every other blob into its VM, then, before it tells the source it
//! runs the guest, checks its RAM with the oracle (every page holds pass N or N+1) and
//! compares its own RAM hash with the source's. A mismatch is a `Failed` verdict: the
//! source resumes and the destination never runs the guest.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use migration_core::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, UffdWpConfig, UffdWpTracker,
};
use migration_core::geometry::GuestRam;
use migration_core::stats::{MigrationStats, PageCounts, ProgressEvent};
use migration_core::stream::DeviceState;
use migration_core::transport::{self, Address};
use migration_core::vm::{VmControl, VmError, VmOp};
use migration_precopy::{CancelToken, LimitPolicy, SourceOptions, SourceOutcome};
use migration_storage_policy::{CacheMode, DiskSpec, Plan};
use serde::{Deserialize, Serialize};

use crate::cli::{parse_duration, parse_size};
use crate::oracle;
use crate::vm::{GuestKind, Vm, VmHandle};

/// Id of the blob that carries the source's RAM hash at switchover.
pub const ORACLE_ID: &str = "oracle";

fn parse_ms(s: &str) -> Result<u64, String> {
    parse_duration(s).map(|d| d.as_millis() as u64)
}

/// How to migrate: the options a QEMU user would expect, with the same defaults.
#[derive(Debug, Clone, Args, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MigrateOptions {
    /// Longest acceptable pause of the guest (e.g. 300ms).
    #[arg(long = "downtime-limit", value_parser = parse_ms, default_value = "300ms")]
    pub downtime_limit_ms: u64,
    /// Cap on the migration stream, bytes per second (K, M, G suffixes). Default: none.
    #[arg(long, value_parser = parse_size)]
    pub bandwidth: Option<u64>,
    /// Compress pages with zstd at this level (1 when given without a value).
    #[arg(long, num_args = 0..=1, default_missing_value = "1")]
    pub zstd: Option<i32>,
    /// Send re-sent pages as deltas against a cache of their previous copies, of this size.
    #[arg(long, value_parser = parse_size)]
    pub delta_cache: Option<u64>,
    /// Throttle the vCPUs when the guest dirties memory faster than the link carries it.
    #[arg(long)]
    pub auto_converge: bool,
    /// Give up after this many passes over dirty pages.
    #[arg(long)]
    pub max_iterations: Option<u32>,
    /// Give up after this long iterating (e.g. 10s).
    #[arg(long = "max-time", value_parser = parse_ms)]
    pub max_time_ms: Option<u64>,
    /// Migrate even if the storage-policy check finds the disk setup unsafe.
    #[arg(long = "unsafe")]
    pub unsafe_storage: bool,
    /// No oracle check at switchover: the source sends no RAM hash and the destination
    /// checks the guest only after it ran (keeps both checks out of the downtime).
    #[arg(long)]
    pub no_hash_check: bool,
    /// Diagnostics: cancel the migration as soon as it enters this phase (setup,
    /// bulk-copy, iterating, stop-and-copy, awaiting-verdict).
    #[arg(long, hide = true)]
    pub cancel_at: Option<String>,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime_limit_ms: 300,
            bandwidth: None,
            zstd: None,
            delta_cache: None,
            auto_converge: false,
            max_iterations: None,
            max_time_ms: None,
            unsafe_storage: false,
            no_hash_check: false,
            cancel_at: None,
        }
    }
}

/// A disk the VM is given (described for the storage-policy check; the demo guest does not
/// do disk I/O in this build).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskArg {
    /// Image path or URI.
    pub path: String,
    /// Cache mode, QEMU's names; QEMU's default (writeback) when absent.
    pub cache: Option<String>,
}

/// The storage-policy verdict on the VM's disks. No disk: an empty, safe plan.
pub fn check_storage(disks: &[DiskArg], allow_unsafe: bool) -> Result<Option<String>, String> {
    if disks.is_empty() {
        return Ok(None);
    }
    let mut plan = Plan::default();
    for (i, d) in disks.iter().enumerate() {
        let mut spec = DiskSpec::named(format!("disk{i}"));
        spec.path = Some(d.path.clone());
        if let Some(c) = &d.cache {
            spec.cache = Some(
                c.parse::<CacheMode>()
                    .map_err(|e| format!("disk {}: cache mode {c:?}: {e}", d.path))?,
            );
        }
        plan.disks.push(spec);
    }
    let report = migration_storage_policy::check_plan(&plan)
        .map_err(|e| format!("storage-policy check: {e}"))?;
    let summary = format!("storage policy: {}", report.verdict.as_str());
    if report.is_safe() {
        Ok(Some(summary))
    } else if allow_unsafe {
        tracing::warn!(
            "migrating despite an unsafe disk setup (--unsafe): {}",
            report.summary()
        );
        Ok(Some(format!(
            "{summary} (overridden by --unsafe): {}",
            report.summary()
        )))
    } else {
        Err(format!(
            "refusing to migrate: the disk setup is unsafe for live migration ({}); pass --unsafe to migrate anyway",
            report.summary()
        ))
    }
}

/// The oracle blob: the source's RAM hash and pass counters at switchover.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OracleBlob {
    /// XXH3 of all guest RAM, paused.
    pub ram_hash: u64,
    /// Each vCPU's pass counter.
    pub passes: Vec<u64>,
}

/// The source VM as the engine drives it: the VM's own state plus the oracle blob.
struct SourceVm {
    vm: VmHandle,
    send_hash: bool,
    hash_ms: f64,
}

impl VmControl for SourceVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume()
    }
    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.vm.set_throttle(percent)
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        let mut states = self.vm.save_device_state()?;
        if self.send_hash {
            let t = Instant::now();
            let ram_hash = self
                .vm
                .ram_hash()
                .map_err(|e| VmError::new(VmOp::SaveState, e.to_string()).for_device(ORACLE_ID))?;
            self.hash_ms = t.elapsed().as_secs_f64() * 1e3;
            let blob = OracleBlob {
                ram_hash,
                passes: self.vm.passes(),
            };
            states.push(DeviceState::new(
                ORACLE_ID,
                1,
                serde_json::to_vec(&blob).unwrap_or_default(),
            ));
        }
        Ok(states)
    }
    fn load_device_state(&mut self, _: &[DeviceState]) -> Result<(), VmError> {
        Err(VmError::new(VmOp::LoadState, "this is the source"))
    }
}

/// Pages by encoding, for reports.
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

/// One pass, for reports.
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

/// What the source reports about a migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationReport {
    /// `"precopy"`.
    pub mode: String,
    /// `"kvm"` or `"software"`.
    pub guest: String,
    /// Dirty tracker used.
    pub tracker: String,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Where to.
    pub to: String,
    /// From connect to the verdict, ms.
    pub total_ms: f64,
    /// From the source's pause to the destination's `Running` verdict, ms.
    pub downtime_ms: f64,
    /// The downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// The downtime the engine expected when it stopped the guest, ms.
    pub expected_downtime_ms: f64,
    /// Time spent hashing RAM for the oracle, inside the downtime, ms.
    pub hash_ms: f64,
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
}

impl MigrationReport {
    fn new(
        vm: &VmHandle,
        to: &Address,
        tracker: &str,
        o: &MigrateOptions,
        s: &MigrationStats,
    ) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        MigrationReport {
            mode: "precopy".into(),
            guest: vm.kind().as_str().into(),
            tracker: tracker.into(),
            mem_bytes: vm.config().mem_bytes,
            to: to.to_string(),
            total_ms: ms(s.total_time),
            downtime_ms: ms(s.downtime),
            downtime_limit_ms: o.downtime_limit_ms,
            expected_downtime_ms: if s.expected_downtime == Duration::MAX {
                f64::INFINITY
            } else {
                ms(s.expected_downtime)
            },
            hash_ms: 0.0,
            bytes_on_wire: s.bytes_on_wire,
            pages: s.pages.into(),
            iterations: s.iterations.len(),
            passes: s
                .iterations
                .iter()
                .map(|i| PassReport {
                    iteration: i.iteration,
                    pages: i.pages.into(),
                    bytes: i.bytes_on_wire,
                    ms: ms(i.duration),
                    dirty_after: i.dirty_pages_after,
                    dirty_rate_bps: i.dirty_rate_bps,
                    bandwidth_bps: i.bandwidth_bps,
                    throttle_pct: i.throttle_pct,
                })
                .collect(),
            max_throttle_pct: s.max_throttle_pct,
            device_state_bytes: s.device_state_bytes,
            storage: None,
        }
    }
}

fn phase_named(s: &str) -> Result<migration_core::stats::Phase, String> {
    use migration_core::stats::Phase::*;
    [Setup, BulkCopy, Iterating, StopAndCopy, AwaitingVerdict]
        .into_iter()
        .find(|p| p.to_string() == s)
        .ok_or_else(|| format!("--cancel-at {s:?}: not a phase (setup, bulk-copy, iterating, stop-and-copy, awaiting-verdict)"))
}

/// Migrates the running VM `vm` to `to`. On success the VM is left paused (the destination
/// runs the guest); on failure it runs here again.
pub fn migrate_vm(
    vm: &VmHandle,
    disks: &[DiskArg],
    to: &Address,
    o: &MigrateOptions,
    cancel: &CancelToken,
    events: &mut dyn FnMut(&ProgressEvent),
) -> Result<MigrationReport, String> {
    let storage = check_storage(disks, o.unsafe_storage)?;
    let cancel_at = o.cancel_at.as_deref().map(phase_named).transpose()?;
    let layout = vm.ram_layout().clone();
    let tracker: Box<dyn DirtyTracker> = match vm.kind() {
        GuestKind::Kvm => {
            let fd = vm.vm_fd().ok_or("a KVM guest without a VM fd")?;
            let regions: Vec<kvm_bindings::kvm_userspace_memory_region> = vm
                .memory_slots()
                .iter()
                .map(|s| kvm_bindings::kvm_userspace_memory_region {
                    slot: s.slot,
                    flags: s.flags,
                    guest_phys_addr: s.guest_base,
                    memory_size: s.size,
                    userspace_addr: s.host_addr,
                })
                .collect();
            // SAFETY: the regions are exactly the slots the VM registered (memory_slots),
            // their host memory is mapped by `vm.memory()` for as long as the VM lives,
            // which outlives the tracker (dropped by the end of this function), and the demo
            // VMM never changes its slots.
            let t = unsafe { KvmDirtyLog::new(fd, &layout, &regions, KvmDirtyLogMode::Auto) }
                .map_err(|e| e.to_string())?;
            Box::new(t)
        }
        GuestKind::Software => Box::new(
            UffdWpTracker::for_memory(&**vm.memory(), &layout, UffdWpConfig::default())
                .map_err(|e| e.to_string())?,
        ),
    };
    let tracker_name = tracker.name().to_string();
    let stream = transport::connect_retry(to, Duration::from_secs(10))
        .map_err(|e| format!("connecting to the destination: {e}"))?;
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(o.downtime_limit_ms),
        max_bandwidth: o.bandwidth,
        zstd_level: o.zstd,
        delta_cache_bytes: o.delta_cache.map(|b| b as usize),
        auto_converge: o.auto_converge,
        max_iterations: o.max_iterations,
        max_time: o.max_time_ms.map(Duration::from_millis),
        limit_policy: LimitPolicy::Fail,
        vm_id: *uuid::Uuid::new_v4().as_bytes(),
        vmm_blob: Bytes::from(vm.machine_info().to_bytes()),
        ..SourceOptions::default()
    };
    let mut src = SourceVm {
        vm: vm.clone(),
        send_hash: !o.no_hash_check,
        hash_ms: 0.0,
    };
    let mem = vm.memory().clone();
    let ram = GuestRam::with_layout(&*mem, layout);
    let c = cancel.clone();
    let r = migration_precopy::migrate(&ram, &mut src, tracker, stream, &opts, cancel, &mut |e| {
        events(e);
        if let ProgressEvent::Phase(p) = e {
            if Some(*p) == cancel_at {
                c.cancel();
            }
        }
    });
    match r {
        Ok(SourceOutcome::Completed(stats)) => {
            let mut rep = MigrationReport::new(vm, to, &tracker_name, o, &stats);
            rep.storage = storage;
            rep.hash_ms = src.hash_ms;
            Ok(rep)
        }
        Ok(SourceOutcome::LimitReached(h)) => {
            let _ = h.channel.get_ref().shutdown(std::net::Shutdown::Both);
            Err(h.not_converged.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The destination VM as the engine drives it: every blob but the oracle's goes to the VM.
pub(crate) struct DestinationVm<'a> {
    pub(crate) vm: &'a Vm,
    pub(crate) oracle: Option<OracleBlob>,
}

impl VmControl for DestinationVm<'_> {
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm.handle().pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.handle().resume()
    }
    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError> {
        self.vm.handle().set_throttle(percent)
    }
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError> {
        self.vm.handle().save_device_state()
    }
    fn load_device_state(&mut self, states: &[DeviceState]) -> Result<(), VmError> {
        let mut rest = Vec::with_capacity(states.len());
        for s in states {
            if s.id == ORACLE_ID {
                if s.version != 1 {
                    return Err(
                        VmError::new(VmOp::LoadState, format!("version {}", s.version))
                            .for_device(ORACLE_ID),
                    );
                }
                let b: OracleBlob = serde_json::from_slice(&s.data).map_err(|e| {
                    VmError::new(VmOp::LoadState, e.to_string()).for_device(ORACLE_ID)
                })?;
                self.oracle = Some(b);
            } else {
                rest.push(s.clone());
            }
        }
        self.vm.handle().load_device_state(&rest)
    }
}

/// The destination's checks before it runs the guest: the oracle on RAM, and the RAM hash
/// against the source's. Returns what was checked.
pub(crate) fn verify_switchover(vm: &Vm, oracle_blob: Option<&OracleBlob>) -> Result<bool, String> {
    let report = oracle::check(vm.memory(), vm.workload()).map_err(|e| format!("oracle: {e}"))?;
    tracing::debug!(?report, "oracle at switchover");
    match oracle_blob {
        Some(b) => {
            let h = vm.ram_hash().map_err(|e| e.to_string())?;
            if h != b.ram_hash {
                return Err(format!(
                    "RAM hash {h:016x} differs from the source's {:016x} at switchover",
                    b.ram_hash
                ));
            }
            if vm.passes() != b.passes {
                return Err(format!(
                    "pass counters {:?} differ from the source's {:?}",
                    vm.passes(),
                    b.passes
                ));
            }
            Ok(true)
        }
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_disk_is_safe_and_an_unsafe_disk_is_refused_unless_overridden() {
        assert_eq!(check_storage(&[], false), Ok(None));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let d = [DiskArg {
            path: path.display().to_string(),
            cache: Some("writeback".into()),
        }];
        // A local image is not shared with any destination: unsafe without storage copy.
        let e = check_storage(&d, false).unwrap_err();
        assert!(
            e.contains("refusing to migrate") && e.contains("--unsafe"),
            "{e}"
        );
        assert!(e.contains("disk0"), "{e}");
        let ok = check_storage(&d, true).unwrap().unwrap();
        assert!(ok.contains("overridden by --unsafe"), "{ok}");
        let bad = [DiskArg {
            path: path.display().to_string(),
            cache: Some("sometimes".into()),
        }];
        assert!(check_storage(&bad, true).unwrap_err().contains("sometimes"));
    }

    #[test]
    fn options_round_trip_through_json_with_defaults() {
        let o: MigrateOptions = serde_json::from_str("{}").unwrap();
        assert_eq!(o, MigrateOptions::default());
        let o = MigrateOptions {
            bandwidth: Some(3 << 20),
            auto_converge: true,
            max_time_ms: Some(5000),
            ..MigrateOptions::default()
        };
        let j = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<MigrateOptions>(&j).unwrap(), o);
    }
}
