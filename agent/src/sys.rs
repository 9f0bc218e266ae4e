//! Raw system calls of the agent. Every `unsafe` block is here, each with its invariant.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const KVMIO: u8 = 0xAE;
nix::ioctl_none!(kvm_get_api_version, KVMIO, 0x00);
nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(KVMIO, 0x01));

/// The stable KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// Whether `/dev/kvm` can create a VM: opens it, checks the API version and creates (then
/// drops) an empty VM.
pub fn kvm_can_create_vm() -> bool {
    let Ok(dev) = OpenOptions::new().read(true).write(true).open("/dev/kvm") else {
        return false;
    };
    // SAFETY: `dev` is an open file for the whole call; KVM_GET_API_VERSION takes no
    // argument and only returns an integer.
    let version = unsafe { kvm_get_api_version(dev.as_raw_fd()) };
    if version != Ok(KVM_API_VERSION) {
        return false;
    }
    // SAFETY: `dev` is open; KVM_CREATE_VM takes the machine type by value (0 = default)
    // and returns a new file descriptor or an error, touching no memory of ours.
    match unsafe { kvm_create_vm(dev.as_raw_fd(), 0) } {
        Ok(fd) if fd >= 0 => {
            // SAFETY: the kernel just returned `fd` as a new descriptor that nothing else
            // owns; wrapping it closes it exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            true
        }
        _ => false,
    }
}
