//! Criterion benchmarks of NBD request handling: the codecs and checks every request goes
//! through, a whole negotiation, and our client against our server over a unix socket.
//! Comparisons with qemu-nbd, nbdkit and nbdcopy are in
//! `migration-nbd/bench/nbd-throughput.sh` (external processes).

use std::hint::black_box;
use std::os::unix::fs::FileExt;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use migration_nbd::handshake::ClientNegotiated;
use migration_nbd::handshake::{
    BlockSize, ClientHandshake, ClientStep, ClientWants, ExportInfo, HandshakeLimits,
    ServerHandshake, ServerStep,
};
use migration_nbd::proto::{cmd, tflags};
use migration_nbd::transmission::{BlockDescriptor, RequestHeader, Session};
use migration_nbd::{
    Address, Client, ClientOptions, ClientRequest, ClientSession, ExportConfig, Listener, Server,
    ServerConfig,
};

fn codecs(c: &mut Criterion) {
    let h = RequestHeader {
        flags: 0,
        command: cmd::READ,
        cookie: 42,
        offset: 1 << 30,
        length: 1 << 18,
    };
    let raw = h.to_bytes();
    c.bench_function("request_header/encode", |b| {
        b.iter(|| black_box(black_box(&h).to_bytes()))
    });
    c.bench_function("request_header/parse", |b| {
        b.iter(|| black_box(RequestHeader::parse(black_box(&raw)).unwrap()))
    });
    let session = Session {
        size: 1 << 40,
        flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::SEND_TRIM,
        structured_replies: true,
        base_allocation_id: Some(1),
        alignment: 1,
        max_payload: 1 << 25,
        max_drain: 1 << 26,
    };
    c.bench_function("request/check", |b| {
        b.iter(|| black_box(session.check(black_box(&h)).unwrap()))
    });
    let descriptors: Vec<BlockDescriptor> = (0..1024)
        .map(|i| BlockDescriptor {
            length: 65536,
            flags: i % 3,
        })
        .collect();
    let mut out = BytesMut::with_capacity(16 << 10);
    c.bench_function("block_status_chunk/encode_1024_extents", |b| {
        b.iter(|| {
            out.clear();
            session.encode_block_status(7, &descriptors, &mut out);
            black_box(out.len())
        })
    });
    // Encoded again here: a filter that skips the benchmark above leaves `out` empty.
    out.clear();
    session.encode_block_status(7, &descriptors, &mut out);
    client_replies(c, &out);
}

/// The client side of the same reply: the session decoding a 1024-extent block status
/// chunk, and a READ reply's header before its data.
fn client_replies(c: &mut Criterion, status_chunk: &[u8]) {
    let negotiated = ClientNegotiated {
        size: 1 << 40,
        flags: tflags::HAS_FLAGS,
        structured_replies: true,
        base_allocation_id: Some(1),
        block_size: BlockSize::default(),
    };
    let mut status = status_chunk.to_vec();
    // The server encoded it for cookie 7; the session numbers its requests from 1.
    status[8..16].copy_from_slice(&1u64.to_be_bytes());
    c.bench_function("client_session/block_status_1024_extents", |b| {
        b.iter(|| {
            let mut s = ClientSession::new(negotiated.clone(), true);
            s.submit(ClientRequest::BlockStatus {
                offset: 0,
                length: 1 << 30,
                req_one: false,
            })
            .unwrap();
            let mut input = BytesMut::from(&status[..]);
            black_box(s.handle_input(&mut input).unwrap())
        })
    });
}

fn negotiation(c: &mut Criterion) {
    let exports = vec![ExportInfo {
        name: "disk".into(),
        description: String::new(),
        size: 1 << 34,
        flags: tflags::HAS_FLAGS | tflags::SEND_FLUSH,
        block_size: BlockSize::default(),
    }];
    c.bench_function("handshake/full_negotiation_in_memory", |b| {
        b.iter(|| {
            let (mut to_client, mut to_server) = (BytesMut::new(), BytesMut::new());
            let mut server =
                ServerHandshake::new(exports.clone(), HandshakeLimits::default(), &mut to_client);
            let mut client = ClientHandshake::new(ClientWants::new("disk"));
            loop {
                if let ClientStep::Done(n) = client.handle(&mut to_client, &mut to_server).unwrap()
                {
                    break black_box(n);
                }
                if let ServerStep::Transmission(n) =
                    server.handle(&mut to_server, &mut to_client).unwrap()
                {
                    black_box(n);
                }
            }
        })
    });
}

fn loopback(c: &mut Criterion) {
    const SIZE: u64 = 64 << 20;
    const REQ: u32 = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(&vec![0x5a; SIZE as usize], 0).unwrap();
    let server = Server::new(vec![ExportConfig::new("", &path)], ServerConfig::default()).unwrap();
    let handle = server
        .spawn(Listener::bind(&Address::Unix(dir.path().join("s.sock"))).unwrap())
        .unwrap();
    let client = Client::connect(handle.address(), "", &ClientOptions::default()).unwrap();
    let mut g = c.benchmark_group("loopback_unix");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.bench_function("read_64MiB_in_256KiB_requests_64_in_flight", |b| {
        b.iter(|| {
            let mut tickets = std::collections::VecDeque::new();
            let mut spare = Vec::new();
            for i in 0..SIZE / REQ as u64 {
                if tickets.len() == 64 {
                    let t: migration_nbd::Ticket<bytes::Bytes> = tickets.pop_front().unwrap();
                    if let Ok(b) = t.wait().unwrap().try_into_mut() {
                        spare.push(b);
                    }
                }
                let buf = spare.pop().unwrap_or_default();
                tickets.push_back(client.submit_read_into(i * REQ as u64, REQ, buf).unwrap());
            }
            for t in tickets {
                black_box(t.wait().unwrap());
            }
        })
    });
    let data = vec![0xa5u8; REQ as usize];
    g.bench_function("write_64MiB_in_256KiB_requests_64_in_flight", |b| {
        b.iter(|| {
            let mut tickets = std::collections::VecDeque::new();
            for i in 0..SIZE / REQ as u64 {
                if tickets.len() == 64 {
                    let t: migration_nbd::Ticket<()> = tickets.pop_front().unwrap();
                    t.wait().unwrap();
                }
                tickets.push_back(client.submit_write(i * REQ as u64, &data, false).unwrap());
            }
            for t in tickets {
                t.wait().unwrap();
            }
        })
    });
    g.finish();
    client.disconnect().unwrap();
    handle.shutdown();
}

criterion_group!(benches, codecs, negotiation, loopback);
criterion_main!(benches);
