//! One virtio-blk request (section 5.2.6): the 16-byte header `{ le32 type; le32
//! reserved; le64 sector }` in the readable part of the chain, the data (readable for a
//! write, writable for a read), and the status byte, the last writable byte.
//!
//! Data moves between guest RAM and the image through a bounded buffer (never a length a
//! descriptor claims), and never from guest RAM straight into a syscall: on a post-copy
//! destination a page may be missing, and a userfault taken in the device thread's own
//! copy is served like a vCPU's.

use std::io::{Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;

use super::{DEVICE_ID, DiskImage, MAX_DISCARD_SECTORS, SECTOR_SIZE};
use crate::guest::GuestMemory;

/// Bytes moved between RAM and the image at a time.
const CHUNK: usize = 64 << 10;

/// A request's outcome as the status byte says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// What executing a chain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Done {
    /// The status written back; `None` if the chain had no byte to write it to.
    pub status: Option<Status>,
    /// Bytes written into the chain's writable buffers, status included: the used length.
    pub used_len: u32,
    pub sectors_read: u64,
    pub sectors_written: u64,
    pub flushed: bool,
}

/// Why a request failed, for the log: the status byte is all the guest learns.
#[derive(Debug)]
enum Failure {
    Status(Status, String),
}

fn ioerr(why: impl Into<String>) -> Failure {
    Failure::Status(Status::IoErr, why.into())
}

/// The byte range `sector .. sector + bytes / 512` of the image, or why not.
fn range(disk: &DiskImage, sector: u64, bytes: u64) -> Result<u64, Failure> {
    if bytes % SECTOR_SIZE != 0 {
        return Err(ioerr(format!(
            "{bytes} data bytes are not a whole number of sectors"
        )));
    }
    let end = sector
        .checked_add(bytes / SECTOR_SIZE)
        .filter(|&e| e <= disk.sectors())
        .ok_or_else(|| {
            ioerr(format!(
                "sectors {sector}+{} reach past the end of the {}-sector disk",
                bytes / SECTOR_SIZE,
                disk.sectors()
            ))
        })?;
    let _ = end;
    Ok(sector * SECTOR_SIZE)
}

/// Executes the request `chain` describes against `disk`, writes its status byte, and says
/// what to put in the used ring. Never panics, whatever the chain and RAM hold.
pub(crate) fn execute(
    disk: &DiskImage,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Done {
    let mut done = Done {
        status: None,
        used_len: 0,
        sectors_read: 0,
        sectors_written: 0,
        flushed: false,
    };
    let (reader, writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            tracing::warn!("virtio-blk: a descriptor chain outside guest RAM, returned unanswered");
            return done;
        }
    };
    let mut writer = writer;
    let writable = writer.available_bytes();
    if writable == 0 {
        tracing::warn!("virtio-blk: a request with no byte for its status, returned unanswered");
        return done;
    }
    // Everything before the last writable byte is data; the last is the status.
    let Ok(mut status_w) = writer.split_at(writable - 1) else {
        return done;
    };
    let status = match run(disk, reader, &mut writer, &mut done) {
        Ok(()) => Status::Ok,
        Err(Failure::Status(s, why)) => {
            tracing::debug!(status = ?s, %why, "virtio-blk: request failed");
            s
        }
    };
    if status_w.write_all(&[status.byte()]).is_ok() {
        done.status = Some(status);
    }
    done.used_len =
        u32::try_from(writer.bytes_written() + status_w.bytes_written()).unwrap_or(u32::MAX);
    done
}

fn run(
    disk: &DiskImage,
    mut reader: virtio_queue::Reader<'_, impl vm_memory::bitmap::BitmapSlice>,
    writer: &mut virtio_queue::Writer<'_, impl vm_memory::bitmap::BitmapSlice>,
    done: &mut Done,
) -> Result<(), Failure> {
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| ioerr("the chain's readable part is shorter than a request header"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    match kind {
        VIRTIO_BLK_T_IN => {
            let bytes = writer.available_bytes() as u64;
            let mut at = range(disk, sector, bytes)?;
            let mut buf = vec![0u8; CHUNK.min(bytes as usize)];
            let mut left = bytes;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                disk.read_at(&mut buf[..n], at)
                    .map_err(|e| ioerr(e.to_string()))?;
                writer
                    .write_all(&buf[..n])
                    .map_err(|e| ioerr(format!("writing read data into guest RAM: {e}")))?;
                at += n as u64;
                left -= n as u64;
            }
            done.sectors_read += bytes / SECTOR_SIZE;
            Ok(())
        }
        VIRTIO_BLK_T_OUT => {
            let bytes = reader.available_bytes() as u64;
            let mut at = range(disk, sector, bytes)?;
            let mut buf = vec![0u8; CHUNK.min(bytes as usize)];
            let mut left = bytes;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                reader
                    .read_exact(&mut buf[..n])
                    .map_err(|e| ioerr(format!("reading write data from guest RAM: {e}")))?;
                disk.write_at(&buf[..n], at)
                    .map_err(|e| ioerr(e.to_string()))?;
                at += n as u64;
                left -= n as u64;
            }
            done.sectors_written += bytes / SECTOR_SIZE;
            Ok(())
        }
        VIRTIO_BLK_T_FLUSH => {
            done.flushed = true;
            disk.flush().map_err(|e| ioerr(e.to_string()))
        }
        VIRTIO_BLK_T_GET_ID => {
            // The id is up to 20 bytes; a shorter buffer gets what fits.
            let n = writer.available_bytes().min(VIRTIO_BLK_ID_BYTES as usize);
            writer
                .write_all(&DEVICE_ID[..n])
                .map_err(|e| ioerr(format!("writing the id into guest RAM: {e}")))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            // One segment `{ le64 sector; le32 num_sectors; le32 flags }` (the config's
            // max_*_seg is 1); bit 0 of flags is "unmap".
            if reader.available_bytes() != 16 {
                return Err(Failure::Status(
                    Status::Unsupp,
                    format!(
                        "{} bytes of segments: the device takes exactly one 16-byte segment",
                        reader.available_bytes()
                    ),
                ));
            }
            let mut seg = [0u8; 16];
            reader
                .read_exact(&mut seg)
                .map_err(|e| ioerr(format!("reading the segment: {e}")))?;
            let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            let unmap_allowed = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            if flags & !1 != 0 || (flags & 1 != 0 && !unmap_allowed) || count > MAX_DISCARD_SECTORS
            {
                return Err(Failure::Status(
                    Status::Unsupp,
                    format!("segment flags {flags:#x}, {count} sectors"),
                ));
            }
            let bytes = u64::from(count) * SECTOR_SIZE;
            let at = range(disk, start, bytes)?;
            // Discarded sectors may read as anything; these read as zero, which is what
            // write-zeroes needs too: one operation for both.
            disk.zero(at, bytes).map_err(|e| ioerr(e.to_string()))
        }
        other => Err(Failure::Status(
            Status::Unsupp,
            format!("request type {other}"),
        )),
    }
}
