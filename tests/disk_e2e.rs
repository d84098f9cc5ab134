//! End-to-end migrations of a guest with a virtio-blk disk on shared storage: both
//! `vmm-demo` processes open the same raw image (one host: the storage policy's
//! `same-host-local-file` rule). Pre-copy, pure post-copy and hybrid, over TCP and unix
//! sockets; each checks RAM and disk on the destination (the disk hash against the
//! source's at a pre-copy switch) and that the guest goes on writing its disk there; and a
//! destination killed mid-migration, after which the source runs on and its disk is
//! verified.
//!
//! The KVM guest where `/dev/kvm` can be used, the software guest otherwise (each test
//! says which it ran). Every wait has a deadline; children are killed by PID.

mod common;

use common::{Destination, Source, demo_json, guest_args, guest_for};
use vmm_demo::cli::MigrateOptions;
use vmm_demo::report::{DemoReport, MigrationMode};
use vmm_demo::virtio_blk::DiskImage;
use vmm_demo::{GuestKind, PAGE_SIZE};

/// Sectors each pass writes (the demo's default `--disk-working-set`).
const DISK_WS: u64 = 64;

fn demo_with(guest: GuestKind, extra: &[&str]) -> (DemoReport, serde_json::Value) {
    let mut a = guest_args(guest);
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    demo_json(&a)
}

/// Checks a demo of a guest with a disk that moved by `mode`: verified, RAM and disk; the
/// disk oracle checked every working-set sector on the destination, the guest wrote its
/// disk there and made passes there; at a pre-copy switch the disk hashes were equal.
fn assert_disk_migrated(r: &DemoReport, v: &serde_json::Value, mode: MigrationMode) {
    assert!(r.verified, "not verified: {r:#?}");
    assert_eq!(r.mode, mode, "{r:#?}");
    let k = r.disk.as_ref().expect("the demo's disk report");
    assert!(k.verified, "{k:#?}");
    assert_eq!(k.sectors_checked, DISK_WS, "{k:#?}");
    assert!(k.sectors_written_on_destination > 0, "{k:#?}");
    assert_eq!(v["disk"]["verified"], true, "{v:#}");
    let d = r.destination.as_ref().expect("the destination's report");
    let dd = d.disk.as_ref().expect("the destination's disk report");
    assert_eq!(dd.device.errors, 0, "{dd:#?}");
    assert_eq!(dd.sectors_checked, DISK_WS, "{dd:#?}");
    match mode {
        MigrationMode::Precopy => {
            assert_eq!(k.hash_at_switch_equal, Some(true), "{k:#?}");
            assert_eq!(dd.sectors_checked_at_switch, Some(DISK_WS), "{dd:#?}");
            assert!(d.hash_checked, "{d:#?}");
        }
        _ => {
            assert_eq!(k.hash_at_switch_equal, None, "{k:#?}");
            assert_eq!(dd.sectors_checked_after_postcopy, Some(DISK_WS), "{dd:#?}");
            let p = d.postcopy.as_ref().expect("the post-copy report");
            assert_eq!(
                p.pages.precopied + p.pages.pushed + p.pages.requested,
                r.mem_bytes / PAGE_SIZE,
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
    // The storage check allowed the local image: both processes are on this host.
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

#[test]
fn precopy_with_a_shared_disk_over_tcp() {
    let guest = guest_for("precopy_with_a_shared_disk_over_tcp");
    let (r, v) = demo_with(
        guest,
        &[
            "--mem",
            "32M",
            "--working-set",
            "1M",
            "--vcpus",
            "2",
            "--disk-size",
            "4M",
            "--transport",
            "tcp",
            "--passes-after",
            "3",
        ],
    );
    assert_disk_migrated(&r, &v, MigrationMode::Precopy);
    assert!(r.disk.as_ref().unwrap().created);
    // The demo's scratch directory, and the image in it, are gone.
    assert!(!std::path::Path::new(&r.disk.as_ref().unwrap().path).exists());
}

/// Every page is missing when the guest starts on the destination: the disk's device
/// (its own thread on KVM) reads the queue's rings and writes read data and the used ring
/// into pages that are still on the source, and must wait for them like a vCPU.
#[test]
fn pure_postcopy_with_a_shared_disk_over_a_unix_socket() {
    let guest = guest_for("pure_postcopy_with_a_shared_disk_over_a_unix_socket");
    // As in postcopy_e2e: a working set large enough that the guest faults before the
    // background push has brought every page.
    let (r, v) = demo_with(
        guest,
        &[
            "--mem",
            "64M",
            "--working-set",
            "16M",
            "--order",
            "scattered",
            "--disk-size",
            "4M",
            "--postcopy",
            "--transport",
            "unix",
            "--passes-after",
            "3",
        ],
    );
    assert_disk_migrated(&r, &v, MigrationMode::Postcopy);
    let p = r.destination.as_ref().unwrap().postcopy.as_ref().unwrap();
    assert!(p.faults > 0 && p.pages.requested > 0, "{p:#?}");
    // Which threads besides the vCPUs waited (the device thread, when it touched a page
    // first: the scheduler decides).
    eprintln!(
        "pure_postcopy_with_a_shared_disk_over_a_unix_socket: {guest} guest, {} faults; threads other than vCPUs blocked: {:?}",
        p.faults, p.blocktime.other_threads
    );
}

/// A hybrid on an image the test made (`--disk PATH`), which keeps what the guest wrote.
#[test]
fn hybrid_with_a_shared_disk_over_tcp() {
    let guest = guest_for("hybrid_with_a_shared_disk_over_tcp");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    DiskImage::create_sparse(&image, 2 << 20).unwrap();
    let path = image.display().to_string();
    let (r, v) = demo_with(
        guest,
        &[
            "--mem",
            "32M",
            "--working-set",
            "4M",
            "--order",
            "scattered",
            "--disk",
            &path,
            "--postcopy-after",
            "1",
            // A capped link, so that pre-copy cannot converge in its first pass even
            // when a loaded machine slows the guest.
            "--bandwidth",
            "50M",
            "--downtime-limit",
            "1ms",
            "--transport",
            "tcp",
            "--passes-after",
            "3",
        ],
    );
    assert_disk_migrated(&r, &v, MigrationMode::Hybrid);
    let k = r.disk.as_ref().unwrap();
    assert!(!k.created && k.path == path, "{k:#?}");
    // The image holds the destination's last writes: sector 0 is vCPU 0's, at the pass it
    // reached there or the next.
    let img = DiskImage::open(&image).unwrap();
    let mut s = vec![0u8; 512];
    img.read_at(&mut s, 0).unwrap();
    let pass = u64::from_le_bytes(s[..8].try_into().unwrap());
    let end = r.destination.as_ref().unwrap().passes_at_end[0];
    assert!(
        pass == end || pass == end + 1,
        "sector 0 at pass {pass}, guest at {end}"
    );
    assert_eq!(&s[24..32], b"demodisk");
}

/// The destination dies while pre-copy runs: nothing was committed, the destination never
/// ran the guest (nor wrote the image), and the source runs on writing its disk, verified.
#[test]
fn a_destination_killed_during_a_disk_migration_leaves_the_source_writing_its_disk() {
    let guest = guest_for(
        "a_destination_killed_during_a_disk_migration_leaves_the_source_writing_its_disk",
    );
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    DiskImage::create_sparse(&image, 2 << 20).unwrap();
    let path = image.display().to_string();
    let mut vm = guest_args(guest);
    vm.extend(["--mem", "32M", "--working-set", "1M", "--disk", &path].map(String::from));
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut src = Source::start_with(&vm);
    let mut dst = Destination::start_with(&["--disk", &path]);
    // 32 MiB of random RAM at 5 MB/s: seconds of bulk copy; killed at the first progress.
    let options = MigrateOptions {
        bandwidth: Some(5_000_000),
        ..MigrateOptions::default()
    };
    src.migrate_killing_destination(&mut dst, options);
    let p = src.wait_passes_beyond(0);
    src.wait_passes_beyond(p + 2);
    let (r, _) = src.quit_status();
    assert!(r.verified && !r.migrated, "{r:#?}");
    let disk = r.disk.as_ref().expect("the source's disk report");
    assert_eq!(disk.sectors_checked, DISK_WS, "{disk:#?}");
    assert!(disk.device.sectors_written > 0, "{disk:#?}");
}
