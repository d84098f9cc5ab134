//! The source side: migrate a running [`VmHandle`] with the pre-copy engine. The only
//! module that calls `migration_precopy::migrate`.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use migration_core::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, TrackerError, UffdWpConfig, UffdWpTracker,
};
use migration_core::geometry::GuestRam;
use migration_core::stats::{MigrationStats, ProgressEvent};
use migration_core::stream::DeviceState;
use migration_core::transport::{self, Address, AddressError};
use migration_core::vm::{VmControl, VmError, VmOp};
use migration_precopy::{LimitPolicy, SourceError, SourceOptions, SourceOutcome};

use super::{DiskArg, ORACLE_ID, ORACLE_VERSION, OracleBlob, StorageError, check_storage};
use crate::cli::MigrateOptions;
use crate::error::chain;
use crate::protocol::Event;
use crate::report::{MigrationMode, MigrationReport, PassReport};
use crate::vm::{GuestKind, VmHandle};

pub use migration_precopy::CancelToken;

/// Why a migration did not complete. Unless [`guest_left_paused`](Self::guest_left_paused)
/// says otherwise, the guest runs on the source again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The storage-policy check refused the disks.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The destination address does not parse.
    #[error("destination")]
    Address(#[source] AddressError),
    /// The KVM guest has no VM fd to track dirty pages with.
    #[error("a KVM guest without a VM fd: no dirty log")]
    NoVmFd,
    /// The dirty tracker could not be set up.
    #[error("setting up dirty tracking")]
    Tracker(#[source] TrackerError),
    /// No connection to the destination.
    #[error("connecting to the destination {to}")]
    Connect {
        /// Where.
        to: Address,
        /// Why.
        source: io::Error,
    },
    /// The engine failed (and resumed the guest, unless it says otherwise).
    #[error("migrating to {to}")]
    Engine {
        /// Where to.
        to: Address,
        /// What the engine says.
        source: Box<SourceError>,
    },
}

impl MigrateError {
    /// Why the guest is paused on the source after this failure, when it is: the
    /// migration failed and resuming the guest failed too. `None`: the guest runs here.
    pub fn guest_left_paused(&self) -> Option<String> {
        match self {
            MigrateError::Engine { source, .. } => match &**source {
                SourceError::ResumeFailed { error, resume } => Some(format!(
                    "the migration failed ({}) and resuming the guest failed: {}",
                    chain(&**error),
                    chain(resume)
                )),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The source VM as the engine drives it: the VM's own state plus the oracle blob.
struct SourceVm {
    vm: VmHandle,
    send_hash: bool,
    hash_time: Duration,
    refuse_resume: bool,
}

impl VmControl for SourceVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        if self.refuse_resume {
            return Err(VmError::new(
                VmOp::Resume,
                "refused by the refuse_resume diagnostics option",
            ));
        }
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
                .map_err(|e| VmError::new(VmOp::SaveState, e).for_device(ORACLE_ID))?;
            self.hash_time = t.elapsed();
            let blob = OracleBlob {
                ram_hash,
                passes: self.vm.passes(),
            };
            let data = serde_json::to_vec(&blob)
                .map_err(|e| VmError::new(VmOp::SaveState, e).for_device(ORACLE_ID))?;
            states.push(DeviceState::new(ORACLE_ID, ORACLE_VERSION, data));
        }
        Ok(states)
    }
    fn load_device_state(&mut self, _: &[DeviceState]) -> Result<(), VmError> {
        Err(VmError::new(VmOp::LoadState, "this is the source"))
    }
}

fn tracker_for(vm: &VmHandle) -> Result<Box<dyn DirtyTracker>, MigrateError> {
    let layout = vm.ram_layout();
    Ok(match vm.kind() {
        GuestKind::Kvm => {
            let fd = vm.vm_fd().ok_or(MigrateError::NoVmFd)?;
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
            // which outlives the tracker (dropped by the end of `migrate_vm`), and the demo
            // VMM never changes its slots.
            let t = unsafe { KvmDirtyLog::new(fd, layout, &regions, KvmDirtyLogMode::Auto) }
                .map_err(MigrateError::Tracker)?;
            Box::new(t)
        }
        GuestKind::Software => Box::new(
            UffdWpTracker::for_memory(&**vm.memory(), layout, UffdWpConfig::default())
                .map_err(MigrateError::Tracker)?,
        ),
    })
}

fn report(
    vm: &VmHandle,
    to: &Address,
    tracker: &str,
    o: &MigrateOptions,
    s: &MigrationStats,
) -> MigrationReport {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    MigrationReport {
        mode: MigrationMode::Precopy,
        guest: vm.kind(),
        tracker: tracker.into(),
        mem_bytes: vm.config().mem_bytes,
        to: to.to_string(),
        total_ms: ms(s.total_time),
        paused_with_checks_ms: ms(s.downtime),
        downtime_limit_ms: o.downtime_limit_ms,
        expected_downtime_ms: (s.expected_downtime != Duration::MAX)
            .then(|| ms(s.expected_downtime)),
        source_hash_ms: 0.0,
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

/// Migrates the running VM `vm` to `to`, passing the engine's events to `events`. On
/// success the VM is left paused (the destination runs the guest); on failure it runs here
/// again, unless [`MigrateError::guest_left_paused`] says otherwise.
pub fn migrate_vm(
    vm: &VmHandle,
    disks: &[DiskArg],
    to: &str,
    o: &MigrateOptions,
    cancel: &CancelToken,
    events: &mut dyn FnMut(&Event),
) -> Result<MigrationReport, MigrateError> {
    let to: Address = to.parse().map_err(MigrateError::Address)?;
    let storage = check_storage(disks, o.unsafe_storage)?;
    let tracker = tracker_for(vm)?;
    let tracker_name = tracker.name().to_string();
    let stream = transport::connect_retry(&to, Duration::from_secs(10)).map_err(|source| {
        MigrateError::Connect {
            to: to.clone(),
            source,
        }
    })?;
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(o.downtime_limit_ms),
        max_bandwidth: o.bandwidth,
        zstd_level: o.zstd,
        delta_cache_bytes: o
            .delta_cache
            .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
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
        hash_time: Duration::ZERO,
        refuse_resume: o.refuse_resume,
    };
    let mem = vm.memory().clone();
    let ram = GuestRam::with_layout(&*mem, vm.ram_layout().clone());
    let c = cancel.clone();
    let r = migration_precopy::migrate(&ram, &mut src, tracker, stream, &opts, cancel, &mut |e| {
        events(&Event::from(e));
        if let ProgressEvent::Phase(p) = e {
            if Some(*p) == o.cancel_at {
                c.cancel();
            }
        }
    });
    match r {
        Ok(SourceOutcome::Completed(stats)) => {
            let mut rep = report(vm, &to, &tracker_name, o, &stats);
            rep.storage = storage;
            rep.source_hash_ms = src.hash_time.as_secs_f64() * 1e3;
            Ok(rep)
        }
        // Not asked for (LimitPolicy::Fail), but handled as the failure it would be.
        Ok(SourceOutcome::LimitReached(h)) => {
            let _ = h.channel.get_ref().shutdown(std::net::Shutdown::Both);
            Err(MigrateError::Engine {
                to,
                source: Box::new(SourceError::NotConverged(h.not_converged)),
            })
        }
        Err(e) => Err(MigrateError::Engine {
            to,
            source: Box::new(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_resume_leaves_the_guest_paused() {
        let to: Address = "tcp:127.0.0.1:1".parse().unwrap();
        let cancelled = MigrateError::Engine {
            to: to.clone(),
            source: Box::new(SourceError::Cancelled {
                phase: migration_core::stats::Phase::StopAndCopy,
            }),
        };
        assert_eq!(cancelled.guest_left_paused(), None);
        let stuck = MigrateError::Engine {
            to,
            source: Box::new(SourceError::ResumeFailed {
                error: Box::new(SourceError::Cancelled {
                    phase: migration_core::stats::Phase::StopAndCopy,
                }),
                resume: VmError::new(VmOp::Resume, "vCPU gone"),
            }),
        };
        let why = stuck.guest_left_paused().unwrap();
        assert!(
            why.contains("cancelled during stop-and-copy") && why.contains("vCPU gone"),
            "{why}"
        );
    }
}
