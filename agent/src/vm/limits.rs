//! CPU and memory limits for a QEMU process the agent supervises itself: a cgroup per VM,
//! through cgroup v2 where its controllers are enabled (production hosts), through cgroup
//! v1 on hybrid hosts like the test machine. Under systemd each VM's unit carries the
//! same limits instead (`vm/systemd.rs`).
//!
//! ```text
//! v2: /sys/fs/cgroup/zy-vms/<vm id>/{cpu.max, memory.max, pids.max, cgroup.procs}
//! v1: /sys/fs/cgroup/{cpu,memory,pids}/zy-vms/<vm id>/{cpu.cfs_quota_us, memory.limit_in_bytes, pids.max, cgroup.procs}
//! ```

use std::path::{Path, PathBuf};

use zy_common::VmId;

/// Threads and processes a QEMU may have.
pub const PIDS_MAX: u32 = 512;
const PERIOD_US: u64 = 100_000;

/// Which cgroup hierarchy carries the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cgroups {
    V2(PathBuf),
    V1(PathBuf),
    /// Neither is usable; VMs run without limits (logged).
    None,
}

/// What went wrong applying limits.
#[derive(Debug, thiserror::Error)]
#[error("cannot apply limits at {path}")]
pub struct LimitError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn write(path: &Path, value: &str) -> Result<(), LimitError> {
    std::fs::write(path, value).map_err(|source| LimitError {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), LimitError> {
    std::fs::create_dir_all(path).map_err(|source| LimitError {
        path: path.to_path_buf(),
        source,
    })
}

impl Cgroups {
    /// Finds the hierarchy under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> Self {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu")
            && controllers.split_whitespace().any(|c| c == "memory")
        {
            return Cgroups::V2(root.to_path_buf());
        }
        if root.join("cpu/cpu.cfs_quota_us").exists()
            && root.join("memory/memory.limit_in_bytes").exists()
        {
            return Cgroups::V1(root.to_path_buf());
        }
        Cgroups::None
    }

    /// The directories of a VM's cgroup(s).
    pub fn dirs(&self, id: VmId) -> Vec<PathBuf> {
        let leaf = format!("zy-vms/{id}");
        match self {
            Cgroups::V2(root) => vec![root.join(leaf)],
            Cgroups::V1(root) => ["cpu", "memory", "pids"]
                .iter()
                .map(|c| root.join(c).join(&leaf))
                .collect(),
            Cgroups::None => Vec::new(),
        }
    }

    /// Makes the VM's cgroup with its limits and moves `pid` into it.
    pub fn apply(&self, id: VmId, pid: i32, vcpus: u32, memory_mib: u64) -> Result<(), LimitError> {
        let quota = u64::from(vcpus) * PERIOD_US;
        // The same sum the coordinator placed the VM by.
        let mem = zy_common::resources::MODEL.vm_memory_mib(memory_mib) << 20;
        match self {
            Cgroups::V2(root) => {
                // Children can only use controllers their parent delegates.
                let parent = root.join("zy-vms");
                mkdir(&parent)?;
                let _ = write(&root.join("cgroup.subtree_control"), "+cpu +memory +pids");
                let _ = write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids");
                let dir = parent.join(id.to_string());
                mkdir(&dir)?;
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                write(&dir.join("memory.max"), &mem.to_string())?;
                write(&dir.join("pids.max"), &PIDS_MAX.to_string())?;
                write(&dir.join("cgroup.procs"), &pid.to_string())
            }
            Cgroups::V1(_) => {
                let dirs = self.dirs(id);
                for d in &dirs {
                    mkdir(d)?;
                }
                write(&dirs[0].join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&dirs[0].join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&dirs[1].join("memory.limit_in_bytes"), &mem.to_string())?;
                if dirs[2].join("pids.max").exists() {
                    write(&dirs[2].join("pids.max"), &PIDS_MAX.to_string())?;
                }
                for d in &dirs {
                    write(&d.join("cgroup.procs"), &pid.to_string())?;
                }
                Ok(())
            }
            Cgroups::None => Ok(()),
        }
    }

    /// Removes the VM's cgroup(s) once its process is gone; absent is fine. Whether none
    /// is left: a cgroup cannot go while it still holds a task, and a QEMU seen gone may
    /// still be a zombie that its parent (init, for a re-attached one) has not reaped.
    pub fn remove(&self, id: VmId) -> bool {
        let mut gone = true;
        for d in self.dirs(id) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => gone = false,
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v2_v1_and_nothing() {
        let dir = std::env::temp_dir().join(format!("zy-cg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("cpu")).unwrap();
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        assert_eq!(Cgroups::detect(&dir), Cgroups::None);
        std::fs::write(dir.join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(dir.join("memory/memory.limit_in_bytes"), "0").unwrap();
        assert_eq!(Cgroups::detect(&dir), Cgroups::V1(dir.clone()));
        std::fs::write(dir.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        assert_eq!(Cgroups::detect(&dir), Cgroups::V2(dir.clone()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
