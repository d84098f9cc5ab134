//! Decides whether a VM's disk setup is safe for live migration, and explains why.
//!
//! Live migration with shared storage is only safe when the destination cannot read stale
//! data the source wrote. Whether it can depends on the storage's coherence, the disk's
//! cache mode and what the image format caches. This crate applies named rules, each with
//! its source, its reasoning and a remedy, to every disk of a [`Plan`] and returns a
//! [`Report`]: a [`Verdict`] (`safe`, `safe-in-practice`, `unsafe`), the [`Finding`]s
//! behind it, and what libvirt's own check (`qemuMigrationSrcIsSafe()`) would decide for the
//! same disks, with the reason wherever the two differ.
//!
//! What a [`DiskSpec`] does not give is detected from its path: the filesystem from the
//! `statfs(2)` magic (walking up to the nearest existing parent, FUSE subtypes and the
//! server from the mount table), the transport of a block device from sysfs, the storage of
//! a QEMU URI from its scheme, and the image format from its header. Given values always
//! win; the report says which values were given, detected or defaulted.
//!
//! # A VMM calling it before a migration
//!
//! ```
//! use migration_storage_policy::{
//!     check_plan, CacheMode, DiskSpec, HostSpec, ImageFormat, Plan, StorageKind, Verdict,
//! };
//!
//! /// Called by the VMM's `migrate` command before it connects to the destination.
//! fn storage_allows_migration(plan: &Plan, allow_unsafe: bool) -> Result<Verdict, String> {
//!     let report = check_plan(plan).map_err(|e| format!("storage check: {e}"))?;
//!     if !report.is_safe() && !allow_unsafe {
//!         // Like libvirt, refuse unless the operator said --unsafe.
//!         return Err(format!("refusing to migrate: {}", report.summary()));
//!     }
//!     Ok(report.verdict)
//! }
//!
//! let mut root = DiskSpec::named("vda");
//! root.path = Some("/srv/nfs/vm1.qcow2".into());
//! root.storage = Some(StorageKind::Nfs);
//! root.cache = Some(CacheMode::None);
//! root.format = Some(ImageFormat::Qcow2);
//!
//! let mut scratch = DiskSpec::named("vdb");
//! scratch.storage = Some(StorageKind::Local);
//! scratch.format = Some(ImageFormat::Raw);
//!
//! let mut plan = Plan {
//!     source: Some(HostSpec::named("host-a")),
//!     destination: Some(HostSpec::named("host-b")),
//!     disks: vec![root, scratch],
//! };
//!
//! // The local scratch disk makes it unsafe...
//! let err = storage_allows_migration(&plan, false).unwrap_err();
//! assert!(err.contains("local-storage-not-shared"), "{err}");
//! // ...unless it is copied to the destination (storage migration over NBD).
//! plan.disks[1].copied = true;
//! assert_eq!(storage_allows_migration(&plan, false), Ok(Verdict::SafeInPractice));
//! ```
//!
//! The command line `migration-storage-policy check` wraps the same call; see the README.

#![deny(missing_docs)]

pub mod detect;
mod engine;
mod error;
mod model;
mod report;
mod rules;

pub use engine::{check_plan, evaluate, evaluate_disk, resolve_disk, verdict_of};
pub use error::Error;
pub use model::{
    CacheMode, DiskSpec, HostSpec, ImageFormat, MAX_PLAN_BYTES, NfsExport, Plan, StorageKind,
};
pub use report::{
    Access, Basis, DiskInputs, DiskReport, Finding, LibvirtBranch, LibvirtDisk, LibvirtSummary,
    Origin, Report, Resolved, Severity, Verdict,
};
pub use rules::{RuleId, RuleInfo};
