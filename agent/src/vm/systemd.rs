//! QEMU processes as systemd transient units, over the system bus.
//!
//! Where systemd runs, each VM's QEMU is `zy-vm-<id>.service`, a transient unit in
//! `zy-vms.slice` that carries the VM's CPU quota, memory ceiling and task limit. systemd,
//! not the agent, is then QEMU's parent: the agent can stop, crash or be upgraded and every
//! guest keeps running in its own cgroup, accounted and limited, visible to ops with
//! `systemctl status zy-vm-<id>`.
//!
//! Only the few Manager and Service members the agent needs are declared here.

use std::path::Path;
use std::time::Duration;

use zbus::{OwnedObjectPath, Variant};
use zy_common::VmId;

use super::limits::PIDS_MAX;

/// The slice every VM unit goes into (`zy.slice/zy-vms.slice` in the cgroup tree).
pub const SLICE: &str = "zy-vms.slice";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Variant<'_>)],
        aux: &[(&str, &[(&str, Variant<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;

    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;

    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn exec_main_code(&self) -> zbus::Result<i32>;

    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
}

/// What went wrong talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot reach systemd on the system bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("systemd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("systemd refused to start {unit}: {source}")]
    Start {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd started {0} but it has no main process (QEMU did not start)")]
    NoProcess(String),
    #[error("systemd call on {unit} failed: {source}")]
    Call {
        unit: String,
        #[source]
        source: zbus::Error,
    },
}

/// A connection to systemd's manager.
#[derive(Clone, Debug)]
pub struct Systemd {
    conn: zbus::Connection,
    /// The agent's network namespace, when it is not systemd's: VM units must join it, or
    /// QEMU's taps would be made where the agent cannot see them.
    netns: Option<String>,
}

/// Whether this process shares its network namespace with PID 1 (systemd). Unknown counts
/// as shared.
pub fn netns_is_pid1s() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (
        std::fs::metadata("/proc/self/ns/net"),
        std::fs::metadata("/proc/1/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => true,
    }
}

/// Whether this host was booted with systemd (the check `sd_booted()` makes).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, SystemdError>>,
) -> Result<T, SystemdError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| SystemdError::Timeout(CALL_TIMEOUT))?
}

impl Systemd {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else the standard socket).
    pub async fn connect() -> Result<Self, SystemdError> {
        let conn = timed(async {
            zbus::Connection::system()
                .await
                .map_err(SystemdError::Connect)
        })
        .await?;
        let netns = (!netns_is_pid1s()).then(|| format!("/proc/{}/ns/net", std::process::id()));
        let me = Self { conn, netns };
        // A bus without systemd on it is no use: ask it something.
        timed(async {
            me.manager()
                .await?
                .get_unit("-.slice")
                .await
                .map_err(SystemdError::Connect)
        })
        .await?;
        Ok(me)
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>, SystemdError> {
        ManagerProxy::new(&self.conn)
            .await
            .map_err(SystemdError::Connect)
    }

    /// The unit name of a VM.
    pub fn unit(id: VmId) -> String {
        format!("zy-vm-{id}.service")
    }

    async fn service(&self, unit: &str) -> Result<ServiceProxy<'_>, SystemdError> {
        let call = |source| SystemdError::Call {
            unit: unit.to_string(),
            source,
        };
        let path = self.manager().await?.get_unit(unit).await.map_err(call)?;
        ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(call)
    }

    /// Starts `argv` as VM `id`'s unit with the VM's limits; its stderr goes to `stderr`.
    /// Returns QEMU's pid.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        &self,
        id: VmId,
        description: &str,
        argv: &[String],
        stderr: &Path,
        vm_dir: &Path,
        data_dir: &Path,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<i32, SystemdError> {
        let unit = Self::unit(id);
        // A QEMU of this VM that still runs as its unit is one the agent could not attach to
        // (it is starting the VM, so it has none): it holds the disk and the tap, and the
        // name. It goes, like the QEMU of a VM that is started again after a crash.
        if let Some(pid) = self.main_pid(id).await {
            tracing::warn!(vm = %id, pid, "an earlier QEMU of this VM still runs as its unit; killing it");
            self.kill_and_forget(id).await;
        }
        let started = timed(async {
            let m = self.manager().await?;
            // A unit of an earlier run that failed keeps its name until reset.
            let _ = m.reset_failed_unit(&unit).await;
            // systemd expands `$VAR` in ExecStart's arguments: `$$` keeps a `$` as it is (an
            // image's kernel command line may hold one).
            let argv: Vec<String> = argv.iter().map(|a| a.replace('$', "$$")).collect();
            let exec = vec![(argv[0].clone(), argv.clone(), false)];
            let stderr = stderr.display().to_string();
            let mut props: Vec<(&str, Variant<'_>)> = vec![
                ("Description", Variant::from(description)),
                ("Slice", Variant::from(SLICE)),
                ("Type", Variant::from("exec")),
                ("ExecStart", Variant::from(exec)),
                ("StandardInput", Variant::from("null")),
                ("StandardOutput", Variant::from("null")),
                ("StandardErrorFile", Variant::from(stderr.as_str())),
                (
                    "CPUQuotaPerSecUSec",
                    Variant::from(u64::from(vcpus) * 1_000_000),
                ),
                (
                    "MemoryMax",
                    Variant::from(zy_common::resources::MODEL.vm_memory_mib(memory_mib) << 20),
                ),
                ("TasksMax", Variant::from(u64::from(PIDS_MAX))),
                // QEMU is stopped through QMP; this is only the last resort.
                ("TimeoutStopUSec", Variant::from(10_000_000u64)),
            ];
            // Least privilege: QEMU needs its own directory, to read its images, and
            // CAP_NET_ADMIN for its taps; nothing else of the host.
            props.extend(sandbox(vm_dir, data_dir));
            if let Some(ns) = &self.netns {
                props.push(("NetworkNamespacePath", Variant::from(ns.as_str())));
            }
            m.start_transient_unit(&unit, "fail", &props, &[])
                .await
                .map_err(|source| SystemdError::Start {
                    unit: unit.clone(),
                    source,
                })?;
            // `exec` units have their main pid as soon as the job runs; give it a moment.
            let service = self.service(&unit).await?;
            for _ in 0..200 {
                match service.main_pid().await {
                    Ok(pid) if pid > 0 => return Ok(pid as i32),
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            Err(SystemdError::NoProcess(unit.clone()))
        })
        .await;
        if started.is_err() {
            // Whatever systemd did start must not stay behind.
            self.kill_and_forget(id).await;
        }
        started
    }

    /// Kills VM `id`'s unit if it runs, waits for it to go, and lets systemd forget it.
    pub async fn kill_and_forget(&self, id: VmId) {
        if self.main_pid(id).await.is_some() {
            let _ = self.kill(id).await;
            for _ in 0..100 {
                if self.main_pid(id).await.is_none() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.forget(id).await;
    }

    /// The main pid of VM `id`'s unit, if the unit exists and runs.
    pub async fn main_pid(&self, id: VmId) -> Option<i32> {
        let unit = Self::unit(id);
        let pid = timed(async {
            self.service(&unit)
                .await?
                .main_pid()
                .await
                .map_err(|source| SystemdError::Call { unit, source })
        })
        .await
        .ok()?;
        (pid > 0).then_some(pid as i32)
    }

    /// Kills every process of VM `id`'s unit.
    pub async fn kill(&self, id: VmId) -> Result<(), SystemdError> {
        let unit = Self::unit(id);
        timed(async {
            self.manager()
                .await?
                .kill_unit(&unit, "all", nix::sys::signal::Signal::SIGKILL as i32)
                .await
                .map_err(|source| SystemdError::Call { unit, source })
        })
        .await
    }

    /// How VM `id`'s unit ended (`None` if systemd already forgot it, as it does with units
    /// that ended cleanly), then lets systemd forget a failed one.
    ///
    /// QEMU counts as gone once it is a zombie, which can be before systemd has reaped it
    /// and recorded how it ended (a busy host): until then the unit still shows a blank
    /// exit (`ExecMainCode` 0, result `success`), so this waits, up to 5 s, for the record.
    pub async fn ended(&self, id: VmId) -> Option<String> {
        let unit = Self::unit(id);
        let mut how = None;
        for _ in 0..100 {
            let read = timed(async {
                let s = self.service(&unit).await?;
                let call = |source| SystemdError::Call {
                    unit: unit.clone(),
                    source,
                };
                Ok(ExitRecord {
                    main_pid: s.main_pid().await.map_err(call)?,
                    result: s.result().await.map_err(call)?,
                    code: s.exec_main_code().await.map_err(call)?,
                    status: s.exec_main_status().await.map_err(call)?,
                })
            })
            .await;
            let Ok(rec) = read else { break };
            how = Some(rec.describe());
            if rec.settled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.forget(id).await;
        how
    }

    /// Lets systemd drop a failed unit of VM `id` (nothing if there is none).
    pub async fn forget(&self, id: VmId) {
        let unit = Self::unit(id);
        let _ = timed(async {
            self.manager()
                .await?
                .reset_failed_unit(&unit)
                .await
                .map_err(|source| SystemdError::Call { unit, source })
        })
        .await;
    }
}

/// The sandbox of a VM's unit. QEMU runs as root (it makes its tap), so hiding matters as
/// much as read-only: the agent's data directory is replaced by an empty read-only tmpfs
/// in which only the VM's own directory (read-write) and the image cache (read-only)
/// appear, so neither the node's key nor another VM's disk is there to be read. The rest
/// of the system is read-only, home directories and /tmp are hidden, kernel tunables and
/// modules are out of reach, no new privileges, capabilities cut to CAP_NET_ADMIN, devices
/// to what a VM uses. /tmp and the home directories stay when the data directory is under
/// them (a test node's may be).
fn sandbox(vm_dir: &Path, data_dir: &Path) -> Vec<(&'static str, Variant<'static>)> {
    let under = |roots: &[&str]| roots.iter().any(|r| vm_dir.starts_with(r));
    let devices: Vec<(String, String)> = ["/dev/net/tun", "/dev/kvm", "/dev/vhost-net"]
        .iter()
        .map(|d| (d.to_string(), "rw".to_string()))
        .collect();
    let vm = vm_dir.display().to_string();
    let images = data_dir.join("images").display().to_string();
    let mut p = vec![
        ("ProtectSystem", Variant::from("strict")),
        (
            "TemporaryFileSystem",
            Variant::from(vec![(data_dir.display().to_string(), "ro".to_string())]),
        ),
        // (source, destination, ignore a missing source, mount options)
        (
            "BindPaths",
            Variant::from(vec![(vm.clone(), vm.clone(), false, 0u64)]),
        ),
        (
            "BindReadOnlyPaths",
            Variant::from(vec![(images.clone(), images, true, 0u64)]),
        ),
        ("ReadWritePaths", Variant::from(vec![vm])),
        ("NoNewPrivileges", Variant::from(true)),
        ("ProtectKernelTunables", Variant::from(true)),
        ("ProtectKernelModules", Variant::from(true)),
        ("ProtectControlGroups", Variant::from(true)),
        ("RestrictRealtime", Variant::from(true)),
        ("LockPersonality", Variant::from(true)),
        // CAP_NET_ADMIN is capability 12.
        ("CapabilityBoundingSet", Variant::from(1u64 << 12)),
        ("DevicePolicy", Variant::from("closed")),
        ("DeviceAllow", Variant::from(devices)),
    ];
    if !under(&["/home", "/root", "/run/user"]) {
        p.push(("ProtectHome", Variant::from("yes")));
    }
    if !under(&["/tmp", "/var/tmp"]) {
        p.push(("PrivateTmp", Variant::from(true)));
    }
    p
}

/// What systemd says of a unit's main process.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ExitRecord {
    main_pid: u32,
    result: String,
    code: i32,
    status: i32,
}

impl ExitRecord {
    /// Whether systemd has reaped the main process and recorded how it ended: a unit still
    /// holding a main pid, or one with no exit code yet, has not.
    fn settled(&self) -> bool {
        self.main_pid == 0 && self.code != 0
    }

    fn describe(&self) -> String {
        describe_exit(&self.result, self.code, self.status)
    }
}

/// Words for a service's end from its `Result`, `ExecMainCode` (a `CLD_*` code) and
/// `ExecMainStatus`.
pub fn describe_exit(result: &str, code: i32, status: i32) -> String {
    const CLD_EXITED: i32 = 1;
    const CLD_KILLED: i32 = 2;
    const CLD_DUMPED: i32 = 3;
    let signal = |s: i32| {
        nix::sys::signal::Signal::try_from(s)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| format!("signal {s}"))
    };
    let how = match code {
        CLD_EXITED => format!("exit status {status}"),
        CLD_KILLED => format!("killed by {}", signal(status)),
        CLD_DUMPED => format!("killed by {} (core dumped)", signal(status)),
        _ => "ended".to_string(),
    };
    format!("unit result {result}, {how}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_counts_only_once_systemd_has_recorded_it() {
        let rec = |main_pid, result: &str, code, status| ExitRecord {
            main_pid,
            result: result.to_string(),
            code,
            status,
        };
        // QEMU is a zombie systemd has not reaped: it still is the main pid, no exit yet
        // (read as "unit result success, ended" before this waited, a lab run found).
        assert!(!rec(4242, "success", 0, 0).settled());
        assert_eq!(
            rec(4242, "success", 0, 0).describe(),
            "unit result success, ended"
        );
        // Reaped but not yet recorded.
        assert!(!rec(0, "success", 0, 0).settled());
        assert!(rec(0, "signal", 2, 9).settled());
        assert!(rec(0, "success", 1, 0).settled());
    }

    #[test]
    fn exits_are_described_for_people() {
        assert_eq!(
            describe_exit("exit-code", 1, 1),
            "unit result exit-code, exit status 1"
        );
        assert_eq!(
            describe_exit("signal", 2, 9),
            "unit result signal, killed by SIGKILL"
        );
        assert_eq!(
            describe_exit("core-dump", 3, 6),
            "unit result core-dump, killed by SIGABRT (core dumped)"
        );
        assert!(describe_exit("signal", 2, 999).contains("signal 999"));
    }

    #[test]
    fn unit_names_are_fixed_by_the_vm_id() {
        let id: VmId = "6f1c2a8e-8e1b-4a59-9c47-2f4d1e0c9b11".parse().unwrap();
        assert_eq!(
            Systemd::unit(id),
            "zy-vm-6f1c2a8e-8e1b-4a59-9c47-2f4d1e0c9b11.service"
        );
    }
}
