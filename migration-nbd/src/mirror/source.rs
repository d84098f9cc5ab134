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
    /// Writes `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes, as a hole where it can.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Persists what was written.
    fn flush(&self) -> io::Result<()>;
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
