//! The destination side: accept one migration (pre-copy, pure post-copy or hybrid) into a
//! new [`Vm`], check it, and run it. The only module that uses `migration_precopy::Incoming`
//! and `migration_postcopy::destination`.
//!
//! The listener the first connection came on stays open for the whole migration: a
//! post-copy source opens its urgent channel through it at the switch, and dials it again
//! to recover from a broken connection.

use std::sync::Mutex;
use std::time::Duration;

use migration_core::geometry::GuestRam;
use migration_core::stream::DeviceState;
use migration_core::transport::{Listener, Stream};
use migration_core::vm::{VmControl, VmError, VmOp};
use migration_postcopy::destination as postcopy;
use migration_precopy::{DestinationError, DestinationOptions, Incoming, Placement, VerifyError};

use super::{MAX_ORACLE_BLOB, ORACLE_ID, ORACLE_VERSION, OracleBlob};
use crate::disk_oracle::DiskOracleError;
use crate::error::chain;
use crate::oracle::OracleError;
use crate::report::{MigrationMode, PagesReport};
use crate::vm::{MachineError, MachineInfo, Vm};

/// Why the destination's checks at the switchover refused the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchoverError {
    /// The oracle found RAM wrong, or could not read it.
    #[error("oracle at switchover")]
    Oracle(#[source] OracleError),
    /// The RAM hash could not be taken.
    #[error("hashing RAM at switchover")]
    Hash(#[source] OracleError),
    /// This RAM is not the source's.
    #[error("RAM hash {found:016x} differs from the source's {expected:016x} at switchover")]
    HashMismatch {
        /// This side's hash.
        found: u64,
        /// The source's.
        expected: u64,
    },
    /// The pass counters are not the source's.
    #[error("pass counters {found:?} differ from the source's {expected:?}")]
    PassesMismatch {
        /// This side's.
        found: Vec<u64>,
        /// The source's.
        expected: Vec<u64>,
    },
    /// The disk oracle found the image wrong, or could not read it.
    #[error("disk oracle at switchover")]
    DiskOracle(#[source] DiskOracleError),
    /// The disk's hash could not be taken.
    #[error("hashing the disk image at switchover")]
    DiskHash(#[source] DiskOracleError),
    /// The image this side opened does not hold what the source's did at its pause: not
    /// the same file, or the source's last writes are not in it.
    #[error(
        "disk hash {found:016x} differs from the source's {expected:016x} at switchover: this side's image is not the one the source paused on"
    )]
    DiskHashMismatch {
        /// This side's hash.
        found: u64,
        /// The source's.
        expected: u64,
    },
    /// One side has a disk and the other not.
    #[error("the source {} a disk hash, and this VM {} a disk", if *.source_sent { "sent" } else { "sent no" }, if *.source_sent { "has no" } else { "has" })]
    DiskMissing {
        /// Whether the source sent a disk hash.
        source_sent: bool,
    },
}

/// What the destination's disk check at a pre-copy switchover saw (it passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskAtSwitch {
    /// Working-set sectors the disk oracle checked.
    pub sectors_checked: u64,
    /// The image's hash here equals the source's.
    pub hash_equal: bool,
}

/// Why an incoming migration failed. The guest was not run here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The source's stream was refused or lost before its configuration arrived.
    #[error("accepting the migration")]
    Accept(#[source] DestinationError),
    /// The VMM blob in the configuration does not describe a VM.
    #[error("the source's VMM blob")]
    Machine(#[source] MachineError),
    /// A VM like the source's could not be built here.
    #[error("building the incoming VM")]
    Build(#[source] crate::vm::VmmError),
    /// The switchover checks refused the guest.
    #[error(transparent)]
    Switchover(SwitchoverError),
    /// The engine failed receiving.
    #[error("receiving the migration")]
    Engine(#[source] DestinationError),
    /// The post-copy engine failed: before its commit the guest was not run here; after
    /// it ([`paused_after_commit`](Self::paused_after_commit)) the guest ran here and is
    /// paused, with pages missing.
    #[error("receiving the migration by post-copy")]
    Postcopy(#[source] postcopy::DestinationError),
    /// The pre-copy engine ended in a way this build does not know.
    #[error("the migration ended with an outcome this build does not know: {0}")]
    UnknownOutcome(String),
}

impl ReceiveError {
    /// Whether the guest ran here and is now paused, incomplete: a post-copy failed after
    /// its commit (the source did not come back, or a page could not be placed).
    pub fn paused_after_commit(&self) -> bool {
        matches!(self, ReceiveError::Postcopy(e) if e.committed())
    }
}

/// How to receive.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveOptions {
    /// Give up when no byte arrives for this long.
    pub idle_timeout: Duration,
    /// How pages go into guest RAM not touched yet.
    pub placement: Placement,
    /// After a post-copy's commit, how long to wait for the source to come back after a
    /// broken connection (and for its urgent channel at the switch).
    pub recovery_window: Duration,
}

/// A migration whose configuration was read: the source's machine is known.
pub struct Accepted {
    incoming: Incoming,
    machine: MachineInfo,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// What a completed incoming migration saw.
#[derive(Debug, Clone)]
pub struct Received {
    /// Bytes received.
    pub bytes_received: u64,
    /// Pages applied, by encoding.
    pub pages: PagesReport,
    /// How pages went into untouched guest RAM.
    pub placement: Placement,
    /// From `Complete` to the guest resumed.
    pub switchover: Duration,
    /// The switchover checks (oracle and hash), inside the guest's pause.
    pub check_time: Duration,
    /// The source's oracle blob, when it sent one (with a hash: the RAM hash was
    /// checked).
    pub oracle: Option<OracleBlob>,
    /// The disk check at a pre-copy switchover, when the VM has a disk and the source sent
    /// its hash.
    pub disk_at_switch: Option<DiskAtSwitch>,
    /// How the guest came.
    pub mode: MigrationMode,
    /// The post-copy engine's report, when the guest came by post-copy.
    pub postcopy: Option<postcopy::DestinationReport>,
}

/// Reads the header and configuration of the migration on `stream`.
pub fn accept(stream: Stream, o: &ReceiveOptions) -> Result<Accepted, ReceiveError> {
    let incoming = Incoming::accept(
        stream,
        &DestinationOptions {
            idle_timeout: Some(o.idle_timeout),
            placement: o.placement,
            postcopy: true,
            ..DestinationOptions::default()
        },
    )
    .map_err(ReceiveError::Accept)?;
    match MachineInfo::from_bytes(&incoming.config().vmm) {
        Ok(machine) => Ok(Accepted { incoming, machine }),
        Err(e) => {
            let why = chain(&e);
            // The source learns why from the verdict; the error here keeps the cause.
            let _ = incoming.refuse(&format!("VMM blob: {why}"));
            Err(ReceiveError::Machine(e))
        }
    }
}

impl Accepted {
    /// The VM the source migrates.
    pub fn machine(&self) -> &MachineInfo {
        &self.machine
    }

    /// Refuses the migration because no VM could be built for it.
    pub fn refuse(self, e: crate::vm::VmmError) -> ReceiveError {
        let _ = self
            .incoming
            .refuse(&format!("building the VM: {}", chain(&e)));
        ReceiveError::Build(e)
    }

    /// Receives RAM and device state into `vm` (built from [`machine`](Self::machine),
    /// fresh) and runs it: a pre-copy is checked before the verdict and runs on the
    /// source's commit; a post-copy (pure or after pre-copy) runs on the commit too, and
    /// this returns once every page has arrived. `listener` is the one the migration came
    /// on: the post-copy source's further connections arrive there.
    pub fn receive(
        self,
        vm: &Vm,
        listener: &Listener,
        o: &ReceiveOptions,
    ) -> Result<Received, ReceiveError> {
        self.receive_with(vm, listener, o, &mut || Ok(()))
    }

    /// [`receive`](Self::receive), calling `before_load` once the source's device state
    /// arrived, before it is loaded (and before any check of the disk): where a storage
    /// copy stops its NBD exports.
    pub fn receive_with(
        self,
        vm: &Vm,
        listener: &Listener,
        o: &ReceiveOptions,
        before_load: &mut (dyn FnMut() -> Result<(), String> + Send),
    ) -> Result<Received, ReceiveError> {
        let mem = vm.memory().clone();
        let ram = GuestRam::with_layout(&*mem, vm.ram_layout().clone());
        let oracle = Mutex::new(None);
        let mut dvm = DestinationVm {
            vm,
            oracle: &oracle,
            before_load,
        };
        let mut disk_at_switch = None;
        let mut verify = |_: &[DeviceState]| {
            // The oracle blob was taken out by `load_device_state`, just before.
            let blob = oracle.lock().unwrap_or_else(|e| e.into_inner()).clone();
            disk_at_switch =
                check_switchover(vm, blob.as_ref()).map_err(|e| Box::new(e) as VerifyError)?;
            Ok(())
        };
        let r = self
            .incoming
            .receive_or_switch(&ram, &mut dvm, &mut verify, &mut |_| {});
        let switch = match r {
            Ok(migration_precopy::Received::Completed(stats)) => {
                return Ok(Received {
                    bytes_received: stats.bytes_received,
                    pages: stats.pages.into(),
                    placement: stats.placement,
                    switchover: stats.switchover,
                    check_time: stats.verify_time,
                    oracle: oracle.into_inner().unwrap_or_else(|e| e.into_inner()),
                    disk_at_switch,
                    mode: MigrationMode::Precopy,
                    postcopy: None,
                });
            }
            Ok(migration_precopy::Received::Postcopy(switch)) => switch,
            Ok(other) => return Err(ReceiveError::UnknownOutcome(format!("{other:?}"))),
            Err(DestinationError::Verify(e)) => {
                return Err(match e.downcast::<SwitchoverError>() {
                    Ok(s) => ReceiveError::Switchover(*s),
                    Err(e) => ReceiveError::Engine(DestinationError::Verify(e)),
                });
            }
            Err(e) => return Err(ReceiveError::Engine(e)),
        };
        // A pure post-copy switches right after the configuration, before any page.
        let pre = &switch.stream.stats;
        let mode = if pre.pages.total() == 0 && pre.iterations.is_empty() {
            MigrationMode::Postcopy
        } else {
            MigrationMode::Hybrid
        };
        let placement = pre.placement;
        tracing::info!(%mode, "the source switched to post-copy");
        let opts = postcopy::DestinationOptions {
            recovery_window: o.recovery_window,
            ..postcopy::DestinationOptions::default()
        };
        let mut accept = |t: Duration| listener.accept_timeout(t);
        let report = postcopy::receive(*switch, &mut accept, &ram, &mut dvm, &opts)
            .map_err(ReceiveError::Postcopy)?;
        Ok(Received {
            bytes_received: report.precopy.bytes_received,
            pages: report.precopy.pages.into(),
            placement,
            switchover: report.switchover,
            check_time: Duration::ZERO,
            oracle: oracle.into_inner().unwrap_or_else(|e| e.into_inner()),
            disk_at_switch: None,
            mode,
            postcopy: Some(report),
        })
    }
}

/// The destination VM as the engine drives it: every blob but the oracle's goes to the VM;
/// the oracle blob is parsed (bounded, version checked) for the switchover check.
struct DestinationVm<'a> {
    vm: &'a Vm,
    oracle: &'a Mutex<Option<OracleBlob>>,
    /// Called before the device state is loaded: a storage copy's finish (the source
    /// completed its mirrors before its state left it).
    before_load: &'a mut (dyn FnMut() -> Result<(), String> + Send),
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
        (self.before_load)()
            .map_err(|e| VmError::new(VmOp::LoadState, e).for_device(super::storage::DISK_ID))?;
        let mut rest = Vec::with_capacity(states.len());
        for s in states {
            if s.id != ORACLE_ID {
                rest.push(s.clone());
                continue;
            }
            let err = |e: String| VmError::new(VmOp::LoadState, e).for_device(ORACLE_ID);
            if s.version != ORACLE_VERSION {
                return Err(err(format!(
                    "version {} is not the supported {ORACLE_VERSION}",
                    s.version
                )));
            }
            if s.data.len() > MAX_ORACLE_BLOB {
                return Err(err(format!(
                    "{} bytes, more than the {MAX_ORACLE_BLOB} an oracle blob may have",
                    s.data.len()
                )));
            }
            let b: OracleBlob = serde_json::from_slice(&s.data)
                .map_err(|e| VmError::new(VmOp::LoadState, e).for_device(ORACLE_ID))?;
            *self.oracle.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        }
        self.vm.handle().load_device_state(&rest)
    }
}

/// The destination's checks before it runs the guest: the oracle on RAM, and, when the
/// source sent its oracle blob, the RAM hash and pass counters against the source's; with
/// a disk, the disk oracle on the image and its hash against the source's. Returns what
/// the disk check saw, when there was one.
fn check_switchover(
    vm: &Vm,
    source: Option<&OracleBlob>,
) -> Result<Option<DiskAtSwitch>, SwitchoverError> {
    let Some((b, expected)) = source.and_then(|b| b.ram_hash.map(|h| (b, h))) else {
        // The source asked for no switchover check (--no-hash-check): the oracle runs
        // after the guest ran here instead.
        tracing::info!("no oracle blob from the source: no check at switchover");
        return Ok(None);
    };
    let report = vm.check().map_err(SwitchoverError::Oracle)?;
    tracing::debug!(?report, "oracle at switchover");
    let found = vm.ram_hash().map_err(SwitchoverError::Hash)?;
    if found != expected {
        return Err(SwitchoverError::HashMismatch { found, expected });
    }
    let passes = vm.passes();
    if passes != b.passes {
        return Err(SwitchoverError::PassesMismatch {
            found: passes,
            expected: b.passes.clone(),
        });
    }
    // The disk: the image was opened at build time and nothing here has written it (the
    // device takes no request before the guest resumes here).
    let disk = match (vm.check_disk(Some(&report)), b.disk_hash) {
        (None, None) => return Ok(None),
        (None, Some(_)) => return Err(SwitchoverError::DiskMissing { source_sent: true }),
        (Some(_), None) => return Err(SwitchoverError::DiskMissing { source_sent: false }),
        (Some(checked), Some(expected)) => {
            let checked = checked.map_err(SwitchoverError::DiskOracle)?;
            let found = vm
                .disk_hash()
                .transpose()
                .map_err(SwitchoverError::DiskHash)?
                .unwrap_or_default();
            if found != expected {
                return Err(SwitchoverError::DiskHashMismatch { found, expected });
            }
            DiskAtSwitch {
                sectors_checked: checked.sectors_checked,
                hash_equal: true,
            }
        }
    };
    Ok(Some(disk))
}
