//! The rules: each has a name, the source it comes from and the reasoning behind it.

use std::fmt;

use serde::Serialize;

/// A rule's name. Serialized as its kebab-case name (`nfs-o-direct`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleId {
    /// A drive without medium has nothing to keep coherent.
    EmptyDrive,
    /// A read-only disk has no writer, so no stale data.
    ReadOnlyDisk,
    /// A disk copied to the destination (storage migration) needs no shared storage.
    CopiedDisk,
    /// Copying a disk onto the image the source is running from corrupts it.
    CopyOntoSharedImage,
    /// Local storage cannot be opened by the destination.
    LocalStorageNotShared,
    /// Source and destination on one host open the same local file.
    SameHostLocalFile,
    /// NFS needs `O_DIRECT` on both hosts (cache `none`/`directsync`).
    NfsODirect,
    /// NFS needs a `sync` export.
    NfsSyncExport,
    /// SMB/CIFS needs `O_DIRECT` on both hosts.
    SmbODirect,
    /// iSCSI/FC/FCoE/SRP LUNs through the host need `O_DIRECT`.
    BlockHostPageCache,
    /// QEMU's iSCSI driver bypasses the host page cache.
    QemuIscsiDriver,
    /// Cluster filesystems keep page caches coherent.
    ClusterFilesystem,
    /// QEMU's RBD and NBD drivers bypass the host page cache.
    NetworkBlockDriver,
    /// qcow2 drops its cached metadata before the destination starts.
    Qcow2MetadataCache,
    /// QED drops its cached metadata and postpones its dirty-flag check.
    QedDirtyFlag,
    /// Raw caches only the image size: unsafe with an online resize.
    RawOnlineResize,
    /// The format is unknown; raw is assumed.
    FormatUnknown,
    /// QEMU refuses to migrate images in this format.
    FormatBlocksMigration,
    /// A shareable disk must be raw and gets no exemption from the cache rule.
    ShareableDisk,
    /// The image has a backing file that this check does not cover.
    BackingFile,
    /// The image should be at the same path on both hosts.
    SamePathOnBothHosts,
    /// The storage should not be served by either migration host.
    StorageNotOnMigrationHosts,
}

/// What a rule is: its name, title, source and reasoning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RuleInfo {
    /// The rule's name.
    pub id: RuleId,
    /// One line.
    pub title: &'static str,
    /// Where the rule comes from.
    pub source: &'static str,
    /// Why it holds.
    pub reasoning: &'static str,
}

impl RuleId {
    /// Every rule, in the order the report checks them.
    pub const ALL: [RuleId; 22] = [
        RuleId::EmptyDrive,
        RuleId::ReadOnlyDisk,
        RuleId::CopiedDisk,
        RuleId::CopyOntoSharedImage,
        RuleId::LocalStorageNotShared,
        RuleId::SameHostLocalFile,
        RuleId::NfsODirect,
        RuleId::NfsSyncExport,
        RuleId::SmbODirect,
        RuleId::BlockHostPageCache,
        RuleId::QemuIscsiDriver,
        RuleId::ClusterFilesystem,
        RuleId::NetworkBlockDriver,
        RuleId::Qcow2MetadataCache,
        RuleId::QedDirtyFlag,
        RuleId::RawOnlineResize,
        RuleId::FormatUnknown,
        RuleId::FormatBlocksMigration,
        RuleId::ShareableDisk,
        RuleId::BackingFile,
        RuleId::SamePathOnBothHosts,
        RuleId::StorageNotOnMigrationHosts,
    ];

    /// The rule's kebab-case name.
    pub fn as_str(self) -> &'static str {
        self.info().title_id()
    }

    /// The rule's title, source and reasoning.
    pub fn info(self) -> RuleInfo {
        let (title, source, reasoning) = match self {
            RuleId::EmptyDrive => (
                "A drive without medium is safe",
                "libvirt src/qemu/qemu_migration.c qemuMigrationSrcIsSafe(): \"Disks without any source (i.e. floppies and CD-ROMs) OR readonly are safe\"",
                "An empty drive has no image, so there is nothing either host could read stale.",
            ),
            RuleId::ReadOnlyDisk => (
                "A read-only disk is safe",
                "libvirt src/qemu/qemu_migration.c qemuMigrationSrcIsSafe() (read-only disks skip the check)",
                "Stale data needs a writer: if the guest never writes the image, whatever the destination caches is what the source sees too. The destination still needs identical content at its path.",
            ),
            RuleId::CopiedDisk => (
                "A disk copied to the destination needs no shared storage",
                "libvirt \"NBD Storage Migration\" (prepare/perform/finish); libvirt qemuMigrationSrcIsSafe(): \"Disks which are migrated by qemu are safe too\"",
                "The destination exports its own disk over NBD and the source mirrors every block and every guest write into it until they are in sync; only then does RAM migration finish. The destination reads its own copy, never the source's storage.",
            ),
            RuleId::CopyOntoSharedImage => (
                "Do not copy a disk onto the image the source is running from",
                "libvirt \"NBD Storage Migration\": the destination NBD server writes its own disk; libvirt qemuMigrationAnyCopyDisk() copies only non-shareable disks by default",
                "On shared storage at the same path, the destination's copy target is the very image the source guest is writing: the bulk copy writes old blocks over the guest's newer ones and the guest can read them back before the mirror catches up.",
            ),
            RuleId::LocalStorageNotShared => (
                "Local storage is not shared",
                "libvirt virFileIsSharedFS() and qemuMigrationSrcIsSafe(): \"Migration without shared storage is unsafe\"; RHEL guide 4.1: the guest must be installed on shared storage",
                "The destination opens the image at its path on its own host: with a local filesystem that is another file, or none. The guest would continue on a disk that lacks everything written on the source.",
            ),
            RuleId::SameHostLocalFile => (
                "A local file is shared when source and destination run on the same host",
                "Linux page cache: one cache per file and host, shared by every process that opens it (open(2), \"O_DIRECT\": the kernel writes back and invalidates cached pages of the range a direct I/O touches); QEMU's localhost migration (same host, same image path) in its own migration tests",
                "Both processes open one file through one kernel, so there is no second page cache to go stale: a buffered read returns what the other process wrote, and with O_DIRECT the kernel keeps direct I/O coherent with the cached pages. The source flushes its writes before it pauses for good, and the destination writes nothing before the source's commit. The cache mode then decides durability, not coherence.",
            ),
            RuleId::NfsODirect => (
                "NFS: both hosts must open the image with O_DIRECT (cache none or directsync)",
                "QEMU wiki, \"Migration with shared storage\", NFS: Background and In Practice",
                "NFS only offers close-to-open coherence, and the source keeps the image open until a third party decides the outcome, so the protocol alone never makes the destination see the source's last writes. In practice the Linux NFS client issues a protocol READ for every read() on an O_DIRECT file, and a Linux server exporting with sync returns any data a stable write acknowledged. So it is safe in practice with Linux on both ends and cache=none or directsync; any cache mode that reads through the host page cache lets the destination serve pages it cached before the switchover.",
            ),
            RuleId::NfsSyncExport => (
                "NFS: the server must export with sync",
                "QEMU wiki, \"Migration with shared storage\", NFS: In Practice; exports(5): sync is the default since nfs-utils 1.0.1",
                "The in-practice coherence rests on a Linux server exporting with sync, which answers a READ with every write it acknowledged as stable. With async the server acknowledges writes and COMMITs before they are on stable storage, and the guarantee the rule relies on is no longer stated.",
            ),
            RuleId::SmbODirect => (
                "SMB/CIFS: both hosts must open the image with O_DIRECT (cache none or directsync)",
                "libvirt virFileIsSharedFS() lists SMB/CIFS as shared but not as a cluster filesystem (virFileIsClusterFS), so it requires cache none/directsync; Linux CIFS client: O_DIRECT opens use uncached I/O to the server (commits \"[CIFS] O_DIRECT opens should work on directio mounts\", \"cifs: Allow using O_DIRECT with cache=loose\")",
                "No source documents SMB coherence for live migration; what holds is that the Linux CIFS client sends O_DIRECT reads and writes to the server instead of the page cache, so the destination reads what the source wrote and flushed. That is implementation behaviour, as for NFS.",
            ),
            RuleId::BlockHostPageCache => (
                "iSCSI, FC, FCoE, SRP LUNs through the host: only cache none or directsync is safe",
                "QEMU wiki, \"Migration with shared storage\", iSCSI/Direct Attached Storage; RHEL guide 4.1 (Fibre Channel, iSCSI, FCoE, SCSI RDMA)",
                "The device is coherent: any read returns data another initiator's write had acknowledged. But QEMU's read() goes through the Linux page cache, which is not coherent across hosts, so the destination can serve blocks it cached earlier. O_DIRECT (cache=none, directsync) bypasses it.",
            ),
            RuleId::QemuIscsiDriver => (
                "QEMU's own iSCSI driver (iscsi://) is safe with any cache mode",
                "QEMU wiki, \"Migration with shared storage\", iSCSI/Direct Attached Storage",
                "libiscsi in QEMU sends every read to the target, bypassing the host page cache, and the target returns every acknowledged write.",
            ),
            RuleId::ClusterFilesystem => (
                "Cluster filesystems are safe with any cache mode",
                "QEMU wiki, \"Migration with shared storage\", Clustered File Systems (GPFS, Ceph, GlusterFS, GFS2); libvirt virFileIsClusterFS() (GFS2, OCFS2, Ceph, GlusterFS)",
                "A cluster filesystem's lock protocol invalidates other hosts' cached pages before a host may read data another host wrote, so the host page cache stays coherent.",
            ),
            RuleId::NetworkBlockDriver => (
                "QEMU's RBD and NBD drivers are safe",
                "libvirt qemuMigrationSrcIsSafe(): network disks (VIR_STORAGE_TYPE_NETWORK) are safe",
                "QEMU talks to the RBD cluster or NBD server itself, without the host page cache; the server side is coherent for all its clients, and QEMU flushes on the source and activates the destination's block layer only at switchover.",
            ),
            RuleId::Qcow2MetadataCache => (
                "qcow2 is safe on coherent storage",
                "QEMU wiki, \"Migration with shared storage\", Image Formats: QCOW2",
                "qcow2 caches cluster metadata (L1/L2 tables, refcounts) and mutable header fields; QEMU discards them after the last migration data arrives and before the guest starts on the destination.",
            ),
            RuleId::QedDirtyFlag => (
                "QED is safe on coherent storage",
                "QEMU wiki, \"Migration with shared storage\", Image Formats: QED",
                "QED caches metadata like qcow2 and discards it the same way. Its header dirty flag, normally checked on open, may be set while the source writes, so QEMU postpones that check until migration completes.",
            ),
            RuleId::RawOnlineResize => (
                "raw is safe unless the image is resized online during the migration",
                "QEMU wiki, \"Migration with shared storage\", Image Formats: Raw Files",
                "The size of a raw file is the one piece of mutable metadata QEMU caches; it changes only with online resizing. Without it, raw is safe on storage that meets the other rules.",
            ),
            RuleId::FormatUnknown => (
                "An unknown image format is checked as raw",
                "QEMU wiki, \"Migration with shared storage\", Image Formats",
                "Of the formats that migrate, raw has the one extra condition (no online resize), so assuming raw never calls a setup safe that qcow2 or QED would not be.",
            ),
            RuleId::FormatBlocksMigration => (
                "QEMU does not live-migrate vmdk, vdi, vhdx, vpc or qcow (v1) images",
                "QEMU block/vmdk.c, vdi.c, vhdx.c, vpc.c, qcow.c: migrate_add_blocker(\"The <format> format used by node '...' does not support live migration\")",
                "These drivers cache metadata without a way to invalidate it on the destination, so QEMU adds a migration blocker when it opens such an image.",
            ),
            RuleId::ShareableDisk => (
                "A shareable disk must be raw; sharing does not relax the cache rule",
                "libvirt qemuBlockStorageSourceSupportsConcurrentAccess() (only raw supports concurrent access); libvirt qemuMigrationSrcIsSafe() exempts shareable disks because libvirt defaults them to cache=none",
                "Other guests write a shareable disk while it is open, so a format that caches metadata (qcow2, QED) gets corrupted by concurrent writers. The migrating guest's host page cache is still incoherent across hosts: the storage and cache rules apply unchanged.",
            ),
            RuleId::BackingFile => (
                "A backing file is opened by both hosts too",
                "QEMU qcow2 specification (backing_file_offset, backing_file_size ≤ 1023); QED specification (QED_F_BACKING_FILE)",
                "The destination opens the whole backing chain. This check covers only the image given; the backing file must be reachable at the same path on the destination and be checked as a disk of its own.",
            ),
            RuleId::SamePathOnBothHosts => (
                "The image should be at the same path on both hosts",
                "RHEL guide 4.1: \"Shared storage must mount at the same location on source and destination systems... it is not recommended\" to use different paths",
                "The destination opens its disks by path. Different paths can work with per-destination configuration, but one mistake there points the destination at another image.",
            ),
            RuleId::StorageNotOnMigrationHosts => (
                "The storage should not be served by either migration host",
                "RHEL guide 4.1: \"A separate system exporting the shared storage medium. Storage should not reside on either of the two host physical machines being used for migration.\"",
                "If one of the two hosts serves the storage, the guest on the other still depends on it: that host can no longer be taken down for the maintenance the migration was for, and a host that mounts its own export reads it through a different path (local filesystem vs network client) than its peer.",
            ),
        };
        RuleInfo {
            id: self,
            title,
            source,
            reasoning,
        }
    }
}

impl RuleInfo {
    fn title_id(&self) -> &'static str {
        match self.id {
            RuleId::EmptyDrive => "empty-drive",
            RuleId::ReadOnlyDisk => "read-only-disk",
            RuleId::CopiedDisk => "copied-disk",
            RuleId::CopyOntoSharedImage => "copy-onto-shared-image",
            RuleId::LocalStorageNotShared => "local-storage-not-shared",
            RuleId::SameHostLocalFile => "same-host-local-file",
            RuleId::NfsODirect => "nfs-o-direct",
            RuleId::NfsSyncExport => "nfs-sync-export",
            RuleId::SmbODirect => "smb-o-direct",
            RuleId::BlockHostPageCache => "block-host-page-cache",
            RuleId::QemuIscsiDriver => "qemu-iscsi-driver",
            RuleId::ClusterFilesystem => "cluster-filesystem",
            RuleId::NetworkBlockDriver => "network-block-driver",
            RuleId::Qcow2MetadataCache => "qcow2-metadata-cache",
            RuleId::QedDirtyFlag => "qed-dirty-flag",
            RuleId::RawOnlineResize => "raw-online-resize",
            RuleId::FormatUnknown => "format-unknown",
            RuleId::FormatBlocksMigration => "format-blocks-migration",
            RuleId::ShareableDisk => "shareable-disk",
            RuleId::BackingFile => "backing-file",
            RuleId::SamePathOnBothHosts => "same-path-on-both-hosts",
            RuleId::StorageNotOnMigrationHosts => "storage-not-on-migration-hosts",
        }
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
