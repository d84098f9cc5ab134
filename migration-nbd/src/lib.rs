#![doc = include_str!("../README.md")]
//!
//! ## Where the protocol lives
//!
//! The state machines without I/O, and the drivers that run them on threads:
//!
//! - Negotiation: [`handshake::ClientHandshake`] and [`handshake::ServerHandshake`].
//! - Transmission, client side: [`ClientSession`] (requests out, replies in, read data
//!   routed to the caller's buffers); [`Client`] drives it.
//! - Transmission, server side: [`transmission::Session`] (request checks and reply
//!   encoding); [`Server`] drives it over a [`backend::FileBackend`].
//!
//! A VMM with its own event loop drives the state machines itself. The message codecs
//! under them are internal; the few message types that appear in the state machines'
//! signatures are re-exported where they are used ([`BlockSize`],
//! [`transmission::RequestHeader`], [`transmission::BlockDescriptor`]).
//!
//! Protocol reference: the NBD protocol document (`doc/proto.md`) and the NBD URI
//! specification (`doc/uri.md`) of the NBD project.

#![deny(missing_docs)]

pub mod addr;
pub mod backend;
pub mod client;
pub mod copy;
pub mod handshake;
pub mod mirror;
pub mod proto;
pub mod server;
pub mod transmission;
pub(crate) mod wire;

pub use addr::{Address, Listener, NbdUri, Stream, connect, connect_within};
pub use client::{
    BlockExtent, Client, ClientError, ClientOptions, ClientPool, ClientRequest, ClientSession,
    ConnectionLost, DEFAULT_CONNECT_TIMEOUT, NegotiationError, ProtocolError, Reply, ReplyStep,
    Submitted, Ticket, Violation, ZeroFlags,
};
pub use handshake::BlockSize;
pub use server::{ConnectionError, ExportConfig, Server, ServerConfig, ServerError, ServerHandle};
pub use transmission::Session as ServerSession;
pub use wire::WireError;
