//! Copies between files and NBD exports, keeping holes as holes (what
//! `migration-nbd copy` runs).
//!
//! The source's allocation map (from `SEEK_DATA`/`SEEK_HOLE` for files, `BLOCK_STATUS`
//! for NBD) splits the copy into data and zero runs; data runs are read and written in
//! requests of [`CopyOptions::request_size`] with many in flight, and data that reads as all
//! zeroes is written as zeroes too. Zero runs become holes on the destination (punched for
//! files, `WRITE_ZEROES` for NBD) unless it is known to be zero already.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::addr::NbdUri;
use crate::backend::{Extent, FileBackend};
use crate::client::{ClientError, ClientOptions, ClientPool, Ticket, ZeroFlags};

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A local file or block device.
    File(PathBuf),
    /// An NBD export.
    Nbd(NbdUri),
}

impl std::str::FromStr for Endpoint {
    type Err = crate::addr::AddressError;

    /// NBD URIs (`nbd://`, `nbd+unix://`) are exports, anything else a file name.
    fn from_str(s: &str) -> Result<Endpoint, Self::Err> {
        if NbdUri::is_uri(s) {
            Ok(Endpoint::Nbd(s.parse()?))
        } else {
            Ok(Endpoint::File(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::File(p) => write!(f, "{}", p.display()),
            Endpoint::Nbd(u) => write!(f, "export {:?} at {}", u.export, u.address),
        }
    }
}

/// Copy tuning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Connections per NBD side (used only when the server offers multi-conn).
    pub connections: usize,
    /// Requests in flight per connection.
    pub requests: usize,
    /// Bytes per read/write request.
    pub request_size: u32,
    /// The destination already reads as zeroes: zero runs are skipped entirely.
    pub destination_is_zero: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            connections: 4,
            // nbdcopy's shape: more, smaller requests keep the server's workers and the
            // socket busy; against qemu-nbd in /dev/shm, 1 GiB, same run (BENCHMARKS.md):
            // 16 x 1 MiB wrote at 0.71x nbdcopy's rate, 64 x 256 KiB at 1.43x.
            requests: 64,
            request_size: 256 << 10,
            destination_is_zero: false,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySummary {
    /// Size of the source.
    pub size: u64,
    /// Bytes read and written as data.
    pub bytes_copied: u64,
    /// Bytes not copied because they were holes or zeroes.
    pub bytes_skipped: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl CopySummary {
    /// Source bytes per second.
    pub fn throughput(&self) -> f64 {
        self.size as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for CopySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "copied {} bytes, skipped {} bytes of holes/zeroes, size {} bytes, {:.3} s, {:.1} MiB/s",
            self.bytes_copied,
            self.bytes_skipped,
            self.size,
            self.elapsed.as_secs_f64(),
            self.throughput() / (1024.0 * 1024.0)
        )
    }
}

/// A copy that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// A local file failed.
    #[error("{path}: {source}")]
    File {
        /// File.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// An NBD side failed.
    #[error("{endpoint}: {source}")]
    Nbd {
        /// Which side.
        endpoint: String,
        /// Why.
        source: ClientError,
    },
    /// The destination cannot hold the source.
    #[error("destination {dst} has {dst_size} bytes, source needs {src_size}")]
    TooSmall {
        /// Destination.
        dst: String,
        /// Its size.
        dst_size: u64,
        /// Source size.
        src_size: u64,
    },
}

enum Side {
    File(FileBackend, String),
    Nbd(ClientPool, String),
}

impl Side {
    fn size(&self) -> u64 {
        match self {
            Side::File(f, _) => f.size(),
            Side::Nbd(p, _) => p.first().size(),
        }
    }

    fn file_err(path: &str) -> impl Fn(io::Error) -> CopyError + '_ {
        move |source| CopyError::File {
            path: path.to_string(),
            source,
        }
    }

    fn nbd_err(name: &str) -> impl Fn(ClientError) -> CopyError + '_ {
        move |source| CopyError::Nbd {
            endpoint: name.to_string(),
            source,
        }
    }

    /// Allocation map of `[offset, offset + length)`, maybe shorter.
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, CopyError> {
        match self {
            Side::File(f, name) => f
                .extents(offset, length, 4096)
                .map_err(Self::file_err(name)),
            Side::Nbd(p, name) => {
                let c = p.first();
                let len = length.min(1 << 30) as u32;
                if !c.can_block_status() {
                    return Ok(vec![Extent {
                        offset,
                        length: len as u64,
                        hole: false,
                    }]);
                }
                let ext = c.block_status(offset, len).map_err(Self::nbd_err(name))?;
                let end = offset + length;
                Ok(ext
                    .into_iter()
                    .take_while(|e| e.offset < end)
                    .map(|e| Extent {
                        offset: e.offset,
                        length: e.length.min(end - e.offset),
                        hole: e.is_zero(),
                    })
                    .collect())
            }
        }
    }
}

enum Stage {
    Read(Ticket<Bytes>, u64),
    Write(Ticket<()>),
}

fn is_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.split_at(data.len() / 8 * 8);
    chunks
        .chunks_exact(8)
        .all(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// One piece of work: data to copy, or a run to zero on the destination.
#[derive(Debug, Clone, Copy)]
enum Work {
    Data(u64, u32),
    Zero(u64, u64),
}

/// Hands out work in source order to the copy threads, asking the source for its
/// allocation map as it goes.
struct Planner<'a> {
    src: &'a Side,
    size: u64,
    pos: u64,
    extents: VecDeque<Extent>,
    request: u32,
    skipped_holes: u64,
}

impl Planner<'_> {
    fn next(&mut self) -> Result<Option<Work>, CopyError> {
        loop {
            if let Some(e) = self.extents.front_mut() {
                if e.length == 0 {
                    self.extents.pop_front();
                    continue;
                }
                let w = if e.hole {
                    self.skipped_holes += e.length;
                    let w = Work::Zero(e.offset, e.length);
                    e.length = 0;
                    w
                } else {
                    let n = e.length.min(self.request as u64);
                    let w = Work::Data(e.offset, n as u32);
                    e.offset += n;
                    e.length -= n;
                    w
                };
                return Ok(Some(w));
            }
            if self.pos >= self.size {
                return Ok(None);
            }
            let ext = self.src.extents(self.pos, self.size - self.pos)?;
            let Some(last) = ext.last() else {
                return Ok(None);
            };
            self.pos = last.offset + last.length;
            self.extents.extend(ext);
        }
    }
}

/// One copy thread: its own connection on each NBD side and its own window of requests
/// in flight.
struct Copier<'a> {
    src: &'a Side,
    dst: &'a Side,
    conn: usize,
    dst_zero: bool,
    window: VecDeque<Stage>,
    max_window: usize,
    copied: u64,
    zero_data: u64,
    buf: Vec<u8>,
    /// Buffers of completed reads, reused for the next ones.
    spare: Vec<bytes::BytesMut>,
}

impl Copier<'_> {
    fn client<'p>(&self, p: &'p ClientPool) -> &'p crate::client::Client {
        &p.clients()[self.conn % p.clients().len()]
    }

    fn wait_one(&mut self) -> Result<(), CopyError> {
        match self.window.pop_front() {
            Some(Stage::Read(t, offset)) => {
                let Side::Nbd(_, name) = self.src else {
                    unreachable!("reads in flight come from NBD sources")
                };
                let data = t.wait().map_err(Side::nbd_err(name))?;
                let r = self.put(offset, &data);
                if let Ok(b) = data.try_into_mut() {
                    self.spare.push(b);
                }
                r
            }
            Some(Stage::Write(t)) => {
                let Side::Nbd(_, name) = self.dst else {
                    unreachable!("writes in flight go to NBD destinations")
                };
                t.wait().map_err(Side::nbd_err(name))
            }
            None => Ok(()),
        }
    }

    fn drain(&mut self) -> Result<(), CopyError> {
        while !self.window.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }

    fn make_room(&mut self) -> Result<(), CopyError> {
        while self.window.len() >= self.max_window {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Writes data that was read (or zeroes when it is all zero).
    fn put(&mut self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        if is_zero(data) {
            self.zero_data += data.len() as u64;
            return self.zero(offset, data.len() as u64);
        }
        self.copied += data.len() as u64;
        match self.dst {
            Side::File(f, name) => f.write_at(data, offset).map_err(Side::file_err(name)),
            Side::Nbd(p, name) => {
                self.make_room()?;
                let t = self
                    .client(p)
                    .submit_write(offset, data, false)
                    .map_err(Side::nbd_err(name))?;
                self.window.push_back(Stage::Write(t));
                Ok(())
            }
        }
    }

    fn zero(&mut self, offset: u64, length: u64) -> Result<(), CopyError> {
        if self.dst_zero || length == 0 {
            return Ok(());
        }
        match self.dst {
            Side::File(f, name) => {
                f.write_zeroes(offset, length, false, false)
                    .map_err(|e| match e {
                        crate::backend::ZeroError::Io(e) => Side::file_err(name)(e),
                        crate::backend::ZeroError::NotFast => {
                            Side::file_err(name)(io::Error::other("zeroing refused"))
                        }
                    })
            }
            Side::Nbd(p, name) => {
                let c = self.client(p);
                let mut done = 0;
                while done < length {
                    self.make_room()?;
                    let (t, n) = if c.can_zero() {
                        let n = (length - done).min(1 << 30) as u32;
                        (
                            c.submit_write_zeroes(offset + done, n, ZeroFlags::default()),
                            n,
                        )
                    } else {
                        // No WRITE_ZEROES: write real zeroes.
                        let n = (length - done).min(1 << 20) as u32;
                        let zeroes = vec![0u8; n as usize];
                        (c.submit_write(offset + done, &zeroes, false), n)
                    };
                    self.window
                        .push_back(Stage::Write(t.map_err(Side::nbd_err(name))?));
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    fn data(&mut self, at: u64, n: u32) -> Result<(), CopyError> {
        match self.src {
            Side::File(f, name) => {
                self.buf.resize(n as usize, 0);
                let mut buf = std::mem::take(&mut self.buf);
                f.read_at(&mut buf, at).map_err(Side::file_err(name))?;
                let r = self.put(at, &buf);
                self.buf = buf;
                r
            }
            Side::Nbd(p, name) => {
                self.make_room()?;
                let buf = self.spare.pop().unwrap_or_default();
                let t = self
                    .client(p)
                    .submit_read_into(at, n, buf)
                    .map_err(Side::nbd_err(name))?;
                self.window.push_back(Stage::Read(t, at));
                Ok(())
            }
        }
    }

    fn work(&mut self, w: Work) -> Result<(), CopyError> {
        match w {
            Work::Data(at, n) => self.data(at, n),
            Work::Zero(at, n) => self.zero(at, n),
        }
    }
}

fn open(
    ep: &Endpoint,
    write: bool,
    opts: &CopyOptions,
    size: Option<u64>,
) -> Result<(Side, bool), CopyError> {
    match ep {
        Endpoint::File(path) => {
            let name = path.display().to_string();
            let mut known_zero = false;
            if let Some(size) = size {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(Side::file_err(&name))?;
                let meta = f.metadata().map_err(Side::file_err(&name))?;
                if meta.file_type().is_file() {
                    // A fresh sparse file: every hole of the source is already a hole.
                    f.set_len(0).map_err(Side::file_err(&name))?;
                    f.set_len(size).map_err(Side::file_err(&name))?;
                    known_zero = true;
                }
            }
            let b = FileBackend::open(path, !write, false).map_err(Side::file_err(&name))?;
            Ok((Side::File(b, name), known_zero))
        }
        Endpoint::Nbd(uri) => {
            let name = format!("nbd export {:?} at {}", uri.export, uri.address);
            let copts = ClientOptions {
                max_in_flight: opts.requests.max(1),
                ..ClientOptions::default()
            };
            let pool = ClientPool::connect(&uri.address, &uri.export, &copts, opts.connections)
                .map_err(Side::nbd_err(&name))?;
            Ok((Side::Nbd(pool, name), false))
        }
    }
}

/// Copies `src` to `dst`. A file destination is created (or truncated) to the source size;
/// an NBD destination must be at least as large. One thread per connection (or per
/// [`CopyOptions::connections`] for file-to-file copies) takes pieces of the source in
/// order, each with up to [`CopyOptions::requests`] requests in flight.
pub fn copy(src: &Endpoint, dst: &Endpoint, opts: &CopyOptions) -> Result<CopySummary, CopyError> {
    let start = Instant::now();
    let (src_side, _) = open(src, false, opts, None)?;
    let size = src_side.size();
    let (dst_side, known_zero) = open(dst, true, opts, Some(size))?;
    if dst_side.size() < size {
        return Err(CopyError::TooSmall {
            dst: dst.to_string(),
            dst_size: dst_side.size(),
            src_size: size,
        });
    }
    let threads = match (&src_side, &dst_side) {
        (Side::Nbd(a, _), Side::Nbd(b, _)) => a.clients().len().max(b.clients().len()),
        (Side::Nbd(p, _), _) | (_, Side::Nbd(p, _)) => p.clients().len(),
        _ => opts.connections.max(1),
    };
    let planner = std::sync::Mutex::new(Planner {
        src: &src_side,
        size,
        pos: 0,
        extents: VecDeque::new(),
        request: opts
            .request_size
            .clamp(4096, crate::proto::DEFAULT_MAX_PAYLOAD),
        skipped_holes: 0,
    });
    let dst_zero = known_zero || opts.destination_is_zero;
    let results: Vec<Result<(u64, u64), CopyError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|conn| {
                let planner = &planner;
                let (src, dst) = (&src_side, &dst_side);
                scope.spawn(move || {
                    let mut c = Copier {
                        src,
                        dst,
                        conn,
                        dst_zero,
                        window: VecDeque::new(),
                        max_window: opts.requests.max(1),
                        copied: 0,
                        zero_data: 0,
                        buf: Vec::new(),
                        spare: Vec::new(),
                    };
                    loop {
                        let next = planner.lock().expect("planner lock").next()?;
                        let Some(w) = next else { break };
                        c.work(w)?;
                    }
                    c.drain()?;
                    Ok((c.copied, c.zero_data))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("copy thread panicked"))
            .collect()
    });
    let (mut copied, mut skipped) = (0, 0);
    for r in results {
        let (c, z) = r?;
        copied += c;
        skipped += z;
    }
    skipped += planner.into_inner().expect("planner lock").skipped_holes;
    match &dst_side {
        Side::File(f, name) => f.flush().map_err(Side::file_err(name))?,
        Side::Nbd(p, name) => {
            if p.first().can_flush() {
                p.flush().map_err(Side::nbd_err(name))?;
            }
        }
    }
    drop(src_side);
    if let Side::Nbd(p, name) = dst_side {
        p.disconnect().map_err(Side::nbd_err(&name))?;
    }
    Ok(CopySummary {
        size,
        bytes_copied: copied,
        bytes_skipped: skipped,
        elapsed: start.elapsed(),
    })
}
