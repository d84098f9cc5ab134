//! Detection on what this machine really has: a tmpfs (mounted by the test when it may,
//! else /dev/shm), the root filesystem, images made by `qemu-img create`, a block device;
//! and properties of the parsers on arbitrary input.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use migration_storage_policy::detect::{
    self, Backing, FsClass, classify_uri, format_from_reader, magic, parse_mounts,
};
use migration_storage_policy::{
    Access, CacheMode, DiskSpec, Error, ImageFormat, LibvirtBranch, Origin, Plan, RuleId,
    StorageKind, Verdict, check_plan, resolve_disk,
};
use proptest::prelude::*;

/// A tmpfs for the test: one it mounted itself (unmounted on drop), or /dev/shm.
struct Tmpfs {
    dir: PathBuf,
    mounted: Option<tempfile::TempDir>,
    scratch: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn get() -> Option<Tmpfs> {
        if let Ok(t) = tempfile::tempdir() {
            let ok = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=8m",
                    "migration-storage-policy-test",
                ])
                .arg(t.path())
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Some(Tmpfs {
                    dir: t.path().to_path_buf(),
                    mounted: Some(t),
                    scratch: None,
                });
            }
        }
        let shm = Path::new("/dev/shm");
        if detect::statfs_walk_up(shm).is_ok_and(|(_, m)| m == magic::TMPFS) {
            let t = tempfile::tempdir_in(shm).ok()?;
            return Some(Tmpfs {
                dir: t.path().to_path_buf(),
                mounted: None,
                scratch: Some(t),
            });
        }
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(t) = &self.mounted {
            let _ = Command::new("umount").arg(t.path()).status();
        }
        let _ = self.scratch.take();
    }
}

fn qemu_img(args: &[&str]) -> bool {
    match Command::new("qemu-img").args(args).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!(
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => false,
    }
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: qemu-img is not installed (Debian package qemu-utils)");
    }
    ok
}

#[test]
fn tmpfs_is_local_and_walks_up_to_an_existing_parent() {
    let Some(t) = Tmpfs::get() else {
        eprintln!("skipped: cannot mount a tmpfs here and /dev/shm is not tmpfs");
        return;
    };
    let own = t.mounted.is_some();
    eprintln!(
        "tmpfs at {} ({})",
        t.dir.display(),
        if own {
            "mounted by the test"
        } else {
            "/dev/shm"
        }
    );
    let missing = t.dir.join("not/yet/created/vm.img");
    let fs = detect::detect_filesystem(&missing).unwrap();
    assert_eq!(fs.magic, magic::TMPFS);
    assert_eq!(fs.magic_name, Some("tmpfs"));
    assert_eq!(
        fs.probed_path, t.dir,
        "statfs walked up to the nearest existing directory"
    );
    let mount = fs.mount.clone().expect("the mount table has the tmpfs");
    assert_eq!(mount.fs_type, "tmpfs");
    if own {
        assert_eq!(
            Path::new(&mount.mount_point),
            std::fs::canonicalize(&t.dir).unwrap()
        );
        assert_eq!(mount.source, "migration-storage-policy-test");
    }
    assert_eq!(fs.class(), FsClass::Kind(StorageKind::Local));

    // End to end: an image on it is detected as local, and unsafe, as libvirt also says.
    let img = t.dir.join("vm.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let mut d = DiskSpec::named("vda");
    d.path = Some(img.display().to_string());
    let r = check_plan(&Plan::single(d.clone())).unwrap();
    let i = &r.disks[0].inputs;
    assert_eq!(
        i.storage.as_ref().map(|s| (s.value, s.origin)),
        Some((StorageKind::Local, Origin::Detected))
    );
    assert_eq!(
        i.format.as_ref().map(|s| (s.value, s.origin)),
        Some((ImageFormat::Raw, Origin::Detected))
    );
    assert_eq!(i.access, Access::File);
    assert_eq!(r.verdict, Verdict::Unsafe);
    assert!(r.has(RuleId::LocalStorageNotShared));
    assert_eq!(
        r.disks[0].libvirt.branch,
        LibvirtBranch::NotSharedFilesystem
    );
    assert!(r.libvirt.agrees);

    // Given values override detection, and the report says so.
    d.storage = Some(StorageKind::Gfs2);
    let r = check_plan(&Plan::single(d)).unwrap();
    assert_eq!(
        r.disks[0].inputs.storage.as_ref().unwrap().origin,
        Origin::Given
    );
    assert_eq!(r.verdict, Verdict::Safe);
}

#[test]
fn root_filesystem_matches_stat() {
    let fs = detect::detect_filesystem(Path::new("/")).unwrap();
    // stat(1) is an independent reading of the same magic.
    let out = Command::new("stat").args(["-f", "-c", "%t", "/"]).output();
    match out {
        Ok(o) if o.status.success() => {
            let hex = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert_eq!(
                fs.magic,
                u64::from_str_radix(&hex, 16).unwrap(),
                "stat -f says {hex}"
            );
        }
        _ => eprintln!("stat(1) not available: magic not cross-checked"),
    }
    let mounts = parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap());
    let root_type = mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == "/")
        .map(|m| m.fs_type.clone())
        .unwrap();
    let m = fs.mount.as_ref().unwrap();
    assert_eq!(m.mount_point, "/");
    assert_eq!(m.fs_type, root_type);
    eprintln!("root: {}", fs.describe());
    let local_types = [
        "ext2", "ext3", "ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "f2fs", "bcachefs",
    ];
    if local_types.contains(&root_type.as_str()) {
        assert_eq!(
            fs.class(),
            FsClass::Kind(StorageKind::Local),
            "{}",
            fs.describe()
        );
    }
}

#[test]
fn images_made_by_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let cases: &[(&str, &str, ImageFormat)] = &[
        ("raw", "a.raw", ImageFormat::Raw),
        ("qcow2", "a.qcow2", ImageFormat::Qcow2),
        ("qed", "a.qed", ImageFormat::Qed),
        ("vmdk", "a.vmdk", ImageFormat::Vmdk),
        ("vdi", "a.vdi", ImageFormat::Vdi),
        ("vhdx", "a.vhdx", ImageFormat::Vhdx),
        ("vpc", "a.vhd", ImageFormat::Vpc),
    ];
    for (fmt, name, want) in cases {
        assert!(qemu_img(&["create", "-q", "-f", fmt, &p(name), "1M"]));
        let info = detect::detect_format(Path::new(&p(name))).unwrap();
        assert_eq!(info.format, *want, "{fmt}");
        assert_eq!(info.backing, None, "{fmt}");
    }
    assert_eq!(
        detect::detect_format(Path::new(&p("a.qcow2")))
            .unwrap()
            .version,
        Some(3)
    );
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        &p("old.qcow2"),
        "1M"
    ]));
    assert_eq!(
        detect::detect_format(Path::new(&p("old.qcow2")))
            .unwrap()
            .version,
        Some(2)
    );

    // Backing files.
    let base = p("a.raw");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        &base,
        &p("top.qcow2")
    ]));
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-F",
        "raw",
        "-b",
        &base,
        &p("top.qed")
    ]));
    for top in ["top.qcow2", "top.qed"] {
        let info = detect::detect_format(Path::new(&p(top))).unwrap();
        assert_eq!(info.backing, Some(Backing::Named(base.clone())), "{top}");
    }

    // Through the whole check, on storage given as coherent.
    let check = |name: &str| {
        let mut d = DiskSpec::named("vda");
        d.path = Some(p(name));
        d.storage = Some(StorageKind::Gfs2);
        check_plan(&Plan::single(d)).unwrap()
    };
    let r = check("a.qcow2");
    assert_eq!(
        (r.verdict, r.has(RuleId::Qcow2MetadataCache)),
        (Verdict::Safe, true)
    );
    let r = check("a.qed");
    assert_eq!(
        (r.verdict, r.has(RuleId::QedDirtyFlag)),
        (Verdict::Safe, true)
    );
    let r = check("a.raw");
    assert_eq!(
        (r.verdict, r.has(RuleId::RawOnlineResize)),
        (Verdict::Safe, true)
    );
    let r = check("top.qcow2");
    assert!(
        r.warnings()
            .any(|f| f.rule == RuleId::BackingFile && f.message.contains(&base))
    );
    for bad in ["a.vmdk", "a.vdi", "a.vhdx", "a.vhd"] {
        let r = check(bad);
        assert_eq!(r.verdict, Verdict::Unsafe, "{bad}");
        assert!(
            r.errors().any(|f| f.rule == RuleId::FormatBlocksMigration),
            "{bad}"
        );
    }
    // A format given explicitly wins over the header.
    let mut d = DiskSpec::named("vda");
    d.path = Some(p("a.vmdk"));
    d.storage = Some(StorageKind::Gfs2);
    d.format = Some(ImageFormat::Raw);
    let r = check_plan(&Plan::single(d)).unwrap();
    assert_eq!(r.verdict, Verdict::Safe);
    assert_eq!(
        r.disks[0].inputs.format.as_ref().unwrap().origin,
        Origin::Given
    );
}

#[test]
fn unreadable_and_undetectable_paths_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/image.qcow2");
    let mut d = DiskSpec::named("vda");
    d.path = Some(missing.display().to_string());
    let e = resolve_disk(&d).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    d.path = Some(dir.path().display().to_string());
    let e = resolve_disk(&d).unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");

    d.path = Some("ssh://somewhere/img".into());
    let e = resolve_disk(&d).unwrap_err();
    assert!(
        matches!(&e, Error::Undetectable { .. }) && e.to_string().contains("\"ssh\""),
        "{e}"
    );
    d.storage = Some(StorageKind::Nbd);
    assert_eq!(resolve_disk(&d).unwrap().access, Access::Network);
}

#[test]
fn uris_are_network_disks() {
    let mut d = DiskSpec::named("vda");
    d.path = Some("nbd://filer1:10809/vm1".into());
    let i = resolve_disk(&d).unwrap();
    assert_eq!(
        i.storage.as_ref().map(|s| (s.value, s.origin)),
        Some((StorageKind::Nbd, Origin::Detected))
    );
    assert_eq!(
        i.servers.as_ref().map(|s| s.value.clone()),
        Some(vec!["filer1".to_string()])
    );
    assert_eq!(i.access, Access::Network);
    assert!(i.format.is_none());
    d.path = Some("iscsi://portal/iqn.2001-04.com.example:storage/1".into());
    assert_eq!(
        resolve_disk(&d).unwrap().storage.unwrap().value,
        StorageKind::IscsiQemu
    );
}

fn some_block_device() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/dev")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| detect::is_block_device(p))
        .collect();
    found.sort();
    found.into_iter().next()
}

#[test]
fn block_device_without_a_shared_transport_asks_for_the_kind() {
    let Some(dev) = some_block_device() else {
        eprintln!("skipped: no block device in /dev");
        return;
    };
    let info = detect::detect_block_transport(&dev).unwrap();
    eprintln!("{}: {:?}", dev.display(), info);
    let mut d = DiskSpec::named("vda");
    d.path = Some(dev.display().to_string());
    d.format = Some(ImageFormat::Raw);
    match info.kind {
        None => {
            let e = resolve_disk(&d).unwrap_err();
            assert!(
                e.to_string().contains(&dev.display().to_string())
                    && e.to_string().contains("--storage"),
                "{e}"
            );
        }
        Some(k) => assert_eq!(resolve_disk(&d).unwrap().storage.unwrap().value, k),
    }
    // Given as local: unsafe here, but libvirt only sees a block device with cache=none.
    d.storage = Some(StorageKind::Local);
    d.cache = Some(CacheMode::None);
    let r = check_plan(&Plan::single(d)).unwrap();
    assert_eq!(r.disks[0].inputs.access, Access::BlockDevice);
    assert_eq!(r.verdict, Verdict::Unsafe);
    assert_eq!(r.disks[0].libvirt.branch, LibvirtBranch::CacheBypass);
    assert!(!r.libvirt.agrees && r.disks[0].libvirt.why_different.is_some());
}

/// A real FUSE mount: nbdfuse serving an nbdkit memory disk, with an optional subtype so the
/// mount table says `fuse.SUBTYPE`. Unmounted and reaped on drop.
struct FuseMount {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl FuseMount {
    fn new(subtype: Option<&str>) -> Result<FuseMount, String> {
        use std::time::{Duration, Instant};
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("nbdfuse");
        if let Some(s) = subtype {
            cmd.arg("-o").arg(format!("subtype={s}"));
        }
        cmd.arg(dir.path())
            .args(["--command", "nbdkit", "-s", "memory", "1M"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("nbdfuse (Debian package libnbd-bin): {e}"))?;
        let canonical = std::fs::canonicalize(dir.path()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mounts =
                parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default());
            if mounts
                .iter()
                .any(|m| Path::new(&m.mount_point) == canonical)
            {
                return Ok(FuseMount { dir, child });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("nbdfuse exited before mounting: {status}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nbdfuse did not mount within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("nbd")
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        use std::time::{Duration, Instant};
        let _ = Command::new("umount").arg(self.dir.path()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fuse_subtype_comes_from_the_mount_table() {
    let gluster = match FuseMount::new(Some("glusterfs")) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: cannot make a FUSE mount here: {why}");
            return;
        }
    };
    let fs = detect::detect_filesystem(&gluster.file()).unwrap();
    assert_eq!(fs.magic, magic::FUSE);
    assert_eq!(fs.fuse_subtype(), Some("fuse.glusterfs"));
    assert_eq!(fs.class(), FsClass::Kind(StorageKind::Glusterfs));
    let mut d = DiskSpec::named("vda");
    d.path = Some(gluster.file().display().to_string());
    let r = check_plan(&Plan::single(d.clone())).unwrap();
    assert_eq!(
        r.disks[0].inputs.storage.as_ref().unwrap().value,
        StorageKind::Glusterfs
    );
    assert_eq!(r.verdict, Verdict::Safe, "{:#?}", r.findings);
    assert!(r.has(RuleId::ClusterFilesystem));
    assert_eq!(r.disks[0].libvirt.branch, LibvirtBranch::ClusterFilesystem);
    drop(gluster);

    // A FUSE filesystem without a subtype this checker knows: bad input, asking for --storage.
    let plain = FuseMount::new(None).unwrap();
    d.path = Some(plain.file().display().to_string());
    let e = resolve_disk(&d).unwrap_err();
    assert!(
        e.to_string().contains("FUSE") && e.to_string().contains("--storage"),
        "{e}"
    );
}

fn arb_plan() -> impl Strategy<Value = Plan> {
    let kind = proptest::sample::select(StorageKind::ALL.to_vec());
    let cache = proptest::option::of(proptest::sample::select(CacheMode::ALL.to_vec()));
    let format = proptest::option::of(proptest::sample::select(ImageFormat::GIVABLE.to_vec()));
    let disk = (
        kind,
        cache,
        format,
        any::<[bool; 5]>(),
        proptest::option::of("[a-z/]{1,20}"),
        proptest::option::of("[a-z0-9.]{1,12}"),
    )
        .prop_map(|(k, c, f, b, path, server)| DiskSpec {
            name: String::new(),
            path,
            destination_path: None,
            storage: Some(k),
            cache: c,
            format: f,
            nfs_export: None,
            server,
            online_resize: b[0],
            read_only: b[1],
            shareable: b[2],
            copied: b[3],
            empty: b[4],
        });
    let host = "[a-z][a-z0-9-]{0,10}".prop_map(migration_storage_policy::HostSpec::named);
    (
        proptest::collection::vec(disk, 1..5),
        proptest::option::of(host.clone()),
        proptest::option::of(host),
        any::<bool>(),
    )
        .prop_map(|(mut disks, source, destination, same_host)| {
            for (i, d) in disks.iter_mut().enumerate() {
                d.name = format!("disk{i}");
            }
            Plan {
                source,
                destination,
                same_host,
                disks,
            }
        })
}

proptest! {
    #[test]
    fn header_parser_never_panics(prefix in proptest::sample::select(vec![&b"QFI\xfb"[..], b"QED\0", b"KDMV", b""]),
                                  bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut v = prefix.to_vec();
        v.extend_from_slice(&bytes);
        let info = format_from_reader(&mut Cursor::new(v)).unwrap();
        if let Some(Backing::Named(n)) = info.backing {
            prop_assert!(n.len() <= 4095 * 4);
        }
    }

    #[test]
    fn mount_and_uri_parsers_never_panic(text in ".{0,400}") {
        let m = parse_mounts(&text);
        for e in &m {
            let _ = detect::servers_of_mount(e);
        }
        let _ = detect::mount_for(&m, Path::new("/a/b"));
        let _ = classify_uri(&text);
        let _ = detect::classify_sysfs_block(&text, Some(&text));
    }

    #[test]
    fn plan_parser_never_panics(text in ".{0,400}") {
        let _ = Plan::from_toml_str(&text, "fuzz");
    }

    #[test]
    fn plan_toml_round_trip(plan in arb_plan()) {
        let text = toml::to_string(&plan).unwrap();
        let back = Plan::from_toml_str(&text, "round-trip").unwrap();
        prop_assert_eq!(back, plan);
    }

    #[test]
    fn explicit_plans_always_evaluate(plan in arb_plan()) {
        // Paths in these plans do not exist; only kinds given, so detection may fail on the
        // header of a path but must never panic, and without paths it never fails.
        let mut no_paths = plan.clone();
        for d in &mut no_paths.disks {
            d.path = None;
        }
        let r = check_plan(&no_paths).unwrap();
        prop_assert_eq!(r.safe, r.verdict.is_safe());
        prop_assert_eq!(r.disks.len(), no_paths.disks.len());
        prop_assert_eq!(r.safe, r.errors().next().is_none());
        let _ = check_plan(&plan);
    }
}
