//! The one resource model: what a VM costs a node and what a node offers. Placement counts
//! with it today, the packer tomorrow, and the agent sets each VM's limits from it, so the
//! coordinator never places what the node would then refuse or starve.
//!
//! - Memory: a VM costs its guest memory plus [`ResourceModel::vm_overhead_mib`] (QEMU
//!   itself: device emulation, the TCG translation cache, I/O buffers); that sum is also the
//!   VM's hard memory limit on its node. A node offers its memory less
//!   [`ResourceModel::host_reserve_mib`] (the host, the agent, page cache for images).
//! - CPU: a vCPU is a share of a host thread, not a thread: a node offers its CPUs times
//!   [`ResourceModel::cpu_overcommit`], and each VM's CPU quota is its vCPU count.
//! - Disk: a VM costs its disk size in full (overlays grow to it); a node offers its free
//!   space less [`ResourceModel::disk_reserve_gib`].

use serde::{Deserialize, Serialize};

/// What a VM asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// What a node offers, or what VMs take of it, in the model's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// In thousandths of a vCPU, so that an overcommit ratio such as 1.5 stays exact.
    pub vcpu_milli: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Resources {
    /// Whether `need` fits in what is left of `self` after `used`.
    pub fn fits(&self, used: &Resources, need: &Resources) -> bool {
        self.left(used).covers(need)
    }

    /// What is left after `used`.
    pub fn left(&self, used: &Resources) -> Resources {
        Resources {
            vcpu_milli: self.vcpu_milli.saturating_sub(used.vcpu_milli),
            memory_mib: self.memory_mib.saturating_sub(used.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(used.disk_gib),
        }
    }

    fn covers(&self, need: &Resources) -> bool {
        self.vcpu_milli >= need.vcpu_milli
            && self.memory_mib >= need.memory_mib
            && self.disk_gib >= need.disk_gib
    }

    /// The sum of two.
    pub fn plus(&self, o: &Resources) -> Resources {
        Resources {
            vcpu_milli: self.vcpu_milli.saturating_add(o.vcpu_milli),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_gib: self.disk_gib.saturating_add(o.disk_gib),
        }
    }
}

/// The vCPUs one VM may have: what the API, the wire and the agent each accept.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=64;
/// The guest memory one VM may have, in MiB (64 MiB to 1 TiB).
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 64..=1024 * 1024;
/// The largest disk one VM may have, in GiB (64 TiB).
pub const MAX_DISK_GIB: u64 = 64 * 1024;

/// A VM size outside what one VM may have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("a VM has {lo} to {hi} vCPUs, not {0}", lo = VCPUS.start(), hi = VCPUS.end())]
    Vcpus(u32),
    #[error("a VM has {lo} MiB to {hi} MiB (1 TiB) of memory, not {0} MiB", lo = MEMORY_MIB.start(), hi = MEMORY_MIB.end())]
    Memory(u64),
    #[error("a VM's disk is at most {MAX_DISK_GIB} GiB (64 TiB), not {0} GiB")]
    Disk(u64),
}

impl VmSize {
    /// Checks the size against what one VM may have (not against any node's room).
    pub fn check(&self) -> Result<(), SizeError> {
        if !VCPUS.contains(&self.vcpus) {
            return Err(SizeError::Vcpus(self.vcpus));
        }
        if !MEMORY_MIB.contains(&self.memory_mib) {
            return Err(SizeError::Memory(self.memory_mib));
        }
        if self.disk_gib > MAX_DISK_GIB {
            return Err(SizeError::Disk(self.disk_gib));
        }
        Ok(())
    }
}

/// The model's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceModel {
    pub host_reserve_mib: u64,
    pub vm_overhead_mib: u64,
    /// vCPUs offered per host CPU, in thousandths (4000: four vCPUs per CPU).
    pub cpu_overcommit_milli: u64,
    pub disk_reserve_gib: u64,
}

/// The model both sides use.
pub const MODEL: ResourceModel = ResourceModel {
    host_reserve_mib: 512,
    vm_overhead_mib: 256,
    cpu_overcommit_milli: 4000,
    disk_reserve_gib: 1,
};

impl ResourceModel {
    /// The memory a VM holds on its node, and its hard limit there.
    pub fn vm_memory_mib(&self, guest_mib: u64) -> u64 {
        guest_mib.saturating_add(self.vm_overhead_mib)
    }

    /// What a VM costs its node.
    pub fn cost(&self, vm: VmSize) -> Resources {
        Resources {
            vcpu_milli: u64::from(vm.vcpus) * 1000,
            memory_mib: self.vm_memory_mib(vm.memory_mib),
            disk_gib: vm.disk_gib,
        }
    }

    /// What a node with this inventory offers to VMs.
    pub fn capacity(&self, cpus: u32, memory_mib: u64, disk_free_gib: u64) -> Resources {
        Resources {
            vcpu_milli: u64::from(cpus).saturating_mul(self.cpu_overcommit_milli),
            memory_mib: memory_mib.saturating_sub(self.host_reserve_mib),
            disk_gib: disk_free_gib.saturating_sub(self.disk_reserve_gib),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_out_of_bounds_names_the_real_bounds() {
        let ok = VmSize {
            vcpus: 64,
            memory_mib: 64,
            disk_gib: MAX_DISK_GIB,
        };
        assert_eq!(ok.check(), Ok(()));
        let e = VmSize { vcpus: 0, ..ok }.check().unwrap_err();
        assert_eq!(e.to_string(), "a VM has 1 to 64 vCPUs, not 0");
        let e = VmSize { vcpus: 65, ..ok }.check().unwrap_err();
        assert!(e.to_string().contains("1 to 64"), "{e}");
        let e = VmSize {
            memory_mib: 63,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("64 MiB to 1048576 MiB"), "{e}");
        let e = VmSize {
            disk_gib: MAX_DISK_GIB + 1,
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("disk"), "{e}");
    }

    #[test]
    fn a_vm_costs_its_guest_plus_qemu_and_a_node_keeps_its_reserve() {
        let m = MODEL;
        let c = m.cost(VmSize {
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 10,
        });
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.vcpu_milli, 2000);
        let cap = m.capacity(2, 4096, 100);
        assert_eq!(cap.memory_mib, 3584);
        assert_eq!(cap.vcpu_milli, 8000, "four vCPUs per CPU");
        assert_eq!(cap.disk_gib, 99);
        let two = c.plus(&c);
        assert!(cap.fits(&two, &c), "a third fits by memory and vCPUs");
        let four = two.plus(&two);
        assert!(
            four.memory_mib + c.memory_mib <= cap.memory_mib,
            "memory would allow it"
        );
        assert!(
            !cap.fits(&four, &c),
            "but a fifth 2-vCPU VM exceeds 8 vCPUs"
        );
    }
}
