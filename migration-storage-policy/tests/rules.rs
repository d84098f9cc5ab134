//! Table-driven tests of every rule in both directions, and of the libvirt model. All
//! values are given explicitly, so no detection (no I/O) is involved.

use std::collections::BTreeSet;

use migration_storage_policy::{
    CacheMode, DiskSpec, HostSpec, ImageFormat, LibvirtBranch, NfsExport, Plan, Report, Resolved,
    RuleId, Severity, StorageKind, Verdict, check_plan, evaluate, resolve_disk,
};

fn disk(kind: StorageKind, cache: CacheMode, format: ImageFormat) -> DiskSpec {
    DiskSpec {
        name: "vda".into(),
        path: None,
        storage: Some(kind),
        cache: Some(cache),
        format: Some(format),
        nfs_export: (kind == StorageKind::Nfs).then_some(NfsExport::Sync),
        ..DiskSpec::default()
    }
}

fn hosts() -> (HostSpec, HostSpec) {
    (
        HostSpec {
            name: "host-a".into(),
            addresses: vec!["10.0.0.1".into()],
        },
        HostSpec {
            name: "host-b.example.com".into(),
            addresses: vec!["10.0.0.2".into()],
        },
    )
}

fn check(d: DiskSpec, with_hosts: bool) -> Report {
    check_on(d, with_hosts, false)
}

/// [`check`], with source and destination on one host when `same_host`.
fn check_on(d: DiskSpec, with_hosts: bool, same_host: bool) -> Report {
    let (s, t) = hosts();
    let plan = Plan {
        source: with_hosts.then_some(s),
        destination: with_hosts.then_some(t),
        same_host,
        disks: vec![d],
    };
    check_plan(&plan).expect("explicit plans need no detection")
}

struct Case {
    what: &'static str,
    disk: DiskSpec,
    hosts: bool,
    same_host: bool,
    rule: RuleId,
    severity: Severity,
    verdict: Verdict,
}

fn case(
    what: &'static str,
    disk: DiskSpec,
    rule: RuleId,
    severity: Severity,
    verdict: Verdict,
) -> Case {
    Case {
        what,
        disk,
        hosts: false,
        same_host: false,
        rule,
        severity,
        verdict,
    }
}

fn with(mut d: DiskSpec, f: impl FnOnce(&mut DiskSpec)) -> DiskSpec {
    f(&mut d);
    d
}

use CacheMode::{Directsync, None as NoCache, Unsafe as UnsafeCache, Writeback, Writethrough};
use ImageFormat::{Qcow2, Qed, Raw};
use Severity::{Error, Info, Warning};
use StorageKind as K;
use Verdict::{Safe, SafeInPractice, Unsafe};

fn cases() -> Vec<Case> {
    let mut v = vec![
        // Empty drive: safe even on local storage; the same disk with a medium is not.
        case(
            "empty local drive",
            with(disk(K::Local, Writeback, Raw), |d| d.empty = true),
            RuleId::EmptyDrive,
            Info,
            Safe,
        ),
        case(
            "local drive with medium",
            disk(K::Local, Writeback, Raw),
            RuleId::LocalStorageNotShared,
            Error,
            Unsafe,
        ),
        // Read-only.
        case(
            "read-only on nfs writeback",
            with(disk(K::Nfs, Writeback, Qcow2), |d| d.read_only = true),
            RuleId::ReadOnlyDisk,
            Info,
            Safe,
        ),
        case(
            "read-only on local storage",
            with(disk(K::Local, Writeback, Raw), |d| d.read_only = true),
            RuleId::ReadOnlyDisk,
            Warning,
            Safe,
        ),
        case(
            "writable on nfs writeback",
            disk(K::Nfs, Writeback, Qcow2),
            RuleId::NfsODirect,
            Error,
            Unsafe,
        ),
        // Copied.
        case(
            "copied local disk",
            with(disk(K::Local, Writeback, Qcow2), |d| d.copied = true),
            RuleId::CopiedDisk,
            Info,
            Safe,
        ),
        case(
            "copied nfs disk to another path",
            with(disk(K::Nfs, Writeback, Qcow2), |d| {
                d.copied = true;
                d.path = Some("/srv/a.qcow2".into());
                d.destination_path = Some("/var/lib/b.qcow2".into());
            }),
            RuleId::CopiedDisk,
            Info,
            Safe,
        ),
        case(
            "copied nfs disk onto itself",
            with(disk(K::Nfs, NoCache, Qcow2), |d| d.copied = true),
            RuleId::CopyOntoSharedImage,
            Error,
            Unsafe,
        ),
        // NFS cache modes.
        case(
            "nfs none",
            disk(K::Nfs, NoCache, Raw),
            RuleId::NfsODirect,
            Info,
            SafeInPractice,
        ),
        case(
            "nfs directsync",
            disk(K::Nfs, Directsync, Raw),
            RuleId::NfsODirect,
            Info,
            SafeInPractice,
        ),
        case(
            "nfs writethrough",
            disk(K::Nfs, Writethrough, Raw),
            RuleId::NfsODirect,
            Error,
            Unsafe,
        ),
        case(
            "nfs unsafe",
            disk(K::Nfs, UnsafeCache, Raw),
            RuleId::NfsODirect,
            Error,
            Unsafe,
        ),
        case(
            "nfs default cache",
            with(disk(K::Nfs, NoCache, Raw), |d| d.cache = None),
            RuleId::NfsODirect,
            Error,
            Unsafe,
        ),
        // NFS export.
        case(
            "nfs sync export",
            disk(K::Nfs, NoCache, Raw),
            RuleId::NfsSyncExport,
            Info,
            SafeInPractice,
        ),
        case(
            "nfs async export",
            with(disk(K::Nfs, NoCache, Raw), |d| {
                d.nfs_export = Some(NfsExport::Async)
            }),
            RuleId::NfsSyncExport,
            Error,
            Unsafe,
        ),
        case(
            "nfs export not given",
            with(disk(K::Nfs, NoCache, Raw), |d| d.nfs_export = None),
            RuleId::NfsSyncExport,
            Warning,
            SafeInPractice,
        ),
        // SMB.
        case(
            "smb none",
            disk(K::Smb, NoCache, Raw),
            RuleId::SmbODirect,
            Info,
            SafeInPractice,
        ),
        case(
            "smb writeback",
            disk(K::Smb, Writeback, Raw),
            RuleId::SmbODirect,
            Error,
            Unsafe,
        ),
        // QEMU's iSCSI driver, RBD, NBD: any cache mode.
        case(
            "iscsi-qemu writeback",
            disk(K::IscsiQemu, Writeback, Raw),
            RuleId::QemuIscsiDriver,
            Info,
            Safe,
        ),
        case(
            "iscsi-qemu unsafe",
            disk(K::IscsiQemu, UnsafeCache, Qcow2),
            RuleId::QemuIscsiDriver,
            Info,
            Safe,
        ),
        case(
            "rbd writeback",
            disk(K::Rbd, Writeback, Raw),
            RuleId::NetworkBlockDriver,
            Info,
            Safe,
        ),
        case(
            "nbd writethrough",
            disk(K::Nbd, Writethrough, Raw),
            RuleId::NetworkBlockDriver,
            Info,
            Safe,
        ),
        // Formats on coherent storage.
        case(
            "qcow2 resized online",
            with(disk(K::Gfs2, NoCache, Qcow2), |d| d.online_resize = true),
            RuleId::Qcow2MetadataCache,
            Info,
            Safe,
        ),
        case(
            "qed",
            disk(K::Gfs2, Writeback, Qed),
            RuleId::QedDirtyFlag,
            Info,
            Safe,
        ),
        case(
            "raw not resized",
            disk(K::Gfs2, Writeback, Raw),
            RuleId::RawOnlineResize,
            Info,
            Safe,
        ),
        case(
            "raw resized online",
            with(disk(K::Gfs2, Writeback, Raw), |d| d.online_resize = true),
            RuleId::RawOnlineResize,
            Error,
            Unsafe,
        ),
        case(
            "rbd format unknown",
            with(disk(K::Rbd, NoCache, Raw), |d| d.format = None),
            RuleId::FormatUnknown,
            Warning,
            Safe,
        ),
        case(
            "rbd format unknown, resized",
            with(disk(K::Rbd, NoCache, Raw), |d| {
                d.format = None;
                d.online_resize = true;
            }),
            RuleId::RawOnlineResize,
            Error,
            Unsafe,
        ),
        // Shareable.
        case(
            "shareable raw",
            with(disk(K::Ocfs2, NoCache, Raw), |d| d.shareable = true),
            RuleId::ShareableDisk,
            Info,
            Safe,
        ),
        case(
            "shareable qcow2",
            with(disk(K::Ocfs2, NoCache, Qcow2), |d| d.shareable = true),
            RuleId::ShareableDisk,
            Error,
            Unsafe,
        ),
        case(
            "shareable nfs writeback",
            with(disk(K::Nfs, Writeback, Raw), |d| d.shareable = true),
            RuleId::NfsODirect,
            Error,
            Unsafe,
        ),
    ];
    // Host-attached LUNs, every transport, every cache mode.
    for k in [K::Iscsi, K::Fc, K::Fcoe, K::Srp] {
        for c in CacheMode::ALL {
            let (sev, verdict) = if c.bypasses_host_page_cache() {
                (Info, Safe)
            } else {
                (Error, Unsafe)
            };
            v.push(case(
                "host LUN",
                disk(k, c, Raw),
                RuleId::BlockHostPageCache,
                sev,
                verdict,
            ));
        }
    }
    // Cluster filesystems, every cache mode.
    for k in [K::Gfs2, K::Ocfs2, K::Gpfs, K::Cephfs, K::Glusterfs] {
        for c in CacheMode::ALL {
            v.push(case(
                "cluster fs",
                disk(k, c, Qcow2),
                RuleId::ClusterFilesystem,
                Info,
                Safe,
            ));
        }
    }
    // Host-level rules.
    let shared = |f: &dyn Fn(&mut DiskSpec)| {
        let mut d = disk(K::Gfs2, NoCache, Raw);
        d.path = Some("/gfs/vm.img".into());
        f(&mut d);
        d
    };
    let mut host_cases = vec![
        case(
            "same path",
            shared(&|_| {}),
            RuleId::SamePathOnBothHosts,
            Info,
            Safe,
        ),
        case(
            "different path",
            shared(&|d| d.destination_path = Some("/mnt/gfs/vm.img".into())),
            RuleId::SamePathOnBothHosts,
            Warning,
            Safe,
        ),
        case(
            "server is a third host",
            shared(&|d| d.server = Some("filer1".into())),
            RuleId::StorageNotOnMigrationHosts,
            Info,
            Safe,
        ),
        case(
            "server unknown",
            shared(&|_| {}),
            RuleId::StorageNotOnMigrationHosts,
            Info,
            Safe,
        ),
        case(
            "server is the source",
            shared(&|d| d.server = Some("10.0.0.1".into())),
            RuleId::StorageNotOnMigrationHosts,
            Warning,
            Safe,
        ),
        case(
            "server is the destination by short name",
            shared(&|d| d.server = Some("host-b".into())),
            RuleId::StorageNotOnMigrationHosts,
            Warning,
            Safe,
        ),
    ];
    for c in &mut host_cases {
        c.hosts = true;
    }
    v.extend(host_cases);
    // Source and destination on one host: the local file is the one both open.
    let mut one_host = vec![case(
        "local drive, destination on the same host",
        disk(K::Local, Writeback, Raw),
        RuleId::SameHostLocalFile,
        Info,
        Safe,
    )];
    for c in &mut one_host {
        c.same_host = true;
    }
    v.extend(one_host);
    v
}

#[test]
fn every_rule_in_both_directions() {
    let mut seen = BTreeSet::new();
    for c in cases() {
        let report = check_on(c.disk.clone(), c.hosts, c.same_host);
        let found: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.rule == c.rule)
            .collect();
        assert!(
            found.iter().any(|f| f.severity == c.severity),
            "{}: expected {:?} {}, got {:#?}",
            c.what,
            c.severity,
            c.rule,
            report.findings
        );
        assert_eq!(
            report.verdict, c.verdict,
            "{}: {:#?}",
            c.what, report.findings
        );
        assert_eq!(report.safe, c.verdict.is_safe(), "{}", c.what);
        for f in &found {
            assert!(
                !f.source.is_empty() && !f.reasoning.is_empty() && !f.message.is_empty(),
                "{}",
                c.what
            );
            if f.severity != Info {
                assert!(
                    f.remedy.as_deref().is_some_and(|r| !r.is_empty()),
                    "{}: no remedy",
                    c.what
                );
            }
        }
        seen.insert((c.rule, c.severity == Info));
    }
    // Every rule is exercised; every rule that can fail is also seen passing, and vice versa
    // (info-only rules are seen passing, with their failing counterpart elsewhere).
    let info_only = [
        RuleId::EmptyDrive,
        RuleId::SameHostLocalFile,
        RuleId::CopiedDisk,
        RuleId::QemuIscsiDriver,
        RuleId::ClusterFilesystem,
        RuleId::NetworkBlockDriver,
        RuleId::Qcow2MetadataCache,
        RuleId::QedDirtyFlag,
    ];
    let never_info = [
        RuleId::LocalStorageNotShared,
        RuleId::CopyOntoSharedImage,
        RuleId::FormatUnknown,
        RuleId::BackingFile,
        RuleId::FormatBlocksMigration,
    ];
    for r in RuleId::ALL {
        if !never_info.contains(&r) {
            assert!(seen.contains(&(r, true)), "{r} never seen satisfied");
        }
        if !info_only.contains(&r) && r != RuleId::BackingFile && r != RuleId::FormatBlocksMigration
        {
            assert!(seen.contains(&(r, false)), "{r} never seen failing");
        }
    }
}

/// Rules that need detected values (a blocking format, a backing file) are driven through
/// `evaluate` with resolved inputs.
#[test]
fn detected_only_rules() {
    let mut inputs = resolve_disk(&disk(K::Gfs2, NoCache, Raw)).unwrap();
    inputs.format = Some(Resolved::detected(ImageFormat::Vmdk, "test header"));
    let r = evaluate(vec![inputs.clone()], None, None, false);
    assert!(
        r.errors().any(|f| f.rule == RuleId::FormatBlocksMigration),
        "{:#?}",
        r.findings
    );
    assert_eq!(r.verdict, Unsafe);
    // libvirt does not look at the format: it differs, and says why.
    assert!(r.libvirt.safe && !r.libvirt.agrees);

    inputs.format = Some(Resolved::detected(ImageFormat::Qcow2, "test header"));
    inputs.backing = Some(migration_storage_policy::detect::Backing::Named(
        "/gfs/base.raw".into(),
    ));
    let r = evaluate(vec![inputs], None, None, false);
    assert!(
        r.warnings()
            .any(|f| f.rule == RuleId::BackingFile && f.message.contains("/gfs/base.raw"))
    );
    assert_eq!(r.verdict, Safe);
    assert!(!r.has(RuleId::FormatBlocksMigration));
}

#[test]
fn whole_plan_takes_the_worst_disk() {
    let plan = Plan {
        source: None,
        destination: None,
        same_host: false,
        disks: vec![
            with(disk(K::Gfs2, Writeback, Raw), |d| d.name = "a".into()),
            with(disk(K::Nfs, NoCache, Qcow2), |d| d.name = "b".into()),
        ],
    };
    let r = check_plan(&plan).unwrap();
    assert_eq!(r.verdict, SafeInPractice);
    assert_eq!(r.disks[0].verdict, Safe);
    assert_eq!(r.disks[1].verdict, SafeInPractice);
    let mut plan = plan;
    plan.disks
        .push(with(disk(K::Local, NoCache, Raw), |d| d.name = "c".into()));
    let r = check_plan(&plan).unwrap();
    assert_eq!(r.verdict, Unsafe);
    assert_eq!(r.errors().count(), 1);
    assert!(
        r.summary().contains("c: ")
            && r.summary().contains("local-storage-not-shared")
            && r.summary().contains("; remedy: "),
        "{}",
        r.summary()
    );
    assert!(r.findings.iter().all(|f| f.disk.is_some()));
}

#[test]
fn origins_are_reported() {
    let r = check(
        with(disk(K::Nfs, NoCache, Raw), |d| {
            d.cache = None;
            d.nfs_export = None;
        }),
        false,
    );
    let i = &r.disks[0].inputs;
    assert_eq!(
        i.storage.as_ref().unwrap().origin,
        migration_storage_policy::Origin::Given
    );
    assert_eq!(i.cache.origin, migration_storage_policy::Origin::Default);
    assert_eq!(i.cache.value, CacheMode::Writeback);
    assert_eq!(
        i.nfs_export.as_ref().unwrap().origin,
        migration_storage_policy::Origin::Default
    );
}

struct LvCase {
    what: &'static str,
    disk: DiskSpec,
    safe: bool,
    safe_old: bool,
    branch: LibvirtBranch,
    agrees: bool,
}

#[test]
fn libvirt_model() {
    let lv = |what, disk, safe, safe_old, branch, agrees| LvCase {
        what,
        disk,
        safe,
        safe_old,
        branch,
        agrees,
    };
    use LibvirtBranch as B;
    let table = vec![
        lv(
            "local file",
            disk(K::Local, NoCache, Raw),
            false,
            false,
            B::NotSharedFilesystem,
            true,
        ),
        lv(
            "nfs none",
            disk(K::Nfs, NoCache, Raw),
            true,
            true,
            B::CacheBypass,
            true,
        ),
        lv(
            "nfs directsync",
            disk(K::Nfs, Directsync, Raw),
            true,
            true,
            B::CacheBypass,
            true,
        ),
        lv(
            "nfs writeback",
            disk(K::Nfs, Writeback, Raw),
            true,
            false,
            B::QemuDropsPageCache,
            false,
        ),
        lv(
            "nfs async export",
            with(disk(K::Nfs, NoCache, Raw), |d| {
                d.nfs_export = Some(NfsExport::Async)
            }),
            true,
            true,
            B::CacheBypass,
            false,
        ),
        lv(
            "smb writeback",
            disk(K::Smb, Writeback, Raw),
            true,
            false,
            B::QemuDropsPageCache,
            false,
        ),
        lv(
            "gpfs writeback (shared, not cluster, for libvirt)",
            disk(K::Gpfs, Writeback, Raw),
            true,
            false,
            B::QemuDropsPageCache,
            true,
        ),
        lv(
            "gfs2 writeback",
            disk(K::Gfs2, Writeback, Raw),
            true,
            true,
            B::ClusterFilesystem,
            true,
        ),
        lv(
            "cephfs unsafe",
            disk(K::Cephfs, UnsafeCache, Raw),
            true,
            true,
            B::ClusterFilesystem,
            true,
        ),
        lv(
            "iscsi LUN none",
            disk(K::Iscsi, NoCache, Raw),
            true,
            true,
            B::CacheBypass,
            true,
        ),
        lv(
            "fc LUN writeback",
            disk(K::Fc, Writeback, Raw),
            true,
            false,
            B::QemuDropsPageCache,
            false,
        ),
        lv(
            "rbd",
            disk(K::Rbd, Writeback, Raw),
            true,
            true,
            B::NetworkDisk,
            true,
        ),
        lv(
            "iscsi-qemu",
            disk(K::IscsiQemu, Writeback, Raw),
            true,
            true,
            B::NetworkDisk,
            true,
        ),
        lv(
            "shareable nfs writeback",
            with(disk(K::Nfs, Writeback, Raw), |d| d.shareable = true),
            true,
            true,
            B::Shareable,
            false,
        ),
        lv(
            "copied onto itself",
            with(disk(K::Nfs, NoCache, Raw), |d| d.copied = true),
            true,
            true,
            B::Copied,
            false,
        ),
        lv(
            "copied local",
            with(disk(K::Local, Writeback, Raw), |d| d.copied = true),
            true,
            true,
            B::Copied,
            true,
        ),
        lv(
            "read-only local",
            with(disk(K::Local, Writeback, Raw), |d| d.read_only = true),
            true,
            true,
            B::EmptyOrReadOnly,
            true,
        ),
        lv(
            "empty",
            with(disk(K::Local, Writeback, Raw), |d| d.empty = true),
            true,
            true,
            B::EmptyOrReadOnly,
            true,
        ),
        lv(
            "raw resized on gfs2",
            with(disk(K::Gfs2, NoCache, Raw), |d| d.online_resize = true),
            true,
            true,
            B::ClusterFilesystem,
            false,
        ),
    ];
    for c in table {
        let r = check(c.disk, false);
        let l = &r.disks[0].libvirt;
        assert_eq!(
            (l.safe, l.safe_without_drop_cache, l.branch, l.agrees),
            (c.safe, c.safe_old, c.branch, c.agrees),
            "{}: {l:#?}",
            c.what
        );
        assert_eq!(l.why_different.is_some(), !c.agrees, "{}", c.what);
        assert_eq!(r.libvirt.agrees, c.agrees, "{}", c.what);
        assert_eq!(r.libvirt.safe, c.safe, "{}", c.what);
    }
}

#[test]
fn libvirt_decides_from_the_detected_filesystem() {
    use migration_storage_policy::detect::{FsInfo, MountEntry, magic};
    let fs = |m: u64, t: &str| FsInfo {
        magic: m,
        magic_name: migration_storage_policy::detect::magic_name(m),
        probed_path: "/mnt/x".into(),
        mount: Some(MountEntry {
            source: "s:/e".into(),
            mount_point: "/mnt".into(),
            fs_type: t.into(),
            options: String::new(),
        }),
    };
    let detected = |kind: StorageKind, f: FsInfo| {
        let mut i = resolve_disk(&disk(kind, Writeback, Raw)).unwrap();
        i.storage = Some(Resolved::detected(kind, f.describe()));
        i.filesystem = Some(f);
        i
    };
    let lv = |i: migration_storage_policy::DiskInputs| {
        let r = evaluate(vec![i], None, None, false);
        (r.disks[0].libvirt.safe, r.disks[0].libvirt.branch)
    };
    // An SMB3 mount reports SMB2_SUPER_MAGIC, which libvirt's list lacks.
    let (safe, branch) = lv(detected(K::Smb, fs(magic::SMB2, "cifs")));
    assert_eq!((safe, branch), (false, LibvirtBranch::NotSharedFilesystem));
    let (safe, branch) = lv(detected(K::Smb, fs(magic::CIFS, "cifs")));
    assert_eq!((safe, branch), (true, LibvirtBranch::QemuDropsPageCache));
    // ceph-fuse is not in libvirt's FUSE list; fuse.glusterfs is a cluster filesystem.
    let (safe, branch) = lv(detected(K::Cephfs, fs(magic::FUSE, "fuse.ceph-fuse")));
    assert_eq!((safe, branch), (false, LibvirtBranch::NotSharedFilesystem));
    let (safe, branch) = lv(detected(K::Glusterfs, fs(magic::FUSE, "fuse.glusterfs")));
    assert_eq!((safe, branch), (true, LibvirtBranch::ClusterFilesystem));
    let (_, branch) = lv(detected(K::Cephfs, fs(magic::CEPH, "ceph")));
    assert_eq!(branch, LibvirtBranch::ClusterFilesystem);
}

#[test]
fn plan_parsing_errors_name_the_problem() {
    let err = |t: &str| Plan::from_toml_str(t, "p.toml").unwrap_err().to_string();
    assert!(err("").contains("no disks"));
    assert!(
        err("[[disk]]\nname = \"a\"\nstorage = \"zfs-over-carrier-pigeon\"\n")
            .contains("zfs-over-carrier-pigeon")
    );
    assert!(
        err("[[disk]]\nname = \"a\"\nstorage = \"nfs\"\ncolour = \"red\"\n").contains("colour")
    );
    assert!(err("[[disk]]\nname = \"a\"\nstorage = \"nfs\"\nformat = \"vmdk\"\n").contains("vmdk"));
    assert!(
        err(
            "[[disk]]\nname = \"a\"\nstorage = \"nfs\"\n[[disk]]\nname = \"a\"\nstorage = \"nfs\"\n"
        )
        .contains("two disks")
    );
    assert!(err("[[disk]]\nname = \"a\"\n").contains("neither a path nor a storage kind"));
    assert!(
        err("[source]\nname = \"\"\n[[disk]]\nname = \"a\"\nstorage = \"nfs\"\n")
            .contains("source host")
    );
    let ok = Plan::from_toml_str(
        "[source]\nname = \"a\"\n[destination]\nname = \"b\"\naddresses = [\"10.0.0.2\"]\n\
         [[disk]]\nname = \"vda\"\nstorage = \"ceph\"\ncache = \"directsync\"\nformat = \"qed\"\ncopy_storage = true\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(ok.disks[0].storage, Some(K::Cephfs));
    assert_eq!(ok.disks[0].cache, Some(Directsync));
    assert_eq!(ok.disks[0].format, Some(Qed));
    assert!(ok.disks[0].copied);
    assert_eq!(ok.destination.unwrap().addresses, vec!["10.0.0.2"]);
}

#[test]
fn names_parse_and_print_the_same() {
    for k in StorageKind::ALL {
        assert_eq!(k.to_string().parse::<StorageKind>().unwrap(), k);
    }
    for c in CacheMode::ALL {
        assert_eq!(c.to_string().parse::<CacheMode>().unwrap(), c);
    }
    for f in ImageFormat::GIVABLE {
        assert_eq!(f.to_string().parse::<ImageFormat>().unwrap(), f);
    }
    assert_eq!("cifs".parse::<StorageKind>().unwrap(), K::Smb);
    assert!("vmdk".parse::<ImageFormat>().is_err());
    for r in RuleId::ALL {
        let json = serde_json::to_value(r).unwrap();
        assert_eq!(
            json.as_str(),
            Some(r.as_str()),
            "serde and as_str agree for {r:?}"
        );
    }
}

/// On one host a local file is safe whatever its cache mode, by the same-host rule and
/// with the format rules still applied; the fact changes nothing for other storage, and
/// without it a local file is still refused.
#[test]
fn a_local_file_is_shared_when_both_sides_run_on_one_host() {
    for cache in CacheMode::ALL {
        let r = check_on(disk(K::Local, cache, Raw), false, true);
        assert_eq!(r.verdict, Safe, "{cache}: {:#?}", r.findings);
        assert!(r.same_host);
        let f = r
            .findings
            .iter()
            .find(|f| f.rule == RuleId::SameHostLocalFile)
            .unwrap_or_else(|| panic!("{cache}: {:#?}", r.findings));
        assert_eq!(f.severity, Info);
        assert_eq!(f.basis, Some(migration_storage_policy::Basis::Guarantee));
        assert!(
            f.message.contains(&format!("cache={cache}")),
            "{}",
            f.message
        );
        assert!(f.reasoning.contains("page cache"), "{}", f.reasoning);
        assert!(!r.has(RuleId::LocalStorageNotShared));
        // The format rules apply as on shared storage.
        assert!(r.has(RuleId::RawOnlineResize));
        // libvirt has no such notion: it refuses, and the report says why it differs.
        assert!(!r.libvirt.safe && !r.libvirt.agrees);
        let why = r.disks[0].libvirt.why_different.as_deref().unwrap();
        assert!(why.contains("same-host-local-file"), "{why}");
    }
    // An online resize of a raw image is unsafe on one host too.
    let r = check_on(
        with(disk(K::Local, Writeback, Raw), |d| d.online_resize = true),
        false,
        true,
    );
    assert_eq!(r.verdict, Unsafe, "{:#?}", r.findings);
    assert!(r.errors().any(|f| f.rule == RuleId::RawOnlineResize));
    // Without the fact, a local file is refused as before.
    let r = check_on(disk(K::Local, Writeback, Raw), false, false);
    assert_eq!(r.verdict, Unsafe);
    assert!(!r.has(RuleId::SameHostLocalFile) && !r.same_host);
    // Other storage is judged as before: NFS through the page cache stays unsafe.
    let r = check_on(disk(K::Nfs, Writeback, Raw), false, true);
    assert_eq!(r.verdict, Unsafe);
    assert!(!r.has(RuleId::SameHostLocalFile));
    // The plan file says it as `same_host = true`.
    let plan = Plan::from_toml_str(
        "same_host = true\n[[disk]]\nname = \"vda\"\nstorage = \"local\"\nformat = \"raw\"\n",
        "test",
    )
    .unwrap();
    assert!(plan.same_host);
    assert_eq!(check_plan(&plan).unwrap().verdict, Safe);
}
