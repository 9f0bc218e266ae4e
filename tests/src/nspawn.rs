//! A node with a real systemd: the host's own OS booted statelessly in a `systemd-nspawn`
//! container (`-D / --volatile=yes`: a fresh tmpfs root, the host's `/usr` read-only), inside
//! one of the lab's node namespaces. The agent runs there as the `zy-agent.service` of
//! `systemd/`, and its VMs become transient units, exactly as on a production node.
//!
//! The container is shut down (SIGTERM to nspawn: systemd powers off) on drop; a killed
//! test's container lives in the run's node namespace, whose processes the reaper kills.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::site::Site;
use crate::wait_for;

/// Where the project's binaries appear inside the container.
pub const BIN_DIR: &str = "/opt/zy";
/// The agent's data directory inside the container (the node's lab directory, bound).
pub const AGENT_DIR: &str = "/var/lib/zhengyun/agent";

/// Node `i` of `site` (enrolled already) as a systemd node: its container booted in the
/// node's namespace with the node's data directory and an `agent.toml` asking for systemd
/// supervision, and the agent running as the `zy-agent.service` of `systemd/` (a drop-in
/// only points it at the built binary). Returns once the unit is started.
pub fn agent_node(site: &Site, i: usize) -> Result<SystemdNode> {
    let config = site.lab.dir.join(format!("agent-n{i}.toml"));
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{AGENT_DIR}\"\naccel = \"tcg\"\nsupervisor = \"systemd\"\n\
             qemu = \"/usr/bin/qemu-system-x86_64\"\n"
        ),
    )?;
    let node = SystemdNode::boot(
        &site.lab.node_ns(i),
        &format!("zy-n{i}"),
        &site.lab.dir.join(format!("n{i}-container.log")),
        &[
            Bind {
                host: site.agent_dir(i),
                inside: AGENT_DIR.into(),
                read_only: false,
            },
            Bind {
                host: config,
                inside: "/etc/zhengyun/agent.toml".into(),
                read_only: true,
            },
        ],
    )?;
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/zy-agent.service"),
    )?;
    node.write("/run/systemd/system/zy-agent.service", &unit)?;
    node.write(
        "/run/systemd/system/zy-agent.service.d/lab.conf",
        &format!("[Service]\nExecStart=\nExecStart={BIN_DIR}/zy-agent run --log-json\n"),
    )?;
    node.daemon_reload()?;
    node.unit_verb("StartUnit", "zy-agent.service")?;
    Ok(node)
}

/// A booted container.
#[derive(Debug)]
pub struct SystemdNode {
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it.
    pub pid1: i32,
    console: PathBuf,
}

/// A bind mount into the container.
#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    pub inside: String,
    pub read_only: bool,
}

impl SystemdNode {
    /// Boots a container in network namespace `ns`, with the project's binaries at
    /// [`BIN_DIR`] and `binds`; returns once its systemd answers on its bus.
    pub fn boot(ns: &str, name: &str, console: &Path, binds: &[Bind]) -> Result<Self> {
        let nspawn = which("systemd-nspawn").context(
            "systemd-nspawn is missing: install systemd-container (scripts/test.sh does)",
        )?;
        let mut cmd = Command::new(nspawn);
        cmd.args([
            "-D",
            "/",
            "--volatile=yes",
            "-b",
            "--register=no",
            "--keep-unit",
            "--console=passive",
            &format!("--network-namespace-path=/run/netns/{ns}"),
            &format!("--machine={name}"),
            &format!("--bind-ro={}:{BIN_DIR}", crate::bin_dir().display()),
            "--bind=/dev/net/tun",
            // A node owns its network: bridges, VXLAN and taps.
            "--capability=CAP_NET_ADMIN",
        ]);
        for b in binds {
            let flag = if b.read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!("{flag}={}:{}", b.host.display(), b.inside));
        }
        // Arguments after the options go to the container's systemd as its kernel command
        // line: no first-boot questions, and only the basic system (the bus), not every
        // service the host happens to have enabled. The lab owns the namespace's links, so
        // networkd stays out (and network-online.target is reached without waiting for it).
        cmd.args([
            "systemd.firstboot=off",
            "systemd.unit=basic.target",
            "systemd.mask=systemd-networkd.service",
            "systemd.mask=systemd-networkd-wait-online.service",
        ]);
        let log = std::fs::File::create(console)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let nspawn = cmd.spawn().context("cannot start systemd-nspawn")?;
        let npid = nspawn.id() as i32;
        let mut node = SystemdNode {
            nspawn,
            pid1: 0,
            console: console.to_path_buf(),
        };
        // nspawn -> (its child, the container's PID 1: systemd)
        node.pid1 = wait_for("the container's systemd", Duration::from_secs(30), || {
            children(npid)
                .into_iter()
                .find(|p| comm(*p).as_deref() == Some("systemd"))
        })?;
        wait_for(
            "the container's system bus",
            Duration::from_secs(30),
            || {
                let out = node
                    .busctl(&[
                        "get-property",
                        "org.freedesktop.systemd1",
                        "/org/freedesktop/systemd1",
                        "org.freedesktop.systemd1.Manager",
                        "SystemState",
                    ])
                    .ok()?;
                (out.contains("running") || out.contains("degraded")).then_some(())
            },
        )
        .with_context(|| node.console_text())?;
        Ok(node)
    }

    /// What the container printed (systemd's boot messages).
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// A path inside the container, as the host reaches it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.pid1,
            inside.trim_start_matches('/')
        ))
    }

    /// Runs `busctl` against the container's system bus; its output.
    pub fn busctl(&self, args: &[&str]) -> Result<String> {
        let address = format!(
            "--address=unix:path={}",
            self.path("/run/dbus/system_bus_socket").display()
        );
        let out = Command::new("busctl")
            .arg(address)
            .args(args)
            .output()
            .context("cannot run busctl")?;
        if !out.status.success() {
            bail!(
                "busctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn manager(&self, method: &str, sig: &str, args: &[&str]) -> Result<String> {
        let mut a = vec![
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            method,
        ];
        if !sig.is_empty() {
            a.push(sig);
        }
        a.extend_from_slice(args);
        self.busctl(&a)
    }

    /// Makes systemd read unit files again.
    pub fn daemon_reload(&self) -> Result<()> {
        self.manager("Reload", "", &[]).map(drop)
    }

    /// Starts, stops or restarts a unit (without waiting for the job).
    pub fn unit_verb(&self, verb: &str, unit: &str) -> Result<()> {
        self.manager(verb, "ss", &[unit, "replace"]).map(drop)
    }

    /// A property of a unit, as busctl prints it (`s "active"`, `u 42`...); `None` when
    /// systemd does not know the unit.
    pub fn property(&self, unit: &str, interface: &str, name: &str) -> Option<String> {
        let path = self.manager("GetUnit", "s", &[unit]).ok()?;
        let path = path.strip_prefix("o ")?.trim_matches('"').to_string();
        self.busctl(&[
            "get-property",
            "org.freedesktop.systemd1",
            &path,
            &format!("org.freedesktop.systemd1.{interface}"),
            name,
        ])
        .ok()
    }

    /// A unit's ActiveState (`None`: unknown to systemd).
    pub fn active_state(&self, unit: &str) -> Option<String> {
        self.property(unit, "Unit", "ActiveState")
            .map(|s| s.trim_start_matches("s ").trim_matches('"').to_string())
    }

    /// A service's main pid, as the container sees it (0: none).
    pub fn main_pid(&self, unit: &str) -> Option<i32> {
        self.property(unit, "Service", "MainPID")?
            .strip_prefix("u ")?
            .parse()
            .ok()
    }

    /// Writes a file inside the container (its parents made as needed).
    pub fn write(&self, inside: &str, contents: &str) -> Result<()> {
        let p = self.path(inside);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, contents).with_context(|| format!("cannot write {}", p.display()))
    }

    /// A unit's journal, for failure messages.
    pub fn journal(&self, unit: &str) -> String {
        Command::new("nsenter")
            .args(["-t", &self.pid1.to_string(), "-a", "journalctl"])
            .args(["--no-pager", "-o", "cat", "-u", unit])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Host pid of a process the container knows as `pid` (its pid namespace is its own).
    pub fn host_pid(&self, pid: i32) -> Option<i32> {
        descendants(self.pid1).into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("NSpid:"))
                        .and_then(|l| l.split_whitespace().last())
                        .and_then(|v| v.parse::<i32>().ok())
                })
                == Some(pid)
        })
    }
}

impl Drop for SystemdNode {
    fn drop(&mut self) {
        // SIGTERM makes nspawn ask the container's systemd to power off.
        let npid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(npid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid1),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path().join("children");
        if let Ok(text) = std::fs::read_to_string(p) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<i32>().ok()),
            );
        }
    }
    out
}

fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children(p) {
            all.push(c);
            todo.push(c);
        }
    }
    all
}
