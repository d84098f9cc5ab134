//! # vmm-demo
//!
//! A small VMM on KVM whose guest is its own oracle, built to be live-migrated.
//!
//! The guest ([`guest`]) runs in 64-bit long mode on one or more vCPUs. Each vCPU walks
//! its share of a working set of pages forever, adding one to a counter in every page,
//! and prints `"vcpuN pass P"` on the serial port after each pass. Whatever happens to the
//! VM (paused, throttled, saved and restored, migrated), [`oracle::check`] can tell from
//! RAM alone whether a single increment was lost or invented, and whether any other byte
//! changed. Where `/dev/kvm` is missing a software vCPU ([`GuestKind::Software`]) does the
//! same work over the same RAM.
//!
//! [`Vm`] is what a migration engine drives: it implements
//! [`VmControl`](migration_core::vm::VmControl) and hands out guest RAM, its KVM memory
//! slots and host mappings for dirty tracking, and the oracle.
#![deny(missing_docs)]

pub mod cli;
pub mod commands;
pub mod control;
pub mod guest;
pub mod kvm;
pub mod layout;
pub mod migration;
pub mod oracle;
pub mod serial;
pub mod software;
pub mod state;
pub mod vm;

pub use control::VcpuStats;
pub use layout::{Fill, VmConfig, Workload};
pub use oracle::{OracleError, OracleReport};
pub use serial::{Console, ConsoleLine};
pub use vm::{
    GuestKind, HostRange, MachineInfo, MemorySlot, PreallocatedRam, Vm, VmHandle, VmmError,
    kvm_available,
};
