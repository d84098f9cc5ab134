//! End-to-end pre-copy migrations between real `vmm-demo` processes.
//!
//! Every test starts real processes (the `vmm-demo` binary, built on first use), waits on
//! conditions with deadlines, and kills its children by PID when it ends, pass or fail.
//! KVM tests print one line and skip where `/dev/kvm` cannot be used.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use vmm_demo::cli::{MigrateOptions, parse_phase};
use vmm_demo::protocol::{ErrorClass, RunState};
use vmm_demo::report::{DemoReport, MigrationReport, RunReport};
use vmm_demo::{GuestKind, Order, PAGE_SIZE};

mod common;

use common::{Destination, Source, bin, demo, demo_json, kvm_or_skip};

/// Checks a completed demo: verified, and the guest kept printing passes on the
/// destination after the switchover; the downtime is the engine's, the oracle checks
/// apart.
fn assert_migrated(r: &DemoReport, guest: GuestKind) {
    assert!(r.verified, "not verified: {r:#?}");
    assert_eq!(r.guest, Some(guest), "{r:#?}");
    assert!(r.error.is_none(), "{r:#?}");
    let m = r.migration.as_ref().expect("migration figures");
    let d = r.destination.as_ref().expect("the destination's report");
    let switch = d.passes_at_switchover[0];
    let first = r
        .destination_console
        .first_pass
        .expect("the destination printed passes");
    let last = r.destination_console.last_pass.unwrap();
    assert!(
        first > switch.saturating_sub(1) && last > first,
        "passes printed on the destination: {first}..{last}, switchover at {switch}"
    );
    assert!(d.hash_checked);
    assert!(m.pages.total() >= r.mem_bytes / PAGE_SIZE, "{:?}", m.pages);
    // Hashing RAM and checking it takes time on both sides; the engine's pause is what
    // is left of the guest's pause without it.
    let c = m.oracle_checks;
    assert!(
        c.source_hash_ms > 0.0 && c.destination_check_ms > 0.0,
        "{c:?}"
    );
    assert_eq!(c.destination_check_ms, d.verify_ms);
    assert!(m.downtime_ms <= m.paused_with_checks_ms, "{m:?}");
    assert!(
        m.downtime_ms == 0.0
            || (m.downtime_ms + c.total_ms() - m.paused_with_checks_ms).abs() < 1e-6,
        "{m:?}"
    );
    assert_eq!(m.downtime_without_checks_ms, m.downtime_ms);
}

/// The fields `scripts/bench-precopy.sh` reads, under the names it reads them by.
fn assert_has_script_fields(v: &Value) {
    for k in [
        "total_ms",
        "downtime_ms",
        "downtime_without_checks_ms",
        "paused_with_checks_ms",
        "bytes_on_wire",
        "throughput_mb_s",
        "iterations",
        "verified",
    ] {
        assert!(!v[k].is_null(), "report lacks {k}: {v:#}");
    }
    assert!(v["oracle_checks"]["source_hash_ms"].is_number(), "{v:#}");
    assert!(
        v["oracle_checks"]["destination_check_ms"].is_number(),
        "{v:#}"
    );
    assert!(v["destination"]["verify_ms"].is_number(), "{v:#}");
    assert!(v["iteration_details"][0]["bytes"].is_number(), "{v:#}");
    assert!(v["iteration_details"][0]["ms"].is_number(), "{v:#}");
}

#[test]
fn kvm_guest_over_tcp() {
    if !kvm_or_skip("kvm_guest_over_tcp") {
        return;
    }
    let (r, v) = demo_json(&[
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
    assert_migrated(&r, GuestKind::Kvm);
    assert_has_script_fields(&v);
    assert_eq!(v["destination"]["placement"], "prefault", "{v:#}");
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
    assert_migrated(&v, GuestKind::Kvm);
    // Falls back to prefaulting where userfaultfd is closed to us.
    let placement = v.destination.as_ref().unwrap().placement.as_str();
    if placement != "userfaultfd" {
        eprintln!("kvm_guest_over_unix_socket: userfaultfd not available, placed by {placement}");
        assert_eq!(placement, "prefault", "{v:#?}");
    }
}

/// An idle guest (no working set: its vCPUs halt) migrates like any other: verified by
/// the oracle on both sides, with no pass to make.
#[test]
fn idle_guests_migrate_halted() {
    let mut kinds = vec![GuestKind::Software];
    if kvm_or_skip("idle_guests_migrate_halted (KVM half)") {
        kinds.push(GuestKind::Kvm);
    }
    for guest in kinds {
        let v = demo(&[
            "--guest",
            guest.as_str(),
            "--mem",
            "32M",
            "--vcpus",
            "2",
            "--working-set",
            "0",
            "--run-after",
            "200ms",
        ]);
        assert!(v.verified, "{v:#?}");
        assert_eq!(v.guest, Some(guest));
        let d = v.destination.as_ref().unwrap();
        assert_eq!(d.passes_at_end, [0, 0], "{v:#?}");
        assert!(d.hash_checked, "{v:#?}");
    }
}

/// A guest walking its pages in scattered order, the post-copy benchmark's workload,
/// migrates verified: the order travels in the machine description, so the destination's
/// oracle judges every page against the same permutation, at the switchover and after
/// running the guest on. Two vCPUs over two RAM regions: one share, and its walk, cross
/// the hole between them.
#[test]
fn a_scattered_walk_migrates_verified() {
    let guest = if vmm_demo::kvm_available() {
        GuestKind::Kvm
    } else {
        eprintln!(
            "a_scattered_walk_migrates_verified: /dev/kvm is missing or not usable, migrating the software guest"
        );
        GuestKind::Software
    };
    let v = demo(&[
        "--guest",
        guest.as_str(),
        "--software-page-ns",
        "5000",
        "--mem",
        "16M",
        "--ram-regions",
        "2",
        "--vcpus",
        "2",
        "--working-set",
        "8M",
        "--order",
        "scattered",
        "--run-after",
        "500ms",
    ]);
    assert_migrated(&v, guest);
    assert_eq!(v.order, Order::Scattered, "{v:#?}");
    assert_eq!(v.source.as_ref().unwrap().order, Order::Scattered);
    let d = v.destination.as_ref().unwrap();
    assert_eq!(d.order, Some(Order::Scattered), "{v:#?}");
    assert_eq!(d.passes_at_switchover.len(), 2, "{v:#?}");
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
    assert_migrated(&v, GuestKind::Software);
    assert_eq!(v.destination.as_ref().unwrap().placement.as_str(), "write");
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
    assert_migrated(&v, GuestKind::Software);
    assert!(v.destination.as_ref().unwrap().preallocated, "{v:#?}");
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
    assert!(!v.verified, "{v:#?}");
    let e = v.error.as_deref().expect("an error");
    assert!(
        e.contains("did not converge") && e.contains("iteration limit"),
        "{e}"
    );
    assert!(
        e.contains("the guest dirties") && e.contains("MB/s") && e.contains("link carries"),
        "{e}"
    );
    // The guest stayed on the source and passes the oracle there.
    let s = v.source.as_ref().expect("the source's report");
    assert!(s.verified, "{v:#?}");
    assert!(!s.migrated);
    assert_eq!(s.status, RunState::Running);
    assert!(
        !v.destination.as_ref().is_some_and(|d| d.ran_guest),
        "a destination ran the guest: {v:#?}"
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
    assert!(v.verified, "{v:#?}");
    assert!(
        v.migration.as_ref().unwrap().max_throttle_pct >= 20,
        "{v:#?}"
    );
    assert_migrated(&v, v.guest.unwrap());
}

/// A local image is shared between the demo's two processes (one host), so the unsafe
/// setup here is a second disk in a format QEMU refuses to migrate on any storage (a VMDK
/// header); the first, the guest's, is a fresh raw image.
#[test]
fn an_unsafe_disk_setup_is_refused_unless_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    vmm_demo::virtio_blk::DiskImage::create_sparse(&raw, 1 << 20).unwrap();
    let disk = dir.path().join("disk.vmdk");
    let mut image = vec![0u8; 1 << 20];
    image[..4].copy_from_slice(b"KDMV");
    std::fs::write(&disk, image).unwrap();
    let (r, d) = (raw.display().to_string(), disk.display().to_string());
    let v = demo(&[
        "--mem",
        "32M",
        "--working-set",
        "1M",
        "--disk",
        &r,
        "--disk",
        &d,
        "--cache",
        "writeback",
        "--run-after",
        "200ms",
    ]);
    assert!(!v.verified, "{v:#?}");
    let e = v.error.as_deref().unwrap();
    assert!(
        e.contains("refusing to migrate")
            && e.contains("unsafe")
            && e.contains("--unsafe")
            && e.contains("format-blocks-migration")
            && e.contains("disk1"),
        "{e}"
    );
    assert!(v.source.as_ref().unwrap().verified);
    // The guest's own disk ran on the source, verified there.
    assert!(v.source.as_ref().unwrap().disk.is_some(), "{v:#?}");
    assert!(!v.destination.as_ref().is_some_and(|d| d.ran_guest));
}

#[test]
fn destination_killed_mid_migration_leaves_the_guest_running_on_the_source() {
    let mut src = Source::start(&[]);
    let mut dst = Destination::start();
    // 5 MB/s for 32 MiB of random RAM: seconds of bulk copy; kill at the first progress.
    let options = MigrateOptions {
        bandwidth: Some(5_000_000),
        ..MigrateOptions::default()
    };
    let e = src
        .migrate_killing_destination(&mut dst, options)
        .to_string();
    assert!(e.contains("connection") || e.contains("destination"), "{e}");
    src.runs_on_verified();
}

#[test]
fn cancel_at_each_phase_resumes_the_source_and_no_destination_runs() {
    let mut src = Source::start(&[]);
    for phase in ["setup", "bulk-copy", "iterating", "stop-and-copy"] {
        let dst = Destination::start();
        let options = MigrateOptions {
            cancel_at: Some(parse_phase(phase).unwrap()),
            ..MigrateOptions::default()
        };
        let r = src.migrate(&dst.addr, options, &mut |_| {});
        let e = r.expect_err("cancelled").to_string();
        assert!(
            e.contains(&format!("cancelled during {phase}")),
            "{phase}: {e}"
        );
        let (st, rep) = dst.report();
        assert!(!st.success(), "{phase}: the destination succeeded: {rep:?}");
        assert!(
            !rep.ran_guest,
            "{phase}: the destination ran the guest: {rep:?}"
        );
        let p = src.wait_passes_beyond(0);
        src.wait_passes_beyond(p + 1);
    }
    let report = src.quit();
    assert!(report.verified, "{report:#?}");
    assert!(!report.migrated);
}

/// A migration that fails after the engine paused the guest, on a source that then cannot
/// resume it: the error reply, `query-status` and the final report say the guest is
/// paused, with why; nothing claims it runs, and no destination ran it either.
#[test]
fn a_guest_the_engine_left_paused_is_reported_paused() {
    let mut src = Source::start(&[]);
    let dst = Destination::start();
    let options = MigrateOptions {
        cancel_at: Some(parse_phase("stop-and-copy").unwrap()),
        refuse_resume: true,
        ..MigrateOptions::default()
    };
    let e = src
        .migrate(&dst.addr, options, &mut |_| {})
        .expect_err("cancelled");
    let reply = e.reply().expect("an error reply");
    assert_eq!(reply.class, ErrorClass::MigrationFailed);
    let Some(RunState::Paused { reason }) = &reply.status else {
        panic!("the reply does not say the guest is paused: {reply:?}");
    };
    assert!(
        reason.contains("cancelled during stop-and-copy") && reason.contains("refuse_resume"),
        "{reason}"
    );
    let (st, rep) = dst.report();
    assert!(!st.success(), "the destination succeeded: {rep:?}");
    assert!(!rep.ran_guest, "the destination ran the guest: {rep:?}");

    let st = src.status();
    assert!(matches!(&st.state, RunState::Paused { .. }), "{st:?}");
    assert!(st.paused, "every vCPU is parked: {st:?}");
    // Paused, so no migration may start from there.
    let again = src
        .migrate("tcp:127.0.0.1:1", MigrateOptions::default(), &mut |_| {})
        .expect_err("a second migration of a paused guest");
    assert_eq!(again.reply().map(|r| r.class), Some(ErrorClass::WrongState));
    assert_eq!(src.status().passes, st.passes, "a paused guest made a pass");

    let report = src.quit();
    assert!(!report.verified, "{report:#?}");
    assert!(!report.migrated);
    assert!(
        matches!(&report.status, RunState::Paused { reason: r } if r == reason),
        "{report:#?}"
    );
    assert!(
        report
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("left paused"),
        "{report:#?}"
    );
    // The oracle still judged the guest's RAM: the failed migration lost nothing.
    assert!(report.oracle.is_some(), "{report:#?}");
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
        .migrate(&proxy_addr, MigrateOptions::default(), &mut |_| {})
        .expect_err("must be refused")
        .to_string();
    assert!(
        e.contains("the destination failed") && e.contains("page batch") && e.contains("CRC"),
        "{e}"
    );
    let (st, rep) = dst.report();
    assert!(!st.success());
    let de = rep.error.as_deref().unwrap_or_default();
    assert!(
        de.contains("page batch") && de.contains("offset"),
        "{rep:?}"
    );
    assert!(!rep.ran_guest);
    t.join().unwrap();
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 1);
    let report = src.quit();
    assert!(report.verified, "{report:#?}");
}

#[test]
fn migrate_command_moves_a_running_guest() {
    let src = Source::start(&[]);
    let dst = Destination::start();
    let sock = src.socket();
    let out = Command::new(bin())
        .args(["migrate", "--control"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--to", &dst.addr, "--json"])
        .output()
        .unwrap();
    let v: MigrationReport = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{v:?}");
    assert_eq!(v.to, dst.addr);
    // Standard error is a pipe here, not a terminal: no progress bar, no pass lines.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("pass 0:") && !err.contains("pages") && !err.contains('\r'),
        "progress output on a pipe: {err:?}"
    );
    let (st, rep) = dst.report();
    assert!(st.success(), "{rep:?}");
    assert!(rep.verified);
    let mut src = src;
    src.proc.wait(Duration::from_secs(30));
    let out = src.out.take().unwrap().join().unwrap();
    let report: RunReport = serde_json::from_str(out.trim()).unwrap();
    assert!(report.migrated, "{report:?}");
    assert_eq!(report.status, RunState::Migrated);
    assert_eq!(report.migration.as_ref(), Some(&v));
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
    let sock = src.socket();
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
    let v: MigrationReport = serde_json::from_str(stdout.trim()).unwrap();
    assert!(st.success(), "{v:?}");
    assert!(
        drawn.contains("pass 0:"),
        "no pass line on the terminal: {drawn:?}"
    );
    assert!(
        drawn.contains("pages"),
        "no progress bar on the terminal: {drawn:?}"
    );
    let (st, rep) = dst.report();
    assert!(st.success(), "{rep:?}");
    assert!(rep.verified);
}
