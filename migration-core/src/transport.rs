//! Where a migration goes, and the byte pipe it goes through.
//!
//! Addresses are written as QEMU and Cloud Hypervisor users write them: `tcp:HOST:PORT`
//! (HOST may be a name, an IPv4 address or a bracketed IPv6 address) or `unix:PATH`.
//! [`connect`] and [`Listener`] give a [`Stream`] for either. Engines do not insist on
//! `Stream`: their drivers run over any [`Connection`] (a plain `TcpStream`, a TLS session,
//! a socket handed over by an orchestrator). [`Channel`] wraps any byte stream, counts what crosses it in both directions, and can hold the outgoing rate under a
//! limit with a token bucket whose clock is injected, so its behaviour is tested without
//! sleeping.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `tcp:HOST:PORT`.
    Tcp {
        /// Host name or address, without IPv6 brackets.
        host: String,
        /// TCP port; 0 when listening means "any free port".
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// An address string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad address {input:?}: {reason} (expected tcp:HOST:PORT or unix:PATH)")]
pub struct AddressError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let err = |reason| AddressError {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(err("unknown transport"));
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(err("unclosed '[' in IPv6 host"))?;
            let port = after
                .strip_prefix(':')
                .ok_or(err("missing :PORT after IPv6 host"))?;
            (host, port)
        } else {
            rest.rsplit_once(':').ok_or(err("missing :PORT"))?
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        if host.contains(':') && !rest.starts_with('[') {
            return Err(err("IPv6 hosts must be written in brackets"));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| err("port is not a number from 0 to 65535"))?;
        Ok(Address::Tcp {
            host: host.to_string(),
            port,
        })
    }
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

/// A connected byte stream of either transport.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix-domain socket connection.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same connection, so that one thread can read the return path
    /// while another writes the migration stream.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Turns Nagle's algorithm off (TCP only): small messages whose latency matters, such
    /// as post-copy page requests and acknowledgements, leave at once.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(nodelay),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Sets a read timeout (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Writes all of `bufs`, in order, with as few system calls as the kernel allows: a
    /// header and its payload leave together without being copied into one buffer.
    pub fn write_all_vectored(&mut self, mut bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
        io::IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the connection has, at most `max` bytes, straight into `buf`'s spare
    /// capacity (grown as needed), and returns how many bytes came; 0 is the end of the
    /// stream. Unlike [`Read::read`] into a zeroed slice, this neither initialises memory
    /// the socket is about to overwrite nor copies it once more afterwards.
    pub fn read_buf(&mut self, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
        recv_into_spare(self.as_fd(), buf, max)
    }

    /// Shuts the connection down in one or both directions; the peer's reads see EOF. Used
    /// to break a migration off from another thread (cancel).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
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

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Receives at most `max` bytes from the socket `fd` into `buf`'s spare capacity.
fn recv_into_spare(fd: BorrowedFd<'_>, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let n = loop {
        // SAFETY: `spare` is `len` writable bytes owned by `buf`; the kernel writes at most
        // `len` of them and reports how many, and only those are marked as filled.
        let n = unsafe { libc::recv(fd.as_raw_fd(), spare.as_mut_ptr().cast(), len, 0) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// A connected, two-way byte stream a migration engine's threaded driver runs over: TCP,
/// a unix socket, TLS over either, or a socket an orchestrator handed over as an fd.
///
/// The drivers write the migration stream on one thread while another reads the return
/// path, and break the connection off from a third (a cancel, a watchdog): hence
/// [`try_clone`](Self::try_clone) for a second handle and [`shutdown`](Self::shutdown)
/// through a shared reference. A handle from `try_clone` must be usable for reading while
/// the original writes (for TLS: a session split into its two directions, or kernel TLS on
/// the socket).
pub trait Connection: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;

    /// Ends the connection in one or both directions, waking any thread blocked reading
    /// or writing it; the peer's reads see the end of the stream.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;

    /// Makes reads give up with `WouldBlock`/`TimedOut` after `timeout` without a byte
    /// (`None`: wait forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;

    /// Sends small writes at once instead of coalescing them (TCP's `TCP_NODELAY`):
    /// acknowledgements, verdicts and post-copy page requests are latency-bound. A
    /// transport without such a knob does nothing.
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        let _ = nodelay;
        Ok(())
    }

    /// Reads at most `max` bytes into `buf`'s spare capacity and returns how many came (0:
    /// the end of the stream). The default reads through a zeroed slice; sockets override
    /// it to receive straight into the buffer.
    fn read_into(&mut self, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
        let len = buf.len();
        buf.resize(len + max, 0);
        let r = self.read(&mut buf[len..]);
        let n = *r.as_ref().unwrap_or(&0);
        buf.truncate(len + n);
        r
    }
}

impl Connection for Stream {
    fn try_clone(&self) -> io::Result<Self> {
        Stream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        Stream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Stream::set_read_timeout(self, timeout)
    }
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        Stream::set_nodelay(self, nodelay)
    }
    fn read_into(&mut self, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
        Stream::read_buf(self, buf, max)
    }
}

impl Connection for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        TcpStream::set_nodelay(self, nodelay)
    }
    fn read_into(&mut self, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
        recv_into_spare(self.as_fd(), buf, max)
    }
}

impl Connection for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn read_into(&mut self, buf: &mut bytes::BytesMut, max: usize) -> io::Result<usize> {
        recv_into_spare(self.as_fd(), buf, max)
    }
}

fn with_addr(e: io::Error, what: &str, addr: &Address) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {addr}: {e}"))
}

/// Connects to `addr`. The error names the address.
pub fn connect(addr: &Address) -> io::Result<Stream> {
    match addr {
        Address::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .map_err(|e| with_addr(e, "connecting to", addr))?;
            Ok(Stream::Tcp(s))
        }
        Address::Unix(p) => Ok(Stream::Unix(
            UnixStream::connect(p).map_err(|e| with_addr(e, "connecting to", addr))?,
        )),
    }
}

/// Connects to `addr`, retrying while nobody listens there yet (connection refused, or the
/// socket file does not exist), until `timeout` has passed. For a source started at the
/// same moment as its destination.
pub fn connect_retry(addr: &Address, timeout: Duration) -> io::Result<Stream> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match connect(addr) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A listening endpoint of either transport.
#[derive(Debug)]
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a unix socket; the path is removed again when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `addr`. For `unix:PATH` a stale socket file at PATH is replaced, but any
    /// other kind of file there is an error, so a typo cannot delete a user's file.
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        match addr {
            Address::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| with_addr(e, "resolving", addr))?
                    .collect();
                let l = TcpListener::bind(&addrs[..])
                    .map_err(|e| with_addr(e, "listening on", addr))?;
                Ok(Listener::Tcp(l))
            }
            Address::Unix(p) => {
                remove_stale_socket(p).map_err(|e| with_addr(e, "listening on", addr))?;
                let l = UnixListener::bind(p).map_err(|e| with_addr(e, "listening on", addr))?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// The address this listener really has: for `tcp:HOST:0`, the port the kernel chose.
    pub fn local_address(&self) -> io::Result<Address> {
        Ok(match self {
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Address::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                }
            }
            Listener::Unix(_, p) => Address::Unix(p.clone()),
        })
    }

    /// Waits for one connection for at most `timeout`: `Ok(None)` when none came.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Stream>> {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the call's duration.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
            0 => Ok(None),
            _ => self.accept().map(Some),
        }
    }

    /// Waits for one connection.
    pub fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
        })
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

fn remove_stale_socket(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(p),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", p.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Time as a rate limiter sees it: monotonic now, and a way to wait.
///
/// [`SystemClock`] is the real one; tests inject a clock whose `sleep` only advances its
/// own time, so that rate limiting is checked exactly and instantly.
pub trait Clock: Send {
    /// Monotonic time since an arbitrary origin.
    fn now(&self) -> Duration;
    /// Blocks for `d`.
    fn sleep(&self, d: Duration);
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// A token bucket: bytes may leave at `rate` per second on average, with bursts of up to
/// `burst` bytes after a quiet period.
///
/// A request larger than what the bucket holds is not split: it is let through and the
/// bucket goes into debt, which the caller pays back by waiting. This keeps one `write`
/// one system call while the average rate stays exact.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Duration>,
}

impl TokenBucket {
    /// A bucket that refills at `rate_bps` bytes per second and holds at most `burst`
    /// bytes. It starts full.
    ///
    /// # Panics
    /// If `rate_bps` is zero.
    pub fn new(rate_bps: u64, burst: u64) -> Self {
        assert!(
            rate_bps > 0,
            "a rate limit of 0 bytes/s would never send anything"
        );
        TokenBucket {
            rate: rate_bps as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: None,
        }
    }

    /// A bucket for `rate_bps` with a burst of 10 ms worth of bytes (at least 64 KiB), so a
    /// limit is felt within milliseconds yet large writes are not chopped up.
    pub fn with_rate(rate_bps: u64) -> Self {
        Self::new(rate_bps, (rate_bps / 100).max(64 * 1024))
    }

    /// The refill rate, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Takes `n` bytes' worth of tokens at time `now` and returns how long the caller must
    /// wait before sending them (zero if the bucket held enough).
    pub fn take(&mut self, n: u64, now: Duration) -> Duration {
        if let Some(last) = self.last {
            let elapsed = now.saturating_sub(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Byte counters of a [`Channel`], shareable with a thread that reports progress.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl ChannelCounters {
    /// Bytes written so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Bytes read so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A byte stream that counts what crosses it and can limit the rate at which it writes.
///
/// The limit can be changed while a migration runs (as QEMU's `max-bandwidth` can), and
/// reads are never limited: the return path must not be slowed by the stream's budget.
pub struct Channel<S, C: Clock = SystemClock> {
    inner: S,
    counters: Arc<ChannelCounters>,
    limiter: Option<TokenBucket>,
    clock: C,
}

impl<S> Channel<S, SystemClock> {
    /// Wraps `inner` with no rate limit, on the real clock.
    pub fn new(inner: S) -> Self {
        Self::with_clock(inner, SystemClock::default())
    }
}

impl<S, C: Clock> Channel<S, C> {
    /// Wraps `inner` with no rate limit, on `clock`.
    pub fn with_clock(inner: S, clock: C) -> Self {
        Channel {
            inner,
            counters: Arc::default(),
            limiter: None,
            clock,
        }
    }

    /// Limits writes to `rate_bps` bytes per second (`None`: unlimited).
    pub fn set_rate_limit(&mut self, rate_bps: Option<u64>) {
        self.limiter = rate_bps.filter(|&r| r > 0).map(TokenBucket::with_rate);
    }

    /// Limits writes with a bucket of the caller's choosing.
    pub fn set_token_bucket(&mut self, bucket: Option<TokenBucket>) {
        self.limiter = bucket;
    }

    /// The current limit, in bytes per second.
    pub fn rate_limit(&self) -> Option<u64> {
        self.limiter.as_ref().map(TokenBucket::rate)
    }

    /// The byte counters, to read from another thread.
    pub fn counters(&self) -> Arc<ChannelCounters> {
        self.counters.clone()
    }

    /// Bytes written so far.
    pub fn bytes_sent(&self) -> u64 {
        self.counters.sent()
    }

    /// Bytes read so far.
    pub fn bytes_received(&self) -> u64 {
        self.counters.received()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn pace(&mut self, n: usize) {
        if let Some(bucket) = &mut self.limiter {
            let wait = bucket.take(n as u64, self.clock.now());
            if !wait.is_zero() {
                self.clock.sleep(wait);
            }
        }
    }
}

impl<S: Read, C: Clock> Read for Channel<S, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<S: Write, C: Clock> Write for Channel<S, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Under a limit, hand the stream at most one burst at a time so that a single huge
        // buffer does not leave in one go and then stall for seconds.
        let chunk = match &self.limiter {
            Some(b) => buf.len().min((b.burst as usize).max(1)),
            None => buf.len(),
        };
        let n = self.inner.write(&buf[..chunk])?;
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.pace(n);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if self.limiter.is_some() {
            // Keep the per-burst chunking of `write`.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.write(first);
        }
        let n = self.inner.write_vectored(bufs)?;
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A connection that only has the trait's defaults: what a TLS wrapper starts from.
    struct Plain(UnixStream);

    impl Read for Plain {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Plain {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Connection for Plain {
        fn try_clone(&self) -> io::Result<Self> {
            self.0.try_clone().map(Plain)
        }
        fn shutdown(&self, how: Shutdown) -> io::Result<()> {
            self.0.shutdown(how)
        }
        fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
            self.0.set_read_timeout(t)
        }
    }

    #[test]
    fn accept_timeout_gives_up_or_takes_the_connection() {
        let dir = std::env::temp_dir().join(format!("lm-accept-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let addr = Address::Unix(dir.join("s.sock"));
        let l = Listener::bind(&addr).unwrap();
        assert!(
            l.accept_timeout(Duration::from_millis(20))
                .unwrap()
                .is_none()
        );
        let _c = connect(&addr).unwrap();
        assert!(l.accept_timeout(Duration::from_secs(10)).unwrap().is_some());
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_read_buf_keeps_only_what_arrived() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Plain(a);
        s.set_nodelay(true).unwrap();
        let mut buf = bytes::BytesMut::from(&b"kept"[..]);
        b.write_all(b"hello").unwrap();
        let n = Connection::read_into(&mut s, &mut buf, 1 << 16).unwrap();
        assert_eq!(n, 5);
        assert_eq!(&buf[..], b"kepthello");
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let e = Connection::read_into(&mut s, &mut buf, 64).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert_eq!(
            &buf[..],
            b"kepthello",
            "a failed read leaves nothing behind"
        );
        Connection::shutdown(&s, Shutdown::Both).unwrap();
        let mut c = s.try_clone().unwrap();
        assert_eq!(Connection::read_into(&mut c, &mut buf, 64).unwrap(), 0);
    }

    #[test]
    fn read_buf_appends_what_arrives_and_sees_the_end() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        let mut buf = bytes::BytesMut::from(&b"kept"[..]);
        b.write_all(b"hello world").unwrap();
        let mut got = 0;
        while got < 11 {
            let n = s.read_buf(&mut buf, 4).unwrap();
            assert!((1..=4).contains(&n), "read {n} bytes with a limit of 4");
            got += n;
        }
        assert_eq!(&buf[..], b"kepthello world");
        drop(b);
        assert_eq!(s.read_buf(&mut buf, 1 << 20).unwrap(), 0);
        assert_eq!(&buf[..], b"kepthello world");
    }

    #[test]
    fn parses_and_prints_addresses() {
        let cases = [
            (
                "tcp:127.0.0.1:4444",
                Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 4444,
                },
            ),
            (
                "tcp:localhost:0",
                Address::Tcp {
                    host: "localhost".into(),
                    port: 0,
                },
            ),
            (
                "tcp:[::1]:5",
                Address::Tcp {
                    host: "::1".into(),
                    port: 5,
                },
            ),
            ("unix:/tmp/m.sock", Address::Unix("/tmp/m.sock".into())),
        ];
        for (s, want) in cases {
            let got: Address = s.parse().unwrap();
            assert_eq!(got, want, "{s}");
            assert_eq!(got.to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_addresses_with_reason() {
        for (s, reason) in [
            ("udp:1.2.3.4:5", "unknown transport"),
            ("tcp:1.2.3.4", "missing :PORT"),
            ("tcp:1.2.3.4:99999", "port is not a number from 0 to 65535"),
            ("tcp::5", "empty host"),
            ("tcp:::1:5", "IPv6 hosts must be written in brackets"),
            ("tcp:[::1:5", "unclosed '[' in IPv6 host"),
            ("tcp:[::1]5", "missing :PORT after IPv6 host"),
            ("unix:", "empty socket path"),
        ] {
            let e = s.parse::<Address>().unwrap_err();
            assert_eq!(e.reason, reason, "{s}");
            assert!(e.to_string().contains(s));
        }
    }

    fn echo_through(listen: Address) {
        let l = Listener::bind(&listen).unwrap();
        let addr = l.local_address().unwrap();
        let server = std::thread::spawn(move || {
            let mut s = l.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        });
        let s = connect_retry(&addr, Duration::from_secs(5)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut ch = Channel::new(s);
        ch.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        ch.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!((ch.bytes_sent(), ch.bytes_received()), (5, 5));
        server.join().unwrap();
    }

    #[test]
    fn tcp_round_trip_on_a_kernel_chosen_port() {
        echo_through("tcp:127.0.0.1:0".parse().unwrap());
    }

    #[test]
    fn unix_round_trip_and_socket_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        echo_through(Address::Unix(path.clone()));
        assert!(!path.exists(), "listener left its socket behind");
    }

    #[test]
    fn unix_listener_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("precious");
        std::fs::write(&path, b"data").unwrap();
        let e = Listener::bind(&Address::Unix(path.clone())).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn connect_error_names_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let addr = Address::Unix(dir.path().join("nobody"));
        let e = connect_retry(&addr, Duration::from_millis(20)).unwrap_err();
        assert!(e.to_string().contains("nobody"), "{e}");
    }

    /// A clock whose sleeps only move its own time forward.
    #[derive(Clone, Default)]
    struct FakeClock(Arc<Mutex<Duration>>);
    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
        fn sleep(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    #[test]
    fn rate_limit_holds_the_average_rate() {
        let clock = FakeClock::default();
        let mut ch = Channel::with_clock(Vec::new(), clock.clone());
        ch.set_token_bucket(Some(TokenBucket::new(1_000_000, 100_000)));
        let data = vec![7u8; 10_000_000];
        ch.write_all(&data).unwrap();
        assert_eq!(ch.get_ref().len(), 10_000_000);
        assert_eq!(ch.bytes_sent(), 10_000_000);
        // 10 MB at 1 MB/s with a 100 kB head start.
        let t = clock.now().as_secs_f64();
        assert!((t - 9.9).abs() < 1e-6, "took {t} s of fake time");
    }

    #[test]
    fn bucket_refills_while_idle_up_to_the_burst() {
        let mut b = TokenBucket::new(1000, 500);
        assert_eq!(b.take(500, Duration::ZERO), Duration::ZERO);
        assert_eq!(b.take(250, Duration::ZERO), Duration::from_millis(250));
        // Long idle: refills to the burst only, not beyond.
        assert_eq!(b.take(500, Duration::from_secs(100)), Duration::ZERO);
        assert_eq!(
            b.take(1, Duration::from_secs(100)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn unlimited_channel_never_sleeps_and_limit_can_change() {
        let clock = FakeClock::default();
        let mut ch = Channel::with_clock(Vec::new(), clock.clone());
        ch.write_all(&vec![0u8; 1 << 20]).unwrap();
        assert_eq!(clock.now(), Duration::ZERO);
        ch.set_rate_limit(Some(1 << 20));
        assert_eq!(ch.rate_limit(), Some(1 << 20));
        ch.write_all(&vec![0u8; 1 << 20]).unwrap();
        assert!(
            clock.now() > Duration::from_millis(900),
            "{:?}",
            clock.now()
        );
        ch.set_rate_limit(None);
        let before = clock.now();
        ch.write_all(&vec![0u8; 1 << 20]).unwrap();
        assert_eq!(clock.now(), before);
    }
}
