#![doc = include_str!("../README.md")]
//!
//! # Modules
//!
//! - the VM: [`vm`] ([`Vm`], [`VmHandle`], [`MachineInfo`]), [`kvm`] and [`software`]
//!   (the two kinds of vCPU), [`control`] (pause, resume, throttle), [`serial`], [`state`]
//!   (device-state blobs), [`layout`] and [`guest`] (what is where in guest RAM, and the
//!   guest program), [`oracle`] (does RAM hold what the workload can have written?);
//! - migration: [`migration`] (the pre-copy and post-copy engines wired to the VM:
//!   [`migration::source`] and [`migration::destination`]);
//! - the program: [`cli`] (arguments), [`commands`] (one module per command), [`protocol`]
//!   and [`client`] (the control socket), [`report`] (what the commands print), [`error`],
//!   [`exit`] (exit statuses).
#![deny(missing_docs)]

pub mod cli;
pub mod client;
pub mod commands;
pub mod control;
pub mod disk_oracle;
pub mod error;
pub mod exit;
pub mod guest;
pub mod kvm;
pub mod layout;
pub mod migration;
mod names;
pub mod oracle;
pub mod protocol;
pub mod report;
pub mod serial;
pub mod software;
pub mod state;
pub mod virtio_blk;
pub mod vm;

pub use client::{ClientError, ControlClient};
pub use control::VcpuStats;
pub use error::Error;
pub use layout::{Fill, Order, VmConfig, Workload};
/// The guest page size: the one migration-core numbers pages in, and the one the guest
/// walks.
pub use migration_core::PAGE_SIZE;
pub use oracle::{OracleError, OracleReport};
pub use serial::{Console, ConsoleLine};
pub use vm::{
    GuestKind, MachineError, MachineInfo, MemorySlot, PreallocatedRam, Vm, VmHandle, VmmError,
    WaitError, kvm_available,
};
