//! Our client against scripted servers that break the protocol: every request waiting on
//! the connection must end with a typed error, never a panic or a wait without end.
//!
//! Each server is a thread on one end of a socket pair. It negotiates with the crate's
//! sans-io server handshake, then reads the client's requests and answers with bytes
//! written out by hand (the point is to send what a correct encoder never would). Every
//! wait on the client is bounded by a deadline so that a hang fails the test.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use migration_nbd::handshake::{
    BlockSize, ExportInfo, HandshakeLimits, ServerHandshake, ServerStep,
};
use migration_nbd::proto::{self, chunk, cmd, tflags};
use migration_nbd::{Client, ClientError, ClientOptions, Stream};

/// How long a request may take to fail before the test calls it a hang.
const DEADLINE: Duration = Duration::from_secs(10);

/// What the scripted server saw of one request.
#[derive(Debug, Clone, Copy)]
struct Req {
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

struct Script {
    s: UnixStream,
    input: Vec<u8>,
}

impl Script {
    /// Negotiates one export of `size` bytes (structured replies and `base:allocation`
    /// if the client asks).
    fn negotiate(mut s: UnixStream, size: u64) -> Script {
        let (mut input, mut out) = (BytesMut::new(), BytesMut::new());
        let exports = vec![ExportInfo {
            name: String::new(),
            description: String::new(),
            size,
            flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
            block_size: BlockSize::default(),
        }];
        let mut hs = ServerHandshake::new(exports, HandshakeLimits::default(), &mut out);
        loop {
            let step = hs.handle(&mut input, &mut out).expect("client negotiates");
            s.write_all(&out).unwrap();
            out.clear();
            if let ServerStep::Transmission(_) = step {
                break;
            }
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "client left during negotiation");
            input.extend_from_slice(&b[..n]);
        }
        Script {
            s,
            input: input.to_vec(),
        }
    }

    fn request(&mut self) -> Req {
        while self.input.len() < 28 {
            let mut b = [0u8; 4096];
            let n = self.s.read(&mut b).unwrap();
            assert!(n > 0, "client closed before sending a request");
            self.input.extend_from_slice(&b[..n]);
        }
        let raw: Vec<u8> = self.input.drain(..28).collect();
        assert_eq!(raw[0..4], proto::REQUEST_MAGIC.to_be_bytes());
        Req {
            command: u16::from_be_bytes([raw[6], raw[7]]),
            cookie: u64::from_be_bytes(raw[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(raw[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(raw[24..28].try_into().unwrap()),
        }
    }

    fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
        let mut b = Vec::with_capacity(20 + payload.len());
        b.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        // The client may already have hung up on an earlier chunk.
        let _ = self.s.write_all(&b);
    }

    /// Keeps the socket open until the client closes it, so that the client's errors come
    /// from what it was sent and not from the server going away.
    fn linger(mut self) {
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest);
    }
}

/// Starts a scripted server and connects our client to it.
fn connect(size: u64, script: impl FnOnce(Script) + Send + 'static) -> (Client, JoinHandle<()>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || script(Script::negotiate(theirs, size)));
    let client = Client::over(Stream::Unix(ours), "", &ClientOptions::default()).unwrap();
    (client, server)
}

/// Waits for `f` on another thread, failing the test if it takes longer than the deadline
/// (the thread is left behind: a hung client is the bug being reported).
fn within_deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {DEADLINE:?} (the client hangs)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the waiting thread panicked"),
    }
}

/// The scripted server's side of [`both_requests_fail`]: answers the request under test.
type Hostile = Box<dyn FnOnce(&mut Script, Req) + Send>;
/// Waits for the request under test.
type Waiter = Box<dyn FnOnce() -> Result<(), ClientError> + Send>;

/// Puts two requests in flight: the one under test (`first` submits it) and a `READ` of
/// 512 bytes at 0 that the server never answers. The server answers the first with
/// `hostile`. Both must fail: the first with a protocol error, the second because the
/// connection is gone. Requests may reach the server in either order.
fn both_requests_fail(
    size: u64,
    first: impl FnOnce(&Client) -> Waiter + Send + 'static,
    hostile: Hostile,
) -> (ClientError, ClientError) {
    let (client, server) = connect(size, move |mut s| {
        let (a, b) = (s.request(), s.request());
        let bystander = |r: &Req| r.command == cmd::READ && r.length == 512;
        let target = if bystander(&a) { b } else { a };
        hostile(&mut s, target);
        s.linger();
    });
    let errors = within_deadline("requests after a hostile reply", move || {
        let wait_first = first(&client);
        let second = client.submit_read(0, 512).unwrap();
        let first = wait_first().expect_err("the request under test succeeded");
        let second = second.wait().expect_err("the bystander request succeeded");
        drop(client);
        (first, second)
    });
    within_deadline("server thread", move || server.join().expect("script"));
    errors
}

fn read_4096(c: &Client) -> Waiter {
    let t = c.submit_read(0, 4096).unwrap();
    Box::new(move || t.wait().map(drop))
}

fn assert_protocol_error(e: &ClientError, needle: &str) {
    let text = e.to_string();
    assert!(
        matches!(e, ClientError::Protocol { .. }) && text.contains(needle),
        "expected a protocol error mentioning {needle:?}, got {e:?}"
    );
}

fn assert_disconnected(e: &ClientError) {
    assert!(
        matches!(e, ClientError::Disconnected { .. }),
        "expected the connection to be reported lost, got {e:?}"
    );
}

fn offset_data(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

#[test]
fn offset_data_chunk_near_the_top_of_the_offset_space_fails_the_read() {
    let (first, second) = both_requests_fail(
        1 << 20,
        read_4096,
        Box::new(|s, r| {
            // offset + length wraps past 2^64 and lands inside the request.
            let at = u64::MAX - 10;
            s.chunk(
                0,
                chunk::OFFSET_DATA,
                r.cookie,
                &offset_data(at, &[7; 4096]),
            );
        }),
    );
    assert_protocol_error(&first, "outside");
    assert_disconnected(&second);
}

#[test]
fn offset_hole_chunk_that_wraps_fails_the_read() {
    let (first, second) = both_requests_fail(
        1 << 20,
        read_4096,
        Box::new(|s, r| {
            let mut p = (u64::MAX - 5).to_be_bytes().to_vec();
            p.extend_from_slice(&4096u32.to_be_bytes());
            s.chunk(proto::REPLY_FLAG_DONE, chunk::OFFSET_HOLE, r.cookie, &p);
        }),
    );
    assert_protocol_error(&first, "outside");
    assert_disconnected(&second);
}

#[test]
fn block_status_extents_summing_past_the_offset_space_fail_the_request() {
    // The server claims an export of 2^64 - 1 bytes, so that a request near its end is
    // valid, then describes more than is left of the 64-bit offset space.
    let (first, second) = both_requests_fail(
        u64::MAX,
        |c| {
            let t = c.submit_block_status(u64::MAX - 100, 50, false).unwrap();
            Box::new(move || t.wait().map(drop))
        },
        Box::new(|s, r| {
            assert_eq!(r.command, cmd::BLOCK_STATUS);
            let mut p = 1u32.to_be_bytes().to_vec();
            for _ in 0..2 {
                p.extend_from_slice(&u32::MAX.to_be_bytes());
                p.extend_from_slice(&0u32.to_be_bytes());
            }
            s.chunk(proto::REPLY_FLAG_DONE, chunk::BLOCK_STATUS, r.cookie, &p);
        }),
    );
    assert_protocol_error(&first, "extent");
    assert_disconnected(&second);
}

#[test]
fn reply_for_an_unknown_cookie_fails_every_waiting_request() {
    let (first, second) = both_requests_fail(
        1 << 20,
        read_4096,
        Box::new(|s, r| {
            s.chunk(
                proto::REPLY_FLAG_DONE,
                chunk::NONE,
                r.cookie ^ 0xdead_0000,
                &[],
            )
        }),
    );
    assert_disconnected(&first);
    assert_disconnected(&second);
    assert!(first.to_string().contains("cookie"), "{first}");
}

#[test]
fn server_closing_mid_payload_fails_every_waiting_request() {
    let (first, second) = both_requests_fail(
        1 << 20,
        read_4096,
        Box::new(|s, r| {
            // The header promises 4096 bytes; 100 come, then the server is gone.
            let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&proto::REPLY_FLAG_DONE.to_be_bytes());
            b.extend_from_slice(&chunk::OFFSET_DATA.to_be_bytes());
            b.extend_from_slice(&r.cookie.to_be_bytes());
            b.extend_from_slice(&(8u32 + 4096).to_be_bytes());
            b.extend_from_slice(&r.offset.to_be_bytes());
            b.extend_from_slice(&[1; 100]);
            s.s.write_all(&b).unwrap();
            s.s.shutdown(std::net::Shutdown::Both).unwrap();
        }),
    );
    assert_disconnected(&first);
    assert_disconnected(&second);
}

/// A read answered with two data chunks over the same bytes (which the protocol forbids)
/// and nothing for the rest fails with a protocol error, instead of returning a buffer
/// with a gap of stale bytes in it.
#[test]
fn overlapping_read_chunks_fail_the_read() {
    let (first, second) = both_requests_fail(
        1 << 20,
        |c| {
            let t = c.submit_read(0, 8192).unwrap();
            Box::new(move || t.wait().map(drop))
        },
        Box::new(|s, r| {
            for _ in 0..2 {
                s.chunk(
                    0,
                    chunk::OFFSET_DATA,
                    r.cookie,
                    &offset_data(r.offset, &[1; 4096]),
                );
            }
            s.chunk(proto::REPLY_FLAG_DONE, chunk::NONE, r.cookie, &[]);
        }),
    );
    assert_protocol_error(&first, "overlaps");
    assert_disconnected(&second);
}
