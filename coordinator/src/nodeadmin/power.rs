//! The power driver: how a node is powered down (standby) and up (wake).
//!
//! A narrow trait, [`Power`], with the one real implementation, [`CommandPower`]: the
//! site's `[power]` commands (IPMI, Redfish, or in the lab a script that stops and starts
//! the node's agent), run without a shell, each argument's `{node}`, `{name}` and `{ip}`
//! replaced, under a time limit after which the command's whole process group is killed.
//! Success is the command's exit status 0; anything else is an error naming the command,
//! its status and the end of what it wrote to stderr.

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::config::PowerConfig;

/// What to do to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    Standby,
    Wake,
}

impl PowerAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            PowerAction::Standby => "standby",
            PowerAction::Wake => "wake",
        }
    }
}

/// The node a command is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerTarget {
    /// Its id.
    pub node: String,
    pub name: String,
    /// Its last known address (empty if never connected).
    pub ip: String,
}

/// Why a power command did not do it.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("cannot run the {action} command `{program}`")]
    Spawn {
        action: &'static str,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {action} command `{program}` failed ({status}){}", stderr_tail(.stderr))]
    Failed {
        action: &'static str,
        program: String,
        status: String,
        stderr: String,
    },
    #[error("the {action} command `{program}` did not finish within {}; it was killed", humantime::format_duration(*.limit))]
    TimedOut {
        action: &'static str,
        program: String,
        limit: Duration,
    },
}

fn stderr_tail(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// Powers nodes down and up.
pub trait Power: Send + Sync + std::fmt::Debug {
    fn run<'a>(
        &'a self,
        action: PowerAction,
        target: &'a PowerTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), PowerError>> + Send + 'a>>;
}

/// The `[power]` commands.
#[derive(Debug, Clone)]
pub struct CommandPower {
    config: PowerConfig,
}

/// The most of a command's stderr kept for its error.
const STDERR_KEPT: usize = 2048;

impl CommandPower {
    pub fn new(config: PowerConfig) -> Self {
        Self { config }
    }

    /// The argument vector for `action` on `target`, placeholders replaced.
    pub fn argv(&self, action: PowerAction, target: &PowerTarget) -> Vec<String> {
        let argv = match action {
            PowerAction::Standby => &self.config.standby,
            PowerAction::Wake => &self.config.wake,
        };
        argv.iter()
            .map(|a| {
                a.replace("{node}", &target.node)
                    .replace("{name}", &target.name)
                    .replace("{ip}", &target.ip)
            })
            .collect()
    }

    async fn exec(&self, action: PowerAction, target: &PowerTarget) -> Result<(), PowerError> {
        let argv = self.argv(action, target);
        let program = argv.first().cloned().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout kills whatever it started too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| PowerError::Spawn {
            action: action.as_str(),
            program: program.clone(),
            source,
        })?;
        let pid = child.id();
        let mut stderr = child.stderr.take();
        let work = async {
            let mut buf = Vec::new();
            if let Some(e) = stderr.as_mut() {
                // Read all of it (a full pipe would block the command), keep the end.
                let mut chunk = [0u8; 4096];
                while let Ok(n) = e.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > STDERR_KEPT {
                        buf.drain(..buf.len() - STDERR_KEPT);
                    }
                }
            }
            (child.wait().await, buf)
        };
        match tokio::time::timeout(self.config.timeout, work).await {
            Err(_) => {
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Err(PowerError::TimedOut {
                    action: action.as_str(),
                    program,
                    limit: self.config.timeout,
                })
            }
            Ok((Err(source), _)) => Err(PowerError::Spawn {
                action: action.as_str(),
                program,
                source,
            }),
            Ok((Ok(status), _)) if status.success() => Ok(()),
            Ok((Ok(status), buf)) => Err(PowerError::Failed {
                action: action.as_str(),
                program,
                status: status.to_string(),
                stderr: String::from_utf8_lossy(&buf).into_owned(),
            }),
        }
    }
}

impl Power for CommandPower {
    fn run<'a>(
        &'a self,
        action: PowerAction,
        target: &'a PowerTarget,
    ) -> Pin<Box<dyn Future<Output = Result<(), PowerError>> + Send + 'a>> {
        Box::pin(self.exec(action, target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> PowerTarget {
        PowerTarget {
            node: "id-1".into(),
            name: "n1".into(),
            ip: "10.0.0.1".into(),
        }
    }

    fn power(standby: &[&str], timeout: Duration) -> CommandPower {
        CommandPower::new(PowerConfig {
            standby: standby.iter().map(|s| s.to_string()).collect(),
            wake: vec!["true".into()],
            timeout,
        })
    }

    #[test]
    fn placeholders_are_replaced_in_every_argument() {
        let p = power(
            &["ipmitool", "-H", "{name}-bmc", "{node}@{ip}", "chassis"],
            Duration::from_secs(1),
        );
        assert_eq!(
            p.argv(PowerAction::Standby, &target()),
            ["ipmitool", "-H", "n1-bmc", "id-1@10.0.0.1", "chassis"]
        );
    }

    #[tokio::test]
    async fn success_failure_and_a_missing_program_are_told_apart() {
        let t = target();
        power(&["true"], Duration::from_secs(5))
            .run(PowerAction::Standby, &t)
            .await
            .unwrap();
        let e = power(
            &["sh", "-c", "echo no BMC at {name}-bmc >&2; exit 3"],
            Duration::from_secs(5),
        )
        .run(PowerAction::Standby, &t)
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("failed") && e.contains("no BMC at n1-bmc"),
            "{e}"
        );
        let e = power(&["/nonexistent/zy-power"], Duration::from_secs(5))
            .run(PowerAction::Standby, &t)
            .await
            .unwrap_err();
        assert!(matches!(e, PowerError::Spawn { .. }), "{e}");
    }

    /// A command that hangs is killed with everything it started, within its limit.
    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_limit() {
        let t0 = std::time::Instant::now();
        let e = power(&["sh", "-c", "sleep 30 & sleep 30"], Duration::from_secs(1))
            .run(PowerAction::Standby, &target())
            .await
            .unwrap_err();
        assert!(matches!(e, PowerError::TimedOut { .. }), "{e}");
        assert!(e.to_string().contains("did not finish within 1s"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }
}
