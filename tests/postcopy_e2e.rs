//! End-to-end post-copy and hybrid migrations between real `vmm-demo` processes: over TCP
//! and unix sockets, a guest faster than a capped link, connections cut (by a proxy the
//! test controls) right after the commit, in the middle, near the end and again during
//! recovery, recovery pointed at a new address, and each side killed.
//!
//! The guest is the KVM guest where `/dev/kvm` can be used and the software guest
//! otherwise (each test says which it ran); it walks a working set in scattered order, so
//! that after the switch it touches pages all over RAM, most of them still on the source.
//! Every wait has a deadline; children are killed by PID when a test ends.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::proxy::Proxy;
use common::{Destination, Source, bin, demo_run, guest_args, guest_for, reader};
use vmm_demo::cli::{MigrateOptions, PostcopyAfter};
use vmm_demo::protocol::{ErrorClass, Event, RunState};
use vmm_demo::report::{DemoReport, DestinationReport, MigrationMode, MigrationReport};
use vmm_demo::{ClientError, GuestKind, PAGE_SIZE};

/// Guest RAM of the tests that drive the processes themselves.
const MEM: u64 = 64 << 20;

fn is_phase(e: &Event, name: &str) -> bool {
    matches!(e, Event::Phase { phase } if phase.to_string() == name)
}

/// The demo's VM options: `mem` of RAM, a scattered working set, `vcpus`.
fn demo_vm(guest: GuestKind, mem: &str, ws: &str, vcpus: u32) -> Vec<String> {
    let mut v = guest_args(guest);
    v.extend(
        [
            "--mem",
            mem,
            "--working-set",
            ws,
            "--order",
            "scattered",
            "--vcpus",
            &vcpus.to_string(),
        ]
        .map(String::from),
    );
    v
}

fn run_demo(args: &[String]) -> DemoReport {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    demo_run(&a).0
}

/// Checks a demo that moved the guest by post-copy (`mode`): verified, every page came
/// (by fault, pushed, or pre-copied and kept), the guest faulted and was served, and it
/// kept printing passes on the destination after the switch.
fn assert_postcopied(r: &DemoReport, mode: MigrationMode, guest: GuestKind) {
    assert!(r.verified, "not verified: {r:#?}");
    assert_eq!(r.mode, mode, "{r:#?}");
    assert_eq!(r.guest, Some(guest), "{r:#?}");
    let d = r.destination.as_ref().expect("the destination's report");
    assert_eq!(d.migration_mode, Some(mode), "{d:#?}");
    assert!(!d.hash_checked, "a post-copy has no hash to check: {d:#?}");
    let p = d
        .postcopy
        .as_ref()
        .expect("the destination's post-copy report");
    let pages = r.mem_bytes / PAGE_SIZE;
    assert_eq!(
        p.pages.precopied + p.pages.pushed + p.pages.requested,
        pages,
        "every page came once: {p:#?}"
    );
    // A pure post-copy's guest faults on its first touch; a hybrid's only where it
    // touches a page dirtied since it was last sent before the push brings it, which the
    // scheduler decides: then only the figures' consistency is checked.
    if mode == MigrationMode::Postcopy {
        assert!(
            p.faults > 0 && p.requests > 0 && p.pages.requested > 0,
            "the guest faulted on pages the source still had, and they were served: {p:#?}"
        );
        assert!(
            p.blocktime.vcpus_ms.iter().any(|&b| b > 0.0),
            "the vCPUs waited for pages: {p:#?}"
        );
    }
    assert!(p.pages.requested <= p.requests, "{p:#?}");
    let l = &p.fault_latency;
    assert!(l.p50_us <= l.p99_us && l.p99_us <= l.max_us, "{l:#?}");
    assert_eq!(l.buckets.iter().map(|b| b.count).sum::<u64>(), l.count);
    assert!(l.count <= p.faults, "{p:#?}");
    assert_eq!(p.blocktime.vcpus_ms.len(), r.vcpus as usize, "{p:#?}");
    assert!(p.check_ms > 0.0, "{p:#?}");
    let s = r.postcopy.as_ref().expect("the demo's post-copy figures");
    assert_eq!(s.requests, p.requests);
    assert_eq!(s.pages, p.pages);
    let m = r
        .source
        .as_ref()
        .and_then(|s| s.migration.as_ref())
        .unwrap();
    let sp = m.postcopy.as_ref().expect("the source's post-copy report");
    assert!(
        sp.pages_pushed + sp.pages_requested >= p.pages.pushed + p.pages.requested,
        "{sp:#?} {p:#?}"
    );
    if mode == MigrationMode::Hybrid {
        assert!(p.pages.precopied > 0, "{p:#?}");
        assert!(sp.switch_reason.is_some(), "{sp:#?}");
    } else {
        assert_eq!(p.pages.precopied, 0, "{p:#?}");
        assert_eq!(m.iterations, 0, "{m:#?}");
    }
    let switch = d.passes_at_switchover[0];
    let first = r
        .destination_console
        .first_pass
        .expect("the guest printed passes on the destination");
    let last = r.destination_console.last_pass.unwrap();
    assert!(
        first > switch.saturating_sub(1) && last > first,
        "passes printed on the destination: {first}..{last}, switch at {switch}"
    );
    assert!(d.passes_at_end[0] > switch, "{d:#?}");
}

#[test]
fn pure_postcopy_over_tcp() {
    let guest = guest_for("pure_postcopy_over_tcp");
    let mut a = demo_vm(guest, "64M", "16M", 2);
    a.extend(["--postcopy", "--transport", "tcp", "--run-after", "500ms"].map(String::from));
    let r = run_demo(&a);
    assert_postcopied(&r, MigrationMode::Postcopy, guest);
    assert!(r.postcopy.as_ref().unwrap().switch_reason.is_none());
}

#[test]
fn pure_postcopy_over_a_unix_socket() {
    let guest = guest_for("pure_postcopy_over_a_unix_socket");
    let mut a = demo_vm(guest, "64M", "16M", 1);
    a.extend(["--postcopy", "--transport", "unix", "--run-after", "500ms"].map(String::from));
    let r = run_demo(&a);
    assert_postcopied(&r, MigrationMode::Postcopy, guest);
}

/// A hybrid whose pre-copy cannot converge (a 1 ms downtime limit for a 16 MiB working
/// set) switches by itself (`--postcopy-after` alone means `auto`).
#[test]
fn hybrid_switches_by_itself_over_tcp() {
    let guest = guest_for("hybrid_switches_by_itself_over_tcp");
    let mut a = demo_vm(guest, "64M", "16M", 1);
    a.extend(
        [
            "--postcopy-after",
            "--downtime-limit",
            "1ms",
            // A capped link: a guest slowed by a loaded machine (or nested KVM) dirties
            // too little to keep an uncapped pre-copy from converging in its first pass.
            "--bandwidth",
            "100M",
            "--transport",
            "tcp",
            "--run-after",
            "500ms",
        ]
        .map(String::from),
    );
    let r = run_demo(&a);
    assert_postcopied(&r, MigrationMode::Hybrid, guest);
    let reason = r.postcopy.as_ref().unwrap().switch_reason.clone().unwrap();
    assert!(
        reason.contains("does not converge") || reason.contains("limit"),
        "{reason}"
    );
}

#[test]
fn hybrid_after_two_passes_over_a_unix_socket() {
    let guest = guest_for("hybrid_after_two_passes_over_a_unix_socket");
    let mut a = demo_vm(guest, "64M", "16M", 2);
    a.extend(
        [
            "--postcopy-after",
            "2",
            "--downtime-limit",
            "1ms",
            // Capped, so that a slowed guest's pre-copy cannot converge before its passes.
            "--bandwidth",
            "100M",
            "--transport",
            "unix",
            "--run-after",
            "500ms",
        ]
        .map(String::from),
    );
    let r = run_demo(&a);
    assert_postcopied(&r, MigrationMode::Hybrid, guest);
    let m = r.migration.as_ref().unwrap();
    // The bulk pass and two passes over dirty pages.
    assert_eq!(m.iterations, 3, "{m:#?}");
}

/// A guest that dirties its working set faster than a 3 MB/s link carries it: pre-copy
/// alone gives up ("did not converge") and the guest stays on the source; a hybrid on the
/// same link completes, verified, and says how many faults it served.
#[test]
fn a_guest_faster_than_a_capped_link_needs_a_hybrid() {
    let guest = guest_for("a_guest_faster_than_a_capped_link_needs_a_hybrid");
    let mut base = demo_vm(guest, "32M", "1M", 1);
    base.extend(
        [
            "--fill",
            "zero",
            "--bandwidth",
            "3M",
            "--downtime-limit",
            "1ms",
            "--max-iterations",
            "3",
            "--run-after",
            "500ms",
        ]
        .map(String::from),
    );
    let pre = run_demo(&base);
    assert!(!pre.verified, "{pre:#?}");
    let e = pre.error.as_deref().unwrap_or_default();
    assert!(e.contains("did not converge"), "{e}");
    assert!(
        pre.source
            .as_ref()
            .is_some_and(|s| s.verified && !s.migrated)
    );

    let mut hybrid = base.clone();
    hybrid.extend(["--postcopy-after", "auto"].map(String::from));
    let r = run_demo(&hybrid);
    assert_postcopied(&r, MigrationMode::Hybrid, guest);
    let p = r.postcopy.as_ref().unwrap();
    eprintln!(
        "a_guest_faster_than_a_capped_link_needs_a_hybrid: {} faults served by {} requests, {} pages by fault, switched: {:?}",
        p.faults, p.requests, p.pages.requested, p.switch_reason
    );
}

/// A source and a destination driven by the test, with a proxy between them.
struct Pair {
    src: Source,
    dst: Destination,
    proxy: Proxy,
    guest: GuestKind,
}

impl Pair {
    /// Fails the test with the migration's error and what the destination said.
    fn fail(self, e: ClientError) -> ! {
        let err = self.dst.stderr();
        panic!("the post-copy did not complete: {e}\ndestination's standard error:\n{err}");
    }

    fn start(test: &str, dst_window: &str) -> Pair {
        let guest = guest_for(test);
        let vm = demo_vm(guest, "64M", "8M", 1);
        let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
        let src = Source::start_with(&vm);
        let dst = Destination::start_with(&["--recovery-window", dst_window]);
        let proxy = Proxy::start(&dst.addr);
        Pair {
            src,
            dst,
            proxy,
            guest,
        }
    }
}

fn postcopy_options(window_ms: u64) -> MigrateOptions {
    MigrateOptions {
        postcopy: true,
        recovery_window_ms: window_ms,
        ..MigrateOptions::default()
    }
}

/// Checks a post-copy that recovered from cuts: migrated, verified on the destination,
/// and both sides counted `recoveries` recoveries at least.
fn assert_recovered(
    r: &MigrationReport,
    st: std::process::ExitStatus,
    d: &DestinationReport,
    recoveries: usize,
) {
    assert!(st.success(), "{d:#?}");
    assert!(d.verified, "{d:#?}");
    let p = d.postcopy.as_ref().unwrap();
    assert_eq!(
        p.pages.pushed + p.pages.requested,
        MEM / PAGE_SIZE,
        "every page came once: {p:#?}"
    );
    let sp = r.postcopy.as_ref().unwrap();
    assert!(sp.recoveries.len() >= recoveries, "{sp:#?}");
    assert!(p.recoveries.len() >= recoveries, "{p:#?}");
    assert!(
        sp.recoveries.iter().all(|r| r.ms > 0.0 && r.attempts >= 1),
        "{sp:#?}"
    );
}

#[test]
fn a_cut_just_after_the_commit_is_recovered() {
    let mut t = Pair::start("a_cut_just_after_the_commit_is_recovered", "30s");
    let proxy = &t.proxy;
    let mut cut = false;
    let addr = proxy.addr().to_string();
    let r = t.src.migrate(&addr, postcopy_options(30_000), &mut |e| {
        if !cut && is_phase(e, "postcopy") {
            cut = true;
            proxy.cut();
        }
    });
    let r = match r {
        Ok(r) => r,
        Err(e) => t.fail(e),
    };
    assert!(cut, "no post-copy phase event");
    let (st, d) = t.dst.report();
    assert_recovered(&r, st, &d, 1);
    let report = t.src.quit();
    assert!(report.migrated, "{report:#?}");
    eprintln!(
        "a_cut_just_after_the_commit_is_recovered ({} guest): recoveries {:?}",
        t.guest,
        r.postcopy.unwrap().recoveries
    );
}

#[test]
fn cuts_in_the_middle_and_near_the_end_are_recovered() {
    let mut t = Pair::start("cuts_in_the_middle_and_near_the_end_are_recovered", "30s");
    t.proxy.cut_at(MEM / 2);
    t.proxy.cut_at(MEM * 9 / 10);
    let addr = t.proxy.addr().to_string();
    let r = t.src.migrate(&addr, postcopy_options(30_000), &mut |_| {});
    let r = match r {
        Ok(r) => r,
        Err(e) => t.fail(e),
    };
    assert_eq!(t.proxy.cuts(), 2, "both marks were reached");
    let (st, d) = t.dst.report();
    assert_recovered(&r, st, &d, 2);
    assert!(t.src.quit().migrated);
}

/// The connections are cut, and cut again as soon as the source's first new connection
/// carried its resume header: the recovery itself fails, and is tried again.
#[test]
fn a_second_cut_during_recovery_is_recovered() {
    let mut t = Pair::start("a_second_cut_during_recovery_is_recovered", "30s");
    t.proxy.cut_at(MEM / 4);
    t.proxy.cut_reconnections(1);
    let addr = t.proxy.addr().to_string();
    let r = t.src.migrate(&addr, postcopy_options(30_000), &mut |_| {});
    let r = match r {
        Ok(r) => r,
        Err(e) => t.fail(e),
    };
    assert_eq!(
        t.proxy.cuts(),
        2,
        "cut once, then again during the recovery"
    );
    let (st, d) = t.dst.report();
    assert_recovered(&r, st, &d, 1);
    let sp = r.postcopy.as_ref().unwrap();
    let attempts: u32 = sp.recoveries.iter().map(|r| r.attempts).sum();
    assert!(
        sp.recoveries.len() >= 2 || attempts >= 2,
        "the cut recovery was tried again: {sp:#?}"
    );
    assert!(t.src.quit().migrated);
}

/// The link through one address goes down for good while the source's bytes are held
/// mid-way; the operator points recovery at another (`migrate-recover`), and the
/// post-copy completes through it. Meanwhile cancel and a switch are refused with why.
#[test]
fn recovery_follows_the_address_an_operator_gives() {
    let mut t = Pair::start("recovery_follows_the_address_an_operator_gives", "30s");
    t.proxy.hold_at(MEM / 3);
    let addr = t.proxy.addr().to_string();
    let mut ctl = t.src.second_client();
    let dst_addr = t.dst.addr.clone();
    let proxy = &mut t.proxy;
    let mut other = None;
    let r = t.src.migrate(&addr, postcopy_options(30_000), &mut |e| {
        if other.is_some() || !is_phase(e, "postcopy") {
            return;
        }
        proxy.wait_holding(Duration::from_secs(30));
        let st = ctl.query_status().unwrap();
        assert_eq!(st.state, RunState::Migrating, "{st:?}");
        assert!(
            st.paused,
            "the source never runs the guest after the commit"
        );
        let cancel = ctl.cancel().expect_err("cancel after the commit");
        let reply = cancel.reply().expect("an error reply");
        assert_eq!(reply.class, ErrorClass::WrongState);
        assert!(reply.desc.contains("lose the guest"), "{reply:?}");
        let switch = ctl.start_postcopy().expect_err("a switch during post-copy");
        assert_eq!(switch.reply().unwrap().class, ErrorClass::WrongState);
        // The old address goes down, a new one comes up.
        proxy.close();
        let b = Proxy::start(&dst_addr);
        ctl.recover(b.addr()).unwrap();
        other = Some(b);
    });
    let r = match r {
        Ok(r) => r,
        Err(e) => t.fail(e),
    };
    let b = other.expect("the commit was seen");
    assert!(
        b.accepted() >= 2,
        "the source reconnected through the new address: {}",
        b.accepted()
    );
    let (st, d) = t.dst.report();
    assert_recovered(&r, st, &d, 1);
    assert!(t.src.quit().migrated);
}

/// `migrate-start-postcopy` switches a hybrid told to switch only on command; without a
/// migration it is refused.
#[test]
fn a_hybrid_switches_on_the_control_socket_command() {
    let guest = guest_for("a_hybrid_switches_on_the_control_socket_command");
    let vm = demo_vm(guest, "64M", "8M", 1);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut src = Source::start_with(&vm);
    let dst = Destination::start_with(&["--recovery-window", "30s"]);
    let mut ctl = src.second_client();
    let idle = ctl.start_postcopy().expect_err("no migration to switch");
    assert_eq!(idle.reply().unwrap().class, ErrorClass::WrongState);
    let options = MigrateOptions {
        postcopy_after: Some(PostcopyAfter::Command),
        // Never fits: only the command ends pre-copy.
        downtime_limit_ms: 0,
        recovery_window_ms: 30_000,
        ..MigrateOptions::default()
    };
    let mut passes = 0;
    let addr = dst.addr.clone();
    let r = src
        .migrate(&addr, options, &mut |e| {
            if let Event::Iteration(_) = e {
                passes += 1;
                if passes == 3 {
                    ctl.start_postcopy().unwrap();
                }
            }
        })
        .expect("the hybrid completes");
    assert_eq!(r.mode, MigrationMode::Hybrid, "{r:#?}");
    let sp = r.postcopy.as_ref().unwrap();
    assert_eq!(sp.switch_reason.as_deref(), Some("a switch on command"));
    assert!(r.iterations >= 3, "{r:#?}");
    let (st, d) = dst.report();
    assert!(st.success() && d.verified, "{d:#?}");
    assert!(d.postcopy.as_ref().unwrap().pages.precopied > 0, "{d:#?}");
    assert!(src.quit().migrated);
}

/// The destination dies while the hybrid is still pre-copying: nothing committed, so the
/// guest runs on the source, verified.
#[test]
fn a_destination_killed_during_the_precopy_of_a_hybrid_leaves_the_guest_on_the_source() {
    let mut src = Source::start(&[]);
    let mut dst = Destination::start_with(&["--recovery-window", "30s"]);
    let options = MigrateOptions {
        postcopy_after: Some(PostcopyAfter::Command),
        // 32 MiB of random RAM at 5 MB/s: seconds of bulk copy.
        bandwidth: Some(5_000_000),
        ..MigrateOptions::default()
    };
    src.migrate_killing_destination(&mut dst, options);
    src.runs_on_verified();
}

/// The destination dies after the commit, mid-way through the pages: the guest is lost.
/// `vmm-demo migrate` says so and exits with 3, never 0; the source keeps its stale copy
/// paused, says why resuming it would be wrong, and `run` exits with 3 too.
#[test]
fn a_destination_killed_after_the_commit_is_a_lost_guest_never_a_success() {
    let mut t = Pair::start(
        "a_destination_killed_after_the_commit_is_a_lost_guest_never_a_success",
        "30s",
    );
    t.proxy.hold_at(MEM / 3);
    let mut child = Command::new(bin())
        .args(["migrate", "--control"])
        .arg(format!("unix:{}", t.src.socket().display()))
        .args([
            "--to",
            t.proxy.addr(),
            "--postcopy",
            "--recovery-window",
            "2s",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, err) = (
        reader(child.stdout.take().unwrap()),
        reader(child.stderr.take().unwrap()),
    );
    let mut migrate = common::Proc {
        child,
        name: "migrate",
    };
    t.proxy.wait_holding(Duration::from_secs(60));
    let st = t.src.status();
    assert_eq!(
        st.phase.map(|p| p.to_string()).as_deref(),
        Some("postcopy"),
        "{st:?}"
    );
    t.dst.proc.kill();
    t.proxy.release();
    let status = migrate.wait(Duration::from_secs(60));
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert_eq!(status.code(), Some(3), "stdout {out}, stderr {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["verified"], false, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("guest is lost") && e.contains("roll the guest back"),
        "{e}"
    );
    assert!(err.contains("LOST"), "{err}");
    let st = t.src.status();
    assert!(matches!(st.state, RunState::Lost { .. }), "{st:?}");
    assert!(st.paused, "the stale copy stays paused: {st:?}");
    let (report, status) = t.src.quit_status();
    assert_eq!(status.code(), Some(3), "{report:#?}");
    assert!(!report.verified && !report.migrated, "{report:#?}");
    assert!(
        report.error.as_deref().unwrap_or_default().contains("lost"),
        "{report:#?}"
    );
}

/// The source dies during post-copy: the destination waits out its (short) recovery
/// window, pauses the guest, says so and exits with 4.
#[test]
fn a_source_killed_during_postcopy_leaves_the_guest_paused_on_the_destination() {
    let mut t = Pair::start(
        "a_source_killed_during_postcopy_leaves_the_guest_paused_on_the_destination",
        "1s",
    );
    t.proxy.hold_at(MEM / 3);
    let mut migrate = common::Proc {
        child: Command::new(bin())
            .args(["migrate", "--control"])
            .arg(format!("unix:{}", t.src.socket().display()))
            .args(["--to", t.proxy.addr(), "--postcopy"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        name: "migrate",
    };
    t.proxy.wait_holding(Duration::from_secs(60));
    t.src.proc.kill();
    t.proxy.release();
    let (st, d) = t.dst.report();
    assert_eq!(st.code(), Some(4), "{d:#?}");
    assert!(
        d.paused_after_commit && d.ran_guest && !d.verified,
        "{d:#?}"
    );
    let e = d.error.as_deref().unwrap_or_default();
    assert!(
        e.contains("did not come back") && e.contains("paused"),
        "{e}"
    );
    assert!(!migrate.wait(Duration::from_secs(30)).success());
}
