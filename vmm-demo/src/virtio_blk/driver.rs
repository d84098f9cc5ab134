//! The guest's virtio-blk driver in Rust: what `guest/program.rs` does, step for step,
//! over the same guest RAM (the same rings, descriptors and buffers, at the addresses of
//! [`crate::guest::abi::disk`]) and through the same registers. The software vCPU runs it, so that a
//! software guest drives the very device model a KVM guest does; the unit tests drive the
//! device with it too.
//!
//! The caller holds the device's lock for a whole request, which is what the guest's queue
//! lock in the driver page gives a KVM guest (the software vCPU never takes that lock:
//! a request of its own never spans a pause, so the word stays 0).

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use super::{BlkDevice, MMIO_MAGIC, MMIO_VERSION, WriteEffect};
use crate::guest::GuestMemory;
use crate::guest::abi::disk;
use crate::layout;

/// A request type: read.
pub const T_IN: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
/// A request type: write.
pub const T_OUT: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;

/// What the driver found wrong: the same failures the guest program prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The device is not the virtio-blk device the driver expects.
    #[error("disk error: no virtio-blk device as expected ({0})")]
    NoDevice(&'static str),
    /// A request completed with a status other than OK.
    #[error("disk error: a request on sector {sector} failed with status {status}")]
    Status {
        /// The request's sector.
        sector: u64,
        /// Its status byte.
        status: u8,
    },
    /// The device did not complete a request it was notified of.
    #[error("disk error: the request on sector {0} was not completed")]
    NotCompleted(u64),
    /// A request completed without the used-buffer interrupt.
    #[error("disk error: a request completed without an interrupt")]
    NoInterrupt,
    /// A sector read back holds something else than what this pass wrote.
    #[error("disk error: sector {sector} holds {found:x?}, expected {expected:x?}")]
    BadSector {
        /// The sector.
        sector: u64,
        /// Its first four words.
        found: [u64; 4],
        /// What the pass wrote.
        expected: [u64; 4],
    },
    /// Guest RAM could not be read or written.
    #[error("disk driver: guest RAM at {gpa:#x}: {message}")]
    Memory {
        /// Where.
        gpa: u64,
        /// What vm-memory said.
        message: String,
    },
}

fn mem_err(gpa: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> DriverError {
    move |e| DriverError::Memory {
        gpa,
        message: e.to_string(),
    }
}

fn get<T: vm_memory::ByteValued>(mem: &GuestMemory, gpa: u64) -> Result<T, DriverError> {
    mem.read_obj(GuestAddress(gpa)).map_err(mem_err(gpa))
}

fn put<T: vm_memory::ByteValued>(mem: &GuestMemory, gpa: u64, v: T) -> Result<(), DriverError> {
    mem.write_obj(v, GuestAddress(gpa)).map_err(mem_err(gpa))
}

/// Reads a 32-bit register.
pub fn read_reg(dev: &BlkDevice, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register; a queue notification is processed at once, as the software
/// vCPU's MMIO write does.
pub fn write_reg(dev: &mut BlkDevice, offset: u32, v: u32) {
    if dev.mmio_write(u64::from(offset), &v.to_le_bytes()) == WriteEffect::Notify {
        dev.process_all();
    }
}

/// Sets the device up as the guest does (section 3.1.1): reset, ACKNOWLEDGE, DRIVER,
/// VIRTIO_F_VERSION_1 alone, FEATURES_OK read back, queue 0 of
/// [`disk::QUEUE_SIZE`] entries at the driver's rings, DRIVER_OK; then marks the driver
/// page ready.
pub fn set_up(mem: &GuestMemory, dev: &mut BlkDevice) -> Result<(), DriverError> {
    use virtio_bindings::virtio_config::*;
    if read_reg(dev, reg::VIRTIO_MMIO_MAGIC_VALUE) != MMIO_MAGIC {
        return Err(DriverError::NoDevice("magic"));
    }
    if read_reg(dev, reg::VIRTIO_MMIO_VERSION) != MMIO_VERSION {
        return Err(DriverError::NoDevice("version"));
    }
    if read_reg(dev, reg::VIRTIO_MMIO_DEVICE_ID) != virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK {
        return Err(DriverError::NoDevice("device id"));
    }
    let (ack, drv) = (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER);
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, 0);
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack);
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack | drv);
    write_reg(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    if read_reg(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES) & 1 == 0 {
        return Err(DriverError::NoDevice("VIRTIO_F_VERSION_1"));
    }
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0);
    let fok = VIRTIO_CONFIG_S_FEATURES_OK;
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack | drv | fok);
    if read_reg(dev, reg::VIRTIO_MMIO_STATUS) & fok == 0 {
        return Err(DriverError::NoDevice("FEATURES_OK refused"));
    }
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    if u64::from(read_reg(dev, reg::VIRTIO_MMIO_QUEUE_NUM_MAX)) < disk::QUEUE_SIZE {
        return Err(DriverError::NoDevice("queue too small"));
    }
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_NUM, disk::QUEUE_SIZE as u32);
    for (low, high, addr) in [
        (
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH,
            disk::DESC_TABLE,
        ),
        (
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            disk::DRIVER_PAGE + disk::AVAIL_RING,
        ),
        (
            reg::VIRTIO_MMIO_QUEUE_USED_LOW,
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH,
            disk::USED_RING,
        ),
    ] {
        write_reg(dev, low, addr as u32);
        write_reg(dev, high, (addr >> 32) as u32);
    }
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    write_reg(
        dev,
        reg::VIRTIO_MMIO_STATUS,
        ack | drv | fok | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    put(mem, disk::DRIVER_PAGE + disk::READY, 1u64)
}

/// Makes the chain whose descriptors are `descs` (`(addr, len, flags)`, chained in order
/// from descriptor 0) available and notifies the device; returns the used ring's index
/// the chain's completion brings. No check of the result: for tests of arbitrary chains.
pub fn submit(
    mem: &GuestMemory,
    dev: &mut BlkDevice,
    descs: &[(u64, u32, u16)],
) -> Result<u16, DriverError> {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let d = disk::DESC_TABLE + 16 * i as u64;
        put(mem, d, addr)?;
        put(mem, d + 8, len)?;
        put(mem, d + 12, flags)?;
        put(mem, d + 14, (i as u16 + 1) % disk::QUEUE_SIZE as u16)?;
    }
    let avail = disk::DRIVER_PAGE + disk::AVAIL_RING;
    let idx: u16 = get(mem, avail + 2)?;
    let slot = u64::from(idx) % disk::QUEUE_SIZE;
    put(mem, avail + 4 + 2 * slot, 0u16)?;
    let next = idx.wrapping_add(1);
    mem.store(next, GuestAddress(avail + 2), Ordering::Release)
        .map_err(mem_err(avail + 2))?;
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    Ok(next)
}

/// One request of vCPU `vcpu`: `kind` on `sector`, one sector at `buf`, through its
/// request page; checks completion, the interrupt (and acknowledges it) and the status.
pub fn request(
    mem: &GuestMemory,
    dev: &mut BlkDevice,
    vcpu: u32,
    kind: u32,
    buf: u64,
    sector: u64,
) -> Result<(), DriverError> {
    let page = layout::request_page_addr(vcpu);
    put(mem, page + disk::HEADER, kind)?;
    put(mem, page + disk::HEADER + 4, 0u32)?;
    put(mem, page + disk::HEADER + 8, sector)?;
    put(mem, page + disk::STATUS, 0xffu8)?;
    if get::<u64>(mem, disk::DRIVER_PAGE + disk::READY)? == 0 {
        set_up(mem, dev)?;
    }
    let data_flags = if kind == T_IN {
        F_NEXT | F_WRITE
    } else {
        F_NEXT
    };
    let want = submit(
        mem,
        dev,
        &[
            (page + disk::HEADER, 16, F_NEXT),
            (buf, disk::SECTOR_SIZE as u32, data_flags),
            (page + disk::STATUS, 1, F_WRITE),
        ],
    )?;
    let used: u16 = mem
        .load(GuestAddress(disk::USED_RING + 2), Ordering::Acquire)
        .map_err(mem_err(disk::USED_RING + 2))?;
    if used != want {
        return Err(DriverError::NotCompleted(sector));
    }
    let isr = read_reg(dev, reg::VIRTIO_MMIO_INTERRUPT_STATUS);
    if isr & reg::VIRTIO_MMIO_INT_VRING == 0 {
        return Err(DriverError::NoInterrupt);
    }
    write_reg(dev, reg::VIRTIO_MMIO_INTERRUPT_ACK, isr);
    match get::<u8>(mem, page + disk::STATUS)? {
        0 => Ok(()),
        status => Err(DriverError::Status { sector, status }),
    }
}

/// The first four words of `sector` as vCPU `vcpu` writes it in pass `pass`.
pub fn sector_words(vcpu: u32, sector: u64, pass: u64) -> [u64; 4] {
    [pass, u64::from(vcpu), sector, disk::MAGIC]
}

/// Writes `sector` for pass `pass` of vCPU `vcpu`, as the guest's write loop does.
pub fn write_sector(
    mem: &GuestMemory,
    dev: &mut BlkDevice,
    vcpu: u32,
    sector: u64,
    pass: u64,
) -> Result<(), DriverError> {
    let buf = layout::request_page_addr(vcpu) + disk::WRITE_BUF;
    for (i, w) in sector_words(vcpu, sector, pass).into_iter().enumerate() {
        put(mem, buf + 8 * i as u64, w)?;
    }
    request(mem, dev, vcpu, T_OUT, buf, sector)
}

/// Reads `sector` back and checks it holds what pass `pass` of vCPU `vcpu` wrote.
pub fn check_sector(
    mem: &GuestMemory,
    dev: &mut BlkDevice,
    vcpu: u32,
    sector: u64,
    pass: u64,
) -> Result<(), DriverError> {
    let buf = layout::request_page_addr(vcpu) + disk::READ_BUF;
    request(mem, dev, vcpu, T_IN, buf, sector)?;
    let mut found = [0u64; 4];
    for (i, w) in found.iter_mut().enumerate() {
        *w = get(mem, buf + 8 * i as u64)?;
    }
    let expected = sector_words(vcpu, sector, pass);
    if found != expected {
        return Err(DriverError::BadSector {
            sector,
            found,
            expected,
        });
    }
    Ok(())
}
