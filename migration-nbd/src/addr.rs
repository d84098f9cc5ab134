//! NBD URIs (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`). Addresses
//! (`tcp:HOST:PORT`, `unix:PATH`) and the sockets behind them are `migration-core`'s
//! transport, re-exported here.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use migration_core::transport;
pub use migration_core::transport::{Address, Listener, Stream};

/// The IANA port of NBD.
pub const NBD_PORT: u16 = 10809;

/// An NBD URI that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad address {input:?}: {reason}")]
pub struct AddressError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

fn addr_err(input: &str, reason: impl Into<String>) -> AddressError {
    AddressError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

fn split_host_port(input: &str, s: &str) -> Result<(String, Option<u16>), AddressError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let close = rest
            .find(']')
            .ok_or_else(|| addr_err(input, "unclosed '[' in IPv6 address"))?;
        let host = &rest[..close];
        let after = &rest[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(addr_err(input, "junk after ']'")),
        };
        (host.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| addr_err(input, format!("bad port {p:?}")))?,
        ),
        None => None,
    };
    Ok((host, port))
}

/// Connects to `addr` with `TCP_NODELAY`, as the NBD protocol recommends: requests and
/// replies are small and latency-bound.
pub fn connect(addr: &Address) -> io::Result<Stream> {
    let s = transport::connect(addr)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// As [`connect`], a TCP connect giving up after `timeout` (every address the host name
/// resolves to shares it). A unix connect does not wait for the server, so it has none.
pub fn connect_within(addr: &Address, timeout: Option<Duration>) -> io::Result<Stream> {
    let (Some(timeout), Address::Tcp { host, port }) = (timeout, addr) else {
        return connect(addr);
    };
    let deadline = Instant::now() + timeout;
    let mut last = None;
    let mut tried = false;
    for sa in (host.as_str(), *port).to_socket_addrs()? {
        tried = true;
        let left = deadline.saturating_duration_since(Instant::now());
        // A zero timeout is refused by the OS: the time is up.
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&sa, left) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(Stream::Tcp(s));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        if tried {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr}: no answer within {timeout:?}"),
            )
        } else {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("connecting to {addr}: {host} resolves to no address"),
            )
        }
    }))
}

/// An NBD URI: where the server is and which export to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub address: Address,
    /// Export name.
    pub export: String,
}

fn percent_decode(input: &str, s: &str) -> Result<String, AddressError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or_else(|| addr_err(input, "truncated %-escape"))?;
            let v = u8::from_str_radix(hex, 16)
                .map_err(|_| addr_err(input, format!("bad %-escape %{hex}")))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| addr_err(input, "escaped text is not UTF-8"))
}

impl NbdUri {
    /// Whether `s` looks like an NBD URI rather than a file name.
    pub fn is_uri(s: &str) -> bool {
        ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
            .iter()
            .any(|p| s.starts_with(p))
    }
}

impl std::str::FromStr for NbdUri {
    type Err = AddressError;

    /// Parses `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///[EXPORT]?socket=PATH` as the NBD
    /// URI specification describes. TLS schemes are refused (no TLS here).
    fn from_str(s: &str) -> Result<NbdUri, AddressError> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| addr_err(s, "not a URI (no '://')"))?;
        let unix = match scheme {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => {
                return Err(addr_err(s, "TLS (nbds) is not supported by this client"));
            }
            other => return Err(addr_err(s, format!("unknown scheme {other:?}"))),
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let before_query = before_query.split('#').next().unwrap_or_default();
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let export = percent_decode(s, path.strip_prefix('/').unwrap_or(path))?;
        let mut socket = None;
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "socket" => socket = Some(percent_decode(s, v)?),
                k if k.starts_with("x-") => {}
                k => return Err(addr_err(s, format!("unknown query parameter {k:?}"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(addr_err(s, "nbd+unix URIs take no host"));
            }
            let socket = socket.ok_or_else(|| addr_err(s, "nbd+unix needs ?socket=PATH"))?;
            Address::Unix(PathBuf::from(socket))
        } else {
            if socket.is_some() {
                return Err(addr_err(s, "socket= is only for nbd+unix"));
            }
            // userinfo is only used for TLS; drop it.
            let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = split_host_port(s, hostport)?;
            if host.is_empty() {
                return Err(addr_err(s, "missing host"));
            }
            Address::Tcp {
                host: percent_decode(s, &host)?,
                port: port.unwrap_or(NBD_PORT),
            }
        };
        Ok(NbdUri { address, export })
    }
}
