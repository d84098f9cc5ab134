//! `vmm-demo demo`: a source (`run --control`) and a destination (`destination`) as two
//! processes on this host; migrate the guest from one to the other, verify, report.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::destination::LISTENING;
use super::progress::Progress;
use crate::cli::{DemoArgs, TransportKind};
use crate::client::ControlClient;
use crate::error::{Error, chain};
use crate::migration::source::MigrationControl;
use crate::protocol::MigrateRequest;
use crate::protocol::RunState;
use crate::report::{
    ConsoleSummary, DemoDisk, DemoMigration, DemoPostcopy, DemoReport, DemoStorage,
};

/// Kills and reaps a child process on drop, by its PID.
struct ChildGuard(Child);

impl ChildGuard {
    fn wait_timeout(&mut self, t: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + t;
        loop {
            if let Ok(Some(s)) = self.0.try_wait() {
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
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Removes the demo's scratch directory on drop.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_all_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// A child's `--json` report, or why there is none.
fn child_report<T: DeserializeOwned>(
    out: std::thread::JoinHandle<String>,
    who: &'static str,
) -> Result<T, Error> {
    let text = out.join().unwrap_or_default();
    serde_json::from_str(text.trim()).map_err(|source| Error::ChildReport {
        who,
        text: text.trim().chars().take(200).collect(),
        source,
    })
}

fn spawn(cmd: &mut Command, what: &'static str) -> Result<ChildGuard, Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(ChildGuard)
        .map_err(|source| Error::Child { what, source })
}

/// The exit status of a demo that reported `r` ([`crate::exit`]): a lost guest and a guest
/// paused on the destination after a post-copy commit have their own.
pub fn exit_status(r: &DemoReport) -> u8 {
    if r.verified {
        crate::exit::OK
    } else if r
        .source
        .as_ref()
        .is_some_and(|s| matches!(s.status, RunState::Lost { .. }))
    {
        crate::exit::GUEST_LOST
    } else if r
        .destination
        .as_ref()
        .is_some_and(|d| d.paused_after_commit)
    {
        crate::exit::PAUSED_INCOMPLETE
    } else {
        crate::exit::FAILED
    }
}

/// Runs `vmm-demo demo`. A migration that failed is in the report; an error is returned
/// only when the demo could not get that far (a process that would not start).
pub fn demo(a: &DemoArgs) -> Result<DemoReport, Error> {
    // Options that contradict each other are refused before any process starts.
    let requested = MigrationControl::new("tcp:127.0.0.1:1", &a.options)
        .map_err(Error::Options)?
        .mode();
    let exe = std::env::current_exe().map_err(|source| Error::Child {
        what: "finding this program to start its processes",
        source,
    })?;
    let dir = std::env::temp_dir().join(format!(
        "vmm-demo-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).map_err(|source| Error::File {
        what: "creating",
        path: dir.clone(),
        source,
    })?;
    let _cleanup = DirGuard(dir.clone());
    // The guest's disk: one image both processes open (shared storage), made here with
    // --disk-size or the first --disk when it is an existing file.
    let mut disks = a.disk.clone();
    if let Some(bytes) = a.disk_size {
        let path = dir.join("disk.raw");
        super::create_disk(&path, bytes, a.vm.disk_prefill, a.vm.seed)?;
        disks.insert(0, path.display().to_string());
    }
    let guest_disk = disks
        .first()
        .filter(|d| std::path::Path::new(d).is_file())
        .cloned();
    let control = dir.join("control.sock");
    let listen = match a.transport {
        TransportKind::Tcp => "tcp:127.0.0.1:0".to_string(),
        TransportKind::Unix => format!("unix:{}", dir.join("migration.sock").display()),
    };

    let mut cmd = Command::new(&exe);
    cmd.args(["destination", "--listen", &listen, "--json"]);
    match a.passes_after {
        Some(n) => cmd.args(["--passes", &n.to_string()]),
        None => cmd
            .arg("--run-for")
            .arg(format!("{}ms", a.run_after.as_millis())),
    };
    cmd.args(["--placement", a.placement.as_str()])
        .arg("--recovery-window")
        .arg(format!("{}ms", a.options.recovery_window_ms));
    // Copied (--copy-storage-*), the destination gets an image of its own, which it
    // creates for a full copy; shared, it opens the source's.
    let copying = a.options.copy_storage().is_some();
    let dst_disk = guest_disk.as_ref().map(|d| {
        if copying {
            dir.join("destination-disk.raw").display().to_string()
        } else {
            d.clone()
        }
    });
    if let Some(d) = &dst_disk {
        cmd.args(["--disk", d]);
    }
    if a.dst_prealloc {
        cmd.arg("--prealloc")
            .arg(a.vm.mem.to_string())
            .arg("--prealloc-regions")
            .arg(a.vm.ram_regions.to_string());
    }
    let mut dst = spawn(&mut cmd, "starting the destination")?;
    let dst_out = read_all_thread(
        dst.0
            .stdout
            .take()
            .ok_or(Error::ChildGone("the destination has no standard output"))?,
    );
    let mut dst_err = BufReader::new(
        dst.0
            .stderr
            .take()
            .ok_or(Error::ChildGone("the destination has no standard error"))?,
    );
    let mut line = String::new();
    let to = loop {
        line.clear();
        let n = dst_err
            .read_line(&mut line)
            .map_err(|source| Error::Child {
                what: "reading the destination's standard error",
                source,
            })?;
        if n == 0 {
            return Err(Error::ChildGone("the destination exited before listening"));
        }
        if let Some(addr) = line.trim().strip_prefix(LISTENING) {
            break addr.to_string();
        }
    };
    let dst_err = read_all_thread(dst_err);

    let mut cmd = Command::new(&exe);
    cmd.arg("run").args(a.vm.to_args()).args([
        "--control",
        &format!("unix:{}", control.display()),
        "--json",
        "--quiet",
    ]);
    for d in &disks {
        cmd.args(["--disk", d]);
    }
    if let Some(c) = a.cache {
        cmd.args(["--cache", c.as_str()]);
    }
    let mut src = spawn(&mut cmd, "starting the source")?;
    let src_out = read_all_thread(
        src.0
            .stdout
            .take()
            .ok_or(Error::ChildGone("the source has no standard output"))?,
    );
    let src_err = read_all_thread(
        src.0
            .stderr
            .take()
            .ok_or(Error::ChildGone("the source has no standard error"))?,
    );

    // A source that cannot build its VM exits at once: say why, rather than wait for its
    // socket.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        match ControlClient::connect(&control, Duration::from_millis(100)) {
            Ok(c) => break c,
            Err(e) => {
                if let Ok(Some(status)) = src.0.try_wait() {
                    let stderr = src_err.join().unwrap_or_default();
                    let tail: String = stderr.trim().chars().rev().take(2000).collect();
                    return Err(Error::ChildExited {
                        who: "source",
                        status,
                        stderr: tail.chars().rev().collect(),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
            }
        }
    };
    // Let the guest run before migrating: wait for a first pass (an idle guest makes
    // none), then the given time.
    let wait = Duration::from_secs(60);
    let deadline = Instant::now() + wait;
    if a.vm.working_set != 0 {
        loop {
            let st = c.query_status()?;
            if !st.passes.is_empty() && st.passes.iter().all(|&p| p >= 1) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::NoFirstPass {
                    secs: wait.as_secs(),
                    status: format!("{}, passes {:?}", st.state, st.passes),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(a.run_before);
    let p = Progress::new();
    let mig = c.migrate(
        MigrateRequest {
            to,
            options: a.options.clone(),
        },
        &mut |e| p.event(e),
    );
    p.finish();
    if mig.is_err() {
        // The guest is on the source again (running or left paused): stop it there and
        // collect its verdict. A source that does not answer is reported by its exit.
        let _ = c.quit();
    }
    let source_exit = src.wait_timeout(Duration::from_secs(60));
    let destination_exit = match &mig {
        Ok(_) => dst.wait_timeout(Duration::from_secs(120)),
        // A destination whose migration failed exits by itself; do not wait long.
        Err(_) => dst.wait_timeout(Duration::from_secs(10)),
    };
    drop(src);
    drop(dst);
    let source = child_report(src_out, "source");
    let destination = child_report(dst_out, "destination");
    let src_err = src_err.join().unwrap_or_default();
    let dst_all = dst_err.join().unwrap_or_default();
    let dst_err: Vec<&str> = dst_all.lines().filter(|l| !l.starts_with("vcpu")).collect();
    // The destination's console (its standard error, with --json): the passes the guest
    // printed there after the switchover.
    let console: Vec<u64> = dst_all
        .lines()
        .filter_map(|l| l.trim().strip_prefix("vcpu0 pass "))
        .filter_map(|p| p.parse().ok())
        .collect();
    let cfg = a.vm.config();
    let mut out = DemoReport {
        mode: requested,
        guest: None,
        transport: a.transport,
        mem_bytes: cfg.mem_bytes,
        vcpus: cfg.vcpus,
        working_set_bytes: cfg.working_set_bytes,
        fill: cfg.fill,
        order: cfg.order,
        downtime_limit_ms: a.options.downtime_limit_ms,
        migration: None,
        verified: false,
        error: None,
        failed_phase: None,
        source_exit: source_exit.map(|s| s.to_string()),
        destination_exit: destination_exit.map(|s| s.to_string()),
        source: None,
        destination: None,
        destination_console: ConsoleSummary {
            vcpu0_pass_lines: console.len(),
            first_pass: console.first().copied(),
            last_pass: console.last().copied(),
        },
        postcopy: None,
        disk: None,
        storage: None,
    };
    // A missing report is a problem of its own only after a completed migration: after a
    // failed one, a destination that was never connected is killed before it reports.
    let mut missing = Vec::new();
    match source {
        Ok(s) => out.source = Some(s),
        Err(e) => missing.push(chain(&e)),
    }
    match destination {
        Ok(d) => out.destination = Some(d),
        Err(e) => missing.push(chain(&e)),
    }
    let mut problems = Vec::new();
    out.guest = out.source.as_ref().map(|s| s.guest);
    match mig {
        Ok(m) => {
            out.guest = Some(m.guest);
            out.mode = m.mode;
            let check_ms = out.destination.as_ref().map_or(0.0, |d| d.verify_ms);
            out.migration = Some(DemoMigration::new(&m, check_ms));
            let dst_post = out.destination.as_ref().and_then(|d| d.postcopy.as_ref());
            if let (Some(s), Some(d)) = (&m.postcopy, dst_post) {
                out.postcopy = Some(DemoPostcopy::new(s, d));
            }
            let dst_ok = out.destination.as_ref().is_some_and(|d| {
                // Without the switchover check (--no-hash-check) the destination's oracle
                // after running is what remains; a post-copy is checked once every page
                // arrived instead, and must have come as one.
                d.verified
                    && if m.mode.is_postcopy() {
                        d.postcopy.is_some()
                    } else {
                        a.options.no_hash_check || d.hash_checked
                    }
            });
            // The disk: checked on the destination wherever RAM was, with its hash at a
            // pre-copy switch. A guest disk the destination did not report is a failure.
            if let Some(path) = &dst_disk {
                let dd = out.destination.as_ref().and_then(|d| d.disk.as_ref());
                let verified = dst_ok
                    && dd.is_some_and(|k| {
                        k.sectors_checked == k.working_set_sectors
                            && if m.mode.is_postcopy() {
                                k.sectors_checked_after_postcopy.is_some()
                            } else {
                                a.options.no_hash_check || k.hash_at_switch_equal == Some(true)
                            }
                    });
                out.disk = Some(DemoDisk {
                    path: path.clone(),
                    created: a.disk_size.is_some(),
                    verified,
                    sectors_checked: dd.map_or(0, |k| k.sectors_checked),
                    untouched_bytes_checked: dd.map_or(0, |k| k.untouched_bytes_checked),
                    hash_at_switch_equal: dd.and_then(|k| k.hash_at_switch_equal),
                    sectors_written_on_destination: dd.map_or(0, |k| k.device.sectors_written),
                });
            }
            if let Some(c) = &m.storage_copy {
                let verified = out.disk.as_ref().is_some_and(|k| k.verified)
                    && out
                        .destination
                        .as_ref()
                        .and_then(|d| d.storage.as_ref())
                        .is_some_and(|s| s.finished);
                out.storage = Some(DemoStorage::new(c, verified));
            }
            let disk_ok = out.disk.as_ref().is_none_or(|k| k.verified)
                && out.storage.as_ref().is_none_or(|s| s.disk_verified);
            let dst_ok = dst_ok && disk_ok;
            let src_ok = out.source.as_ref().is_some_and(|s| s.migrated);
            out.verified = dst_ok && src_ok;
            problems.append(&mut missing);
            if !out.verified {
                let dst_error = out
                    .destination
                    .as_ref()
                    .and_then(|d| d.error.clone())
                    .unwrap_or_default();
                problems.insert(
                    0,
                    format!(
                        "verification failed; destination: {dst_error}; source stderr: {}; destination stderr: {}",
                        src_err.trim(),
                        dst_err.join("\n").trim()
                    ),
                );
            }
        }
        Err(e) => {
            for m in &missing {
                tracing::debug!("{m}");
            }
            out.failed_phase = e.reply().and_then(|r| r.failed_phase.clone());
            problems.insert(0, chain(&e));
        }
    }
    if !problems.is_empty() {
        out.verified = false;
        out.error = Some(problems.join("; "));
    }
    Ok(out)
}
