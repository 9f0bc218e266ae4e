//! A VM as the agent runs it: a typed spec, and the QEMU command line built from it.
//!
//! Building the command line is pure (no I/O), so every argument can be checked in a unit
//! test; values that reach QEMU's option parser are validated first, since a comma in a path
//! would start a new option.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zy_common::proto::Accel;
use zy_common::VmId;

use zy_common::resources::{MEMORY_MIB, VCPUS};

/// How a VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Boot {
    /// A kernel and initramfs given directly (the test guest).
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// The first disk's boot loader.
    Disk,
}

/// One disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The image a qcow2 overlay is on, when the agent made it: QEMU is then given the
    /// whole chain, the base opened read-only with its own backing explicitly none, so
    /// neither header (the overlay's backing name, a base's backing or data file) can
    /// make QEMU open another file. Records from before it (version 2) have none; QEMU
    /// then follows the overlay's header, naming the base the agent wrote there and
    /// inspected. (No serde defaults here: records are postcard, which has no field names;
    /// a new field is a new record version.)
    pub base: Option<BaseImage>,
}

/// A read-only base image in the node's cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// One NIC, on a tap device the network layer made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    pub tap: String,
    pub mac: [u8; 6],
}

/// Everything QEMU needs to run one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: VmId,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub boot: Boot,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
}

/// A spec that QEMU must not see.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("a VM has {lo} to {hi} vCPUs, not {0}", lo = VCPUS.start(), hi = VCPUS.end())]
    Vcpus(u32),
    #[error("a VM has {lo} MiB to {hi} MiB of memory, not {0} MiB", lo = MEMORY_MIB.start(), hi = MEMORY_MIB.end())]
    Memory(u64),
    #[error("{what} `{value}` cannot be passed to QEMU (commas, control characters or non-UTF-8)")]
    Unsafe { what: &'static str, value: String },
    #[error("disk format `{0}` is not qcow2 or raw")]
    Format(String),
    #[error("a VM booting from disk needs a disk")]
    NoDisk,
}

/// Where a VM's files live on the node.
#[derive(Clone, Debug)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    /// The files of VM `id` under the agent's data directory.
    pub fn new(data_dir: &Path, id: VmId) -> Self {
        Self {
            dir: data_dir.join("vms").join(id.to_string()),
        }
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn console_sock(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("vm.rec")
    }
}

fn safe_path<'a>(what: &'static str, p: &'a Path) -> Result<&'a str, SpecError> {
    let s = p.to_str().ok_or_else(|| SpecError::Unsafe {
        what,
        value: p.display().to_string(),
    })?;
    safe(what, s)
}

fn safe<'a>(what: &'static str, s: &'a str) -> Result<&'a str, SpecError> {
    if s.contains(',') || s.chars().any(char::is_control) {
        return Err(SpecError::Unsafe {
            what,
            value: zy_common::ids::truncate_for_error(s),
        });
    }
    Ok(s)
}

impl VmSpec {
    /// Checks the spec before anything is made for it.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !VCPUS.contains(&self.vcpus) {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if !MEMORY_MIB.contains(&self.memory_mib) {
            return Err(SpecError::Memory(self.memory_mib));
        }
        zy_common::ids::validate_name(&self.name).map_err(|_| SpecError::Unsafe {
            what: "name",
            value: zy_common::ids::truncate_for_error(&self.name),
        })?;
        for d in &self.disks {
            safe_path("disk path", &d.path)?;
            if let Some(b) = &d.base {
                safe_path("base image path", &b.path)?;
                if d.format != "qcow2" || (b.format != "qcow2" && b.format != "raw") {
                    return Err(SpecError::Format(format!("{} on {}", d.format, b.format)));
                }
            }
            if d.format != "qcow2" && d.format != "raw" {
                return Err(SpecError::Format(d.format.clone()));
            }
        }
        for n in &self.nics {
            safe("tap name", &n.tap)?;
        }
        match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                safe_path("kernel", kernel)?;
                if let Some(i) = initrd {
                    safe_path("initrd", i)?;
                }
                if cmdline.chars().any(char::is_control) {
                    return Err(SpecError::Unsafe {
                        what: "kernel command line",
                        value: zy_common::ids::truncate_for_error(cmdline),
                    });
                }
            }
            Boot::Disk if self.disks.is_empty() => return Err(SpecError::NoDisk),
            Boot::Disk => {}
        }
        Ok(())
    }

    /// QEMU's arguments for the destination of a live migration: the same machine, paused
    /// (`-S`), waiting for `migrate-incoming` (`-incoming defer`) so that the migration's
    /// address and TLS can be set over QMP first. The destination's disks are the spec's
    /// (the caller gives the destination its own paths).
    pub fn incoming_args(&self, paths: &VmPaths) -> Result<Vec<String>, SpecError> {
        let mut a = self.qemu_args(paths)?;
        a.extend(["-S", "-incoming", "defer"].map(String::from));
        Ok(a)
    }

    /// QEMU's arguments (without the program). Validates first.
    pub fn qemu_args(&self, paths: &VmPaths) -> Result<Vec<String>, SpecError> {
        self.validate()?;
        let dir = safe_path("VM directory", &paths.dir)?;
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        let (accel, cpu) = match self.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        push(&["-name", &format!("guest={},debug-threads=on", self.name)]);
        push(&["-uuid", &self.id.to_string()]);
        push(&["-machine", &format!("q35,accel={accel}")]);
        push(&["-cpu", cpu]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-nographic"]);
        // QEMU's seccomp filter: no obsolete syscalls, no setuid, no fork/exec, no
        // scheduler or resource changes. A guest that breaks out of QEMU lands there.
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&["-qmp", &format!("unix:{dir}/qmp.sock,server=on,wait=off")]);
        push(&[
            "-chardev",
            &format!("socket,id=console,path={dir}/console.sock,server=on,wait=off"),
        ]);
        push(&["-serial", "chardev:console"]);
        push(&["-pidfile", &format!("{dir}/qemu.pid")]);
        // A guest kernel that panics says so through pvpanic; QEMU then exits with failure
        // (rather than leave a dead guest that QMP calls `running`).
        push(&["-device", "pvpanic", "-action", "panic=exit-failure"]);
        if let Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        {
            push(&["-kernel", safe_path("kernel", kernel)?]);
            if let Some(i) = initrd {
                push(&["-initrd", safe_path("initrd", i)?]);
            }
            push(&["-append", cmdline]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let path = safe_path("disk path", &d.path)?;
            // The overlay's backing: the base's node, or (records from before) its header.
            let mut backing = String::new();
            if let Some(b) = &d.base {
                let base = safe_path("base image path", &b.path)?;
                push(&[
                    "-blockdev",
                    &format!(
                        "driver=file,filename={base},node-name=basefile{i},read-only=on,cache.direct=off"
                    ),
                ]);
                // A qcow2 base's own backing is none, whatever its header says; raw has
                // no backing at all.
                let none = if b.format == "qcow2" { ",backing=" } else { "" };
                push(&[
                    "-blockdev",
                    &format!(
                        "driver={},file=basefile{i},node-name=base{i},read-only=on{none}",
                        b.format
                    ),
                ]);
                backing = format!(",backing=base{i}");
            }
            push(&[
                "-blockdev",
                &format!("driver=file,filename={path},node-name=file{i},cache.direct=off"),
            ]);
            push(&[
                "-blockdev",
                &format!(
                    "driver={},file=file{i},node-name=disk{i}{backing}",
                    d.format
                ),
            ]);
            push(&[
                "-device",
                &format!(
                    "virtio-blk-pci,drive=disk{i},id=disk{i}{}",
                    if i == 0 && self.boot == Boot::Disk {
                        ",bootindex=0"
                    } else {
                        ""
                    }
                ),
            ]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let m = n.mac;
            push(&[
                "-netdev",
                &format!("tap,id=nic{i},ifname={},script=no,downscript=no", n.tap),
            ]);
            push(&[
                "-device",
                // host_mtu tells the guest's driver the overlay's MTU (VIRTIO_NET_F_MTU), so
                // that it never sends what the VXLAN path would drop.
                &format!(
                    "virtio-net-pci,netdev=nic{i},id=nic{i},mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x},host_mtu={}",
                    m[0], m[1], m[2], m[3], m[4], m[5], crate::netdev::OVERLAY_MTU
                ),
            ]);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: VmId::new_random(),
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 256,
            accel: Accel::Tcg,
            boot: Boot::Kernel {
                kernel: "/img/vmlinuz".into(),
                initrd: Some("/img/initramfs.gz".into()),
                cmdline: "console=ttyS0 zy.name=web-1".into(),
            },
            disks: vec![DiskSpec {
                path: "/d/root.qcow2".into(),
                format: "qcow2".into(),
                base: None,
            }],
            nics: vec![NicSpec {
                tap: "zyt0".into(),
                mac: [0x52, 0x54, 0, 1, 2, 3],
            }],
        }
    }

    #[test]
    fn builds_a_tcg_command_line() {
        let s = spec();
        let args = s
            .qemu_args(&VmPaths { dir: "/v/x".into() })
            .unwrap()
            .join(" ");
        assert!(
            args.contains("-machine q35,accel=tcg -cpu max -smp 2 -m 256"),
            "{args}"
        );
        assert!(args.contains("-qmp unix:/v/x/qmp.sock,server=on,wait=off"));
        assert!(
            args.contains("virtio-net-pci,netdev=nic0,id=nic0,mac=52:54:00:01:02:03,host_mtu=1450")
        );
        assert!(args.contains("driver=qcow2,file=file0,node-name=disk0"));
        assert!(args.contains("-append console=ttyS0 zy.name=web-1"));
    }

    /// Review finding 4: QEMU followed backing names in image headers. An overlay the agent
    /// made is given its base as a node of its own, read-only, whose own backing is none.
    #[test]
    fn an_overlay_is_given_its_base_with_no_backing_of_its_own() {
        let mut s = spec();
        s.disks[0].base = Some(BaseImage {
            path: "/img/abc".into(),
            format: "qcow2".into(),
        });
        let args = s.qemu_args(&VmPaths { dir: "/v/x".into() }).unwrap();
        let blockdevs: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            blockdevs,
            [
                "driver=file,filename=/img/abc,node-name=basefile0,read-only=on,cache.direct=off",
                "driver=qcow2,file=basefile0,node-name=base0,read-only=on,backing=",
                "driver=file,filename=/d/root.qcow2,node-name=file0,cache.direct=off",
                "driver=qcow2,file=file0,node-name=disk0,backing=base0",
            ]
        );
        // A raw base has no backing option at all.
        s.disks[0].base.as_mut().unwrap().format = "raw".into();
        let args = s
            .qemu_args(&VmPaths { dir: "/v/x".into() })
            .unwrap()
            .join(" ");
        assert!(
            args.contains("driver=raw,file=basefile0,node-name=base0,read-only=on "),
            "{args}"
        );
        // Only a qcow2 overlay has a base, of a known format, at a path QEMU can be told.
        let mut bad = s.clone();
        bad.disks[0].format = "raw".into();
        assert!(matches!(bad.validate(), Err(SpecError::Format(_))));
        let mut bad = s.clone();
        bad.disks[0].base.as_mut().unwrap().format = "vmdk".into();
        assert!(matches!(bad.validate(), Err(SpecError::Format(_))));
        let mut bad = s;
        bad.disks[0].base.as_mut().unwrap().path = "/img/a,driver=raw".into();
        assert!(matches!(bad.validate(), Err(SpecError::Unsafe { .. })));
    }

    #[test]
    fn a_migration_destination_waits_paused_for_its_incoming_stream() {
        let s = spec();
        let paths = VmPaths { dir: "/v/x".into() };
        let mut want = s.qemu_args(&paths).unwrap();
        want.extend(["-S", "-incoming", "defer"].map(String::from));
        assert_eq!(s.incoming_args(&paths).unwrap(), want);
    }

    #[test]
    fn refuses_what_qemu_must_not_see() {
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(SpecError::Vcpus(0)));
        let mut s = spec();
        s.memory_mib = 1 << 40;
        assert!(matches!(s.validate(), Err(SpecError::Memory(_))));
        let mut s = spec();
        s.disks[0].path = "/d/a,driver=raw".into();
        assert!(matches!(s.validate(), Err(SpecError::Unsafe { .. })));
        let mut s = spec();
        s.disks[0].format = "vmdk".into();
        assert!(matches!(s.validate(), Err(SpecError::Format(_))));
        let mut s = spec();
        s.name = "Bad Name".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.boot = Boot::Disk;
        s.disks.clear();
        assert_eq!(s.validate(), Err(SpecError::NoDisk));
    }
}
