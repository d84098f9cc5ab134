//! The raw-file backend of an export: sparse-aware (holes found with `SEEK_DATA` /
//! `SEEK_HOLE`, zeroes written by punching holes or zeroing ranges where the filesystem
//! allows), optionally with `O_DIRECT`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Advice, FallocateFlags};

/// Alignment used for `O_DIRECT` I/O: the logical block size of any disk in use today.
pub const DIRECT_ALIGN: usize = 4096;

/// Size of the buffer of zeroes used where the filesystem cannot zero a range itself.
const ZERO_BUF: usize = 1 << 20;

/// One run of the export with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset of the run.
    pub offset: u64,
    /// Length of the run.
    pub length: u64,
    /// The run is a hole (reads as zeroes, not allocated).
    pub hole: bool,
}

/// Why a `WRITE_ZEROES` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZeroError {
    /// `FAST_ZERO` was asked and the filesystem can only zero by writing.
    #[error("zeroing would not be faster than writing")]
    NotFast,
    /// The operating system failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A raw file (or block device) served as an export.
#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    size: u64,
    read_only: bool,
    /// The filesystem answered `EOPNOTSUPP` to punching holes / zeroing ranges: do not
    /// ask again on every request.
    no_punch: AtomicBool,
    no_zero_range: AtomicBool,
    /// The file may contain holes. False when it had none at open and none was punched
    /// since: reads then skip the `SEEK_DATA`/`SEEK_HOLE` calls (a hole made behind the
    /// server's back only costs sending its zeroes as data).
    may_have_holes: AtomicBool,
}

fn unsupported(e: &rustix::io::Errno) -> bool {
    *e == rustix::io::Errno::OPNOTSUPP || *e == rustix::io::Errno::NOSYS
}

impl FileBackend {
    /// Opens `path`. With `direct`, aligned I/O bypasses the page cache through a second
    /// descriptor opened with `O_DIRECT`; unaligned I/O still goes through the cache.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<FileBackend> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        let mut file = opts.open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        let direct = if direct {
            Some(opts.custom_flags(libc::O_DIRECT).open(path)?)
        } else {
            None
        };
        let b = FileBackend {
            path: path.to_path_buf(),
            file,
            direct,
            size,
            read_only,
            no_punch: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
            may_have_holes: AtomicBool::new(true),
        };
        let holes = size == 0 || b.extents(0, size, 2)?.iter().any(|e| e.hole);
        b.may_have_holes.store(holes, Ordering::Relaxed);
        Ok(b)
    }

    /// Whether reads should look for holes (see `may_have_holes`).
    pub fn may_have_holes(&self) -> bool {
        self.may_have_holes.load(Ordering::Relaxed)
    }

    /// Sends `length` bytes of the file at `offset` to `out` without copying them through
    /// user space (`sendfile`). Returns the bytes sent: fewer only if the file ended first.
    pub fn send_to(
        &self,
        out: impl std::os::fd::AsFd,
        offset: u64,
        length: u64,
    ) -> io::Result<u64> {
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (end - pos).min(1 << 30) as usize;
            match rustix::fs::sendfile(&out, &self.file, Some(&mut pos), n) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(pos - offset)
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes, fixed when the file was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether aligned I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn pick(&self, buf_addr: usize, len: usize, offset: u64) -> &File {
        match &self.direct {
            Some(d)
                if buf_addr % DIRECT_ALIGN == 0
                    && len % DIRECT_ALIGN == 0
                    && offset % DIRECT_ALIGN as u64 == 0 =>
            {
                d
            }
            _ => &self.file,
        }
    }

    /// Reads `buf.len()` bytes at `offset`. Bytes past the end of the file (if it shrank
    /// under the server) read as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let f = self.pick(buf.as_ptr() as usize, buf.len(), offset);
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.pick(data.as_ptr() as usize, data.len(), offset)
            .write_all_at(data, offset)
    }

    /// Persists everything written so far.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discards a range. Filesystems that cannot punch holes make this a no-op, which the
    /// protocol allows for `TRIM`.
    pub fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 || self.no_punch.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.may_have_holes.store(true, Ordering::Relaxed);
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            length,
        ) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => {
                self.no_punch.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a range read as zeroes: punches a hole unless `no_hole`, else zeroes the
    /// range in place (`FALLOC_FL_ZERO_RANGE`), else writes zeroes, unless `fast` forbids
    /// the slow way.
    pub fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), ZeroError> {
        if length == 0 {
            return Ok(());
        }
        // Zeroed ranges may read back as holes (ZERO_RANGE makes unwritten extents).
        self.may_have_holes.store(true, Ordering::Relaxed);
        if !no_hole && !self.no_punch.load(Ordering::Relaxed) {
            match rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                length,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.no_punch.store(true, Ordering::Relaxed),
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        if !self.no_zero_range.load(Ordering::Relaxed) {
            match rustix::fs::fallocate(
                &self.file,
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
                offset,
                length,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.no_zero_range.store(true, Ordering::Relaxed),
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        if fast {
            return Err(ZeroError::NotFast);
        }
        static ZEROES: OnceLock<Vec<u8>> = OnceLock::new();
        let zeroes = ZEROES.get_or_init(|| vec![0u8; ZERO_BUF]);
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(ZERO_BUF as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Hints that a range will be read soon.
    pub fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(length),
            Advice::WillNeed,
        )?;
        Ok(())
    }

    /// Allocation status of `[offset, offset + length)` clipped to the file size, as at
    /// most `max` extents (the last one may end before `offset + length`).
    pub fn extents(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let (hole, next) = self.run_at(pos, end)?;
            let next = next.clamp(pos + 1, end);
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    length: next - pos,
                    hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }

    /// Whether `pos` is in a hole, and where that run ends (not clamped).
    pub(crate) fn run_at(&self, pos: u64, end: u64) -> io::Result<(bool, u64)> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(data) if data > pos => Ok((true, data)),
            Ok(_) => match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(pos)) {
                Ok(hole) => Ok((false, hole)),
                Err(e) if e == rustix::io::Errno::NXIO => Ok((false, end)),
                Err(e) => Err(e.into()),
            },
            // No data after pos: the rest is a hole (or the file shrank).
            Err(e) if e == rustix::io::Errno::NXIO => Ok((true, end)),
            // Filesystems without SEEK_DATA: everything is data.
            Err(e) if e == rustix::io::Errno::INVAL || unsupported(&e) => Ok((false, end)),
            Err(e) => Err(e.into()),
        }
    }
}

/// A heap buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary, so it can be
/// used for `O_DIRECT` I/O without `unsafe` allocation.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.storage.len() - DIRECT_ALIGN
    }

    /// Sets the length (at most the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "AlignedBuf::set_len beyond capacity"
        );
        self.len = len;
    }

    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The usable bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}
