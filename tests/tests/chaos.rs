//! A bounded chaos run with real processes: create, delete, stop and start storms while the
//! agents and the coordinator are killed with SIGKILL at random (a fixed seed, a bounded
//! number of steps). After it settles, every VM the site should have runs exactly once (or is
//! stopped, as asked), nothing the site should not have is left on any node (no QEMU, tap or
//! directory), and `qemu-img check` passes on every disk.
//!
//! `ZY_CHAOS_SEED` picks another schedule and `ZY_CHAOS_STEPS` a longer one; the run prints
//! what it covered (VMs, kills, requests whose outcome was unknown).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use zy_lab::site::Site;
use zy_lab::wait_for;

const NODES: usize = 2;
/// At most this many VMs at once: QEMU under TCG on a 2-core machine.
const MAX_VMS: usize = 6;

/// What the run needs of a VM as the API shows it.
#[derive(Debug, Deserialize)]
struct Vm {
    id: String,
    name: String,
    node: Option<String>,
    desired: String,
    state: String,
    operation: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Op {
    state: String,
}

/// What the site should hold of one VM name, as far as the run knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Running,
    Stopped,
    Gone,
}

#[derive(Debug)]
struct Fate {
    want: Want,
    /// False when a request about it may or may not have been taken (the coordinator was
    /// killed under it, or could not be reached): either outcome is then right, but it must
    /// be one of them, on one node.
    sure: bool,
}

#[derive(Debug, Default)]
struct Counts {
    creates: usize,
    deletes: usize,
    stops: usize,
    starts: usize,
    refused: usize,
    unknown: usize,
    agent_kills: usize,
    coordinator_kills: usize,
}

/// How a `zy` request ended.
enum Outcome {
    Taken,
    Refused,
    Unknown,
}

fn outcome(out: &std::process::Output) -> Outcome {
    match out.status.code() {
        Some(0) => Outcome::Taken,
        // Usage, not found, conflict (an operation under way): nothing was changed.
        Some(2) | Some(3) | Some(6) => Outcome::Refused,
        _ => Outcome::Unknown,
    }
}

/// QEMU processes on the machine: VM id -> the data directories their command lines name.
fn qemus() -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if !zy_lab::pid_alive(pid) {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.contains("qemu-system")) {
            continue;
        }
        let Some(i) = args.iter().position(|a| a == "-uuid") else {
            continue;
        };
        let id = args.get(i + 1).cloned().unwrap_or_default();
        found.entry(id).or_default().push(args.join(" "));
    }
    found
}

fn vm_dirs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn taps(site: &Site, node: usize) -> usize {
    let out = std::process::Command::new("ip")
        .args(["-n", &site.lab.node_ns(node), "-o", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("zyt")))
        .count()
}

struct Run {
    site: Site,
    rng: StdRng,
    fates: BTreeMap<String, Fate>,
    next: usize,
    agent_down: [bool; NODES],
    coordinator_down: bool,
    n: Counts,
}

impl Run {
    fn zy(&mut self, args: &[&str]) -> Outcome {
        // Not asked while it is known to be down: nothing can be taken.
        if self.coordinator_down {
            return Outcome::Refused;
        }
        let o = outcome(&self.site.zy(args));
        self.count(&o);
        o
    }

    fn count(&mut self, o: &Outcome) {
        match o {
            Outcome::Taken => {}
            Outcome::Refused => self.n.refused += 1,
            Outcome::Unknown => self.n.unknown += 1,
        }
    }

    /// Records what a request about `name` did to what the site should hold.
    fn took(&mut self, name: &str, o: Outcome, want: Want) {
        let f = self.fates.entry(name.to_string()).or_insert(Fate {
            want: Want::Gone,
            sure: true,
        });
        match o {
            Outcome::Taken => {
                f.want = want;
                // A delete that was taken settles an earlier doubt: gone either way.
                if want == Want::Gone {
                    f.sure = true;
                }
            }
            Outcome::Refused => {}
            Outcome::Unknown => f.sure = false,
        }
    }

    fn live(&self) -> Vec<String> {
        self.fates
            .iter()
            .filter(|(_, f)| f.want != Want::Gone || !f.sure)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn pick(&mut self, names: &[String]) -> Option<String> {
        (!names.is_empty()).then(|| names[self.rng.random_range(0..names.len())].clone())
    }

    fn step(&mut self) {
        let live = self.live();
        let roll = self.rng.random_range(0..100);
        // While the coordinator is down there is no API to ask: it comes back, or a node
        // is killed or brought back meanwhile.
        if self.coordinator_down && roll < 70 {
            self.site.start_coordinator().unwrap();
            self.coordinator_down = false;
            return;
        }
        match roll {
            0..=34 if live.len() < MAX_VMS => {
                let name = format!("c{}", self.next);
                self.next += 1;
                let image = if self.rng.random_bool(0.5) {
                    "disk"
                } else {
                    "guest"
                };
                let args = [
                    "vm",
                    "create",
                    "--name",
                    &name,
                    "--zone",
                    "intranet",
                    "--memory",
                    "128",
                    "--disk",
                    "1",
                    "--image",
                    image,
                    "--no-wait",
                ];
                // Now and then the coordinator dies under the request itself.
                let o = if self.rng.random_bool(0.15) {
                    let delay = Duration::from_millis(self.rng.random_range(0..60));
                    let site = &self.site;
                    let o = std::thread::scope(|s| {
                        s.spawn(move || {
                            std::thread::sleep(delay);
                            site.lab.signal("coordinator", Signal::SIGKILL);
                        });
                        outcome(&site.zy(&args))
                    });
                    self.count(&o);
                    self.coordinator_down = true;
                    self.n.coordinator_kills += 1;
                    o
                } else {
                    self.zy(&args)
                };
                self.n.creates += 1;
                self.took(&name, o, Want::Running);
            }
            35..=46 => {
                if let Some(name) = self.pick(&live) {
                    let o = self.zy(&["vm", "delete", &name, "--no-wait"]);
                    self.n.deletes += 1;
                    self.took(&name, o, Want::Gone);
                }
            }
            47..=59 => {
                if let Some(name) = self.pick(&live) {
                    let o = self.zy(&["vm", "stop", &name, "--no-wait"]);
                    self.n.stops += 1;
                    self.took(&name, o, Want::Stopped);
                }
            }
            60..=72 => {
                if let Some(name) = self.pick(&live) {
                    let o = self.zy(&["vm", "start", &name, "--no-wait"]);
                    self.n.starts += 1;
                    self.took(&name, o, Want::Running);
                }
            }
            73..=89 => {
                let i = self.rng.random_range(0..NODES);
                if self.agent_down[i] {
                    self.site.start_agent(i + 1, &[]).unwrap();
                    self.agent_down[i] = false;
                } else {
                    self.site
                        .lab
                        .signal(&format!("agent-n{}", i + 1), Signal::SIGKILL);
                    self.agent_down[i] = true;
                    self.n.agent_kills += 1;
                }
            }
            90..=99 if !self.coordinator_down => {
                self.site.lab.signal("coordinator", Signal::SIGKILL);
                self.coordinator_down = true;
                self.n.coordinator_kills += 1;
            }
            _ => {}
        }
        let pause = self.rng.random_range(0..1200);
        std::thread::sleep(Duration::from_millis(pause));
    }

    fn revive(&mut self) {
        if self.coordinator_down {
            self.site.start_coordinator().unwrap();
            self.coordinator_down = false;
        }
        for i in 0..NODES {
            if self.agent_down[i] {
                self.site.start_agent(i + 1, &[]).unwrap();
                self.agent_down[i] = false;
            }
        }
    }

    fn vms(&self) -> Vec<Vm> {
        self.site.zy_json(&["vm", "ls"]).unwrap()
    }
}

#[test]
fn chaos_loses_duplicates_and_leaves_nothing() {
    let seed: u64 = std::env::var("ZY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let steps: usize = std::env::var("ZY_CHAOS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(80);
    let site = Site::with_agents(&["intranet"; NODES]).unwrap();
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check")
        .unwrap();
    site.import_disk("disk", "intranet").unwrap();
    let mut run = Run {
        site,
        rng: StdRng::seed_from_u64(seed),
        fates: BTreeMap::new(),
        next: 1,
        agent_down: [false; NODES],
        coordinator_down: false,
        n: Counts::default(),
    };
    for _ in 0..steps {
        run.step();
    }
    run.revive();
    for i in 1..=NODES {
        run.site
            .wait_state(&format!("n{i}"), "ready", Duration::from_secs(60))
            .unwrap();
    }

    // Settled: no operation under way, every VM as it should be.
    let settled = wait_for("the site to settle", Duration::from_secs(300), || {
        let vms: Vec<Vm> = run.site.zy_json(&["vm", "ls"]).ok()?;
        vms.iter()
            .all(|v| v.operation.is_none() && v.state == v.desired)
            .then_some(vms)
    });
    let vms = match settled {
        Ok(v) => v,
        Err(e) => panic!(
            "{e}\nVMs: {:#?}\ncoordinator log:\n{}",
            run.vms(),
            run.site.lab.log("coordinator")
        ),
    };
    let ops: Vec<Op> = run.site.zy_json(&["op", "ls"]).unwrap();
    assert!(ops.iter().all(|o| o.state != "running"), "{ops:?}");

    // What the site holds is what it was asked for.
    let listed: BTreeMap<&str, &Vm> = vms.iter().map(|v| (v.name.as_str(), v)).collect();
    let mut unsure = 0;
    for (name, fate) in &run.fates {
        let held = listed.get(name.as_str());
        if !fate.sure {
            unsure += 1;
            continue;
        }
        match (fate.want, held) {
            (Want::Gone, None) => {}
            (Want::Gone, Some(v)) => panic!("{name} was deleted but is back: {v:?}"),
            (want, None) => panic!("{name} was lost (should be {want:?})"),
            (Want::Running, Some(v)) => assert_eq!(v.desired, "running", "{name}: {v:?}"),
            (Want::Stopped, Some(v)) => assert_eq!(v.desired, "stopped", "{name}: {v:?}"),
        }
    }
    for v in &vms {
        assert!(
            run.fates.contains_key(&v.name),
            "{} was never asked for",
            v.name
        );
    }

    // Each VM once, on its node; nothing else anywhere.
    let qemu = qemus();
    let dirs: Vec<BTreeSet<String>> = (1..=NODES)
        .map(|i| vm_dirs(&run.site.agent_dir(i)))
        .collect();
    let ids: BTreeSet<String> = vms.iter().map(|v| v.id.clone()).collect();
    for v in &vms {
        let node: usize = v.node.as_deref().expect("placed")[1..].parse().unwrap();
        for (i, d) in dirs.iter().enumerate() {
            assert_eq!(
                d.contains(&v.id),
                i + 1 == node,
                "{} ({}) has a directory on n{} only: {dirs:?}",
                v.name,
                v.id,
                node
            );
        }
        let procs = qemu.get(&v.id).map(Vec::len).unwrap_or(0);
        let want = usize::from(v.desired == "running");
        assert_eq!(procs, want, "{} ({}): {procs} QEMU", v.name, v.id);
        if let Some(p) = qemu.get(&v.id) {
            let own = run.site.agent_dir(node).to_string_lossy().into_owned();
            assert!(p[0].contains(&own), "{} runs on n{node}: {}", v.name, p[0]);
        }
    }
    for (id, p) in &qemu {
        // Other tests run their own sites meanwhile: only this site's QEMU count.
        let ours = (1..=NODES).any(|i| {
            let own = run.site.agent_dir(i).to_string_lossy().into_owned();
            p.iter().any(|c| c.contains(&own))
        });
        assert!(!ours || ids.contains(id), "a QEMU of no VM is left: {p:?}");
    }
    for d in &dirs {
        for id in d {
            assert!(ids.contains(id), "a directory of no VM is left: {id}");
        }
    }
    for i in 1..=NODES {
        let running = vms
            .iter()
            .filter(|v| v.node.as_deref() == Some(&format!("n{i}")) && v.desired == "running")
            .count();
        assert_eq!(taps(&run.site, i), running, "taps on n{i}");
    }

    // Every disk is sound once its VM is stopped.
    let mut checked = 0;
    for v in &vms {
        if v.desired == "running" {
            run.site.zy_ok(&["vm", "stop", &v.name]);
        }
        let node: usize = v.node.as_deref().unwrap()[1..].parse().unwrap();
        let disk = run
            .site
            .agent_dir(node)
            .join("vms")
            .join(&v.id)
            .join("disk0.qcow2");
        if disk.exists() {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-q"])
                .arg(&disk)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img check {}: {}{}",
                disk.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }

    // And when all are deleted, nothing at all is left.
    for v in &vms {
        run.site.zy_ok(&["vm", "delete", &v.name]);
    }
    for i in 1..=NODES {
        assert!(
            vm_dirs(&run.site.agent_dir(i)).is_empty(),
            "n{i} keeps VM directories"
        );
        assert_eq!(taps(&run.site, i), 0, "n{i} keeps taps");
    }
    let n = &run.n;
    println!(
        "chaos seed {seed}, {steps} steps: {} creates, {} deletes, {} stops, {} starts \
         ({} refused, {} unknown); {} agent kills, {} coordinator kills; {} VMs held at the \
         end ({} running), {} names in doubt, {checked} disks checked",
        n.creates,
        n.deletes,
        n.stops,
        n.starts,
        n.refused,
        n.unknown,
        n.agent_kills,
        n.coordinator_kills,
        vms.len(),
        vms.iter().filter(|v| v.desired == "running").count(),
        unsure,
    );
}
