//! A tiny KVM guest that writes exactly the pages a test lists, shared by the KVM tests.
//!
//! The guest is a 14-byte program in 32-bit protected mode that writes one byte into each
//! page of a list the test chooses, then halts. Its code and its list live in pages it only
//! reads, so the pages it dirties are exactly the ones listed.

use std::sync::Arc;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_core::RamLayout;
use vm_memory::bitmap::NewBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// The guest program, at guest-physical 0. It runs in 32-bit protected mode with flat
/// 4 GiB segments that the test loads straight into the segment caches with
/// KVM_SET_SREGS; it never loads a segment register, so it needs no GDT, and it uses no
/// stack. Input: esi = guest-physical address of a zero-terminated table of u32 addresses,
/// dl = the byte to write at each.
///
/// ```text
/// 0x00: 8b 06     next: mov  eax, [esi]
/// 0x02: 85 c0           test eax, eax
/// 0x04: 74 07           jz   done          ; 0x06 + 7 = 0x0d
/// 0x06: 88 10           mov  [eax], dl
/// 0x08: 83 c6 04        add  esi, 4
/// 0x0b: eb f3           jmp  next          ; 0x0d - 13 = 0x00
/// 0x0d: f4        done: hlt
/// ```
const CODE: [u8; 14] = [
    0x8b, 0x06, 0x85, 0xc0, 0x74, 0x07, 0x88, 0x10, 0x83, 0xc6, 0x04, 0xeb, 0xf3, 0xf4,
];
pub const TABLE_GPA: u64 = 0x1000;
/// Slot 0: code (page 0), table (page 1), then pages the guest may write. 67 pages, so
/// slot 1's pages start at global page 67, off a 64-page word boundary.
const SLOT0: (u64, u64) = (0, 67 * 4096);
/// Slot 1: 4 MiB at 1 MiB.
const SLOT1: (u64, u64) = (0x10_0000, 4 << 20);

pub struct Guest<B: NewBitmap> {
    // Dropped in this order: the vCPU and VM before the memory they map.
    pub vcpu: VcpuFd,
    pub vm: Arc<VmFd>,
    pub slots: Vec<kvm_userspace_memory_region>,
    pub layout: RamLayout,
    pub mem: GuestMemoryMmap<B>,
}

/// A VM with the two slots and one vCPU in flat protected mode, or `None` (with the reason
/// printed) where KVM is not available.
pub fn guest<B: NewBitmap>() -> Option<Guest<B>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm does not exist on this machine");
        return None;
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipped: cannot open /dev/kvm: {e}");
            return None;
        }
    };
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    let mem = GuestMemoryMmap::<B>::from_ranges(&[
        (GuestAddress(SLOT0.0), SLOT0.1 as usize),
        (GuestAddress(SLOT1.0), SLOT1.1 as usize),
    ])
    .unwrap();
    let layout = RamLayout::of_memory(&mem).unwrap();
    let slots: Vec<_> = mem
        .iter()
        .enumerate()
        .map(|(i, r)| kvm_userspace_memory_region {
            slot: i as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
        })
        .collect();
    for s in &slots {
        // SAFETY: the region is mapped by `mem`, which the Guest keeps until after the VM
        // is gone.
        unsafe {
            vm.set_user_memory_region(*s)
                .expect("KVM_SET_USER_MEMORY_REGION")
        };
    }
    mem.write_slice(&CODE, GuestAddress(0)).unwrap();

    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().unwrap();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3, // read/write, accessed
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 |= 1; // PE, no paging
    vcpu.set_sregs(&sregs).unwrap();
    Some(Guest {
        vcpu,
        vm,
        slots,
        layout,
        mem,
    })
}

impl<B: NewBitmap> Guest<B> {
    /// Global page indices for pages `local` of slot `slot`.
    pub fn pages(&self, slot: usize, local: &[usize]) -> Vec<usize> {
        let first = self.layout.regions()[slot].first_page;
        local.iter().map(|p| first + p).collect()
    }

    /// Runs the guest over `pages` (global indices), writing `marker` at a different offset
    /// in each, and checks that it did.
    pub fn write_pages(&mut self, pages: &[usize], marker: u8) {
        let mut table = Vec::new();
        let mut addrs = Vec::new();
        for (i, &p) in pages.iter().enumerate() {
            let gpa = self.layout.page_to_gpa(p).unwrap() + (i as u64 * 97) % 4096;
            assert_ne!(gpa >> 12, 0, "the code page must stay clean");
            assert_ne!(gpa >> 12, TABLE_GPA >> 12, "the table page must stay clean");
            table.extend_from_slice(&(gpa as u32).to_le_bytes());
            addrs.push(gpa);
        }
        table.extend_from_slice(&0u32.to_le_bytes());
        assert!(table.len() <= 4096, "the table must fit its page");
        // Written by the host through the mapping: KVM does not log it.
        self.mem
            .write_slice(&table, GuestAddress(TABLE_GPA))
            .unwrap();

        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = 0;
        regs.rflags = 0x2;
        regs.rsi = TABLE_GPA;
        regs.rdx = u64::from(marker);
        self.vcpu.set_regs(&regs).unwrap();
        match self.vcpu.run() {
            Ok(VcpuExit::Hlt) => {}
            Ok(other) => panic!("guest stopped with {other:?} instead of hlt"),
            Err(e) => panic!("KVM_RUN: {e}"),
        }
        let regs = self.vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x0e, "guest halted somewhere else than its hlt");
        for gpa in addrs {
            let byte: u8 = self.mem.read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(byte, marker, "the guest did not write {gpa:#x}");
        }
    }
}
