//! An NBD server and client for storage migration without shared storage.
//!
//! The destination of a migration exports its disks with [`Server`]; the source writes into
//! them with [`Client`]. Both interoperate with the usual NBD tools (`qemu-nbd`,
//! `qemu-img`, `nbdinfo`, `nbdcopy`, `nbdkit`).
//!
//! The crate follows the workspace design: the protocol lives in codecs and state machines
//! without I/O ([`wire`], [`handshake`], [`transmission`]), and thin blocking drivers run them
//! on threads ([`server`], [`client`]). No async runtime.
//!
//! Protocol reference: the NBD protocol document (`doc/proto.md`) and the NBD URI
//! specification (`doc/uri.md`) of the NBD project.

#![deny(missing_docs)]

pub mod addr;
pub mod backend;
pub mod client;
pub mod copy;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;
pub mod wire;

pub use addr::{Address, Listener, NbdUri, Stream, connect};
pub use client::{
    BlockExtent, Client, ClientError, ClientOptions, ClientPool, ClientRequest, ClientSession,
    ConnectionLost, NegotiationError, ProtocolError, Reply, ReplyStep, Submitted, Ticket,
    Violation, ZeroFlags,
};
pub use server::{ExportConfig, Server, ServerConfig, ServerHandle};
