//! Our server (`migration-nbd serve`, run as a child process) against the real NBD tools:
//! qemu-img, qemu-io, nbdinfo, nbdcopy and nbdsh.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A directory of its own holding `disk.img`, sparse with `DATA` in `SIZE` bytes, and the
/// path of a socket for our server in it. The directory goes when the `TempDir` is
/// dropped: keep it bound for as long as the test uses the files.
fn sparse_disk() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    make_sparse(&disk, SIZE, DATA);
    let sock = dir.path().join("s.sock");
    (dir, disk, sock)
}

/// `qemu-img convert` of the raw image at `from` (a file or an NBD URI) into the file `to`.
fn qemu_img_convert(from: impl AsRef<OsStr>, to: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(from)
        .arg(to));
}

#[test]
fn qemu_img_convert_and_compare_from_our_server() {
    if !require(
        "qemu_img_convert_and_compare_from_our_server",
        &["qemu-img"],
    ) {
        return;
    }
    let (dir, disk, sock) = sparse_disk();
    let _server = serve_ours(&disk, &sock, &[]);
    let out = dir.path().join("out.img");
    qemu_img_convert(unix_uri(&sock, ""), &out);
    assert_same(&disk, &out);
    assert_sparse(&out, data_bytes());
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(unix_uri(&sock, ""))
        .arg(&disk));
    assert!(cmp.contains("identical"), "qemu-img compare: {cmp}");
    // And it notices a difference.
    out.metadata().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    f.write_all_at(b"x", 30 << 20).unwrap();
    let st = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(unix_uri(&sock, ""))
        .arg(&out)
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(1),
        "qemu-img compare must see the changed byte"
    );
}

#[test]
fn qemu_io_writes_and_reads_through_our_server() {
    if !require("qemu_io_writes_and_reads_through_our_server", &["qemu-io"]) {
        return;
    }
    let (_dir, disk, sock) = sparse_disk();
    let _server = serve_ours(&disk, &sock, &["--workers", "2"]);
    let uri = unix_uri(&sock, "");
    let cmds = [
        "write -P 0xab 5M 64k",
        "write -P 0xcd -f 7M 4k", // FUA
        "write -z 1M 128k",       // WRITE_ZEROES over data
        "discard 2M 1M",          // TRIM
        "flush",
        "write -P 0x11 63M 1M",
    ];
    for c in cmds {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", c])
            .arg(&uri));
    }
    for c in [
        "read -P 0xab 5M 64k",
        "read -P 0xcd 7M 4k",
        "read -P 0 1M 128k",
        "read -P 0x11 63M 1M",
    ] {
        let out = run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", c])
            .arg(&uri));
        assert!(!out.contains("Pattern verification failed"), "{c}: {out}");
    }
    // The file holds what qemu-io wrote.
    let bytes = read_all(&disk);
    assert!(
        bytes[5 << 20..(5 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0xab)
    );
    assert!(bytes[7 << 20..(7 << 20) + 4096].iter().all(|&b| b == 0xcd));
    assert!(
        bytes[1 << 20..(1 << 20) + (128 << 10)]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(bytes[63 << 20..64 << 20].iter().all(|&b| b == 0x11));
    // Untouched data is intact (the second run of DATA, built with seed 8).
    let second = pattern(8, 1 << 20);
    assert_eq!(&bytes[20 << 20..21 << 20], &second[..]);
    // qemu-io through the server reads the same as the file.
    let f = std::fs::File::open(&disk).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 5 << 20).unwrap();
    assert_eq!(b[0], 0xab);
}

#[test]
fn nbdinfo_reports_export_and_map_of_a_sparse_file() {
    if !require(
        "nbdinfo_reports_export_and_map_of_a_sparse_file",
        &["nbdinfo"],
    ) {
        return;
    }
    let (dir, disk, sock) = sparse_disk();
    let _server = serve_ours(&disk, &sock, &[]);
    let uri = unix_uri(&sock, "");
    let info = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    for needle in [
        "\"export-size\": 67108864",
        "\"can_multi_conn\": true",
        "\"can_fast_zero\": true",
        "\"block_size_maximum\": 33554432",
        "base:allocation",
    ] {
        assert!(info.contains(needle), "nbdinfo lacks {needle}: {info}");
    }
    let map = run(Command::new("nbdinfo").arg("--map").arg(&uri));
    let got: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let mut expect = Vec::new();
    let mut pos = 0;
    for &(off, len) in DATA {
        if off > pos {
            expect.push((pos, off - pos, 3));
        }
        expect.push((off, len as u64, 0));
        pos = off + len as u64;
    }
    expect.push((pos, SIZE - pos, 3));
    assert_eq!(got, expect, "nbdinfo --map:\n{map}");
    // --list sees every export of a server with several.
    drop(_server);
    let other = dir.path().join("other.img");
    create_empty(&other, 1 << 20);
    let _server = serve_ours(
        &disk,
        &sock,
        &[
            "--export",
            "main",
            "--add-export",
            &format!("second={}", other.display()),
        ],
    );
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(unix_uri(&sock, "main")));
    assert!(
        list.contains("export=\"main\"") && list.contains("export=\"second\""),
        "{list}"
    );
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(unix_uri(&sock, "second")));
    assert_eq!(size.trim(), "1048576");
}

#[test]
fn nbdcopy_both_ways_keeps_data_and_holes() {
    if !require("nbdcopy_both_ways_keeps_data_and_holes", &["nbdcopy"]) {
        return;
    }
    let (dir, disk, sock) = sparse_disk();
    {
        let _server = serve_ours(&disk, &sock, &["--read-only"]);
        let out = dir.path().join("out.img");
        run(Command::new("nbdcopy").arg(unix_uri(&sock, "")).arg(&out));
        assert_same(&disk, &out);
        assert_sparse(&out, data_bytes());
    }
    // Into the server: an empty sparse export of the same size, 4 connections.
    let target = dir.path().join("target.img");
    create_empty(&target, SIZE);
    // Data where the copy will write holes, so that zeroing is needed.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap()
        .write_all_at(&vec![0x55; 1 << 20], 30 << 20)
        .unwrap();
    let sock2 = dir.path().join("t.sock");
    let _server = serve_ours(&target, &sock2, &["--workers", "2"]);
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&disk)
        .arg(unix_uri(&sock2, "")));
    assert_same(&disk, &target);
    assert_sparse(&target, data_bytes());
}

#[test]
fn tcp_listener_serves_qemu_img() {
    if !require("tcp_listener_serves_qemu_img", &["qemu-img"]) {
        return;
    }
    let (dir, disk, _) = sparse_disk();
    let (_server, port) = serve_ours_tcp(&disk, &["--export", "disk"]);
    let out = dir.path().join("out.img");
    qemu_img_convert(format!("nbd://127.0.0.1:{port}/disk"), &out);
    assert_same(&disk, &out);
}

#[test]
fn direct_io_export_round_trips_with_qemu_img() {
    if !require(
        "direct_io_export_round_trips_with_qemu_img",
        &["qemu-img", "nbdinfo"],
    ) {
        return;
    }
    let (dir, disk, sock) = sparse_disk();
    let _server = serve_ours(&disk, &sock, &["--direct"]);
    let info = run(Command::new("nbdinfo").arg(unix_uri(&sock, "")));
    assert!(info.contains("block_size_minimum: 4096"), "{info}");
    let out = dir.path().join("out.img");
    qemu_img_convert(unix_uri(&sock, ""), &out);
    assert_same(&disk, &out);
    let back = dir.path().join("back.img");
    create_empty(&back, SIZE);
    drop(_server);
    let _server = serve_ours(&back, &sock, &["--direct"]);
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&disk)
        .arg(unix_uri(&sock, "")));
    assert_same(&disk, &back);
}

/// Requests the protocol forbids, sent by libnbd with its client-side checks off: each gets
/// the error the protocol document names, and the connection keeps working.
const FORBIDDEN: &str = r#"
import nbd, errno, sys
uri = sys.argv[1]
ro_uri = sys.argv[2]

def conn(u, structured=True, meta=True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(u)
    return h

def expect(h, name, fn, err):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == err, "%s: got %s, want %s" % (name, errno.errorcode.get(e.errnum), errno.errorcode[err])
        # Still usable afterwards.
        assert h.pread(4096, 1 << 20) == first, name + ": connection broken after the error"
        print("ok", name, errno.errorcode[err])
        return
    raise AssertionError(name + " succeeded")

h = conn(uri)
first = h.pread(4096, 1 << 20)
size = h.get_size()
M = 32 * 1024 * 1024
expect(h, "read past end", lambda: h.pread(4096, size - 1), errno.EINVAL)
expect(h, "read offset overflow", lambda: h.pread(4096, (1 << 64) - 1), errno.EINVAL)
expect(h, "write past end", lambda: h.pwrite(b"x" * 4096, size - 1), errno.ENOSPC)
expect(h, "trim past end", lambda: h.trim(4096, size), errno.EINVAL)
expect(h, "zero past end", lambda: h.zero(4096, size), errno.ENOSPC)
expect(h, "cache past end", lambda: h.cache(4096, size), errno.EINVAL)
expect(h, "block status past end", lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL)
expect(h, "unknown flag", lambda: h.pread(512, 0, 0x100), errno.EINVAL)
expect(h, "REQ_ONE on read", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)
expect(h, "NO_HOLE on write", lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
expect(h, "DF on write", lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
expect(h, "read above max payload", lambda: h.pread(M + 1, 0), errno.EOVERFLOW)
expect(h, "write above max payload", lambda: h.pwrite(b"\0" * (M + 1), 0), errno.EINVAL)
# Allowed edge cases succeed.
assert h.pread(0, size) == b""
assert len(h.pread(4096, 0, nbd.CMD_FLAG_DF)) == 4096
h.zero(1 << 20, 40 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.zero(1 << 20, 41 << 20, nbd.CMD_FLAG_NO_HOLE)
h.trim(1 << 20, 42 << 20)
h.flush()
h.shutdown()

# Without a metadata context, BLOCK_STATUS is invalid.
h = conn(uri, meta=False)
first = h.pread(4096, 1 << 20)
expect(h, "block status without context", lambda: h.block_status(4096, 0, lambda *a: 0), errno.EINVAL)
h.shutdown()

# Simple replies: DF is not offered, and big reads get EINVAL.
h = conn(uri, structured=False, meta=False)
first = h.pread(4096, 1 << 20)
expect(h, "DF without structured replies", lambda: h.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL)
expect(h, "simple read above max payload", lambda: h.pread(M + 1, 0), errno.EINVAL)
expect(h, "simple read past end", lambda: h.pread(4096, size), errno.EINVAL)
h.shutdown()

# Read-only export: writes, trims and zeroes get EPERM.
h = conn(ro_uri)
first = h.pread(4096, 1 << 20)
expect(h, "write to read-only", lambda: h.pwrite(b"z" * 512, 0), errno.EPERM)
expect(h, "trim on read-only", lambda: h.trim(512, 0), errno.EPERM)
expect(h, "zero on read-only", lambda: h.zero(512, 0), errno.EPERM)
expect(h, "FUA when not offered", lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA), errno.EINVAL)
h.shutdown()
print("all forbidden requests answered")
"#;

#[test]
fn forbidden_requests_get_the_protocol_errors_and_the_connection_survives() {
    if !have_nbdsh("forbidden_requests_get_the_protocol_errors_and_the_connection_survives") {
        return;
    }
    let (dir, disk, sock) = sparse_disk();
    let ro = dir.path().join("ro.img");
    make_sparse(&ro, SIZE, DATA);
    let ro_sock = dir.path().join("ro.sock");
    let _server = serve_ours(&disk, &sock, &["--workers", "2"]);
    let _ro_server = serve_ours(&ro, &ro_sock, &["--read-only"]);
    let script = dir.path().join("forbidden.py");
    std::fs::write(&script, FORBIDDEN).unwrap();
    let out = run(Command::new("nbdsh")
        .env("PATH", path_with_system_first())
        .arg("-c")
        .arg(format!(
            "import sys; sys.argv = ['x', {:?}, {:?}]; exec(open({:?}).read())",
            unix_uri(&sock, ""),
            unix_uri(&ro_sock, ""),
            script.display().to_string()
        )));
    assert!(out.contains("all forbidden requests answered"), "{out}");
    assert_eq!(read_all(&ro), {
        let other = dir.path().join("expect.img");
        make_sparse(&other, SIZE, DATA);
        read_all(&other)
    });
}

/// A client that sends garbage is dropped; another client of the same server goes on.
#[test]
fn garbage_disconnects_only_the_sender() {
    let (_dir, disk, sock) = sparse_disk();
    let _server = serve_ours(&disk, &sock, &[]);
    let good = migration_nbd::Client::connect(
        &migration_nbd::Address::Unix(sock.clone()),
        "",
        &Default::default(),
    )
    .unwrap();
    let before = good.read(1 << 20, 4096).unwrap();
    let garbage = pattern(99, 1 << 16);
    // Garbage instead of client flags, garbage instead of an option, garbage after a
    // valid negotiation.
    for prefix in [&[][..], &[0, 0, 0, 1][..]] {
        let mut s = UnixStream::connect(&sock).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(prefix).unwrap();
        let _ = s.write_all(&garbage);
        let mut rest = Vec::new();
        // The server hangs up: read ends (EOF or reset) instead of blocking forever.
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let r = s.read_to_end(&mut rest);
        assert!(
            r.is_ok() || r.as_ref().unwrap_err().kind() == std::io::ErrorKind::ConnectionReset,
            "server did not hang up: {r:?}"
        );
    }
    {
        let victim = migration_nbd::Client::connect(
            &migration_nbd::Address::Unix(sock.clone()),
            "",
            &Default::default(),
        )
        .unwrap();
        victim.read(0, 512).unwrap();
        // Write raw garbage on a negotiated connection through a second handle.
        drop(victim);
    }
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut hs = migration_nbd::handshake::ClientHandshake::new(
        migration_nbd::handshake::ClientWants::new(""),
    );
    let (mut input, mut out) = (bytes::BytesMut::new(), bytes::BytesMut::new());
    while let migration_nbd::handshake::ClientStep::NeedMore =
        hs.handle(&mut input, &mut out).unwrap()
    {
        s.write_all(&out).unwrap();
        out.clear();
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).unwrap();
        assert!(n > 0);
        input.extend_from_slice(&b[..n]);
    }
    s.write_all(&garbage).unwrap_or(());
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    assert!(r.is_ok() || r.unwrap_err().kind() == std::io::ErrorKind::ConnectionReset);
    assert!(
        rest.is_empty(),
        "no reply to garbage: got {} bytes",
        rest.len()
    );
    assert_eq!(good.read(1 << 20, 4096).unwrap(), before);
    good.disconnect().unwrap();
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A client that puts 3.2 GiB of 32 MiB reads and writes on the wire before waiting for any
/// reply cannot make the server hold more than its in-flight budget (64 MiB of payload
/// buffers per connection), with requests run inline or by workers, through the page cache
/// (reads by sendfile) or O_DIRECT (reads through buffers). With a budget of 3 GB instead,
/// the same test sees about 800 MiB, so it does detect unbounded buffering.
#[test]
fn server_memory_stays_bounded_by_in_flight_budget() {
    for (workers, direct) in [("0", false), ("4", false), ("4", true)] {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        make_sparse(&disk, SIZE, &[(0, SIZE as usize)]);
        let sock = dir.path().join("s.sock");
        let mut args = vec!["--workers", workers];
        if direct {
            args.push("--direct");
        }
        let server = serve_ours(&disk, &sock, &args);
        let opts = migration_nbd::ClientOptions {
            max_in_flight: 1000,
            ..Default::default()
        };
        let c =
            migration_nbd::Client::connect(&migration_nbd::Address::Unix(sock.clone()), "", &opts)
                .unwrap();
        let payload = pattern(5, 32 << 20);
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for i in 0..50u64 {
            let at = (i % 2) * (32 << 20);
            reads.push(c.submit_read(at, 32 << 20).unwrap());
            writes.push(c.submit_write(at, &payload, false).unwrap());
        }
        let mut total = 0usize;
        for t in reads {
            total += t.wait().unwrap().len();
        }
        for t in writes {
            t.wait().unwrap();
        }
        assert_eq!(total, 50 * (32 << 20));
        let hwm = vm_hwm_kib(server.pid());
        // 64 MiB of buffers, a 4 KiB input buffer, the binary and its threads.
        assert!(
            hwm < 128 * 1024,
            "server peak RSS {hwm} KiB (workers={workers}, direct={direct}): not bounded by its 64 MiB budget"
        );
        eprintln!(
            "workers={workers} direct={direct}: server peak RSS {hwm} KiB after 3.2 GiB of requests"
        );
        c.disconnect().unwrap();
    }
}
