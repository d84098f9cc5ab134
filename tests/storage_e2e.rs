//! End-to-end storage migration without shared storage (`--copy-storage-all` and
//! `--copy-storage-inc`): the destination creates (or keeps) an image of the guest's disk
//! and exports it over NBD, the source mirrors its disk into it while the guest writes,
//! then RAM migrates by pre-copy, post-copy or hybrid, and the mirror completes in the
//! guest's pause. Each test checks RAM and the disk on the destination (the disk oracle,
//! the hash at a pre-copy switch) and that the guest writes its disk there; the
//! incremental one migrates the guest back onto the image it left and checks that only
//! what was written since went over; a capped link, a cut, a cancel and a killed
//! destination are survived with the guest running on the source.
//!
//! The KVM guest where `/dev/kvm` can be used, the software guest otherwise. Every wait
//! has a deadline; children are killed by PID.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Destination, Source, assert_disk_migrated, demo_with, guest_args, guest_for};
use serde_json::Value;
use vmm_demo::GuestKind;
use vmm_demo::cli::{MigrateOptions, MirrorMode};
use vmm_demo::protocol::Event;
use vmm_demo::report::{DemoReport, MigrationMode};
use vmm_demo::virtio_blk::DiskImage;

/// Sectors each pass writes (the demo's default `--disk-working-set`).
const DISK_WS: u64 = 64;
const DISK: u64 = 4 << 20;

/// A demo whose disk was copied: [`assert_disk_migrated`], and the destination wrote its
/// own image (not the source's), created for the copy, with a base for a later one.
fn assert_copied(r: &DemoReport, v: &Value, mode: MigrationMode) {
    assert_disk_migrated(r, v, DISK_WS, mode);
    let s = r.storage.as_ref().expect("the demo's storage report");
    assert_eq!(s.kind, "all", "{s:#?}");
    assert!(s.disk_verified, "{s:#?}");
    assert!(s.bytes_copied > 0, "{s:#?}");
    let k = r.disk.as_ref().expect("the demo's disk report");
    assert!(
        k.path.ends_with("destination-disk.raw"),
        "the destination checked its own image: {k:#?}"
    );
    let d = r.destination.as_ref().unwrap();
    let ds = d
        .storage
        .as_ref()
        .expect("the destination's storage report");
    assert!(ds.finished && ds.created == [true], "{ds:#?}");
    assert!(
        ds.base.is_some(),
        "a base for a later incremental copy: {ds:#?}"
    );
}

/// A demo of `guest` whose 4 MiB disk (made by the demo) is copied whole, with `options`
/// (the VM's and the migration's) over `transport`; the destination runs 3 more passes.
fn copy_demo(guest: GuestKind, options: &[&str], transport: &str) -> (DemoReport, Value) {
    let mut a = options.to_vec();
    a.extend([
        "--disk-size",
        "4M",
        "--copy-storage-all",
        "--transport",
        transport,
        "--passes-after",
        "3",
    ]);
    demo_with(guest, &a)
}

/// A hybrid that switches after its first pass over dirty pages, on a capped link: pre-copy
/// cannot finish in its first pass on a loaded machine either (a slowed guest dirtied too
/// little to keep it iterating).
const HYBRID_AFTER_ONE_PASS: [&str; 6] = [
    "--postcopy-after",
    "1",
    "--bandwidth",
    "50M",
    "--downtime-limit",
    "1ms",
];

#[test]
fn copy_storage_all_by_precopy_over_tcp() {
    let guest = guest_for("copy_storage_all_by_precopy_over_tcp");
    let (r, v) = copy_demo(
        guest,
        &["--mem", "32M", "--working-set", "1M", "--vcpus", "2"],
        "tcp",
    );
    assert_copied(&r, &v, MigrationMode::Precopy);
}

#[test]
fn copy_storage_all_by_pure_postcopy_in_write_blocking_mode_over_a_unix_socket() {
    let guest =
        guest_for("copy_storage_all_by_pure_postcopy_in_write_blocking_mode_over_a_unix_socket");
    let (r, v) = copy_demo(
        guest,
        &[
            "--mem",
            "64M",
            "--working-set",
            "16M",
            "--order",
            "scattered",
            "--mirror-mode",
            "write-blocking",
            "--postcopy",
        ],
        "unix",
    );
    assert_copied(&r, &v, MigrationMode::Postcopy);
}

#[test]
fn copy_storage_all_by_hybrid_over_tcp() {
    let guest = guest_for("copy_storage_all_by_hybrid_over_tcp");
    let mut o = vec![
        "--mem",
        "32M",
        "--working-set",
        "4M",
        "--order",
        "scattered",
    ];
    o.extend(HYBRID_AFTER_ONE_PASS);
    let (r, v) = copy_demo(guest, &o, "tcp");
    assert_copied(&r, &v, MigrationMode::Hybrid);
}

/// Hybrid over a unix socket with the mirror in auto mode.
#[test]
fn copy_storage_all_by_hybrid_in_auto_mode_over_a_unix_socket() {
    let guest = guest_for("copy_storage_all_by_hybrid_in_auto_mode_over_a_unix_socket");
    let mut o = vec![
        "--mem",
        "32M",
        "--working-set",
        "4M",
        "--order",
        "scattered",
        "--mirror-mode",
        "auto",
    ];
    o.extend(HYBRID_AFTER_ONE_PASS);
    let (r, v) = copy_demo(guest, &o, "unix");
    assert_copied(&r, &v, MigrationMode::Hybrid);
}

/// The software guest even where KVM is available (its vCPU drives the same virtio-blk
/// model), on a disk half prefilled with the seeded pattern (pieces 1 and 3 of four),
/// over a unix socket: the oracle on the destination finds both pieces and the holes.
#[test]
fn copy_storage_all_of_a_prefilled_disk_by_precopy_over_a_unix_socket_with_the_software_guest() {
    let (r, v) = copy_demo(
        GuestKind::Software,
        &[
            "--mem",
            "32M",
            "--working-set",
            "1M",
            "--disk-prefill",
            "50",
        ],
        "unix",
    );
    assert_eq!(r.guest, Some(GuestKind::Software), "{r:#?}");
    assert_copied(&r, &v, MigrationMode::Precopy);
    let s = r.storage.as_ref().unwrap();
    assert!(
        s.bytes_copied >= 2 << 20,
        "both prefilled pieces went: {s:#?}"
    );
    let k = r.disk.as_ref().unwrap();
    assert!(
        k.untouched_bytes_checked >= 2 << 20,
        "the prefilled pieces were checked: {k:#?}"
    );
}

/// Post-copy over TCP with the mirror in background mode, on a fully prefilled disk: the
/// mirror copies every byte before the switch, and the working set starts as the pattern.
#[test]
fn copy_storage_all_of_a_prefilled_disk_by_pure_postcopy_over_tcp() {
    let guest = guest_for("copy_storage_all_of_a_prefilled_disk_by_pure_postcopy_over_tcp");
    let (r, v) = copy_demo(
        guest,
        &[
            "--mem",
            "64M",
            "--working-set",
            "8M",
            "--order",
            "scattered",
            "--disk-prefill",
            "100",
            "--postcopy",
        ],
        "tcp",
    );
    assert_copied(&r, &v, MigrationMode::Postcopy);
    let s = r.storage.as_ref().unwrap();
    assert!(s.bytes_copied >= DISK, "the whole disk went: {s:#?}");
    assert_eq!(s.bytes_skipped, 0, "{s:#?}");
    let k = r.disk.as_ref().unwrap();
    assert_eq!(
        k.untouched_bytes_checked,
        DISK - DISK_WS * 512,
        "every byte outside the working set was checked: {k:#?}"
    );
}

fn vm_with_disk(guest: GuestKind, image: &Path) -> Vec<String> {
    let mut vm = guest_args(guest);
    vm.extend(
        ["--mem", "32M", "--working-set", "1M", "--disk"]
            .map(String::from)
            .into_iter()
            .chain([image.display().to_string()]),
    );
    vm
}

/// The phase the source's error reply says the migration failed in.
fn failed_phase(e: &vmm_demo::ClientError) -> String {
    e.reply()
        .and_then(|r| r.failed_phase.clone())
        .unwrap_or_else(|| panic!("no failed phase in {e:?}"))
}

fn copy_options(inc: bool) -> MigrateOptions {
    MigrateOptions {
        copy_storage_all: !inc,
        copy_storage_inc: inc,
        ..MigrateOptions::default()
    }
}

/// A: `run` on its image; B: a destination that creates its own image and then serves a
/// control socket. A -> B copies the disk whole. Then C, a destination on A's image (the
/// disk as it was at that switch): B -> C copies only what B's guest wrote since, from the
/// bitmap B kept. B's image taken at the first switch equals A's, and C's taken at the
/// second equals B's (`qemu-img compare`).
#[test]
fn copy_storage_inc_after_a_migration_back_copies_only_what_was_written_since() {
    let guest =
        guest_for("copy_storage_inc_after_a_migration_back_copies_only_what_was_written_since");
    let dir = tempfile::tempdir().unwrap();
    let a_img = dir.path().join("a.raw");
    let b_img = dir.path().join("b.raw");
    let at_switch = dir.path().join("c-at-switch.raw");
    let b_at_switch = dir.path().join("b-at-switch.raw");
    DiskImage::create_sparse(&a_img, DISK).unwrap();
    let vm = vm_with_disk(guest, &a_img);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut a = Source::start_with(&vm);
    let b_ctl = dir.path().join("b.sock");
    let b = Destination::start_with(&[
        "--disk",
        &b_img.display().to_string(),
        "--control",
        &b_ctl.display().to_string(),
        "--snapshot-disk-at-switch",
        &b_at_switch.display().to_string(),
    ]);
    let first = a
        .migrate(&b.addr, copy_options(false), &mut |_| {})
        .expect("A -> B");
    let all = first.storage_copy.as_ref().expect("A's storage copy");
    assert_eq!(all.kind, "all");
    // A full copy looks at the whole disk: what it did not send was holes.
    let d = &all.disks[0];
    assert!(d.bytes_copied + d.bytes_holes >= DISK, "{all:#?}");
    let (ar, _) = a.quit_status();
    assert!(ar.migrated, "{ar:#?}");
    // A's image is the disk at the switch (its guest stopped there): B's whole copy of it,
    // taken then, is the same as qemu-img sees it.
    qemu_img_identical(&a_img, &b_at_switch);
    // B runs the guest, which writes its working set, recorded against the new base.
    let mut b_client = vmm_demo::ControlClient::connect(&b_ctl, Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let start = b_client.query_status().unwrap().passes[0];
    while b_client.query_status().unwrap().passes[0] < start + 3 {
        assert!(Instant::now() < deadline, "B's guest makes no passes");
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = Destination::start_with(&[
        "--disk",
        &a_img.display().to_string(),
        "--snapshot-disk-at-switch",
        &at_switch.display().to_string(),
    ]);
    let mut events = 0;
    let back = b_client
        .migrate(
            vmm_demo::protocol::MigrateRequest {
                to: c.addr.clone(),
                options: copy_options(true),
            },
            &mut |e| {
                if matches!(e, Event::Mirror { .. }) {
                    events += 1;
                }
            },
        )
        .expect("B -> C");
    let inc = back.storage_copy.as_ref().expect("B's storage copy");
    assert_eq!(inc.kind, "inc", "{inc:#?}");
    let d = &inc.disks[0];
    assert!(d.incremental, "{d:#?}");
    // Only the clusters B's guest wrote were copied first (its working set: one 64 KiB
    // cluster); what went again was that cluster, rewritten while B's guest ran on.
    let first = (d.bytes_copied + d.bytes_zeroed).saturating_sub(d.bytes_recopied);
    assert!(first > 0 && first <= 4 * (64 << 10), "{d:#?}");
    let looked = d.bytes_copied + d.bytes_zeroed;
    let (st, cr) = c.report();
    assert!(st.success() && cr.verified, "{cr:#?}");
    let cd = cr.disk.as_ref().expect("C's disk report");
    assert_eq!(cd.hash_at_switch_equal, Some(true), "{cd:#?}");
    assert_eq!(cd.sectors_checked, DISK_WS, "{cd:#?}");
    let cs = cr.storage.as_ref().unwrap();
    assert_eq!(cs.created, [false], "C kept A's image: {cs:#?}");
    // B's image is the disk at that switch (its guest stopped there): C's copy of it
    // then is the same, as qemu-img sees it too.
    qemu_img_identical(&b_img, &at_switch);
    let _ = b_client.quit();
    let (bst, br) = b.report();
    assert!(bst.success(), "{br:#?}");
    assert!(br.migrated_away.is_some(), "{br:#?}");
    eprintln!("incremental copy: {events} mirror events, {looked} bytes looked at");
}

fn qemu_img_identical(a: &Path, b: &Path) {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img missing: comparing the bytes only");
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        return;
    }
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("identical"),
        "qemu-img compare: {text}"
    );
}

/// A free TCP port on 127.0.0.1 (the NBD server binds it soon after; nothing else here
/// takes ports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A destination whose NBD server the source reaches through `proxy`.
fn proxied_destination(dir: &Path, extra: &[&str]) -> (Destination, Proxy) {
    let port = free_port();
    let proxy = Proxy::start(&format!("tcp:127.0.0.1:{port}"));
    let img = dir.join("dst.raw").display().to_string();
    let nbd = format!("tcp:127.0.0.1:{port}");
    let mut args = vec![
        "--disk",
        &img,
        "--nbd-listen",
        &nbd,
        "--nbd-advertise",
        proxy.addr(),
    ];
    args.extend_from_slice(extra);
    (Destination::start_with(&args), proxy)
}

/// A guest writing its disk faster than a capped link carries it: a background mirror is
/// never in sync, and the migration fails at the deadline with both rates said (the guest
/// runs on); in auto mode the mirror switches to write-blocking and the migration
/// completes.
#[test]
fn a_guest_writing_faster_than_a_capped_link_needs_auto_mode() {
    let guest = guest_for("a_guest_writing_faster_than_a_capped_link_needs_auto_mode");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.raw");
    DiskImage::create_sparse(&img, DISK).unwrap();
    let vm = vm_with_disk(guest, &img);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut src = Source::start_with(&vm);

    let bg = tempfile::tempdir().unwrap();
    let (dst, proxy) = proxied_destination(bg.path(), &[]);
    proxy.set_rate(Some(100_000));
    let opts = MigrateOptions {
        mirror_deadline_ms: 3000,
        ..copy_options(false)
    };
    let e = src
        .migrate(&dst.addr, opts, &mut |_| {})
        .expect_err("a background mirror cannot keep up");
    let text = e.to_string();
    assert!(text.contains("dirty") && text.contains("copy"), "{text}");
    assert_eq!(failed_phase(&e), "storage-mirror", "{text}");
    let (st, dr) = dst.report();
    assert!(!st.success() && !dr.ran_guest, "{dr:#?}");
    assert!(
        !bg.path().join("dst.raw").exists(),
        "the destination deletes its image"
    );
    drop(proxy);
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 1);

    let auto = tempfile::tempdir().unwrap();
    let (dst, proxy) = proxied_destination(auto.path(), &[]);
    proxy.set_rate(Some(100_000));
    let opts = MigrateOptions {
        mirror_mode: MirrorMode::Auto,
        mirror_deadline_ms: 60_000,
        ..copy_options(false)
    };
    let r = src
        .migrate(&dst.addr, opts, &mut |_| {})
        .expect("auto mode completes");
    let c = r.storage_copy.as_ref().unwrap();
    assert!(c.disks[0].mode_switches >= 1, "{c:#?}");
    assert!(c.disks[0].write_blocking, "{c:#?}");
    let (st, dr) = dst.report();
    assert!(st.success() && dr.verified, "{dr:#?}");
    assert!(
        dr.disk
            .as_ref()
            .is_some_and(|d| d.hash_at_switch_equal == Some(true))
    );
    let (sr, _) = src.quit_status();
    assert!(sr.migrated);
}

/// The NBD connection is cut while the disk is mirrored: the mirror reconnects and the
/// migration completes, verified.
#[test]
fn a_cut_during_the_mirror_is_survived() {
    let guest = guest_for("a_cut_during_the_mirror_is_survived");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.raw");
    DiskImage::create_sparse(&img, DISK).unwrap();
    let vm = vm_with_disk(guest, &img);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut src = Source::start_with(&vm);
    let (dst, proxy) = proxied_destination(dir.path(), &[]);
    // Slow enough that the cut comes mid-mirror, fast enough for the rest.
    proxy.set_rate(Some(2_000_000));
    proxy.cut_at(40_000);
    let opts = MigrateOptions {
        mirror_mode: MirrorMode::Auto,
        ..copy_options(false)
    };
    let r = src
        .migrate(&dst.addr, opts, &mut |_| {})
        .expect("survives the cut");
    assert!(proxy.cuts() >= 1);
    assert!(
        r.storage_copy.as_ref().unwrap().disks[0].reconnects >= 1,
        "{r:#?}"
    );
    let (st, dr) = dst.report();
    assert!(st.success() && dr.verified, "{dr:#?}");
    let _ = src.quit_status();
}

/// Cancelled while the disk is mirrored: the guest runs on here, and the destination,
/// seeing the source give up, deletes the image it created. Then a destination killed
/// during the RAM migration (after the mirror was in sync): the guest runs on here with
/// its disk verified.
#[test]
fn a_cancel_or_a_kill_during_the_mirror_and_a_kill_during_ram_leave_the_guest_here() {
    let guest = guest_for(
        "a_cancel_or_a_kill_during_the_mirror_and_a_kill_during_ram_leave_the_guest_here",
    );
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.raw");
    DiskImage::create_sparse(&img, DISK).unwrap();
    let vm = vm_with_disk(guest, &img);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut src = Source::start_with(&vm);

    let c1 = tempfile::tempdir().unwrap();
    let (dst, proxy) = proxied_destination(c1.path(), &[]);
    proxy.set_rate(Some(50_000));
    let mut ctl = src.second_client();
    let mut cancelled = false;
    let e = src
        .migrate(&dst.addr, copy_options(false), &mut |e| {
            if !cancelled && matches!(e, Event::Mirror { .. }) {
                cancelled = true;
                ctl.cancel().unwrap();
            }
        })
        .expect_err("cancelled");
    assert!(cancelled, "no mirror event before the end: {e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_eq!(failed_phase(&e), "storage-mirror", "{e}");
    let (st, dr) = dst.report();
    assert!(!st.success() && !dr.ran_guest, "{dr:#?}");
    let cleanup = &dr.storage.as_ref().unwrap().cleanup;
    assert!(cleanup.iter().any(|c| c.contains("deleted")), "{cleanup:?}");
    assert!(!c1.path().join("dst.raw").exists());
    drop(proxy);

    // Killed while the disk is mirrored: the mirror cannot reach it again, the migration
    // fails, the guest runs on.
    let c3 = tempfile::tempdir().unwrap();
    let (mut dst, proxy) = proxied_destination(c3.path(), &[]);
    proxy.set_rate(Some(50_000));
    let pid = dst.proc.child.id();
    let mut killed = false;
    let options = MigrateOptions {
        mirror_reconnect_window_ms: 2_000,
        ..copy_options(false)
    };
    let started = Instant::now();
    let e = src
        .migrate(&dst.addr, options, &mut |e| {
            if !killed && matches!(e, Event::Mirror { .. }) {
                killed = true;
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        })
        .expect_err("the destination is gone");
    assert!(killed, "no mirror event before the end: {e}");
    // Only once its window passed does the mirror give the target up, and it says so.
    assert!(e.to_string().contains("mirroring disk0"), "{e}");
    assert_eq!(failed_phase(&e), "storage-mirror", "{e}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "gave up before the reconnect window passed: {e}"
    );
    dst.proc.kill();
    drop(proxy);
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 1);

    let c2 = tempfile::tempdir().unwrap();
    let dst_img = c2.path().join("dst.raw").display().to_string();
    let mut dst = Destination::start_with(&["--disk", &dst_img]);
    let options = MigrateOptions {
        // 32 MiB of random RAM at 5 MB/s: seconds of RAM migration after the mirror.
        bandwidth: Some(5_000_000),
        ..copy_options(false)
    };
    let e = src.migrate_killing_destination(&mut dst, options);
    // The RAM migration failed, not the storage copy: the mirror was in sync.
    let phase = failed_phase(&e);
    assert!(
        [
            "bulk-copy",
            "iterating",
            "stop-and-copy",
            "awaiting-verdict"
        ]
        .contains(&phase.as_str()),
        "{phase}: {e}"
    );
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 2);
    let (r, _) = src.quit_status();
    assert!(r.verified && !r.migrated, "{r:#?}");
    let disk = r.disk.as_ref().expect("the source's disk report");
    assert_eq!(disk.sectors_checked, DISK_WS, "{disk:#?}");
}
