//! The command line: the argument structs of every command and the value parsers they use.
//! Parsing only; what the commands do is in [`crate::commands`].

use std::time::Duration;

use clap::{Args, ValueEnum};
use migration_core::stats::Phase;
use migration_precopy::Placement;
use migration_storage_policy::CacheMode;
use serde::{Deserialize, Serialize};

use crate::layout::{Fill, Order, VmConfig};

/// A command-line value that does not parse. Each names the input as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Not a number with an optional unit.
    #[error("{input:?} is not a size such as 64M (a whole number with an optional K, M or G)")]
    NotASize {
        /// The input.
        input: String,
    },
    /// A size with a unit other than B, K, M, G (KB, KiB, ...).
    #[error("{input:?}: unknown unit {unit:?} (use K, M or G)")]
    SizeUnit {
        /// The input.
        input: String,
        /// The unit found.
        unit: String,
    },
    /// A size beyond 2^64 - 1 bytes.
    #[error("{input:?} is larger than 2^64 - 1 bytes")]
    SizeTooLarge {
        /// The input.
        input: String,
    },
    /// Not a non-negative decimal number with an optional unit.
    #[error("{input:?} is not a duration such as 500ms, 5s, 1.5s or 2m")]
    NotADuration {
        /// The input.
        input: String,
    },
    /// A duration beyond what `Duration` (or a count of milliseconds in a u64) holds.
    #[error("{input:?} is too long a duration")]
    DurationTooLong {
        /// The input.
        input: String,
    },
    /// Not a `--postcopy-after` value.
    #[error(
        "{input:?} is not a switch to post-copy: auto, a number of passes (3), a duration (10s) or command"
    )]
    PostcopyAfter {
        /// The input.
        input: String,
    },
    /// Not the name of a migration phase.
    #[error(
        "{input:?} is not a migration phase (setup, bulk-copy, iterating, stop-and-copy, awaiting-verdict, ...)"
    )]
    Phase {
        /// The input.
        input: String,
    },
}

/// Parses a byte size: a whole number with an optional binary suffix K, M, G (or KB, KiB,
/// ...; any case), or B.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    // `digits` is a prefix of `t` cut at a char boundary (ASCII letters are one byte).
    let unit = t.get(digits.len()..).unwrap_or_default();
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => {
            return Err(ValueError::SizeUnit {
                input: s.into(),
                unit: unit.into(),
            });
        }
    };
    let digits = digits.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::NotASize { input: s.into() });
    }
    let too_large = || ValueError::SizeTooLarge { input: s.into() };
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    n.checked_mul(1 << shift).ok_or_else(too_large)
}

/// Parses a duration: a non-negative decimal number (`5`, `1.5`, `.25`) with a unit `ms`,
/// `s` or `m`; a plain number is seconds. Exact to the nanosecond (digits beyond are cut).
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let t = s.trim();
    let (num, unit_ns): (&str, u128) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1_000_000)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000_000_000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000_000_000)
    } else {
        (t, 1_000_000_000)
    };
    let not = || ValueError::NotADuration { input: s.into() };
    let too_long = || ValueError::DurationTooLong { input: s.into() };
    let num = num.trim();
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let all_digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return Err(not());
    }
    let whole: u128 = if int.is_empty() {
        0
    } else {
        // Only digits: parsing fails on overflow alone.
        int.parse().map_err(|_| too_long())?
    };
    let mut nanos = whole.checked_mul(unit_ns).ok_or_else(too_long)?;
    // At most a minute per unit: 20 fraction digits are past nanosecond precision, and
    // 10^20 * 6 * 10^10 stays far below u128::MAX.
    let frac = frac.get(..frac.len().min(20)).unwrap_or_default();
    if !frac.is_empty() {
        let f: u128 = frac.parse().map_err(|_| not())?;
        let scale = 10u128.pow(frac.len() as u32);
        nanos = nanos
            .checked_add(f * unit_ns / scale)
            .ok_or_else(too_long)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Parses a duration (see [`parse_duration`]) into whole milliseconds.
pub fn parse_ms(s: &str) -> Result<u64, ValueError> {
    let d = parse_duration(s)?;
    u64::try_from(d.as_millis()).map_err(|_| ValueError::DurationTooLong { input: s.into() })
}

/// When a hybrid migration switches from pre-copy to post-copy (`--postcopy-after`). The
/// control socket's `migrate-start-postcopy` switches at any time during the pre-copy of a
/// hybrid, whichever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostcopyAfter {
    /// When pre-copy will not converge (its passes stop making headway, or a limit such as
    /// `--max-iterations` is reached): `auto`.
    Auto,
    /// After this many passes over dirty pages: a number.
    Passes(u32),
    /// After iterating this long: a duration with a unit (`10s`, `500ms`).
    Time(Duration),
    /// Only on the control socket's `migrate-start-postcopy`: `command`.
    Command,
}

impl std::str::FromStr for PostcopyAfter {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let bad = || ValueError::PostcopyAfter { input: s.into() };
        match t {
            "auto" => Ok(PostcopyAfter::Auto),
            "command" => Ok(PostcopyAfter::Command),
            _ if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                t.parse().map(PostcopyAfter::Passes).map_err(|_| bad())
            }
            // A duration needs its unit: a bare number is a count of passes.
            _ if t.ends_with('s') || t.ends_with('m') => parse_duration(t)
                .map(PostcopyAfter::Time)
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for PostcopyAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostcopyAfter::Auto => f.write_str("auto"),
            PostcopyAfter::Command => f.write_str("command"),
            PostcopyAfter::Passes(n) => write!(f, "{n}"),
            PostcopyAfter::Time(d) => write!(f, "{}ms", d.as_millis()),
        }
    }
}

impl Serialize for PostcopyAfter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PostcopyAfter::Passes(n) => s.serialize_u32(*n),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for PostcopyAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Passes(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Passes(n) => Ok(PostcopyAfter::Passes(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a `--postcopy-after` value (see [`PostcopyAfter`]).
pub fn parse_postcopy_after(s: &str) -> Result<PostcopyAfter, ValueError> {
    s.parse()
}

/// Every phase, for parsing a phase from its name.
const PHASES: [Phase; 11] = [
    Phase::Setup,
    Phase::StorageMirror,
    Phase::BulkCopy,
    Phase::Iterating,
    Phase::StopAndCopy,
    Phase::Postcopy,
    Phase::PostcopyPaused,
    Phase::AwaitingVerdict,
    Phase::Completed,
    Phase::Failed,
    Phase::Cancelled,
];

/// Parses a migration phase from the name it displays as (`bulk-copy`, ...).
pub fn parse_phase(s: &str) -> Result<Phase, ValueError> {
    PHASES
        .into_iter()
        .find(|p| p.to_string() == s)
        .ok_or_else(|| ValueError::Phase { input: s.into() })
}

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

/// Transport of the demo's migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP on 127.0.0.1.
    Tcp,
    /// A unix socket.
    Unix,
}

/// How the storage mirror copies (migration-nbd's copy modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorMode {
    /// Copy in the background; guest writes are re-copied (QEMU's default).
    #[default]
    Background,
    /// Every guest write also goes to the destination before it completes.
    WriteBlocking,
    /// Background, switching to write-blocking by itself when the guest writes faster
    /// than the copy moves data.
    Auto,
}

impl MirrorMode {
    /// The mirror's mode.
    pub fn copy_mode(self) -> migration_nbd::mirror::CopyMode {
        match self {
            MirrorMode::Background => migration_nbd::mirror::CopyMode::Background,
            MirrorMode::WriteBlocking => migration_nbd::mirror::CopyMode::WriteBlocking,
            MirrorMode::Auto => migration_nbd::mirror::CopyMode::Auto,
        }
    }
}

/// Which storage copy a migration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStorage {
    /// Every disk whole into a new image on the destination.
    All,
    /// Only what was written since the destination's older copy.
    Incremental,
}

/// The name clap knows a value by, to pass it on to another process.
fn value_name(v: &impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
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
    /// Order in which each vCPU visits the pages of its share every pass: sequential
    /// (address order) or scattered (a fixed pseudo-random permutation, so that
    /// consecutive visits land far apart, as for a post-copy benchmark).
    #[arg(long, value_enum, default_value_t = Order::Sequential)]
    pub order: Order,
    /// Initial content of the rest of RAM: zero (compressible) or random (incompressible).
    #[arg(long, value_enum, default_value_t = Fill::Random)]
    pub fill: Fill,
    /// Seed of the random content.
    #[arg(long, default_value_t = VmConfig::default().seed)]
    pub seed: u64,
    /// Which vCPU runs the guest.
    #[arg(long, value_enum, default_value_t = GuestChoice::Auto)]
    pub guest: GuestChoice,
    /// Sectors of the disk (the first --disk, when it is a raw image) each pass writes,
    /// split among the vCPUs; 0 for no disk I/O.
    #[arg(long, default_value_t = 64)]
    pub disk_working_set: u64,
    /// Percentage of the disk outside its working set that starts with a pattern made from
    /// --seed, in 1 MiB pieces spread evenly over the disk (50: every other piece), the
    /// rest zero: what the disk oracle expects there. `demo --disk-size` writes it into the
    /// image it creates; an image given with --disk must hold it already (as one the demo
    /// kept, or `vmm-demo prefill` made).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub disk_prefill: u8,
    /// Least time the software vCPU spends per page, in nanoseconds (0: as fast as it
    /// can; about 5000 matches the KVM guest under nested virtualisation).
    #[arg(long, default_value_t = 0)]
    pub software_page_ns: u64,
}

impl VmArgs {
    /// These options as command-line arguments, to start another process with the same VM.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--mem", self.mem.to_string()),
            ("--ram-regions", self.ram_regions.to_string()),
            ("--vcpus", self.vcpus.to_string()),
            ("--working-set", self.working_set.to_string()),
            ("--order", value_name(&self.order)),
            ("--fill", value_name(&self.fill)),
            ("--seed", self.seed.to_string()),
            ("--guest", value_name(&self.guest)),
            ("--software-page-ns", self.software_page_ns.to_string()),
            ("--disk-working-set", self.disk_working_set.to_string()),
            ("--disk-prefill", self.disk_prefill.to_string()),
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
            order: self.order,
            // Filled in by the command that opens the disk image (see `commands::disk`).
            disk_sectors: 0,
            disk_working_set: 0,
            disk_prefill_percent: self.disk_prefill,
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
    /// Serve the control socket (line-based JSON; see `vmm-demo migrate`) at `unix:PATH`
    /// (or PATH). Without --duration or --passes the guest then runs until it is migrated
    /// away or asked to quit.
    #[arg(long)]
    pub control: Option<String>,
    /// A disk image the VM is given, checked by the storage policy before a migration;
    /// repeatable. The first, if it is an existing file, is the guest's virtio-blk disk
    /// (a raw image), which its workload writes.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Cache mode of the disks (QEMU's names; QEMU's default writeback when absent).
    #[arg(long, value_enum)]
    pub cache: Option<CacheMode>,
}

/// The default recovery window of a post-copy migration: 5 minutes.
pub const DEFAULT_RECOVERY_WINDOW_MS: u64 = 5 * 60 * 1000;

/// How to migrate: the options a QEMU user would expect, with the same defaults. Also the
/// arguments of the control socket's `migrate` (as JSON, every field optional).
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
    /// checks the guest only after it ran (keeps both checks out of the guest's pause).
    /// Post-copy never has that check: the destination lacks pages when the guest moves.
    #[arg(long)]
    pub no_hash_check: bool,
    /// Pure post-copy: the guest moves to the destination at once and its pages follow,
    /// on fault and pushed in the background.
    #[arg(long, conflicts_with = "postcopy_after")]
    pub postcopy: bool,
    /// Hybrid: pre-copy first, then post-copy: `auto` (when pre-copy will not converge;
    /// what the option means without a value), after PASSES passes over dirty pages, after
    /// DURATION iterating (`10s`), or `command` (only on the control socket's
    /// `migrate-start-postcopy`, which switches at any time in every case).
    #[arg(long, num_args = 0..=1, default_missing_value = "auto", value_parser = parse_postcopy_after)]
    pub postcopy_after: Option<PostcopyAfter>,
    /// Once post-copy has committed, how long the source tries to reach the destination
    /// again after a broken connection before it gives the guest up (e.g. 5m, 2s).
    #[arg(long = "recovery-window", value_parser = parse_ms, default_value = "5m")]
    pub recovery_window_ms: u64,
    /// Copy the VM's disks to the destination (no shared storage): it creates an image of
    /// each and exports it over NBD, this side mirrors the disk into it until in sync, then
    /// RAM migrates; the mirror completes in the guest's pause (libvirt's option).
    #[arg(long, conflicts_with = "copy_storage_inc")]
    pub copy_storage_all: bool,
    /// As --copy-storage-all, but the destination holds an older copy of each disk (left
    /// by an earlier migration) and only what this side wrote since is copied, from the
    /// bitmap kept beside the image.
    #[arg(long)]
    pub copy_storage_inc: bool,
    /// How the mirror copies: background, write-blocking or auto.
    #[arg(long, value_enum, default_value_t = MirrorMode::Background)]
    pub mirror_mode: MirrorMode,
    /// Bytes per dirty bit of the mirror (a power of two, 512 B to 64 MiB).
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub mirror_granularity: u64,
    /// How long the mirror may take to be in sync before the migration is given up (the
    /// error gives the guest's dirty rate and the copy rate).
    #[arg(long = "mirror-deadline", value_parser = parse_ms, default_value = "5m")]
    pub mirror_deadline_ms: u64,
    /// How long the mirror keeps trying to reach the destination's NBD server again after
    /// a lost connection before the migration is given up (the guest runs on here).
    #[arg(long = "mirror-reconnect-window", value_parser = parse_ms, default_value = "30s")]
    pub mirror_reconnect_window_ms: u64,
    /// Diagnostics: cancel the migration as soon as it enters this phase (setup,
    /// bulk-copy, iterating, stop-and-copy, awaiting-verdict).
    #[arg(long, hide = true, value_parser = parse_phase)]
    #[serde(with = "crate::names::phase_opt")]
    pub cancel_at: Option<Phase>,
    /// Diagnostics: the source refuses to resume the guest after a failed migration, as a
    /// VMM whose vCPUs cannot run again would; the guest stays paused there.
    #[arg(long, hide = true)]
    pub refuse_resume: bool,
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
            postcopy: false,
            postcopy_after: None,
            recovery_window_ms: DEFAULT_RECOVERY_WINDOW_MS,
            copy_storage_all: false,
            copy_storage_inc: false,
            mirror_mode: MirrorMode::Background,
            mirror_granularity: 64 << 10,
            mirror_deadline_ms: 300_000,
            mirror_reconnect_window_ms: 30_000,
            cancel_at: None,
            refuse_resume: false,
        }
    }
}

impl MigrateOptions {
    /// The storage copy asked for, if any.
    pub fn copy_storage(&self) -> Option<CopyStorage> {
        match (self.copy_storage_all, self.copy_storage_inc) {
            (_, true) => Some(CopyStorage::Incremental),
            (true, false) => Some(CopyStorage::All),
            (false, false) => None,
        }
    }
}

/// `vmm-demo migrate`: ask a running `vmm-demo run --control` to migrate its guest.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The control socket of the source (`unix:PATH` or PATH).
    #[arg(long)]
    pub control: String,
    /// Where the destination listens (`tcp:HOST:PORT` or `unix:PATH`).
    #[arg(long)]
    pub to: String,
    /// Migration options.
    #[command(flatten)]
    pub options: MigrateOptions,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `vmm-demo destination`: wait for one incoming migration, check it, run the guest.
#[derive(Debug, Clone, Args)]
pub struct DestinationArgs {
    /// Address to listen on (`tcp:HOST:PORT`, port 0 for any, or `unix:PATH`).
    #[arg(long)]
    pub listen: String,
    /// After the switchover, run the guest this long, then pause, check and report.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub run_for: Duration,
    /// Instead of --run-for: run until every vCPU did this many more passes.
    #[arg(long)]
    pub passes: Option<u64>,
    /// Give up when no migration byte arrives for this long.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// Once a post-copy has committed (the guest runs here), how long to wait for the
    /// source to come back after a broken connection before pausing the guest for good;
    /// also how long to wait for its urgent channel at the switch.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub recovery_window: Duration,
    /// How received pages go into guest RAM not touched yet: write, prefault or
    /// userfaultfd (falls back to prefault where userfaultfd is not available).
    #[arg(long, default_value_t = Placement::Prefault)]
    pub placement: Placement,
    /// Allocate and populate this much guest RAM before listening (QEMU's `-mem-prealloc`),
    /// laid out in `--prealloc-regions` regions; used if the incoming VM has that RAM.
    #[arg(long, value_parser = parse_size)]
    pub prealloc: Option<u64>,
    /// Regions of the preallocated RAM.
    #[arg(long, default_value_t = 1, requires = "prealloc")]
    pub prealloc_regions: u32,
    /// The guest's disk image: the one the source runs from (shared storage), opened
    /// before the guest runs here, checked against the size the source's VM has. Needed
    /// when the incoming VM has a disk, refused when it has none. When the source copies
    /// its disk (--copy-storage-all), the image to create here (it must not exist; without
    /// this option one is created in the system's temporary directory); with
    /// --copy-storage-inc, the older copy an earlier migration left here.
    #[arg(long)]
    pub disk: Option<std::path::PathBuf>,
    /// Where the NBD server of a storage copy listens (default: beside --listen, a free
    /// port on the same host, or the socket path with `.nbd` appended).
    #[arg(long)]
    pub nbd_listen: Option<String>,
    /// The address the source is told to reach the NBD server at, where it differs from
    /// where it listens (NAT, a proxy).
    #[arg(long)]
    pub nbd_advertise: Option<String>,
    /// Diagnostics: copy the disk image to this path when the storage copy finishes (the
    /// disk as it was at the switch, before the guest runs here), for `qemu-img compare`.
    #[arg(long, hide = true)]
    pub snapshot_disk_at_switch: Option<std::path::PathBuf>,
    /// When a storage copy fails before the guest ran here, keep the image it created
    /// (it is no base for an incremental copy: partly copied) instead of deleting it.
    #[arg(long)]
    pub keep_storage: bool,
    /// Once the guest runs here and was checked, serve a control socket at this path (as
    /// `run --control`) instead of running for --run-for: the guest can be migrated on, or
    /// back, and `quit` ends it.
    #[arg(long)]
    pub control: Option<String>,
    /// Print the report as one JSON object (the guest console goes to standard error).
    #[arg(long)]
    pub json: bool,
    /// Do not show the guest console.
    #[arg(long)]
    pub quiet: bool,
}

/// `vmm-demo demo`: source and destination as two processes on this host, migrate, verify.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// The VM.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Migration options.
    #[command(flatten)]
    pub options: MigrateOptions,
    /// Transport between the two processes.
    #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
    pub transport: TransportKind,
    /// How the destination puts received pages into guest RAM it has not touched yet:
    /// write, prefault or userfaultfd.
    #[arg(long, default_value_t = Placement::Prefault)]
    pub placement: Placement,
    /// Start the destination with its guest RAM allocated and populated beforehand
    /// (`destination --prealloc`, QEMU's `-mem-prealloc`).
    #[arg(long)]
    pub dst_prealloc: bool,
    /// A disk image the VM is given, checked by the storage policy; repeatable. The
    /// first, if it is an existing file, is the guest's virtio-blk disk (a raw image),
    /// which both processes open (shared storage).
    #[arg(long)]
    pub disk: Vec<String>,
    /// Create a sparse raw image of this size (K, M, G suffixes; a multiple of 512) in the
    /// demo's scratch directory as the guest's disk, shared by both processes (unless a
    /// --copy-storage flag copies it), removed at the end; --disk-prefill of it written.
    #[arg(long, value_parser = parse_size, conflicts_with = "disk")]
    pub disk_size: Option<u64>,
    /// Cache mode of the disks (QEMU's names; QEMU's default writeback when absent).
    #[arg(long, value_enum)]
    pub cache: Option<CacheMode>,
    /// Let the guest run this long on the source before migrating.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub run_before: Duration,
    /// Let the guest run this long on the destination after the switchover.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub run_after: Duration,
    /// Instead of --run-after: let the guest run on the destination until every vCPU did
    /// this many more passes there (`destination --passes`).
    #[arg(long)]
    pub passes_after: Option<u64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `vmm-demo make-disk`: create a raw image for the guest's disk.
#[derive(Debug, Clone, Args)]
pub struct MakeDiskArgs {
    /// Where to create it (refused if the file exists).
    pub path: std::path::PathBuf,
    /// Its size (K, M, G suffixes; a multiple of 512).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Percentage of it to fill with the pattern made from --seed (in 1 MiB pieces spread
    /// evenly), the rest left a hole: give the VM the same --disk-prefill and --seed.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub prefill: u8,
    /// Seed of the pattern.
    #[arg(long, default_value_t = VmConfig::default().seed)]
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size(" 7 B "), Ok(7));
        assert!(matches!(
            parse_size("12X"),
            Err(ValueError::SizeUnit { unit, .. }) if unit == "X"
        ));
        assert!(matches!(parse_size("M"), Err(ValueError::NotASize { .. })));
        assert!(matches!(
            parse_size("-1M"),
            Err(ValueError::NotASize { .. })
        ));
        assert!(matches!(parse_size("+1"), Err(ValueError::NotASize { .. })));
        assert!(matches!(
            parse_size("99999999999G"),
            Err(ValueError::SizeTooLarge { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(ValueError::SizeTooLarge { .. })
        ));
        let e = parse_size("lots").unwrap_err().to_string();
        assert!(e.contains("\"lots\""), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3ms"), Ok(Duration::from_millis(3)));
        assert_eq!(parse_duration("0.000000001s"), Ok(Duration::from_nanos(1)));
        assert!(matches!(
            parse_duration("-1s"),
            Err(ValueError::NotADuration { .. })
        ));
        assert!(matches!(
            parse_duration("soon"),
            Err(ValueError::NotADuration { .. })
        ));
        assert!(matches!(
            parse_duration("."),
            Err(ValueError::NotADuration { .. })
        ));
        assert!(matches!(
            parse_duration("1e300s"),
            Err(ValueError::NotADuration { .. })
        ));
        assert!(matches!(
            parse_duration("inf"),
            Err(ValueError::NotADuration { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999999m"),
            Err(ValueError::DurationTooLong { .. })
        ));
        assert!(matches!(
            parse_ms("18446744073709551615s"),
            Err(ValueError::DurationTooLong { .. })
        ));
        let e = parse_duration("1e300s").unwrap_err().to_string();
        assert!(e.contains("\"1e300s\""), "{e}");
    }

    #[test]
    fn phases_parse_by_their_names() {
        for p in PHASES {
            assert_eq!(parse_phase(&p.to_string()), Ok(p));
        }
        assert!(parse_phase("nowhere").is_err());
    }

    #[test]
    fn vm_args_pass_on_to_another_process() {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            vm: VmArgs,
        }
        let p = P::parse_from([
            "x",
            "--mem",
            "32M",
            "--guest",
            "software",
            "--fill",
            "zero",
            "--vcpus",
            "3",
            "--order",
            "scattered",
        ]);
        assert_eq!(p.vm.config().order, Order::Scattered);
        let again = P::parse_from(std::iter::once("x".to_string()).chain(p.vm.to_args()));
        assert_eq!(again.vm.config(), p.vm.config());
        assert_eq!(again.vm.guest, GuestChoice::Software);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = parse_size(&s);
            let _ = parse_duration(&s);
            let _ = parse_ms(&s);
            let _ = parse_phase(&s);
        }

        #[test]
        fn parsers_never_panic_on_number_like_strings(s in "[0-9.eE+-]{0,40}(ms|s|m|k|K|M|G|GiB|B|X)?") {
            let _ = parse_size(&s);
            let _ = parse_duration(&s);
            let _ = parse_ms(&s);
        }

        #[test]
        fn sizes_round_trip(n in any::<u64>(), unit in 0usize..4, lower in any::<bool>()) {
            let (suffix, shift) = [("", 0u32), ("K", 10), ("M", 20), ("G", 30)][unit];
            let suffix = if lower { suffix.to_lowercase() } else { suffix.to_string() };
            let got = parse_size(&format!("{n}{suffix}"));
            match n.checked_mul(1 << shift) {
                Some(v) => prop_assert_eq!(got, Ok(v)),
                None => prop_assert!(
                    matches!(got, Err(ValueError::SizeTooLarge { .. })),
                    "{:?}",
                    got
                ),
            }
        }

        #[test]
        fn durations_round_trip(secs in any::<u64>(), nanos in 0u32..1_000_000_000, ms in any::<u64>()) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse_duration(&format!("{secs}.{nanos:09}s")), Ok(d));
            prop_assert_eq!(parse_duration(&format!("{secs}.{nanos:09}")), Ok(d));
            prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
            prop_assert_eq!(parse_ms(&format!("{ms}ms")), Ok(ms));
            let minutes = secs / 60;
            prop_assert_eq!(parse_duration(&format!("{minutes}m")), Ok(Duration::from_secs(minutes * 60)));
        }
    }
}
