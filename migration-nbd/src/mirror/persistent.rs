//! A dirty bitmap kept in a file beside a disk image, so that a later storage migration
//! copies only what was written since a known point (QEMU's persistent dirty bitmaps;
//! what libvirt's `--copy-storage-inc` relies on).
//!
//! The point is named by a `base` identifier: when a migration leaves two hosts with the
//! same disk contents, both record the same `base` (the destination in a bitmap it starts
//! then, the source beside the copy it keeps), and a later incremental copy is only taken
//! when the two match.
//!
//! While a VMM holds the bitmap open it is marked *in use* on disk; a clean
//! [`PersistentBitmap::close`] clears the mark. A bitmap found in use when opened was not
//! closed cleanly (the VMM died, writes may be missing from it) and is refused: the caller
//! copies the whole disk instead.
//!
//! File layout, little-endian: magic `MIGDBMP1`, version `u32`, flags `u32` (bit 0: in
//! use), disk size `u64`, granularity `u64`, base `[u8; 16]`, cluster count `u64`, the
//! bitmap (one bit per cluster, `u64` words), CRC32 of everything before it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use migration_core::bitmap::DirtyBitmap;

const MAGIC: &[u8; 8] = b"MIGDBMP1";
const VERSION: u32 = 1;
const IN_USE: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 16 + 8;
/// The most clusters a bitmap file may declare: 2^32 clusters is 16 TiB at 4 KiB, and
/// 512 MiB of bitmap; a larger claim is a corrupt file, not a disk.
const MAX_CLUSTERS: u64 = 1 << 32;

/// Why a bitmap file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapFileError {
    /// Reading or writing the file failed.
    #[error("dirty bitmap {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file is not a bitmap of this format (or of a newer version).
    #[error("dirty bitmap {path}: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, and at which byte.
        why: String,
    },
    /// The bitmap is of a disk of another size.
    #[error("dirty bitmap {path} is of a disk of {bitmap} bytes, the disk has {disk}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The size it records.
        bitmap: u64,
        /// The disk's.
        disk: u64,
    },
    /// The bitmap was not closed cleanly: writes may be missing from it.
    #[error(
        "dirty bitmap {path} was not closed cleanly (its VMM stopped while it was in use): \
         writes may be missing from it, so the whole disk must be copied"
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct PersistentBitmap {
    path: PathBuf,
    file: File,
    disk_size: u64,
    granularity: u64,
    base: [u8; 16],
    bits: DirtyBitmap,
}

impl PersistentBitmap {
    /// Creates (or replaces) the bitmap at `path` for a disk of `disk_size` bytes, every
    /// cluster of `granularity` bytes clean, since the point `base`; it is in use until
    /// [`close`](Self::close)d.
    pub fn create(
        path: &Path,
        disk_size: u64,
        granularity: u64,
        base: [u8; 16],
    ) -> Result<PersistentBitmap, BitmapFileError> {
        let clusters = clusters(path, disk_size, granularity)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| io_err(path, source))?;
        let mut b = PersistentBitmap {
            path: path.to_path_buf(),
            file,
            disk_size,
            granularity,
            base,
            bits: DirtyBitmap::new(clusters),
        };
        b.write(IN_USE)?;
        Ok(b)
    }

    /// Opens the bitmap at `path` of a disk of `disk_size` bytes and marks it in use.
    pub fn open(path: &Path, disk_size: u64) -> Result<PersistentBitmap, BitmapFileError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| io_err(path, source))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|source| io_err(path, source))?;
        let parsed = parse(&bytes).map_err(|why| BitmapFileError::Format {
            path: path.to_path_buf(),
            why,
        })?;
        if parsed.flags & IN_USE != 0 {
            return Err(BitmapFileError::InUse {
                path: path.to_path_buf(),
            });
        }
        if parsed.disk_size != disk_size {
            return Err(BitmapFileError::SizeMismatch {
                path: path.to_path_buf(),
                bitmap: parsed.disk_size,
                disk: disk_size,
            });
        }
        let mut b = PersistentBitmap {
            path: path.to_path_buf(),
            file,
            disk_size,
            granularity: parsed.granularity,
            base: parsed.base,
            bits: parsed.bits,
        };
        b.write(IN_USE)?;
        Ok(b)
    }

    /// Reads the bitmap at `path` without taking it (for a look, or a check): it must have
    /// been closed cleanly.
    pub fn peek(path: &Path) -> Result<BitmapInfo, BitmapFileError> {
        let bytes = std::fs::read(path).map_err(|source| io_err(path, source))?;
        let p = parse(&bytes).map_err(|why| BitmapFileError::Format {
            path: path.to_path_buf(),
            why,
        })?;
        if p.flags & IN_USE != 0 {
            return Err(BitmapFileError::InUse {
                path: path.to_path_buf(),
            });
        }
        Ok(p)
    }

    /// Notes a write (or trim, or write-zeroes) of `len` bytes at `offset`; a range past
    /// the end of the disk is clamped to it.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let first = (offset / self.granularity) as usize;
        let last = end.div_ceil(self.granularity) as usize;
        self.bits.set_range(first..last);
    }

    /// The clusters written since the base.
    pub fn bits(&self) -> &DirtyBitmap {
        &self.bits
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The point the bitmap counts from.
    pub fn base(&self) -> [u8; 16] {
        self.base
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the bitmap as it is now (still in use) and syncs it: a checkpoint.
    pub fn save(&mut self) -> Result<(), BitmapFileError> {
        self.write(IN_USE)
    }

    /// Writes the bitmap, clears the in-use mark and syncs it.
    pub fn close(mut self) -> Result<(), BitmapFileError> {
        self.write(0)
    }

    fn write(&mut self, flags: u32) -> Result<(), BitmapFileError> {
        let bytes = encode(
            flags,
            self.disk_size,
            self.granularity,
            self.base,
            &self.bits,
        );
        let path = self.path.clone();
        (|| {
            self.file.seek(SeekFrom::Start(0))?;
            self.file.write_all(&bytes)?;
            self.file.set_len(bytes.len() as u64)?;
            self.file.sync_data()
        })()
        .map_err(|source| io_err(&path, source))
    }
}

fn io_err(path: &Path, source: io::Error) -> BitmapFileError {
    BitmapFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn clusters(path: &Path, disk_size: u64, granularity: u64) -> Result<usize, BitmapFileError> {
    if !granularity.is_power_of_two() || !(512..=64 << 20).contains(&granularity) {
        return Err(BitmapFileError::Format {
            path: path.to_path_buf(),
            why: format!("granularity {granularity} is not a power of two from 512 B to 64 MiB"),
        });
    }
    let n = disk_size.div_ceil(granularity);
    if n > MAX_CLUSTERS {
        return Err(BitmapFileError::Format {
            path: path.to_path_buf(),
            why: format!("{n} clusters are more than {MAX_CLUSTERS}"),
        });
    }
    Ok(n as usize)
}

fn encode(
    flags: u32,
    disk_size: u64,
    granularity: u64,
    base: [u8; 16],
    bits: &DirtyBitmap,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + bits.words().len() * 8 + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&disk_size.to_le_bytes());
    out.extend_from_slice(&granularity.to_le_bytes());
    out.extend_from_slice(&base);
    out.extend_from_slice(&(bits.len() as u64).to_le_bytes());
    for w in bits.words() {
        out.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What a bitmap file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapInfo {
    /// Raw flags (bit 0: in use).
    pub flags: u32,
    /// The disk's size.
    pub disk_size: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// The point it counts from.
    pub base: [u8; 16],
    /// The clusters written since.
    pub bits: DirtyBitmap,
}

impl BitmapInfo {
    /// Whether it was left in use (not closed cleanly).
    pub fn in_use(&self) -> bool {
        self.flags & IN_USE != 0
    }
}

/// Decodes a bitmap file's bytes, checking every field and the checksum; the error says
/// what is wrong and at which byte.
pub fn inspect(bytes: &[u8]) -> Result<BitmapInfo, String> {
    parse(bytes)
}

type Parsed = BitmapInfo;

fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    if bytes.len() < HEADER_LEN + 4 {
        return Err(format!(
            "{} bytes, shorter than the {}-byte header and checksum",
            bytes.len(),
            HEADER_LEN + 4
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a dirty bitmap (bad magic at byte 0)".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(format!(
            "version {version} at byte 8; this build reads version {VERSION}"
        ));
    }
    let flags = u32_at(12);
    let disk_size = u64_at(16);
    let granularity = u64_at(24);
    let base: [u8; 16] = bytes[32..48].try_into().expect("16 bytes");
    let clusters = u64_at(48);
    if !granularity.is_power_of_two() || !(512..=64 << 20).contains(&granularity) {
        return Err(format!(
            "granularity {granularity} at byte 24 is out of range"
        ));
    }
    if clusters != disk_size.div_ceil(granularity) || clusters > MAX_CLUSTERS {
        return Err(format!(
            "{clusters} clusters at byte 48 do not cover {disk_size} bytes at {granularity}"
        ));
    }
    let words = (clusters as usize).div_ceil(64);
    let expect = HEADER_LEN + words * 8 + 4;
    if bytes.len() != expect {
        return Err(format!(
            "{} bytes where {clusters} clusters take {expect}",
            bytes.len()
        ));
    }
    let body = &bytes[..expect - 4];
    let crc = u32_at(expect - 4);
    if crc32fast::hash(body) != crc {
        return Err(format!("checksum mismatch at byte {}", expect - 4));
    }
    let w: Vec<u64> = body[HEADER_LEN..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let bits = DirtyBitmap::from_words(w, clusters as usize).expect("words for the clusters");
    Ok(Parsed {
        flags,
        disk_size,
        granularity,
        base,
        bits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_bitmap_closed_cleanly_opens_again_with_its_writes() {
        let d = dir();
        let p = d.path().join("disk.bitmap");
        let mut b = PersistentBitmap::create(&p, 10 << 20, 64 << 10, [7; 16]).unwrap();
        b.mark(0, 1);
        b.mark(5 << 20, 128 << 10);
        b.mark(10 << 20, 4096); // past the end: nothing
        b.mark((10 << 20) - 1, 100); // clamped to the last cluster
        let want: Vec<usize> = b.bits().iter_ones().collect();
        assert_eq!(want, vec![0, 80, 81, 159]);
        b.close().unwrap();
        let info = PersistentBitmap::peek(&p).unwrap();
        assert!(!info.in_use());
        assert_eq!(
            (info.disk_size, info.granularity, info.base),
            (10 << 20, 64 << 10, [7; 16])
        );
        assert_eq!(info.bits.iter_ones().collect::<Vec<_>>(), want);
        let b = PersistentBitmap::open(&p, 10 << 20).unwrap();
        assert_eq!(b.bits().iter_ones().collect::<Vec<_>>(), want);
        // Open means in use: a second opener is refused until it is closed.
        assert!(matches!(
            PersistentBitmap::open(&p, 10 << 20),
            Err(BitmapFileError::InUse { .. })
        ));
        b.close().unwrap();
        PersistentBitmap::open(&p, 10 << 20).unwrap();
    }

    #[test]
    fn a_bitmap_its_vmm_did_not_close_is_refused_with_why() {
        let d = dir();
        let p = d.path().join("b");
        let mut b = PersistentBitmap::create(&p, 1 << 20, 4096, [1; 16]).unwrap();
        b.mark(0, 4096);
        b.save().unwrap();
        drop(b); // a crash: never closed
        let e = PersistentBitmap::open(&p, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not closed cleanly"), "{e}");
        assert!(e.to_string().contains("whole disk"), "{e}");
    }

    #[test]
    fn a_bitmap_of_another_disk_size_or_damaged_is_refused() {
        let d = dir();
        let p = d.path().join("b");
        PersistentBitmap::create(&p, 1 << 20, 4096, [1; 16])
            .unwrap()
            .close()
            .unwrap();
        assert!(matches!(
            PersistentBitmap::open(&p, 2 << 20),
            Err(BitmapFileError::SizeMismatch {
                bitmap: 1048576,
                disk: 2097152,
                ..
            })
        ));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[60] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = PersistentBitmap::open(&p, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        std::fs::write(&p, [b'x'; 100]).unwrap();
        let e = PersistentBitmap::open(&p, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn encode_then_parse_gives_the_same_bitmap(
            size in 1u64..(64 << 20),
            gshift in 9u32..20,
            marks in proptest::collection::vec((0u64..(64 << 20), 1u64..(1 << 20)), 0..20),
            flags in 0u32..2,
        ) {
            let g = 1u64 << gshift;
            let mut bits = DirtyBitmap::new(size.div_ceil(g) as usize);
            for (o, l) in marks {
                if o < size {
                    let end = (o + l).min(size);
                    bits.set_range((o / g) as usize..end.div_ceil(g) as usize);
                }
            }
            let bytes = encode(flags, size, g, [3; 16], &bits);
            let p = parse(&bytes).unwrap();
            prop_assert_eq!(p.flags, flags);
            prop_assert_eq!(p.disk_size, size);
            prop_assert_eq!(p.granularity, g);
            prop_assert_eq!(p.bits, bits);
            // Any one byte changed is caught.
            for i in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
                let mut bad = bytes.clone();
                bad[i] ^= 0x40;
                prop_assert!(parse(&bad).is_err(), "byte {}", i);
            }
        }
    }
}
