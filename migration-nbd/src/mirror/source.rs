//! The disk a mirror copies from: [`BlockBackend`], implemented by the raw-file
//! [`FileBackend`] and by [`MemoryDisk`], and filled in by a VMM with its own block layer.

use std::io;
use std::sync::Mutex;

use crate::backend::{Extent, FileBackend, ZeroError};

/// A disk the mirror reads (and that [`MirroredDisk`](super::MirroredDisk) writes for the
/// guest). Every method may be called from several threads at once.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes, fixed for the life of the mirror.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (within the size).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Allocation of `[offset, offset + len)`: consecutive runs from `offset`, holes
    /// marked, covering the range or a prefix of it. A backend that cannot tell says
    /// "data" for everything.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;
    /// The run `offset` (below the size) is in, from `offset`: a hole or data for at
    /// least one byte, up to where the run ends or less. The mirror asks once per run,
    /// not once per copy, and keeps where a data run ends (see the driver), so a backend
    /// whose look-up costs the same however far the run goes (`SEEK_HOLE` walks to the
    /// run's end whatever range is asked) should answer with the whole run. The default
    /// takes the first run of [`extents`](Self::extents) over at most `RUN_WINDOW` (16 MiB).
    fn run_at(&self, offset: u64) -> io::Result<Extent> {
        let len = self.size().saturating_sub(offset).min(RUN_WINDOW);
        Ok(first_run(offset, len, self.extents(offset, len)?))
    }
    /// Writes `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes, as a hole where it can.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Persists what was written.
    fn flush(&self) -> io::Result<()>;
}

/// Longest run the default [`BlockBackend::run_at`] (and [`MemoryDisk`]) looks at in one
/// call: 16 MiB, so that a look-up whose cost grows with the range stays bounded.
pub const RUN_WINDOW: u64 = 16 << 20;

/// The first run of `extents` as asked at `offset` over `len` bytes.
fn first_run(offset: u64, len: u64, extents: Vec<Extent>) -> Extent {
    run_or_data(offset, len.max(1), extents.first().copied())
}

/// `e` as the run at `offset` when it is one (it starts there and is not empty); else
/// "data" for `fallback` bytes: copying data is always right, skipping it never is.
pub(crate) fn run_or_data(offset: u64, fallback: u64, e: Option<Extent>) -> Extent {
    match e {
        Some(e) if e.offset == offset && e.length > 0 => e,
        _ => Extent {
            offset,
            length: fallback,
            hole: false,
        },
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        FileBackend::size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileBackend::read_at(self, buf, offset)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        FileBackend::extents(self, offset, len, 1024)
    }

    fn run_at(&self, offset: u64) -> io::Result<Extent> {
        // The whole run: SEEK_HOLE costs as much for a short range as for the rest of
        // the file (tmpfs walks its pages up to the next hole).
        let size = FileBackend::size(self);
        let (hole, next) = FileBackend::run_at(self, offset, size)?;
        Ok(Extent {
            offset,
            length: next.clamp(offset + 1, size.max(offset + 1)) - offset,
            hole,
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileBackend::write_at(self, data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        FileBackend::write_zeroes(self, offset, len, false, false).map_err(|e| match e {
            ZeroError::Io(e) => e,
            ZeroError::NotFast => io::Error::other("zeroing refused"),
        })
    }

    fn flush(&self) -> io::Result<()> {
        FileBackend::flush(self)
    }
}

/// Bytes per allocation unit of a [`MemoryDisk`].
pub const MEMORY_BLOCK: u64 = 4096;

/// A disk in RAM with holes: blocks of [`MEMORY_BLOCK`] bytes are allocated when written
/// and become holes again when zeroed whole. For VMMs with RAM-backed disks, and for
/// tests that need a source without a file system under it.
#[derive(Debug)]
pub struct MemoryDisk {
    inner: Mutex<MemInner>,
    size: u64,
}

#[derive(Debug)]
struct MemInner {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("offset {offset} length {len} is past the end of a disk of {size} bytes"),
    )
}

impl MemoryDisk {
    /// A disk of `size` bytes, all hole.
    pub fn new(size: usize) -> MemoryDisk {
        let blocks = (size as u64).div_ceil(MEMORY_BLOCK) as usize;
        MemoryDisk {
            inner: Mutex::new(MemInner {
                data: vec![0; size],
                allocated: vec![false; blocks],
            }),
            size: size as u64,
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<(usize, usize)> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok((offset as usize, end as usize)),
            _ => Err(out_of_range(offset, len, self.size)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }
}

impl BlockBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.lock().data[start..end]);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let g = self.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let hole = !g.allocated[(pos / MEMORY_BLOCK) as usize];
            let next = ((pos / MEMORY_BLOCK + 1) * MEMORY_BLOCK).min(end);
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

    fn run_at(&self, offset: u64) -> io::Result<Extent> {
        let (start, _) = self.check(offset, 1)?;
        let g = self.lock();
        let b = MEMORY_BLOCK as usize;
        let first = start / b;
        let hole = !g.allocated[first];
        let last = ((start as u64).saturating_add(RUN_WINDOW) as usize).div_ceil(b);
        let end_block = (first + 1..last.min(g.allocated.len()))
            .find(|&i| g.allocated[i] == hole)
            .unwrap_or(last.min(g.allocated.len()));
        let end = (end_block * b).min(self.size as usize);
        Ok(Extent {
            offset,
            length: (end - start) as u64,
            hole,
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = self.check(offset, data.len() as u64)?;
        let mut g = self.lock();
        g.data[start..end].copy_from_slice(data);
        if end > start {
            let (b0, b1) = (
                start / MEMORY_BLOCK as usize,
                (end - 1) / MEMORY_BLOCK as usize,
            );
            g.allocated[b0..=b1].fill(true);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = self.check(offset, len)?;
        let mut g = self.lock();
        g.data[start..end].fill(0);
        // Blocks zeroed whole become holes; the last block may be short.
        let b = MEMORY_BLOCK as usize;
        let first_whole = start.div_ceil(b);
        let mut blk = first_whole;
        while blk < g.allocated.len() && ((blk + 1) * b).min(self.size as usize) <= end {
            g.allocated[blk] = false;
            blk += 1;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every backend must do; each implementation runs it.
    fn contract(disk: &dyn BlockBackend) {
        let size = disk.size();
        assert_eq!(size, 64 << 10);
        let ext = disk.extents(0, size).unwrap();
        assert!(
            ext.iter().all(|e| e.hole),
            "a fresh disk is all hole: {ext:?}"
        );
        disk.write_at(&[7u8; 5000], 8192).unwrap();
        let mut buf = vec![0u8; 5002];
        disk.read_at(&mut buf, 8191).unwrap();
        assert_eq!(buf[0], 0);
        assert!(buf[1..5001].iter().all(|&b| b == 7));
        assert_eq!(buf[5001], 0);
        let ext = disk.extents(0, size).unwrap();
        // The run at an offset starts there and says what the extents say.
        let run = disk.run_at(8192).unwrap();
        assert!(!run.hole && run.offset == 8192, "{run:?}");
        assert!(
            run.length >= 5000 && run.offset + run.length <= size,
            "{run:?}"
        );
        let run = disk.run_at(0).unwrap();
        assert!(run.hole && run.offset == 0 && (1..=8192).contains(&run.length));
        let run = disk.run_at(size - 1).unwrap();
        assert!(run.hole && run.length == 1, "{run:?}");
        let data: Vec<_> = ext.iter().filter(|e| !e.hole).collect();
        assert_eq!(data.len(), 1, "{ext:?}");
        assert!(data[0].offset <= 8192 && data[0].offset + data[0].length >= 13192);
        // The runs are consecutive from the offset asked.
        let part = disk.extents(4096, 20000).unwrap();
        assert_eq!(part[0].offset, 4096);
        for w in part.windows(2) {
            assert_eq!(w[0].offset + w[0].length, w[1].offset);
        }
        disk.write_zeroes(8192, 8192).unwrap();
        disk.read_at(&mut buf, 8191).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            disk.extents(8192, 4096).unwrap().iter().all(|e| e.hole),
            "a block zeroed whole is a hole again"
        );
        disk.flush().unwrap();
    }

    #[test]
    fn memory_disk_keeps_the_backend_contract() {
        contract(&MemoryDisk::new(64 << 10));
        let d = MemoryDisk::new(100);
        assert!(d.write_at(&[1], 100).is_err());
        assert!(d.read_at(&mut [0; 2], u64::MAX).is_err());
    }

    #[test]
    fn file_backend_keeps_the_backend_contract() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        contract(&FileBackend::open(&p, false, false).unwrap());
    }
}
