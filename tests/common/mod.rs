//! What the end-to-end tests share: the `vmm-demo` binary, child processes killed by PID
//! when dropped, the demo, a source (`run --control`) and a destination process, and a
//! TCP proxy that can cut, hold or redirect the connections through it ([`proxy`]).
#![allow(dead_code)]

pub mod proxy;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_demo::cli::MigrateOptions;
use vmm_demo::protocol::{Event, MigrateRequest, RunState, StatusReply};
use vmm_demo::report::{DemoReport, DestinationReport, MigrationMode, MigrationReport, RunReport};
use vmm_demo::{ClientError, ControlClient, GuestKind};

/// The `vmm-demo` binary of this build profile, built once per test run.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target/<profile>/vmm-demo
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut c = Command::new(cargo);
        c.args(["build", "-q", "-p", "vmm-demo", "--bin", "vmm-demo"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            c.arg("--release");
        }
        let st = c.status().expect("running cargo build for vmm-demo");
        assert!(st.success(), "building vmm-demo failed");
        let p = profile_dir.join("vmm-demo");
        assert!(p.exists(), "{} missing after the build", p.display());
        p
    })
}

/// True if KVM tests can run; otherwise says why `test` skips.
pub fn kvm_or_skip(test: &str) -> bool {
    if vmm_demo::kvm_available() {
        true
    } else {
        eprintln!("{test}: skipped, /dev/kvm is missing or not usable");
        false
    }
}

/// The KVM guest where `/dev/kvm` can be used; the software guest otherwise, saying so.
pub fn guest_for(test: &str) -> GuestKind {
    if vmm_demo::kvm_available() {
        GuestKind::Kvm
    } else {
        eprintln!("{test}: /dev/kvm is missing or not usable, migrating the software guest");
        GuestKind::Software
    }
}

/// The VM options of a guest of `kind`: the software one paced like the KVM guest under
/// nested virtualisation, so that both dirty pages at comparable rates.
pub fn guest_args(kind: GuestKind) -> Vec<String> {
    let mut v = vec!["--guest".to_string(), kind.as_str().to_string()];
    if kind == GuestKind::Software {
        v.extend(["--software-page-ns".to_string(), "5000".to_string()]);
    }
    v
}

/// A child process killed (by PID) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Proc {
    /// Waits for the process to exit; fails the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process by its PID (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Reads all of `r` on a thread.
pub fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Runs `vmm-demo demo --json`: its report, typed, and as the JSON scripts read, and its
/// exit status (checked against the report's `verified`).
pub fn demo_run(args: &[&str]) -> (DemoReport, Value, ExitStatus) {
    let out = Command::new(bin())
        .arg("demo")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running vmm-demo demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("demo printed no JSON ({e}): {text}"));
    let r: DemoReport = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("demo printed no report ({e}): {v:#}"));
    assert_eq!(
        out.status.success(),
        r.verified,
        "exit {:?} for {r:#?}",
        out.status
    );
    (r, v, out.status)
}

/// [`demo_run`] without the exit status.
pub fn demo_json(args: &[&str]) -> (DemoReport, Value) {
    let (r, v, _) = demo_run(args);
    (r, v)
}

/// [`demo_run`]'s typed report alone.
pub fn demo(args: &[&str]) -> DemoReport {
    demo_run(args).0
}

/// [`demo_json`] of a guest of `guest` (its [`guest_args`]) with `extra` options.
pub fn demo_with(guest: GuestKind, extra: &[&str]) -> (DemoReport, Value) {
    let mut a = guest_args(guest);
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    demo_json(&a)
}

/// Checks a demo of a guest with a disk (whose working set is `disk_ws` sectors) that
/// moved by `mode`, shared or copied: verified, RAM and disk; the disk oracle checked
/// every working-set sector on the destination, the guest wrote its disk there and made
/// passes there; at a pre-copy switch the disk hashes were equal; the storage policy
/// allowed the disk.
pub fn assert_disk_migrated(r: &DemoReport, v: &Value, disk_ws: u64, mode: MigrationMode) {
    assert!(r.verified, "not verified: {r:#?}");
    assert_eq!(r.mode, mode, "{r:#?}");
    let k = r.disk.as_ref().expect("the demo's disk report");
    assert!(k.verified, "{k:#?}");
    assert_eq!(k.sectors_checked, disk_ws, "{k:#?}");
    assert!(k.sectors_written_on_destination > 0, "{k:#?}");
    assert_eq!(v["disk"]["verified"], true, "{v:#}");
    let d = r.destination.as_ref().expect("the destination's report");
    let dd = d.disk.as_ref().expect("the destination's disk report");
    assert_eq!(dd.device.errors, 0, "{dd:#?}");
    assert_eq!(dd.sectors_checked, disk_ws, "{dd:#?}");
    match mode {
        MigrationMode::Precopy => {
            assert_eq!(k.hash_at_switch_equal, Some(true), "{k:#?}");
            assert_eq!(dd.sectors_checked_at_switch, Some(disk_ws), "{dd:#?}");
            assert!(d.hash_checked, "{d:#?}");
        }
        _ => {
            assert_eq!(k.hash_at_switch_equal, None, "{k:#?}");
            assert_eq!(dd.sectors_checked_after_postcopy, Some(disk_ws), "{dd:#?}");
            let p = d.postcopy.as_ref().expect("the post-copy report");
            assert_eq!(
                p.pages.precopied + p.pages.pushed + p.pages.requested,
                r.mem_bytes / vmm_demo::PAGE_SIZE,
                "every page came once: {p:#?}"
            );
        }
    }
    // The guest went on here (the demo waits for 3 more passes of every vCPU), and its
    // disk is at the passes it made here.
    let base = d.passes_at_switchover.iter().copied().min().unwrap();
    for (i, x) in dd.verdicts.iter().enumerate() {
        // The disk oracle read the same pass counter as the RAM oracle, at the end.
        assert_eq!(x.pass, d.passes_at_end[i], "{dd:#?}");
        assert!(x.pass >= base + 3, "{d:#?}");
    }
    let first = r
        .destination_console
        .first_pass
        .expect("the guest printed passes on the destination");
    // The console may drop lines when its reader is slower than the guest: the passes
    // above are the measure, the console only shows the guest printed there.
    assert!(r.destination_console.last_pass.unwrap() >= first, "{r:#?}");
    // The storage check allowed the local image: both processes are on this host, or
    // the disk is copied.
    let storage = r
        .migration
        .as_ref()
        .and_then(|m| m.storage.as_deref())
        .unwrap_or_default();
    assert!(
        storage.contains("safe") && !storage.contains("--unsafe"),
        "{storage}"
    );
}

/// A source (`run --control`) for the tests that drive the control socket themselves.
pub struct Source {
    pub proc: Proc,
    pub out: Option<std::thread::JoinHandle<String>>,
    pub ctl: ControlClient,
    pub dir: tempfile::TempDir,
}

impl Source {
    /// A 32 MiB guest with a 1 MiB working set (the software guest where KVM is missing,
    /// as `--guest auto` picks), with `extra` options.
    pub fn start(extra: &[&str]) -> Source {
        let mut args = vec!["--mem", "32M", "--working-set", "1M"];
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    /// A source with exactly the VM options `vm` (and `run`'s other options).
    pub fn start_with(vm: &[&str]) -> Source {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let mut child = Command::new(bin())
            .args(["run", "--json", "--quiet", "--control"])
            .arg(format!("unix:{}", sock.display()))
            .args(vm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = reader(child.stdout.take().unwrap());
        let proc = Proc {
            child,
            name: "source",
        };
        let ctl = ControlClient::connect(&sock, Duration::from_secs(30)).unwrap();
        let mut s = Source {
            proc,
            out: Some(out),
            ctl,
            dir,
        };
        s.wait_passes_beyond(0);
        s
    }

    /// The control socket's path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// A second connection to the control socket (the first is busy during `migrate`).
    pub fn second_client(&self) -> ControlClient {
        ControlClient::connect(&self.socket(), Duration::from_secs(10)).unwrap()
    }

    pub fn status(&mut self) -> StatusReply {
        self.ctl.query_status().unwrap()
    }

    /// Waits until vCPU 0 has done more than `n` passes and the VM runs; returns its count.
    pub fn wait_passes_beyond(&mut self, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.status();
            let p = st.passes[0];
            if p > n && st.state == RunState::Running && !st.paused {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "the source guest does not run: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn migrate(
        &mut self,
        to: &str,
        options: MigrateOptions,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<MigrationReport, ClientError> {
        self.ctl.migrate(
            MigrateRequest {
                to: to.to_string(),
                options,
            },
            on_event,
        )
    }

    /// Migrates to `dst` with `options` (slow enough to be caught mid-way) and kills the
    /// destination by its PID at the first progress event; checks that the migration failed
    /// with the guest running here, and returns the error.
    pub fn migrate_killing_destination(
        &mut self,
        dst: &mut Destination,
        options: MigrateOptions,
    ) -> ClientError {
        let pid = dst.proc.child.id();
        let mut killed = false;
        let addr = dst.addr.clone();
        let r = self.migrate(&addr, options, &mut |e| {
            if !killed && matches!(e, Event::Progress { pages_sent, .. } if *pages_sent > 0) {
                killed = true;
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        assert!(killed, "no progress event before the end: {r:?}");
        let e = r.expect_err("the migration must fail");
        let reply = e.reply().expect("an error reply");
        assert_eq!(reply.class, vmm_demo::protocol::ErrorClass::MigrationFailed);
        assert_eq!(reply.status, Some(RunState::Running), "{reply:?}");
        dst.proc.kill();
        e
    }

    /// Waits until the guest ran two more passes here, then quits and checks that the
    /// source's guest was verified and not migrated.
    pub fn runs_on_verified(mut self) {
        let p = self.wait_passes_beyond(0);
        self.wait_passes_beyond(p + 2);
        let report = self.quit();
        assert!(report.verified, "{report:#?}");
        assert!(!report.migrated);
    }

    /// Asks the source to stop and returns its run report (oracle on the source) and its
    /// exit status, checked against the report: 0 verified, 3 lost, 2 otherwise.
    pub fn quit_status(mut self) -> (RunReport, ExitStatus) {
        // A migrated source exits by itself, so quit may find its socket gone: the exit
        // status and report below say how it ended either way.
        if let Err(e) = self.ctl.quit() {
            eprintln!("source: quit not delivered ({e}); waiting for its exit");
        }
        let st = self.proc.wait(Duration::from_secs(60));
        let out = self.out.take().unwrap().join().unwrap();
        let r: RunReport = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("run printed no report ({e}): {out}"));
        let expected = if r.verified {
            0
        } else if matches!(r.status, RunState::Lost { .. }) {
            3
        } else {
            2
        };
        assert_eq!(st.code(), Some(expected), "{r:#?}");
        (r, st)
    }

    /// [`quit_status`](Self::quit_status)'s report alone.
    pub fn quit(self) -> RunReport {
        self.quit_status().0
    }
}

/// A destination process listening on a kernel-chosen TCP port.
pub struct Destination {
    pub proc: Proc,
    pub addr: String,
    pub out: Option<std::thread::JoinHandle<String>>,
    pub err: Option<std::thread::JoinHandle<String>>,
}

impl Destination {
    /// A destination that runs the guest 300 ms after the migration.
    pub fn start() -> Destination {
        Self::start_with(&[])
    }

    /// A destination with `extra` options.
    pub fn start_with(extra: &[&str]) -> Destination {
        let mut child = Command::new(bin())
            .args([
                "destination",
                "--listen",
                "tcp:127.0.0.1:0",
                "--json",
                "--quiet",
                "--run-for",
                "300ms",
                "--idle-timeout",
                "30s",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = reader(child.stdout.take().unwrap());
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "the destination exited before listening"
            );
            if let Some(a) = line
                .trim()
                .strip_prefix("vmm-demo destination: listening on ")
            {
                break a.to_string();
            }
        };
        Destination {
            proc: Proc {
                child,
                name: "destination",
            },
            addr,
            out: Some(out),
            err: Some(reader(err)),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Ends the destination (killed if it still runs) and returns what it wrote on
    /// standard error: for a failing test to show.
    pub fn stderr(mut self) -> String {
        self.proc.kill();
        self.err
            .take()
            .map(|e| e.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Waits for the destination to exit and returns its exit status and report.
    pub fn report(mut self) -> (ExitStatus, DestinationReport) {
        let st = self.proc.wait(Duration::from_secs(60));
        let out = self.out.take().unwrap().join().unwrap();
        let err = self.err.take().unwrap().join().unwrap();
        // Shown with the test's output when it fails.
        for l in err.lines().filter(|l| !l.starts_with("vcpu")) {
            eprintln!("destination: {l}");
        }
        let r = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!("destination printed no report ({e}): {out}; standard error: {err}")
        });
        (st, r)
    }
}
