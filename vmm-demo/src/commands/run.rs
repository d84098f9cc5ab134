//! `vmm-demo run`: run a guest for a while (or, with `--control`, until it is migrated
//! away or asked to quit), then pause it, run the oracle and report.

use std::time::{Duration, Instant};

use migration_core::transport::Address;
use migration_core::vm::VmControl;

use super::server::{ControlState, serve_control};
use crate::cli::RunArgs;
use crate::error::Error;
use crate::migration::DiskArg;
use crate::protocol::RunState;
use crate::report::RunReport;
use crate::vm::Vm;

/// The control socket's address: `unix:PATH`, or a bare path.
pub(crate) fn control_address(s: &str) -> Result<Address, Error> {
    if s.starts_with("unix:") {
        s.parse().map_err(|source| Error::Address {
            option: "--control",
            source,
        })
    } else {
        Ok(Address::Unix(s.into()))
    }
}

/// Runs `vmm-demo run`.
pub fn run(args: &RunArgs) -> Result<RunReport, Error> {
    let kind = super::guest_kind(args.vm.guest)?;
    let mut config = args.vm.config();
    let disk = super::guest_disk(&args.disk, args.vm.disk_working_set, &mut config)?;
    let console = super::console(args.quiet, args.json);
    let mut vm = Vm::with_disk(&config, kind, console, disk.as_deref()).map_err(Error::BuildVm)?;
    vm.set_software_pace(Duration::from_nanos(args.vm.software_page_ns));
    vm.set_throttle(args.throttle).map_err(|source| Error::Vm {
        action: "throttling",
        source,
    })?;
    let control = ControlState::new();
    if let Some(path) = &args.control {
        let disks = args
            .disk
            .iter()
            .map(|p| DiskArg {
                path: p.clone(),
                cache: args.cache,
            })
            .collect();
        serve_control(&control_address(path)?, vm.handle(), disks, control.clone())?;
    }
    let start = Instant::now();
    vm.resume().map_err(|source| Error::Vm {
        action: "starting",
        source,
    })?;
    let mut error = None;
    let until = match (args.duration, args.passes, &args.control) {
        (Some(d), _, _) => Some(start + d),
        (None, None, None) => Some(start + Duration::from_secs(5)),
        _ => None,
    };
    let passes_deadline = start + args.timeout;
    loop {
        match control.state() {
            RunState::Migrated => break,
            // The engine owns the guest until it is done.
            RunState::Migrating => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // Only quit or the deadline end it: the guest will not make passes (a lost
            // guest's stale copy is never resumed).
            RunState::Paused { .. } | RunState::Lost { .. } => {
                if control.quit_requested() || until.is_some_and(|u| Instant::now() >= u) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            RunState::Running => {}
        }
        if control.quit_requested() || !vm.failures().is_empty() {
            break;
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        if let Some(n) = args.passes {
            if vm.passes().iter().all(|&p| p >= n) {
                break;
            }
            if Instant::now() >= passes_deadline {
                error = Some(format!(
                    "after {:?} the vCPUs are at passes {:?}, not yet {n}",
                    args.timeout,
                    vm.passes()
                ));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause().map_err(|source| Error::Vm {
        action: "pausing",
        source,
    })?;
    let elapsed = start.elapsed();
    let status = control.state();
    match &status {
        RunState::Paused { reason } => error = Some(format!("the guest was left paused: {reason}")),
        RunState::Lost { reason } => error = Some(format!("the guest is lost: {reason}")),
        _ => {}
    }
    let failures = vm.failures();
    if !failures.is_empty() {
        error = Some(failures.join("; "));
    }
    let passes = vm.passes();
    let ram_report = match vm.check() {
        Ok(r) => Some(r),
        Err(e) => {
            error.get_or_insert(format!("oracle: {e}"));
            None
        }
    };
    // Migrated away, the image (shared storage) is the destination's now: the guest went
    // on writing it there, past what this stale copy's pass counters allow.
    let disk_check = if status == RunState::Migrated {
        None
    } else {
        vm.check_disk(ram_report.as_ref())
    };
    let disk = match disk_check {
        None => None,
        Some(Err(e)) => {
            error.get_or_insert(format!("disk oracle: {}", crate::error::chain(&e)));
            None
        }
        Some(Ok(r)) => Some(crate::report::DiskRunReport {
            path: vm
                .disk_path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            sectors: config.disk_sectors,
            working_set_sectors: config.disk_working_set,
            sectors_checked: r.sectors_checked,
            untouched_bytes_checked: r.untouched_bytes_checked,
            verdicts: r.vcpus,
            device: vm.disk_stats().unwrap_or_default(),
        }),
    };
    let oracle = ram_report.map(|r| r.vcpus);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let w = vm.workload();
    let pages: f64 = (0..config.vcpus)
        .map(|i| passes[i as usize] as f64 * w.share(i).len() as f64)
        .sum();
    let (console_lines, console_dropped) = vm.console_lines();
    // The record of the disk's writes for a later incremental copy: complete, unless the
    // disk went on without this VM (migrated away on shared storage: the writes there
    // are not in it; a storage copy removed it already).
    vm.handle().close_disk_bitmap(status == RunState::Migrated);
    let ram_hash = vm.ram_hash().map_err(|source| Error::Oracle {
        when: "hashing RAM at the end",
        source,
    })?;
    Ok(RunReport {
        mode: "run".into(),
        guest: kind,
        mem_bytes: config.mem_bytes,
        ram_regions: config.ram_regions,
        vcpus: config.vcpus,
        working_set_bytes: config.working_set_bytes,
        fill: config.fill,
        order: config.order,
        total_ms: secs * 1e3,
        pass_rate_per_s: passes.iter().map(|&p| p as f64 / secs).collect(),
        passes,
        pages_per_s: pages / secs,
        throttle_pct: args.throttle,
        vcpu_stats: vm.vcpu_stats(),
        console_lines,
        console_dropped,
        ram_hash: format!("{ram_hash:016x}"),
        verified: error.is_none(),
        oracle,
        disk,
        error,
        migrated: status == RunState::Migrated,
        status,
        migration: control.last_migration(),
    })
}
