//! A TCP proxy between a migration's source and its destination, which the test controls:
//! it forwards every connection made to it (each to a new connection to the target), and
//! on demand cuts every connection through it at once (as a link going down would), cuts
//! them when the bytes forwarded from the source reach a mark, cuts connections made after
//! a cut as soon as they carry a first byte (a second cut during recovery), or holds the
//! source's bytes at a mark until released (so that a test can act while a migration is
//! surely mid-way).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The proxy (see the [module docs](self)); stops and cuts everything when dropped.
pub struct Proxy {
    addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Clones of both sockets of every live connection, by connection id.
    conns: Vec<(u64, TcpStream, TcpStream)>,
    next_id: u64,
    /// Bytes forwarded from the source side, all connections together.
    forwarded: u64,
    /// Connections accepted.
    accepted: u64,
    /// Times every connection was cut.
    cuts: u32,
    /// Marks (bytes forwarded from the source) at which to cut, ascending.
    cut_at: Vec<u64>,
    /// After a cut, cut again this many times, each once a connection made after the
    /// last cut has forwarded its first bytes.
    cut_next: u32,
    /// Connections made since the last cut.
    since_cut: Vec<u64>,
    /// The mark at which to hold the source's bytes.
    hold_at: Option<u64>,
    holding: bool,
    /// A cap on the source's bytes, all connections together: bytes per second, and the
    /// instant and count it was set at.
    rate: Option<(u64, Instant, u64)>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn cut_all(&self, st: &mut State) {
        for (_, a, b) in st.conns.drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        st.cuts += 1;
        st.since_cut.clear();
        st.holding = false;
        self.cv.notify_all();
    }

    /// Before forwarding `n` bytes from the source on connection `id`: waits while held,
    /// and while the bytes would pass the rate cap.
    fn before_forward(&self, id: u64, n: usize) {
        let wait = {
            let st = lock(&self.state);
            st.rate.map(|(bps, since, at)| {
                let due =
                    Duration::from_secs_f64((st.forwarded - at + n as u64) as f64 / bps as f64);
                (since + due).saturating_duration_since(Instant::now())
            })
        };
        if let Some(w) = wait {
            std::thread::sleep(w);
        }
        let mut st = lock(&self.state);
        if let Some(h) = st.hold_at {
            if st.forwarded + n as u64 > h {
                st.hold_at = None;
                st.holding = true;
                self.cv.notify_all();
            }
        }
        while st.holding && !self.stop.load(Ordering::SeqCst) && st.conns.iter().any(|c| c.0 == id)
        {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// After `n` bytes were forwarded on connection `id` (from the source if `upstream`).
    fn after_forward(&self, id: u64, n: usize, upstream: bool) {
        let mut st = lock(&self.state);
        if upstream {
            st.forwarded += n as u64;
        }
        let mark = st.cut_at.first().copied();
        if upstream && mark.is_some_and(|m| st.forwarded >= m) {
            st.cut_at.remove(0);
            self.cut_all(&mut st);
            return;
        }
        if st.cut_next > 0 && st.cuts > 0 && st.since_cut.contains(&id) {
            st.cut_next -= 1;
            self.cut_all(&mut st);
        }
    }

    fn forget(&self, id: u64) {
        lock(&self.state).conns.retain(|c| c.0 != id);
        self.cv.notify_all();
    }
}

impl Proxy {
    /// A proxy on a kernel-chosen port of 127.0.0.1 to `target` (`tcp:HOST:PORT`).
    pub fn start(target: &str) -> Proxy {
        let target: SocketAddr = target
            .strip_prefix("tcp:")
            .unwrap_or(target)
            .parse()
            .expect("a TCP target address");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((from, _)) => {
                        let _ = from.set_nonblocking(false);
                        connect_pair(&s, from);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            // The listener is dropped here: the address refuses connections from now on.
        });
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// From now on, forwards at most `bytes_per_s` from the source, all connections
    /// together (a capped link); `None` lifts the cap.
    pub fn set_rate(&self, bytes_per_s: Option<u64>) {
        let mut st = lock(&self.shared.state);
        let at = st.forwarded;
        st.rate = bytes_per_s.map(|b| (b.max(1), Instant::now(), at));
    }

    /// Where to migrate to: `tcp:127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Cuts every connection through the proxy now.
    pub fn cut(&self) {
        let mut st = lock(&self.shared.state);
        self.shared.cut_all(&mut st);
    }

    /// Cuts every connection once `bytes` were forwarded from the source (all connections
    /// together, counted from the proxy's start).
    pub fn cut_at(&self, bytes: u64) {
        let mut st = lock(&self.shared.state);
        st.cut_at.push(bytes);
        st.cut_at.sort_unstable();
    }

    /// After each cut, cuts again `n` times in all, each as soon as a connection made
    /// after the last cut has forwarded its first bytes (the source's resume header).
    pub fn cut_reconnections(&self, n: u32) {
        lock(&self.shared.state).cut_next = n;
    }

    /// Holds the source's bytes once `bytes` were forwarded, until [`release`]
    /// (Self::release) or a cut.
    pub fn hold_at(&self, bytes: u64) {
        lock(&self.shared.state).hold_at = Some(bytes);
    }

    /// Waits until the proxy holds the source's bytes; fails the test after `timeout`.
    pub fn wait_holding(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        while !st.holding {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the proxy never reached its hold mark: {} bytes forwarded",
                st.forwarded
            );
            st = self
                .shared
                .cv
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Lets held bytes through again.
    pub fn release(&self) {
        lock(&self.shared.state).holding = false;
        self.shared.cv.notify_all();
    }

    /// Waits until every cut asked for (by mark and after reconnections) has happened;
    /// fails the test after `timeout`.
    pub fn wait_cuts(&self, cuts: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.cuts() < cuts {
            assert!(
                Instant::now() < deadline,
                "{} of {cuts} cuts after {timeout:?} ({} bytes forwarded)",
                self.cuts(),
                self.forwarded()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Bytes forwarded from the source so far.
    pub fn forwarded(&self) -> u64 {
        lock(&self.shared.state).forwarded
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        lock(&self.shared.state).accepted
    }

    /// Times the proxy cut every connection.
    pub fn cuts(&self) -> u32 {
        lock(&self.shared.state).cuts
    }

    /// Stops accepting (the address refuses connections from then on) and cuts every
    /// connection.
    pub fn close(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let mut st = lock(&self.shared.state);
        for (_, a, b) in st.conns.drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        st.holding = false;
        self.shared.cv.notify_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connects `from` to the target and starts forwarding both ways; without a target,
/// closes `from` (as a host that is down would refuse).
fn connect_pair(s: &Arc<Shared>, from: TcpStream) {
    let to = match TcpStream::connect_timeout(&s.target, Duration::from_secs(2)) {
        Ok(t) => t,
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = from.set_nodelay(true);
    let _ = to.set_nodelay(true);
    let (Ok(from2), Ok(to2), Ok(from3), Ok(to3)) = (
        from.try_clone(),
        to.try_clone(),
        from.try_clone(),
        to.try_clone(),
    ) else {
        return;
    };
    let id = {
        let mut st = lock(&s.state);
        let id = st.next_id;
        st.next_id += 1;
        st.accepted += 1;
        st.conns.push((id, from3, to3));
        if st.cuts > 0 {
            st.since_cut.push(id);
        }
        id
    };
    let up = s.clone();
    std::thread::spawn(move || forward(&up, id, from, to, true));
    let down = s.clone();
    std::thread::spawn(move || forward(&down, id, to2, from2, false));
}

/// Copies `from` into `to` until either ends; `upstream` is the source's direction.
fn forward(s: &Shared, id: u64, mut from: TcpStream, mut to: TcpStream, upstream: bool) {
    let mut buf = vec![0u8; 64 << 10];
    let clean = loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break true,
            Err(_) => break false,
            Ok(n) => n,
        };
        if upstream {
            s.before_forward(id, n);
        }
        if to.write_all(&buf[..n]).is_err() {
            break false;
        }
        s.after_forward(id, n, upstream);
    };
    if clean {
        // A half-close passes on as one: the other direction may still carry data.
        let _ = to.shutdown(Shutdown::Write);
    } else {
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }
    if upstream {
        s.forget(id);
    }
}
