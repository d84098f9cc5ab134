//! The source side: migrate a running [`VmHandle`] by pre-copy, post-copy or a hybrid of
//! the two. The only module that calls `migration_precopy::migrate` and
//! `migration_postcopy::source::migrate`.
//!
//! A [`MigrationControl`] is what the control socket holds of a running migration: it
//! cancels it (refused once a post-copy committed: the guest then runs on the destination,
//! and this side holds pages it lacks), switches a hybrid to post-copy on command, and
//! changes the address the source dials for the post-copy's urgent channel and to recover
//! from a broken connection.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use migration_core::dirty::{
    DirtyTracker, KvmDirtyLog, KvmDirtyLogMode, TrackerError, UffdWpConfig, UffdWpTracker,
    UnionTracker, VmmBitmapTracker,
};
use migration_core::geometry::GuestRam;
use migration_core::stats::{MigrationStats, Phase, ProgressEvent};
use migration_core::stream::DeviceState;
use migration_core::transport::{self, Address, AddressError, Stream};
use migration_core::vm::{VmControl, VmError, VmOp};
use migration_postcopy::source::{self as postcopy, Mode, Outcome, Switch};
use migration_precopy::{LimitPolicy, SourceError, SourceOptions, SourceOutcome};

use super::storage::{
    self, CopyError, DiskCopyReport, DiskRequest, MirrorSettings, PrepareReply, PrepareRequest,
    SourceDisk, StorageSource,
};
use super::{
    DiskArg, ORACLE_ID, ORACLE_VERSION, OracleBlob, StorageError, check_storage, same_host,
};
use crate::cli::{CopyStorage, MigrateOptions, PostcopyAfter};
use crate::error::chain;
use crate::protocol::Event;
use crate::report::StorageCopyReport;
use crate::report::{MigrationMode, MigrationReport, PassReport, SourcePostcopyReport};
use crate::virtio_blk::{WriteObserver, WriteObservers};
use crate::vm::{GuestKind, VmHandle};

pub use migration_precopy::CancelToken;

/// How long the source waits for the destination's readiness: its VM built, before a pure
/// post-copy pauses the guest; its `PostcopyReady` at a switch, before it resumes the
/// guest here.
pub const POSTCOPY_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a migration did not complete. Unless [`guest_left_paused`](Self::guest_left_paused)
/// or [`guest_lost`](Self::guest_lost) says otherwise, the guest runs on the source again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The storage-policy check refused the disks.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The destination address does not parse.
    #[error("destination")]
    Address(#[source] AddressError),
    /// The storage copy failed before the RAM migration (the guest runs here on its disk;
    /// the destination deletes what it created).
    #[error("copying the disks")]
    Copy(#[source] CopyError),
    /// The options contradict each other.
    #[error("{0}")]
    Options(String),
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
    /// The pre-copy engine failed (and resumed the guest, unless it says otherwise).
    #[error("migrating to {to}")]
    Engine {
        /// Where to.
        to: Address,
        /// What the engine says.
        source: Box<SourceError>,
    },
    /// The post-copy engine ended in a way this build does not know (its outcome is
    /// non-exhaustive): where the guest is cannot be said.
    #[error("the post-copy engine ended with an outcome this build does not know: {0}")]
    UnknownOutcome(String),
    /// The post-copy engine failed: before its commit the guest runs here again (unless
    /// resuming it failed); after it, the guest is lost.
    #[error("migrating to {to} by post-copy")]
    Postcopy {
        /// Where to (the address first dialled).
        to: Address,
        /// What the engine says.
        source: Box<postcopy::SourceError>,
    },
}

/// The device id under which the storage copy's completion fails in the pause.
const STORAGE_DEVICE: &str = storage::DISK_ID;

impl MigrateError {
    /// The phase the migration failed in, as the reports name it: `storage-policy`,
    /// `setup` (options, tracker, connection), `storage-prepare` (the destination's images
    /// and exports), `storage-mirror` (the disks catching up), a RAM migration phase
    /// (`bulk-copy`, `iterating`, `stop-and-copy`, `awaiting-verdict`), `storage-complete`
    /// (the mirror completing in the pause), `postcopy-switch` (before the commit) or
    /// `postcopy` (after it).
    pub fn failed_phase(&self) -> String {
        fn precopy(e: &SourceError) -> String {
            match e {
                SourceError::Connection { phase, .. }
                | SourceError::ReturnPath { phase, .. }
                | SourceError::Protocol { phase, .. }
                | SourceError::Cancelled { phase } => phase.to_string(),
                SourceError::NotConverged(_) => Phase::Iterating.to_string(),
                SourceError::DestinationFailed { .. } | SourceError::VerdictTimeout(_) => {
                    Phase::AwaitingVerdict.to_string()
                }
                SourceError::Vm(v) => vm(v),
                SourceError::ResumeFailed { error, .. }
                | SourceError::ThrottleNotLifted { error, .. } => precopy(error),
                SourceError::Setup(_) | SourceError::Encoder(_) => Phase::Setup.to_string(),
                _ => "ram-migration".into(),
            }
        }
        fn vm(v: &VmError) -> String {
            match (v.op, v.device.as_deref()) {
                (VmOp::SaveState, Some(STORAGE_DEVICE)) => "storage-complete".into(),
                (VmOp::Pause | VmOp::SaveState, _) => Phase::StopAndCopy.to_string(),
                _ => "ram-migration".into(),
            }
        }
        match self {
            MigrateError::Storage(_) => "storage-policy".into(),
            MigrateError::Address(_)
            | MigrateError::Options(_)
            | MigrateError::NoVmFd
            | MigrateError::Tracker(_)
            | MigrateError::Connect { .. } => Phase::Setup.to_string(),
            MigrateError::Copy(CopyError::Mirror { .. } | CopyError::Cancelled) => {
                Phase::StorageMirror.to_string()
            }
            MigrateError::Copy(_) => "storage-prepare".into(),
            MigrateError::Engine { source, .. } => precopy(source),
            MigrateError::Postcopy { source, .. } => match &**source {
                postcopy::SourceError::Precopy(e) => precopy(e),
                postcopy::SourceError::Vm(v) if v.device.as_deref() == Some(STORAGE_DEVICE) => {
                    vm(v)
                }
                postcopy::SourceError::DestinationLost { .. } => Phase::Postcopy.to_string(),
                _ => "postcopy-switch".into(),
            },
            MigrateError::UnknownOutcome(_) => Phase::Postcopy.to_string(),
        }
    }

    /// Why the guest is paused on the source after this failure, when it is: the
    /// migration failed and resuming the guest failed too. `None`: the guest runs here,
    /// or is lost ([`guest_lost`](Self::guest_lost)).
    pub fn guest_left_paused(&self) -> Option<String> {
        let precopy = |e: &SourceError| match e {
            SourceError::ResumeFailed { error, resume } => Some(format!(
                "the migration failed ({}) and resuming the guest failed: {}",
                chain(&**error),
                chain(resume)
            )),
            _ => None,
        };
        match self {
            MigrateError::Engine { source, .. } => precopy(source),
            MigrateError::Postcopy { source, .. } => match &**source {
                postcopy::SourceError::Precopy(e) => precopy(e),
                postcopy::SourceError::Switch {
                    why,
                    resume: Some(resume),
                } => Some(format!(
                    "the switch to post-copy failed ({why}) and resuming the guest failed: {}",
                    chain(resume)
                )),
                // The engine does not say whether the guest was resumed after the VMM
                // refused an operation: do not claim it runs.
                postcopy::SourceError::Vm(e) => Some(format!(
                    "the VMM refused an operation of the switch to post-copy: {}",
                    chain(e)
                )),
                _ => None,
            },
            MigrateError::UnknownOutcome(o) => Some(format!(
                "the migration ended with an outcome this build does not know ({o}): the guest is not resumed"
            )),
            _ => None,
        }
    }

    /// Why the guest is lost, when it is: a post-copy committed and the destination could
    /// not be reached again. This side's copy is stale and must not be resumed.
    pub fn guest_lost(&self) -> Option<String> {
        match self {
            // The engine's message says why the stale copy is not resumed.
            MigrateError::Postcopy { source, .. } if source.guest_lost() => {
                Some(format!("{}; it stays paused", chain(&**source)))
            }
            _ => None,
        }
    }
}

/// Why the control socket's request on a running migration is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlRefused {
    /// Cancel after the post-copy commit.
    #[error(
        "cannot cancel: the post-copy has committed, so the guest runs on the destination and only this side has the pages it still lacks; cancelling now would lose the guest"
    )]
    Committed,
    /// A switch asked of a migration that does not allow post-copy.
    #[error(
        "this migration is pre-copy only: migrate with --postcopy-after (hybrid) to allow a switch to post-copy"
    )]
    NoPostcopy,
    /// A switch asked of a migration that is in post-copy already.
    #[error("the migration is in post-copy already")]
    AlreadyPostcopy,
    /// A recovery address for a migration that never recovers.
    #[error("this migration is pre-copy only: it has no post-copy to recover")]
    NoRecovery,
    /// The recovery address does not parse.
    #[error("{uri:?} is not an address (tcp:HOST:PORT or unix:PATH)")]
    Address {
        /// What was given.
        uri: String,
        /// Why it does not parse.
        source: AddressError,
    },
}

/// What the control socket holds of a running migration (see the [module docs](self)).
#[derive(Debug)]
pub struct MigrationControl {
    cancel: CancelToken,
    mode: MigrationMode,
    state: Mutex<ControlState>,
    /// Where the source dials from now on.
    address: Mutex<Address>,
    /// The post-copy engine dialled its urgent channel: the switch is under way (it opens
    /// the channel before it pauses the guest), so the device state saved next is the
    /// switch's.
    switching: AtomicBool,
}

#[derive(Debug)]
struct ControlState {
    phase: Phase,
    committed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigrationControl {
    /// The control of a migration to `to` with options `o`, checked: a pure post-copy
    /// takes none of pre-copy's options, and cannot also be a hybrid.
    pub fn new(to: &str, o: &MigrateOptions) -> Result<MigrationControl, MigrateError> {
        let to: Address = to.parse().map_err(MigrateError::Address)?;
        let mode = requested_mode(o)?;
        Ok(MigrationControl {
            cancel: CancelToken::new(),
            mode,
            state: Mutex::new(ControlState {
                phase: Phase::Setup,
                committed: false,
            }),
            address: Mutex::new(to),
            switching: AtomicBool::new(false),
        })
    }

    /// How the migration was asked to move the guest.
    pub fn mode(&self) -> MigrationMode {
        self.mode
    }

    /// The phase the migration is in.
    pub fn phase(&self) -> Phase {
        lock(&self.state).phase
    }

    /// Whether a post-copy committed: the guest runs on the destination.
    pub fn committed(&self) -> bool {
        lock(&self.state).committed
    }

    /// The address the source dials now.
    pub fn address(&self) -> Address {
        lock(&self.address).clone()
    }

    /// Cancels the migration: before a post-copy's commit the guest resumes here; after
    /// it, refused. A cancel that arrives while the commit is being written is too late:
    /// the engine no longer looks at it, and the migration goes on.
    pub fn cancel(&self) -> Result<(), ControlRefused> {
        let st = lock(&self.state);
        if st.committed {
            return Err(ControlRefused::Committed);
        }
        self.cancel.cancel();
        Ok(())
    }

    /// Switches a hybrid to post-copy at pre-copy's next decision (QEMU's
    /// `migrate_start_postcopy`).
    pub fn start_postcopy(&self) -> Result<(), ControlRefused> {
        match self.mode {
            MigrationMode::Precopy => return Err(ControlRefused::NoPostcopy),
            MigrationMode::Postcopy => return Err(ControlRefused::AlreadyPostcopy),
            MigrationMode::Hybrid => {}
        }
        let st = lock(&self.state);
        if st.committed || self.switching.load(Ordering::SeqCst) {
            return Err(ControlRefused::AlreadyPostcopy);
        }
        self.cancel.request_handover();
        Ok(())
    }

    /// Dials `uri` from now on: for the post-copy's urgent channel, and for every attempt
    /// to recover from a broken connection (the one under way included, from its next
    /// try).
    pub fn recover_at(&self, uri: &str) -> Result<(), ControlRefused> {
        if self.mode == MigrationMode::Precopy {
            return Err(ControlRefused::NoRecovery);
        }
        let a: Address = uri.parse().map_err(|source| ControlRefused::Address {
            uri: uri.into(),
            source,
        })?;
        tracing::info!(address = %a, "post-copy: dialling a new address from now on");
        *lock(&self.address) = a;
        Ok(())
    }

    fn on_event(&self, e: &ProgressEvent) {
        if let ProgressEvent::Phase(p) = e {
            let mut st = lock(&self.state);
            st.phase = *p;
            if *p == Phase::Postcopy {
                st.committed = true;
            }
        }
    }

    /// Opens a new connection to the current address, for the post-copy engine.
    fn dial(&self) -> io::Result<Stream> {
        self.switching.store(true, Ordering::SeqCst);
        transport::connect(&self.address())
    }
}

/// The mode `o` asks for, or why the options contradict each other.
fn requested_mode(o: &MigrateOptions) -> Result<MigrationMode, MigrateError> {
    if !o.postcopy {
        return Ok(match o.postcopy_after {
            Some(_) => MigrationMode::Hybrid,
            None => MigrationMode::Precopy,
        });
    }
    let mut not = Vec::new();
    if o.postcopy_after.is_some() {
        not.push("postcopy_after (a hybrid)");
    }
    if o.bandwidth.is_some() {
        not.push("bandwidth");
    }
    if o.zstd.is_some() {
        not.push("zstd");
    }
    if o.delta_cache.is_some() {
        not.push("delta_cache");
    }
    if o.auto_converge {
        not.push("auto_converge");
    }
    if o.max_iterations.is_some() {
        not.push("max_iterations");
    }
    if o.max_time_ms.is_some() {
        not.push("max_time");
    }
    if not.is_empty() {
        return Ok(MigrationMode::Postcopy);
    }
    Err(MigrateError::Options(format!(
        "a pure post-copy (postcopy) has no pre-copy for {} to apply to (use --postcopy-after for a hybrid)",
        not.join(", ")
    )))
}

/// The source VM as the engines drive it: the VM's own state plus the oracle blob.
struct SourceVm<'a> {
    vm: VmHandle,
    send_hash: bool,
    hash_time: Duration,
    refuse_resume: bool,
    control: &'a MigrationControl,
    /// Bytes of device state saved last.
    state_bytes: u64,
    /// The storage copy, whose mirrors complete inside the pause.
    copy: &'a mut Option<StorageCopy>,
}

impl VmControl for SourceVm<'_> {
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
        // The guest is paused and its disk flushed: the mirrors catch up with the last
        // writes and stop, and the destination's images equal the disks before any state
        // leaves (the destination stops its exports when it reads the state).
        if let Some(c) = self.copy.as_mut() {
            c.complete()
                .map_err(|e| VmError::new(VmOp::SaveState, chain(&e)).for_device(STORAGE_DEVICE))?;
        }
        let mut states = self.vm.save_device_state()?;
        // At a switch to post-copy the destination cannot compare a hash (it lacks pages):
        // the blob carries the pass counters alone, and the pause does not hash RAM.
        let postcopy = self.control.switching.load(Ordering::SeqCst);
        if self.send_hash || postcopy {
            let oracle = |e: String| VmError::new(VmOp::SaveState, e).for_device(ORACLE_ID);
            let (ram_hash, disk_hash) = if postcopy {
                (None, None)
            } else {
                let t = Instant::now();
                let h = self.vm.ram_hash().map_err(|e| oracle(e.to_string()))?;
                // The image as the destination opens it: the pause flushed the device.
                let d = self
                    .vm
                    .disk_hash()
                    .transpose()
                    .map_err(|e| oracle(chain(&e)))?;
                self.hash_time = t.elapsed();
                (Some(h), d)
            };
            let blob = OracleBlob {
                ram_hash,
                passes: self.vm.passes(),
                disk_hash,
            };
            let data = serde_json::to_vec(&blob)
                .map_err(|e| VmError::new(VmOp::SaveState, e).for_device(ORACLE_ID))?;
            states.push(DeviceState::new(ORACLE_ID, ORACLE_VERSION, data));
        }
        self.state_bytes = states.iter().map(|s| s.data.len() as u64).sum();
        Ok(states)
    }
    fn load_device_state(&mut self, _: &[DeviceState]) -> Result<(), VmError> {
        Err(VmError::new(VmOp::LoadState, "this is the source"))
    }
}

/// The writes made while the mirror's own seam is being put in place, to replay into it:
/// a write between the mirror's start and its seam's would be lost otherwise.
#[derive(Default)]
struct WriteLog(Mutex<Vec<(u64, u64)>>);

impl WriteObserver for WriteLog {
    fn wrote(&self, offset: u64, len: u64) {
        lock(&self.0).push((offset, len));
    }
}

/// A storage copy from the prepare request to the end of the migration.
struct StorageCopy {
    kind: CopyStorage,
    mode: crate::cli::MirrorMode,
    mirrors: Option<StorageSource>,
    /// Open until the migration ends: its end tells the destination this side gave up.
    _prepare: Stream,
    nbd: String,
    observers: WriteObservers,
    seams: Vec<Arc<dyn WriteObserver>>,
    image: std::path::PathBuf,
    /// The base both sides hold after a success.
    base: [u8; 16],
    mirror_time: Duration,
    complete_time: Duration,
    disks: Vec<DiskCopyReport>,
}

impl StorageCopy {
    /// Prepare and perform: asks the destination for exports, mirrors the disk into them
    /// and waits until the mirror is in sync (the guest runs and writes meanwhile).
    fn start(
        vm: &VmHandle,
        to: &Address,
        kind: CopyStorage,
        o: &MigrateOptions,
        cancel: &CancelToken,
        events: &mut dyn FnMut(&Event),
    ) -> Result<StorageCopy, MigrateError> {
        let no_disk = || MigrateError::Options("a storage copy needs a VM with a disk".into());
        let image = vm.disk_path().ok_or_else(no_disk)?;
        let size = vm.disk_bytes().ok_or_else(no_disk)?;
        let observers = vm.disk_observers().ok_or_else(no_disk)?;
        // From here on every write is logged, until the mirror's seam takes over.
        let log = Arc::new(WriteLog::default());
        let log_key: Arc<dyn WriteObserver> = observers.add(log.clone());
        let started = Instant::now();
        let r = (|| {
            let inc = match kind {
                CopyStorage::All => None,
                CopyStorage::Incremental => Some(vm.disk_bitmap().ok_or_else(|| {
                    MigrateError::Copy(CopyError::Image {
                        path: image.clone(),
                        why: format!(
                            "no record of the writes since an earlier migration ({} missing, or \
                             not closed cleanly): copy it whole (--copy-storage-all)",
                            storage::bitmap_path(&image).display()
                        ),
                    })
                })?),
            };
            let base = *uuid::Uuid::new_v4().as_bytes();
            let granularity = inc.as_ref().map_or(o.mirror_granularity, |(_, g, _)| *g);
            let mut prepare =
                transport::connect_retry(to, Duration::from_secs(10)).map_err(|source| {
                    MigrateError::Connect {
                        to: to.clone(),
                        source,
                    }
                })?;
            let req = PrepareRequest {
                disks: vec![DiskRequest {
                    id: storage::DISK_ID.into(),
                    size,
                    base: inc.as_ref().map(|(_, _, b)| storage::base_hex(*b)),
                }],
                new_base: Some(storage::base_hex(base)),
            };
            let reply = storage::request(&mut prepare, &req).map_err(MigrateError::Copy)?;
            let nbd = match &reply {
                PrepareReply::Ready { nbd, .. } => nbd.clone(),
                PrepareReply::Refused { reason } => {
                    return Err(MigrateError::Copy(CopyError::Refused(reason.clone())));
                }
            };
            tracing::info!(%nbd, ?kind, "storage: mirroring the disk");
            let settings = MirrorSettings {
                mode: o.mirror_mode.copy_mode(),
                granularity,
                deadline: Duration::from_millis(o.mirror_deadline_ms),
                reconnect_window: Duration::from_millis(o.mirror_reconnect_window_ms),
            };
            let disks = [SourceDisk {
                id: storage::DISK_ID.into(),
                path: image.clone(),
                incremental: inc.map(|(bits, _, b)| (bits, b)),
            }];
            let mut mirrors =
                StorageSource::start(&disks, &reply, &settings).map_err(MigrateError::Copy)?;
            let seams: Vec<Arc<dyn WriteObserver>> = mirrors
                .handles()
                .into_iter()
                .map(|h| observers.add(Arc::new(h)))
                .collect();
            observers.remove(&log_key);
            for &(off, len) in lock(&log.0).iter() {
                for s in &seams {
                    s.wrote(off, len);
                }
            }
            let mut copy = StorageCopy {
                kind,
                mode: o.mirror_mode,
                mirrors: None,
                _prepare: prepare,
                nbd,
                observers: observers.clone(),
                seams,
                image: image.clone(),
                base,
                mirror_time: Duration::ZERO,
                complete_time: Duration::ZERO,
                disks: Vec::new(),
            };
            let ready = mirrors.wait_ready(settings.deadline, &mut |stats| {
                for (disk, s) in stats {
                    events(&Event::Mirror {
                        disk: disk.clone(),
                        bytes_total: s.size,
                        bytes_copied: s.bytes_copied,
                        dirty_bytes: s.dirty_bytes,
                        copy_rate_bps: s.rates.copy_rate,
                        dirty_rate_bps: s.rates.dirty_rate,
                        write_blocking: s.write_blocking,
                    });
                }
                !cancel.is_cancelled()
            });
            copy.mirrors = Some(mirrors);
            if let Err(e) = ready {
                copy.abandon();
                return Err(MigrateError::Copy(e));
            }
            copy.mirror_time = started.elapsed();
            tracing::info!(after = ?copy.mirror_time, "storage: the disk is in sync");
            Ok(copy)
        })();
        observers.remove(&log_key);
        r
    }

    /// Inside the pause: the mirrors complete.
    fn complete(&mut self) -> Result<(), CopyError> {
        let Some(m) = self.mirrors.take() else {
            return Ok(());
        };
        let t = Instant::now();
        self.disks = m.complete(self.kind == CopyStorage::Incremental)?;
        self.complete_time = t.elapsed();
        self.remove_seams();
        Ok(())
    }

    fn remove_seams(&mut self) {
        for s in self.seams.drain(..) {
            self.observers.remove(&s);
        }
    }

    /// The migration failed: the mirrors stop (the source disk is untouched).
    fn abandon(&mut self) {
        self.remove_seams();
        if let Some(m) = self.mirrors.take() {
            m.cancel();
        }
    }

    /// The migration succeeded: this side's image is the disk as it was at the switch,
    /// which the destination holds too, at the new base; the bitmap kept since an older
    /// base means nothing any more.
    fn succeeded(mut self, vm: &VmHandle) -> StorageCopyReport {
        self.remove_seams();
        vm.close_disk_bitmap(true);
        if let Some(m) = self.mirrors.take() {
            // Never completed in a pause (cannot happen: every switch saves the state):
            // the destination's copy is not known equal, so no base is written.
            tracing::error!("a migration succeeded with its mirror never completed");
            m.cancel();
        } else if let Err(e) = storage::write_base(&self.image, self.base) {
            tracing::warn!(%e, "writing the base beside the image: a later incremental copy will be refused");
        }
        StorageCopyReport {
            kind: match self.kind {
                CopyStorage::All => "all".into(),
                CopyStorage::Incremental => "inc".into(),
            },
            mirror_mode: self.mode,
            mirror_ms: ms(self.mirror_time),
            complete_ms: ms(self.complete_time),
            nbd: self.nbd.clone(),
            disks: std::mem::take(&mut self.disks),
        }
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
            if vm.disk_path().is_none() {
                Box::new(t)
            } else {
                // KVM logs only what the guest writes; the disk's device writes guest RAM
                // too (the used ring, read data, status bytes), which vm-memory's bitmap
                // records: both, or the destination would miss a completed request.
                let own =
                    VmmBitmapTracker::new(vm.memory(), layout).map_err(MigrateError::Tracker)?;
                Box::new(UnionTracker::new(vec![Box::new(t), Box::new(own)]))
            }
        }
        // Write protection faults on every write to guest RAM from this process, the
        // device thread's included: nothing to add for the disk.
        GuestKind::Software => Box::new(
            UffdWpTracker::for_memory(&**vm.memory(), layout, UffdWpConfig::default())
                .map_err(MigrateError::Tracker)?,
        ),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(
    vm: &VmHandle,
    to: &Address,
    tracker: &str,
    o: &MigrateOptions,
    s: &MigrationStats,
) -> MigrationReport {
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
        storage_copy: None,
        postcopy: None,
    }
}

/// The pre-copy engine's options from the demo's.
fn precopy_options(vm: &VmHandle, o: &MigrateOptions, vm_id: [u8; 16]) -> SourceOptions {
    SourceOptions {
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
        vm_id,
        vmm_blob: Bytes::from(vm.machine_info().to_bytes()),
        ..SourceOptions::default()
    }
}

/// Migrates the running VM `vm` as `ctl` says (made from the same options `o`), passing
/// the engines' events to `events`. On success the VM is left paused (the destination runs
/// the guest); on failure it runs here again, unless [`MigrateError::guest_left_paused`]
/// or [`MigrateError::guest_lost`] says otherwise.
pub fn migrate_vm(
    vm: &VmHandle,
    disks: &[DiskArg],
    ctl: &MigrationControl,
    o: &MigrateOptions,
    events: &mut dyn FnMut(&Event),
) -> Result<MigrationReport, MigrateError> {
    let to = ctl.address();
    let copy_kind = o.copy_storage();
    // A destination on this host opens the very image this side does (shared storage),
    // unless the disk is copied to it.
    let storage = check_storage(disks, o.unsafe_storage, same_host(&to), copy_kind.is_some())?;
    let mut copy = match copy_kind {
        Some(kind) => Some(StorageCopy::start(vm, &to, kind, o, &ctl.cancel, events)?),
        None => None,
    };
    let mut r = migrate_ram(vm, ctl, o, storage, &mut copy, events);
    match (&mut r, copy) {
        (Ok(rep), Some(c)) => rep.storage_copy = Some(c.succeeded(vm)),
        // The destination deletes what it created when this side goes away.
        (Err(_), Some(mut c)) => c.abandon(),
        (_, None) => {}
    }
    r
}

/// The RAM migration, after the storage copy is in sync if there is one.
fn migrate_ram(
    vm: &VmHandle,
    ctl: &MigrationControl,
    o: &MigrateOptions,
    storage: Option<String>,
    copy: &mut Option<StorageCopy>,
    events: &mut dyn FnMut(&Event),
) -> Result<MigrationReport, MigrateError> {
    let to = ctl.address();
    let tracker = tracker_for(vm)?;
    let tracker_name = tracker.name().to_string();
    let stream = transport::connect_retry(&to, Duration::from_secs(10)).map_err(|source| {
        MigrateError::Connect {
            to: to.clone(),
            source,
        }
    })?;
    let vm_id = *uuid::Uuid::new_v4().as_bytes();
    let mut pre = precopy_options(vm, o, vm_id);
    let mut src = SourceVm {
        vm: vm.clone(),
        send_hash: !o.no_hash_check,
        hash_time: Duration::ZERO,
        refuse_resume: o.refuse_resume,
        control: ctl,
        state_bytes: 0,
        copy,
    };
    let mem = vm.memory().clone();
    let ram = GuestRam::with_layout(&*mem, vm.ram_layout().clone());
    let mut progress = |e: &ProgressEvent| {
        ctl.on_event(e);
        events(&Event::from(e));
        if let ProgressEvent::Phase(p) = e {
            if Some(*p) == o.cancel_at {
                if let Err(e) = ctl.cancel() {
                    tracing::warn!(%e, "cancel_at {p}");
                }
            }
        }
    };
    let finish = |mut rep: MigrationReport, src: &SourceVm<'_>| {
        rep.storage = storage.clone();
        rep.source_hash_ms = ms(src.hash_time);
        rep
    };
    if ctl.mode() == MigrationMode::Precopy {
        let r = migration_precopy::migrate(
            &ram,
            &mut src,
            tracker,
            stream,
            &pre,
            &ctl.cancel,
            &mut progress,
        );
        return match r {
            Ok(SourceOutcome::Completed(stats)) => {
                let rep = report(vm, &to, &tracker_name, o, &stats);
                Ok(finish(rep, &src))
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
        };
    }
    let mode = match o.postcopy_after {
        None => Mode::Pure,
        Some(after) => {
            pre.limit_policy = LimitPolicy::HandOver;
            Mode::Hybrid {
                precopy: Box::new(pre),
                switch: match after {
                    PostcopyAfter::Auto => Switch::Auto,
                    PostcopyAfter::Passes(n) => Switch::AfterPasses(n),
                    PostcopyAfter::Time(d) => Switch::AfterTime(d),
                    PostcopyAfter::Command => Switch::OnCommand,
                },
            }
        }
    };
    let opts = postcopy::SourceOptions {
        mode,
        vm_id,
        vmm_blob: Bytes::from(vm.machine_info().to_bytes()),
        recovery_window: Duration::from_millis(o.recovery_window_ms),
        ready_timeout: Some(POSTCOPY_READY_TIMEOUT),
        configured_timeout: Some(POSTCOPY_READY_TIMEOUT),
        ..postcopy::SourceOptions::default()
    };
    let mut connect = || ctl.dial();
    let r = postcopy::migrate(
        &ram,
        &mut src,
        tracker,
        stream,
        &mut connect,
        &opts,
        &ctl.cancel,
        &mut progress,
    );
    match r {
        Ok(Outcome::Precopy(stats)) => {
            let rep = report(vm, &to, &tracker_name, o, &stats);
            Ok(finish(rep, &src))
        }
        Ok(Outcome::Postcopy(p)) => {
            let mut rep = report(vm, &to, &tracker_name, o, &p.precopy);
            rep.mode = ctl.mode();
            rep.total_ms = ms(p.total_time);
            rep.paused_with_checks_ms = ms(p.downtime);
            // Pre-copy's total is only set when it ends its own stream; handed over, its
            // passes' bytes are what it sent.
            let pre_bytes = p
                .precopy
                .bytes_on_wire
                .max(p.precopy.iterations.iter().map(|i| i.bytes_on_wire).sum());
            rep.bytes_on_wire = pre_bytes + p.bytes;
            rep.device_state_bytes = src.state_bytes;
            rep.postcopy = Some(SourcePostcopyReport::from(&p));
            Ok(finish(rep, &src))
        }
        Ok(other) => Err(MigrateError::UnknownOutcome(format!("{other:?}"))),
        Err(postcopy::SourceError::Precopy(e)) => Err(MigrateError::Engine {
            to,
            source: Box::new(e),
        }),
        Err(e) => Err(MigrateError::Postcopy {
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
        assert_eq!(cancelled.guest_lost(), None);
        let stuck = MigrateError::Engine {
            to: to.clone(),
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
        let switch = MigrateError::Postcopy {
            to: to.clone(),
            source: Box::new(postcopy::SourceError::Switch {
                why: "the destination failed".into(),
                resume: Some(VmError::new(VmOp::Resume, "vCPU gone")),
            }),
        };
        let why = switch.guest_left_paused().unwrap();
        assert!(why.contains("the destination failed") && why.contains("vCPU gone"));
        assert_eq!(switch.guest_lost(), None);
    }

    #[test]
    fn a_failure_names_the_phase_it_happened_in() {
        let to: Address = "tcp:127.0.0.1:1".parse().unwrap();
        let engine = |e: SourceError| MigrateError::Engine {
            to: to.clone(),
            source: Box::new(e),
        };
        let post = |e: postcopy::SourceError| MigrateError::Postcopy {
            to: to.clone(),
            source: Box::new(e),
        };
        let complete =
            || VmError::new(VmOp::SaveState, "mirror target gone").for_device(STORAGE_DEVICE);
        let cases = [
            (
                MigrateError::Copy(CopyError::Refused("no room".into())),
                "storage-prepare",
            ),
            (MigrateError::Copy(CopyError::Cancelled), "storage-mirror"),
            (MigrateError::Options("x".into()), "setup"),
            (
                engine(SourceError::Connection {
                    phase: Phase::Iterating,
                    source: io::Error::other("reset"),
                }),
                "iterating",
            ),
            (engine(SourceError::Vm(complete())), "storage-complete"),
            (
                engine(SourceError::Vm(VmError::new(VmOp::SaveState, "vcpu"))),
                "stop-and-copy",
            ),
            (
                engine(SourceError::ResumeFailed {
                    error: Box::new(SourceError::VerdictTimeout(Duration::from_secs(1))),
                    resume: VmError::new(VmOp::Resume, "gone"),
                }),
                "awaiting-verdict",
            ),
            (
                post(postcopy::SourceError::Vm(complete())),
                "storage-complete",
            ),
            (
                post(postcopy::SourceError::Switch {
                    why: "refused".into(),
                    resume: None,
                }),
                "postcopy-switch",
            ),
            (
                post(postcopy::SourceError::DestinationLost {
                    why: "reset".into(),
                    window: Duration::from_secs(1),
                    missing: 1,
                }),
                "postcopy",
            ),
        ];
        for (e, phase) in cases {
            assert_eq!(e.failed_phase(), phase, "{e:?}");
        }
    }

    #[test]
    fn a_destination_lost_after_the_commit_is_a_lost_guest_never_a_running_one() {
        let to: Address = "tcp:127.0.0.1:1".parse().unwrap();
        let lost = MigrateError::Postcopy {
            to,
            source: Box::new(postcopy::SourceError::DestinationLost {
                why: "main stream: broken pipe".into(),
                window: Duration::from_secs(2),
                missing: 17,
            }),
        };
        assert_eq!(lost.guest_left_paused(), None);
        let why = lost.guest_lost().unwrap();
        assert!(
            why.contains("guest is lost") && why.contains("roll the guest back"),
            "{why}"
        );
    }

    #[test]
    fn options_say_the_mode_and_a_pure_postcopy_refuses_precopy_options() {
        let o = MigrateOptions::default();
        assert_eq!(requested_mode(&o).unwrap(), MigrationMode::Precopy);
        let hybrid = MigrateOptions {
            postcopy_after: Some(PostcopyAfter::Auto),
            bandwidth: Some(1 << 20),
            ..MigrateOptions::default()
        };
        assert_eq!(requested_mode(&hybrid).unwrap(), MigrationMode::Hybrid);
        let pure = MigrateOptions {
            postcopy: true,
            ..MigrateOptions::default()
        };
        assert_eq!(requested_mode(&pure).unwrap(), MigrationMode::Postcopy);
        let both = MigrateOptions {
            postcopy: true,
            postcopy_after: Some(PostcopyAfter::Passes(2)),
            zstd: Some(1),
            ..MigrateOptions::default()
        };
        let e = requested_mode(&both).unwrap_err().to_string();
        assert!(e.contains("postcopy_after") && e.contains("zstd"), "{e}");
    }

    #[test]
    fn cancel_is_refused_once_committed_and_a_switch_needs_a_hybrid() {
        let pre = MigrationControl::new("tcp:127.0.0.1:1", &MigrateOptions::default()).unwrap();
        assert!(matches!(
            pre.start_postcopy(),
            Err(ControlRefused::NoPostcopy)
        ));
        assert!(matches!(
            pre.recover_at("tcp:127.0.0.1:2"),
            Err(ControlRefused::NoRecovery)
        ));
        let o = MigrateOptions {
            postcopy_after: Some(PostcopyAfter::Command),
            ..MigrateOptions::default()
        };
        let c = MigrationControl::new("tcp:127.0.0.1:1", &o).unwrap();
        c.start_postcopy().unwrap();
        assert!(c.cancel.handover_requested());
        assert!(matches!(
            c.recover_at("nowhere"),
            Err(ControlRefused::Address { .. })
        ));
        c.recover_at("tcp:127.0.0.1:2").unwrap();
        assert_eq!(c.address().to_string(), "tcp:127.0.0.1:2");
        c.on_event(&ProgressEvent::Phase(Phase::Postcopy));
        assert!(c.committed());
        assert_eq!(c.phase(), Phase::Postcopy);
        assert!(matches!(c.cancel(), Err(ControlRefused::Committed)));
        assert!(!c.cancel.is_cancelled());
        assert!(matches!(
            c.start_postcopy(),
            Err(ControlRefused::AlreadyPostcopy)
        ));
        let e = ControlRefused::Committed.to_string();
        assert!(e.contains("lose the guest"), "{e}");
    }
}
