//! What the systemd path costs: VMs started as transient units over D-Bus against VMs the
//! agent forks itself, on one lab site at the same time, so that both meet the same machine.
//!
//! n1 is a systemd node (the host's OS booted in a systemd-nspawn container in n1's
//! namespace, the agent as `zy-agent.service`, `supervisor = "systemd"`), in the intranet
//! zone; n2 is a plain node (the agent in n2's namespace, supervising QEMU itself), in the
//! extranet zone. VMs are created alternately in the two zones, one at a time, each
//! deleted once running. Figures come from log timestamps: the coordinator's `VM placed` and
//! `VM state reported … running`, and each agent's `VM state … starting` / `running`.
//! Run with `scripts/bench.sh` (as root); `ZY_BENCH_SD_VMS` sets the number per node.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use zy_common::time::now_millis;
use zy_lab::bench::{
    dist, docs_wanted, env_overrides, env_u64, fmt_ms, log_time, quantile, span, DocSection,
    Machine, Results, SectionHead,
};
use zy_lab::nspawn::{agent_node, SystemdNode};
use zy_lab::site::Site;
use zy_lab::{bin_dir, wait_for};

const DOCS: DocSection<'static> = DocSection {
    name: "systemd",
    after: Some("vms"),
    preamble: "Measured figures of Zhengyun. The sections between the `bench:` markers are written by the benchmarks (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_SD_VMS",
};

/// Per VM: the coordinator's and the agent's timestamps (µs since the epoch).
#[derive(Debug, Default, Clone)]
struct Times {
    placed: Option<u64>,
    running_coord: Option<u64>,
    starting: Option<u64>,
    running_agent: Option<u64>,
}

/// The timestamp of the first JSON log line (the systemd agent logs JSON to its journal)
/// that contains every needle.
fn json_log_time(log: &str, needles: &[&str]) -> Option<u64> {
    let line = log
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let ts = v["timestamp"].as_str()?;
    zy_lab::bench::log_ts_us(&format!("{ts} x"))
}

fn create_and_wait(site: &Site, name: &str, zone: &str) -> Result<()> {
    let out = site.zy(&[
        "vm", "create", "--name", name, "--zone", zone, "--memory", "128", "--image", "guest",
    ]);
    if !out.status.success() {
        bail!("create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for(&format!("{name} running"), Duration::from_secs(60), || {
        let v: zy_api::VmView = site.zy_json(&["vm", "show", name]).ok()?;
        (v.state == "running").then_some(())
    })
}

fn delete(site: &Site, name: &str) -> Result<()> {
    let out = site.zy(&["vm", "delete", name]);
    if !out.status.success() {
        bail!("delete {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn run(n: usize, res: &mut Results) -> Result<()> {
    let site = Site::new(2)?;
    site.join(1, "intranet")?;
    site.join(2, "extranet")?;
    let node: SystemdNode = agent_node(&site, 1)?;
    site.start_agent(2, &[])?;
    for i in 1..=2 {
        site.wait_reporting(&format!("n{i}"), 0, Duration::from_secs(60))
            .with_context(|| node.journal("zy-agent.service"))?;
    }
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check")?;
    // Warm-up (not counted): the image into both caches, the units' slice made.
    for (name, zone) in [("warm-sd", "intranet"), ("warm-dir", "extranet")] {
        create_and_wait(&site, name, zone)?;
        delete(&site, name)?;
    }
    let mut names = Vec::new();
    for i in 0..n {
        for (prefix, zone) in [("sd", "intranet"), ("dir", "extranet")] {
            let name = format!("{prefix}{i}");
            create_and_wait(&site, &name, zone)?;
            delete(&site, &name)?;
            names.push((prefix, name));
            // Each start meets an idle site.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let coord = site.lab.log("coordinator");
    let direct_log = site.lab.log("agent-n2");
    let journal = node.journal("zy-agent.service");
    let by = |prefix: &str| -> Vec<Times> {
        names
            .iter()
            .filter(|(p, _)| *p == prefix)
            .map(|(_, name)| {
                let vm = format!("name={name} ");
                let t = Times {
                    placed: log_time(&coord, &["VM placed", &vm]),
                    running_coord: log_time(&coord, &["VM state reported", &vm, "state=running"]),
                    ..Times::default()
                };
                if prefix == "sd" {
                    let n = format!("\"name\":\"{name}\"");
                    Times {
                        starting: json_log_time(&journal, &[&n, "\"state\":\"starting\""]),
                        running_agent: json_log_time(&journal, &[&n, "\"state\":\"running\""]),
                        ..t
                    }
                } else {
                    Times {
                        starting: log_time(&direct_log, &["VM state", &vm, "state=starting"]),
                        running_agent: log_time(&direct_log, &["VM state", &vm, "state=running"]),
                        ..t
                    }
                }
            })
            .collect()
    };
    let (sd, direct) = (by("sd"), by("dir"));
    let spans = |v: &[Times], f: &dyn Fn(&Times) -> Option<f64>| -> Vec<f64> {
        v.iter().filter_map(f).collect()
    };
    let start = |t: &Times| span(t.starting, t.running_agent);
    let whole = |t: &Times| span(t.placed, t.running_coord);
    let (sd_start, dir_start) = (spans(&sd, &start), spans(&direct, &start));
    let (sd_whole, dir_whole) = (spans(&sd, &whole), spans(&direct, &whole));
    res.row(
        "systemd node: agent's `starting` → `running` (unit started over D-Bus, QEMU up, QMP `running`, tap plugged)",
        dist(&sd_start),
        "—",
    );
    res.row(
        "direct node: agent's `starting` → `running` (QEMU forked by the agent, the rest the same)",
        dist(&dir_start),
        "—",
    );
    res.row(
        "**Cost of the systemd path**: p50 of the first minus p50 of the second",
        if sd_start.is_empty() || dir_start.is_empty() {
            "n/a".to_string()
        } else {
            fmt_ms(quantile(&sd_start, 0.5) - quantile(&dir_start, 0.5))
        },
        "within the 100 ms of own overhead",
    );
    res.row(
        "systemd node: VM placed → `running` recorded by the coordinator",
        dist(&sd_whole),
        "—",
    );
    res.row(
        "direct node: VM placed → `running` recorded by the coordinator",
        dist(&dir_whole),
        "—",
    );
    if sd_start.len() < n || dir_start.len() < n {
        res.note(format!(
            "some log lines were not found: {} of {n} systemd and {} of {n} direct VMs measured",
            sd_start.len(),
            dir_start.len()
        ));
    }
    drop(node);
    Ok(())
}

fn main() {
    let n = env_u64("ZY_BENCH_SD_VMS").unwrap_or(10) as usize;
    let overrides = env_overrides(|k| k.starts_with("ZY_BENCH_SD"));
    let m = Machine::read();
    let started = now_millis();
    let t0 = Instant::now();
    println!("systemd bench on {}", m.describe());
    println!("binaries from {}", bin_dir().display());
    let mut res = Results::new(100, 52);
    if let Err(e) = run(n, &mut res) {
        eprintln!("[systemd] failed: {e:#}");
        res.row("systemd path", format!("failed: {e:#}"), "—");
    }
    let head = SectionHead {
        title: "VM start under systemd",
        bench: "systemd",
        machine: &m,
        more_machine: vec![(
            "systemd",
            systemd_version().unwrap_or_else(|e| format!("unknown ({e})")),
        )],
        started_ms: started,
        took: t0.elapsed(),
        command: "`cargo bench -p zy-lab --bench systemd` as root, after `cargo build --profile dist --bins` (the binaries as deployed: see docs/operations.md) (both run by `scripts/bench.sh`)",
        overrides: &overrides,
        settings: format!(
            "{n} VMs per node, one at a time, alternating between a systemd node and a direct node of the same site; 128 MiB and 1 vCPU each, the test guest; each VM deleted once `running`, 300 ms apart."
        ),
    };
    let method = [
        "A lab site with two nodes. n1 is the host's OS booted statelessly in a `systemd-nspawn` container (`-D / --volatile=yes`) in n1's namespace; its agent is `systemd/zy-agent.service` with `supervisor = \"systemd\"`, so each QEMU is a transient unit `zy-vm-<id>.service` in `zy-vms.slice` started with `StartTransientUnit` (with its limits and sandbox), its pid taken from the unit's `MainPID`. n2's agent runs in n2's namespace and forks QEMU itself (with a cgroup v1 group for its limits on this host). Both run the same `zy-agent` binary and the same QEMU; the VMs are created alternately on the two (by zone), one at a time, and deleted once running, after a warm-up VM on each that is not counted.\n".to_string(),
        "The agent logs `VM state … starting` just before it spawns QEMU (or asks systemd to) and `running` once QMP said `running` and the tap is on its bridge; the systemd agent logs JSON to the container's journal (read with `journalctl -o cat`), the other to its log file, both with µs wall-clock timestamps of the same machine. The difference of the two p50s is what the D-Bus round trips, systemd's fork and exec of the unit and the sandbox's namespace setup add to a start.\n".to_string(),
    ];
    let text = head.text(&res, &method);
    DOCS.publish(
        &text,
        docs_wanted(std::env::var_os("ZY_BENCH_SD_VMS").is_none()),
    );
}

fn systemd_version() -> Result<String> {
    let out = std::process::Command::new("systemctl")
        .arg("--version")
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no output"))
}
