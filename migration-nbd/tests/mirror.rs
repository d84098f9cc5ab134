//! The mirror job against real NBD peers: our server in process, qemu-nbd and nbdkit
//! (memory, file, the rate filter as a capped link, the error filter), with guest writers
//! going through the write seam while the mirror runs. Disks are a few MiB so the whole
//! file runs in seconds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use migration_nbd::backend::FileBackend;
use migration_nbd::mirror::{
    BlockBackend, CopyMode, MemoryDisk, Mirror, MirrorConfig, MirrorError, MirrorEvent, MirrorJob,
    MirrorOptions, MirroredDisk, Phase,
};
use migration_nbd::{Address, Client, ClientOptions, ExportConfig, Listener, Server, ServerConfig};

const DISK: u64 = 4 << 20;
/// Data in both halves; writers only write the first half, so the holes of the second
/// half must still be holes on the target at the end.
const LAYOUT: &[(u64, usize)] = &[(0, 1 << 20), (2 << 20, 256 << 10), (3 << 20, 128 << 10)];
const HALF: u64 = DISK / 2;

fn source_file(dir: &Path) -> PathBuf {
    let p = dir.join("source.img");
    make_sparse(&p, DISK, LAYOUT);
    p
}

/// A source mostly data, for tests that need the bulk copy to last on a capped link.
fn dense_source(dir: &Path) -> PathBuf {
    let p = dir.join("source.img");
    make_sparse(&p, DISK, &[(0, 3 << 20)]);
    p
}

/// Small copies, two in flight: progress on a capped link comes in small steps.
fn slow(mut o: MirrorOptions) -> MirrorOptions {
    o.config.io_size = 64 << 10;
    o.config.max_in_flight = 2;
    o
}

fn open(p: &Path) -> Arc<FileBackend> {
    Arc::new(FileBackend::open(p, false, false).unwrap())
}

fn opts(mode: CopyMode) -> MirrorOptions {
    MirrorOptions {
        config: MirrorConfig {
            mode,
            target_is_zero: true,
            rate_window: Duration::from_millis(200),
            reconnect_window: Duration::from_secs(10),
            reconnect_delay: Duration::from_millis(20),
            reconnect_delay_max: Duration::from_millis(200),
            ..MirrorConfig::default()
        },
        ..MirrorOptions::default()
    }
}

/// An empty target file of the disk's size, for a peer that serves a file.
fn empty_target(dir: &Path) -> PathBuf {
    let t = dir.join("target.img");
    create_empty(&t, DISK);
    t
}

fn our_server(dir: &Path, size: u64, sock: &Path) -> (migration_nbd::ServerHandle, PathBuf) {
    let t = dir.join("target.img");
    if !t.exists() {
        create_empty(&t, size);
    }
    let server = Server::new(vec![ExportConfig::new("", &t)], ServerConfig::default()).unwrap();
    let h = server
        .spawn(Listener::bind(&Address::Unix(sock.to_path_buf())).unwrap())
        .unwrap();
    (h, t)
}

/// Guest writers: random ranges of the first half, data and zeroes, through the
/// `MirroredDisk` seam (and one through `note_write` after writing the file itself).
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Writers {
    fn start(job: &MirrorJob, source: Arc<FileBackend>, n: u64, pause: Duration) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|t| {
                let disk = MirroredDisk::new(source.clone(), job.handle());
                let handle = job.handle();
                let raw = source.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                    let mut writes = 0;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = x % (HALF - 70_000);
                        let len = 1 + (x >> 40) % 65_536;
                        match (t, x % 5) {
                            (0, _) => {
                                // A VMM that writes its file itself and tells afterwards.
                                raw.write_at(&pattern(x, len as usize), off).unwrap();
                                handle.note_write(off, len);
                            }
                            (_, 0) => disk.write_zeroes(off, len).unwrap(),
                            _ => disk.write_at(&pattern(x, len as usize), off).unwrap(),
                        }
                        writes += 1;
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                    writes
                })
            })
            .collect();
        Writers { stop, threads }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().map(|t| t.join().unwrap()).sum()
    }
}

/// Starts a mirror of `src` to `target` and `writers` guest writers that pause `pause`
/// between writes.
fn start_with_writers(
    src: &Path,
    target: &Address,
    o: MirrorOptions,
    writers: u64,
    pause: Duration,
) -> (MirrorJob, Writers) {
    let source = open(src);
    let job = Mirror::start(source.clone(), target, o).unwrap();
    let w = Writers::start(&job, source, writers, pause);
    (job, w)
}

/// Polls `done` until it holds; fails with `stuck` if it does not within `within`.
#[track_caller]
fn wait_until(within: Duration, mut done: impl FnMut() -> bool, stuck: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{}", stuck());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Holes of the source's second half are holes of the target file too.
fn assert_holes_kept(src: &Path, dst: &Path) {
    let s = FileBackend::open(src, true, false).unwrap();
    let d = FileBackend::open(dst, true, false).unwrap();
    for e in s.extents(HALF, DISK - HALF, 1024).unwrap() {
        if e.hole {
            for t in d.extents(e.offset, e.length, 1024).unwrap() {
                assert!(
                    t.hole,
                    "target {} allocates {t:?}, a hole of the source",
                    dst.display()
                );
            }
        }
    }
}

fn qemu_img_compare(a: &str, b: &Path) {
    if !have("qemu-img") {
        eprintln!("qemu-img missing: comparing bytes only");
        return;
    }
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b));
    assert!(out.contains("identical"), "qemu-img compare: {out}");
}

fn events(job_opts: &mut MirrorOptions) -> Arc<Mutex<Vec<MirrorEvent>>> {
    let ev = Arc::new(Mutex::new(Vec::new()));
    let e = ev.clone();
    job_opts.progress = Some(Arc::new(move |x: &MirrorEvent| {
        e.lock().unwrap().push(x.clone())
    }));
    ev
}

/// Writers run through bulk and readiness; then they stop (the guest pauses) and the job
/// completes.
fn mirror_with_writers(
    src: &Path,
    target: &Address,
    mut o: MirrorOptions,
    writers: u64,
) -> (migration_nbd::mirror::MirrorStats, Vec<MirrorEvent>) {
    let ev = events(&mut o);
    // A guest that writes all the time never lets a background mirror find the disk
    // clean: these write about 500 times a second each.
    let (job, w) = start_with_writers(src, target, o, writers, Duration::from_millis(2));
    job.wait_ready(Duration::from_secs(20)).unwrap();
    // Mirrored after ready too.
    std::thread::sleep(Duration::from_millis(100));
    let n = w.stop();
    assert!(n > 0, "the writers wrote nothing");
    let stats = job.complete().unwrap();
    let ev = ev.lock().unwrap().clone();
    (stats, ev)
}

#[test]
fn mirror_into_our_server_with_writers_in_each_mode() {
    for mode in [
        CopyMode::Background,
        CopyMode::WriteBlocking,
        CopyMode::Auto,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = source_file(dir.path());
        let sock = dir.path().join("s.sock");
        let (_h, tgt) = our_server(dir.path(), DISK, &sock);
        let (stats, ev) = mirror_with_writers(&src, &Address::Unix(sock.clone()), opts(mode), 3);
        assert_same(&src, &tgt);
        assert_holes_kept(&src, &tgt);
        qemu_img_compare(&unix_uri(&sock, ""), &src);
        assert!(ev.contains(&MirrorEvent::Phase {
            phase: Phase::Ready
        }));
        assert!(ev.contains(&MirrorEvent::Phase {
            phase: Phase::Completed
        }));
        assert!(stats.bytes_holes > 0, "{stats:?}");
        if mode == CopyMode::WriteBlocking {
            assert!(stats.blocking_writes > 0, "{stats:?}");
            assert!(stats.write_latency_p50.is_some() && stats.write_latency_p99.is_some());
        }
    }
}

#[test]
fn mirror_into_qemu_nbd_with_writers() {
    if !require(
        "mirror_into_qemu_nbd_with_writers",
        &["qemu-nbd", "qemu-img"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let tgt = empty_target(dir.path());
    let sock = dir.path().join("q.sock");
    let q = serve_qemu_nbd(&tgt, &sock, &["--cache=none", "--discard=unmap"]);
    let (stats, _) = mirror_with_writers(
        &src,
        &Address::Unix(sock.clone()),
        opts(CopyMode::WriteBlocking),
        2,
    );
    qemu_img_compare(&unix_uri(&sock, ""), &src);
    drop(q);
    assert_same(&src, &tgt);
    assert_holes_kept(&src, &tgt);
    assert!(stats.blocking_writes > 0);
}

#[test]
fn mirror_into_nbdkit_memory_and_file_with_writers() {
    if !require(
        "mirror_into_nbdkit_memory_and_file_with_writers",
        &["nbdkit"],
    ) {
        return;
    }
    // Memory: compared through our client.
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let sock = dir.path().join("m.sock");
    let _k = serve_nbdkit(&sock, &["memory", &format!("size={DISK}")]);
    let addr = Address::Unix(sock.clone());
    mirror_with_writers(&src, &addr, opts(CopyMode::Background), 2);
    let c = Client::connect(&addr, "", &ClientOptions::default()).unwrap();
    let want = read_all(&src);
    for off in (0..DISK).step_by(1 << 20) {
        let got = c.read(off, 1 << 20).unwrap();
        assert!(
            got[..] == want[off as usize..(off + (1 << 20)) as usize],
            "nbdkit memory differs in the MiB at {off}"
        );
    }
    qemu_img_compare(&unix_uri(&sock, ""), &src);
    // Holes stayed holes: block status of the source's holes in the second half.
    let st = c.block_status(HALF + (512 << 10), 256 << 10).unwrap();
    assert!(st.iter().all(|e| e.is_zero()), "{st:?}");
    c.disconnect().unwrap();
    // File.
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let tgt = empty_target(dir.path());
    let sock = dir.path().join("f.sock");
    let k = serve_nbdkit(&sock, &["file", tgt.to_str().unwrap()]);
    mirror_with_writers(&src, &Address::Unix(sock), opts(CopyMode::Auto), 2);
    drop(k);
    assert_same(&src, &tgt);
    assert_holes_kept(&src, &tgt);
}

/// nbdkit with the rate filter in front of an empty target file: a link capped at `bits`
/// per second. Returns nbdkit, its socket and the target file.
fn capped_nbdkit(dir: &Path, bits: &str) -> (ChildGuard, PathBuf, PathBuf) {
    let tgt = empty_target(dir);
    let sock = dir.join("r.sock");
    let k = serve_nbdkit(
        &sock,
        &[
            "--filter=rate",
            "file",
            tgt.to_str().unwrap(),
            &format!("rate={bits}"),
        ],
    );
    (k, sock, tgt)
}

/// Kills nbdkit serving `tgt` and brings it back on the same socket.
fn restart_nbdkit(k: ChildGuard, sock: &Path, tgt: &Path) -> ChildGuard {
    drop(k);
    std::thread::sleep(Duration::from_millis(150));
    // A killed nbdkit leaves its socket file behind.
    let _ = std::fs::remove_file(sock);
    serve_nbdkit(sock, &["file", tgt.to_str().unwrap()])
}

#[test]
fn auto_mode_switches_to_write_blocking_under_a_writer_faster_than_a_capped_link() {
    if !require("auto_mode_switches_to_write_blocking", &["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    // 4 MiB/s.
    let (k, sock, tgt) = capped_nbdkit(dir.path(), "32M");
    let mut o = opts(CopyMode::Auto);
    let ev = events(&mut o);
    let (job, w) = start_with_writers(&src, &Address::Unix(sock), o, 3, Duration::ZERO);
    job.wait_ready(Duration::from_secs(20)).unwrap();
    // The rate filter lets a first burst through at full speed, and a loaded machine may
    // run the writers late: the bulk copy can be ready before they outrun the link. They
    // outrun it from then on, and auto mode switches in the ready phase too: wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while job.stats().mode_switches == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let n = w.stop();
    let stats = job.complete().unwrap();
    drop(k);
    assert_same(&src, &tgt);
    let ev = ev.lock().unwrap();
    let switch = ev
        .iter()
        .find(|e| {
            matches!(
                e,
                MirrorEvent::ModeSwitched {
                    automatic: true,
                    write_blocking: true,
                    ..
                }
            )
        })
        .unwrap_or_else(|| panic!("no automatic switch after {n} writes: {stats:?}"));
    if let MirrorEvent::ModeSwitched {
        dirty_rate,
        copy_rate,
        ..
    } = switch
    {
        assert!(dirty_rate > copy_rate, "{switch:?}");
    }
    assert!(stats.mode_switches >= 1 && stats.write_blocking);
}

#[test]
fn the_ready_deadline_says_the_dirty_rate_and_the_copy_rate() {
    if !require(
        "the_ready_deadline_says_the_dirty_rate_and_the_copy_rate",
        &["nbdkit"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dense_source(dir.path());
    // 1 MiB/s: the 3 MiB of data take far more than the deadline.
    let (_k, sock, _) = capped_nbdkit(dir.path(), "8M");
    let (job, w) = start_with_writers(
        &src,
        &Address::Unix(sock),
        slow(opts(CopyMode::Background)),
        1,
        Duration::from_millis(1),
    );
    let e = job.wait_ready(Duration::from_millis(400)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MirrorError::ReadyDeadline { .. }), "{e:?}");
    assert!(
        msg.contains("the guest dirties") && msg.contains("the copy moves"),
        "{msg}"
    );
    w.stop();
    // Cancelled mid-bulk: the target is left as it is, and said so.
    let c = job.cancel().unwrap();
    assert!(c.to_string().contains("the target is left as it is"), "{c}");
}

#[test]
fn cancel_in_bulk_when_ready_and_while_reconnecting_leaves_the_source_untouched() {
    if !require("cancel_at_each_phase", &["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dense_source(dir.path());
    let before = read_all(&src);
    // Bulk, on a slow link.
    let (k, sock, _) = capped_nbdkit(dir.path(), "8M");
    let job = Mirror::start(
        open(&src),
        &Address::Unix(sock.clone()),
        slow(opts(CopyMode::Background)),
    )
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        || job.stats().bytes_copied > 0,
        || "nothing copied in 10 s".into(),
    );
    let c = job.cancel().unwrap();
    assert_eq!(c.phase, Phase::Bulk);
    drop(k);
    // Ready.
    let sock2 = dir.path().join("s.sock");
    let (h, _) = our_server(dir.path(), DISK, &sock2);
    let job = Mirror::start(
        open(&src),
        &Address::Unix(sock2.clone()),
        opts(CopyMode::Background),
    )
    .unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    let c = job.cancel().unwrap();
    assert_eq!(c.phase, Phase::Ready);
    // Reconnecting: the target goes away after ready.
    let job = Mirror::start(
        open(&src),
        &Address::Unix(sock2),
        opts(CopyMode::Background),
    )
    .unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    h.shutdown();
    job.handle().note_write(0, 1);
    wait_until(
        Duration::from_secs(10),
        || matches!(job.phase(), Phase::Reconnecting { .. }),
        || format!("never reconnecting: {}", job.phase()),
    );
    let c = job.cancel().unwrap();
    assert!(matches!(c.phase, Phase::Reconnecting { .. }), "{}", c.phase);
    assert!(read_all(&src) == before, "the source was changed");
}

#[test]
fn a_cut_mid_copy_and_after_ready_is_reconnected_and_ends_equal() {
    if !require("a_cut_mid_copy_and_after_ready", &["nbdkit"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dense_source(dir.path());
    let (k, sock, tgt) = capped_nbdkit(dir.path(), "16M");
    let mut o = slow(opts(CopyMode::Background));
    let ev = events(&mut o);
    let (job, w) = start_with_writers(
        &src,
        &Address::Unix(sock.clone()),
        o,
        2,
        Duration::from_millis(1),
    );
    wait_until(
        Duration::from_secs(10),
        || job.stats().bytes_copied >= 256 << 10,
        || "nothing copied in 10 s".into(),
    );
    assert_eq!(job.phase(), Phase::Bulk, "the cut must come mid-copy");
    // Kill the target and bring it back on the same socket.
    let k = restart_nbdkit(k, &sock, &tgt);
    job.wait_ready(Duration::from_secs(20)).unwrap();
    // And once more after ready, with the writers still going.
    let k = restart_nbdkit(k, &sock, &tgt);
    wait_until(
        Duration::from_secs(10),
        || job.stats().reconnects >= 2,
        || format!("no second reconnection: {}", job.phase()),
    );
    w.stop();
    let stats = job.complete().unwrap();
    drop(k);
    assert_same(&src, &tgt);
    assert_eq!(stats.reconnects, 2);
    let ev = ev.lock().unwrap();
    assert!(
        ev.iter()
            .any(|e| matches!(e, MirrorEvent::ConnectionLost { .. }))
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, MirrorEvent::Reconnected { .. }))
    );
}

/// Stops or resumes a child by its PID (SIGSTOP keeps its connections open and
/// unanswered: a hung server, not a dead one).
fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Resumes a stopped child however the test ends, so that its guard can reap it.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

/// The target, a separate process (our server, then qemu-nbd), is stopped with SIGSTOP
/// mid-copy: its connections stay open and unanswered, as with a hung server. The mirror
/// hangs up after the reply timeout, waits for the resumed server to close the old
/// connections (so that nothing they carried lands after the re-copy) and ends equal.
#[test]
fn a_target_that_stops_answering_is_hung_up_after_the_reply_timeout_and_reconnected() {
    stopped_target_case("ours", |tgt, sock| serve_ours(tgt, sock, &[]));
    if require("a_target_that_stops_answering (qemu-nbd)", &["qemu-nbd"]) {
        stopped_target_case("qemu-nbd", |tgt, sock| serve_qemu_nbd(tgt, sock, &[]));
    }
}

fn stopped_target_case(name: &str, serve: impl Fn(&Path, &Path) -> ChildGuard) {
    let dir = tempfile::tempdir().unwrap();
    let src = dense_source(dir.path());
    let tgt = empty_target(dir.path());
    let sock = dir.path().join("h.sock");
    let q = serve(&tgt, &sock);
    let mut o = slow(opts(CopyMode::WriteBlocking));
    o.config.reply_timeout = Duration::from_millis(300);
    let ev = events(&mut o);
    // Write-blocking writers: whether the stop catches bulk copies or only guest writes,
    // something waits on the target.
    let (job, w) = start_with_writers(
        &src,
        &Address::Unix(sock.clone()),
        o,
        2,
        Duration::from_millis(1),
    );
    signal(q.pid(), "-STOP");
    let resume = Resume(q.pid());
    let stalled = || {
        ev.lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, MirrorEvent::TargetStalled(_)))
    };
    wait_until(Duration::from_secs(10), stalled, || {
        format!(
            "{name}: a stopped target was never timed out: {}",
            job.phase()
        )
    });
    assert!(
        matches!(job.phase(), Phase::Reconnecting { .. }),
        "{name}: {}",
        job.phase()
    );
    // A stopped server completes no handshake, and its hung connections are still open.
    assert_eq!(job.stats().reconnects, 0, "{name}");
    drop(resume);
    job.wait_ready(Duration::from_secs(20)).unwrap();
    w.stop();
    let stats = job.complete().unwrap();
    drop(q);
    assert_same(&src, &tgt);
    assert!(stats.reconnects >= 1, "{name}: {stats:?}");
    let ev = ev.lock().unwrap();
    let pos = |f: &dyn Fn(&MirrorEvent) -> bool| ev.iter().position(f);
    let stall = pos(&|e| matches!(e, MirrorEvent::TargetStalled(s) if s.unanswered > 0));
    let lost = pos(&|e| matches!(e, MirrorEvent::ConnectionLost { .. }));
    let back = pos(&|e| matches!(e, MirrorEvent::Reconnected { .. }));
    assert!(
        stall.is_some() && stall < lost && lost < back,
        "{name}: {ev:?}"
    );
}

/// The target stops while the mirror is idle in sync, then a guest write makes a copy
/// larger than the socket's buffer: the thread that sends it blocks, and nothing waits on
/// a reply yet, so the reply timeout must still be watched (by the thread that completes
/// replies).
#[test]
fn a_target_that_stops_while_a_large_copy_is_being_sent_is_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let src = dense_source(dir.path());
    let tgt = empty_target(dir.path());
    let sock = dir.path().join("l.sock");
    let q = serve_ours(&tgt, &sock, &[]);
    let mut o = opts(CopyMode::Background);
    o.config.reply_timeout = Duration::from_millis(300);
    let ev = events(&mut o);
    let job = Mirror::start(open(&src), &Address::Unix(sock), o).unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    signal(q.pid(), "-STOP");
    let resume = Resume(q.pid());
    // Whole default-size copies (1 MiB), each more than a unix socket buffers.
    job.handle().note_write(0, 3 << 20);
    wait_until(
        Duration::from_secs(10),
        || {
            ev.lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, MirrorEvent::TargetStalled(_)))
        },
        || {
            format!(
                "a copy blocked in sending was never timed out: {}",
                job.phase()
            )
        },
    );
    drop(resume);
    job.wait_ready(Duration::from_secs(20)).unwrap();
    let stats = job.complete().unwrap();
    drop(q);
    assert_same(&src, &tgt);
    assert!(stats.reconnects >= 1, "{stats:?}");
}

/// A guest's discard of megabytes, in write-blocking mode: the target is zeroed before
/// the call returns, in requests it can take.
#[test]
fn a_large_zeroing_in_write_blocking_mode_reaches_the_target_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let src = dense_source(dir.path());
    let tgt = empty_target(dir.path());
    let sock = dir.path().join("z.sock");
    let q = serve_ours(&tgt, &sock, &[]);
    let job = Mirror::start(
        open(&src),
        &Address::Unix(sock),
        opts(CopyMode::WriteBlocking),
    )
    .unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    let before = job.stats().blocking_writes;
    // The source's first 3 MiB, all data, become a hole; the guest's device says so.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    // SAFETY: fallocate on a descriptor this test owns, inside the file.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            3 << 20,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    job.handle().note_zeroes(0, 3 << 20);
    assert_eq!(job.stats().blocking_writes, before + 1);
    let stats = job.complete().unwrap();
    drop(q);
    assert_same(&src, &tgt);
    assert_eq!(stats.reconnects, 0, "{stats:?}");
}

#[test]
fn a_target_that_never_comes_back_fails_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let sock = dir.path().join("s.sock");
    let (h, _) = our_server(dir.path(), DISK, &sock);
    let mut o = opts(CopyMode::Background);
    o.config.reconnect_window = Duration::from_millis(700);
    let job = Mirror::start(open(&src), &Address::Unix(sock), o).unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    h.shutdown();
    job.handle().note_write(0, 1);
    let p = job.wait_finished_for(Duration::from_secs(10));
    assert!(matches!(p, Phase::Failed(_)), "{p}");
    let e = job.error().expect("an error");
    let msg = e.to_string();
    assert!(matches!(e, MirrorError::TargetUnreachable { .. }), "{e:?}");
    assert!(msg.contains("stayed unreachable for 700ms"), "{msg}");
    assert!(msg.contains("last error"), "{msg}");
    assert!(matches!(
        job.complete(),
        Err(MirrorError::TargetUnreachable { .. })
    ));
}

#[test]
fn target_errors_from_the_nbdkit_error_filter_name_offset_and_length() {
    if !require("target_errors_from_the_nbdkit_error_filter", &["nbdkit"]) {
        return;
    }
    for (errno, name) in [("EIO", "EIO"), ("ENOSPC", "ENOSPC")] {
        let dir = tempfile::tempdir().unwrap();
        let src = source_file(dir.path());
        let sock = dir.path().join("e.sock");
        let _k = serve_nbdkit(
            &sock,
            &[
                "--filter=error",
                "memory",
                &format!("size={DISK}"),
                &format!("error-pwrite={errno}"),
                "error-pwrite-rate=100%",
            ],
        );
        let job =
            Mirror::start(open(&src), &Address::Unix(sock), opts(CopyMode::Background)).unwrap();
        let e = job.wait_ready(Duration::from_secs(10)).unwrap_err();
        match &e {
            MirrorError::Target {
                offset,
                len,
                source,
            } => {
                assert!(*len > 0 && offset % (64 << 10) == 0, "{e}");
                assert_eq!(source.nbd_errno().map(|x| x.name()), Some(name), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("offset") && msg.contains("length") && msg.contains(name),
            "{msg}"
        );
    }
}

#[test]
fn a_target_smaller_than_the_source_is_refused_before_copying() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let sock = dir.path().join("s.sock");
    let (_h, tgt) = our_server(dir.path(), DISK - 4096, &sock);
    let e =
        Mirror::start(open(&src), &Address::Unix(sock), opts(CopyMode::Background)).unwrap_err();
    assert!(
        matches!(
            e,
            MirrorError::TargetTooSmall {
                target_size,
                source_size: DISK,
                ..
            } if target_size == DISK - 4096
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("nothing was copied"));
    assert_eq!(allocated(&tgt), 0, "the target was written");
}

#[test]
fn a_memory_disk_source_mirrors_too() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let (_h, tgt) = our_server(dir.path(), 1 << 20, &sock);
    let mem = Arc::new(MemoryDisk::new(1 << 20));
    mem.write_at(&pattern(3, 100_000), 300_000).unwrap();
    let src: Arc<dyn BlockBackend> = mem.clone();
    let job = Mirror::start(
        src.clone(),
        &Address::Unix(sock),
        opts(CopyMode::WriteBlocking),
    )
    .unwrap();
    let disk = MirroredDisk::new(src, job.handle());
    disk.write_at(&pattern(4, 5000), 10).unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    disk.write_at(&pattern(5, 7000), 900_000).unwrap();
    disk.write_zeroes(300_000, 50_000).unwrap();
    job.complete().unwrap();
    assert!(read_all(&tgt) == mem.contents(), "target differs");
}

/// The destination holds an older copy of the disk; the source changed some clusters
/// since and kept a persistent bitmap of them: an incremental mirror copies those alone,
/// plus what the writers write during it, and the target ends equal.
#[test]
fn an_incremental_mirror_copies_only_what_changed_since_the_base() {
    use migration_nbd::mirror::PersistentBitmap;
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    // The older copy: the source as it was at the base.
    let tgt = dir.path().join("target.img");
    std::fs::copy(&src, &tgt).unwrap();
    let g = MirrorConfig::default().granularity;
    let mut bitmap =
        PersistentBitmap::create(&dir.path().join("source.bitmap"), DISK, g, [5; 16]).unwrap();
    // Since then: two ranges written, one of them in a hole.
    let source = open(&src);
    for (off, len) in [(100_000u64, 5000usize), (3_500_000, 70_000)] {
        source.write_at(&pattern(off, len), off).unwrap();
        bitmap.mark(off, len as u64);
    }
    bitmap.close().unwrap();
    let dirty = PersistentBitmap::peek(&dir.path().join("source.bitmap"))
        .unwrap()
        .bits;
    let changed = dirty.count() as u64 * g;
    let sock = dir.path().join("t.sock");
    let (_server, tgt) = our_server(dir.path(), DISK, &sock);
    let mut o = opts(CopyMode::Background);
    o.config.target_is_zero = false;
    o.incremental = Some(dirty);
    let job = Mirror::start(source.clone(), &Address::Unix(sock), o).unwrap();
    job.wait_ready(Duration::from_secs(20)).unwrap();
    // Only the changed clusters went over, whole: as data, or as zeroes where they hold
    // holes (the target holds old data there, so a hole is zeroed, not skipped).
    let s = job.stats();
    assert_eq!(s.bytes_copied + s.bytes_zeroed, changed, "{s:?}");
    assert!(
        s.bytes_holes > 0 && s.bytes_holes <= s.bytes_zeroed,
        "{s:?}"
    );
    assert_eq!(s.bytes_recopied, 0, "{s:?}");
    // From ready on, guest writes are mirrored as in a full copy.
    let w = Writers::start(&job, source, 1, Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(100));
    assert!(w.stop() > 0);
    job.complete().unwrap();
    assert_same(&src, &tgt);
}

/// A source that counts its allocation look-ups and, when the bulk copy reads at
/// [`Shifting::GATE`], stops there until the test has changed allocations inside the data
/// run the mirror has just looked up.
struct Shifting {
    inner: MemoryDisk,
    runs: std::sync::atomic::AtomicUsize,
    at_gate: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    go: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl Shifting {
    const GATE: u64 = 2 << 20;
}

impl BlockBackend for Shifting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == Self::GATE {
            if let Some(tx) = self.at_gate.lock().unwrap().take() {
                tx.send(()).unwrap();
                let rx = self.go.lock().unwrap().take().unwrap();
                rx.recv().unwrap();
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn extents(
        &self,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Vec<migration_nbd::backend::Extent>> {
        self.inner.extents(offset, len)
    }
    fn run_at(&self, offset: u64) -> std::io::Result<migration_nbd::backend::Extent> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.inner.run_at(offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(data, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The mirror looks a data run up once, not once per copy (that made a fully written
/// disk's bulk copy quadratic on tmpfs), and what it remembers stays right when the
/// source's allocation changes under it: inside the remembered run, a guest trims a range
/// (and says so) and the file system deallocates one that held zeroes (telling no one);
/// the target, full of other bytes at the start, must end equal to the source.
#[test]
fn a_data_run_is_looked_up_once_and_holes_punched_in_it_later_are_copied_as_zeroes() {
    const SIZE: u64 = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    std::fs::write(dir.path().join("target.img"), vec![0x55u8; SIZE as usize]).unwrap();
    let (_h, tgt) = our_server(dir.path(), SIZE, &sock);
    let inner = MemoryDisk::new(SIZE as usize);
    inner.write_at(&pattern(9, SIZE as usize), 0).unwrap();
    // Allocated, but zeroes: what a file system may turn into a hole by itself.
    inner.write_at(&vec![0u8; 1 << 20], 10 << 20).unwrap();
    let (gate_tx, gate_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let src = Arc::new(Shifting {
        inner,
        runs: Default::default(),
        at_gate: Mutex::new(Some(gate_tx)),
        go: Mutex::new(Some(go_rx)),
    });
    let mut o = opts(CopyMode::Background);
    o.config.target_is_zero = false;
    let job = Mirror::start(src.clone(), &Address::Unix(sock), o).unwrap();
    gate_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the bulk copy reached the gate");
    let looked_up = src.runs.load(Ordering::Relaxed);
    src.inner.write_zeroes(8 << 20, 512 << 10).unwrap();
    job.handle().note_write(8 << 20, 512 << 10);
    src.inner.write_zeroes(10 << 20, 1 << 20).unwrap();
    assert!(
        src.inner.run_at(10 << 20).unwrap().hole,
        "the deallocation made a hole"
    );
    go_tx.send(()).unwrap();
    job.wait_ready(Duration::from_secs(20)).unwrap();
    let stats = job.complete().unwrap();
    assert_eq!(looked_up, 1, "three copies into one data run, one look-up");
    // 32 copies of 1 MiB; the data runs are at most 16 MiB (MemoryDisk's look-up bound),
    // and the trim and the hole split them: a handful of look-ups, not one per copy.
    let runs = src.runs.load(Ordering::Relaxed);
    assert!(runs <= 8, "{runs} look-ups for 32 copies");
    // The deallocated MiB was still known as data: read, found zero, zeroed on the target.
    assert_eq!(
        (stats.bytes_holes, stats.bytes_zeroed),
        (0, 1 << 20),
        "{stats:?}"
    );
    assert!(read_all(&tgt) == src.inner.contents(), "target differs");
}

/// A peer that accepts connections and never says a word (a hung or stopped server, or
/// something else listening there): the kernel completes the accept by itself.
fn silent_listener(sock: &Path) -> Arc<Mutex<Vec<std::os::unix::net::UnixStream>>> {
    let _ = std::fs::remove_file(sock);
    let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    // Left running: it holds what it accepted until the test process ends.
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            h.lock().unwrap().push(c);
        }
    });
    held
}

fn quick_connect(mut o: MirrorOptions) -> MirrorOptions {
    o.client.connect_timeout = Some(Duration::from_millis(300));
    o
}

/// Starting a mirror against a peer that accepts and never answers fails with the
/// handshake timeout instead of waiting forever.
#[test]
fn starting_against_a_silent_peer_fails_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let sock = dir.path().join("s.sock");
    let held = silent_listener(&sock);
    let (tx, rx) = std::sync::mpsc::channel();
    let s = sock.clone();
    std::thread::spawn(move || {
        let r = Mirror::start(
            open(&src),
            &Address::Unix(s),
            quick_connect(opts(CopyMode::Background)),
        );
        tx.send(r.map(|_| ())).unwrap();
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("Mirror::start still waiting on a silent peer");
    let e = r.expect_err("a silent peer is no target");
    let msg = e.to_string();
    assert!(
        matches!(&e, MirrorError::Connect { source: migration_nbd::ClientError::Handshake { source, .. }, .. }
            if matches!(**source, migration_nbd::NegotiationError::TimedOut { .. })),
        "{e:?}"
    );
    assert!(
        msg.contains("did not finish the negotiation within 300ms"),
        "{msg}"
    );
    assert_eq!(held.lock().unwrap().len(), 1, "it did connect");
}

/// A target replaced, while the mirror reconnects, by a peer that accepts and never
/// answers: each reconnection gives up after the connect timeout, and the job fails at
/// the end of its reconnection window, saying why, instead of hanging in a handshake.
#[test]
fn reconnecting_to_a_silent_peer_times_out_and_the_window_ends_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_file(dir.path());
    let sock = dir.path().join("s.sock");
    let (h, _) = our_server(dir.path(), DISK, &sock);
    let mut o = quick_connect(opts(CopyMode::Background));
    o.config.reconnect_window = Duration::from_millis(1500);
    let job = Mirror::start(open(&src), &Address::Unix(sock.clone()), o).unwrap();
    job.wait_ready(Duration::from_secs(10)).unwrap();
    h.shutdown();
    let held = silent_listener(&sock);
    job.handle().note_write(0, 1);
    let p = job.wait_finished_for(Duration::from_secs(20));
    assert!(
        matches!(p, Phase::Failed(_)),
        "still {p} with a silent peer"
    );
    let e = job.error().expect("an error");
    let msg = e.to_string();
    assert!(matches!(e, MirrorError::TargetUnreachable { .. }), "{e:?}");
    assert!(
        msg.contains("did not finish the negotiation within 300ms"),
        "{msg}"
    );
    assert!(!held.lock().unwrap().is_empty(), "it tried the silent peer");
}
