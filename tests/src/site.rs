//! A whole site in a lab run: a coordinator initialised and started in its namespace, and
//! helpers to enroll and run agents on the nodes and to drive the `zy` CLI.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use zy_api::{CreatedToken, NodeDetail, NodeView};

use crate::slowdisk::SlowDisk;
use crate::{bin, wait_for, Lab, API_PORT, COORD_IP, DAEMON_PORT};

/// A site: a lab with its coordinator.
#[derive(Debug)]
pub struct Site {
    pub lab: Lab,
    pub state: PathBuf,
}

impl Site {
    /// A lab with `n` nodes and a running coordinator.
    pub fn new(n: usize) -> Result<Site> {
        Self::configured(n, |_| {})
    }

    /// A lab with `n` nodes and a running coordinator whose config `edit` changed first.
    pub fn configured(
        n: usize,
        edit: impl FnOnce(&mut zy_coordinator::config::CoordinatorConfig),
    ) -> Result<Site> {
        let lab = Lab::new(n)?;
        let state = lab.dir.join("coordinator");
        let out = std::process::Command::new(bin("zy-coordinator"))
            .args(["init", "--state-dir"])
            .arg(&state)
            .args([
                "--site",
                "lab",
                "--daemon-listen",
                &format!("{COORD_IP}:{DAEMON_PORT}"),
                "--api-listen",
                &format!("{COORD_IP}:{API_PORT}"),
                "--advertise",
                &format!("{COORD_IP}:{API_PORT}"),
            ])
            .output()?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The lab's guests are tiny and mostly idle: ten to twenty on a 2-CPU node is what
        // the tests and benchmarks run (production keeps the default of 4).
        let cfg_path = state.join(zy_coordinator::config::CONFIG_FILE);
        let mut cfg = zy_coordinator::config::CoordinatorConfig::load(&cfg_path)?;
        cfg.cpu_overcommit = 16.0;
        edit(&mut cfg);
        std::fs::write(&cfg_path, cfg.to_toml())?;
        let site = Site { lab, state };
        site.start_coordinator()?;
        Ok(site)
    }

    /// A site whose node `i + 1` is enrolled in `zones[i]`, its agent started and reporting.
    pub fn with_agents(zones: &[&str]) -> Result<Site> {
        Self::with_agents_configured(zones, |_| {})
    }

    /// [`Site::with_agents`] with a coordinator config that `edit` changed.
    pub fn with_agents_configured(
        zones: &[&str],
        edit: impl FnOnce(&mut zy_coordinator::config::CoordinatorConfig),
    ) -> Result<Site> {
        let site = Site::configured(zones.len(), edit)?;
        for (i, zone) in zones.iter().enumerate() {
            site.join(i + 1, zone)?;
            site.start_agent(i + 1, &[])?;
        }
        for i in 1..=zones.len() {
            site.wait_reporting(&format!("n{i}"), 0, Duration::from_secs(30))?;
        }
        Ok(site)
    }

    /// A one-node site whose node keeps its whole data directory on a [`SlowDisk`] of
    /// `size_gib` whose writes by the agent are limited to `write_bps` bytes per second.
    /// Drop the site before the disk (a tuple does).
    pub fn with_slow_node(zone: &str, size_gib: u64, write_bps: u64) -> Result<(Site, SlowDisk)> {
        let site = Site::new(1)?;
        let dir = site.agent_dir(1);
        let disk = SlowDisk::new(&site.lab.run, &site.lab.dir, &dir, size_gib, write_bps)?;
        // A fresh ext4 holds lost+found; the agent wants its data directory to itself.
        std::fs::remove_dir(dir.join("lost+found"))?;
        site.join(1, zone)?;
        let pid = site.start_agent(1, &[])?;
        disk.add(pid)?;
        site.wait_reporting("n1", 0, Duration::from_secs(60))?;
        Ok((site, disk))
    }

    /// The test guest's disk image (`images/out/disk.qcow2`, from
    /// `images/make-test-guest.sh`) as an image named `name` of `zone`.
    pub fn import_disk(&self, name: &str, zone: &str) -> Result<()> {
        let disk = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out/disk.qcow2");
        if !disk.exists() {
            bail!("build the test guest first: images/make-test-guest.sh");
        }
        let out = self.zy(&[
            "image",
            "import",
            &disk.to_string_lossy(),
            "--name",
            name,
            "--zone",
            zone,
        ]);
        if !out.status.success() {
            bail!(
                "import of {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The test guest (`images/make-test-guest.sh`) as a kernel image named `name` that
    /// boots with `cmdline`.
    pub fn import_guest(&self, name: &str, cmdline: &str) -> Result<()> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out");
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.gz"));
        if !kernel.exists() || !initrd.exists() {
            bail!("build the test guest first: images/make-test-guest.sh");
        }
        let out = self.zy(&[
            "image",
            "import",
            "--kernel",
            &kernel.to_string_lossy(),
            "--initrd",
            &initrd.to_string_lossy(),
            "--cmdline",
            cmdline,
            "--name",
            name,
            // The lab's guests boot in both zones.
            "--shared",
        ]);
        if !out.status.success() {
            bail!(
                "import of {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the coordinator and waits until its API answers.
    pub fn start_coordinator(&self) -> Result<()> {
        let state = self.state.to_string_lossy().into_owned();
        self.lab.spawn(
            &self.lab.coord_ns(),
            "coordinator",
            &bin("zy-coordinator"),
            &["run", "--state-dir", &state],
        )?;
        wait_for("the coordinator's API", Duration::from_secs(20), || {
            self.zy(&["status"]).status.success().then_some(())
        })
    }

    /// The CLI config `init` wrote.
    pub fn cli_config(&self) -> PathBuf {
        self.state.join("zy.toml")
    }

    /// Runs `zy` in the coordinator's namespace with the admin config.
    pub fn zy(&self, args: &[&str]) -> Output {
        let cfg = self.cli_config().to_string_lossy().into_owned();
        self.lab.exec(
            &self.lab.coord_ns(),
            &bin("zy"),
            args,
            &[("ZY_CONFIG", cfg.as_str())],
        )
    }

    /// Runs `zy`, failing the test with its stderr if it fails.
    pub fn zy_ok(&self, args: &[&str]) -> String {
        let out = self.zy(args);
        assert!(
            out.status.success(),
            "zy {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `zy ... --json` and decodes its output.
    pub fn zy_json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.zy(&a);
        if !out.status.success() {
            bail!(
                "zy {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("zy printed bad JSON")
    }

    /// A fresh bootstrap token for a zone.
    pub fn token(&self, zone: &str) -> Result<String> {
        let t: CreatedToken = self.zy_json(&["token", "create", "--zone", zone, "--ttl", "10m"])?;
        Ok(t.token)
    }

    /// Node `i`'s agent data directory.
    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.lab.dir.join(format!("agent-n{i}"))
    }

    /// Runs `zy-agent join` on node `i` with a token.
    pub fn join_with(&self, i: usize, token: &str) -> Output {
        let dir = self.agent_dir(i).to_string_lossy().into_owned();
        let addr = self.lab.daemon_addr().to_string();
        self.lab.exec(
            &self.lab.node_ns(i),
            &bin("zy-agent"),
            &[
                "--data-dir",
                &dir,
                "join",
                &addr,
                token,
                "--name",
                &format!("n{i}"),
            ],
            &[],
        )
    }

    /// Enrolls node `i` in a zone, failing loudly if the join fails.
    pub fn join(&self, i: usize, zone: &str) -> Result<()> {
        let token = self.token(zone)?;
        let out = self.join_with(i, &token);
        if !out.status.success() {
            bail!(
                "join of n{i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts node `i`'s agent (process name `agent-n<i>`).
    pub fn start_agent(&self, i: usize, extra: &[&str]) -> Result<i32> {
        let dir = self.agent_dir(i).to_string_lossy().into_owned();
        let mut args = vec!["--data-dir", &dir, "run"];
        args.extend_from_slice(extra);
        self.lab.spawn(
            &self.lab.node_ns(i),
            &format!("agent-n{i}"),
            &bin("zy-agent"),
            &args,
        )
    }

    /// Every node, as the API lists them.
    pub fn nodes(&self) -> Result<Vec<NodeView>> {
        self.zy_json(&["node", "ls"])
    }

    /// One node in detail.
    pub fn node(&self, name: &str) -> Result<NodeDetail> {
        self.zy_json(&["node", "show", name])
    }

    /// Waits until a node is in `state` and returns how long that took.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        wait_for(&format!("{name} to be {state}"), timeout, || {
            self.nodes()
                .ok()?
                .into_iter()
                .find(|n| n.name == name && n.state == state)
                .map(|_| t0.elapsed())
        })
    }

    /// Waits until a node is Ready with a load report newer than `after_seq`.
    pub fn wait_reporting(
        &self,
        name: &str,
        after_seq: u64,
        timeout: Duration,
    ) -> Result<NodeView> {
        wait_for(&format!("{name} to report"), timeout, || {
            self.nodes().ok()?.into_iter().find(|n| {
                n.name == name
                    && n.state == "ready"
                    && n.load.as_ref().is_some_and(|l| l.seq > after_seq)
            })
        })
    }

    /// One VM as `zy vm show` gives it.
    pub fn vm(&self, name: &str) -> Result<zy_api::VmView> {
        self.zy_json(&["vm", "show", name])
    }

    /// Waits until VM `name` is in `state`; a VM that fails on the way fails the wait.
    pub fn wait_vm(&self, name: &str, state: &str, timeout: Duration) -> Result<zy_api::VmView> {
        wait_for(&format!("{name} to be {state}"), timeout, || {
            let v = self.vm(name).ok()?;
            if v.state == "failed" && state != "failed" {
                panic!("{name} failed: {:?}", v.reason);
            }
            (v.state == state).then_some(v)
        })
    }

    /// What VM `id` printed on its serial console on node `i` (empty if nothing yet).
    pub fn console_log(&self, i: usize, id: zy_common::VmId) -> String {
        let log = self
            .agent_dir(i)
            .join("vms")
            .join(id.to_string())
            .join("console.log");
        std::fs::read_to_string(log).unwrap_or_default()
    }
}
