//! # migration-postcopy (skeleton)
//!
//! Post-copy live migration: the destination runs the guest at once and fetches missing
//! pages on fault through `userfaultfd`, while the source pushes the rest; the hybrid mode
//! (pre-copy, then switch); recovery after a broken connection from the destination's
//! received-pages bitmap.
//!
//! Nothing is implemented here yet: it is the subject of a later issue, built on
//! `migration-core` and driving the pre-copy phase through `migration-precopy`'s public API.
//! This crate deliberately exports no API until then.
#![deny(missing_docs)]
