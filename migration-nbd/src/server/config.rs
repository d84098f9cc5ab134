//! What to serve and how: exports, limits, and the errors of a server that cannot start.

use std::io;
use std::path::PathBuf;

use crate::handshake::HandshakeLimits;
use crate::proto::{self, tflags};

/// One export to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Name clients ask for ("" is the default export).
    pub name: String,
    /// Raw file or block device.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Bypass the page cache for aligned I/O (`O_DIRECT`).
    pub direct: bool,
    /// Description shown to clients.
    pub description: String,
}

impl ExportConfig {
    /// A writable export of `path` named `name`.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> ExportConfig {
        ExportConfig {
            name: name.into(),
            path: path.into(),
            read_only: false,
            direct: false,
            description: String::new(),
        }
    }
}

/// Server tuning and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest `READ`/`WRITE` payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Bytes of request and reply payload one connection may hold at once.
    pub in_flight_bytes: usize,
    /// Worker threads per connection; 0 runs requests on the connection's thread.
    pub workers_per_connection: usize,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Limits of the negotiation phase.
    pub handshake: HandshakeLimits,
    /// Most extents in one `BLOCK_STATUS` reply.
    pub max_extents: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            in_flight_bytes: 2 * proto::DEFAULT_MAX_PAYLOAD as usize,
            workers_per_connection: 0,
            max_connections: 64,
            handshake: HandshakeLimits::default(),
            max_extents: 1 << 16,
        }
    }
}

/// A server that cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// An export's file cannot be opened.
    #[error("export {name:?}: cannot open {}: {source}", path.display())]
    Open {
        /// Export name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Two exports share a name.
    #[error("two exports are named {0:?}")]
    DuplicateExport(String),
    /// Limits that cannot work together.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The listening socket failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Why.
        source: io::Error,
    },
}

pub(super) fn export_flags(read_only: bool) -> u16 {
    // One file shared by every connection through the kernel's page cache: a flush on one
    // connection covers writes completed on all of them, hence CAN_MULTI_CONN.
    let mut f =
        tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::CAN_MULTI_CONN | tflags::SEND_CACHE;
    if read_only {
        f |= tflags::READ_ONLY;
    } else {
        f |= tflags::SEND_FUA
            | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES
            | tflags::SEND_FAST_ZERO;
    }
    f
}
