//! Our client against our server, in one process: pipelining, out-of-order replies,
//! sparse reads, block status, zeroing, and typed errors.

mod common;

use std::sync::Arc;

use common::*;
use migration_nbd::proto::NbdErrno;
use migration_nbd::{
    Address, Client, ClientError, ClientOptions, ExportConfig, Listener, Server, ServerConfig,
    ServerHandle, ZeroFlags,
};

fn start(dir: &std::path::Path, workers: usize, read_only: bool) -> (ServerHandle, Address) {
    let disk = dir.join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let server = Server::new(
        vec![ExportConfig {
            read_only,
            ..ExportConfig::new("disk", &disk)
        }],
        ServerConfig {
            workers_per_connection: workers,
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let listener = Listener::bind(&Address::Unix(dir.join("s.sock"))).unwrap();
    let h = server.spawn(listener).unwrap();
    let a = h.address().clone();
    (h, a)
}

#[test]
fn pipelined_writes_and_reads_with_out_of_order_replies() {
    for workers in [0, 4] {
        let dir = tempfile::tempdir().unwrap();
        let (_h, addr) = start(dir.path(), workers, false);
        let c = Arc::new(Client::connect(&addr, "disk", &ClientOptions::default()).unwrap());
        // 4 threads, each with many writes in flight on the one connection.
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let tickets: Vec<_> = (0..32u64)
                        .map(|i| {
                            let off = (t * 32 + i) * (256 << 10);
                            c.submit_write(off, &pattern(off, 256 << 10), i % 8 == 0)
                                .unwrap()
                        })
                        .collect();
                    for t in tickets {
                        t.wait().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.flush().unwrap();
        let tickets: Vec<_> = (0..128u64)
            .map(|i| (i, c.submit_read(i * (256 << 10), 256 << 10).unwrap()))
            .collect();
        for (i, t) in tickets {
            assert_eq!(
                &t.wait().unwrap()[..],
                &pattern(i * (256 << 10), 256 << 10)[..]
            );
        }
        let file = read_all(&dir.path().join("disk.img"));
        assert_eq!(&file[..256 << 10], &pattern(0, 256 << 10)[..]);
        Arc::try_unwrap(c).unwrap().disconnect().unwrap();
    }
}

#[test]
fn sparse_reads_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, addr) = start(dir.path(), 2, false);
    let c = Client::connect(&addr, "disk", &ClientOptions::default()).unwrap();
    let file = read_all(&dir.path().join("disk.img"));
    // A read across hole/data/hole boundaries (served with OFFSET_HOLE chunks).
    let r = c.read(512 << 10, 4 << 20).unwrap();
    assert_eq!(&r[..], &file[512 << 10..(512 << 10) + (4 << 20)]);
    let ext = c.block_status(0, 8 << 20).unwrap();
    assert_eq!(ext[0].offset, 0);
    assert!(ext[0].is_hole() && ext[0].is_zero());
    assert_eq!(ext[0].length, 1 << 20);
    assert!(!ext[1].is_hole());
    assert_eq!((ext[1].offset, ext[1].length), (1 << 20, 3 << 20));
    // REQ_ONE returns one extent no longer than asked.
    let one = c
        .submit_block_status(1 << 20, 4096, true)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].length, 4096);
    // Simple replies work too.
    let simple = Client::connect(
        &addr,
        "disk",
        &ClientOptions {
            structured_replies: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!simple.can_block_status());
    assert_eq!(&simple.read(0, 2 << 20).unwrap()[..], &file[..2 << 20]);
}

#[test]
fn zeroes_and_trims_make_holes_unless_no_hole() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, addr) = start(dir.path(), 0, false);
    let c = Client::connect(&addr, "disk", &ClientOptions::default()).unwrap();
    let disk = dir.path().join("disk.img");
    let before = allocated(&disk);
    c.write_zeroes(1 << 20, 3 << 20).unwrap();
    assert_eq!(
        c.read(1 << 20, 3 << 20)
            .unwrap()
            .iter()
            .filter(|&&b| b != 0)
            .count(),
        0
    );
    assert!(
        allocated(&disk) + (3 << 20) <= before + 4096,
        "zeroes did not punch a hole"
    );
    assert!(c.block_status(1 << 20, 3 << 20).unwrap()[0].is_zero());
    c.submit_write_zeroes(
        20 << 20,
        1 << 20,
        ZeroFlags {
            no_hole: true,
            fast: true,
            fua: true,
        },
    )
    .unwrap()
    .wait()
    .unwrap();
    assert!(c.read(20 << 20, 1 << 20).unwrap().iter().all(|&b| b == 0));
    c.trim(50 << 20, 512 << 10).unwrap();
    c.flush().unwrap();
}

#[test]
fn our_server_errors_come_back_typed() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, addr) = start(dir.path(), 2, true);
    let lax = ClientOptions {
        strict: false,
        ..Default::default()
    };
    let c = Client::connect(&addr, "disk", &lax).unwrap();
    let e = c.write(4096, &[1; 4096]).unwrap_err();
    match &e {
        ClientError::Server {
            command,
            offset,
            length,
            error,
            message,
        } => {
            assert_eq!(
                (*command, *offset, *length, *error),
                ("WRITE", 4096, 4096, NbdErrno::EPERM)
            );
            assert!(message.contains("read-only"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.read(SIZE, 1).unwrap_err().nbd_errno(),
        Some(NbdErrno::EINVAL)
    );
    assert_eq!(
        c.trim(0, 4096).unwrap_err().nbd_errno(),
        Some(NbdErrno::EPERM)
    );
    // Unknown export: the negotiation fails with the server's message.
    let e = Client::connect(&addr, "nope", &ClientOptions::default()).unwrap_err();
    assert!(
        matches!(e, ClientError::Handshake { .. }) && e.to_string().contains("nope"),
        "{e}"
    );
    // Still fine after all that.
    assert_eq!(c.read(0, 512).unwrap().len(), 512);
    // A strict client refuses before sending.
    let s = Client::connect(&addr, "disk", &ClientOptions::default()).unwrap();
    assert!(matches!(
        s.read(SIZE - 1, 2),
        Err(ClientError::Invalid { .. })
    ));
}

#[test]
fn in_process_copy_between_two_of_our_servers() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, src) = start(dir.path(), 0, true);
    let target = dir.path().join("target.img");
    create_empty(&target, SIZE);
    let server = Server::new(
        vec![ExportConfig::new("", &target)],
        ServerConfig {
            workers_per_connection: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let h2 = server
        .spawn(Listener::bind(&Address::Unix(dir.path().join("t.sock"))).unwrap())
        .unwrap();
    let uri = |a: &Address, e: &str| match a {
        Address::Unix(p) => format!("nbd+unix:///{e}?socket={}", p.display()),
        _ => unreachable!(),
    };
    let s = migration_nbd::copy::copy(
        &uri(&src, "disk").parse().unwrap(),
        &uri(h2.address(), "").parse().unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(s.bytes_copied, data_bytes());
    assert_same(&dir.path().join("disk.img"), &target);
    assert_sparse(&target, data_bytes());
    h2.shutdown();
}
