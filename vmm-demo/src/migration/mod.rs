//! Live migration of the demo VM: the pre-copy and post-copy engines wired to
//! [`Vm`](crate::Vm), with the oracle at switchover and the storage-policy check.
//!
//! The engines' APIs are used in two places only: [`source`] (what `run --control` does
//! on `migrate`) and [`destination`] (what `vmm-demo destination` does).
//!
//! The source adds one device-state blob of its own, `oracle` (version 1): the pass
//! counters and, for a pre-copy, the hash of all guest RAM, taken while the guest is
//! paused for the switchover. The destination loads every other blob into its VM, then,
//! before it tells the source it runs the guest, checks its RAM with the oracle (every page
//! holds pass N or N+1) and compares its own RAM hash with the source's. A mismatch is a
//! `Failed` verdict: the source resumes and the destination never runs the guest.
//!
//! A post-copy cannot be checked at the switch (the destination lacks pages then), so its
//! oracle blob carries no hash (hashing RAM would only lengthen the pause): the
//! destination checks the guest once every page has arrived, pausing it for the oracle,
//! and again after running it on.
//!
//! A VM with a disk on shared storage (both processes open the same image) adds the disk
//! to each check: the blob carries the hash of the image, taken in the same pause after
//! the device flushed, and the destination's disk oracle (every working-set sector at pass
//! N or N+1 of its writer, the rest untouched) runs wherever the RAM oracle does. The
//! destination opens the image before the guest runs there and writes nothing to it
//! before the source's commit: its device starts paused and takes no request until the
//! guest is resumed here.

pub mod destination;
pub mod source;
pub mod storage;

use migration_storage_policy::{CacheMode, DiskSpec, Plan};
use serde::{Deserialize, Serialize};

/// Id of the blob that carries the source's RAM hash at switchover.
pub const ORACLE_ID: &str = "oracle";
/// Version of the oracle blob's format.
pub const ORACLE_VERSION: u32 = 1;
/// Largest oracle blob a destination parses (a hash and up to 64 pass counters need far
/// less).
pub const MAX_ORACLE_BLOB: usize = 64 << 10;

/// The oracle blob: the source's RAM hash and pass counters at switchover (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OracleBlob {
    /// XXH3 of all guest RAM, paused; none at a switch to post-copy, where the
    /// destination cannot compare it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_hash: Option<u64>,
    /// Each vCPU's pass counter.
    pub passes: Vec<u64>,
    /// Hash of the disk image ([`crate::disk_oracle::disk_hash`]), taken with the guest
    /// paused and the device flushed; none without a disk or where there is no RAM hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_hash: Option<u64>,
}

/// A disk the VM is given, described for the storage-policy check (the first, when it is
/// an existing file, is also the guest's virtio-blk disk).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskArg {
    /// Image path or URI.
    pub path: String,
    /// Cache mode; QEMU's default (writeback) when absent.
    pub cache: Option<CacheMode>,
}

/// Why the storage-policy check stops a migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The checker could not judge the disks.
    #[error("storage-policy check")]
    Check(#[source] migration_storage_policy::Error),
    /// The disk setup is unsafe and `--unsafe` was not given.
    #[error(
        "refusing to migrate: the disk setup is unsafe for live migration ({summary}); pass --unsafe to migrate anyway"
    )]
    Unsafe {
        /// The checker's verdict on each disk.
        summary: String,
    },
}

/// Whether a destination at `to` runs on this host: a unix socket, or TCP to a loopback
/// address (`localhost` included). Any other address may be another machine, whatever it
/// resolves to.
pub fn same_host(to: &migration_core::transport::Address) -> bool {
    use migration_core::transport::Address;
    match to {
        Address::Unix(_) => true,
        Address::Tcp { host, .. } => {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

/// The storage-policy verdict on the VM's disks, with source and destination on one host
/// when `same_host` (see [`same_host`]). No disk: an empty, safe plan.
pub fn check_storage(
    disks: &[DiskArg],
    allow_unsafe: bool,
    same_host: bool,
    copied: bool,
) -> Result<Option<String>, StorageError> {
    if disks.is_empty() {
        return Ok(None);
    }
    let mut plan = Plan {
        same_host,
        ..Plan::default()
    };
    for (i, d) in disks.iter().enumerate() {
        let mut spec = DiskSpec::named(format!("disk{i}"));
        spec.path = Some(d.path.clone());
        spec.cache = d.cache;
        // Copied by the storage mirror: the destination gets a disk of its own.
        spec.copied = copied;
        plan.disks.push(spec);
    }
    let report = migration_storage_policy::check_plan(&plan).map_err(StorageError::Check)?;
    let summary = format!("storage policy: {}", report.verdict.as_str());
    if report.is_safe() {
        Ok(Some(summary))
    } else if allow_unsafe {
        tracing::warn!(
            "migrating despite an unsafe disk setup (--unsafe): {}",
            report.summary()
        );
        Ok(Some(format!(
            "{summary} (overridden by --unsafe): {}",
            report.summary()
        )))
    } else {
        Err(StorageError::Unsafe {
            summary: report.summary(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_unix_destinations_are_this_host() {
        for (a, same) in [
            ("unix:/tmp/x.sock", true),
            ("tcp:127.0.0.1:4444", true),
            ("tcp:127.1.2.3:4444", true),
            ("tcp:[::1]:4444", true),
            ("tcp:localhost:4444", true),
            ("tcp:10.0.0.2:4444", false),
            ("tcp:host-b:4444", false),
        ] {
            let addr: migration_core::transport::Address = a.parse().unwrap();
            assert_eq!(same_host(&addr), same, "{a}");
        }
    }

    #[test]
    fn a_local_image_is_safe_on_this_host_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let d = [DiskArg {
            path: path.display().to_string(),
            cache: None,
        }];
        let ok = check_storage(&d, false, true, false).unwrap().unwrap();
        assert!(ok.contains("safe"), "{ok}");
        assert!(check_storage(&d, false, false, false).is_err());
        // Copied to the destination, a local image is safe whatever the host.
        let ok = check_storage(&d, false, false, true).unwrap().unwrap();
        assert!(ok.contains("safe"), "{ok}");
    }

    #[test]
    fn no_disk_is_safe_and_an_unsafe_disk_is_refused_unless_overridden() {
        assert!(matches!(check_storage(&[], false, false, false), Ok(None)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let d = [DiskArg {
            path: path.display().to_string(),
            cache: Some(CacheMode::Writeback),
        }];
        // A local image is not shared with any destination: unsafe without storage copy.
        let e = check_storage(&d, false, false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing to migrate") && e.contains("--unsafe"),
            "{e}"
        );
        assert!(e.contains("disk0"), "{e}");
        let ok = check_storage(&d, true, false, false).unwrap().unwrap();
        assert!(ok.contains("overridden by --unsafe"), "{ok}");
    }
}
