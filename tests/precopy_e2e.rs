//! End-to-end pre-copy migrations between real `vmm-demo` processes.
//!
//! Every test starts real processes (the `vmm-demo` binary, built on first use), waits on
//! conditions with deadlines, and kills its children by PID when it ends, pass or fail.
//! KVM tests print one line and skip where `/dev/kvm` cannot be used.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm_demo::commands::ControlClient;

/// The `vmm-demo` binary of this build profile, built once per test run.
fn bin() -> &'static Path {
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

fn kvm_or_skip(test: &str) -> bool {
    if vmm_demo::kvm_available() {
        true
    } else {
        eprintln!("{test}: skipped, /dev/kvm is missing or not usable");
        false
    }
}

/// A child process killed (by PID) and reaped when dropped.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
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

    fn kill(&mut self) {
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

fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

fn demo(args: &[&str]) -> Value {
    let out = Command::new(bin())
        .arg("demo")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("running vmm-demo demo");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("demo printed no JSON ({e}): {text}"))
}

/// Checks a completed demo: verified, and the guest kept printing passes on the
/// destination after the switchover.
fn assert_migrated(v: &Value, guest: &str) {
    assert_eq!(v["verified"], json!(true), "not verified: {v:#}");
    assert_eq!(v["guest"], json!(guest), "{v:#}");
    assert!(v["error"].is_null(), "{v:#}");
    for k in [
        "mode",
        "mem_bytes",
        "total_ms",
        "downtime_ms",
        "downtime_limit_ms",
        "bytes_on_wire",
        "pages",
        "iterations",
        "max_throttle_pct",
    ] {
        assert!(!v[k].is_null(), "report lacks {k}: {v:#}");
    }
    let switch = v["destination"]["passes_at_switchover"][0]
        .as_u64()
        .unwrap();
    let first = v["destination_console"]["first_pass"]
        .as_u64()
        .expect("the destination printed passes");
    let last = v["destination_console"]["last_pass"].as_u64().unwrap();
    assert!(
        first > switch.saturating_sub(1) && last > first,
        "passes printed on the destination: {first}..{last}, switchover at {switch}"
    );
    assert_eq!(v["destination"]["hash_checked"], json!(true));
    let pages = &v["pages"];
    let total: u64 = ["zero", "raw", "zstd", "delta"]
        .iter()
        .map(|k| pages[k].as_u64().unwrap())
        .sum();
    assert!(total >= v["mem_bytes"].as_u64().unwrap() / 4096, "{pages}");
}

#[test]
fn kvm_guest_over_tcp() {
    if !kvm_or_skip("kvm_guest_over_tcp") {
        return;
    }
    let v = demo(&[
        "--guest",
        "kvm",
        "--mem",
        "32M",
        "--working-set",
        "1M",
        "--transport",
        "tcp",
        "--run-after",
        "500ms",
    ]);
    assert_migrated(&v, "kvm");
    assert_eq!(v["destination"]["placement"], json!("prefault"), "{v:#}");
}

#[test]
fn kvm_guest_over_unix_socket() {
    if !kvm_or_skip("kvm_guest_over_unix_socket") {
        return;
    }
    let v = demo(&[
        "--guest",
        "kvm",
        "--mem",
        "32M",
        "--vcpus",
        "2",
        "--working-set",
        "2M",
        "--transport",
        "unix",
        "--placement",
        "userfaultfd",
        "--run-after",
        "500ms",
    ]);
    assert_migrated(&v, "kvm");
    // Falls back to prefaulting where userfaultfd is closed to us.
    let placement = v["destination"]["placement"].as_str().unwrap_or_default();
    if placement != "userfaultfd" {
        eprintln!("kvm_guest_over_unix_socket: userfaultfd not available, placed by {placement}");
        assert_eq!(placement, "prefault", "{v:#}");
    }
}

/// An idle guest (no working set: its vCPUs halt) migrates like any other: verified by
/// the oracle on both sides, with no pass to make.
#[test]
fn idle_guests_migrate_halted() {
    let mut kinds = vec!["software"];
    if kvm_or_skip("idle_guests_migrate_halted (KVM half)") {
        kinds.push("kvm");
    }
    for guest in kinds {
        let v = demo(&[
            "--guest",
            guest,
            "--mem",
            "32M",
            "--vcpus",
            "2",
            "--working-set",
            "0",
            "--run-after",
            "200ms",
        ]);
        assert_eq!(v["verified"], json!(true), "{v:#}");
        assert_eq!(v["guest"], json!(guest));
        assert_eq!(v["destination"]["passes_at_end"], json!([0, 0]), "{v:#}");
        assert_eq!(v["destination"]["hash_checked"], json!(true), "{v:#}");
    }
}

#[test]
fn software_guest_over_tcp() {
    let v = demo(&[
        "--guest",
        "software",
        "--software-page-ns",
        "5000",
        "--mem",
        "32M",
        "--working-set",
        "1M",
        "--transport",
        "tcp",
        "--placement",
        "write",
        "--run-after",
        "500ms",
    ]);
    assert_migrated(&v, "software");
    assert_eq!(v["destination"]["placement"], json!("write"), "{v:#}");
}

#[test]
fn software_guest_over_unix_socket_with_zstd_delta_and_preallocated_ram() {
    let v = demo(&[
        "--guest",
        "software",
        "--software-page-ns",
        "5000",
        "--mem",
        "32M",
        "--fill",
        "zero",
        "--working-set",
        "1M",
        "--transport",
        "unix",
        "--zstd",
        "--delta-cache",
        "8M",
        "--dst-prealloc",
        "--run-after",
        "500ms",
    ]);
    assert_migrated(&v, "software");
    assert_eq!(v["destination"]["preallocated"], json!(true), "{v:#}");
}

#[test]
fn a_guest_faster_than_the_link_fails_cleanly_at_its_limit() {
    // 3 MB/s and a 1 ms limit, as QEMU's tests do: the working set alone takes 0.3 s.
    let v = demo(&[
        "--mem",
        "32M",
        "--fill",
        "zero",
        "--working-set",
        "1M",
        "--bandwidth",
        "3M",
        "--downtime-limit",
        "1ms",
        "--max-iterations",
        "3",
        "--run-after",
        "200ms",
    ]);
    assert_eq!(v["verified"], json!(false), "{v:#}");
    let e = v["error"].as_str().expect("an error");
    assert!(
        e.contains("did not converge") && e.contains("iteration limit"),
        "{e}"
    );
    assert!(
        e.contains("the guest dirties") && e.contains("MB/s") && e.contains("link carries"),
        "{e}"
    );
    // The guest stayed on the source and passes the oracle there.
    assert_eq!(v["source"]["verified"], json!(true), "{v:#}");
    assert_eq!(v["source"]["migrated"], json!(false));
    assert_ne!(
        v["destination"]["ran_guest"],
        json!(true),
        "a destination ran the guest: {v:#}"
    );
}

#[test]
fn auto_converge_throttles_a_fast_guest_until_it_fits() {
    // A 1 MiB working set the guest rewrites hundreds of times a second, a 20 MB/s link
    // and a 10 ms limit: it only fits once the vCPU is throttled hard.
    let v = demo(&[
        "--mem",
        "32M",
        "--fill",
        "zero",
        "--working-set",
        "1M",
        "--bandwidth",
        "20M",
        "--downtime-limit",
        "10ms",
        "--auto-converge",
        "--max-time",
        "60s",
        "--run-after",
        "300ms",
    ]);
    assert_eq!(v["verified"], json!(true), "{v:#}");
    assert!(v["max_throttle_pct"].as_u64().unwrap() >= 20, "{v:#}");
    let guest = v["guest"].as_str().unwrap().to_string();
    assert_migrated(&v, &guest);
}

#[test]
fn an_unsafe_disk_setup_is_refused_unless_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let d = disk.display().to_string();
    let v = demo(&[
        "--mem",
        "32M",
        "--working-set",
        "1M",
        "--disk",
        &d,
        "--cache",
        "writeback",
        "--run-after",
        "200ms",
    ]);
    assert_eq!(v["verified"], json!(false), "{v:#}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("refusing to migrate") && e.contains("unsafe") && e.contains("--unsafe"),
        "{e}"
    );
    assert_eq!(v["source"]["verified"], json!(true));
    assert_ne!(v["destination"]["ran_guest"], json!(true));
}

/// A source (`run --control`) for the tests that drive the control socket themselves.
struct Source {
    proc: Proc,
    out: Option<std::thread::JoinHandle<String>>,
    ctl: ControlClient,
    _dir: tempfile::TempDir,
}

impl Source {
    fn start(extra: &[&str]) -> Source {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("control.sock");
        let mut child = Command::new(bin())
            .args([
                "run",
                "--mem",
                "32M",
                "--working-set",
                "1M",
                "--json",
                "--quiet",
                "--control",
            ])
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
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
            _dir: dir,
        };
        s.wait_passes_beyond(0);
        s
    }

    fn status(&mut self) -> Value {
        self.ctl
            .call(&json!({"execute": "query-status"}), &mut |_| {})
            .unwrap()
    }

    /// Waits until vCPU 0 has done more than `n` passes and the VM runs; returns its count.
    fn wait_passes_beyond(&mut self, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.status();
            let p = st["passes"][0].as_u64().unwrap();
            if p > n && st["status"] == json!("running") && st["paused"] == json!(false) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "the source guest does not run: {st}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn migrate(&mut self, args: Value, on_event: &mut dyn FnMut(&Value)) -> Result<Value, String> {
        self.ctl
            .call(&json!({"execute": "migrate", "arguments": args}), on_event)
    }

    /// Asks the source to stop and returns its run report (oracle on the source).
    fn quit(mut self) -> Value {
        self.ctl
            .call(&json!({"execute": "quit"}), &mut |_| {})
            .unwrap();
        self.proc.wait(Duration::from_secs(60));
        let out = self.out.take().unwrap().join().unwrap();
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("run printed no JSON ({e}): {out}"))
    }
}

/// A destination process listening on a kernel-chosen TCP port.
struct Destination {
    proc: Proc,
    addr: String,
    out: Option<std::thread::JoinHandle<String>>,
}

impl Destination {
    fn start() -> Destination {
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
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = err.read_to_string(&mut sink);
        });
        Destination {
            proc: Proc {
                child,
                name: "destination",
            },
            addr,
            out: Some(out),
        }
    }

    /// Waits for the destination to exit and returns its report.
    fn report(mut self) -> (std::process::ExitStatus, Value) {
        let st = self.proc.wait(Duration::from_secs(60));
        let out = self.out.take().unwrap().join().unwrap();
        (st, serde_json::from_str(out.trim()).unwrap_or(Value::Null))
    }
}

#[test]
fn destination_killed_mid_migration_leaves_the_guest_running_on_the_source() {
    let mut src = Source::start(&[]);
    let mut dst = Destination::start();
    let pid = dst.proc.child.id();
    let mut killed = false;
    // 5 MB/s for 32 MiB of random RAM: seconds of bulk copy; kill at the first progress.
    let r = src.migrate(json!({"to": dst.addr, "bandwidth": 5_000_000}), &mut |e| {
        if !killed && e["event"] == json!("progress") && e["pages_sent"].as_u64().unwrap_or(0) > 0 {
            killed = true;
            // Kill the destination by its PID, mid-stream.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    assert!(killed, "no progress event before the end: {r:?}");
    let e = r.expect_err("the migration must fail");
    assert!(e.contains("connection") || e.contains("destination"), "{e}");
    dst.proc.kill();
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 2);
    let report = src.quit();
    assert_eq!(report["verified"], json!(true), "{report:#}");
    assert_eq!(report["migrated"], json!(false));
}

#[test]
fn cancel_at_each_phase_resumes_the_source_and_no_destination_runs() {
    let mut src = Source::start(&[]);
    for phase in ["setup", "bulk-copy", "iterating", "stop-and-copy"] {
        let dst = Destination::start();
        let r = src.migrate(json!({"to": dst.addr, "cancel_at": phase}), &mut |_| {});
        let e = r.expect_err("cancelled");
        assert!(
            e.contains(&format!("cancelled during {phase}")),
            "{phase}: {e}"
        );
        let (st, rep) = dst.report();
        assert!(!st.success(), "{phase}: the destination succeeded: {rep}");
        assert_ne!(
            rep["ran_guest"],
            json!(true),
            "{phase}: the destination ran the guest: {rep}"
        );
        let p = src.wait_passes_beyond(0);
        src.wait_passes_beyond(p + 1);
    }
    let report = src.quit();
    assert_eq!(report["verified"], json!(true), "{report:#}");
    assert_eq!(report["migrated"], json!(false));
}

#[test]
fn a_corrupted_byte_is_refused_naming_the_record_and_the_source_resumes() {
    let mut src = Source::start(&[]);
    let dst = Destination::start();
    // A proxy that flips one bit 3 MB into the stream (inside a page batch of random RAM).
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = format!("tcp:{}", proxy.local_addr().unwrap());
    let target = dst.addr.strip_prefix("tcp:").unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut from_src, _) = proxy.accept().unwrap();
        let mut to_dst = TcpStream::connect(target).unwrap();
        let (mut back_dst, mut back_src) =
            (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
        let b = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
            let _ = back_src.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = vec![0u8; 65536];
        let mut off = 0usize;
        const AT: usize = 3_000_000;
        loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (off..off + n).contains(&AT) {
                buf[AT - off] ^= 0x04;
            }
            off += n;
            if to_dst.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
        let _ = b.join();
    });
    let e = src
        .migrate(json!({"to": proxy_addr}), &mut |_| {})
        .expect_err("must be refused");
    assert!(
        e.contains("the destination failed") && e.contains("page batch") && e.contains("CRC"),
        "{e}"
    );
    let (st, rep) = dst.report();
    assert!(!st.success());
    let de = rep["error"].as_str().unwrap_or_default();
    assert!(de.contains("page batch") && de.contains("offset"), "{rep}");
    assert_ne!(rep["ran_guest"], json!(true));
    t.join().unwrap();
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 1);
    let report = src.quit();
    assert_eq!(report["verified"], json!(true), "{report:#}");
}

#[test]
fn migrate_command_moves_a_running_guest() {
    let src = Source::start(&[]);
    let dst = Destination::start();
    let sock = src._dir.path().join("control.sock");
    let out = Command::new(bin())
        .args(["migrate", "--control"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--to", &dst.addr, "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{v}");
    assert_eq!(v["mode"], json!("precopy"));
    // Standard error is a pipe here, not a terminal: no progress bar, no pass lines.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("pass 0:") && !err.contains("pages") && !err.contains('\r'),
        "progress output on a pipe: {err:?}"
    );
    let (st, rep) = dst.report();
    assert!(st.success(), "{rep}");
    assert_eq!(rep["verified"], json!(true));
    let mut src = src;
    src.proc.wait(Duration::from_secs(30));
    let out = src.out.take().unwrap().join().unwrap();
    let report: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["migrated"], json!(true), "{report}");
}

/// With standard error on a terminal, `migrate` draws a progress bar and prints a line per
/// pass: run it on a pseudo-terminal and read what it drew.
#[test]
fn migrate_command_draws_progress_on_a_terminal() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the two ints; no name, termios or size given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipped migrate_command_draws_progress_on_a_terminal: no pseudo-terminal here: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: both fds were just opened for us and nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let src = Source::start(&[]);
    let dst = Destination::start();
    let sock = src._dir.path().join("control.sock");
    let mut child = Command::new(bin())
        .args(["migrate", "--control"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--to", &dst.addr, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    // Read the terminal while the child writes; the read ends (EIO) once the child, the
    // slave's last holder, exits.
    let term = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let st = child.wait().unwrap();
    let drawn = term.join().unwrap();
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(st.success(), "{v}");
    assert!(
        drawn.contains("pass 0:"),
        "no pass line on the terminal: {drawn:?}"
    );
    assert!(
        drawn.contains("pages"),
        "no progress bar on the terminal: {drawn:?}"
    );
    let (st, rep) = dst.report();
    assert!(st.success(), "{rep}");
    assert_eq!(rep["verified"], json!(true));
}
