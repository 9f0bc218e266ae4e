//! What the agent reads about its host: inventory (what the node is) and load (what it is
//! doing), through procfs and statvfs. Nothing here writes to the host.

use std::path::Path;

use procfs::{Current, CurrentSI};
use zy_common::ids::Zone;
use zy_common::proto::{Accel, Inventory, LoadReport};

use crate::config::AccelChoice;

/// What reading the host can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read {what} from /proc")]
    Proc {
        what: &'static str,
        #[source]
        source: procfs::ProcError,
    },
    #[error("cannot stat the data directory {path}")]
    Statvfs {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("KVM was asked for (accel = \"kvm\") but this host cannot run KVM guests: no vmx/svm CPU flag or /dev/kvm does not create VMs")]
    NoKvm,
}

fn proc_err(what: &'static str) -> impl FnOnce(procfs::ProcError) -> HostError {
    move |source| HostError::Proc { what, source }
}

/// Size and free bytes of the file system holding `path`.
pub fn disk_space(path: &Path) -> Result<(u64, u64), HostError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|source| HostError::Statvfs {
        path: path.display().to_string(),
        source,
    })?;
    let frsize = st.fragment_size() as u64;
    Ok((
        st.blocks() as u64 * frsize,
        st.blocks_available() as u64 * frsize,
    ))
}

/// Whether this host can run KVM guests: the CPU must show hardware virtualisation *and*
/// `/dev/kvm` must create a VM (a software KVM without vmx/svm hangs real guests).
pub fn kvm_usable(cpu_flags_have_virt: bool) -> bool {
    cpu_flags_have_virt && crate::sys::kvm_can_create_vm()
}

/// Picks the accelerator from the config and what the host can do.
pub fn choose_accel(choice: AccelChoice, kvm_usable: bool) -> Result<Accel, HostError> {
    match (choice, kvm_usable) {
        (AccelChoice::Auto, true) | (AccelChoice::Kvm, true) => Ok(Accel::Kvm),
        (AccelChoice::Kvm, false) => Err(HostError::NoKvm),
        (AccelChoice::Auto, false) | (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
    }
}

/// Reads the node's inventory.
pub fn inventory(
    data_dir: &Path,
    zone: Zone,
    accel_choice: AccelChoice,
) -> Result<Inventory, HostError> {
    let cpu = procfs::CpuInfo::current().map_err(proc_err("cpuinfo"))?;
    let virt = cpu
        .flags(0)
        .map(|f| f.iter().any(|x| *x == "vmx" || *x == "svm"))
        .unwrap_or(false);
    let kvm = kvm_usable(virt);
    let accel = choose_accel(accel_choice, kvm)?;
    let mem = procfs::Meminfo::current().map_err(proc_err("meminfo"))?;
    let (disk_total, disk_free) = disk_space(data_dir)?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Inventory {
        hostname,
        cpu_model: cpu
            .model_name(0)
            .unwrap_or("unknown")
            .chars()
            .take(256)
            .collect(),
        cpus: cpu.num_cores().max(1) as u32,
        memory_bytes: mem.mem_total,
        disk_total_bytes: disk_total,
        disk_free_bytes: disk_free,
        kvm_usable: kvm,
        accel,
        zone,
        agent_version: zy_common::VERSION.into(),
        kernel,
    })
}

/// CPU time counters from `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub busy: u64,
    pub total: u64,
}

/// Busy CPU percent between two samples, clamped to 0..=100.
pub fn cpu_percent(prev: CpuTicks, now: CpuTicks) -> f32 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy);
    ((busy as f64 / total as f64) * 100.0).clamp(0.0, 100.0) as f32
}

/// Samples load; keeps the previous CPU counters to compute a rate.
#[derive(Debug)]
pub struct LoadSampler {
    data_dir: std::path::PathBuf,
    prev: Option<CpuTicks>,
    seq: u64,
}

impl LoadSampler {
    /// A sampler for a node whose data lives in `data_dir`. Takes a first CPU sample so
    /// that the first report already carries a rate.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            prev: Self::cpu_ticks().ok(),
            seq: 0,
        }
    }

    fn cpu_ticks() -> Result<CpuTicks, HostError> {
        let stat = procfs::KernelStats::current().map_err(proc_err("stat"))?;
        let c = stat.total;
        let idle = c.idle + c.iowait.unwrap_or(0);
        let total = c.user
            + c.nice
            + c.system
            + c.idle
            + c.iowait.unwrap_or(0)
            + c.irq.unwrap_or(0)
            + c.softirq.unwrap_or(0)
            + c.steal.unwrap_or(0);
        Ok(CpuTicks {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// One load report.
    pub fn sample(&mut self) -> Result<LoadReport, HostError> {
        let ticks = Self::cpu_ticks()?;
        let cpu = self.prev.map(|p| cpu_percent(p, ticks)).unwrap_or(0.0);
        self.prev = Some(ticks);
        let mem = procfs::Meminfo::current().map_err(proc_err("meminfo"))?;
        let available = mem.mem_available.unwrap_or(mem.mem_free);
        let la = procfs::LoadAverage::current().map_err(proc_err("loadavg"))?;
        let (mut rx, mut tx) = (0u64, 0u64);
        for (name, dev) in procfs::net::dev_status().map_err(proc_err("net/dev"))? {
            if name != "lo" {
                rx = rx.saturating_add(dev.recv_bytes);
                tx = tx.saturating_add(dev.sent_bytes);
            }
        }
        let (_, disk_free) = disk_space(&self.data_dir)?;
        self.seq += 1;
        Ok(LoadReport {
            seq: self.seq,
            cpu_percent: cpu,
            mem_used_bytes: mem.mem_total.saturating_sub(available),
            mem_available_bytes: available,
            load1: sane(la.one),
            load5: sane(la.five),
            load15: sane(la.fifteen),
            net_rx_bytes: rx,
            net_tx_bytes: tx,
            disk_free_bytes: disk_free,
        })
    }
}

fn sane(v: f32) -> f32 {
    if v.is_finite() && v >= 0.0 {
        v
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_is_a_clamped_rate() {
        let a = CpuTicks {
            busy: 100,
            total: 1000,
        };
        let b = CpuTicks {
            busy: 150,
            total: 1100,
        };
        assert_eq!(cpu_percent(a, b), 50.0);
        assert_eq!(cpu_percent(b, a), 0.0);
        assert_eq!(cpu_percent(a, a), 0.0);
    }

    #[test]
    fn accel_follows_config_and_host() {
        assert_eq!(choose_accel(AccelChoice::Auto, true).unwrap(), Accel::Kvm);
        assert_eq!(choose_accel(AccelChoice::Auto, false).unwrap(), Accel::Tcg);
        assert_eq!(choose_accel(AccelChoice::Tcg, true).unwrap(), Accel::Tcg);
        assert!(choose_accel(AccelChoice::Kvm, false).is_err());
    }

    #[test]
    fn reads_this_host() {
        let dir = std::env::temp_dir();
        let inv = inventory(&dir, Zone::Intranet, AccelChoice::Tcg).unwrap();
        assert!(inv.cpus >= 1 && inv.memory_bytes > 0);
        let mut s = LoadSampler::new(&dir);
        s.sample().unwrap();
        let l = s.sample().unwrap();
        assert_eq!(l.seq, 2);
        assert!(l.mem_available_bytes > 0);
        zy_common::proto::Message::Load(l).validate().unwrap();
    }
}
