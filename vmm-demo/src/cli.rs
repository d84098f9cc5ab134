//! Command-line pieces: the VM options every command shares, and `vmm-demo run`.

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use migration_core::vm::VmControl;
use serde::Serialize;

use crate::control::VcpuStats;
use crate::layout::{Fill, VmConfig};
use crate::oracle::VcpuVerdict;
use crate::serial::Console;
use crate::vm::{GuestKind, Vm, kvm_available};

/// Which guest to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestChoice {
    /// KVM where `/dev/kvm` can be used, the software vCPU otherwise.
    Auto,
    /// KVM, or fail.
    Kvm,
    /// The software vCPU, even where KVM is available.
    Software,
}

impl GuestChoice {
    /// The guest kind this choice gives on this machine.
    pub fn resolve(self) -> Result<GuestKind, String> {
        match self {
            GuestChoice::Auto => Ok(GuestKind::best_available()),
            GuestChoice::Software => Ok(GuestKind::Software),
            GuestChoice::Kvm if kvm_available() => Ok(GuestKind::Kvm),
            GuestChoice::Kvm => Err(
                "--guest kvm: /dev/kvm is missing or not usable (use --guest software or auto)"
                    .into(),
            ),
        }
    }
}

/// Parses a byte size: a number with an optional binary suffix K, M, G (or KiB, MiB, GiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &t[digits.len()..];
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 64M"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration: a number with a unit ms, s or m (plain numbers are seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 5s or 2m"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?} is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// The options that shape a VM, shared by every command that makes one.
#[derive(Debug, Clone, Args)]
pub struct VmArgs {
    /// Guest RAM (K, M, G suffixes), split evenly across the RAM regions.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub mem: u64,
    /// Number of RAM regions (memory slots), with a hole between two.
    #[arg(long, default_value_t = 1)]
    pub ram_regions: u32,
    /// Number of vCPUs; each walks its own share of the working set.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Bytes of RAM the guest keeps dirtying, one counter per 4 KiB page; 0 for an idle
    /// guest, whose vCPUs halt.
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub working_set: u64,
    /// Initial content of the rest of RAM: zero (compressible) or random (incompressible).
    #[arg(long, value_enum, default_value_t = Fill::Random)]
    pub fill: Fill,
    /// Seed of the random content.
    #[arg(long, default_value_t = VmConfig::default().seed)]
    pub seed: u64,
    /// Which vCPU runs the guest.
    #[arg(long, value_enum, default_value_t = GuestChoice::Auto)]
    pub guest: GuestChoice,
    /// Least time the software vCPU spends per page, in nanoseconds (0: as fast as it
    /// can; about 5000 matches the KVM guest under nested virtualisation).
    #[arg(long, default_value_t = 0)]
    pub software_page_ns: u64,
}

impl VmArgs {
    /// These options as command-line arguments, to start another process with the same VM.
    pub fn to_args(&self) -> Vec<String> {
        let guest = match self.guest {
            GuestChoice::Auto => "auto",
            GuestChoice::Kvm => "kvm",
            GuestChoice::Software => "software",
        };
        let fill = match self.fill {
            Fill::Zero => "zero",
            Fill::Random => "random",
        };
        [
            ("--mem", self.mem.to_string()),
            ("--ram-regions", self.ram_regions.to_string()),
            ("--vcpus", self.vcpus.to_string()),
            ("--working-set", self.working_set.to_string()),
            ("--fill", fill.to_string()),
            ("--seed", self.seed.to_string()),
            ("--guest", guest.to_string()),
            ("--software-page-ns", self.software_page_ns.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }

    /// The VM configuration these options describe.
    pub fn config(&self) -> VmConfig {
        VmConfig {
            mem_bytes: self.mem,
            ram_regions: self.ram_regions,
            vcpus: self.vcpus,
            working_set_bytes: self.working_set,
            fill: self.fill,
            seed: self.seed,
        }
    }
}

/// `vmm-demo run`: run a guest for a while, then pause it and check it.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Stop after this long (500ms, 5s, 2m). Default 5s unless --passes is given.
    #[arg(long, value_parser = parse_duration, conflicts_with = "passes")]
    pub duration: Option<Duration>,
    /// Stop once every vCPU has completed this many passes.
    #[arg(long)]
    pub passes: Option<u64>,
    /// Give up waiting for --passes after this long.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// Throttle the vCPUs to run only (100 - this) % of the time, like QEMU's cpu throttle.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub throttle: u8,
    /// Print the report as one JSON object on standard output (guest output goes to
    /// standard error).
    #[arg(long)]
    pub json: bool,
    /// Do not show the guest's console output.
    #[arg(long)]
    pub quiet: bool,
    /// Serve the control socket (line-based JSON; see `vmm-demo migrate`) at `unix:PATH`.
    /// Without --duration or --passes the guest then runs until it is migrated away or
    /// asked to quit.
    #[arg(long)]
    pub control: Option<String>,
    /// A disk image the VM is given, checked by the storage policy before a migration;
    /// repeatable.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Cache mode of the disks (none, directsync, writethrough, writeback, unsafe).
    #[arg(long)]
    pub cache: Option<String>,
}

/// What `vmm-demo run` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Always `"run"`.
    pub mode: &'static str,
    /// `"kvm"` or `"software"`.
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
    /// Console lines the guest printed, and those the console dropped.
    pub console_lines: u64,
    /// Console lines not shown because the terminal was slower than the guest.
    pub console_dropped: u64,
    /// Hash of all guest RAM at the end, in hex.
    pub ram_hash: String,
    /// The oracle's view of each vCPU, when it passed.
    pub oracle: Option<Vec<VcpuVerdict>>,
    /// What the oracle or a vCPU found wrong.
    pub error: Option<String>,
    /// True only if the oracle checks passed and no vCPU failed.
    pub verified: bool,
    /// The guest was migrated away (this VM stayed paused since the switchover).
    pub migrated: bool,
    /// The migration's report, when it was.
    pub migration: Option<crate::migration::MigrationReport>,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} guest, {} MiB RAM, {} vCPU(s), working set {} KiB, ran {:.0} ms{}",
            self.guest,
            self.mem_bytes >> 20,
            self.vcpus,
            self.working_set_bytes >> 10,
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
            ),
            Some(e) => write!(f, "NOT verified: {e}"),
        }
    }
}

/// Runs `vmm-demo run`.
pub fn run(args: &RunArgs) -> Result<RunReport, String> {
    let kind = args.vm.guest.resolve()?;
    let config = args.vm.config();
    let console = if args.quiet {
        Console::Discard
    } else if args.json {
        Console::Stderr
    } else {
        Console::Stdout
    };
    let mut vm = Vm::new(&config, kind, console).map_err(|e| e.to_string())?;
    vm.set_software_pace(Duration::from_nanos(args.vm.software_page_ns));
    vm.set_throttle(args.throttle).map_err(|e| e.to_string())?;
    let control = crate::commands::ControlState::new();
    if let Some(path) = &args.control {
        let addr: migration_core::transport::Address = if path.starts_with("unix:") {
            path.parse().map_err(|e| format!("--control: {e}"))?
        } else {
            migration_core::transport::Address::Unix(path.into())
        };
        let disks = args
            .disk
            .iter()
            .map(|p| crate::migration::DiskArg {
                path: p.clone(),
                cache: args.cache.clone(),
            })
            .collect();
        crate::commands::serve_control(&addr, vm.handle(), disks, control.clone())
            .map_err(|e| format!("--control: {e}"))?;
    }
    let start = Instant::now();
    vm.resume().map_err(|e| e.to_string())?;
    let mut error = None;
    let until = match (args.duration, args.passes, &args.control) {
        (Some(d), _, _) => Some(start + d),
        (None, None, None) => Some(start + Duration::from_secs(5)),
        _ => None,
    };
    let passes_deadline = start + args.timeout;
    use crate::commands::RunStatus;
    loop {
        match control.status() {
            RunStatus::Migrated => break,
            RunStatus::Migrating => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            RunStatus::Running => {}
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
    vm.pause().map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    let failures = vm.failures();
    if !failures.is_empty() {
        error = Some(failures.join("; "));
    }
    let passes = vm.passes();
    let verdict = vm.check();
    let oracle = match verdict {
        Ok(r) => Some(r.vcpus),
        Err(e) => {
            error.get_or_insert(format!("oracle: {e}"));
            None
        }
    };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let w = vm.workload();
    let pages: f64 = (0..config.vcpus)
        .map(|i| passes[i as usize] as f64 * w.share(i).len() as f64)
        .sum();
    let (console_lines, console_dropped) = vm.console_lines();
    Ok(RunReport {
        mode: "run",
        guest: kind,
        mem_bytes: config.mem_bytes,
        ram_regions: config.ram_regions,
        vcpus: config.vcpus,
        working_set_bytes: config.working_set_bytes,
        fill: config.fill,
        total_ms: secs * 1e3,
        pass_rate_per_s: passes.iter().map(|&p| p as f64 / secs).collect(),
        passes,
        pages_per_s: pages / secs,
        throttle_pct: args.throttle,
        vcpu_stats: vm.vcpu_stats(),
        console_lines,
        console_dropped,
        ram_hash: format!("{:016x}", vm.ram_hash().map_err(|e| e.to_string())?),
        verified: error.is_none(),
        oracle,
        error,
        migrated: control.status() == RunStatus::Migrated,
        migration: control
            .last_migration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
