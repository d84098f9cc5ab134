//! The guest with a virtio-blk disk, run as a user would (`run --disk`), on KVM (where it
//! exists) and on the software vCPU; and the disk's state carried from one VM to another
//! through `VmControl`, as a migration does.

mod common;

use std::process::Command;
use std::time::Duration;

use migration_core::vm::VmControl;
use vmm_demo::virtio_blk::DiskImage;
use vmm_demo::{Console, Vm, VmConfig};

fn run_with_disk(guest: &str, image: &std::path::Path) -> serde_json::Value {
    let out = run_with_disk_and(guest, image, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn run_with_disk_and(guest: &str, image: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmm-demo"))
        .args([
            "run",
            "--mem",
            "16M",
            "--ram-regions",
            "2",
            "--vcpus",
            "2",
            "--working-set",
            "256K",
            "--passes",
            "3",
            "--json",
            "--quiet",
            "--disk-working-set",
            "24",
            "--guest",
            guest,
            "--disk",
        ])
        .arg(image)
        .args(extra)
        .output()
        .unwrap()
}

/// `make-disk --prefill` writes the seeded pattern; `run` checks it when told the same
/// prefill and seed, and finds the disk wrong when told it started zero.
#[test]
fn a_prefilled_disk_is_checked_against_the_fill_the_vm_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let make = |path: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_vmm-demo"))
            .args([
                "make-disk",
                "--size",
                "3M",
                "--prefill",
                "50",
                "--seed",
                "7",
            ])
            .arg(path)
            .output()
            .unwrap()
    };
    let out = make(&image);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // Three 1 MiB pieces, the middle one prefilled.
    assert!(stdout.contains("1048576 of them prefilled"), "{stdout}");
    let again = make(&image);
    assert!(!again.status.success(), "made over an existing image");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("disk.raw"),
        "{again:?}"
    );

    let out = run_with_disk_and("software", &image, &["--disk-prefill", "50", "--seed", "7"]);
    assert!(out.status.success(), "{out:?}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["verified"], true, "{j}");
    assert!(
        j["disk"]["untouched_bytes_checked"].as_u64().unwrap() >= 1 << 20,
        "{j}"
    );

    // Told nothing of the fill: the pattern outside the working set is not zero.
    let out = run_with_disk_and("software", &image, &["--seed", "7"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["verified"], false, "{j}");
    let err = j["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("sector 2048") && err.contains("initial content (zero)"),
        "{err}"
    );
}

#[test]
fn run_with_a_disk_writes_every_pass_into_its_sectors() {
    for kind in common::kinds("run_with_a_disk_writes_every_pass_into_its_sectors") {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        DiskImage::create_sparse(&image, 4 << 20).unwrap();
        let j = run_with_disk(kind.as_str(), &image);
        assert_eq!(j["verified"], true, "{kind}: {j}");
        let disk = &j["disk"];
        assert_eq!(disk["sectors"], 8192, "{j}");
        assert_eq!(disk["sectors_checked"], 24, "{j}");
        let dev = &disk["device"];
        let passes: Vec<u64> = j["passes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect();
        // Each completed pass wrote the vCPU's 12 sectors and read two back.
        let done: u64 = passes.iter().map(|p| p * 12).sum();
        assert!(
            dev["sectors_written"].as_u64().unwrap() >= done,
            "{kind}: {j}"
        );
        assert_eq!(dev["errors"], 0, "{j}");
        assert_eq!(dev["requests"], dev["interrupts"], "{j}");
        // The guest acknowledged every interrupt but, at most, one in flight per vCPU.
        let (irqs, acks) = (
            dev["interrupts"].as_u64().unwrap(),
            dev["acks"].as_u64().unwrap(),
        );
        assert!(acks + 2 >= irqs && acks <= irqs, "{j}");
        // On the image: vCPU 1's first sector (12) holds its pass or the next.
        let img = DiskImage::open(&image).unwrap();
        let mut s = vec![0u8; 512];
        img.read_at(&mut s, 12 * 512).unwrap();
        let pass = u64::from_le_bytes(s[..8].try_into().unwrap());
        assert!(
            pass == passes[1] || pass == passes[1] + 1,
            "{kind}: sector 12 at pass {pass}, {j}"
        );
        assert_eq!(&s[8..16], &1u64.to_le_bytes());
        assert_eq!(&s[24..32], b"demodisk");
    }
}

/// Pause, save, load into a second VM on the same image (shared storage), resume there:
/// the destination's disk oracle agrees at once, and the guest goes on writing.
#[test]
fn disk_state_moves_to_another_vm_and_its_guest_goes_on() {
    for kind in common::kinds("disk_state_moves_to_another_vm_and_its_guest_goes_on") {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        DiskImage::create_sparse(&image, 1 << 20).unwrap();
        let config = VmConfig {
            disk_sectors: 2048,
            disk_working_set: 16,
            working_set_bytes: 128 << 10,
            ..common::small_config(2)
        };
        let mut src = Vm::with_disk(&config, kind, Console::Discard, Some(&image)).unwrap();
        src.resume().unwrap();
        src.wait_for_passes(2, Duration::from_secs(60)).unwrap();
        src.pause().unwrap();
        let ram = src.check().unwrap();
        let before = src.check_disk(Some(&ram)).unwrap().unwrap();
        let hash = src.disk_hash().unwrap().unwrap();
        let states = src.save_device_state().unwrap();
        assert!(states.iter().any(|s| s.id == "virtio-blk"));
        let mut dst =
            Vm::new_incoming_with_disk(&config, kind, Console::Discard, Some(&image)).unwrap();
        common::copy_ram(&src, &dst);
        dst.load_device_state(&states).unwrap();
        let ram = dst.check().unwrap();
        assert_eq!(dst.check_disk(Some(&ram)).unwrap().unwrap(), before);
        assert_eq!(dst.disk_hash().unwrap().unwrap(), hash);
        drop(src);
        dst.resume().unwrap();
        // Every vCPU makes two passes here (each writes its 8 sectors every pass): from
        // the vCPU furthest ahead, as one far behind would reach `min + 2` alone.
        let base = before.vcpus.iter().map(|v| v.pass).max().unwrap();
        dst.wait_for_passes(base + 2, Duration::from_secs(60))
            .unwrap();
        dst.pause().unwrap();
        let ram = dst.check().unwrap();
        dst.check_disk(Some(&ram)).unwrap().unwrap();
        assert!(
            dst.disk_stats().unwrap().sectors_written >= 2 * 16,
            "{kind}"
        );
        assert!(dst.failures().is_empty(), "{:?}", dst.failures());
    }
}
