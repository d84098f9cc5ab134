//! The `virtio-blk` device-state blob (version 1, as every blob of this VMM: see
//! [`crate::state`]): 80 bytes, little-endian, fixed layout.
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..4 | device status |
//! | 4..8 | DeviceFeaturesSel |
//! | 8..12 | DriverFeaturesSel |
//! | 12..16 | QueueSel |
//! | 16..24 | driver features (negotiated) |
//! | 24..28 | InterruptStatus |
//! | 28..32 | ConfigGeneration |
//! | 32..40 | capacity in sectors (the destination's image must have as many) |
//! | 40..42 | queue max size |
//! | 42..44 | queue size |
//! | 44 | queue ready (0 or 1) |
//! | 45 | event index enabled (0 or 1) |
//! | 46..48 | next_avail |
//! | 48..50 | next_used |
//! | 50..56 | reserved, 0 |
//! | 56..64 | descriptor table address |
//! | 64..72 | available ring address |
//! | 72..80 | used ring address |
//!
//! `next_avail` is where the device resumes taking requests: those the guest made
//! available on the source and the source never took are processed on the destination.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{DEVICE_FEATURES, QUEUE_MAX_SIZE};
use crate::guest::GuestMemory;

/// Id of the virtio-blk blob.
pub const BLK_ID: &str = "virtio-blk";
/// Size of the blob.
pub const BLK_STATE_LEN: usize = 80;

/// The device's state as migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkState {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Sectors of the disk.
    pub capacity: u64,
    /// Queue 0.
    pub queue: QueueState,
}

/// A blob that is not a virtio-blk state this device can take. Each says which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlkStateError {
    /// Not exactly [`BLK_STATE_LEN`] bytes.
    #[error("virtio-blk state of {0} bytes, expected {BLK_STATE_LEN}")]
    Length(usize),
    /// A field holds a value no device state can have.
    #[error("virtio-blk state: {field} is {value:#x}: {why}")]
    Field {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The source's disk has another size than this side's image.
    #[error(
        "virtio-blk state: the source's disk has {source_sectors} sectors, this image {local} (not the same image?)"
    )]
    Capacity {
        /// The blob's.
        source_sectors: u64,
        /// This image's.
        local: u64,
    },
    /// The queue does not fit this device or this guest's RAM.
    #[error("virtio-blk state: queue 0 ({what})")]
    Queue {
        /// What virtio-queue said, or what is out of RAM.
        what: String,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl BlkState {
    /// The blob bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let q = &self.queue;
        let mut b = Vec::with_capacity(BLK_STATE_LEN);
        for v in [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.driver_features.to_le_bytes());
        b.extend_from_slice(&self.interrupt_status.to_le_bytes());
        b.extend_from_slice(&self.config_generation.to_le_bytes());
        b.extend_from_slice(&self.capacity.to_le_bytes());
        b.extend_from_slice(&q.max_size.to_le_bytes());
        b.extend_from_slice(&q.size.to_le_bytes());
        b.push(u8::from(q.ready));
        b.push(u8::from(q.event_idx_enabled));
        b.extend_from_slice(&q.next_avail.to_le_bytes());
        b.extend_from_slice(&q.next_used.to_le_bytes());
        b.extend_from_slice(&[0u8; 6]);
        for a in [q.desc_table, q.avail_ring, q.used_ring] {
            b.extend_from_slice(&a.to_le_bytes());
        }
        b
    }

    /// Decodes a blob, checking what can be checked without the device: length, the
    /// reserved bytes, booleans, status bits, features.
    pub fn from_bytes(b: &[u8]) -> Result<BlkState, BlkStateError> {
        if b.len() != BLK_STATE_LEN {
            return Err(BlkStateError::Length(b.len()));
        }
        let field = |field, value: u64, why| BlkStateError::Field { field, value, why };
        let flag = |name, v: u8| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(field(name, u64::from(v), "a flag is 0 or 1")),
        };
        if b[50..56].iter().any(|&x| x != 0) {
            return Err(field("reserved bytes 50..56", 0, "must be zero"));
        }
        let s = BlkState {
            status: u32_at(b, 0),
            device_features_sel: u32_at(b, 4),
            driver_features_sel: u32_at(b, 8),
            queue_sel: u32_at(b, 12),
            driver_features: u64_at(b, 16),
            interrupt_status: u32_at(b, 24),
            config_generation: u32_at(b, 28),
            capacity: u64_at(b, 32),
            queue: QueueState {
                max_size: u16_at(b, 40),
                size: u16_at(b, 42),
                ready: flag("queue ready", b[44])?,
                event_idx_enabled: flag("event index", b[45])?,
                next_avail: u16_at(b, 46),
                next_used: u16_at(b, 48),
                desc_table: u64_at(b, 56),
                avail_ring: u64_at(b, 64),
                used_ring: u64_at(b, 72),
            },
        };
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED
            | VIRTIO_CONFIG_S_NEEDS_RESET;
        if s.status & !known != 0 {
            return Err(field("status", u64::from(s.status), "unknown status bits"));
        }
        if s.driver_features & !DEVICE_FEATURES != 0 {
            return Err(field(
                "driver features",
                s.driver_features,
                "features this device does not offer",
            ));
        }
        if s.interrupt_status & !3 != 0 {
            return Err(field(
                "interrupt status",
                u64::from(s.interrupt_status),
                "only bits 0 (used buffer) and 1 (config change) exist",
            ));
        }
        Ok(s)
    }

    /// Checks the state against a device with `capacity` sectors over `mem`, and builds
    /// its queue.
    pub fn validate(&self, capacity: u64, mem: &GuestMemory) -> Result<Queue, BlkStateError> {
        if self.capacity != capacity {
            return Err(BlkStateError::Capacity {
                source_sectors: self.capacity,
                local: capacity,
            });
        }
        if self.queue.max_size != QUEUE_MAX_SIZE {
            return Err(BlkStateError::Queue {
                what: format!(
                    "max size {}, this device's is {QUEUE_MAX_SIZE}",
                    self.queue.max_size
                ),
            });
        }
        if self.queue.event_idx_enabled {
            return Err(BlkStateError::Queue {
                what: "event index on, a feature this device does not offer".into(),
            });
        }
        let q = Queue::try_from(self.queue).map_err(|e| BlkStateError::Queue {
            what: e.to_string(),
        })?;
        if q.ready() && !q.is_valid(mem) {
            return Err(BlkStateError::Queue {
                what: format!(
                    "ready, but its rings ({:#x}, {:#x}, {:#x}, size {}) are not in guest RAM",
                    self.queue.desc_table,
                    self.queue.avail_ring,
                    self.queue.used_ring,
                    self.queue.size
                ),
            });
        }
        Ok(q)
    }
}
