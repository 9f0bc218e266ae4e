//! Starting, watching and stopping one QEMU process.
//!
//! QEMU runs in its own process group (a signal to the agent's group never reaches it), so
//! it outlives the agent. Its serial console goes to a socket that the agent copies into a
//! size-capped log; its QMP socket is how the agent controls it.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tracing::{debug, warn};

use super::qmp::{Qmp, QmpError};
use super::spec::{SpecError, VmPaths, VmSpec};

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
}

/// A QEMU process: one this agent started (its child), or one it found running after its
/// own restart (someone else's child now, watched through `/proc`).
#[derive(Debug)]
pub enum Proc {
    Child(tokio::process::Child),
    Foreign(i32),
}

impl Proc {
    /// Waits until the process is gone; the exit status when it was our child.
    pub async fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match self {
            Proc::Child(c) => c.wait().await.ok(),
            Proc::Foreign(pid) => {
                while pid_is_qemu_alive(*pid) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None
            }
        }
    }

    /// Whether it has exited, without waiting.
    pub fn has_exited(&mut self) -> bool {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten().is_some(),
            Proc::Foreign(pid) => !pid_is_qemu_alive(*pid),
        }
    }

    fn kill(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.start_kill();
            }
            Proc::Foreign(pid) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Whether `pid` is a live (not zombie) process.
fn pid_is_qemu_alive(pid: i32) -> bool {
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
pub async fn attach(spec: &VmSpec, paths: &VmPaths) -> Result<Option<Launched>, RunError> {
    let Ok(text) = std::fs::read_to_string(paths.pidfile()) else {
        return Ok(None);
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(None);
    };
    if !pid_is_qemu_alive(pid) || !is_qemu_of(pid, spec.id) {
        return Ok(None);
    }
    let qmp = Qmp::connect(&paths.qmp()).await?;
    tokio::spawn(copy_console(paths.console_sock(), paths.console_log()));
    Ok(Some(Launched {
        pid,
        proc: Proc::Foreign(pid),
        qmp,
        startup: Duration::ZERO,
    }))
}

/// Starts QEMU for `spec` and waits until QMP says it runs.
pub async fn launch(qemu: &Path, spec: &VmSpec, paths: &VmPaths) -> Result<Launched, RunError> {
    let args = spec.qemu_args(paths)?;
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
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0);
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(RunError::Spawn)?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);

    // Wait for the QMP socket, noticing an early exit (bad kernel path, busy tap...).
    let deadline = t0 + Duration::from_secs(15);
    let qmp = loop {
        if let Some(status) = child.try_wait().map_err(RunError::Spawn)? {
            let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            return Err(RunError::EarlyExit {
                status: status.to_string(),
                stderr: text.trim().chars().take(2000).collect(),
            });
        }
        if paths.qmp().exists() {
            match Qmp::connect(&paths.qmp()).await {
                Ok(q) => break q,
                Err(QmpError::Connect { .. }) => {}
                // QEMU opens QMP before it checks everything; if it is gone, say why.
                Err(e) => {
                    return Err(early_exit(&mut child, &stderr_path)
                        .await
                        .unwrap_or(e.into()))
                }
            }
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(RunError::NoQmp(Duration::from_secs(15)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::spawn(copy_console(paths.console_sock(), paths.console_log()));
    let mut qmp = qmp;
    let status = match qmp.status().await {
        Ok(s) => s,
        Err(e) => {
            return Err(early_exit(&mut child, &stderr_path)
                .await
                .unwrap_or(e.into()))
        }
    };
    let mut launched = Launched {
        pid,
        proc: Proc::Child(child),
        qmp,
        startup: Duration::ZERO,
    };
    if status != "running" {
        warn!(%status, "QEMU is not running after start");
    }
    launched.startup = t0.elapsed();
    Ok(launched)
}

/// If QEMU exited (or does within a moment), the error that says why, from its stderr.
async fn early_exit(child: &mut tokio::process::Child, stderr: &Path) -> Option<RunError> {
    let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .ok()?
        .ok()?;
    let text = std::fs::read_to_string(stderr).unwrap_or_default();
    Some(RunError::EarlyExit {
        status: status.to_string(),
        stderr: text.trim().chars().take(2000).collect(),
    })
}

/// Copies the serial console into a size-capped log until QEMU closes it.
pub async fn copy_console(sock: PathBuf, log: PathBuf) {
    let mut stream = None;
    for _ in 0..200 {
        if let Ok(s) = UnixStream::connect(&sock).await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(mut stream) = stream else {
        warn!(sock = %sock.display(), "no console socket");
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Err(e) = append_capped(&log, &buf[..n], CONSOLE_CAP) {
            debug!(error = %e, "console log write failed");
        }
    }
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
    l.proc.kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), l.proc.exited()).await;
    StopHow::Killed
}

#[cfg(test)]
mod tests {
    use super::*;

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
