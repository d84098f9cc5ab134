//! Why a command failed. Each variant says what failed and keeps its cause as `source`;
//! [`chain`] renders the whole chain for a user.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

use migration_core::transport::AddressError;
use migration_core::vm::VmError;

use crate::client::ClientError;
use crate::migration::destination::ReceiveError;
use crate::oracle::OracleError;
use crate::vm::{VmmError, WaitError};

/// Why a `vmm-demo` command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A storage copy failed on this side.
    #[error("storage copy")]
    Copy(#[source] crate::migration::storage::CopyError),
    /// `--guest kvm` where KVM cannot be used.
    #[error("--guest kvm: /dev/kvm is missing or not usable (use --guest software or auto)")]
    KvmUnavailable,
    /// An address option does not parse.
    #[error("{option}")]
    Address {
        /// The option (`--listen`, `--control`, ...).
        option: &'static str,
        /// Why.
        source: AddressError,
    },
    /// The VM could not be built.
    #[error("building the VM")]
    BuildVm(#[source] VmmError),
    /// Guest RAM could not be preallocated.
    #[error("preallocating guest RAM")]
    Prealloc(#[source] VmmError),
    /// The VM refused an operation.
    #[error("{action} the VM")]
    Vm {
        /// What was asked (`pausing`, `resuming`, ...).
        action: &'static str,
        /// Why it failed.
        source: VmError,
    },
    /// A socket could not be bound, or its address read.
    #[error("{what} {address}")]
    Listen {
        /// What the socket is for.
        what: &'static str,
        /// Where.
        address: String,
        /// Why.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("starting the {name} thread")]
    Thread {
        /// The thread.
        name: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Talking to a control socket failed, or it refused the request.
    #[error(transparent)]
    Control(#[from] ClientError),
    /// Receiving a migration failed.
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// The oracle found guest RAM wrong.
    #[error("oracle {when}")]
    Oracle {
        /// When it ran.
        when: &'static str,
        /// What it found.
        source: OracleError,
    },
    /// The disk image given with --disk cannot be the guest's disk.
    #[error("the guest's disk")]
    Disk(#[source] crate::virtio_blk::DiskError),
    /// The disk oracle found the image wrong.
    #[error("disk oracle {when}")]
    DiskOracle {
        /// When it ran.
        when: &'static str,
        /// What it found.
        source: crate::disk_oracle::DiskOracleError,
    },
    /// The guest did not make the passes it was waited for.
    #[error("waiting for the guest's passes")]
    Wait(#[source] WaitError),
    /// vCPUs stopped for good.
    #[error("vCPUs failed: {}", .0.join("; "))]
    VcpuFailed(Vec<String>),
    /// The guest made no progress where it should have.
    #[error(
        "the guest made no pass on the destination: {at_switchover:?} at switchover, {at_end:?} at the end"
    )]
    NoProgress {
        /// Pass counters at the switchover.
        at_switchover: Vec<u64>,
        /// Pass counters at the end.
        at_end: Vec<u64>,
    },
    /// The guest wrote nothing to its disk on the destination, where its workload has
    /// sectors to write every pass.
    #[error(
        "the guest wrote no sector of its disk on the destination (working set of {working_set} sectors)"
    )]
    NoDiskProgress {
        /// Sectors the workload writes each pass.
        working_set: u64,
    },
    /// A file or directory operation failed.
    #[error("{what} {}", path.display())]
    File {
        /// What was done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A child process could not be started or talked to.
    #[error("{what}")]
    Child {
        /// What was done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A child process ended before it said what was expected of it.
    #[error("{0}")]
    ChildGone(&'static str),
    /// A child process exited early; what it said on standard error.
    #[error("the {who} exited ({status}) before it served its control socket: {stderr}")]
    ChildExited {
        /// Which child.
        who: &'static str,
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of its standard error.
        stderr: String,
    },
    /// The guest did not start to run.
    #[error("the source guest made no pass in {secs} s (status: {status})")]
    NoFirstPass {
        /// How long was waited.
        secs: u64,
        /// The last status seen.
        status: String,
    },
    /// A child process printed no report of the expected shape.
    #[error("the {who} printed no report: {text:?}")]
    ChildReport {
        /// Which child.
        who: &'static str,
        /// What it printed, cut to 200 characters.
        text: String,
        /// Why that is not a report.
        source: serde_json::Error,
    },
    /// The migration options contradict each other.
    #[error("migration options")]
    Options(#[source] crate::migration::source::MigrateError),
    /// A report could not be written as JSON.
    #[error("encoding the report")]
    Json(#[source] serde_json::Error),
}

/// `e` and its causes, `": "`-separated. A cause whose text the message shows already
/// (errors that print their source inline) is not repeated.
pub fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inline);

    #[derive(Debug, thiserror::Error)]
    #[error("inline: {0}")]
    struct Inline(#[source] io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer(Inline(io::Error::other("disk on fire")));
        assert_eq!(chain(&e), "outer: inline: disk on fire");
        let e = Error::File {
            what: "creating",
            path: "/nowhere".into(),
            source: io::Error::other("read-only"),
        };
        assert_eq!(chain(&e), "creating /nowhere: read-only");
    }
}
