//! `vmm-demo destination`: wait for one incoming migration (pre-copy, post-copy or
//! hybrid), check the guest (before running it for a pre-copy, once every page has
//! arrived for a post-copy), run it for a while, check again and report.

use std::time::{Duration, Instant};

use migration_core::transport::{Address, Listener};
use migration_core::vm::VmControl;
use migration_precopy::Placement;

use crate::cli::DestinationArgs;
use crate::error::{Error, chain};
use crate::migration::destination::{self, ReceiveOptions};
use crate::report::{DestinationDiskReport, DestinationReport, PostcopyReport};
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
    let stream = listener
        .accept()
        .map_err(listen_err("accepting a migration on"))?;
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
    let disk = a.disk.as_deref();
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
    let got = accepted.receive(&vm, &listener, &opts);
    // A post-copy runs the guest at its commit: if it failed after that, the guest ran.
    if let Err(e) = &got {
        rep.ran_guest = e.paused_after_commit();
    }
    let got = got?;
    drop(listener);
    rep.ran_guest = true;
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
    let ran = match a.passes {
        // Each vCPU from its own count: vCPUs run at their own pace, and one far ahead of
        // another has done the slowest's share of passes already.
        Some(n) => wait_for_more_passes(&vm, &rep.passes_at_switchover, n),
        None => {
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
    rep.verified = true;
    Ok(())
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
