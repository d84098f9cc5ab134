//! Helpers shared by the interop tests: finding tools, starting servers as child processes
//! (killed by PID when the guard drops), waiting for their sockets with a deadline, and
//! building sparse files with known contents.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the Debian packages put the Python that has the `nbd` module (a pyenv `python3`
/// first on PATH would not have it, and `nbdsh` runs whichever `python3` comes first).
pub const SYSTEM_PATH_FIRST: &str = "/usr/bin:/bin";

pub fn path_with_system_first() -> String {
    format!(
        "{SYSTEM_PATH_FIRST}:{}",
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// True when every tool is present; otherwise prints one line saying why the test skips.
pub fn require(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<_> = tools.iter().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        true
    } else {
        eprintln!(
            "skipping {test}: {missing:?} not installed (scripts/setup.sh installs qemu-utils, libnbd-bin, nbdkit, python3-libnbd)"
        );
        false
    }
}

/// Whether `nbdsh` can import the `nbd` Python module.
pub fn have_nbdsh(test: &str) -> bool {
    if !require(test, &["nbdsh"]) {
        return false;
    }
    let ok = Command::new("nbdsh")
        .env("PATH", path_with_system_first())
        .args(["-c", "pass"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping {test}: nbdsh cannot import the nbd module (python3-libnbd)");
    }
    ok
}

/// A child process killed (by its PID) and reaped when dropped.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` as a guarded child.
pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    ChildGuard {
        child,
        name: name.to_string(),
    }
}

/// Waits until a unix socket accepts connections, or panics at the deadline.
pub fn wait_for_socket(guard: &mut ChildGuard, path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if path.exists() && UnixStream::connect(path).is_ok() {
            return;
        }
        if let Ok(Some(status)) = guard.child.try_wait() {
            panic!("{} exited with {status} before listening", guard.name);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {} within 20 s",
            guard.name,
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn our_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_migration-nbd"))
}

/// Starts `migration-nbd serve` on a unix socket with extra arguments.
pub fn serve_ours(file: &Path, sock: &Path, extra: &[&str]) -> ChildGuard {
    let mut cmd = Command::new(our_binary());
    cmd.arg("serve")
        .arg(file)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(extra);
    let mut g = spawn("migration-nbd serve", &mut cmd);
    wait_for_socket(&mut g, sock);
    g
}

/// Starts `migration-nbd serve` on 127.0.0.1 port 0 and returns the port it got.
pub fn serve_ours_tcp(file: &Path, extra: &[&str]) -> (ChildGuard, u16) {
    let mut cmd = Command::new(our_binary());
    cmd.arg("serve")
        .arg(file)
        .args(["--listen", "tcp:127.0.0.1:0", "--print-address"])
        .args(extra)
        .stdout(Stdio::piped());
    let mut g = spawn("migration-nbd serve (tcp)", &mut cmd);
    let out = g.child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("reading the address");
    let port = line
        .trim()
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no address printed: {line:?}"));
    (g, port)
}

/// Starts `qemu-nbd` on a unix socket (persistent, several clients).
pub fn serve_qemu_nbd(file: &Path, sock: &Path, extra: &[&str]) -> ChildGuard {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-t", "--shared=16", "-k"])
        .arg(sock)
        .args(extra)
        .arg(file);
    let mut g = spawn("qemu-nbd", &mut cmd);
    wait_for_socket(&mut g, sock);
    g
}

/// Starts `nbdkit` in the foreground on a unix socket with a plugin and its arguments.
pub fn serve_nbdkit(sock: &Path, plugin_args: &[&str]) -> ChildGuard {
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-U"]).arg(sock).args(plugin_args);
    let mut g = spawn("nbdkit", &mut cmd);
    wait_for_socket(&mut g, sock);
    g
}

pub fn unix_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Deterministic bytes (xorshift) so that files can be rebuilt and compared.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse file of `size` bytes with data at each `(offset, len)` and holes elsewhere.
pub fn make_sparse(path: &Path, size: u64, data: &[(u64, usize)]) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create test file");
    f.set_len(size).expect("set_len");
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 7, len), off)
            .expect("write test data");
    }
    f.sync_all().expect("sync");
}

/// The layout most tests use: 64 MiB, three data runs, holes around them.
pub const SIZE: u64 = 64 << 20;
pub const DATA: &[(u64, usize)] = &[
    (1 << 20, 3 << 20),
    (20 << 20, 1 << 20),
    (50 << 20, 512 << 10),
];

pub fn data_bytes() -> u64 {
    DATA.iter().map(|&(_, l)| l as u64).sum()
}

/// Bytes the filesystem really allocated for a file.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Panics with the first differing offset when the files differ.
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (read_all(a), read_all(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at offset {i}", a.display(), b.display());
    }
}

/// Holes were kept: the copy did not allocate much more than the data it holds (the
/// filesystem may round each run up to its block size).
pub fn assert_sparse(path: &Path, data: u64) {
    let a = allocated(path);
    assert!(
        a <= data + (1 << 20),
        "{} allocates {a} bytes for {data} bytes of data: holes were filled",
        path.display()
    );
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn create_empty(path: &Path, size: u64) {
    let f = File::create(path).expect("create");
    f.set_len(size).expect("set_len");
}
