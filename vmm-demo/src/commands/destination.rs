//! `vmm-demo destination`: wait for one incoming migration (pre-copy, post-copy or
//! hybrid), check the guest (before running it for a pre-copy, once every page has
//! arrived for a post-copy), run it for a while, check again and report.

use std::time::{Duration, Instant};

use migration_core::transport::{Address, Listener, Stream};
use migration_core::vm::VmControl;
use migration_precopy::Placement;

use super::run::control_address;
use super::server::{ControlState, serve_control};
use crate::cli::DestinationArgs;
use crate::error::{Error, chain};
use crate::migration::destination::{self, ReceiveOptions};
use crate::migration::storage::{self, PrepareReply, StorageTarget};
use crate::report::{
    DestinationDiskReport, DestinationReport, DestinationStorageReport, PostcopyReport,
};
use crate::vm::{PreallocatedRam, Vm};

/// The line on standard error that says where the destination listens (the demo and the
/// tests wait for it).
pub const LISTENING: &str = "vmm-demo destination: listening on ";

/// Runs `vmm-demo destination`. Failures are in the report, which always comes back.
pub fn destination(a: &DestinationArgs) -> DestinationReport {
    let mut rep = DestinationReport::new(a.placement);
    if let Err(e) = receive_and_run(a, &mut rep) {
        if let Error::Receive(r) = &e {
            rep.paused_after_commit = r.paused_after_commit();
        }
        rep.error = Some(chain(&e));
        rep.verified = false;
    }
    rep
}

/// The exit status of a `destination` that reported `rep` ([`crate::exit`]).
pub fn exit_status(rep: &DestinationReport) -> u8 {
    if rep.verified {
        crate::exit::OK
    } else if rep.paused_after_commit {
        crate::exit::PAUSED_INCOMPLETE
    } else {
        crate::exit::FAILED
    }
}

fn receive_and_run(a: &DestinationArgs, rep: &mut DestinationReport) -> Result<(), Error> {
    let addr: Address = a.listen.parse().map_err(|source| Error::Address {
        option: "--listen",
        source,
    })?;
    let prealloc = a
        .prealloc
        .map(|bytes| PreallocatedRam::new(bytes, a.prealloc_regions))
        .transpose()
        .map_err(Error::Prealloc)?;
    let listen_err = |what| {
        let address = a.listen.clone();
        move |source| Error::Listen {
            what,
            address,
            source,
        }
    };
    let listener = Listener::bind(&addr).map_err(listen_err("listening on"))?;
    let local = listener
        .local_address()
        .map_err(listen_err("reading the address of"))?;
    eprintln!("{LISTENING}{local}");
    // The listener stays open: a post-copy source's urgent channel and its connections
    // after a break come through it.
    let mut stream = listener
        .accept()
        .map_err(listen_err("accepting a migration on"))?;
    // A storage copy first (--copy-storage-*): the source asks for exports, mirrors its
    // disks into them, and only then opens the migration stream.
    let mut copy = None;
    if storage::is_prelude(&stream, Duration::from_secs(10)).unwrap_or(false) {
        let (c, next) = prepare_storage(a, &listener, &local, stream, rep)?;
        copy = Some(c);
        stream = next;
    }
    let r = receive_rest(a, rep, &listener, stream, prealloc, copy.as_mut());
    if let Some(c) = copy {
        c.end(r.is_ok() || rep.ran_guest, a.keep_storage, rep);
    }
    r
}

/// The destination's storage copy: its exports, and the connection that asked for them.
struct DestinationCopy {
    target: Option<StorageTarget>,
    /// Open while the source mirrors; its end before the migration stream means the
    /// source gave up.
    prepare: Stream,
    new_base: Option<[u8; 16]>,
    paths: Vec<std::path::PathBuf>,
    /// Diagnostics: where to copy the image at the finish.
    snapshot: Option<std::path::PathBuf>,
}

impl DestinationCopy {
    /// Finish (before the guest state is loaded): the exports stop.
    fn finish(&mut self) -> Result<(), String> {
        if let Some(t) = self.target.as_mut() {
            t.finish().map_err(|e| chain(&e))?;
        }
        if let (Some(to), Some(from)) = (&self.snapshot, self.paths.first()) {
            std::fs::copy(from, to)
                .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
        }
        Ok(())
    }

    /// The migration ended: the guest runs here (`ran`) or not. Not run here, the images
    /// created for it are deleted (unless `keep`).
    fn end(mut self, ran: bool, keep: bool, rep: &mut DestinationReport) {
        let _ = self.prepare.shutdown(std::net::Shutdown::Both);
        let Some(mut t) = self.target.take() else {
            return;
        };
        if ran {
            // Finished before the guest's state was loaded; this only syncs again.
            if let Err(e) = t.finish() {
                tracing::warn!(%e, "storage: syncing the images at the end");
            }
            return;
        }
        let said = t.abort(keep);
        for s in &said {
            tracing::info!("storage: {s}");
        }
        if let Some(r) = rep.storage.as_mut() {
            r.cleanup = said;
        }
    }
}

/// Prepare: reads the source's request on `prep`, creates or checks the images, exports
/// them and answers; then waits for the migration stream while the source mirrors (a
/// source that gives up closes `prep`, and the images go).
fn prepare_storage(
    a: &DestinationArgs,
    listener: &Listener,
    local: &Address,
    mut prep: Stream,
    rep: &mut DestinationReport,
) -> Result<(DestinationCopy, Stream), Error> {
    // A request this side cannot take is answered too (best effort): the source then says
    // why, not only that the connection ended.
    let refuse = |prep: &mut Stream, e: crate::migration::storage::CopyError| {
        let _ = storage::reply(prep, &PrepareReply::Refused { reason: chain(&e) });
        Error::Copy(e)
    };
    let req = match storage::read_request(&mut prep) {
        Ok(r) => r,
        Err(e) => return Err(refuse(&mut prep, e)),
    };
    let nbd_bind = match a.nbd_listen.as_deref().map(str::parse) {
        Some(Ok(l)) => l,
        Some(Err(source)) => {
            let e = Error::Address {
                option: "--nbd-listen",
                source,
            };
            let _ = storage::reply(&mut prep, &PrepareReply::Refused { reason: chain(&e) });
            return Err(e);
        }
        None => nbd_beside(local),
    };
    let scratch = std::env::temp_dir();
    let target =
        match StorageTarget::prepare(&req, std::slice::from_ref(&a.disk), &scratch, &nbd_bind) {
            Ok(t) => t,
            Err(e) => return Err(refuse(&mut prep, e)),
        };
    let mut reply = target.reply();
    if let (Some(adv), PrepareReply::Ready { nbd, .. }) = (&a.nbd_advertise, &mut reply) {
        *nbd = adv.clone();
    }
    prepared(a, listener, prep, req, target, reply, rep)
}

/// Where the NBD server listens by default: beside the migration listener.
fn nbd_beside(local: &Address) -> Address {
    match local {
        Address::Unix(p) => {
            let mut n = p.as_os_str().to_owned();
            n.push(".nbd");
            Address::Unix(n.into())
        }
        Address::Tcp { host, .. } => Address::Tcp {
            host: host.clone(),
            port: 0,
        },
    }
}

/// The exports are up: answers the source, then waits for its migration stream.
fn prepared(
    a: &DestinationArgs,
    listener: &Listener,
    prep: Stream,
    req: storage::PrepareRequest,
    target: StorageTarget,
    reply: PrepareReply,
    rep: &mut DestinationReport,
) -> Result<(DestinationCopy, Stream), Error> {
    let (nbd, created) = match &reply {
        PrepareReply::Ready { nbd, exports } => {
            (nbd.clone(), exports.iter().map(|e| e.created).collect())
        }
        PrepareReply::Refused { .. } => unreachable!("a prepared target is ready"),
    };
    let paths = target.paths();
    rep.storage = Some(DestinationStorageReport {
        nbd,
        images: paths.iter().map(|p| p.display().to_string()).collect(),
        created,
        ..DestinationStorageReport::default()
    });
    let mut copy = DestinationCopy {
        target: Some(target),
        prepare: prep,
        new_base: req.new_base.as_deref().and_then(storage::parse_base),
        paths,
        snapshot: a.snapshot_disk_at_switch.clone(),
    };
    if let Err(e) = storage::reply(&mut copy.prepare, &reply) {
        copy.end(false, a.keep_storage, rep);
        return Err(Error::Copy(e));
    }
    loop {
        match listener.accept_timeout(Duration::from_millis(200)) {
            Ok(Some(s)) => return Ok((copy, s)),
            Ok(None) => {}
            Err(e) => {
                copy.end(false, a.keep_storage, rep);
                return Err(Error::Listen {
                    what: "accepting a migration on",
                    address: a.listen.clone(),
                    source: e,
                });
            }
        }
        if peer_closed(&copy.prepare) {
            copy.end(false, a.keep_storage, rep);
            return Err(Error::Copy(crate::migration::storage::CopyError::Message(
                "the source closed the storage connection before migrating: it gave up".into(),
            )));
        }
    }
}

/// Whether the peer of `s` closed it (nothing more will come); a connection that failed
/// counts as closed.
fn peer_closed(s: &Stream) -> bool {
    match storage::peek(s, &mut [0u8; 1]) {
        Ok(n) => n == Some(0),
        Err(e) => {
            tracing::debug!(%e, "the prepare connection");
            true
        }
    }
}

/// Receives the migration on `stream` and runs the guest.
fn receive_rest(
    a: &DestinationArgs,
    rep: &mut DestinationReport,
    listener: &Listener,
    stream: Stream,
    prealloc: Option<PreallocatedRam>,
    mut copy: Option<&mut DestinationCopy>,
) -> Result<(), Error> {
    let opts = ReceiveOptions {
        idle_timeout: a.idle_timeout,
        // Preallocated RAM has every page in place already: nothing to fault in or
        // place (UFFDIO_COPY would fail on each page and fall back to a copy).
        placement: if prealloc.is_some() {
            Placement::Write
        } else {
            a.placement
        },
        recovery_window: a.recovery_window,
    };
    let accepted = destination::accept(stream, &opts)?;
    let info = accepted.machine().clone();
    rep.guest = Some(info.guest);
    rep.mem_bytes = info.config.mem_bytes;
    rep.order = Some(info.config.order);
    let console = super::console(a.quiet, a.json);
    // The image is opened (never written) before anything of the guest arrives: a VM
    // whose disk does not match the source's (no --disk, another size) is refused here,
    // and the source resumes.
    let copied_disk = copy.as_ref().and_then(|c| c.paths.first().cloned());
    let disk = copied_disk.as_deref().or(a.disk.as_deref());
    let built = match prealloc {
        Some(ram) => Vm::new_incoming_on_with_disk(&info.config, info.guest, console, ram, disk),
        None => {
            Vm::new_incoming_with_disk(&info.config, info.guest, console, disk).map(|v| (v, false))
        }
    };
    let vm = match built {
        Ok((v, preallocated)) => {
            rep.preallocated = preallocated;
            v
        }
        Err(e) => return Err(accepted.refuse(e).into()),
    };
    // The base the source leaves its image at, once the guest's writes here are recorded
    // against it.
    let mut recorded = None;
    let got = match copy.as_deref_mut() {
        Some(c) => {
            let mut finish = || {
                c.finish()?;
                // Recorded from before the guest runs here (a post-copy's guest runs
                // inside the receive): a later incremental copy back moves every write.
                if let Some(base) = c.new_base {
                    let granularity = migration_nbd::mirror::MirrorConfig::default().granularity;
                    match vm.handle().start_disk_bitmap(base, granularity) {
                        Ok(()) => recorded = Some(base),
                        Err(e) => tracing::warn!(%e, "no bitmap of the writes from here on"),
                    }
                }
                Ok(())
            };
            accepted.receive_with(&vm, listener, &opts, &mut finish)
        }
        None => accepted.receive(&vm, listener, &opts),
    };
    // A post-copy runs the guest at its commit: if it failed after that, the guest ran.
    if let Err(e) = &got {
        rep.ran_guest = e.paused_after_commit();
        if !rep.ran_guest && recorded.is_some() {
            // The guest never ran here: the image is not at that base.
            vm.handle().close_disk_bitmap(true);
        }
    }
    let got = got?;
    rep.ran_guest = true;
    if copy.is_some() {
        if let Some(r) = rep.storage.as_mut() {
            r.finished = true;
            r.base = recorded.map(crate::migration::storage::base_hex);
        }
    }
    rep.migration_mode = Some(got.mode);
    rep.hash_checked = got.oracle.as_ref().is_some_and(|b| b.ram_hash.is_some());
    rep.passes_at_switchover = match &got.oracle {
        Some(b) => b.passes.clone(),
        None => vm.passes(),
    };
    rep.bytes_received = got.bytes_received;
    rep.pages = got.pages;
    rep.placement = got.placement;
    rep.switchover_ms = got.switchover.as_secs_f64() * 1e3;
    rep.verify_ms = got.check_time.as_secs_f64() * 1e3;
    let cfg = vm.config().clone();
    rep.disk = vm.disk_path().map(|path| DestinationDiskReport {
        path: path.display().to_string(),
        sectors: cfg.disk_sectors,
        working_set_sectors: cfg.disk_working_set,
        sectors_checked_at_switch: got.disk_at_switch.map(|d| d.sectors_checked),
        hash_at_switch_equal: got.disk_at_switch.map(|d| d.hash_equal),
        sectors_checked_after_postcopy: None,
        sectors_checked: 0,
        untouched_bytes_checked: 0,
        verdicts: Vec::new(),
        device: Default::default(),
    });
    if let Some(p) = &got.postcopy {
        let mut pr = PostcopyReport::new(&p.postcopy, p.switchover, &vm.vcpu_thread_ids());
        // Every page is here: pause the guest and check all of RAM, as after running.
        let t = Instant::now();
        vm.handle().pause().map_err(|source| Error::Vm {
            action: "pausing",
            source,
        })?;
        let checked = vm.check();
        let disk = checked.as_ref().ok().and_then(|r| vm.check_disk(Some(r)));
        pr.check_ms = t.elapsed().as_secs_f64() * 1e3;
        rep.postcopy = Some(pr);
        checked.map_err(|source| Error::Oracle {
            when: "once every post-copy page arrived",
            source,
        })?;
        if let Some(d) = disk {
            let d = d.map_err(|source| Error::DiskOracle {
                when: "once every post-copy page arrived",
                source,
            })?;
            if let Some(r) = rep.disk.as_mut() {
                r.sectors_checked_after_postcopy = Some(d.sectors_checked);
            }
        }
        vm.handle().resume().map_err(|source| Error::Vm {
            action: "resuming",
            source,
        })?;
    }
    let ran = match (&a.control, a.passes) {
        (Some(path), _) => match serve_until_done(&vm, path, rep)? {
            // Gone on to another destination: this copy is stale, and checked no more.
            true => {
                rep.passes_at_end = vm.passes();
                rep.console_lines = vm.console_lines().0;
                vm.handle().close_disk_bitmap(true);
                rep.verified = true;
                return Ok(());
            }
            false => Ok(()),
        },
        // Each vCPU from its own count: vCPUs run at their own pace, and one far ahead of
        // another has done the slowest's share of passes already.
        (None, Some(n)) => wait_for_more_passes(&vm, &rep.passes_at_switchover, n),
        (None, None) => {
            std::thread::sleep(a.run_for);
            Ok(())
        }
    };
    vm.handle().pause().map_err(|source| Error::Vm {
        action: "pausing",
        source,
    })?;
    rep.passes_at_end = vm.passes();
    rep.console_lines = vm.console_lines().0;
    ran?;
    let failures = vm.failures();
    if !failures.is_empty() {
        return Err(Error::VcpuFailed(failures));
    }
    let ram = vm.check().map_err(|source| Error::Oracle {
        when: "after running",
        source,
    })?;
    if let Some(d) = vm.check_disk(Some(&ram)) {
        let d = d.map_err(|source| Error::DiskOracle {
            when: "after running",
            source,
        })?;
        let device = vm.disk_stats().unwrap_or_default();
        if let Some(r) = rep.disk.as_mut() {
            r.sectors_checked = d.sectors_checked;
            r.untouched_bytes_checked = d.untouched_bytes_checked;
            r.verdicts = d.vcpus;
            r.device = device;
        }
        // The guest goes on with its disk here: every pass writes its sectors.
        if cfg.disk_working_set > 0 && device.sectors_written == 0 {
            return Err(Error::NoDiskProgress {
                working_set: cfg.disk_working_set,
            });
        }
    }
    // An idle guest (no working set) halts: it has no pass to make, and the oracle above
    // checked that its RAM is what it was.
    let idle = vm.workload().working_set().is_empty();
    let progressed = rep
        .passes_at_end
        .iter()
        .zip(&rep.passes_at_switchover)
        .all(|(e, s)| e > s);
    if !idle && !progressed {
        return Err(Error::NoProgress {
            at_switchover: rep.passes_at_switchover.clone(),
            at_end: rep.passes_at_end.clone(),
        });
    }
    vm.handle().close_disk_bitmap(false);
    rep.verified = true;
    Ok(())
}

/// Serves a control socket at `path` for the guest that runs here (as `run --control`)
/// until it is migrated away (true) or asked to quit (false).
fn serve_until_done(vm: &Vm, path: &str, rep: &mut DestinationReport) -> Result<bool, Error> {
    use crate::protocol::RunState;
    let control = ControlState::new();
    let disks = vm
        .disk_path()
        .map(|p| {
            vec![crate::migration::DiskArg {
                path: p.display().to_string(),
                cache: None,
            }]
        })
        .unwrap_or_default();
    serve_control(&control_address(path)?, vm.handle(), disks, control.clone())?;
    loop {
        match control.state() {
            RunState::Migrated => {
                rep.migrated_away = control.last_migration();
                return Ok(true);
            }
            RunState::Migrating => {}
            RunState::Running if !vm.failures().is_empty() => return Ok(false),
            _ if control.quit_requested() => return Ok(false),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every vCPU `i` has done `n` passes more than `from[i]`; fails if a vCPU
/// stops for good or two minutes pass first.
fn wait_for_more_passes(vm: &Vm, from: &[u64], n: u64) -> Result<(), Error> {
    const TIMEOUT: Duration = Duration::from_secs(120);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let p = vm.passes();
        let done = p
            .iter()
            .enumerate()
            .all(|(i, &x)| x >= from.get(i).copied().unwrap_or(0).saturating_add(n));
        if done {
            return Ok(());
        }
        let f = vm.failures();
        if !f.is_empty() {
            return Err(Error::Wait(crate::vm::WaitError::VcpuFailed(f)));
        }
        if Instant::now() >= deadline {
            let wanted = from.iter().copied().max().unwrap_or(0).saturating_add(n);
            return Err(Error::Wait(crate::vm::WaitError::Timeout {
                timeout: TIMEOUT,
                passes: p,
                wanted,
            }));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
