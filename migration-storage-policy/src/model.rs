//! The typed input of a check: a [`Plan`] of disks and, optionally, the two hosts.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Where a disk's image lives, as far as coherence between two hosts is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StorageKind {
    /// A filesystem only the source host sees (ext4, xfs, btrfs, tmpfs...).
    Local,
    /// An NFS mount, opened through the host kernel's NFS client.
    Nfs,
    /// An iSCSI LUN attached to the host kernel (a `/dev/sdX`), opened through the host.
    Iscsi,
    /// QEMU's own iSCSI driver (`iscsi://` URIs, libiscsi), which bypasses the host kernel.
    IscsiQemu,
    /// A Fibre Channel LUN attached to the host kernel.
    Fc,
    /// A Fibre Channel over Ethernet LUN attached to the host kernel.
    Fcoe,
    /// A SCSI RDMA Protocol (InfiniBand, iWARP) LUN attached to the host kernel.
    Srp,
    /// GFS2, a cluster filesystem with a distributed lock manager.
    Gfs2,
    /// OCFS2, Oracle's cluster filesystem.
    Ocfs2,
    /// IBM GPFS / Spectrum Scale.
    Gpfs,
    /// CephFS, kernel or FUSE client.
    #[serde(alias = "ceph")]
    #[value(alias = "ceph")]
    Cephfs,
    /// GlusterFS, FUSE client or QEMU's `gluster://` driver.
    #[serde(alias = "gluster")]
    #[value(alias = "gluster")]
    Glusterfs,
    /// Ceph RBD through QEMU's librbd driver (`rbd:` URIs).
    Rbd,
    /// An NBD export through QEMU's NBD client (`nbd://`, `nbd+unix://`).
    Nbd,
    /// An SMB/CIFS mount, opened through the host kernel's CIFS client.
    #[serde(alias = "cifs")]
    #[value(alias = "cifs")]
    Smb,
}

impl StorageKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [StorageKind; 15] = [
        StorageKind::Local,
        StorageKind::Nfs,
        StorageKind::Iscsi,
        StorageKind::IscsiQemu,
        StorageKind::Fc,
        StorageKind::Fcoe,
        StorageKind::Srp,
        StorageKind::Gfs2,
        StorageKind::Ocfs2,
        StorageKind::Gpfs,
        StorageKind::Cephfs,
        StorageKind::Glusterfs,
        StorageKind::Rbd,
        StorageKind::Nbd,
        StorageKind::Smb,
    ];

    /// The name used on the command line, in plan files and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Local => "local",
            StorageKind::Nfs => "nfs",
            StorageKind::Iscsi => "iscsi",
            StorageKind::IscsiQemu => "iscsi-qemu",
            StorageKind::Fc => "fc",
            StorageKind::Fcoe => "fcoe",
            StorageKind::Srp => "srp",
            StorageKind::Gfs2 => "gfs2",
            StorageKind::Ocfs2 => "ocfs2",
            StorageKind::Gpfs => "gpfs",
            StorageKind::Cephfs => "cephfs",
            StorageKind::Glusterfs => "glusterfs",
            StorageKind::Rbd => "rbd",
            StorageKind::Nbd => "nbd",
            StorageKind::Smb => "smb",
        }
    }

    /// True for storage both hosts can reach (everything but [`StorageKind::Local`]).
    pub fn is_shared(self) -> bool {
        self != StorageKind::Local
    }

    /// True for the cluster filesystems whose own lock protocol keeps every host's page
    /// cache coherent.
    pub fn is_cluster_filesystem(self) -> bool {
        matches!(
            self,
            StorageKind::Gfs2
                | StorageKind::Ocfs2
                | StorageKind::Gpfs
                | StorageKind::Cephfs
                | StorageKind::Glusterfs
        )
    }

    /// True for LUNs the host kernel attaches as block devices (the page cache sits on top).
    pub fn is_host_block_device(self) -> bool {
        matches!(
            self,
            StorageKind::Iscsi | StorageKind::Fc | StorageKind::Fcoe | StorageKind::Srp
        )
    }

    /// True for storage QEMU reaches through its own network driver, not the host kernel.
    pub fn is_qemu_network_driver(self) -> bool {
        matches!(
            self,
            StorageKind::IscsiQemu | StorageKind::Rbd | StorageKind::Nbd
        )
    }
}

impl fmt::Display for StorageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StorageKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.to_ascii_lowercase();
        let alias = match lower.as_str() {
            "ceph" => "cephfs",
            "gluster" => "glusterfs",
            "cifs" => "smb",
            other => other,
        };
        StorageKind::ALL
            .into_iter()
            .find(|k| k.as_str() == alias)
            .ok_or_else(|| Error::UnknownValue {
                what: "storage kind",
                value: s.to_string(),
                expected: StorageKind::ALL
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// QEMU's disk cache modes. They decide whether the image is read through the host page
/// cache (`writeback`, `writethrough`, `unsafe`) or with `O_DIRECT` (`none`, `directsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// `O_DIRECT`, writes acknowledged from the device's write cache.
    None,
    /// `O_DIRECT | O_DSYNC`.
    Directsync,
    /// Host page cache, every write synchronous.
    Writethrough,
    /// Host page cache, flushes passed down. QEMU's default.
    Writeback,
    /// Host page cache, flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// Every mode.
    pub const ALL: [CacheMode; 5] = [
        CacheMode::None,
        CacheMode::Directsync,
        CacheMode::Writethrough,
        CacheMode::Writeback,
        CacheMode::Unsafe,
    ];

    /// QEMU's default when a drive names no cache mode.
    pub const QEMU_DEFAULT: CacheMode = CacheMode::Writeback;

    /// The name QEMU and libvirt use.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Directsync => "directsync",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writeback => "writeback",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// True when the image is opened with `O_DIRECT`, bypassing the host page cache.
    pub fn bypasses_host_page_cache(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        CacheMode::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::UnknownValue {
                what: "cache mode",
                value: s.to_string(),
                expected: "none, directsync, writethrough, writeback, unsafe".into(),
            })
    }
}

/// A disk image format. Only `raw`, `qcow2` and `qed` can be given; the others are what
/// header detection may find, and QEMU refuses to live-migrate any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum ImageFormat {
    /// No format layer; the file or device is the disk.
    Raw,
    /// QCOW2 (versions 2 and 3).
    Qcow2,
    /// QED.
    Qed,
    /// The original QCOW (version 1).
    Qcow,
    /// VMware VMDK (sparse extent or descriptor).
    Vmdk,
    /// VirtualBox VDI.
    Vdi,
    /// Hyper-V VHDX.
    Vhdx,
    /// Virtual PC / dynamic VHD.
    Vpc,
}

impl ImageFormat {
    /// The formats a user may name.
    pub const GIVABLE: [ImageFormat; 3] = [ImageFormat::Raw, ImageFormat::Qcow2, ImageFormat::Qed];

    /// The name QEMU uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qed => "qed",
            ImageFormat::Qcow => "qcow",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vpc => "vpc",
        }
    }

    /// True for formats whose QEMU driver registers a migration blocker when it opens an
    /// image.
    pub fn blocks_migration(self) -> bool {
        !matches!(
            self,
            ImageFormat::Raw | ImageFormat::Qcow2 | ImageFormat::Qed
        )
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        ImageFormat::GIVABLE
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::UnknownValue {
                what: "image format",
                value: s.to_string(),
                expected: "raw, qcow2, qed".into(),
            })
    }
}

impl TryFrom<String> for ImageFormat {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

/// How the NFS server exports the filesystem (`/etc/exports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NfsExport {
    /// Replies only after changes are on stable storage (the Linux default).
    Sync,
    /// Replies before changes are on stable storage.
    Async,
}

impl NfsExport {
    /// The `/etc/exports` option name.
    pub fn as_str(self) -> &'static str {
        match self {
            NfsExport::Sync => "sync",
            NfsExport::Async => "async",
        }
    }
}

impl fmt::Display for NfsExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host of the migration, as the plan names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Host name.
    pub name: String,
    /// Other names and addresses the host answers to (compared literally, no DNS).
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl HostSpec {
    /// A host known by one name.
    pub fn named(name: impl Into<String>) -> Self {
        HostSpec {
            name: name.into(),
            addresses: Vec::new(),
        }
    }

    /// True when `server` (a host name or address taken from a mount or a URI) names this
    /// host. Short names match fully qualified ones (`nfs1` matches `nfs1.example.com`).
    pub fn is(&self, server: &str) -> bool {
        let server = normalize_host(server);
        if server.is_empty() {
            return false;
        }
        std::iter::once(&self.name)
            .chain(self.addresses.iter())
            .any(|n| {
                let n = normalize_host(n);
                if n.is_empty() {
                    return false;
                }
                if n == server {
                    return true;
                }
                let short = |s: &str| s.split('.').next().unwrap_or("").to_string();
                let is_ip = |s: &str| s.parse::<std::net::IpAddr>().is_ok();
                if is_ip(&n) || is_ip(&server) {
                    return false;
                }
                (!n.contains('.') || !server.contains('.')) && short(&n) == short(&server)
            })
    }
}

fn normalize_host(s: &str) -> String {
    s.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// One disk of the VM. Every field but `name` is optional: what is not given is detected
/// from `path` where it can be, or takes the documented default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// A name for the report (`vda`, `disk0`...).
    pub name: String,
    /// The image path on the source host, a block device, or a QEMU URI (`rbd:pool/img`,
    /// `nbd://host/export`, `iscsi://portal/iqn/lun`, `gluster://host/vol/img`).
    #[serde(default)]
    pub path: Option<String>,
    /// The image path on the destination host; the source path when absent.
    #[serde(default)]
    pub destination_path: Option<String>,
    /// The storage kind; detected from `path` when absent.
    #[serde(default)]
    pub storage: Option<StorageKind>,
    /// The cache mode; QEMU's default (`writeback`) when absent.
    #[serde(default)]
    pub cache: Option<CacheMode>,
    /// The image format; detected from the image header when absent.
    #[serde(default)]
    pub format: Option<ImageFormat>,
    /// For NFS: how the server exports it; assumed `sync` (the Linux default) when absent.
    #[serde(default)]
    pub nfs_export: Option<NfsExport>,
    /// The host serving the storage (NFS/SMB server, portal...); detected from the mount
    /// or URI when absent.
    #[serde(default)]
    pub server: Option<String>,
    /// The image will be resized online during the migration.
    #[serde(default)]
    pub online_resize: bool,
    /// The guest only reads the disk.
    #[serde(default)]
    pub read_only: bool,
    /// Other guests write the same disk concurrently (libvirt `<shareable/>`).
    #[serde(default)]
    pub shareable: bool,
    /// The disk is copied to the destination (storage migration over NBD).
    #[serde(default, alias = "copy_storage")]
    pub copied: bool,
    /// The drive has no medium (an empty CD-ROM).
    #[serde(default)]
    pub empty: bool,
}

impl DiskSpec {
    /// A disk with only a name; fill in what you know.
    pub fn named(name: impl Into<String>) -> Self {
        DiskSpec {
            name: name.into(),
            ..DiskSpec::default()
        }
    }
}

/// A whole-VM check: its disks and, optionally, the two hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The host the guest runs on now.
    #[serde(default)]
    pub source: Option<HostSpec>,
    /// The host the guest moves to.
    #[serde(default)]
    pub destination: Option<HostSpec>,
    /// Source and destination run on the same host (two processes of one machine): a
    /// fact the caller knows (a VMM migrating to a loopback or unix address), which no
    /// detection here can see. A local file is then the same file for both.
    #[serde(default)]
    pub same_host: bool,
    /// The disks, at least one.
    #[serde(default, rename = "disk", alias = "disks")]
    pub disks: Vec<DiskSpec>,
}

/// Plan files larger than this are refused before they are read: a plan is a few disks.
pub const MAX_PLAN_BYTES: u64 = 1 << 20;

impl Plan {
    /// A plan of one disk, no hosts.
    pub fn single(disk: DiskSpec) -> Self {
        Plan {
            source: None,
            destination: None,
            same_host: false,
            disks: vec![disk],
        }
    }

    /// Parses a plan from TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, Error> {
        let plan: Plan = toml::from_str(text).map_err(|e| Error::Plan {
            file: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        plan.validate(origin)?;
        Ok(plan)
    }

    /// Reads and parses a TOML plan file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let origin = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            what: "plan file",
            path: origin.clone(),
            source,
        })?;
        if meta.len() > MAX_PLAN_BYTES {
            return Err(Error::Plan {
                file: origin,
                message: format!(
                    "{} bytes, more than the {} a plan may have",
                    meta.len(),
                    MAX_PLAN_BYTES
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "plan file",
            path: origin.clone(),
            source,
        })?;
        Plan::from_toml_str(&text, &origin)
    }

    /// Checks what the types cannot: at least one disk, distinct non-empty names, hosts
    /// named.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let bad = |message: String| Error::Plan {
            file: origin.to_string(),
            message,
        };
        if self.disks.is_empty() {
            return Err(bad("no disks: add at least one [[disk]] table".into()));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.name.trim().is_empty() {
                return Err(bad(format!("disk #{} has an empty name", i + 1)));
            }
            if self.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(bad(format!("two disks are named {:?}", d.name)));
            }
            if d.path.is_none() && d.storage.is_none() && !d.empty {
                return Err(bad(format!(
                    "disk {:?} has neither a path nor a storage kind: give one of them",
                    d.name
                )));
            }
        }
        for (role, h) in [("source", &self.source), ("destination", &self.destination)] {
            if h.as_ref().is_some_and(|h| h.name.trim().is_empty()) {
                return Err(bad(format!("the {role} host has an empty name")));
            }
        }
        Ok(())
    }
}
