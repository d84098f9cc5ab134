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

use common::{Destination, Source, assert_disk_migrated, demo_with, guest_args, guest_for};
use vmm_demo::cli::MigrateOptions;
use vmm_demo::report::MigrationMode;
use vmm_demo::virtio_blk::DiskImage;

/// Sectors each pass writes (the demo's default `--disk-working-set`).
const DISK_WS: u64 = 64;

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
    assert_disk_migrated(&r, &v, DISK_WS, MigrationMode::Precopy);
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
    assert_disk_migrated(&r, &v, DISK_WS, MigrationMode::Postcopy);
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
    assert_disk_migrated(&r, &v, DISK_WS, MigrationMode::Hybrid);
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
