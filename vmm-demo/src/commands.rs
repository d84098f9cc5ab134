//! The migration commands: the control socket of `run`, `migrate`, `destination` and `demo`.
//!
//! # Control protocol
//!
//! `vmm-demo run --control unix:PATH` listens on a unix socket for a line-based JSON
//! protocol in the spirit of QMP and Cloud Hypervisor's API socket. Each request is one
//! JSON object on one line; the answer is one line `{"return": ...}` or `{"error": "..."}`,
//! preceded for `migrate` by event lines `{"event": ...}`.
//!
//! | request | answer |
//! |---------|--------|
//! | `{"execute":"query-status"}` | `{"return":{"status":"running"\|"migrating"\|"migrated","guest":"kvm","passes":[..]}}` |
//! | `{"execute":"migrate","arguments":{"to":"tcp:HOST:PORT", ...options}}` | events, then `{"return":<migration report>}` or `{"error":"why"}` |
//! | `{"execute":"migrate-cancel"}` | `{"return":{}}`; the running `migrate` then fails with "cancelled" |
//! | `{"execute":"quit"}` | `{"return":{}}`; `run` pauses the guest, checks it and prints its report |
//!
//! The migrate options are those of `vmm-demo migrate` (`downtime_limit_ms`, `bandwidth`,
//! `zstd`, `delta_cache`, `auto_converge`, `max_iterations`, `max_time_ms`,
//! `unsafe_storage`, `no_hash_check`), all optional. Events: `{"event":"phase","phase":
//! "bulk-copy"}`, `{"event":"progress",...}`, `{"event":"iteration",...}`,
//! `{"event":"throttle","percent":20}`.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use migration_core::geometry::GuestRam;
use migration_core::stats::ProgressEvent;
use migration_core::transport::{Address, Listener};
use migration_precopy::{CancelToken, DestinationOptions, Incoming};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cli::{VmArgs, parse_duration};
use crate::migration::{
    self, DestinationVm, DiskArg, MigrateOptions, MigrationReport, PagesReport,
};
use crate::serial::Console;
use crate::vm::{MachineInfo, PreallocatedRam, Vm, VmHandle};

/// What the run loop is doing, as the control socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// The guest runs here.
    Running,
    /// A migration is in progress.
    Migrating,
    /// The guest runs on a destination; this VM stays paused.
    Migrated,
}

/// State shared by `run`'s main loop and its control socket.
pub struct ControlState {
    status: Mutex<RunStatus>,
    quit: AtomicBool,
    cancel: Mutex<Option<CancelToken>>,
    /// The last migration report, when one completed.
    pub last_migration: Mutex<Option<MigrationReport>>,
}

impl ControlState {
    /// A VM running, no migration.
    pub fn new() -> Arc<ControlState> {
        Arc::new(ControlState {
            status: Mutex::new(RunStatus::Running),
            quit: AtomicBool::new(false),
            cancel: Mutex::new(None),
            last_migration: Mutex::new(None),
        })
    }

    /// The status now.
    pub fn status(&self) -> RunStatus {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `quit` was asked.
    pub fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
    }
}

/// Starts serving the control socket at `addr` on a thread. The listener lives as long as
/// the thread (the process).
pub fn serve_control(
    addr: &Address,
    vm: VmHandle,
    disks: Vec<DiskArg>,
    state: Arc<ControlState>,
) -> Result<(), String> {
    let listener = Listener::bind(addr).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while let Ok(conn) = listener.accept() {
                let (vm, disks, state) = (vm.clone(), disks.clone(), state.clone());
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let migration_core::transport::Stream::Unix(s) = conn {
                            handle_conn(s, &vm, &disks, &state);
                        }
                    });
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Request {
    execute: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct MigrateRequest {
    to: String,
    #[serde(flatten)]
    options: MigrateOptions,
}

fn send_line(w: &mut UnixStream, v: &Value) -> bool {
    let mut s = v.to_string();
    s.push('\n');
    w.write_all(s.as_bytes()).is_ok()
}

fn handle_conn(s: UnixStream, vm: &VmHandle, disks: &[DiskArg], state: &ControlState) {
    let Ok(mut w) = s.try_clone() else { return };
    // Requests are small: a line longer than 64 KiB is refused rather than buffered.
    let mut r = BufReader::new(s.take(u64::MAX));
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut r).take(64 << 10).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            send_line(
                &mut w,
                &json!({"error": "request line too long or unterminated"}),
            );
            return;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => json!({"error": format!("not a request: {e}")}),
            Ok(req) => match req.execute.as_str() {
                "query-status" => json!({"return": {
                    "status": state.status(),
                    "guest": vm.kind().as_str(),
                    "passes": vm.passes(),
                    "paused": vm.is_paused(),
                }}),
                "quit" => {
                    state.quit.store(true, Ordering::SeqCst);
                    json!({"return": {}})
                }
                "migrate-cancel" => {
                    if let Some(c) = state
                        .cancel
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                    {
                        c.cancel();
                    }
                    json!({"return": {}})
                }
                "migrate" => match serde_json::from_value::<MigrateRequest>(req.arguments) {
                    Err(e) => json!({"error": format!("migrate arguments: {e}")}),
                    Ok(m) => run_migrate(&mut w, vm, disks, state, m),
                },
                other => json!({"error": format!("unknown command {other:?}")}),
            },
        };
        if !send_line(&mut w, &answer) {
            return;
        }
    }
}

fn event_json(e: &ProgressEvent) -> Value {
    match e {
        ProgressEvent::Phase(p) => json!({"event": "phase", "phase": p.to_string()}),
        ProgressEvent::Progress {
            bytes_on_wire,
            pages_sent,
            pages_remaining,
            pages_total,
            bandwidth_bps,
            dirty_rate_bps,
        } => json!({"event": "progress", "bytes_on_wire": bytes_on_wire, "pages_sent": pages_sent,
                    "pages_remaining": pages_remaining, "pages_total": pages_total,
                    "bandwidth_bps": bandwidth_bps, "dirty_rate_bps": dirty_rate_bps}),
        ProgressEvent::IterationDone(i) => json!({"event": "iteration", "iteration": i.iteration,
                    "pages": PagesReport::from(i.pages), "bytes": i.bytes_on_wire,
                    "dirty_after": i.dirty_pages_after, "dirty_rate_bps": i.dirty_rate_bps,
                    "bandwidth_bps": i.bandwidth_bps, "throttle_pct": i.throttle_pct}),
        ProgressEvent::Throttle { percent } => json!({"event": "throttle", "percent": percent}),
        ProgressEvent::PageFault { page, latency } => {
            json!({"event": "page-fault", "page": page, "latency_us": latency.as_micros() as u64})
        }
    }
}

fn run_migrate(
    w: &mut UnixStream,
    vm: &VmHandle,
    disks: &[DiskArg],
    state: &ControlState,
    m: MigrateRequest,
) -> Value {
    let to: Address = match m.to.parse() {
        Ok(a) => a,
        Err(e) => return json!({"error": format!("{e}")}),
    };
    {
        let mut st = state.status.lock().unwrap_or_else(|e| e.into_inner());
        if *st != RunStatus::Running || state.quit_requested() {
            return json!({"error": format!("cannot migrate: the VM is {:?}", *st)});
        }
        *st = RunStatus::Migrating;
    }
    let cancel = CancelToken::new();
    *state.cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some(cancel.clone());
    let mut events_ok = true;
    let r = migration::migrate_vm(vm, disks, &to, &m.options, &cancel, &mut |e| {
        if events_ok {
            events_ok = send_line(w, &event_json(e));
        }
    });
    *state.cancel.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let mut st = state.status.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(rep) => {
            *st = RunStatus::Migrated;
            *state
                .last_migration
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(rep.clone());
            json!({"return": rep})
        }
        Err(e) => {
            *st = RunStatus::Running;
            json!({"error": e})
        }
    }
}

/// A client of the control socket.
pub struct ControlClient {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connects to `unix:PATH` (or a bare path), retrying until `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<ControlClient, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                    return Ok(ControlClient { w: s, r });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("control socket {}: {e}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Sends `req`; passes event lines to `on_event`; returns the `return` value, or the
    /// `error` text as `Err`.
    pub fn call(&mut self, req: &Value, on_event: &mut dyn FnMut(&Value)) -> Result<Value, String> {
        let mut s = req.to_string();
        s.push('\n');
        self.w
            .write_all(s.as_bytes())
            .map_err(|e| format!("control socket: {e}"))?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .r
                .read_line(&mut line)
                .map_err(|e| format!("control socket: {e}"))?;
            if n == 0 {
                return Err("control socket closed before an answer".into());
            }
            let v: Value =
                serde_json::from_str(&line).map_err(|e| format!("control socket answer: {e}"))?;
            if v.get("event").is_some() {
                on_event(&v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = v.get("error") {
                return Err(e.as_str().unwrap_or("error").to_string());
            } else {
                return Err(format!("control socket: unexpected answer {line}"));
            }
        }
    }
}

fn control_path(s: &str) -> PathBuf {
    PathBuf::from(s.strip_prefix("unix:").unwrap_or(s))
}

/// A progress bar drawn from events, only when standard error is a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg:>16} [{bar:40}] {pos}/{len} pages {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        Progress { bar }
    }

    fn event(&self, v: &Value) {
        let Some(b) = &self.bar else { return };
        match v.get("event").and_then(Value::as_str) {
            Some("phase") => b.set_message(v["phase"].as_str().unwrap_or("").to_string()),
            Some("progress") => {
                let total = v["pages_total"].as_u64().unwrap_or(0);
                let rem = v["pages_remaining"].as_u64().unwrap_or(0);
                b.set_length(total);
                b.set_position(total.saturating_sub(rem));
            }
            Some("iteration") => b.println(format!(
                "pass {}: {} bytes, {} dirty after, {:.1} MB/s",
                v["iteration"],
                v["bytes"],
                v["dirty_after"],
                v["bandwidth_bps"].as_f64().unwrap_or(0.0) / 1e6
            )),
            Some("throttle") => b.println(format!("auto-converge: throttle {} %", v["percent"])),
            _ => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
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

/// Runs `vmm-demo migrate`.
pub fn migrate_command(a: &MigrateArgs) -> Result<Value, String> {
    let mut c = ControlClient::connect(&control_path(&a.control), Duration::from_secs(5))?;
    let mut args = serde_json::to_value(&a.options).map_err(|e| e.to_string())?;
    args["to"] = json!(a.to);
    let p = Progress::new();
    let r = c.call(
        &json!({"execute": "migrate", "arguments": args}),
        &mut |v| p.event(v),
    );
    p.finish();
    r
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
    /// How received pages go into guest RAM not touched yet.
    #[arg(long, value_enum, default_value_t = PlacementKind::Prefault)]
    pub placement: PlacementKind,
    /// Allocate and populate this much guest RAM before listening (QEMU's `-mem-prealloc`),
    /// laid out in `--prealloc-regions` regions; used if the incoming VM has that RAM.
    #[arg(long, value_parser = crate::cli::parse_size)]
    pub prealloc: Option<u64>,
    /// Regions of the preallocated RAM.
    #[arg(long, default_value_t = 1, requires = "prealloc")]
    pub prealloc_regions: u32,
    /// Print the report as one JSON object (the guest console goes to standard error).
    #[arg(long)]
    pub json: bool,
    /// Do not show the guest console.
    #[arg(long)]
    pub quiet: bool,
}

/// What the destination reports.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DestinationReport {
    /// `"destination"`.
    pub mode: String,
    /// Guest kind, once known.
    pub guest: Option<String>,
    /// Guest RAM, bytes.
    pub mem_bytes: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Pages applied by encoding.
    pub pages: PagesReport,
    /// How pages went into untouched guest RAM: `write`, `prefault` or `userfaultfd`.
    pub placement: String,
    /// Guest RAM was allocated and populated before the migration (`--prealloc`).
    pub preallocated: bool,
    /// From `Complete` to the guest resumed, ms.
    pub switchover_ms: f64,
    /// Of which the oracle and hash checks, ms.
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
    /// What went wrong.
    pub error: Option<String>,
}

/// Runs `vmm-demo destination`.
pub fn destination_command(a: &DestinationArgs) -> DestinationReport {
    let mut rep = DestinationReport {
        mode: "destination".into(),
        ..Default::default()
    };
    if let Err(e) = destination_inner(a, &mut rep) {
        rep.error = Some(e);
        rep.verified = false;
    }
    rep
}

fn destination_inner(a: &DestinationArgs, rep: &mut DestinationReport) -> Result<(), String> {
    let addr: Address = a.listen.parse().map_err(|e| format!("{e}"))?;
    let prealloc = a
        .prealloc
        .map(|bytes| PreallocatedRam::new(bytes, a.prealloc_regions))
        .transpose()
        .map_err(|e| format!("preallocating guest RAM: {e}"))?;
    let listener = Listener::bind(&addr).map_err(|e| e.to_string())?;
    let local = listener.local_address().map_err(|e| e.to_string())?;
    eprintln!("vmm-demo destination: listening on {local}");
    let stream = listener.accept().map_err(|e| format!("accepting: {e}"))?;
    drop(listener);
    let incoming = Incoming::accept(
        stream,
        &DestinationOptions {
            idle_timeout: Some(a.idle_timeout),
            // Preallocated RAM has every page in place already: nothing to fault in or
            // place (UFFDIO_COPY would fail on each page and fall back to a copy).
            placement: match (a.placement, &prealloc) {
                (_, Some(_)) | (PlacementKind::Write, None) => migration_precopy::Placement::Write,
                (PlacementKind::Prefault, None) => migration_precopy::Placement::Prefault,
                (PlacementKind::Userfaultfd, None) => migration_precopy::Placement::Userfaultfd,
            },
            ..DestinationOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let info = match MachineInfo::from_bytes(&incoming.config().vmm) {
        Ok(i) => i,
        Err(e) => return Err(incoming.refuse(&format!("VMM blob: {e}")).to_string()),
    };
    rep.guest = Some(info.guest.as_str().into());
    rep.mem_bytes = info.config.mem_bytes;
    let console = if a.quiet {
        Console::Discard
    } else if a.json {
        Console::Stderr
    } else {
        Console::Stdout
    };
    let built = match prealloc {
        Some(ram) => Vm::new_incoming_on(&info.config, info.guest, console, ram),
        None => Vm::new_incoming(&info.config, info.guest, console).map(|v| (v, false)),
    };
    let vm = match built {
        Ok((v, preallocated)) => {
            rep.preallocated = preallocated;
            v
        }
        Err(e) => {
            return Err(incoming
                .refuse(&format!("building the VM: {e}"))
                .to_string());
        }
    };
    let mem = vm.memory().clone();
    let ram = GuestRam::with_layout(&*mem, vm.ram_layout().clone());
    let mut dvm = DestinationVm {
        vm: &vm,
        oracle: None,
    };
    let oracle_cell: std::cell::RefCell<Option<migration::OracleBlob>> = Default::default();
    let mut verify = |states: &[migration_core::stream::DeviceState]| {
        let blob = states
            .iter()
            .find(|s| s.id == migration::ORACLE_ID)
            .and_then(|s| serde_json::from_slice(&s.data).ok());
        if blob.is_none() {
            // The source asked for no switchover check (--no-hash-check): the oracle runs
            // after the guest ran here instead.
            tracing::info!("no oracle blob from the source: no check at switchover");
            return Ok(());
        }
        migration::verify_switchover(&vm, blob.as_ref())?;
        *oracle_cell.borrow_mut() = blob;
        Ok(())
    };
    let stats = incoming
        .receive(&ram, &mut dvm, &mut verify, &mut |_| {})
        .map_err(|e| e.to_string())?;
    rep.ran_guest = true;
    rep.hash_checked = oracle_cell.borrow().is_some();
    rep.passes_at_switchover = oracle_cell
        .borrow()
        .as_ref()
        .map(|b| b.passes.clone())
        .unwrap_or_default();
    if rep.passes_at_switchover.is_empty() {
        rep.passes_at_switchover = vm.passes();
    }
    rep.bytes_received = stats.bytes_received;
    rep.pages = stats.pages.into();
    rep.placement = stats.placement.as_str().into();
    rep.switchover_ms = stats.switchover.as_secs_f64() * 1e3;
    rep.verify_ms = stats.verify_time.as_secs_f64() * 1e3;
    let base = rep.passes_at_switchover.iter().copied().min().unwrap_or(0);
    let ran = match a.passes {
        Some(n) => vm
            .wait_for_passes(base + n, Duration::from_secs(120))
            .map(|_| ()),
        None => {
            std::thread::sleep(a.run_for);
            Ok(())
        }
    };
    let mut h = vm.handle();
    migration_core::vm::VmControl::pause(&mut h).map_err(|e| e.to_string())?;
    rep.passes_at_end = vm.passes();
    rep.console_lines = vm.console_lines().0;
    ran?;
    let failures = vm.failures();
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    vm.check()
        .map_err(|e| format!("oracle after running: {e}"))?;
    // An idle guest (no working set) halts: it has no pass to make, and the oracle above
    // checked that its RAM is what it was.
    let idle = vm.workload().working_set().is_empty();
    let progressed = rep
        .passes_at_end
        .iter()
        .zip(&rep.passes_at_switchover)
        .all(|(e, s)| e > s);
    if !idle && !progressed {
        return Err(format!(
            "the guest made no pass on the destination: {:?} at switchover, {:?} at the end",
            rep.passes_at_switchover, rep.passes_at_end
        ));
    }
    rep.verified = true;
    Ok(())
}

/// How the destination puts received pages into guest RAM it has not touched yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementKind {
    /// Ordinary writes; each page faults in on its first write.
    Write,
    /// Ordinary writes, with a helper thread faulting RAM in ahead of them.
    Prefault,
    /// `UFFDIO_COPY` fills new pages from the received bytes (no fault, no clearing);
    /// falls back to `prefault` where userfaultfd is not available.
    Userfaultfd,
}

/// Transport of the demo's migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP on 127.0.0.1.
    Tcp,
    /// A unix socket.
    Unix,
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
    /// How the destination puts received pages into guest RAM it has not touched yet.
    #[arg(long, value_enum, default_value_t = PlacementKind::Prefault)]
    pub placement: PlacementKind,
    /// Start the destination with its guest RAM allocated and populated beforehand
    /// (`destination --prealloc`, QEMU's `-mem-prealloc`).
    #[arg(long)]
    pub dst_prealloc: bool,
    /// A disk image the VM is given (for the storage-policy check); repeatable.
    #[arg(long)]
    pub disk: Vec<String>,
    /// Cache mode of the disks (QEMU's names; QEMU's default writeback when absent).
    #[arg(long)]
    pub cache: Option<String>,
    /// Let the guest run this long on the source before migrating.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub run_before: Duration,
    /// Let the guest run this long on the destination after the switchover.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub run_after: Duration,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Kills and reaps a child process on drop, by its PID.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn wait_timeout(&mut self, t: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + t;
        let c = self.0.as_mut()?;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

fn read_all_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// The demo's JSON report.
pub fn demo_command(a: &DemoArgs) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!(
        "vmm-demo-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let _cleanup = DirGuard(dir.clone());
    let control = dir.join("control.sock");
    let listen = match a.transport {
        TransportKind::Tcp => "tcp:127.0.0.1:0".to_string(),
        TransportKind::Unix => format!("unix:{}", dir.join("migration.sock").display()),
    };
    let mut dst = Command::new(&exe);
    let placement = a
        .placement
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    dst.args(["destination", "--listen", &listen, "--json", "--run-for"])
        .arg(format!("{}ms", a.run_after.as_millis()))
        .args(["--placement", &placement])
        .args(if a.dst_prealloc {
            vec![
                "--prealloc".to_string(),
                a.vm.mem.to_string(),
                "--prealloc-regions".to_string(),
                a.vm.ram_regions.to_string(),
            ]
        } else {
            vec![]
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut dst = ChildGuard(Some(
        dst.spawn()
            .map_err(|e| format!("starting the destination: {e}"))?,
    ));
    let child = dst.0.as_mut().ok_or("no child")?;
    let dst_out = read_all_thread(child.stdout.take().ok_or("no stdout")?);
    let mut dst_err = BufReader::new(child.stderr.take().ok_or("no stderr")?);
    let mut line = String::new();
    let to = loop {
        line.clear();
        if dst_err.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the destination exited before listening".into());
        }
        if let Some(a) = line
            .trim()
            .strip_prefix("vmm-demo destination: listening on ")
        {
            break a.to_string();
        }
    };
    let dst_err = read_all_thread(dst_err);

    let mut src = Command::new(&exe);
    src.arg("run")
        .args(a.vm.to_args())
        .args([
            "--control",
            &format!("unix:{}", control.display()),
            "--json",
            "--quiet",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for d in &a.disk {
        src.args(["--disk", d]);
    }
    if let Some(c) = &a.cache {
        src.args(["--cache", c]);
    }
    let mut src = ChildGuard(Some(
        src.spawn()
            .map_err(|e| format!("starting the source: {e}"))?,
    ));
    let child = src.0.as_mut().ok_or("no child")?;
    let src_out = read_all_thread(child.stdout.take().ok_or("no stdout")?);
    let src_err = read_all_thread(child.stderr.take().ok_or("no stderr")?);

    let mut c = ControlClient::connect(&control, Duration::from_secs(30))?;
    // Let the guest run before migrating: wait for a first pass (an idle guest makes
    // none), then the given time.
    let deadline = Instant::now() + Duration::from_secs(60);
    if a.vm.working_set != 0 {
        loop {
            let st = c.call(&json!({"execute": "query-status"}), &mut |_| {})?;
            let passes: Vec<u64> = serde_json::from_value(st["passes"].clone()).unwrap_or_default();
            if !passes.is_empty() && passes.iter().all(|&p| p >= 1) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("the source guest made no pass in 60 s: {st}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(a.run_before);
    let mut args = serde_json::to_value(&a.options).map_err(|e| e.to_string())?;
    args["to"] = json!(to);
    let p = Progress::new();
    let mig = c.call(
        &json!({"execute": "migrate", "arguments": args}),
        &mut |v| p.event(v),
    );
    p.finish();
    if mig.is_err() {
        // The guest runs on the source again: stop it there and collect its verdict.
        let _ = c.call(&json!({"execute": "quit"}), &mut |_| {});
    }
    let src_status = src.wait_timeout(Duration::from_secs(60));
    let dst_status = match &mig {
        Ok(_) => dst.wait_timeout(Duration::from_secs(120)),
        // A destination whose migration failed exits by itself; do not wait long.
        Err(_) => dst.wait_timeout(Duration::from_secs(10)),
    };
    drop(src);
    drop(dst);
    let src_report: Value =
        serde_json::from_str(src_out.join().unwrap_or_default().trim()).unwrap_or(Value::Null);
    let dst_report: Value =
        serde_json::from_str(dst_out.join().unwrap_or_default().trim()).unwrap_or(Value::Null);
    let src_err = src_err.join().unwrap_or_default();
    let dst_all = dst_err.join().unwrap_or_default();
    let dst_err: String = dst_all
        .lines()
        .filter(|l| !l.starts_with("vcpu"))
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = a.vm.config();
    // The destination's console (its standard error, with --json): the passes the guest
    // printed there after the switchover.
    let console: Vec<u64> = dst_all
        .lines()
        .filter_map(|l| l.trim().strip_prefix("vcpu0 pass "))
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut out = json!({
        "destination_console": {
            "vcpu0_pass_lines": console.len(),
            "first_pass": console.first(),
            "last_pass": console.last(),
        },
        "mode": "precopy",
        "transport": a.transport,
        "mem_bytes": cfg.mem_bytes,
        "vcpus": cfg.vcpus,
        "working_set_bytes": cfg.working_set_bytes,
        "fill": cfg.fill,
        "downtime_limit_ms": a.options.downtime_limit_ms,
        "source_exit": src_status.map(|s| s.to_string()),
        "destination_exit": dst_status.map(|s| s.to_string()),
        "source": src_report,
        "destination": dst_report,
    });
    match mig {
        Ok(m) => {
            let bytes = m["bytes_on_wire"].as_f64().unwrap_or(0.0);
            let total = m["total_ms"].as_f64().unwrap_or(0.0);
            for k in [
                "guest",
                "total_ms",
                "downtime_ms",
                "expected_downtime_ms",
                "hash_ms",
                "bytes_on_wire",
                "pages",
                "iterations",
                "max_throttle_pct",
                "device_state_bytes",
                "tracker",
                "storage",
                "passes",
            ] {
                out[k] = m[k].clone();
            }
            out["iteration_details"] = out["passes"].take();
            out.as_object_mut().map(|o| o.remove("passes"));
            // The engine's own downtime: without the oracle's hash on the source and the
            // checks on the destination, both of which run while the guest is paused.
            out["downtime_without_checks_ms"] = json!(
                (m["downtime_ms"].as_f64().unwrap_or(0.0)
                    - m["hash_ms"].as_f64().unwrap_or(0.0)
                    - out["destination"]["verify_ms"].as_f64().unwrap_or(0.0))
                .max(0.0)
            );
            out["throughput_mb_s"] = json!(if total > 0.0 {
                bytes / total / 1e3
            } else {
                0.0
            });
            out["ram_throughput_mb_s"] = json!(if total > 0.0 {
                cfg.mem_bytes as f64 / total / 1e3
            } else {
                0.0
            });
            // Without the switchover check (--no-hash-check) the destination's oracle after
            // running is what remains.
            let verified = out["destination"]["verified"].as_bool() == Some(true)
                && (a.options.no_hash_check
                    || out["destination"]["hash_checked"].as_bool() == Some(true))
                && out["source"]["migrated"].as_bool() == Some(true);
            out["verified"] = json!(verified);
            out["error"] = if verified {
                Value::Null
            } else {
                json!(format!(
                    "verification failed; destination: {}; source stderr: {}; destination stderr: {}",
                    out["destination"]["error"],
                    src_err.trim(),
                    dst_err.trim()
                ))
            };
        }
        Err(e) => {
            out["guest"] = out["source"]["guest"].clone();
            out["verified"] = json!(false);
            out["source_verified"] = out["source"]["verified"].clone();
            out["error"] = json!(e);
        }
    }
    Ok(out)
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A human summary of the demo's report.
pub fn demo_summary(v: &Value) -> String {
    let mut s = String::new();
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    s.push_str(&format!(
        "pre-copy migration of a {} guest, {} MiB RAM, over {}\n",
        v["guest"].as_str().unwrap_or("?"),
        v["mem_bytes"].as_u64().unwrap_or(0) >> 20,
        v["transport"].as_str().unwrap_or("?")
    ));
    if let Some(e) = v["error"].as_str() {
        s.push_str(&format!("FAILED: {e}\n"));
        s.push_str(&format!(
            "the guest stayed on the source; source verified: {}\n",
            v["source_verified"]
        ));
        return s;
    }
    s.push_str(&format!(
        "total {:.0} ms, downtime {:.1} ms (limit {} ms), {:.1} MB on the wire, {:.0} MB/s\n",
        f("total_ms"),
        f("downtime_ms"),
        v["downtime_limit_ms"],
        f("bytes_on_wire") / 1e6,
        f("throughput_mb_s")
    ));
    s.push_str(&format!(
        "pages: {} zero, {} raw, {} zstd, {} delta; {} passes; max throttle {} %\n",
        v["pages"]["zero"],
        v["pages"]["raw"],
        v["pages"]["zstd"],
        v["pages"]["delta"],
        v["iterations"],
        v["max_throttle_pct"]
    ));
    s.push_str(&format!(
        "verified: {} (oracle and RAM hash at switchover, guest ran on: passes {} -> {})",
        v["verified"], v["destination"]["passes_at_switchover"], v["destination"]["passes_at_end"]
    ));
    s
}
