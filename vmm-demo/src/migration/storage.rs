//! Storage migration without shared storage, the way libvirt drives QEMU for
//! `--copy-storage-all` / `--copy-storage-inc`: *prepare* (the destination creates an image
//! of the same size for each disk, or opens the older copy it kept, and exports it over
//! NBD), *perform* (the source mirrors each disk into the export until the mirror is ready,
//! then the RAM migration runs; the mirror completes inside the guest's pause), *finish*
//! (the destination stops its NBD server before its guest runs).
//!
//! The source learns where the exports are in the migration connection's setup: before
//! the migration stream, it opens a connection to the destination's migration listener
//! that starts with [`PRELUDE`] and carries one request ([`PrepareRequest`]) and one reply
//! ([`PrepareReply`]), each a little-endian `u32` length (at most [`MAX_MESSAGE`]) and
//! JSON. The connection stays open for the whole migration: its end tells the destination
//! that the source gave up, before any migration stream came.
//!
//! An incremental copy needs the destination's older copy to be the disk as it was at a
//! known point (a *base*): after every storage migration both sides write that point down
//! (the source beside the image it leaves behind, [`base_path`]; the destination in the
//! persistent bitmap it keeps of the guest's writes from then on, [`bitmap_path`]), and a
//! later `--copy-storage-inc` is refused unless the two name the same base.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_core::bitmap::DirtyBitmap;
use migration_core::transport::{Address, Listener, Stream};
use migration_nbd::backend::FileBackend;
use migration_nbd::mirror::{
    BlockBackend, CopyMode, Mirror, MirrorConfig, MirrorError, MirrorHandle, MirrorJob,
    MirrorOptions, MirrorStats, PersistentBitmap,
};
use migration_nbd::{ExportConfig, Server, ServerConfig, ServerHandle};
use serde::{Deserialize, Serialize};

/// The first bytes of a storage-prepare connection (a migration stream starts otherwise).
pub const PRELUDE: &[u8; 16] = b"vmm-demo-storage";
/// Longest request or reply accepted.
pub const MAX_MESSAGE: u32 = 64 << 10;

/// How long either side of prepare waits for the other's message.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The source's request: the disks to receive, and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrepareRequest {
    /// One entry per disk, in the VM's order.
    pub disks: Vec<DiskRequest>,
    /// The base both sides hold once the migration succeeded (hex): the destination
    /// records the guest's writes from then on against it, for a later incremental copy
    /// back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_base: Option<String>,
}

/// One disk to receive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRequest {
    /// The disk's id in the VM (`disk0`, ...): also its export name.
    pub id: String,
    /// Its size in bytes.
    pub size: u64,
    /// For an incremental copy, the base the source's bitmap counts from (hex): the
    /// destination must hold the disk as it was then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

/// The destination's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PrepareReply {
    /// The exports are ready at `nbd` (an address as `tcp:HOST:PORT` or `unix:PATH`).
    Ready {
        /// Where the NBD server listens.
        nbd: String,
        /// One per disk, in the request's order.
        exports: Vec<ExportReply>,
    },
    /// The destination cannot take the disks: why.
    Refused {
        /// Why.
        reason: String,
    },
}

/// One export the destination offers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportReply {
    /// The disk's id.
    pub id: String,
    /// The NBD export name.
    pub export: String,
    /// Whether the destination created the image for this migration (a full copy) or
    /// holds an older copy of it (an incremental one).
    pub created: bool,
}

/// Why storage migration failed, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// The prepare connection failed.
    #[error("storage prepare connection: {0}")]
    Connection(#[source] io::Error),
    /// A prepare message was malformed.
    #[error("storage prepare: {0}")]
    Message(String),
    /// The destination refused the disks.
    #[error("the destination refused the disks: {0}")]
    Refused(String),
    /// An image could not be created, opened or checked.
    #[error("disk image {path}: {why}")]
    Image {
        /// The image.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// The NBD server could not be started.
    #[error("starting the NBD server on {address}: {source}")]
    Nbd {
        /// Where.
        address: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Cancelled while the mirrors caught up.
    #[error("cancelled while the disks were mirrored")]
    Cancelled,
    /// A mirror job failed.
    #[error("mirroring {disk}: {source}")]
    Mirror {
        /// The disk.
        disk: String,
        /// Why (boxed: a mirror's error carries its client's whole, and fails once).
        #[source]
        source: Box<MirrorError>,
    },
}

/// The id of the demo VM's one disk, in prepare requests and device errors.
pub const DISK_ID: &str = "disk0";

/// Copies what `stream` holds into `buf` without taking it and without waiting: the
/// bytes, `Some(0)` when the peer closed it, `None` when nothing came yet.
pub fn peek(stream: &Stream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: recv into a buffer of its length on a socket we hold; MSG_PEEK leaves the
    // bytes for whoever reads the stream next.
    let n = unsafe {
        libc::recv(
            stream.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// Whether `stream`'s first bytes are [`PRELUDE`] (looked at, not taken): waits up to
/// `timeout` for them.
pub fn is_prelude(stream: &Stream, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PRELUDE.len()];
    loop {
        if let Some(n) = peek(stream, &mut buf)? {
            // Fewer bytes than the prelude: it is one only if they agree so far and the
            // rest follows.
            if n == 0 || buf[..n] != PRELUDE[..n] {
                return Ok(false);
            }
            if n == PRELUDE.len() {
                return Ok(true);
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the first bytes of a connection did not come",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn write_message<T: Serialize>(w: &mut impl Write, m: &T) -> io::Result<()> {
    let body = serde_json::to_vec(m).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    w.write_all(&out)
}

fn read_message<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, CopyError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(CopyError::Connection)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(CopyError::Message(format!(
            "a message of {len} bytes, more than the {MAX_MESSAGE} accepted"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(CopyError::Connection)?;
    serde_json::from_slice(&body).map_err(|e| CopyError::Message(format!("{e}")))
}

/// The source's side of prepare: sends `req` on `stream` (a fresh connection to the
/// destination's migration listener) and reads the reply.
pub fn request(stream: &mut Stream, req: &PrepareRequest) -> Result<PrepareReply, CopyError> {
    stream.write_all(PRELUDE).map_err(CopyError::Connection)?;
    write_message(stream, req).map_err(CopyError::Connection)?;
    read_within(stream, read_message)
}

/// `read` with [`MESSAGE_TIMEOUT`] on `stream`: a peer that stalls is an error, not a
/// hang. The connection stays open afterwards without one (its end is what is watched).
fn read_within<T>(
    stream: &mut Stream,
    read: impl FnOnce(&mut Stream) -> Result<T, CopyError>,
) -> Result<T, CopyError> {
    stream
        .set_read_timeout(Some(MESSAGE_TIMEOUT))
        .map_err(CopyError::Connection)?;
    let r = read(stream);
    stream
        .set_read_timeout(None)
        .map_err(CopyError::Connection)?;
    r
}

/// The destination's side: reads the request after the prelude.
pub fn read_request(stream: &mut Stream) -> Result<PrepareRequest, CopyError> {
    read_within(stream, read_request_now)
}

fn read_request_now(stream: &mut Stream) -> Result<PrepareRequest, CopyError> {
    let mut magic = [0u8; PRELUDE.len()];
    stream
        .read_exact(&mut magic)
        .map_err(CopyError::Connection)?;
    if &magic != PRELUDE {
        return Err(CopyError::Message(
            "not a storage prepare connection".into(),
        ));
    }
    let req: PrepareRequest = read_message(stream)?;
    if req.disks.is_empty() || req.disks.len() > 16 {
        return Err(CopyError::Message(format!(
            "{} disks asked for (1 to 16 are served)",
            req.disks.len()
        )));
    }
    // A base that does not parse would be dropped later without a word, and the next
    // incremental copy refused for no reason anyone could see.
    let bases = req
        .disks
        .iter()
        .filter_map(|d| d.base.as_deref().map(|b| (d.id.as_str(), b)))
        .chain(req.new_base.as_deref().map(|b| ("the new base", b)));
    for (what, b) in bases {
        if parse_base(b).is_none() {
            return Err(CopyError::Message(format!(
                "{what}: base {b:?} is not 32 hex digits"
            )));
        }
    }
    Ok(req)
}

/// The destination's side: sends its reply.
pub fn reply(stream: &mut Stream, r: &PrepareReply) -> Result<(), CopyError> {
    write_message(stream, r).map_err(CopyError::Connection)
}

/// Where the base an image was left at is written, beside it.
pub fn base_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".base");
    PathBuf::from(p)
}

/// Where the persistent bitmap of an image's writes since its base is kept, beside it.
pub fn bitmap_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".bitmap");
    PathBuf::from(p)
}

/// A base as written in files and messages.
pub fn base_hex(base: [u8; 16]) -> String {
    base.iter().map(|b| format!("{b:02x}")).collect()
}

/// The base `s` names (32 hex digits).
pub fn parse_base(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Writes down that `image` holds the disk as it was at `base`.
pub fn write_base(image: &Path, base: [u8; 16]) -> io::Result<()> {
    let p = base_path(image);
    std::fs::write(&p, base_hex(base) + "\n")?;
    std::fs::File::open(&p)?.sync_all()
}

/// The base `image` was left at, if one was written down.
pub fn read_base(image: &Path) -> Option<[u8; 16]> {
    parse_base(&std::fs::read_to_string(base_path(image)).ok()?)
}

/// One image the destination serves.
#[derive(Debug)]
struct TargetImage {
    id: String,
    path: PathBuf,
    created: bool,
}

/// The destination's exports during a storage migration.
#[derive(Debug)]
pub struct StorageTarget {
    server: Option<ServerHandle>,
    images: Vec<TargetImage>,
    nbd: Address,
}

impl StorageTarget {
    /// Prepares the images of `req` at `paths` (one per disk; `None` for a disk without a
    /// path of its own: an image in `scratch` is created): creates an empty sparse image
    /// of the disk's size for a full copy (an image already there is refused, so that
    /// nothing is overwritten unsaid), checks the image and its base for an incremental
    /// one; then exports them on an NBD server listening on `nbd_bind`.
    pub fn prepare(
        req: &PrepareRequest,
        paths: &[Option<PathBuf>],
        scratch: &Path,
        nbd_bind: &Address,
    ) -> Result<StorageTarget, CopyError> {
        if req.disks.len() != paths.len() {
            return Err(CopyError::Refused(format!(
                "{} disks asked for; this destination's VM has {}",
                req.disks.len(),
                paths.len()
            )));
        }
        let mut images: Vec<TargetImage> = Vec::new();
        let made = (|| {
            for (i, d) in req.disks.iter().enumerate() {
                if !valid_id(&d.id) {
                    return Err(CopyError::Message(format!("disk id {:?}", d.id)));
                }
                let path = paths
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| scratch.join(format!("{}.img", d.id)));
                let img = |why: String| CopyError::Image {
                    path: path.clone(),
                    why,
                };
                match &d.base {
                    None => {
                        crate::virtio_blk::DiskImage::create_sparse(&path, d.size)
                            .map_err(|e| img(format!("creating it for a full copy: {e}")))?;
                        images.push(TargetImage {
                            id: d.id.clone(),
                            path,
                            created: true,
                        });
                    }
                    Some(base) => {
                        let len = std::fs::metadata(&path)
                            .map_err(|e| {
                                img(format!("an incremental copy needs the older copy: {e}"))
                            })?
                            .len();
                        if len != d.size {
                            return Err(img(format!(
                                "holds {len} bytes, the source's disk {}",
                                d.size
                            )));
                        }
                        match read_base(&path) {
                            Some(b) if Some(b) == parse_base(base) => {}
                            Some(b) => {
                                return Err(img(format!(
                                    "is the disk as it was at {}, not at the source's base {base}: \
                                     copy it whole (--copy-storage-all)",
                                    base_hex(b)
                                )));
                            }
                            None => {
                                return Err(img(format!(
                                    "has no base written beside it ({}): copy it whole \
                                     (--copy-storage-all)",
                                    base_path(&path).display()
                                )));
                            }
                        }
                        images.push(TargetImage {
                            id: d.id.clone(),
                            path,
                            created: false,
                        });
                    }
                }
            }
            let exports = images
                .iter()
                .map(|t| ExportConfig::new(t.id.clone(), &t.path))
                .collect();
            let server =
                Server::new(exports, ServerConfig::default()).map_err(|e| CopyError::Nbd {
                    address: nbd_bind.to_string(),
                    source: io::Error::other(e.to_string()),
                })?;
            let nbd_err = |source| CopyError::Nbd {
                address: nbd_bind.to_string(),
                source,
            };
            let listener = Listener::bind(nbd_bind).map_err(nbd_err)?;
            server.spawn(listener).map_err(nbd_err)
        })();
        match made {
            Ok(server) => {
                let nbd = server.address().clone();
                tracing::info!(%nbd, disks = images.len(), "storage: exports ready");
                Ok(StorageTarget {
                    server: Some(server),
                    images,
                    nbd,
                })
            }
            Err(e) => {
                remove_created(&images);
                Err(e)
            }
        }
    }

    /// The reply to send the source.
    pub fn reply(&self) -> PrepareReply {
        PrepareReply::Ready {
            nbd: self.nbd.to_string(),
            exports: self
                .images
                .iter()
                .map(|t| ExportReply {
                    id: t.id.clone(),
                    export: t.id.clone(),
                    created: t.created,
                })
                .collect(),
        }
    }

    /// The images, in the request's order (for the VM to open).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.images.iter().map(|t| t.path.clone()).collect()
    }

    /// Finish: stops the NBD server (the source completed its mirrors before the guest's
    /// device state left it) and syncs the images. Their paths, for the VM.
    pub fn finish(&mut self) -> Result<Vec<PathBuf>, CopyError> {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        for t in &self.images {
            std::fs::File::open(&t.path)
                .and_then(|f| f.sync_all())
                .map_err(|e| CopyError::Image {
                    path: t.path.clone(),
                    why: format!("syncing it: {e}"),
                })?;
        }
        Ok(self.paths())
    }

    /// The migration failed before the guest ran here: stops the server and deletes the
    /// images it created (unless `keep`, for a later incremental copy; an older copy it
    /// only opened is never deleted, but it is not the base any more). Says what it did.
    pub fn abort(mut self, keep: bool) -> Vec<String> {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        let mut said = Vec::new();
        for t in &self.images {
            if t.created && !keep {
                match std::fs::remove_file(&t.path) {
                    Ok(()) => said.push(format!("deleted {}", t.path.display())),
                    Err(e) => said.push(format!("could not delete {}: {e}", t.path.display())),
                }
            } else {
                // Partly copied (or partly updated): it is no known point's copy.
                let _ = std::fs::remove_file(base_path(&t.path));
                said.push(format!(
                    "kept {} (partly copied: not a base for an incremental copy)",
                    t.path.display()
                ));
            }
        }
        said
    }
}

fn remove_created(images: &[TargetImage]) {
    for t in images.iter().filter(|t| t.created) {
        let _ = std::fs::remove_file(&t.path);
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// How the source mirrors (issue 8's options, passed through).
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// Copy mode.
    pub mode: CopyMode,
    /// Bytes per dirty bit.
    pub granularity: u64,
    /// How long to wait for every mirror to be ready.
    pub deadline: Duration,
    /// How long a lost NBD connection may stay lost.
    pub reconnect_window: Duration,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        MirrorSettings {
            mode: CopyMode::Background,
            granularity: MirrorConfig::default().granularity,
            deadline: Duration::from_secs(300),
            reconnect_window: Duration::from_secs(30),
        }
    }
}

/// A disk the source mirrors.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// Its id in the VM.
    pub id: String,
    /// Its image.
    pub path: PathBuf,
    /// For an incremental copy: the clusters written since the base (at the settings'
    /// granularity) and the base.
    pub incremental: Option<(DirtyBitmap, [u8; 16])>,
}

/// A disk's id and its mirror's counters.
pub type DiskStats = (String, MirrorStats);

/// The source's mirrors during a storage migration.
pub struct StorageSource {
    jobs: Vec<(String, MirrorJob)>,
    started: Instant,
}

impl std::fmt::Debug for StorageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageSource")
            .field("disks", &self.jobs.len())
            .finish()
    }
}

/// What a completed storage migration did, per disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskCopyReport {
    /// The disk.
    pub id: String,
    /// Incremental (from a base) or whole.
    pub incremental: bool,
    /// The mirror's counters.
    pub bytes_copied: u64,
    /// Bytes found as holes in the source and not sent.
    pub bytes_holes: u64,
    /// Bytes sent as zeroes.
    pub bytes_zeroed: u64,
    /// Bytes copied again after a guest write.
    pub bytes_recopied: u64,
    /// Mode switches (auto mode).
    pub mode_switches: u32,
    /// Reconnections after a lost NBD connection.
    pub reconnects: u32,
    /// Whether write-blocking was in force at the end.
    pub write_blocking: bool,
    /// Guest write latency write-blocking added, median and 99th percentile, in ms.
    pub write_latency_p50_ms: Option<f64>,
    /// See above.
    pub write_latency_p99_ms: Option<f64>,
}

impl DiskCopyReport {
    fn new(id: &str, incremental: bool, s: &MirrorStats) -> DiskCopyReport {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        DiskCopyReport {
            id: id.to_string(),
            incremental,
            bytes_copied: s.bytes_copied,
            bytes_holes: s.bytes_holes,
            bytes_zeroed: s.bytes_zeroed,
            bytes_recopied: s.bytes_recopied,
            mode_switches: s.mode_switches,
            reconnects: s.reconnects,
            write_blocking: s.write_blocking,
            write_latency_p50_ms: ms(s.write_latency_p50),
            write_latency_p99_ms: ms(s.write_latency_p99),
        }
    }
}

impl StorageSource {
    /// Starts a mirror of each disk into the export the destination named for it.
    pub fn start(
        disks: &[SourceDisk],
        reply: &PrepareReply,
        settings: &MirrorSettings,
    ) -> Result<StorageSource, CopyError> {
        let (nbd, exports) = match reply {
            PrepareReply::Ready { nbd, exports } => (nbd, exports),
            PrepareReply::Refused { reason } => return Err(CopyError::Refused(reason.clone())),
        };
        let addr: Address = nbd
            .parse()
            .map_err(|e| CopyError::Message(format!("NBD address {nbd:?}: {e}")))?;
        if exports.len() != disks.len() {
            return Err(CopyError::Message(format!(
                "{} exports for {} disks",
                exports.len(),
                disks.len()
            )));
        }
        let mut jobs = Vec::new();
        for (d, e) in disks.iter().zip(exports) {
            if e.created == d.incremental.is_some() {
                return Err(CopyError::Message(format!(
                    "{}: the destination {} the image, for an {} copy",
                    d.id,
                    if e.created { "created" } else { "kept" },
                    if d.incremental.is_some() {
                        "incremental"
                    } else {
                        "whole"
                    }
                )));
            }
            let source: Arc<dyn BlockBackend> =
                Arc::new(FileBackend::open(&d.path, true, false).map_err(|e| {
                    CopyError::Image {
                        path: d.path.clone(),
                        why: format!("opening it to mirror: {e}"),
                    }
                })?);
            let opts = MirrorOptions {
                config: MirrorConfig {
                    mode: settings.mode,
                    granularity: settings.granularity,
                    reconnect_window: settings.reconnect_window,
                    target_is_zero: e.created,
                    ..MirrorConfig::default()
                },
                export: e.export.clone(),
                incremental: d.incremental.as_ref().map(|(b, _)| b.clone()),
                ..MirrorOptions::default()
            };
            let job = Mirror::start(source, &addr, opts).map_err(|source| CopyError::Mirror {
                disk: d.id.clone(),
                source: Box::new(source),
            })?;
            jobs.push((d.id.clone(), job));
        }
        Ok(StorageSource {
            jobs,
            started: Instant::now(),
        })
    }

    /// The write seam of each disk's mirror, in order: the block device calls
    /// `note_write` after each guest write reaches the image.
    pub fn handles(&self) -> Vec<MirrorHandle> {
        self.jobs.iter().map(|(_, j)| j.handle()).collect()
    }

    /// Waits until every mirror is ready (or `deadline` passes, with the rates in the
    /// error), calling `progress` about every 100 ms with the stats of each disk; `progress`
    /// returning false (a cancel) ends the wait with [`CopyError::Cancelled`].
    pub fn wait_ready(
        &mut self,
        deadline: Duration,
        progress: &mut dyn FnMut(&[DiskStats]) -> bool,
    ) -> Result<(), CopyError> {
        let until = Instant::now() + deadline;
        for i in 0..self.jobs.len() {
            loop {
                let left = until.saturating_duration_since(Instant::now());
                let (id, job) = &self.jobs[i];
                match job.wait_ready(left.min(Duration::from_millis(100))) {
                    Ok(()) => break,
                    Err(MirrorError::ReadyDeadline { .. }) if !left.is_zero() => {
                        let stats: Vec<_> = self
                            .jobs
                            .iter()
                            .map(|(i, j)| (i.clone(), j.stats()))
                            .collect();
                        if !progress(&stats) {
                            return Err(CopyError::Cancelled);
                        }
                    }
                    // The last slice timed out: the whole wait did.
                    Err(MirrorError::ReadyDeadline {
                        phase,
                        dirty_bytes,
                        dirty_rate,
                        copy_rate,
                        ..
                    }) => {
                        return Err(CopyError::Mirror {
                            disk: id.clone(),
                            source: Box::new(MirrorError::ReadyDeadline {
                                waited: self.started.elapsed(),
                                phase,
                                dirty_bytes,
                                dirty_rate,
                                copy_rate,
                            }),
                        });
                    }
                    Err(source) => {
                        return Err(CopyError::Mirror {
                            disk: id.clone(),
                            source: Box::new(source),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Inside the guest's pause: completes every mirror (the targets equal the sources).
    pub fn complete(self, incremental: bool) -> Result<Vec<DiskCopyReport>, CopyError> {
        let mut out = Vec::new();
        let mut jobs = self.jobs.into_iter();
        while let Some((id, job)) = jobs.next() {
            match job.complete() {
                Ok(s) => out.push(DiskCopyReport::new(&id, incremental, &s)),
                Err(source) => {
                    for (_, j) in jobs {
                        let _ = j.cancel();
                    }
                    return Err(CopyError::Mirror {
                        disk: id,
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The migration failed: stops every mirror; the source disks are untouched.
    pub fn cancel(self) {
        for (id, job) in self.jobs {
            match job.cancel() {
                Ok(c) => tracing::info!(disk = %id, "mirror cancelled: {c}"),
                Err(e) => tracing::warn!(disk = %id, %e, "mirror ended with an error"),
            }
        }
    }
}

/// The persistent bitmap an image's base was left with, for `--copy-storage-inc`: the
/// clusters written since, and the base. A bitmap missing, in use or of another size is
/// an error that says to copy the whole disk.
pub fn incremental_bitmap(
    image: &Path,
    size: u64,
) -> Result<(DirtyBitmap, u64, [u8; 16]), CopyError> {
    let p = bitmap_path(image);
    let info = PersistentBitmap::peek(&p).map_err(|e| CopyError::Image {
        path: image.to_path_buf(),
        why: format!("no usable record of the writes since its base ({e}); copy it whole (--copy-storage-all)"),
    })?;
    if info.disk_size != size {
        return Err(CopyError::Image {
            path: image.to_path_buf(),
            why: format!(
                "its bitmap is of a {}-byte disk, the disk has {size}: copy it whole",
                info.disk_size
            ),
        });
    }
    Ok((info.bits, info.granularity, info.base))
}

#[cfg(test)]
mod tests;
