//! Addresses (`tcp:HOST:PORT`, `unix:PATH`), NBD URIs (`nbd://HOST:PORT/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`) and the sockets behind them.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// The IANA port of NBD.
pub const NBD_PORT: u16 = 10809;

/// An address that could not be parsed.
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

/// Where a server listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP: host name or IP address, and port.
    Tcp {
        /// Host (IPv6 literals without brackets).
        host: String,
        /// Port (0 to let the kernel pick one when listening).
        port: u16,
    },
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
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

impl std::str::FromStr for Address {
    type Err = AddressError;

    /// Parses `tcp:HOST:PORT` (IPv6 as `tcp:[::1]:PORT`) or `unix:PATH`.
    fn from_str(s: &str) -> Result<Address, AddressError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(addr_err(s, "empty socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = split_host_port(s, rest)?;
            let port = port.ok_or_else(|| addr_err(s, "missing port"))?;
            if host.is_empty() {
                return Err(addr_err(s, "missing host"));
            }
            return Ok(Address::Tcp { host, port });
        }
        Err(addr_err(s, "expected tcp:HOST:PORT or unix:PATH"))
    }
}

/// A connected socket, TCP or unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `addr` (with `TCP_NODELAY`, as the protocol recommends).
    pub fn connect(addr: &Address) -> io::Result<Stream> {
        match addr {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Address::Unix(p) => Ok(Stream::Unix(UnixStream::connect(p)?)),
        }
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts the socket down in both directions (wakes any thread blocked on it).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// Writes all of `bufs`, in order, with as few system calls as the kernel allows.
    pub fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A listening socket, TCP or unix.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix (the path is removed when the listener is dropped).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file at the path is replaced.
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        match addr {
            Address::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs()?.collect();
                Ok(Listener::Tcp(TcpListener::bind(&addrs[..])?))
            }
            Address::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    }
                }
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The bound address (with the real port when 0 was asked).
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(Address::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
            Listener::Unix(_, p) => Ok(Address::Unix(p.clone())),
        }
    }

    /// Waits for a connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
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
