//! # vmm-demo
//!
//! A small VMM on KVM whose guest is its own oracle.
#![deny(missing_docs)]

pub mod guest;
pub mod layout;
pub mod oracle;
