#![doc = include_str!("../README.md")]
//!
//! ## A VMM calling it before a migration
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
//!     same_host: false,
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
//! The command line `migration-storage-policy check` wraps the same call (see above).

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
