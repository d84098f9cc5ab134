//! Detection from a path: the filesystem (statfs magic, FUSE subtype and server from the
//! mount table), the transport of a block device (sysfs), QEMU URIs, and the image format
//! from its header.
//!
//! The pure parts (magic table, mount table parsing, header parsing, sysfs path
//! classification) are separate from the system calls so they can be tested on any input.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Error;
use crate::model::{ImageFormat, StorageKind};

/// `statfs(2)` magic numbers (`linux/magic.h` and the filesystems' own headers).
pub mod magic {
    /// NFS.
    pub const NFS: u64 = 0x6969;
    /// SMB (the old smbfs).
    pub const SMB: u64 = 0x517B;
    /// CIFS.
    pub const CIFS: u64 = 0xFF53_4D42;
    /// SMB2/3 client (`fs/smb/client`).
    pub const SMB2: u64 = 0xFE53_4D42;
    /// GFS2.
    pub const GFS2: u64 = 0x0116_1970;
    /// OCFS2.
    pub const OCFS2: u64 = 0x7461_636F;
    /// GPFS / Spectrum Scale.
    pub const GPFS: u64 = 0x4750_4653;
    /// CephFS kernel client.
    pub const CEPH: u64 = 0x00C3_6400;
    /// Any FUSE filesystem; the subtype is in the mount table.
    pub const FUSE: u64 = 0x6573_5546;
    /// AFS (kAFS).
    pub const AFS: u64 = 0x6B41_4653;
    /// OpenAFS.
    pub const OPENAFS: u64 = 0x5346_414F;
    /// BeeGFS (formerly FhGFS).
    pub const BEEGFS: u64 = 0x1983_0326;
    /// Oracle ACFS.
    pub const ACFS: u64 = 0x6163_6673;
    /// Lustre.
    pub const LUSTRE: u64 = 0x0BD0_0BD0;
    /// 9p (v9fs).
    pub const V9FS: u64 = 0x0102_1997;
    /// ext2, ext3, ext4.
    pub const EXT: u64 = 0xEF53;
    /// XFS.
    pub const XFS: u64 = 0x5846_5342;
    /// Btrfs.
    pub const BTRFS: u64 = 0x9123_683E;
    /// tmpfs (and devtmpfs).
    pub const TMPFS: u64 = 0x0102_1994;
    /// ramfs.
    pub const RAMFS: u64 = 0x8584_58F6;
    /// hugetlbfs.
    pub const HUGETLBFS: u64 = 0x9584_58F6;
    /// overlayfs.
    pub const OVERLAYFS: u64 = 0x794C_7630;
    /// ZFS on Linux.
    pub const ZFS: u64 = 0x2FC1_2FC1;
    /// F2FS.
    pub const F2FS: u64 = 0xF2F5_2010;
    /// FAT (msdos, vfat).
    pub const MSDOS: u64 = 0x4D44;
    /// exFAT.
    pub const EXFAT: u64 = 0x2011_BAB0;
    /// bcachefs.
    pub const BCACHEFS: u64 = 0xCA45_1A4E;
    /// JFS.
    pub const JFS: u64 = 0x3153_464A;
    /// ReiserFS.
    pub const REISERFS: u64 = 0x5265_4973;
    /// NILFS2.
    pub const NILFS: u64 = 0x3434;
    /// NTFS (ntfs3).
    pub const NTFS: u64 = 0x5346_544E;
    /// EROFS.
    pub const EROFS: u64 = 0xE0F5_E1E2;
    /// SquashFS.
    pub const SQUASHFS: u64 = 0x7371_7368;
    /// ISO 9660.
    pub const ISOFS: u64 = 0x9660;
    /// UDF.
    pub const UDF: u64 = 0x1501_3346;
}

/// What a filesystem is for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsClass {
    /// A filesystem with a rule: the storage kind it is.
    Kind(StorageKind),
    /// A shared filesystem this checker has no rule for (its name).
    SharedWithoutRule(String),
    /// A FUSE filesystem whose subtype has no rule (the subtype, or `None` if the mount
    /// table did not say).
    UnknownFuse(Option<String>),
    /// A magic number this checker does not know.
    Unknown,
}

enum MagicClass {
    Local,
    Kind(StorageKind),
    SharedWithoutRule,
    Fuse,
}

const MAGICS: &[(u64, &str, MagicClass)] = &[
    (magic::NFS, "nfs", MagicClass::Kind(StorageKind::Nfs)),
    (magic::SMB, "smb", MagicClass::Kind(StorageKind::Smb)),
    (magic::CIFS, "cifs", MagicClass::Kind(StorageKind::Smb)),
    (magic::SMB2, "smb3", MagicClass::Kind(StorageKind::Smb)),
    (magic::GFS2, "gfs2", MagicClass::Kind(StorageKind::Gfs2)),
    (magic::OCFS2, "ocfs2", MagicClass::Kind(StorageKind::Ocfs2)),
    (magic::GPFS, "gpfs", MagicClass::Kind(StorageKind::Gpfs)),
    (magic::CEPH, "ceph", MagicClass::Kind(StorageKind::Cephfs)),
    (magic::FUSE, "fuse", MagicClass::Fuse),
    (magic::AFS, "afs", MagicClass::SharedWithoutRule),
    (magic::OPENAFS, "openafs", MagicClass::SharedWithoutRule),
    (magic::BEEGFS, "beegfs", MagicClass::SharedWithoutRule),
    (magic::ACFS, "acfs", MagicClass::SharedWithoutRule),
    (magic::LUSTRE, "lustre", MagicClass::SharedWithoutRule),
    (magic::V9FS, "9p", MagicClass::SharedWithoutRule),
    (magic::EXT, "ext2/ext3/ext4", MagicClass::Local),
    (magic::XFS, "xfs", MagicClass::Local),
    (magic::BTRFS, "btrfs", MagicClass::Local),
    (magic::TMPFS, "tmpfs", MagicClass::Local),
    (magic::RAMFS, "ramfs", MagicClass::Local),
    (magic::HUGETLBFS, "hugetlbfs", MagicClass::Local),
    (magic::OVERLAYFS, "overlayfs", MagicClass::Local),
    (magic::ZFS, "zfs", MagicClass::Local),
    (magic::F2FS, "f2fs", MagicClass::Local),
    (magic::MSDOS, "vfat", MagicClass::Local),
    (magic::EXFAT, "exfat", MagicClass::Local),
    (magic::BCACHEFS, "bcachefs", MagicClass::Local),
    (magic::JFS, "jfs", MagicClass::Local),
    (magic::REISERFS, "reiserfs", MagicClass::Local),
    (magic::NILFS, "nilfs2", MagicClass::Local),
    (magic::NTFS, "ntfs", MagicClass::Local),
    (magic::EROFS, "erofs", MagicClass::Local),
    (magic::SQUASHFS, "squashfs", MagicClass::Local),
    (magic::ISOFS, "iso9660", MagicClass::Local),
    (magic::UDF, "udf", MagicClass::Local),
];

/// FUSE subtypes (`fuse.NAME` in the mount table) that are storage kinds with a rule.
const FUSE_KINDS: &[(&str, StorageKind)] = &[
    ("fuse.glusterfs", StorageKind::Glusterfs),
    ("fuse.ceph", StorageKind::Cephfs),
    ("fuse.ceph-fuse", StorageKind::Cephfs),
];

/// The name of a filesystem magic, if this checker knows it.
pub fn magic_name(magic: u64) -> Option<&'static str> {
    MAGICS
        .iter()
        .find(|(m, _, _)| *m == magic)
        .map(|(_, n, _)| *n)
}

/// One line of `/proc/self/mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountEntry {
    /// What is mounted (`server:/export`, `/dev/sda1`, `tmpfs`...).
    pub source: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// The filesystem type (`nfs4`, `ext4`, `fuse.glusterfs`...).
    pub fs_type: String,
    /// The mount options.
    pub options: String,
}

/// Decodes the octal escapes (`\040` for a space...) the kernel writes in mount tables.
fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a mount table (`/proc/self/mounts` format). Malformed lines are skipped.
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let source = f.next()?;
            let mount_point = f.next()?;
            let fs_type = f.next()?;
            let options = f.next().unwrap_or("");
            Some(MountEntry {
                source: unescape_mount_field(source),
                mount_point: unescape_mount_field(mount_point),
                fs_type: fs_type.to_string(),
                options: options.to_string(),
            })
        })
        .collect()
}

/// The mount a canonical path is on: the longest mount point that is a whole-component
/// prefix of it, the last such line when several mounts stack on one directory (the later
/// one hides the earlier).
pub fn mount_for<'a>(entries: &'a [MountEntry], canonical: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for e in entries {
        if canonical.starts_with(Path::new(&e.mount_point))
            && best.is_none_or(|b| e.mount_point.len() >= b.mount_point.len())
        {
            best = Some(e);
        }
    }
    best
}

/// The servers a network mount names in its source or options, as host names or
/// addresses without ports.
pub fn servers_of_mount(entry: &MountEntry) -> Vec<String> {
    let t = entry.fs_type.as_str();
    let src = entry.source.as_str();
    if t.starts_with("nfs") || t == "fuse.glusterfs" || t == "glusterfs" {
        return host_before_colon(src).into_iter().collect();
    }
    if t == "cifs" || t == "smb3" || t == "smb" {
        let rest = src.trim_start_matches('/').trim_start_matches('\\');
        let host = rest.split(['/', '\\']).next().unwrap_or("");
        return if host.is_empty() {
            vec![]
        } else {
            vec![host.to_string()]
        };
    }
    if t == "ceph" {
        // Old syntax: "mon1:6789,mon2:6789:/path"; new: "user@fsid.fs=/path" with the
        // monitors in the mon_addr option, separated by '/'.
        if let Some(opt) = entry
            .options
            .split(',')
            .find_map(|o| o.strip_prefix("mon_addr="))
        {
            return opt.split('/').filter_map(strip_port).collect();
        }
        if let Some((mons, _)) = src.rsplit_once(":/") {
            return mons.split(',').filter_map(strip_port).collect();
        }
    }
    Vec::new()
}

fn host_before_colon(s: &str) -> Option<String> {
    if let Some(rest) = s.strip_prefix('[') {
        return rest
            .split_once(']')
            .map(|(h, _)| h.to_string())
            .filter(|h| !h.is_empty());
    }
    s.split_once(':')
        .map(|(h, _)| h.to_string())
        .filter(|h| !h.is_empty())
}

fn strip_port(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h.to_string());
    }
    // One colon: host:port. Several: a bare IPv6 address.
    match s.matches(':').count() {
        1 => s.split_once(':').map(|(h, _)| h.to_string()),
        _ => Some(s.to_string()),
    }
}

/// The filesystem a path is on, as detection found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    /// `f_type` from `statfs(2)`.
    pub magic: u64,
    /// The filesystem's name for that magic, when known.
    pub magic_name: Option<&'static str>,
    /// The path `statfs` succeeded on: the given path or its nearest existing parent.
    pub probed_path: PathBuf,
    /// The mount table line for it, when one was found.
    pub mount: Option<MountEntry>,
}

impl FsInfo {
    /// What the filesystem is for the rules.
    pub fn class(&self) -> FsClass {
        let Some((_, name, class)) = MAGICS.iter().find(|(m, _, _)| *m == self.magic) else {
            return FsClass::Unknown;
        };
        match class {
            MagicClass::Local => FsClass::Kind(StorageKind::Local),
            MagicClass::Kind(k) => FsClass::Kind(*k),
            MagicClass::SharedWithoutRule => FsClass::SharedWithoutRule((*name).to_string()),
            MagicClass::Fuse => {
                let subtype = self.mount.as_ref().map(|m| m.fs_type.clone());
                match subtype
                    .as_deref()
                    .and_then(|t| FUSE_KINDS.iter().find(|(n, _)| *n == t))
                {
                    Some((_, k)) => FsClass::Kind(*k),
                    None => FsClass::UnknownFuse(subtype),
                }
            }
        }
    }

    /// The FUSE subtype (`fuse.glusterfs`...) when this is a FUSE mount.
    pub fn fuse_subtype(&self) -> Option<&str> {
        if self.magic == magic::FUSE {
            self.mount.as_ref().map(|m| m.fs_type.as_str())
        } else {
            None
        }
    }

    /// One line for the report: magic, name, mount.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "statfs magic {:#x} ({}) at {}",
            self.magic,
            self.magic_name.unwrap_or("unknown"),
            self.probed_path.display()
        );
        if let Some(m) = &self.mount {
            s.push_str(&format!(
                ", mounted {} on {} type {}",
                m.source, m.mount_point, m.fs_type
            ));
        }
        s
    }
}

/// `statfs(2)` on `path`, walking up to the nearest parent that succeeds, as libvirt's
/// `virFileIsSharedFSType` does: an image that does not exist yet, or a directory we cannot
/// search, still tells us the filesystem of its mount point. Returns the path that
/// succeeded and its magic.
pub fn statfs_walk_up(path: &Path) -> io::Result<(PathBuf, u64)> {
    let mut p: PathBuf = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    loop {
        match statfs_magic(&p) {
            Ok(m) => return Ok((p, m)),
            Err(e) => {
                if !p.pop() {
                    return Err(e);
                }
            }
        }
    }
}

fn statfs_magic(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: an all-zero `statfs` is a valid value of a plain C struct of integers.
    let mut sb: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated string that outlives the call, and `sb` is a
    // writable `statfs` the kernel fills in.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut sb) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type is a signed word; magics are 32-bit patterns, some with the top bit set.
    #[allow(clippy::unnecessary_cast)]
    Ok((sb.f_type as u64) & 0xFFFF_FFFF)
}

/// Detects the filesystem `path` is on: statfs magic walking up to an existing parent,
/// then the mount table line for it (FUSE subtype, server).
pub fn detect_filesystem(path: &Path) -> Result<FsInfo, Error> {
    let (probed, magic) = statfs_walk_up(path).map_err(|source| Error::Io {
        what: "filesystem of",
        path: path.display().to_string(),
        source,
    })?;
    let canonical = std::fs::canonicalize(&probed).unwrap_or_else(|_| probed.clone());
    let mount = std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|t| mount_for(&parse_mounts(&t), &canonical).cloned());
    Ok(FsInfo {
        magic,
        magic_name: magic_name(magic),
        probed_path: probed,
        mount,
    })
}

/// A QEMU URI and what it says about the storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriInfo {
    /// The URI scheme (`rbd`, `nbd+unix`...).
    pub scheme: String,
    /// The storage kind the scheme means.
    pub kind: StorageKind,
    /// The server named in the URI, if any.
    pub server: Option<String>,
}

/// Recognises QEMU network-driver URIs. `None`: not a URI (a path). `Some(Err(scheme))`: a
/// URI whose scheme has no rule here.
pub fn classify_uri(s: &str) -> Option<Result<UriInfo, String>> {
    let (scheme, rest) = if let Some((scheme, rest)) = s.split_once("://") {
        (scheme.to_ascii_lowercase(), rest)
    } else if let Some(rest) = s.strip_prefix("rbd:") {
        ("rbd".to_string(), rest)
    } else if let Some(rest) = s.strip_prefix("nbd:") {
        // Legacy "nbd:host:port[:exportname=x]" or "nbd:unix:/path".
        let server = rest
            .split(':')
            .next()
            .filter(|h| *h != "unix" && !h.is_empty());
        return Some(Ok(UriInfo {
            scheme: "nbd".into(),
            kind: StorageKind::Nbd,
            server: server.map(str::to_string),
        }));
    } else {
        return None;
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-')
    {
        return None;
    }
    let base = scheme.split('+').next().unwrap_or("");
    let kind = match base {
        "iscsi" | "iser" => StorageKind::IscsiQemu,
        "rbd" => StorageKind::Rbd,
        "nbd" | "nbds" => StorageKind::Nbd,
        "gluster" => StorageKind::Glusterfs,
        "file" => return None,
        _ => return Some(Err(scheme)),
    };
    let server = if s.contains("://") && !scheme.ends_with("+unix") {
        let authority = rest.split('/').next().unwrap_or("");
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        strip_port(host)
    } else {
        None
    };
    Some(Ok(UriInfo {
        scheme,
        kind,
        server,
    }))
}

/// Classifies a block device from its resolved sysfs path and its SCSI host's
/// `proc_name`: iSCSI sessions, FC remote ports (FCoE when the host is an FCoE driver or
/// hangs off an FCoE controller), SRP hosts.
pub fn classify_sysfs_block(sysfs_path: &str, proc_name: Option<&str>) -> Option<StorageKind> {
    let comps: Vec<&str> = sysfs_path.split('/').collect();
    let proc_name = proc_name.map(str::trim);
    if matches!(proc_name, Some("ib_srp")) {
        return Some(StorageKind::Srp);
    }
    if comps.iter().any(|c| {
        c.strip_prefix("session")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }) {
        return Some(StorageKind::Iscsi);
    }
    if comps.iter().any(|c| c.starts_with("rport-")) {
        let fcoe_driver = matches!(proc_name, Some("fcoe" | "bnx2fc" | "qedf"));
        let fcoe_ctlr = comps.iter().any(|c| c.starts_with("ctlr_"));
        return Some(if fcoe_driver || fcoe_ctlr {
            StorageKind::Fcoe
        } else {
            StorageKind::Fc
        });
    }
    None
}

fn dev_major_minor(rdev: u64) -> (u64, u64) {
    // glibc's encoding of dev_t (gnu_dev_major / gnu_dev_minor).
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// What detection found for a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// The transport, when it is one with a rule.
    pub kind: Option<StorageKind>,
    /// The sysfs paths looked at (the device, then the devices under it for dm/md).
    pub sysfs: Vec<String>,
}

/// Detects the transport of a block device through `/sys/dev/block/MAJ:MIN`, following
/// `slaves/` of device-mapper and md devices down to the disks. Every disk under it must
/// agree, or the transport is unknown.
pub fn detect_block_transport(device: &Path) -> Result<BlockInfo, Error> {
    let meta = std::fs::metadata(device).map_err(|source| Error::Io {
        what: "block device",
        path: device.display().to_string(),
        source,
    })?;
    let (maj, min) = dev_major_minor(meta.rdev());
    let start = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
    let mut sysfs = Vec::new();
    let mut kinds = Vec::new();
    let mut stack = vec![(start, 0u32)];
    while let Some((node, depth)) = stack.pop() {
        let resolved = std::fs::canonicalize(&node).unwrap_or(node.clone());
        sysfs.push(resolved.display().to_string());
        let slaves: Vec<PathBuf> = std::fs::read_dir(resolved.join("slaves"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        if !slaves.is_empty() && depth < 8 {
            stack.extend(slaves.into_iter().map(|s| (s, depth + 1)));
            continue;
        }
        let text = resolved.display().to_string();
        let host = text.split('/').find(|c| {
            c.strip_prefix("host")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        let proc_name = host.and_then(|h| {
            std::fs::read_to_string(format!("/sys/class/scsi_host/{h}/proc_name")).ok()
        });
        kinds.push(classify_sysfs_block(&text, proc_name.as_deref()));
    }
    let first = kinds.first().copied().flatten();
    let kind = if kinds.iter().all(|k| *k == first) {
        first
    } else {
        None
    };
    Ok(BlockInfo { kind, sysfs })
}

/// True when `path` is a block device.
pub fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// A backing file named in an image header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "value")]
pub enum Backing {
    /// The backing file's name as the header gives it.
    Named(String),
    /// The header says there is one but its name could not be read (why).
    Unreadable(String),
}

/// What the image header says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FormatInfo {
    /// The format.
    pub format: ImageFormat,
    /// The format's version field, where it has one (qcow/qcow2).
    pub version: Option<u32>,
    /// The backing file, for qcow2 and QED images that have one.
    pub backing: Option<Backing>,
}

/// Bytes of the header looked at for the magic numbers.
pub const HEADER_PROBE_BYTES: usize = 512;
/// The qcow2 specification's limit on the backing file name.
pub const QCOW2_MAX_BACKING_NAME: u32 = 1023;
/// QEMU's buffer for a QED backing file name (PATH_MAX) less the NUL.
pub const QED_MAX_BACKING_NAME: u32 = 4095;

const QED_F_BACKING_FILE: u64 = 0x01;

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}

/// The format a header's first bytes show: qcow2 `QFI\xfb` (version 1 is the old qcow),
/// QED `QED\0`, the formats QEMU will not migrate (vmdk, vdi, vhdx, vpc), otherwise raw.
pub fn format_from_header(h: &[u8]) -> (ImageFormat, Option<u32>) {
    if h.starts_with(b"QFI\xfb") {
        let version = be_u32(h, 4);
        return match version {
            Some(1) => (ImageFormat::Qcow, version),
            _ => (ImageFormat::Qcow2, version),
        };
    }
    if h.starts_with(b"QED\0") {
        return (ImageFormat::Qed, None);
    }
    if h.starts_with(b"KDMV") || h.starts_with(b"COWD") || h.starts_with(b"# Disk DescriptorFile") {
        return (ImageFormat::Vmdk, None);
    }
    if le_u32(h, 0x40) == Some(0xbeda_107f) {
        return (ImageFormat::Vdi, None);
    }
    if h.starts_with(b"vhdxfile") {
        return (ImageFormat::Vhdx, None);
    }
    if h.starts_with(b"conectix") {
        return (ImageFormat::Vpc, None);
    }
    (ImageFormat::Raw, None)
}

fn read_name<R: Read + Seek>(r: &mut R, offset: u64, len: u32, max: u32) -> Backing {
    if len == 0 {
        return Backing::Unreadable("the header gives an empty backing file name".into());
    }
    if len > max {
        return Backing::Unreadable(format!(
            "the header gives a backing file name of {len} bytes, more than the {max} allowed"
        ));
    }
    let mut buf = vec![0u8; len as usize];
    match r
        .seek(SeekFrom::Start(offset))
        .and_then(|_| r.read_exact(&mut buf))
    {
        Ok(()) => Backing::Named(String::from_utf8_lossy(&buf).into_owned()),
        Err(e) => Backing::Unreadable(format!("reading {len} bytes at offset {offset}: {e}")),
    }
}

/// Reads an image header from `r` (positioned anywhere) and returns its format and
/// backing file. Never trusts a length from the header beyond the format's limit.
pub fn format_from_reader<R: Read + Seek>(r: &mut R) -> io::Result<FormatInfo> {
    r.seek(SeekFrom::Start(0))?;
    let mut header = Vec::with_capacity(HEADER_PROBE_BYTES);
    r.by_ref()
        .take(HEADER_PROBE_BYTES as u64)
        .read_to_end(&mut header)?;
    let (format, version) = format_from_header(&header);
    let backing = match format {
        ImageFormat::Qcow2 => match (be_u64(&header, 8), be_u32(&header, 16)) {
            (Some(0), _) | (None, _) | (_, None) => None,
            (Some(off), Some(len)) => Some(read_name(r, off, len, QCOW2_MAX_BACKING_NAME)),
        },
        ImageFormat::Qed => match (
            le_u64(&header, 16),
            le_u32(&header, 56),
            le_u32(&header, 60),
        ) {
            (Some(features), Some(off), Some(len)) if features & QED_F_BACKING_FILE != 0 => {
                Some(read_name(r, u64::from(off), len, QED_MAX_BACKING_NAME))
            }
            _ => None,
        },
        _ => None,
    };
    Ok(FormatInfo {
        format,
        version,
        backing,
    })
}

/// Detects the format of the image at `path` (a file or a block device) from its header.
pub fn detect_format(path: &Path) -> Result<FormatInfo, Error> {
    let io_err = |source| Error::Io {
        what: "image header of",
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory, not a disk image",
        )));
    }
    let mut f = File::open(path).map_err(io_err)?;
    format_from_reader(&mut f).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn mount_escapes_are_decoded() {
        let m = parse_mounts("srv:/a\\040b /mnt/with\\040space nfs4 rw 0 0\n");
        assert_eq!(m[0].mount_point, "/mnt/with space");
        assert_eq!(m[0].source, "srv:/a b");
    }

    #[test]
    fn longest_and_last_mount_wins() {
        let t = "/dev/vda / ext4 rw 0 0\n\
                 a:/x /mnt nfs4 rw 0 0\n\
                 b:/y /mnt nfs4 rw 0 0\n\
                 g:/vol /mnt/gl fuse.glusterfs rw 0 0\n";
        let m = parse_mounts(t);
        assert_eq!(
            mount_for(&m, Path::new("/mnt/x.img")).unwrap().source,
            "b:/y"
        );
        assert_eq!(
            mount_for(&m, Path::new("/mnt/gl/x.img")).unwrap().fs_type,
            "fuse.glusterfs"
        );
        // "/mntx" is not under "/mnt".
        assert_eq!(
            mount_for(&m, Path::new("/mntx/a")).unwrap().mount_point,
            "/"
        );
    }

    #[test]
    fn fuse_subtypes() {
        let fs = |t: &str| FsInfo {
            magic: magic::FUSE,
            magic_name: Some("fuse"),
            probed_path: "/m".into(),
            mount: Some(MountEntry {
                source: "s:/v".into(),
                mount_point: "/m".into(),
                fs_type: t.into(),
                options: String::new(),
            }),
        };
        assert_eq!(
            fs("fuse.glusterfs").class(),
            FsClass::Kind(StorageKind::Glusterfs)
        );
        assert_eq!(
            fs("fuse.ceph-fuse").class(),
            FsClass::Kind(StorageKind::Cephfs)
        );
        assert_eq!(
            fs("fuse.sshfs").class(),
            FsClass::UnknownFuse(Some("fuse.sshfs".into()))
        );
    }

    #[test]
    fn servers_from_mount_sources() {
        let e = |src: &str, t: &str, o: &str| MountEntry {
            source: src.into(),
            mount_point: "/m".into(),
            fs_type: t.into(),
            options: o.into(),
        };
        assert_eq!(
            servers_of_mount(&e("filer1:/export", "nfs4", "")),
            vec!["filer1"]
        );
        assert_eq!(
            servers_of_mount(&e("[fd00::1]:/export", "nfs", "")),
            vec!["fd00::1"]
        );
        assert_eq!(
            servers_of_mount(&e("//smb1/share", "cifs", "")),
            vec!["smb1"]
        );
        assert_eq!(
            servers_of_mount(&e("g1:/vol", "fuse.glusterfs", "")),
            vec!["g1"]
        );
        assert_eq!(
            servers_of_mount(&e("10.0.0.1:6789,10.0.0.2:6789:/", "ceph", "rw")),
            vec!["10.0.0.1", "10.0.0.2"]
        );
        assert_eq!(
            servers_of_mount(&e(
                "admin@f.cephfs=/",
                "ceph",
                "rw,mon_addr=10.0.0.3:3300/10.0.0.4"
            )),
            vec!["10.0.0.3", "10.0.0.4"]
        );
        assert!(servers_of_mount(&e("/dev/sdb", "gfs2", "")).is_empty());
    }

    #[test]
    fn uris() {
        let k = |s: &str| classify_uri(s).map(|r| r.map(|u| (u.kind, u.server)));
        assert_eq!(k("/var/lib/img.qcow2"), None);
        assert_eq!(k("file:///var/lib/img"), None);
        assert_eq!(k("rbd:pool/image"), Some(Ok((StorageKind::Rbd, None))));
        assert_eq!(
            k("nbd://srv:10809/exp"),
            Some(Ok((StorageKind::Nbd, Some("srv".into()))))
        );
        assert_eq!(
            k("nbd+unix:///exp?socket=/s"),
            Some(Ok((StorageKind::Nbd, None)))
        );
        assert_eq!(
            k("nbd:srv:10809"),
            Some(Ok((StorageKind::Nbd, Some("srv".into()))))
        );
        assert_eq!(
            k("iscsi://user@[fd00::2]:3260/iqn.2001-04.com.example:t/1"),
            Some(Ok((StorageKind::IscsiQemu, Some("fd00::2".into()))))
        );
        assert_eq!(
            k("gluster://g1/vol/img"),
            Some(Ok((StorageKind::Glusterfs, Some("g1".into()))))
        );
        assert_eq!(k("ssh://h/img"), Some(Err("ssh".into())));
    }

    #[test]
    fn sysfs_transports() {
        let iscsi = "/sys/devices/platform/host3/session1/target3:0:0/3:0:0:1/block/sdb";
        let fc =
            "/sys/devices/pci0000:00/0000:00:03.0/host5/rport-5:0-2/target5:0:0/5:0:0:1/block/sdc";
        let fcoe =
            "/sys/devices/virtual/net/eth2/ctlr_0/host6/rport-6:0-1/target6:0:0/6:0:0:0/block/sdd";
        let srp = "/sys/devices/pci0000:00/0000:00:04.0/host7/target7:0:0/7:0:0:0/block/sde";
        let virtio = "/sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda";
        assert_eq!(
            classify_sysfs_block(iscsi, Some("iscsi_tcp")),
            Some(StorageKind::Iscsi)
        );
        assert_eq!(
            classify_sysfs_block(fc, Some("qla2xxx")),
            Some(StorageKind::Fc)
        );
        assert_eq!(
            classify_sysfs_block(fc, Some("bnx2fc")),
            Some(StorageKind::Fcoe)
        );
        assert_eq!(
            classify_sysfs_block(fcoe, Some("fcoe")),
            Some(StorageKind::Fcoe)
        );
        assert_eq!(
            classify_sysfs_block(srp, Some("ib_srp\n")),
            Some(StorageKind::Srp)
        );
        assert_eq!(classify_sysfs_block(virtio, None), None);
        assert_eq!(
            classify_sysfs_block("/sys/devices/virtual/block/loop0", None),
            None
        );
    }

    #[test]
    fn dev_t_decoding() {
        assert_eq!(dev_major_minor(0xfe00), (254, 0));
        assert_eq!(dev_major_minor(0x0801), (8, 1));
        // A minor above 255 uses the high bits.
        assert_eq!(dev_major_minor((259 << 8) | 0x100000 | 3), (259, 0x100 | 3));
    }

    fn qcow2_header(version: u32, backing: Option<&[u8]>) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        if let Some(name) = backing {
            h[8..16].copy_from_slice(&200u64.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h[200..200 + name.len()].copy_from_slice(name);
        }
        h
    }

    #[test]
    fn headers() {
        let f = |b: Vec<u8>| format_from_reader(&mut Cursor::new(b)).unwrap();
        assert_eq!(f(qcow2_header(3, None)).format, ImageFormat::Qcow2);
        assert_eq!(f(qcow2_header(1, None)).format, ImageFormat::Qcow);
        assert_eq!(
            f(qcow2_header(2, Some(b"/img/base.raw"))).backing,
            Some(Backing::Named("/img/base.raw".into()))
        );
        assert_eq!(f(b"QED\0".to_vec()).format, ImageFormat::Qed);
        assert_eq!(f(b"KDMV....".to_vec()).format, ImageFormat::Vmdk);
        assert_eq!(f(b"vhdxfile".to_vec()).format, ImageFormat::Vhdx);
        assert_eq!(f(b"conectix".to_vec()).format, ImageFormat::Vpc);
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(f(vdi).format, ImageFormat::Vdi);
        assert_eq!(f(Vec::new()).format, ImageFormat::Raw);
        assert_eq!(f(b"QFI".to_vec()).format, ImageFormat::Raw);
    }

    #[test]
    fn hostile_backing_lengths_are_bounded() {
        let mut h = qcow2_header(3, None);
        h[8..16].copy_from_slice(&64u64.to_be_bytes());
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        match format_from_reader(&mut Cursor::new(h)).unwrap().backing {
            Some(Backing::Unreadable(why)) => assert!(why.contains("more than the 1023"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Offset past the end of the file.
        let mut h = qcow2_header(3, None);
        h[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
        h[16..20].copy_from_slice(&10u32.to_be_bytes());
        assert!(matches!(
            format_from_reader(&mut Cursor::new(h)).unwrap().backing,
            Some(Backing::Unreadable(_))
        ));
    }
}
