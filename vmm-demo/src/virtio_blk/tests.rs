use std::sync::Arc;

use proptest::prelude::*;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use super::driver::{self, F_NEXT, F_WRITE, T_IN, T_OUT, read_reg, write_reg};
use super::state::{BLK_STATE_LEN, BlkState};
use super::*;
use crate::guest::abi::disk;
use crate::layout;

const SECTORS: u64 = 64;

struct Rig {
    mem: Arc<GuestMemory>,
    dev: BlkDevice,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    DiskImage::create_sparse(&path, SECTORS * SECTOR_SIZE).unwrap();
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let mut dev = BlkDevice::new(mem.clone(), DiskImage::open(&path).unwrap(), None);
    dev.resume();
    Rig {
        mem,
        dev,
        _dir: dir,
        path,
    }
}

fn status_of(r: &Rig, vcpu: u32) -> u8 {
    r.mem
        .read_obj(GuestAddress(layout::request_page_addr(vcpu) + disk::STATUS))
        .unwrap()
}

#[test]
fn identification_registers_and_config_space() {
    let r = rig();
    assert_eq!(read_reg(&r.dev, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(&r.dev, reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read_reg(&r.dev, reg::VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(read_reg(&r.dev, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(
        read_reg(&r.dev, reg::VIRTIO_MMIO_QUEUE_NUM_MAX),
        u32::from(QUEUE_MAX_SIZE)
    );
    // Capacity, read as the 64-bit field it is, and byte by byte.
    let mut cap = [0u8; 8];
    r.dev.mmio_read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut b = [0u8; 1];
    r.dev.mmio_read(0x100, &mut b);
    assert_eq!(b[0], SECTORS as u8);
    // Past the config space, and registers read at the wrong width: zero, no panic.
    r.dev.mmio_read(0xfff, &mut b);
    assert_eq!(b[0], 0);
    let mut two = [0xffu8; 2];
    r.dev
        .mmio_read(u64::from(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut two);
    assert_eq!(two, [0, 0]);
    r.dev.mmio_read(u64::MAX - 3, &mut cap);
}

#[test]
fn features_are_negotiated_and_version_1_is_required() {
    let mut r = rig();
    let dev = &mut r.dev;
    write_reg(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES), 1);
    write_reg(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read_reg(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES);
    assert_ne!(low & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(low & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(low & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let (ack, drv, fok) = (
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
        VIRTIO_CONFIG_S_DRIVER,
        VIRTIO_CONFIG_S_FEATURES_OK,
    );
    // Without VERSION_1 (a legacy driver), FEATURES_OK does not stick.
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack);
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack | drv);
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack | drv | fok);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_STATUS), ack | drv);
    // A feature the device does not offer: refused too.
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack | drv | fok);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_STATUS) & fok, 0);
    write_reg(
        dev,
        reg::VIRTIO_MMIO_DRIVER_FEATURES,
        1 << VIRTIO_BLK_F_FLUSH,
    );
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, ack | drv | fok);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_STATUS), ack | drv | fok);
    // Features are frozen once accepted; DRIVER_OK without a ready queue keeps the device
    // dead: a notification does nothing.
    write_reg(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0);
    assert_eq!(
        dev.save().driver_features,
        (1 << 32) | (1 << VIRTIO_BLK_F_FLUSH)
    );
    assert_eq!(
        dev.mmio_write(
            u64::from(reg::VIRTIO_MMIO_QUEUE_NOTIFY),
            &0u32.to_le_bytes()
        ),
        WriteEffect::None
    );
    // Reset clears everything.
    write_reg(dev, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(dev.save().driver_features, 0);
}

#[test]
fn queue_registers_are_frozen_once_ready_and_an_invalid_queue_is_refused() {
    let mut r = rig();
    let dev = &mut r.dev;
    // A ring outside guest RAM is not made ready.
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0);
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 1);
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // A size that is not a power of two neither.
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    write_reg(
        dev,
        reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
        disk::DESC_TABLE as u32,
    );
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_NUM, 6);
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    driver::set_up(&r.mem, dev).unwrap();
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY), 1);
    let before = dev.save().queue;
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x9000);
    assert_eq!(dev.save().queue, before);
    // Queue 1 does not exist.
    write_reg(dev, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    assert_eq!(read_reg(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn sectors_written_read_back_and_land_in_the_image() {
    let mut r = rig();
    for s in [0, 7, SECTORS - 1] {
        driver::write_sector(&r.mem, &mut r.dev, 1, s, 42).unwrap();
        driver::check_sector(&r.mem, &mut r.dev, 1, s, 42).unwrap();
    }
    let e = driver::check_sector(&r.mem, &mut r.dev, 1, 7, 43).unwrap_err();
    assert!(matches!(e, DriverError::BadSector { sector: 7, .. }), "{e}");
    let mut b = vec![0u8; 512];
    r.dev.disk().read_at(&mut b, 7 * 512).unwrap();
    assert_eq!(&b[..8], &42u64.to_le_bytes());
    assert_eq!(&b[24..32], b"demodisk");
    assert!(b[32..].iter().all(|&x| x == 0));
    let st = r.dev.stats();
    assert_eq!(
        (st.requests, st.sectors_written, st.sectors_read),
        (7, 3, 4)
    );
    assert_eq!(st.interrupts, st.requests);
    assert_eq!(
        st.acks, st.requests,
        "the driver acknowledged every interrupt"
    );
    assert_eq!(st.errors, 0);
}

#[test]
fn a_request_past_the_end_is_an_io_error_and_an_unknown_type_unsupported() {
    let mut r = rig();
    let buf = layout::request_page_addr(0) + disk::WRITE_BUF;
    let e = driver::request(&r.mem, &mut r.dev, 0, T_OUT, buf, SECTORS).unwrap_err();
    assert_eq!(
        e,
        DriverError::Status {
            sector: SECTORS,
            status: VIRTIO_BLK_S_IOERR as u8
        }
    );
    let e = driver::request(&r.mem, &mut r.dev, 0, T_IN, buf, u64::MAX).unwrap_err();
    assert!(matches!(e, DriverError::Status { status: 1, .. }), "{e}");
    let e = driver::request(&r.mem, &mut r.dev, 0, 77, buf, 0).unwrap_err();
    assert!(matches!(e, DriverError::Status { status, .. } if status == VIRTIO_BLK_S_UNSUPP as u8));
    assert_eq!(r.dev.stats().errors, 3);
}

/// A chain of the request page's header, `data` descriptors and the status byte.
fn header(r: &Rig, kind: u32, sector: u64) -> u64 {
    let h = layout::request_page_addr(0) + disk::HEADER;
    r.mem.write_obj(kind, GuestAddress(h)).unwrap();
    r.mem.write_obj(0u32, GuestAddress(h + 4)).unwrap();
    r.mem.write_obj(sector, GuestAddress(h + 8)).unwrap();
    h
}

#[test]
fn get_id_flush_discard_and_write_zeroes() {
    let mut r = rig();
    driver::set_up(&r.mem, &mut r.dev).unwrap();
    let page = layout::request_page_addr(0);
    let status = page + disk::STATUS;
    let buf = page + disk::READ_BUF;
    // GET_ID: 20 bytes.
    let h = header(&r, VIRTIO_BLK_T_GET_ID, 0);
    driver::submit(
        &r.mem,
        &mut r.dev,
        &[
            (h, 16, F_NEXT),
            (buf, 20, F_NEXT | F_WRITE),
            (status, 1, F_WRITE),
        ],
    )
    .unwrap();
    assert_eq!(status_of(&r, 0), 0);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(buf)).unwrap();
    assert_eq!(&id, DEVICE_ID);
    // FLUSH.
    let h = header(&r, VIRTIO_BLK_T_FLUSH, 0);
    driver::submit(&r.mem, &mut r.dev, &[(h, 16, F_NEXT), (status, 1, F_WRITE)]).unwrap();
    assert_eq!(status_of(&r, 0), 0);
    assert_eq!(r.dev.stats().flushes, 1);
    // Sectors 3..6 written, then zeroed by WRITE_ZEROES (unmap allowed) and DISCARD.
    for s in 3..6 {
        driver::write_sector(&r.mem, &mut r.dev, 0, s, 1).unwrap();
    }
    let seg = page + disk::WRITE_BUF;
    for (kind, start, count, flags, want) in [
        (VIRTIO_BLK_T_WRITE_ZEROES, 3u64, 2u32, 1u32, VIRTIO_BLK_S_OK),
        (VIRTIO_BLK_T_DISCARD, 5, 1, 0, VIRTIO_BLK_S_OK),
        // Unmap is not a discard flag; reserved flags; past the end.
        (VIRTIO_BLK_T_DISCARD, 5, 1, 1, VIRTIO_BLK_S_UNSUPP),
        (VIRTIO_BLK_T_WRITE_ZEROES, 5, 1, 4, VIRTIO_BLK_S_UNSUPP),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            SECTORS - 1,
            2,
            0,
            VIRTIO_BLK_S_IOERR,
        ),
    ] {
        r.mem.write_obj(start, GuestAddress(seg)).unwrap();
        r.mem.write_obj(count, GuestAddress(seg + 8)).unwrap();
        r.mem.write_obj(flags, GuestAddress(seg + 12)).unwrap();
        let h = header(&r, kind, 0);
        driver::submit(
            &r.mem,
            &mut r.dev,
            &[(h, 16, F_NEXT), (seg, 16, F_NEXT), (status, 1, F_WRITE)],
        )
        .unwrap();
        assert_eq!(
            u32::from(status_of(&r, 0)),
            want,
            "{kind} {start} {count} {flags}"
        );
    }
    let mut b = vec![0xffu8; 3 * 512];
    r.dev.disk().read_at(&mut b, 3 * 512).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn a_chain_without_a_status_byte_is_returned_with_length_0() {
    let mut r = rig();
    driver::set_up(&r.mem, &mut r.dev).unwrap();
    let h = header(&r, VIRTIO_BLK_T_OUT, 0);
    let want = driver::submit(&r.mem, &mut r.dev, &[(h, 16, 0)]).unwrap();
    let used: u16 = r.mem.read_obj(GuestAddress(disk::USED_RING + 2)).unwrap();
    assert_eq!(used, want);
    let len: u32 = r.mem.read_obj(GuestAddress(disk::USED_RING + 8)).unwrap();
    assert_eq!(len, 0);
    assert_eq!(r.dev.stats().errors, 1);
}

#[test]
fn a_paused_device_takes_no_request_and_flushes() {
    let mut r = rig();
    driver::set_up(&r.mem, &mut r.dev).unwrap();
    r.dev.pause().unwrap();
    let buf = layout::request_page_addr(0) + disk::WRITE_BUF;
    let e = driver::request(&r.mem, &mut r.dev, 0, T_OUT, buf, 1).unwrap_err();
    assert_eq!(e, DriverError::NotCompleted(1));
    assert_eq!(r.dev.stats().requests, 0);
    // Resumed, the request made available meanwhile is taken.
    r.dev.resume();
    assert_eq!(r.dev.process_all(), 1);
}

#[test]
fn restored_state_continues_the_in_flight_request() {
    let mut r = rig();
    driver::set_up(&r.mem, &mut r.dev).unwrap();
    driver::write_sector(&r.mem, &mut r.dev, 0, 2, 5).unwrap();
    // The guest makes a write available; the source pauses before taking it.
    r.dev.pause().unwrap();
    assert!(driver::write_sector(&r.mem, &mut r.dev, 0, 3, 5).is_err());
    let saved = r.dev.save();
    assert_eq!(saved.queue.next_avail, 1);
    let blob = saved.to_bytes();
    assert_eq!(blob.len(), BLK_STATE_LEN);
    // The destination: same RAM (as migrated), same image (shared storage).
    let mut dst = BlkDevice::new(r.mem.clone(), DiskImage::open(&r.path).unwrap(), None);
    dst.load(&BlkState::from_bytes(&blob).unwrap()).unwrap();
    assert_eq!(dst.save(), saved);
    dst.resume();
    assert_eq!(dst.process_all(), 1, "the in-flight write completes there");
    let used: u16 = r.mem.read_obj(GuestAddress(disk::USED_RING + 2)).unwrap();
    assert_eq!(used, 2);
    assert_eq!(read_reg(&dst, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    driver::check_sector(&r.mem, &mut dst, 0, 3, 5).unwrap();
    // A destination whose image has another size refuses the state.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("small.raw");
    DiskImage::create_sparse(&other, 8 * 512).unwrap();
    let mut small = BlkDevice::new(r.mem.clone(), DiskImage::open(&other).unwrap(), None);
    assert!(matches!(
        small.load(&saved),
        Err(state::BlkStateError::Capacity {
            source_sectors: SECTORS,
            local: 8
        })
    ));
}

#[test]
fn images_of_no_whole_sector_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.raw");
    std::fs::write(&p, [0u8; 700]).unwrap();
    assert!(matches!(
        DiskImage::open(&p),
        Err(DiskError::Size { bytes: 700, .. })
    ));
    assert!(DiskImage::create_sparse(&dir.path().join("z"), 0).is_err());
    let e = DiskImage::open(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

fn arb_state() -> impl Strategy<Value = BlkState> {
    (
        (any::<u8>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (any::<bool>(), 0u32..4, any::<u32>(), any::<u64>()),
        (
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
            any::<u16>(),
            any::<u16>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(|(a, b, c, d)| BlkState {
            status: u32::from(a.0 & 0xcf),
            device_features_sel: a.1,
            driver_features_sel: a.2,
            queue_sel: a.3,
            driver_features: if b.0 { DEVICE_FEATURES } else { 1 << 32 },
            interrupt_status: b.1,
            config_generation: b.2,
            capacity: b.3,
            queue: virtio_queue::QueueState {
                max_size: c.0,
                size: c.1,
                ready: c.2,
                event_idx_enabled: false,
                next_avail: c.3,
                next_used: c.4,
                desc_table: d.0,
                avail_ring: d.1,
                used_ring: d.2,
            },
        })
}

proptest! {
    #[test]
    fn state_round_trips(s in arb_state()) {
        let b = s.to_bytes();
        prop_assert_eq!(b.len(), BLK_STATE_LEN);
        prop_assert_eq!(BlkState::from_bytes(&b), Ok(s));
    }

    #[test]
    fn state_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..120)) {
        let r = rig();
        if let Ok(s) = BlkState::from_bytes(&data) {
            let mut dev = BlkDevice::new(r.mem.clone(), DiskImage::open(&r.path).unwrap(), None);
            if dev.load(&s).is_ok() {
                dev.resume();
                dev.process_all();
            }
        }
    }

    /// Arbitrary descriptors (addresses anywhere, any length and flags, indirect ones
    /// included) and an arbitrary header: the device answers or returns the chain, never
    /// panics, and never writes outside the buffers the chain gives it.
    #[test]
    fn never_panics_on_arbitrary_descriptor_chains(
        descs in proptest::collection::vec((prop_oneof![0u64..(1 << 20), any::<u64>()], prop_oneof![0u32..2048, any::<u32>()], any::<u16>()), 1..8),
        kind in prop_oneof![0u32..16, any::<u32>()],
        sector in prop_oneof![0u64..80, any::<u64>()],
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut r = rig();
        driver::set_up(&r.mem, &mut r.dev).unwrap();
        header(&r, kind, sector);
        r.mem.write_slice(&garbage, GuestAddress(layout::request_page_addr(0) + disk::WRITE_BUF)).unwrap();
        let descs: Vec<(u64, u32, u16)> = descs;
        let _ = driver::submit(&r.mem, &mut r.dev, &descs);
        prop_assert!(r.dev.stats().requests <= 1);
    }

    /// Arbitrary bytes in the descriptor table and the rings themselves.
    #[test]
    fn never_panics_on_arbitrary_ring_memory(
        table in proptest::collection::vec(any::<u8>(), 128),
        avail in proptest::collection::vec(any::<u8>(), 22),
    ) {
        let mut r = rig();
        driver::set_up(&r.mem, &mut r.dev).unwrap();
        r.mem.write_slice(&table, GuestAddress(disk::DESC_TABLE)).unwrap();
        r.mem.write_slice(&avail, GuestAddress(disk::DRIVER_PAGE + disk::AVAIL_RING)).unwrap();
        write_reg(&mut r.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    #[test]
    fn registers_never_panic(ops in proptest::collection::vec((any::<bool>(), 0u64..0x200, any::<u32>(), 1usize..9), 0..64)) {
        let mut r = rig();
        for (write, off, v, len) in ops {
            let bytes = u64::from(v).to_le_bytes();
            if write {
                if r.dev.mmio_write(off, &bytes[..len]) == WriteEffect::Notify {
                    r.dev.process_all();
                }
            } else {
                let mut b = vec![0u8; len];
                r.dev.mmio_read(off, &mut b);
            }
        }
    }
}

#[test]
fn observers_are_told_of_every_write_and_zeroing_after_it_reached_the_image() {
    use std::sync::Mutex;
    struct Log(Mutex<Vec<(&'static str, u64, u64)>>);
    impl WriteObserver for Log {
        fn wrote(&self, offset: u64, len: u64) {
            self.0.lock().unwrap().push(("wrote", offset, len));
        }
        fn zeroed(&self, offset: u64, len: u64) {
            self.0.lock().unwrap().push(("zeroed", offset, len));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    DiskImage::create_sparse(&path, 64 * SECTOR_SIZE).unwrap();
    let img = DiskImage::open(&path).unwrap();
    let log = Arc::new(Log(Mutex::new(Vec::new())));
    let key = img.observers().add(log.clone());
    img.write_at(&[1; 1024], 4096).unwrap();
    img.zero(8192, 512).unwrap();
    img.observers().remove(&key);
    img.write_at(&[1; 512], 0).unwrap();
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![("wrote", 4096, 1024), ("zeroed", 8192, 512)]
    );
}
