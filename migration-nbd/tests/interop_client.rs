//! Our client (library and `migration-nbd copy`) against qemu-nbd and nbdkit (memory and
//! file plugins): copies checked byte for byte, holes preserved, block status, errors.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use migration_nbd::copy::{self, CopyOptions, Endpoint};
use migration_nbd::proto::NbdErrno;
use migration_nbd::{Address, Client, ClientError, ClientOptions};

fn endpoint(s: &str) -> Endpoint {
    s.parse().unwrap()
}

fn copy_cli(src: &str, dst: &str) -> String {
    run(Command::new(our_binary()).args(["copy", src, dst]))
}

/// Expected `base:allocation` layout of [`DATA`]: (offset, length, hole).
fn expected_layout() -> Vec<(u64, u64, bool)> {
    let mut v = Vec::new();
    let mut pos = 0;
    for &(off, len) in DATA {
        if off > pos {
            v.push((pos, off - pos, true));
        }
        v.push((off, len as u64, false));
        pos = off + len as u64;
    }
    v.push((pos, SIZE - pos, true));
    v
}

fn block_status_layout(c: &Client) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < c.size() {
        let len = (c.size() - pos).min(u32::MAX as u64 / 2) as u32;
        for e in c.block_status(pos, len).unwrap() {
            let hole = e.is_zero();
            let length = e.length.min(c.size() - e.offset);
            match out.last_mut() {
                Some(l) if l.2 == hole => l.1 += length,
                _ => out.push((e.offset, length, hole)),
            }
            pos = e.offset + length;
        }
    }
    out
}

#[test]
fn client_reads_block_status_and_data_from_qemu_nbd() {
    if !require(
        "client_reads_block_status_and_data_from_qemu_nbd",
        &["qemu-nbd"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let sock = dir.path().join("q.sock");
    let _q = serve_qemu_nbd(&disk, &sock, &[]);
    let c = Client::connect(&Address::Unix(sock.clone()), "", &ClientOptions::default()).unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(c.structured_replies() && c.can_block_status());
    assert_eq!(block_status_layout(&c), expected_layout());
    // Pipelined reads, waited in reverse order, match the file.
    let file = read_all(&disk);
    let tickets: Vec<_> = (0..64u64)
        .map(|i| (i, c.submit_read(i << 20, 1 << 20).unwrap()))
        .collect();
    for (i, t) in tickets.into_iter().rev() {
        let data = t.wait().unwrap();
        let at = (i << 20) as usize;
        assert_eq!(&data[..], &file[at..at + (1 << 20)], "read at {i} MiB");
    }
    c.disconnect().unwrap();
}

#[test]
fn copy_from_and_into_qemu_nbd() {
    if !require("copy_from_and_into_qemu_nbd", &["qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let sock = dir.path().join("q.sock");
    {
        let _q = serve_qemu_nbd(&disk, &sock, &["-r"]);
        let out = dir.path().join("out.img");
        let summary = copy_cli(&unix_uri(&sock, ""), out.to_str().unwrap());
        assert!(
            summary.contains(&format!("copied {} bytes", data_bytes())),
            "{summary}"
        );
        assert_same(&disk, &out);
        assert_sparse(&out, data_bytes());
    }
    // Into qemu-nbd: a target with stale data where the source has holes.
    let target = dir.path().join("target.img");
    make_sparse(&target, SIZE, &[(30 << 20, 2 << 20)]);
    // qemu-nbd only punches holes for WRITE_ZEROES when told it may discard.
    let _q = serve_qemu_nbd(&target, &sock, &["--discard=unmap"]);
    let s = copy::copy(
        &Endpoint::File(disk.clone()),
        &endpoint(&unix_uri(&sock, "")),
        &CopyOptions::default(),
    )
    .unwrap();
    assert_eq!(s.bytes_copied, data_bytes());
    assert_eq!(s.bytes_copied + s.bytes_skipped, SIZE);
    assert_same(&disk, &target);
    assert_sparse(&target, data_bytes());
}

fn nbdkit_round_trip(plugin: &[&str], dir: &Path, name: &str) {
    let disk = dir.join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let sock = dir.join(format!("{name}.sock"));
    let _k = serve_nbdkit(&sock, plugin);
    let uri = unix_uri(&sock, "");
    copy_cli(disk.to_str().unwrap(), &uri);
    let back = dir.join(format!("{name}-back.img"));
    let summary = copy_cli(&uri, back.to_str().unwrap());
    assert_same(&disk, &back);
    assert_sparse(&back, data_bytes());
    assert!(summary.contains("skipped"), "{summary}");
}

#[test]
fn copy_into_and_out_of_nbdkit_memory() {
    if !require("copy_into_and_out_of_nbdkit_memory", &["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    nbdkit_round_trip(&["memory", &SIZE.to_string()], dir.path(), "memory");
}

#[test]
fn copy_into_and_out_of_nbdkit_file() {
    if !require("copy_into_and_out_of_nbdkit_file", &["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    create_empty(&backing, SIZE);
    nbdkit_round_trip(
        &["file", &format!("file={}", backing.display())],
        dir.path(),
        "file",
    );
    // The file behind nbdkit holds the data and the holes.
    assert_same(&dir.path().join("disk.img"), &backing);
    assert_sparse(&backing, data_bytes());
}

#[test]
fn copy_between_two_servers_nbdkit_to_qemu_nbd() {
    if !require(
        "copy_between_two_servers_nbdkit_to_qemu_nbd",
        &["nbdkit", "qemu-nbd"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let ksock = dir.path().join("k.sock");
    let _k = serve_nbdkit(&ksock, &["file", &format!("file={}", disk.display())]);
    let target = dir.path().join("target.img");
    create_empty(&target, SIZE);
    let qsock = dir.path().join("q.sock");
    let _q = serve_qemu_nbd(&target, &qsock, &["--discard=unmap"]);
    copy_cli(&unix_uri(&ksock, ""), &unix_uri(&qsock, ""));
    assert_same(&disk, &target);
    assert_sparse(&target, data_bytes());
}

#[test]
fn server_errors_surface_typed_with_offset_and_length() {
    if !require(
        "server_errors_surface_typed_with_offset_and_length",
        &["nbdkit", "qemu-nbd"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // nbdkit's error filter fails every read with EIO.
    let sock = dir.path().join("e.sock");
    let _k = serve_nbdkit(
        &sock,
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let c = Client::connect(&Address::Unix(sock.clone()), "", &ClientOptions::default()).unwrap();
    match c.read(4096, 8192) {
        Err(ClientError::Server {
            command,
            offset,
            length,
            error,
            ..
        }) => {
            assert_eq!(
                (command, offset, length, error),
                ("READ", 4096, 8192, NbdErrno::EIO)
            );
        }
        other => panic!("expected an EIO server error, got {other:?}"),
    }
    // The connection survives: writes still work.
    c.write(0, &[1u8; 512]).unwrap();
    c.disconnect().unwrap();

    // A read-only qemu-nbd: with client checks off, the server's error comes back typed
    // (qemu-nbd answers writes to read-only exports with EINVAL, not the EPERM the
    // protocol recommends; our own server's EPERM is checked with nbdsh).
    let disk = dir.path().join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let qsock = dir.path().join("q.sock");
    let _q = serve_qemu_nbd(&disk, &qsock, &["-r"]);
    let strict =
        Client::connect(&Address::Unix(qsock.clone()), "", &ClientOptions::default()).unwrap();
    assert!(strict.is_read_only());
    assert!(matches!(
        strict.write(0, &[0; 512]),
        Err(ClientError::Invalid { .. })
    ));
    let lax = Client::connect(
        &Address::Unix(qsock.clone()),
        "",
        &ClientOptions {
            strict: false,
            ..Default::default()
        },
    )
    .unwrap();
    let e = lax.write(1 << 20, &[0; 4096]).unwrap_err();
    assert!(
        matches!(
            e.nbd_errno(),
            Some(NbdErrno::EINVAL) | Some(NbdErrno::EPERM)
        ),
        "{e}"
    );
    assert!(e.to_string().contains("offset 1048576 length 4096"), "{e}");
    let e = lax.read(SIZE, 4096).unwrap_err();
    assert_eq!(e.nbd_errno(), Some(NbdErrno::EINVAL), "{e}");
    assert_eq!(lax.read(1 << 20, 16).unwrap().len(), 16);
}

#[test]
fn several_connections_when_the_server_offers_multi_conn() {
    if !require(
        "several_connections_when_the_server_offers_multi_conn",
        &["nbdkit"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let _k = serve_nbdkit(&sock, &["memory", "16M"]);
    let pool = migration_nbd::ClientPool::connect(
        &Address::Unix(sock.clone()),
        "",
        &ClientOptions::default(),
        4,
    )
    .unwrap();
    assert!(pool.first().can_multi_conn());
    assert_eq!(pool.clients().len(), 4);
    let chunks: Vec<_> = (0..16u64).map(|i| pattern(i, 1 << 20)).collect();
    let tickets: Vec<_> = chunks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            pool.pick()
                .submit_write((i as u64) << 20, d, false)
                .unwrap()
        })
        .collect();
    for t in tickets {
        t.wait().unwrap();
    }
    pool.flush().unwrap();
    // Every connection sees every write.
    for c in pool.clients() {
        for (i, d) in chunks.iter().enumerate() {
            assert_eq!(&c.read((i as u64) << 20, 1 << 20).unwrap()[..], &d[..]);
        }
    }
    pool.disconnect().unwrap();
}
