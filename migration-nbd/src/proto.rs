//! Numbers of the NBD protocol (magic values, options, replies, commands, flags, errors).
//!
//! Names follow the NBD protocol document (`doc/proto.md` of the NBD project) without the
//! `NBD_` prefix.

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic; also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags the server sends after `IHAVEOPT`.
pub mod handshake_flags {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, sent in answer to the handshake flags.
pub mod client_flags {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after `EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission (no error possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn `PEEK_EXPORT` extension.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Experimental extended headers (not supported here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success, no data.
    pub const ACK: u32 = 1;
    /// One export in an `OPT_LIST` answer.
    pub const SERVER: u32 = 2;
    /// One piece of information in an `OPT_INFO`/`OPT_GO` answer.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply.
    pub const ERROR_BIT: u32 = 1 << 31;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// The option is forbidden by policy.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// The option is malformed or not valid now.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// The option needs a feature this platform lacks.
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// The client must ask for block size constraints first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    /// The request or the reply is too large.
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
}

/// Information types in `REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), sent with the export size.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `CMD_FLAG_DF` is supported (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to the export see one another's writes after a flush.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes without payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata (allocation).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflags {
    /// Force unit access: persist before replying.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must not leave a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `READ` reply in one content chunk.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS` with one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES` must be fast or fail with `ENOTSUP`.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag this implementation knows.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod chunk {
    /// Final chunk with no payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents for one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit set in every error chunk type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Error for the whole request.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Structured reply flag: this is the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// `base:allocation` status flags.
pub mod state {
    /// The extent is not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Name of the one metadata context the `base:` namespace defines.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, message, context name) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The largest read or write payload every peer must accept (32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;

/// Error values of the transmission phase (`NBD_E*`), as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: NbdErrno = NbdErrno(1);
    /// Input/output error.
    pub const EIO: NbdErrno = NbdErrno(5);
    /// Cannot allocate memory.
    pub const ENOMEM: NbdErrno = NbdErrno(12);
    /// Invalid argument.
    pub const EINVAL: NbdErrno = NbdErrno(22);
    /// No space left (writes past the end).
    pub const ENOSPC: NbdErrno = NbdErrno(28);
    /// Value too large.
    pub const EOVERFLOW: NbdErrno = NbdErrno(75);
    /// Operation not supported (fast zero that would not be fast).
    pub const ENOTSUP: NbdErrno = NbdErrno(95);
    /// The server is shutting down.
    pub const ESHUTDOWN: NbdErrno = NbdErrno(108);

    /// Maps an operating-system error to the closest NBD error: `EDQUOT` and `EFBIG`
    /// become `ENOSPC` as the protocol asks, anything not listed becomes `EIO`.
    pub fn from_io(err: &std::io::Error) -> NbdErrno {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => NbdErrno::EPERM,
            Some(libc::ENOMEM) => NbdErrno::ENOMEM,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdErrno::ENOSPC,
            Some(libc::EINVAL) => NbdErrno::EINVAL,
            Some(libc::EOPNOTSUPP) => NbdErrno::ENOTSUP,
            Some(libc::ESHUTDOWN) => NbdErrno::ESHUTDOWN,
            _ => NbdErrno::EIO,
        }
    }

    /// Short name (`EINVAL`...) for messages.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "unknown error",
        }
    }
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Human name of a command type, for messages and errors.
pub fn command_name(command: u16) -> &'static str {
    match command {
        cmd::READ => "READ",
        cmd::WRITE => "WRITE",
        cmd::DISC => "DISC",
        cmd::FLUSH => "FLUSH",
        cmd::TRIM => "TRIM",
        cmd::CACHE => "CACHE",
        cmd::WRITE_ZEROES => "WRITE_ZEROES",
        cmd::BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// Human name of an option, for messages and errors.
pub fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "EXPORT_NAME",
        opt::ABORT => "ABORT",
        opt::LIST => "LIST",
        opt::PEEK_EXPORT => "PEEK_EXPORT",
        opt::STARTTLS => "STARTTLS",
        opt::INFO => "INFO",
        opt::GO => "GO",
        opt::STRUCTURED_REPLY => "STRUCTURED_REPLY",
        opt::LIST_META_CONTEXT => "LIST_META_CONTEXT",
        opt::SET_META_CONTEXT => "SET_META_CONTEXT",
        opt::EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown option",
    }
}
