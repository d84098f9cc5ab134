//! Test helpers shared by integration tests.

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

#[cfg(feature = "kvm")]
pub mod kvm_guest;
