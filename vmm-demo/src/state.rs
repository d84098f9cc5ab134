//! Device-state blobs: what each one holds, its format and version, and how it is checked.
//!
//! | id | version | content |
//! |----|---------|---------|
//! | `machine` | 1 | JSON: the [`VmConfig`](crate::layout::VmConfig) and guest kind; the destination refuses a mismatch |
//! | `serial` | 1 | per vCPU, the partial console line (u32 count, then u16 length + bytes each) |
//! | `vcpuN` | 1 | a KVM vCPU: sections (below) |
//! | `pic-master`, `pic-slave`, `ioapic` | 1 | `struct kvm_irqchip` as the kernel gives it |
//! | `pit` | 1 | `struct kvm_pit_state2` |
//! | `kvmclock` | 1 | `struct kvm_clock_data` |
//! | `swcpuN` | 1 | a software vCPU: its segment index and next page address, u64 LE each, then, when not 0, how many sectors of its share it wrote in this pass's disk workload (u64 LE): 16 or 24 bytes |
//! | `virtio-blk` | 1 | the disk's device: see [`crate::virtio_blk::state`] |
//!
//! A KVM vCPU blob is a sequence of sections, each `tag: u16, reserved: u16 (0), length:
//! u32, bytes`, all little-endian: CPUID entries, general registers, special registers,
//! FPU, XSAVE area (legacy 4 KiB region plus the `KVM_CAP_XSAVE2` extension), XCRs, MSRs
//! (index/value entries for every MSR of `KVM_GET_MSR_INDEX_LIST` that the kernel lets us
//! read and write back), local APIC page, MP state, pending events, debug registers and
//! TSC frequency. Kernel structures are stored as their exact x86-64 ABI bytes, so what
//! is restored is bit for bit what was saved. Every section must appear exactly once,
//! with exactly its structure's size; anything else is refused with the section's name
//! and byte offset.
//!
//! # Fields the kernel changes between a save and the next
//!
//! [`comparable`] zeroes these so that "restore then save again" can be compared bit for
//! bit everywhere else:
//! - MSR `IA32_TSC` (0x10): the guest's TSC keeps counting in real time, paused or not, so
//!   a later save reads a later value.
//! - `kvmclock`'s `clock`, `realtime` and `host_tsc`: the clock is read, not frozen, and
//!   `realtime`/`host_tsc` are the host's clocks at the moment of the read.
//! - `pit`'s `count_load_time` of each channel: the host's monotonic time at which the
//!   kernel (re)loaded the counter, which `KVM_SET_PIT2` sets to "now".

use zerocopy::{FromBytes, IntoBytes};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use migration_core::vm::DeviceState;

/// Version of every blob format this VMM writes and reads.
pub const BLOB_VERSION: u32 = 1;
/// Id of the machine description blob.
pub const MACHINE_ID: &str = "machine";
/// Id of the serial port blob.
pub const SERIAL_ID: &str = "serial";
/// Id of the master PIC blob.
pub const PIC_MASTER_ID: &str = "pic-master";
/// Id of the slave PIC blob.
pub const PIC_SLAVE_ID: &str = "pic-slave";
/// Id of the IOAPIC blob.
pub const IOAPIC_ID: &str = "ioapic";
/// Id of the PIT blob.
pub const PIT_ID: &str = "pit";
/// Id of the KVM clock blob.
pub const KVMCLOCK_ID: &str = "kvmclock";
/// MSR index of the TSC.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Id of KVM vCPU `i`'s blob.
pub fn vcpu_id(i: u32) -> String {
    format!("vcpu{i}")
}

/// Id of software vCPU `i`'s blob.
pub fn swcpu_id(i: u32) -> String {
    format!("swcpu{i}")
}

/// A blob that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The blob ends inside a section header or body.
    #[error("truncated at byte {offset}: {what}")]
    Truncated {
        /// Where the missing bytes start.
        offset: usize,
        /// What was being read.
        what: &'static str,
    },
    /// A section tag this version does not know.
    #[error("unknown section tag {tag} at byte {offset}")]
    UnknownSection {
        /// The tag.
        tag: u16,
        /// Offset of its header.
        offset: usize,
    },
    /// A section appears twice.
    #[error("section {section} appears twice (second at byte {offset})")]
    Duplicate {
        /// Section name.
        section: &'static str,
        /// Offset of the second header.
        offset: usize,
    },
    /// A section is missing.
    #[error("section {0} is missing")]
    Missing(&'static str),
    /// A section has the wrong size for its structure.
    #[error("section {section} at byte {offset} is {got} bytes, expected {expected}")]
    Size {
        /// Section name.
        section: &'static str,
        /// Offset of its header.
        offset: usize,
        /// Its length.
        got: usize,
        /// What its structure needs.
        expected: String,
    },
    /// A header's reserved field is not zero.
    #[error("section header at byte {0} has a non-zero reserved field")]
    Reserved(usize),
    /// The blob's content is inconsistent.
    #[error("{0}")]
    Invalid(String),
}

/// Sections of a KVM vCPU blob: (tag, name).
const SECTIONS: [(u16, &str); 12] = [
    (1, "cpuid"),
    (2, "regs"),
    (3, "sregs"),
    (4, "fpu"),
    (5, "xsave"),
    (6, "xcrs"),
    (7, "msrs"),
    (8, "lapic"),
    (9, "mp_state"),
    (10, "vcpu_events"),
    (11, "debugregs"),
    (12, "tsc_khz"),
];

/// Size in bytes of `struct kvm_fpu`.
pub const FPU_SIZE: usize = 416;
/// Size in bytes of the legacy XSAVE region.
pub const XSAVE_LEGACY_SIZE: usize = 4096;

/// Everything KVM holds about one vCPU.
#[derive(Clone, Default)]
pub struct VcpuState {
    /// CPUID entries the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87 and SSE state.
    pub fpu: kvm_fpu,
    /// The XSAVE area, 4 KiB or more (`KVM_CAP_XSAVE2`).
    pub xsave: Vec<u8>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// MSRs, in the order they are restored.
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC register page.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// TSC frequency in kHz (0 if the host does not say).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("cpuid_entries", &self.cpuid.len())
            .field("msrs", &self.msrs.len())
            .field("xsave_bytes", &self.xsave.len())
            .finish_non_exhaustive()
    }
}

fn put_section(out: &mut Vec<u8>, tag: u16, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes `struct kvm_fpu` field by field (kvm-bindings gives it no byte view).
pub fn fpu_to_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_SIZE);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(f.pad1);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    b
}

/// Decodes [`fpu_to_bytes`]'s output; `b` must be [`FPU_SIZE`] bytes.
pub fn fpu_from_bytes(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != FPU_SIZE {
        return None;
    }
    let mut f = kvm_fpu::default();
    let mut at = 0usize;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    for r in f.fpr.iter_mut() {
        r.copy_from_slice(take(16));
    }
    f.fcw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.fsw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.ftwx = take(1)[0];
    f.pad1 = take(1)[0];
    f.last_opcode = u16::from_le_bytes(take(2).try_into().ok()?);
    f.last_ip = u64::from_le_bytes(take(8).try_into().ok()?);
    f.last_dp = u64::from_le_bytes(take(8).try_into().ok()?);
    for r in f.xmm.iter_mut() {
        r.copy_from_slice(take(16));
    }
    f.mxcsr = u32::from_le_bytes(take(4).try_into().ok()?);
    f.pad2 = u32::from_le_bytes(take(4).try_into().ok()?);
    Some(f)
}

impl VcpuState {
    /// The blob bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        put_section(&mut out, 1, self.cpuid.as_slice().as_bytes());
        put_section(&mut out, 2, self.regs.as_bytes());
        put_section(&mut out, 3, self.sregs.as_bytes());
        put_section(&mut out, 4, &fpu_to_bytes(&self.fpu));
        put_section(&mut out, 5, &self.xsave);
        put_section(&mut out, 6, self.xcrs.as_bytes());
        put_section(&mut out, 7, self.msrs.as_slice().as_bytes());
        put_section(&mut out, 8, self.lapic.as_bytes());
        put_section(&mut out, 9, self.mp_state.as_bytes());
        put_section(&mut out, 10, self.events.as_bytes());
        put_section(&mut out, 11, self.debugregs.as_bytes());
        put_section(&mut out, 12, &self.tsc_khz.to_le_bytes());
        out
    }

    /// Decodes a blob, checking every section's presence and size.
    pub fn from_bytes(data: &[u8]) -> Result<VcpuState, BlobError> {
        let mut found: [Option<(usize, &[u8])>; SECTIONS.len()] = [None; SECTIONS.len()];
        let mut at = 0usize;
        while at < data.len() {
            let header = data.get(at..at + 8).ok_or(BlobError::Truncated {
                offset: at,
                what: "a section header",
            })?;
            let tag = u16::from_le_bytes([header[0], header[1]]);
            let reserved = u16::from_le_bytes([header[2], header[3]]);
            let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
            if reserved != 0 {
                return Err(BlobError::Reserved(at));
            }
            let slot = SECTIONS
                .iter()
                .position(|&(t, _)| t == tag)
                .ok_or(BlobError::UnknownSection { tag, offset: at })?;
            let body = data.get(at + 8..).and_then(|rest| rest.get(..len)).ok_or(
                BlobError::Truncated {
                    offset: at + 8,
                    what: SECTIONS[slot].1,
                },
            )?;
            if found[slot].is_some() {
                return Err(BlobError::Duplicate {
                    section: SECTIONS[slot].1,
                    offset: at,
                });
            }
            found[slot] = Some((at, body));
            at += 8 + len;
        }
        let get = |i: usize| found[i].ok_or(BlobError::Missing(SECTIONS[i].1));
        fn exact<T: FromBytes>(
            name: &'static str,
            (offset, b): (usize, &[u8]),
        ) -> Result<T, BlobError> {
            T::read_from_bytes(b).map_err(|_| BlobError::Size {
                section: name,
                offset,
                got: b.len(),
                expected: std::mem::size_of::<T>().to_string(),
            })
        }
        fn array<T: FromBytes + Clone>(
            name: &'static str,
            (offset, b): (usize, &[u8]),
            max: usize,
        ) -> Result<Vec<T>, BlobError> {
            let size = std::mem::size_of::<T>();
            if b.len() % size != 0 || b.len() / size > max {
                return Err(BlobError::Size {
                    section: name,
                    offset,
                    got: b.len(),
                    expected: format!("a multiple of {size}, at most {max} entries"),
                });
            }
            Ok(b.chunks_exact(size)
                .filter_map(|c| T::read_from_bytes(c).ok())
                .collect())
        }
        let (fpu_at, fpu_bytes) = get(3)?;
        let (xsave_at, xsave) = get(4)?;
        if xsave.len() < XSAVE_LEGACY_SIZE || xsave.len() % 4 != 0 || xsave.len() > 1 << 20 {
            return Err(BlobError::Size {
                section: "xsave",
                offset: xsave_at,
                got: xsave.len(),
                expected: format!("a multiple of 4, from {XSAVE_LEGACY_SIZE} to 1 MiB"),
            });
        }
        let (tsc_at, tsc) = get(11)?;
        Ok(VcpuState {
            cpuid: array("cpuid", get(0)?, kvm_bindings::KVM_MAX_CPUID_ENTRIES)?,
            regs: exact("regs", get(1)?)?,
            sregs: exact("sregs", get(2)?)?,
            fpu: fpu_from_bytes(fpu_bytes).ok_or(BlobError::Size {
                section: "fpu",
                offset: fpu_at,
                got: fpu_bytes.len(),
                expected: FPU_SIZE.to_string(),
            })?,
            xsave: xsave.to_vec(),
            xcrs: exact("xcrs", get(5)?)?,
            msrs: array("msrs", get(6)?, 4096)?,
            lapic: exact("lapic", get(7)?)?,
            mp_state: exact("mp_state", get(8)?)?,
            events: exact("vcpu_events", get(9)?)?,
            debugregs: exact("debugregs", get(10)?)?,
            tsc_khz: u32::from_le_bytes(tsc.try_into().map_err(|_| BlobError::Size {
                section: "tsc_khz",
                offset: tsc_at,
                got: tsc.len(),
                expected: "4".into(),
            })?),
        })
    }
}

/// Decodes a kernel structure stored whole.
pub fn struct_from_bytes<T: FromBytes>(what: &'static str, b: &[u8]) -> Result<T, BlobError> {
    T::read_from_bytes(b).map_err(|_| BlobError::Size {
        section: what,
        offset: 0,
        got: b.len(),
        expected: std::mem::size_of::<T>().to_string(),
    })
}

/// A software vCPU's position: the segment it walks and the next page it increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SoftPosition {
    /// Index of the segment in the vCPU's control block.
    pub segment: u64,
    /// Guest-physical address of the next page to increment.
    pub addr: u64,
    /// Sectors of its share the vCPU wrote in this pass's disk workload, which comes before
    /// the pass's pages (the share's size once it is done, or 0 for no disk).
    pub disk: u64,
}

impl SoftPosition {
    /// The blob bytes.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&self.segment.to_le_bytes());
        b.extend_from_slice(&self.addr.to_le_bytes());
        // Left out at 0, so that a VM without a disk has the blob it always had.
        if self.disk != 0 {
            b.extend_from_slice(&self.disk.to_le_bytes());
        }
        b
    }

    /// Decodes [`to_bytes`](Self::to_bytes)' output.
    pub fn from_bytes(b: &[u8]) -> Result<SoftPosition, BlobError> {
        if b.len() != 16 && b.len() != 24 {
            return Err(BlobError::Size {
                section: "position",
                offset: 0,
                got: b.len(),
                expected: "16 or 24".into(),
            });
        }
        let word = |i: usize| {
            b.get(8 * i..8 * i + 8)
                .and_then(|w| w.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let p = SoftPosition {
            segment: word(0),
            addr: word(1),
            disk: word(2),
        };
        if b.len() == 24 && p.disk == 0 {
            return Err(BlobError::Invalid(
                "a 24-byte position holds a disk progress of 0, which is written as 16 bytes"
                    .into(),
            ));
        }
        Ok(p)
    }
}

/// The blob's bytes with the fields the kernel legitimately changes between a restore and
/// the next save zeroed (see the module documentation), for bit-for-bit comparison of
/// everything else.
pub fn comparable(state: &DeviceState) -> Result<Vec<u8>, BlobError> {
    let id = state.id.as_str();
    if id.starts_with("vcpu") {
        let mut s = VcpuState::from_bytes(&state.data)?;
        for m in s.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
            m.data = 0;
        }
        return Ok(s.to_bytes());
    }
    match id {
        KVMCLOCK_ID => {
            let mut c: kvm_clock_data = struct_from_bytes("kvmclock", &state.data)?;
            c.clock = 0;
            c.realtime = 0;
            c.host_tsc = 0;
            Ok(c.as_bytes().to_vec())
        }
        PIT_ID => {
            let mut p: kvm_pit_state2 = struct_from_bytes("pit", &state.data)?;
            for ch in p.channels.iter_mut() {
                ch.count_load_time = 0;
            }
            Ok(p.as_bytes().to_vec())
        }
        _ => Ok(state.data.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from_random<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
        let mut v = vec![0u8; std::mem::size_of::<T>()];
        for (i, b) in v.iter_mut().enumerate() {
            *b = bytes[i % bytes.len()].wrapping_add(i as u8);
        }
        T::read_from_bytes(&v).unwrap()
    }

    fn arb_state() -> impl Strategy<Value = VcpuState> {
        (
            proptest::collection::vec(any::<u8>(), 1..64),
            0usize..8,
            0usize..40,
            0usize..4,
        )
            .prop_map(|(seed, ncpuid, nmsrs, xsave_extra)| VcpuState {
                cpuid: (0..ncpuid)
                    .map(|i| from_random(&[seed[0], i as u8]))
                    .collect(),
                regs: from_random(&seed),
                sregs: from_random(&seed),
                fpu: fpu_from_bytes(&{
                    let b: [u8; FPU_SIZE] = std::array::from_fn(|i| seed[i % seed.len()]);
                    b
                })
                .unwrap(),
                xsave: (0..XSAVE_LEGACY_SIZE + 4 * xsave_extra)
                    .map(|i| seed[i % seed.len()] ^ i as u8)
                    .collect(),
                xcrs: from_random(&seed),
                msrs: (0..nmsrs)
                    .map(|i| from_random(&[seed[0], i as u8, 3]))
                    .collect(),
                lapic: from_random(&seed),
                mp_state: from_random(&seed),
                events: from_random(&seed),
                debugregs: from_random(&seed),
                tsc_khz: u32::from(seed[0]) * 1000,
            })
    }

    proptest! {
        #[test]
        fn vcpu_state_round_trips(s in arb_state()) {
            let b = s.to_bytes();
            let back = VcpuState::from_bytes(&b).unwrap();
            prop_assert_eq!(back.to_bytes(), b);
        }

        #[test]
        fn vcpu_state_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = VcpuState::from_bytes(&data);
        }

        #[test]
        fn every_truncation_of_a_valid_blob_is_refused(s in arb_state(), cut in any::<prop::sample::Index>()) {
            let b = s.to_bytes();
            let n = cut.index(b.len());
            prop_assert!(VcpuState::from_bytes(&b[..n]).is_err());
        }

        #[test]
        fn soft_position_round_trips(segment in any::<u64>(), addr in any::<u64>(), disk in prop_oneof![Just(0u64), any::<u64>()], junk in proptest::collection::vec(any::<u8>(), 0..40)) {
            let p = SoftPosition { segment, addr, disk };
            prop_assert_eq!(SoftPosition::from_bytes(&p.to_bytes()), Ok(p));
            if junk.len() != 16 && junk.len() != 24 {
                prop_assert!(SoftPosition::from_bytes(&junk).is_err());
            }
        }

        #[test]
        fn fpu_round_trips(bytes in proptest::collection::vec(any::<u8>(), FPU_SIZE)) {
            let f = fpu_from_bytes(&bytes).unwrap();
            prop_assert_eq!(fpu_to_bytes(&f), bytes);
        }
    }

    #[test]
    fn malformed_blobs_name_the_section() {
        let s = VcpuState {
            xsave: vec![0; XSAVE_LEGACY_SIZE],
            ..VcpuState::default()
        };
        let good = s.to_bytes();
        // Drop the last section (tsc_khz, 12 bytes).
        let short = &good[..good.len() - 12];
        assert_eq!(
            VcpuState::from_bytes(short).unwrap_err(),
            BlobError::Missing("tsc_khz")
        );
        // Duplicate it.
        let mut dup = good.clone();
        dup.extend_from_slice(&good[good.len() - 12..]);
        assert!(matches!(
            VcpuState::from_bytes(&dup),
            Err(BlobError::Duplicate {
                section: "tsc_khz",
                ..
            })
        ));
        // Unknown tag.
        let mut unknown = good.clone();
        unknown.extend_from_slice(&[99, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            VcpuState::from_bytes(&unknown),
            Err(BlobError::UnknownSection { tag: 99, .. })
        ));
        // The regs section (right after the empty cpuid section) ten bytes long.
        let regs_len = std::mem::size_of::<kvm_regs>();
        let mut bad = good[..8].to_vec();
        put_section(&mut bad, 2, &[0u8; 10]);
        bad.extend_from_slice(&good[16 + regs_len..]);
        assert_eq!(
            VcpuState::from_bytes(&bad).unwrap_err(),
            BlobError::Size {
                section: "regs",
                offset: 8,
                got: 10,
                expected: regs_len.to_string()
            }
        );
        // A non-zero reserved field.
        let mut reserved = good.clone();
        reserved[2] = 1;
        assert_eq!(
            VcpuState::from_bytes(&reserved).unwrap_err(),
            BlobError::Reserved(0)
        );
    }
}
