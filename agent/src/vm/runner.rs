//! Starting, watching and stopping one QEMU process.
//!
//! QEMU runs in its own process group (a signal to the agent's group never reaches it), so
//! it outlives the agent. Its serial console goes to a socket that the agent holds
//! ([`super::console`]: copied into a size-capped log, served live); its QMP socket is how the agent controls it.
//!
//! The actor sees none of this: it runs VMs through [`VmRunner`] and [`RunningVm`], which
//! [`QemuRunner`] and [`Launched`] implement here (tested for real in `agent/tests/vm.rs` and
//! the lab) and an in-memory fake implements for unit tests.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tracing::warn;

use std::sync::atomic::AtomicBool;

use super::console::Consoles;
use super::limits::Cgroups;
use super::migrate::{Incoming, IncomingPlan, MigrateError, Outcome, OutgoingPlan, Progress};
use super::qmp::{Qmp, QmpError};
use super::spec::{SpecError, VmPaths, VmSpec};
use super::systemd::{Systemd, SystemdError};
use zy_common::VmId;

/// Console log size before it is rotated (one old log is kept: at most twice this on disk).
pub const CONSOLE_CAP: u64 = 1024 * 1024;

/// What went wrong running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("QEMU is not installed at {0} (install qemu-system-x86, or set qemu in agent.toml)")]
    QemuMissing(PathBuf),
    #[error("cannot prepare {path}")]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start QEMU")]
    Spawn(#[source] std::io::Error),
    #[error("QEMU exited at start ({status}): {stderr}")]
    EarlyExit { status: String, stderr: String },
    #[error("QEMU did not open its QMP socket within {0:?}")]
    NoQmp(Duration),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
}

/// Runs the node's VMs: what the actor needs of a hypervisor and its supervisor.
///
/// Methods return boxed futures so that the actor holds an `Arc<dyn VmRunner>` and the
/// manager, node and link stay free of type parameters; a VM starts rarely, so one
/// allocation per call costs nothing that matters.
pub trait VmRunner: Send + Sync + std::fmt::Debug {
    /// Starts the VM and returns once it runs.
    fn start<'a>(
        &'a self,
        spec: &'a VmSpec,
        paths: &'a VmPaths,
    ) -> BoxFuture<'a, Result<Box<dyn RunningVm>, RunError>>;

    /// Finds the VM running still (after an agent restart); `None` if it is not.
    fn find<'a>(
        &'a self,
        spec: &'a VmSpec,
        paths: &'a VmPaths,
    ) -> BoxFuture<'a, Result<Option<Box<dyn RunningVm>>, RunError>>;

    /// Forgets what was kept for a VM that no longer runs (its cgroup, its failed unit).
    fn cleanup(&self, id: VmId) -> BoxFuture<'_, ()>;

    /// Readies a live migration's destination ([`super::migrate::Incoming::prepare`]):
    /// target disks, a paused QEMU waiting for the stream, NBD exports. On failure
    /// nothing it made is left.
    fn incoming(
        &self,
        plan: IncomingPlan,
    ) -> BoxFuture<'_, Result<Box<dyn IncomingVm>, MigrateError>>;

    /// Kills the QEMU a migration's destination left in `paths` (after an agent restart,
    /// before activation: nothing else knows it), and waits until it is gone.
    fn kill_incoming<'a>(&'a self, id: VmId, paths: &'a VmPaths) -> BoxFuture<'a, ()>;
}

/// A live migration's destination before activation: a paused QEMU receiving the VM.
pub trait IncomingVm: Send + Sync + std::fmt::Debug {
    /// Its QEMU's process id.
    fn pid(&self) -> Option<i32>;

    /// Waits until the whole VM has arrived (paused here), or why not.
    fn wait_complete<'a>(
        &'a mut self,
        cancel: &'a AtomicBool,
    ) -> BoxFuture<'a, Result<(), MigrateError>>;

    /// Starts the arrived guest here and tells the network where it is now (QMP
    /// `announce-self`); the VM runs on as an ordinary one. On failure it is aborted.
    fn activate(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn RunningVm>, MigrateError>>;

    /// Kills its QEMU and removes every file made for it.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// What an agent that restarted finds of a migration in a VM's QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// No migration: the VM runs as it did.
    Nothing,
    /// One was under way: cancelled and undone, the guest runs again.
    Undone,
    /// One completed: the guest is paused for good (until an abort resumes it).
    Completed,
}

/// One running VM, as its actor holds it.
pub trait RunningVm: Send + Sync + std::fmt::Debug {
    /// The process id the node reports.
    fn pid(&self) -> i32;

    /// From start to running (zero for a VM found running).
    fn startup(&self) -> Duration;

    /// Waits until the VM is gone; how the process ended, when that can be known. Safe to
    /// drop and call again (the actor waits for it beside its requests).
    fn exited(&mut self) -> BoxFuture<'_, Option<String>>;

    /// Once [`RunningVm::exited`] returned: whether the guest or the VM ended it.
    fn ended(self: Box<Self>, status: Option<String>) -> BoxFuture<'static, Exit>;

    /// Stops the VM, giving the guest up to `grace` to power off.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, StopHow>;

    /// Migrates the running VM ([`super::migrate::migrate_out`]) after checking that its
    /// disks are of the sizes the destination made (`sizes`, bytes, in order). On success
    /// the guest is paused here for good; on failure it runs as before.
    fn migrate_out<'a>(
        &'a mut self,
        spec: &'a VmSpec,
        plan: &'a OutgoingPlan,
        sizes: &'a [u64],
        cancel: &'a AtomicBool,
        progress: &'a mut (dyn FnMut(Progress) + Send),
    ) -> BoxFuture<'a, Result<Outcome, MigrateError>>;

    /// Resumes a guest paused by a completed migration (QMP `cont`).
    fn resume(&mut self) -> BoxFuture<'_, Result<(), MigrateError>>;

    /// After an agent restart: cancels and undoes a migration found under way (the guest
    /// runs again) or reports one completed (the guest stays paused).
    fn recover_migration<'a>(&'a mut self, spec: &'a VmSpec) -> BoxFuture<'a, Recovered>;
}

/// How a VM ended when nobody asked it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered itself off.
    GuestPoweroff,
    /// The guest's kernel panicked, and QEMU exited (how, if known).
    GuestPanic(Option<String>),
    /// QEMU went without the guest asking (how, if known).
    Died(Option<String>),
}

impl Exit {
    /// Reads the QMP events QEMU sent before it went. A panic also ends in a guest
    /// `SHUTDOWN` (reason `guest-panic`): it is not a poweroff.
    pub fn from_events(events: &[serde_json::Value], status: Option<String>) -> Self {
        let mut poweroff = false;
        let mut panicked = false;
        for ev in events {
            if ev["event"] == "GUEST_PANICKED" || ev["data"]["reason"] == "guest-panic" {
                panicked = true;
            } else if ev["event"] == "SHUTDOWN" && ev["data"]["guest"] == true {
                poweroff = true;
            }
        }
        match (poweroff, panicked) {
            (_, true) => Exit::GuestPanic(status),
            (true, false) => Exit::GuestPoweroff,
            (false, false) => Exit::Died(status),
        }
    }
}

/// The real runner: QEMU, started by the agent or by systemd.
#[derive(Clone, Debug)]
pub struct QemuRunner {
    pub qemu: PathBuf,
    pub supervisor: Supervisor,
    /// Where the VMs' consoles are opened (the node serves them from there).
    pub consoles: Consoles,
}

impl VmRunner for QemuRunner {
    fn start<'a>(
        &'a self,
        spec: &'a VmSpec,
        paths: &'a VmPaths,
    ) -> BoxFuture<'a, Result<Box<dyn RunningVm>, RunError>> {
        Box::pin(async move {
            let l = launch(&self.qemu, spec, paths, &self.supervisor, &self.consoles).await?;
            Ok(Box::new(l) as Box<dyn RunningVm>)
        })
    }

    fn find<'a>(
        &'a self,
        spec: &'a VmSpec,
        paths: &'a VmPaths,
    ) -> BoxFuture<'a, Result<Option<Box<dyn RunningVm>>, RunError>> {
        Box::pin(async move {
            let l = attach(spec, paths, &self.supervisor, &self.consoles).await?;
            Ok(l.map(|l| Box::new(l) as Box<dyn RunningVm>))
        })
    }

    fn cleanup(&self, id: VmId) -> BoxFuture<'_, ()> {
        Box::pin(self.supervisor.cleanup(id))
    }

    fn incoming(
        &self,
        plan: IncomingPlan,
    ) -> BoxFuture<'_, Result<Box<dyn IncomingVm>, MigrateError>> {
        Box::pin(async move {
            let i = Incoming::prepare(&self.qemu, &self.supervisor, &self.consoles, plan).await?;
            Ok(Box::new(i) as Box<dyn IncomingVm>)
        })
    }

    fn kill_incoming<'a>(&'a self, id: VmId, paths: &'a VmPaths) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let pid = std::fs::read_to_string(paths.pidfile())
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                if kill_qemu_of(pid, id) {
                    for _ in 0..200 {
                        if !pid_alive(pid) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
            }
            self.supervisor.cleanup(id).await;
        })
    }
}

impl IncomingVm for Incoming {
    fn pid(&self) -> Option<i32> {
        Incoming::pid(self)
    }

    fn wait_complete<'a>(
        &'a mut self,
        cancel: &'a AtomicBool,
    ) -> BoxFuture<'a, Result<(), MigrateError>> {
        Box::pin(Incoming::wait_complete(self, cancel))
    }

    fn activate(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn RunningVm>, MigrateError>> {
        Box::pin(async move {
            let mut l = Incoming::activate(*self).await?;
            super::migrate::announce(&mut l.qmp).await;
            Ok(Box::new(l) as Box<dyn RunningVm>)
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(Incoming::abort(*self))
    }
}

impl RunningVm for Launched {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn startup(&self) -> Duration {
        self.startup
    }

    fn exited(&mut self) -> BoxFuture<'_, Option<String>> {
        Box::pin(self.proc.exited())
    }

    fn ended(mut self: Box<Self>, status: Option<String>) -> BoxFuture<'static, Exit> {
        Box::pin(async move {
            // Events QEMU sent before it went are still in the socket.
            let mut events = Vec::new();
            while let Ok(Ok(ev)) =
                tokio::time::timeout(Duration::from_millis(200), self.qmp.next_event()).await
            {
                events.push(ev);
            }
            Exit::from_events(&events, status)
        })
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, StopHow> {
        Box::pin(stop(self, grace))
    }

    fn migrate_out<'a>(
        &'a mut self,
        spec: &'a VmSpec,
        plan: &'a OutgoingPlan,
        sizes: &'a [u64],
        cancel: &'a AtomicBool,
        progress: &'a mut (dyn FnMut(Progress) + Send),
    ) -> BoxFuture<'a, Result<Outcome, MigrateError>> {
        Box::pin(async move {
            super::migrate::check_sizes(&mut self.qmp, spec, sizes).await?;
            super::migrate::migrate_out(&mut self.qmp, spec, plan, cancel, progress).await
        })
    }

    fn resume(&mut self) -> BoxFuture<'_, Result<(), MigrateError>> {
        Box::pin(async move {
            self.qmp.execute("cont", None).await?;
            Ok(())
        })
    }

    fn recover_migration<'a>(&'a mut self, spec: &'a VmSpec) -> BoxFuture<'a, Recovered> {
        Box::pin(super::migrate::recover_out(&mut self.qmp, spec))
    }
}

/// Who is QEMU's parent.
#[derive(Clone, Debug)]
pub enum Supervisor {
    /// The agent itself, with limits through cgroups (hosts without systemd).
    Direct(Cgroups),
    /// systemd: each QEMU is a transient unit in the VM slice.
    Systemd(Systemd),
}

impl Supervisor {
    /// A short name for logs and the node's inventory.
    pub fn as_str(&self) -> &'static str {
        match self {
            Supervisor::Direct(_) => "direct",
            Supervisor::Systemd(_) => "systemd",
        }
    }

    /// Removes what the supervisor kept for a VM whose QEMU is gone.
    pub async fn cleanup(&self, id: VmId) {
        match self {
            Supervisor::Direct(cg) => {
                // Until the last task has left (a zombie being reaped), for a few seconds.
                for _ in 0..100 {
                    if cg.remove(id) {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                tracing::warn!(vm = %id, "a VM's cgroup still holds a task 5 s after its QEMU ended; left in place");
            }
            Supervisor::Systemd(sd) => sd.forget(id).await,
        }
    }
}

/// A QEMU process: one this agent started (its child), one systemd runs as a unit for it,
/// or one it found running after its own restart (someone else's child now, watched
/// through `/proc`).
#[derive(Debug)]
pub enum Proc {
    Child(tokio::process::Child),
    Unit { pid: i32, sd: Systemd, id: VmId },
    Foreign { pid: i32, id: VmId },
}

async fn gone(pid: i32) {
    while pid_alive(pid) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

impl Proc {
    /// Waits until the process is gone; how it ended, when that can be known.
    pub async fn exited(&mut self) -> Option<String> {
        match self {
            Proc::Child(c) => c.wait().await.ok().map(|s| s.to_string()),
            Proc::Unit { pid, sd, id } => {
                gone(*pid).await;
                sd.ended(*id).await
            }
            Proc::Foreign { pid, .. } => {
                gone(*pid).await;
                None
            }
        }
    }

    /// Whether it has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten().is_some(),
            Proc::Unit { pid, .. } | Proc::Foreign { pid, .. } => !pid_alive(*pid),
        }
    }

    async fn kill(&mut self) {
        let (pid, id) = match self {
            Proc::Child(c) => {
                let _ = c.start_kill();
                return;
            }
            Proc::Unit { pid, sd, id } => match sd.kill(*id).await {
                Ok(()) => return,
                Err(e) => {
                    warn!(vm = %id, error = %e, "systemd cannot kill the VM's unit; killing QEMU");
                    (*pid, *id)
                }
            },
            Proc::Foreign { pid, id } => (*pid, *id),
        };
        kill_qemu_of(pid, id);
    }
}

/// SIGKILLs `pid` if it still is the QEMU of VM `id` (a pid that is not our child may
/// have gone and been given to another process since). Returns whether it sent the signal.
pub fn kill_qemu_of(pid: i32, id: zy_common::VmId) -> bool {
    pid_alive(pid)
        && is_qemu_of(pid, id)
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
}

/// Whether `pid` is a live process: it exists and is not a zombie (a killed process whose
/// parent is gone may never be reaped in a container without an init).
pub fn pid_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Whether `pid` is the QEMU of VM `id` (its command line carries `-uuid <id>`).
pub fn is_qemu_of(pid: i32, id: zy_common::VmId) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = id.to_string();
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(a) = args.next() {
        if a == b"-uuid" {
            return args.next() == Some(want.as_bytes());
        }
    }
    false
}

/// A running QEMU and its QMP session.
#[derive(Debug)]
pub struct Launched {
    pub pid: i32,
    pub proc: Proc,
    pub qmp: Qmp,
    /// From spawn to QMP reporting `running` (zero when re-attached).
    pub startup: Duration,
}

/// Finds a VM's QEMU after an agent restart: its pid file names a live process whose
/// command line carries the VM's id, and its QMP socket answers. `None` if it is not running.
pub async fn attach(
    spec: &VmSpec,
    paths: &VmPaths,
    sup: &Supervisor,
    consoles: &Consoles,
) -> Result<Option<Launched>, RunError> {
    let Ok(text) = std::fs::read_to_string(paths.pidfile()) else {
        return Ok(None);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(None);
    };
    if !pid_alive(pid) || !is_qemu_of(pid, spec.id) {
        return Ok(None);
    }
    let qmp = Qmp::connect(&paths.qmp()).await?;
    consoles.open(spec.id, paths.console_sock(), paths.console_log());
    // A QEMU started before the agent moved to systemd is not a unit: watch it by pid.
    let proc = match sup {
        Supervisor::Systemd(sd) if sd.main_pid(spec.id).await == Some(pid) => Proc::Unit {
            pid,
            sd: sd.clone(),
            id: spec.id,
        },
        _ => Proc::Foreign { pid, id: spec.id },
    };
    Ok(Some(Launched {
        pid,
        proc,
        qmp,
        startup: Duration::ZERO,
    }))
}

/// Starts QEMU for `spec` and waits until QMP says it runs.
pub async fn launch(
    qemu: &Path,
    spec: &VmSpec,
    paths: &VmPaths,
    sup: &Supervisor,
    consoles: &Consoles,
) -> Result<Launched, RunError> {
    let args = spec.qemu_args(paths)?;
    launch_args(qemu, spec, paths, sup, consoles, args).await
}

/// Starts QEMU for `spec` with the command line `args` built from it (by
/// [`VmSpec::qemu_args`], or [`VmSpec::incoming_args`] for a migration's destination) and
/// waits until QMP answers.
pub async fn launch_args(
    qemu: &Path,
    spec: &VmSpec,
    paths: &VmPaths,
    sup: &Supervisor,
    consoles: &Consoles,
    args: Vec<String>,
) -> Result<Launched, RunError> {
    if !qemu.exists() {
        return Err(RunError::QemuMissing(qemu.to_path_buf()));
    }
    let files = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::Files { path, source }
    };
    std::fs::create_dir_all(&paths.dir).map_err(files(&paths.dir))?;
    for stale in [paths.qmp(), paths.console_sock(), paths.pidfile()] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(files(&stale)(e)),
            _ => {}
        }
    }
    let stderr_path = paths.dir.join("qemu.stderr");
    let stderr = std::fs::File::create(&stderr_path).map_err(files(&stderr_path))?;
    let t0 = Instant::now();
    let (pid, mut proc) = match sup {
        Supervisor::Direct(cgroups) => {
            let mut cmd = std::process::Command::new(qemu);
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .process_group(0);
            let child = tokio::process::Command::from(cmd)
                .kill_on_drop(false)
                .spawn()
                .map_err(RunError::Spawn)?;
            let pid = child.id().map(|p| p as i32).unwrap_or(0);
            if let Err(e) = cgroups.apply(spec.id, pid, spec.vcpus, spec.memory_mib) {
                warn!(vm = %spec.id, error = %e, "the VM runs without CPU and memory limits");
            }
            (pid, Proc::Child(child))
        }
        Supervisor::Systemd(sd) => {
            drop(stderr);
            let mut argv = vec![qemu.display().to_string()];
            argv.extend(args);
            let what = format!("Zhengyun VM {} ({})", spec.name, spec.id);
            let pid = sd
                .start(
                    spec.id,
                    &what,
                    &argv,
                    &stderr_path,
                    &paths.dir,
                    paths
                        .dir
                        .parent()
                        .and_then(Path::parent)
                        .unwrap_or(&paths.dir),
                    spec.vcpus,
                    spec.memory_mib,
                )
                .await?;
            let proc = Proc::Unit {
                pid,
                sd: sd.clone(),
                id: spec.id,
            };
            (pid, proc)
        }
    };

    match until_running(&mut proc, spec.id, paths, consoles, &stderr_path, t0).await {
        Ok(qmp) => Ok(Launched {
            pid,
            proc,
            qmp,
            startup: t0.elapsed(),
        }),
        Err(e) => {
            // A QEMU that started but never ran as it should does not stay behind.
            if !proc.has_exited() {
                proc.kill().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), proc.exited()).await;
            }
            if let Proc::Unit { sd, id, .. } = &proc {
                sd.forget(*id).await;
            }
            Err(e)
        }
    }
}

/// Waits until QEMU answers on QMP that it runs; its QMP session.
async fn until_running(
    proc: &mut Proc,
    id: VmId,
    paths: &VmPaths,
    consoles: &Consoles,
    stderr_path: &Path,
    t0: Instant,
) -> Result<Qmp, RunError> {
    // Wait for the QMP socket, noticing an early exit (bad kernel path, busy tap...).
    let deadline = t0 + Duration::from_secs(15);
    let qmp = loop {
        if proc.has_exited() {
            return Err(early_exit(proc, stderr_path).await);
        }
        if paths.qmp().exists() {
            match Qmp::connect(&paths.qmp()).await {
                Ok(q) => break q,
                Err(QmpError::Connect { .. }) => {}
                // QEMU opens QMP before it checks everything; if it is gone, say why.
                Err(e) => return Err(gone_within(proc, stderr_path).await.unwrap_or(e.into())),
            }
        }
        if Instant::now() > deadline {
            return Err(RunError::NoQmp(Duration::from_secs(15)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    consoles.open(id, paths.console_sock(), paths.console_log());
    let mut qmp = qmp;
    let status = match qmp.status().await {
        Ok(s) => s,
        Err(e) => return Err(gone_within(proc, stderr_path).await.unwrap_or(e.into())),
    };
    // `inmigrate`: a migration's destination, waiting paused for its stream.
    if status != "running" && status != "inmigrate" {
        warn!(%status, "QEMU is not running after start");
    }
    Ok(qmp)
}

/// The error for a QEMU that has exited: how, and what it said on stderr.
async fn early_exit(proc: &mut Proc, stderr: &Path) -> RunError {
    let status = proc
        .exited()
        .await
        .unwrap_or_else(|| "it exited".to_string());
    let text = std::fs::read_to_string(stderr).unwrap_or_default();
    RunError::EarlyExit {
        status,
        stderr: text.trim().chars().take(2000).collect(),
    }
}

/// If QEMU exits within a moment, the error that says why.
async fn gone_within(proc: &mut Proc, stderr: &Path) -> Option<RunError> {
    for _ in 0..40 {
        if proc.has_exited() {
            return Some(early_exit(proc, stderr).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Appends to `log`, rotating it to `<log>.1` once it would pass `cap`.
pub fn append_capped(log: &Path, bytes: &[u8], cap: u64) -> std::io::Result<()> {
    use std::io::Write;
    let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    if len + bytes.len() as u64 > cap && len > 0 {
        std::fs::rename(log, log.with_extension("log.1"))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    f.write_all(bytes)
}

/// The last `n` lines of the console (from the rotated log too, if needed).
pub fn console_tail(log: &Path, n: usize) -> Vec<String> {
    let mut text = std::fs::read(log.with_extension("log.1")).unwrap_or_default();
    text.extend(std::fs::read(log).unwrap_or_default());
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopHow {
    /// The guest powered off after an ACPI power-button press.
    Graceful,
    /// The guest ignored the button; QEMU was told to quit.
    Quit,
    /// QEMU ignored `quit` too and was killed.
    Killed,
    /// It was not running.
    AlreadyGone,
}

/// Stops a VM: ACPI powerdown, up to `grace`; then `quit`; then SIGKILL.
pub async fn stop(l: &mut Launched, grace: Duration) -> StopHow {
    if l.proc.has_exited() {
        return StopHow::AlreadyGone;
    }
    if l.qmp.execute("system_powerdown", None).await.is_ok()
        && tokio::time::timeout(grace, l.proc.exited()).await.is_ok()
    {
        return StopHow::Graceful;
    }
    let _ = l.qmp.execute("quit", None).await;
    if tokio::time::timeout(Duration::from_secs(3), l.proc.exited())
        .await
        .is_ok()
    {
        return StopHow::Quit;
    }
    l.proc.kill().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), l.proc.exited()).await;
    StopHow::Killed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's last events tell a guest's poweroff from a panic (which also ends in a guest
    /// `SHUTDOWN`) and from QEMU just going.
    #[test]
    fn an_exit_is_told_by_qemus_last_events() {
        use serde_json::json;
        let status = || Some("exit status: 0".to_string());
        let off = json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}});
        let host =
            json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}});
        let panic_shutdown =
            json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-panic"}});
        let panicked = json!({"event": "GUEST_PANICKED", "data": {"action": "pause"}});
        let other = json!({"event": "RESUME"});
        assert_eq!(
            Exit::from_events(&[other.clone(), off.clone()], status()),
            Exit::GuestPoweroff
        );
        assert_eq!(
            Exit::from_events(&[panicked, off.clone()], status()),
            Exit::GuestPanic(status())
        );
        assert_eq!(
            Exit::from_events(&[panic_shutdown], status()),
            Exit::GuestPanic(status())
        );
        assert_eq!(Exit::from_events(&[host, other], None), Exit::Died(None));
        assert_eq!(Exit::from_events(&[], status()), Exit::Died(status()));
    }

    #[test]
    fn console_log_is_capped_and_keeps_its_tail() {
        let dir = std::env::temp_dir().join(format!("zy-console-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        for i in 0..1000 {
            append_capped(&log, format!("line {i}\n").as_bytes(), 1000).unwrap();
        }
        let total = std::fs::metadata(&log).unwrap().len()
            + std::fs::metadata(log.with_extension("log.1"))
                .unwrap()
                .len();
        assert!(total <= 2000, "{total}");
        assert_eq!(console_tail(&log, 2), vec!["line 998", "line 999"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
