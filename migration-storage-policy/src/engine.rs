//! Resolution (explicit values, else detection, else defaults) and evaluation of the rules,
//! and the model of libvirt's decision.

use std::path::Path;

use crate::detect::{self, Backing, FsClass, magic};
use crate::error::Error;
use crate::model::{CacheMode, DiskSpec, HostSpec, ImageFormat, NfsExport, Plan, StorageKind};
use crate::report::{
    Access, Basis, DiskInputs, DiskReport, Finding, LibvirtBranch, LibvirtDisk, LibvirtSummary,
    Origin, Report, Resolved, Severity, Verdict,
};
use crate::rules::RuleId;

/// Resolves every value of one disk: what is given stays, what is not is detected from the
/// path, what cannot be detected takes its documented default. Reads the filesystem and the
/// image header; fails on an unreadable path or a storage it cannot classify.
pub fn resolve_disk(spec: &DiskSpec) -> Result<DiskInputs, Error> {
    let mut storage = spec.storage.map(Resolved::given);
    let mut servers = spec.server.clone().map(|s| Resolved::given(vec![s]));
    let mut format = spec.format.map(Resolved::given);
    let mut backing = None;
    let mut filesystem = None;
    let undetectable = |message: String| Error::Undetectable {
        disk: spec.name.clone(),
        message,
    };

    let access = if spec.empty {
        Access::None
    } else if let Some(path) = &spec.path {
        match detect::classify_uri(path) {
            Some(Err(scheme)) => {
                if storage.is_none() {
                    return Err(undetectable(format!(
                        "{path}: QEMU URI scheme {scheme:?} has no rule here; give --storage if it behaves like one of the kinds"
                    )));
                }
                Access::Network
            }
            Some(Ok(uri)) => {
                if storage.is_none() {
                    storage = Some(Resolved::detected(
                        uri.kind,
                        format!("QEMU URI scheme {}", uri.scheme),
                    ));
                }
                if servers.is_none() {
                    servers = uri
                        .server
                        .map(|s| Resolved::detected(vec![s], format!("host of {path}")));
                }
                Access::Network
            }
            None => {
                let p = Path::new(path);
                let access = if detect::is_block_device(p) {
                    if storage.is_none() {
                        let info = detect::detect_block_transport(p)?;
                        let sysfs = info.sysfs.join(", ");
                        match info.kind {
                            Some(k) => {
                                storage = Some(Resolved::detected(
                                    k,
                                    format!("block device, sysfs {sysfs}"),
                                ))
                            }
                            None => {
                                return Err(undetectable(format!(
                                    "{path} is a block device and sysfs ({sysfs}) shows no iSCSI, FC, FCoE or SRP transport, so whether another host sees it cannot be told; give --storage (local for a disk of this host only)"
                                )));
                            }
                        }
                    }
                    Access::BlockDevice
                } else {
                    match detect::detect_filesystem(p) {
                        Ok(fs) => {
                            let class = fs.class();
                            if storage.is_none() {
                                match &class {
                                    FsClass::Kind(k) => {
                                        storage = Some(Resolved::detected(*k, fs.describe()))
                                    }
                                    FsClass::SharedWithoutRule(name) => {
                                        return Err(undetectable(format!(
                                            "{path} is on {name} ({}), a shared filesystem this checker has no rule for; give --storage if you know it behaves like one of the kinds",
                                            fs.describe()
                                        )));
                                    }
                                    FsClass::UnknownFuse(subtype) => {
                                        return Err(undetectable(format!(
                                            "{path} is on a FUSE filesystem ({}) this checker has no rule for; give --storage",
                                            subtype
                                                .as_deref()
                                                .unwrap_or("subtype not in the mount table")
                                        )));
                                    }
                                    FsClass::Unknown => {
                                        return Err(undetectable(format!(
                                            "{path} is on a filesystem with unknown statfs magic {:#x} ({}); give --storage",
                                            fs.magic,
                                            fs.describe()
                                        )));
                                    }
                                }
                            }
                            if servers.is_none()
                                && storage
                                    .as_ref()
                                    .is_some_and(|s| class == FsClass::Kind(s.value))
                            {
                                if let Some(m) = &fs.mount {
                                    let list = detect::servers_of_mount(m);
                                    if !list.is_empty() {
                                        servers = Some(Resolved::detected(
                                            list,
                                            format!("mount source {}", m.source),
                                        ));
                                    }
                                }
                            }
                            filesystem = Some(fs);
                        }
                        Err(e) => {
                            if storage.is_none() {
                                return Err(e);
                            }
                        }
                    }
                    Access::File
                };
                match &format {
                    None => {
                        let info = detect::detect_format(p)?;
                        let how = match info.version {
                            Some(v) => {
                                format!("image header of {path}: {} version {v}", info.format)
                            }
                            None => format!("image header of {path}: {}", info.format),
                        };
                        format = Some(Resolved::detected(info.format, how));
                        backing = info.backing;
                    }
                    Some(given) => {
                        // The header still tells about a backing file when it agrees with
                        // the format given; an unreadable path is not an error then.
                        if let Ok(info) = detect::detect_format(p) {
                            if info.format == given.value {
                                backing = info.backing;
                            }
                        }
                    }
                }
                access
            }
        }
    } else {
        match spec.storage {
            Some(k) if k.is_host_block_device() => Access::BlockDevice,
            Some(k) if k.is_qemu_network_driver() => Access::Network,
            _ => Access::File,
        }
    };

    if storage.is_none() && !spec.empty {
        return Err(undetectable(
            "neither a path nor a storage kind: give --path or --storage".into(),
        ));
    }

    let cache = match spec.cache {
        Some(c) => Resolved::given(c),
        None => Resolved::default_because(
            CacheMode::QEMU_DEFAULT,
            "no cache mode given: QEMU's default is writeback",
        ),
    };
    let nfs_export = match (spec.nfs_export, storage.as_ref().map(|s| s.value)) {
        (Some(e), _) => Some(Resolved::given(e)),
        (None, Some(StorageKind::Nfs)) => Some(Resolved::default_because(
            NfsExport::Sync,
            "not given (the client cannot see it): assumed sync, the Linux exportfs default",
        )),
        (None, _) => None,
    };

    Ok(DiskInputs {
        name: spec.name.clone(),
        path: spec.path.clone(),
        destination_path: spec.destination_path.clone(),
        storage,
        access,
        cache,
        format,
        backing,
        nfs_export,
        servers,
        filesystem,
        online_resize: spec.online_resize,
        read_only: spec.read_only,
        shareable: spec.shareable,
        copied: spec.copied,
        empty: spec.empty,
    })
}

struct Findings<'a> {
    disk: &'a str,
    list: Vec<Finding>,
}

impl Findings<'_> {
    fn push(
        &mut self,
        rule: RuleId,
        severity: Severity,
        message: String,
        remedy: Option<&str>,
        basis: Option<Basis>,
    ) {
        let info = rule.info();
        self.list.push(Finding {
            rule,
            severity,
            disk: Some(self.disk.to_string()),
            message,
            remedy: remedy.map(str::to_string),
            source: info.source,
            reasoning: info.reasoning,
            basis,
        });
    }
    fn ok(&mut self, rule: RuleId, message: String, basis: Basis) {
        self.push(rule, Severity::Info, message, None, Some(basis));
    }
    fn note(&mut self, rule: RuleId, message: String) {
        self.push(rule, Severity::Info, message, None, None);
    }
    fn warn(&mut self, rule: RuleId, message: String, remedy: &str) {
        self.push(rule, Severity::Warning, message, Some(remedy), None);
    }
    fn error(&mut self, rule: RuleId, message: String, remedy: &str) {
        self.push(rule, Severity::Error, message, Some(remedy), None);
    }
}

fn destination_path(d: &DiskInputs) -> Option<&str> {
    d.destination_path.as_deref().or(d.path.as_deref())
}

fn same_path(d: &DiskInputs) -> bool {
    destination_path(d) == d.path.as_deref()
}

/// Applies the rules to one resolved disk. `same_host`: source and destination run on one
/// host ([`Plan::same_host`]).
pub fn evaluate_disk(
    d: &DiskInputs,
    hosts: Option<(&HostSpec, &HostSpec)>,
    same_host: bool,
) -> Vec<Finding> {
    let mut f = Findings {
        disk: &d.name,
        list: Vec::new(),
    };
    if d.empty {
        f.ok(
            RuleId::EmptyDrive,
            "no medium: there is no image to keep coherent".into(),
            Basis::Guarantee,
        );
        return f.list;
    }
    // resolve_disk guarantees a kind for every non-empty disk.
    let kind = d.storage.as_ref().map_or(StorageKind::Local, |s| s.value);
    let cache = d.cache.value;
    let fmt = d.format.as_ref().map(|r| r.value);
    let cache_desc = match d.cache.origin {
        Origin::Default => format!("cache={cache} (QEMU's default, none given)"),
        _ => format!("cache={cache}"),
    };

    if let Some(bad) = fmt.filter(|f| f.blocks_migration()) {
        f.error(
            RuleId::FormatBlocksMigration,
            format!("the image is {bad}: QEMU's {bad} driver adds a migration blocker when it opens it, so the migration cannot start"),
            "convert the image to qcow2 or raw (qemu-img convert -O qcow2 OLD NEW) and attach the converted image",
        );
    }
    match &d.backing {
        Some(Backing::Named(name)) => f.warn(
            RuleId::BackingFile,
            format!("the image has the backing file {name:?}, which the destination opens too and this check does not cover"),
            "check the backing file as a disk of its own (read_only = true if nothing writes it) and make sure the destination sees it at the same path",
        ),
        Some(Backing::Unreadable(why)) => f.warn(
            RuleId::BackingFile,
            format!("the header names a backing file that could not be read: {why}"),
            "inspect the image with qemu-img info --backing-chain and check each file of the chain",
        ),
        None => {}
    }

    if d.read_only {
        if kind.is_shared() {
            f.ok(
                RuleId::ReadOnlyDisk,
                format!("read-only on {kind}: no writer, so nothing can be stale"),
                Basis::Guarantee,
            );
            host_rules(&mut f, d, hosts);
        } else {
            f.warn(
                RuleId::ReadOnlyDisk,
                format!(
                    "read-only, so nothing can be stale, but it is on local storage: the destination needs an identical copy at {}",
                    destination_path(d).unwrap_or("the same path")
                ),
                "place an identical copy at that path on the destination, or move the image to shared storage",
            );
        }
        return f.list;
    }

    if d.copied {
        if kind.is_shared() && same_path(d) {
            f.error(
                RuleId::CopyOntoSharedImage,
                format!(
                    "the disk is copied, but it is on shared {kind} storage at the same path on both hosts: the copy would be written over the image the source guest is running from"
                ),
                "do not copy disks that are on shared storage (drop --copy-storage for it), or give the destination a different path",
            );
        } else {
            f.ok(
                RuleId::CopiedDisk,
                "copied to the destination by storage migration, which mirrors every guest write until it is in sync".into(),
                Basis::Guarantee,
            );
        }
        return f.list;
    }

    // One host: its local file is the one file both processes open.
    let shared = kind.is_shared() || same_host;
    match kind {
        StorageKind::Local if same_host => {
            f.ok(
                RuleId::SameHostLocalFile,
                format!(
                    "the image is on a local filesystem and the destination runs on the same host: both open the same file through one page cache, so {cache_desc} reads what the source wrote"
                ),
                Basis::Guarantee,
            );
        }
        StorageKind::Local => {
            let on = d
                .filesystem
                .as_ref()
                .and_then(|fs| fs.magic_name)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            f.error(
                RuleId::LocalStorageNotShared,
                format!("the image is on a local filesystem{on} of the source host: the destination cannot open it"),
                "copy the disk with storage migration (--copy-storage), move the image to shared storage, or attach it read-only",
            );
        }
        StorageKind::Nfs => {
            if cache.bypasses_host_page_cache() {
                f.ok(
                    RuleId::NfsODirect,
                    format!("{cache_desc} opens the image with O_DIRECT: the Linux NFS client sends every read to the server. NFS itself only promises close-to-open coherence, so this holds in practice (Linux client and server), not by the protocol"),
                    Basis::Practice,
                );
            } else {
                f.error(
                    RuleId::NfsODirect,
                    format!("{cache_desc} reads through the host page cache, and NFS only guarantees close-to-open coherence: the destination can read pages it cached before the source's last writes"),
                    "use cache=none (or directsync) for this disk on both hosts",
                );
            }
            match d.nfs_export.as_ref() {
                Some(e) if e.value == NfsExport::Async => f.error(
                    RuleId::NfsSyncExport,
                    "the server exports with async: it acknowledges writes before they are stable, and the in-practice coherence is only stated for sync exports".into(),
                    "export with sync in the server's /etc/exports and run exportfs -ra",
                ),
                Some(e) if e.origin == Origin::Default => f.warn(
                    RuleId::NfsSyncExport,
                    "the export mode was not given and a client cannot see it: assumed sync, the Linux default".into(),
                    "confirm sync in the server's /etc/exports (exportfs -v on the server) and pass --nfs-export sync",
                ),
                _ => f.ok(RuleId::NfsSyncExport, "the server exports with sync".into(), Basis::Practice),
            }
        }
        StorageKind::Smb => {
            if cache.bypasses_host_page_cache() {
                f.ok(
                    RuleId::SmbODirect,
                    format!("{cache_desc} opens the image with O_DIRECT: the Linux CIFS client sends reads to the server instead of its page cache. No SMB document promises this for migration; it holds in practice"),
                    Basis::Practice,
                );
            } else {
                f.error(
                    RuleId::SmbODirect,
                    format!("{cache_desc} reads through the CIFS client's page cache, which is not coherent with the other host's writes while both have the image open"),
                    "use cache=none (or directsync) for this disk on both hosts",
                );
            }
        }
        k if k.is_host_block_device() => {
            if cache.bypasses_host_page_cache() {
                f.ok(
                    RuleId::BlockHostPageCache,
                    format!("{k} LUN with {cache_desc}: O_DIRECT bypasses the host page cache, and the device returns every acknowledged write"),
                    Basis::Guarantee,
                );
            } else {
                f.error(
                    RuleId::BlockHostPageCache,
                    format!("{k} LUN with {cache_desc}: reads go through the host page cache, which is not coherent across hosts"),
                    "use cache=none (or directsync), or QEMU's own iSCSI driver (iscsi:// URI) for iSCSI",
                );
            }
        }
        StorageKind::IscsiQemu => f.ok(
            RuleId::QemuIscsiDriver,
            format!("QEMU's iSCSI driver bypasses the host page cache, so {cache_desc} is safe"),
            Basis::Guarantee,
        ),
        k if k.is_cluster_filesystem() => f.ok(
            RuleId::ClusterFilesystem,
            format!("{k} is a cluster filesystem: its locks keep the page caches coherent, so {cache_desc} is safe"),
            Basis::Guarantee,
        ),
        k => f.ok(
            RuleId::NetworkBlockDriver,
            format!("QEMU's {k} driver bypasses the host page cache, so {cache_desc} is safe"),
            Basis::Guarantee,
        ),
    }

    if shared {
        format_rules(&mut f, d, fmt);
        if d.shareable {
            match fmt {
                Some(ImageFormat::Qcow2 | ImageFormat::Qed) => f.error(
                    RuleId::ShareableDisk,
                    format!("shareable {} image: its metadata is cached by each writer, so concurrent writers corrupt it", fmt.map_or("", |x| x.as_str())),
                    "use raw images for disks shared between guests",
                ),
                _ => f.note(
                    RuleId::ShareableDisk,
                    "shareable: other guests write this disk too; the storage and cache rules above apply unchanged".into(),
                ),
            }
        }
        // The host rules are about a separate storage server and two hosts' mounts; on
        // one host neither exists.
        if kind.is_shared() {
            host_rules(&mut f, d, hosts);
        }
    }
    f.list
}

fn format_rules(f: &mut Findings<'_>, d: &DiskInputs, fmt: Option<ImageFormat>) {
    let raw = |f: &mut Findings<'_>| {
        if d.online_resize {
            f.error(
                RuleId::RawOnlineResize,
                "raw image resized online during the migration: QEMU caches a raw image's size, so the destination would keep the old one".into(),
                "resize before or after the migration, not during it, or use qcow2",
            );
        } else {
            f.ok(
                RuleId::RawOnlineResize,
                "raw image, not resized during the migration".into(),
                Basis::Guarantee,
            );
        }
    };
    match fmt {
        None => {
            f.warn(
                RuleId::FormatUnknown,
                format!(
                    "the image format was not given and cannot be read from {}: checked as raw",
                    d.path.as_deref().unwrap_or("a disk without a path")
                ),
                "give the format (--format raw|qcow2|qed)",
            );
            raw(f);
        }
        Some(ImageFormat::Raw) => raw(f),
        Some(ImageFormat::Qcow2) => f.ok(
            RuleId::Qcow2MetadataCache,
            format!(
                "qcow2: QEMU drops its cached metadata before the destination starts{}",
                if d.online_resize { " (the size included, so an online resize is covered)" } else { "" }
            ),
            Basis::Guarantee,
        ),
        Some(ImageFormat::Qed) => f.ok(
            RuleId::QedDirtyFlag,
            "QED: QEMU drops its cached metadata and postpones the dirty-flag check until migration completes".into(),
            Basis::Guarantee,
        ),
        Some(_) => {}
    }
}

fn host_rules(f: &mut Findings<'_>, d: &DiskInputs, hosts: Option<(&HostSpec, &HostSpec)>) {
    let Some((src, dst)) = hosts else { return };
    if let Some(p) = d.path.as_deref() {
        match d.destination_path.as_deref() {
            Some(dp) if dp != p => f.warn(
                RuleId::SamePathOnBothHosts,
                format!(
                    "the image is at {p} on {} but at {dp} on {}",
                    src.name, dst.name
                ),
                "mount the shared storage at the same location on both hosts and use one path",
            ),
            _ => f.note(
                RuleId::SamePathOnBothHosts,
                format!("{p} on both {} and {}", src.name, dst.name),
            ),
        }
    }
    match &d.servers {
        Some(servers) => {
            let on: Vec<String> = servers
                .value
                .iter()
                .filter_map(|s| {
                    if src.is(s) {
                        Some(format!("{s} is the source host {}", src.name))
                    } else if dst.is(s) {
                        Some(format!("{s} is the destination host {}", dst.name))
                    } else {
                        None
                    }
                })
                .collect();
            if on.is_empty() {
                f.note(
                    RuleId::StorageNotOnMigrationHosts,
                    format!("served by {}, neither of the two hosts", servers.value.join(", ")),
                );
            } else {
                f.warn(
                    RuleId::StorageNotOnMigrationHosts,
                    format!("the storage is served by a migration host: {}", on.join("; ")),
                    "serve the storage from a machine that is neither the source nor the destination",
                );
            }
        }
        None => f.note(
            RuleId::StorageNotOnMigrationHosts,
            "not checked: the server of this storage is unknown (give server = \"...\" in the plan)".into(),
        ),
    }
}

/// The verdict the findings of one disk give.
pub fn verdict_of(findings: &[Finding]) -> Verdict {
    if findings.iter().any(|f| f.severity == Severity::Error) {
        Verdict::Unsafe
    } else if findings.iter().any(|f| f.basis == Some(Basis::Practice)) {
        Verdict::SafeInPractice
    } else {
        Verdict::Safe
    }
}

/// libvirt's view of a file's filesystem: (`virFileIsSharedFS`, `virFileIsClusterFS`).
fn libvirt_fs(d: &DiskInputs) -> (bool, bool, String) {
    // libvirt looks at statfs, never at a declared kind: use what detection saw when the
    // kind came from it, else the magic the kind would have.
    let detected = d
        .storage
        .as_ref()
        .is_some_and(|s| s.origin == Origin::Detected);
    if let (true, Some(fs)) = (detected, &d.filesystem) {
        if fs.magic == magic::FUSE {
            let sub = fs.fuse_subtype().unwrap_or("fuse");
            let shared = matches!(sub, "fuse.glusterfs" | "fuse.quobyte");
            let cluster = sub == "fuse.glusterfs";
            return (shared, cluster, sub.to_string());
        }
        let shared = [
            magic::NFS,
            magic::GFS2,
            magic::OCFS2,
            magic::AFS,
            magic::SMB,
            magic::CIFS,
            magic::CEPH,
            magic::GPFS,
            magic::ACFS,
            magic::BEEGFS,
        ]
        .contains(&fs.magic);
        let cluster = [magic::GFS2, magic::OCFS2, magic::CEPH].contains(&fs.magic);
        let name = fs
            .magic_name
            .map_or_else(|| format!("magic {:#x}", fs.magic), str::to_string);
        return (shared, cluster, name);
    }
    let kind = d.storage.as_ref().map_or(StorageKind::Local, |s| s.value);
    let shared = matches!(
        kind,
        StorageKind::Nfs
            | StorageKind::Smb
            | StorageKind::Gpfs
            | StorageKind::Gfs2
            | StorageKind::Ocfs2
            | StorageKind::Cephfs
            | StorageKind::Glusterfs
    );
    let cluster = matches!(
        kind,
        StorageKind::Gfs2 | StorageKind::Ocfs2 | StorageKind::Cephfs | StorageKind::Glusterfs
    );
    (shared, cluster, kind.to_string())
}

/// What libvirt's `qemuMigrationSrcIsSafe()` decides for one disk, branch by branch:
/// (safe with drop-cache, safe without it, branch, message).
fn libvirt_decide(d: &DiskInputs) -> (bool, bool, LibvirtBranch, String) {
    use LibvirtBranch as B;
    let safe = |b: LibvirtBranch, m: String| (true, true, b, m);
    if d.empty || d.read_only {
        return safe(
            B::EmptyOrReadOnly,
            "disks without a source or read-only are safe".into(),
        );
    }
    if d.copied {
        return safe(
            B::Copied,
            "disks migrated by QEMU (--copy-storage-all/-inc) are safe".into(),
        );
    }
    match d.access {
        Access::Network => return safe(B::NetworkDisk, "network disks are safe".into()),
        Access::File => {
            let (shared, cluster, name) = libvirt_fs(d);
            if cluster {
                return safe(
                    B::ClusterFilesystem,
                    format!("{name} is in virFileIsClusterFS(): safe with any cache mode"),
                );
            }
            if !shared {
                return (
                    false,
                    false,
                    B::NotSharedFilesystem,
                    format!(
                        "Migration without shared storage is unsafe ({name} is not in virFileIsSharedFS())"
                    ),
                );
            }
        }
        Access::BlockDevice | Access::None => {}
    }
    if d.shareable {
        return safe(
            B::Shareable,
            "shareable disks are assumed to use cache=none".into(),
        );
    }
    if d.cache.value.bypasses_host_page_cache() {
        return safe(B::CacheBypass, format!("cache={} is safe", d.cache.value));
    }
    (
        true,
        false,
        B::QemuDropsPageCache,
        format!(
            "cache={} allowed because QEMU 4.0+ drops the destination's page cache (drop-cache); older QEMU or libvirt: \"Migration may lead to data corruption if disks use cache other than none or directsync\"",
            d.cache.value
        ),
    )
}

fn why_different(ours: Verdict, findings: &[Finding], branch: LibvirtBranch) -> String {
    if ours.is_safe() {
        let deciding: Vec<String> = findings
            .iter()
            .filter(|f| f.basis.is_some())
            .map(|f| f.rule.to_string())
            .collect();
        let extra = match branch {
            LibvirtBranch::NotSharedFilesystem => {
                "libvirt decides from the statfs magic alone, and its lists lack this filesystem (SMB2/3 mounts report SMB2_SUPER_MAGIC; its FUSE list has only glusterfs and quobyte). "
            }
            _ => "",
        };
        format!("{extra}This checker allows it by {}.", deciding.join(", "))
    } else {
        let errors: Vec<String> = findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.rule.to_string())
            .collect();
        let extra = match branch {
            LibvirtBranch::QemuDropsPageCache => {
                "libvirt trusts QEMU to posix_fadvise(DONTNEED) the destination's page cache when it activates the disk; this checker does not assume a VMM does that, and the call is best effort (dirty, locked or mapped pages stay). "
            }
            LibvirtBranch::Shareable => {
                "libvirt assumes shareable disks use cache=none, which it sets only when no cache mode is given. "
            }
            LibvirtBranch::Copied => "libvirt does not look at where the copy is written. ",
            _ => {
                "libvirt does not look at the image format, the NFS export, or whether a block device is shared at all. "
            }
        };
        format!(
            "{extra}This checker refuses because of {}.",
            errors.join(", ")
        )
    }
}

fn libvirt_disk(d: &DiskInputs, ours: Verdict, findings: &[Finding]) -> LibvirtDisk {
    let (safe, safe_without_drop_cache, branch, message) = libvirt_decide(d);
    let agrees = safe == ours.is_safe();
    let why = (!agrees).then(|| why_different(ours, findings, branch));
    LibvirtDisk {
        safe,
        safe_without_drop_cache,
        branch,
        message,
        agrees,
        why_different: why,
    }
}

/// Applies the rules to resolved disks. Pure: no I/O. `same_host`: source and
/// destination run on one host ([`Plan::same_host`]).
pub fn evaluate(
    disks: Vec<DiskInputs>,
    source: Option<&HostSpec>,
    destination: Option<&HostSpec>,
    same_host: bool,
) -> Report {
    let hosts = source.zip(destination);
    let mut reports = Vec::with_capacity(disks.len());
    for d in disks {
        let findings = evaluate_disk(&d, hosts, same_host);
        let verdict = verdict_of(&findings);
        let libvirt = libvirt_disk(&d, verdict, &findings);
        reports.push(DiskReport {
            name: d.name.clone(),
            verdict,
            inputs: d,
            findings,
            libvirt,
        });
    }
    let verdict = reports
        .iter()
        .map(|r| r.verdict)
        .max()
        .unwrap_or(Verdict::Safe);
    let lv_safe = reports.iter().all(|r| r.libvirt.safe);
    let lv_old = reports.iter().all(|r| r.libvirt.safe_without_drop_cache);
    let message = match reports.iter().find(|r| !r.libvirt.safe) {
        Some(r) => format!("disk {}: {}", r.name, r.libvirt.message),
        None if !lv_old => "allowed, because QEMU 4.0+ drops the destination's page cache; older libvirt or QEMU refuse it: \"Migration may lead to data corruption if disks use cache other than none or directsync\"".into(),
        None => "allowed: every disk passes qemuMigrationSrcIsSafe()".into(),
    };
    let differing: Vec<String> = reports
        .iter()
        .filter(|r| !r.libvirt.agrees)
        .map(|r| r.name.clone())
        .collect();
    Report {
        safe: verdict.is_safe(),
        verdict,
        libvirt: LibvirtSummary {
            safe: lv_safe,
            verdict: if lv_safe { "safe" } else { "unsafe" },
            safe_without_drop_cache: lv_old,
            message,
            agrees: differing.is_empty(),
            differing_disks: differing,
        },
        findings: reports
            .iter()
            .flat_map(|r| r.findings.iter().cloned())
            .collect(),
        disks: reports,
        source: source.cloned(),
        destination: destination.cloned(),
        same_host,
    }
}

/// Checks a plan: validates it, resolves every disk (detecting what is not given), and
/// applies the rules.
pub fn check_plan(plan: &Plan) -> Result<Report, Error> {
    plan.validate("<plan>")?;
    let disks = plan
        .disks
        .iter()
        .map(resolve_disk)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(evaluate(
        disks,
        plan.source.as_ref(),
        plan.destination.as_ref(),
        plan.same_host,
    ))
}
