//! Helpers shared by the integration tests.
#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress};
use vmm_demo::{GuestKind, Vm, VmConfig, kvm_available};

/// True if KVM tests can run; otherwise says why `test` skips.
pub fn kvm_or_skip(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    eprintln!("{test}: skipped for KVM: /dev/kvm is missing or not usable");
    false
}

/// The guest kinds to run `test` with: software always, KVM where it exists.
pub fn kinds(test: &str) -> Vec<GuestKind> {
    let mut k = vec![GuestKind::Software];
    if kvm_or_skip(test) {
        k.insert(0, GuestKind::Kvm);
    }
    k
}

/// A small VM: 16 MiB in two regions, so shares straddle a hole.
pub fn small_config(vcpus: u32) -> VmConfig {
    VmConfig {
        mem_bytes: 16 << 20,
        ram_regions: 2,
        vcpus,
        working_set_bytes: 2 << 20,
        ..VmConfig::default()
    }
}

/// Copies all RAM of `from` into `to` (same layout), as a migration would.
pub fn copy_ram(from: &Vm, to: &Vm) {
    assert_eq!(from.workload().regions(), to.workload().regions());
    for &(base, size) in from.workload().regions() {
        let mut buf = vec![0u8; size as usize];
        from.memory()
            .read_slice(&mut buf, GuestAddress(base))
            .unwrap();
        to.memory().write_slice(&buf, GuestAddress(base)).unwrap();
    }
}
