//! Node administration end to end, through `zy`, the coordinator, real agents and real QEMU
//! (TCG here): a drain of one node of three moves its running guests off by live migration
//! and leaves it in maintenance; a consolidation of a lightly loaded four-node lab empties a
//! node and puts it on standby through a power driver (a script this test writes, which stops
//! and starts that node's agent), and a create that needs its room wakes it, then succeeds.
//!
//! Every process runs in the lab's namespaces, and the lab kills whatever runs in them when
//! it is dropped (agents the power script started included), even when a test fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zy_api::{ConsolidationView, NodeView, VmView};
use zy_lab::site::Site;
use zy_lab::wait_for;

const BOOT: Duration = Duration::from_secs(120);
const MOVE: Duration = Duration::from_secs(240);

fn vm(site: &Site, name: &str) -> VmView {
    site.zy_json(&["vm", "show", name]).unwrap()
}

fn wait_vm(site: &Site, name: &str, state: &str) -> VmView {
    wait_for(&format!("{name} to be {state}"), BOOT, || {
        let v = vm(site, name);
        if v.state == "failed" && state != "failed" {
            panic!("{name} failed: {:?}", v.reason);
        }
        (v.state == state).then_some(v)
    })
    .unwrap()
}

fn node(site: &Site, name: &str) -> NodeView {
    site.nodes()
        .unwrap()
        .into_iter()
        .find(|n| n.name == name)
        .unwrap()
}

fn create(site: &Site, name: &str, memory: u64, extra: &[&str]) {
    let mem = memory.to_string();
    let mut args = vec![
        "vm", "create", "--name", name, "--zone", "intranet", "--memory", &mem, "--image", "guest",
    ];
    args.extend_from_slice(extra);
    site.zy_ok(&args);
}

#[test]
fn a_drain_moves_every_running_guest_off_and_ends_in_maintenance() {
    let site = Site::with_agents(&["intranet", "intranet", "intranet"]).unwrap();
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check zy.counter=1")
        .unwrap();
    create(&site, "d1", 128, &[]);
    create(&site, "d2", 128, &[]);
    let vms = [
        wait_vm(&site, "d1", "running"),
        wait_vm(&site, "d2", "running"),
    ];
    // The node holding the most of them is drained.
    let drained = {
        let mut on: Vec<String> = vms.iter().map(|v| v.node.clone().unwrap()).collect();
        on.sort();
        let first = on[0].clone();
        if on.iter().filter(|n| **n == first).count() * 2 >= on.len() {
            first
        } else {
            on[on.len() - 1].clone()
        }
    };
    let out = site.zy_ok(&["node", "drain", &drained, "--no-wait"]);
    assert!(
        out.contains("draining") || out.contains("maintenance"),
        "{out}"
    );
    // It takes nothing from now on.
    assert!(["draining", "maintenance"].contains(&node(&site, &drained).admin.as_str()));
    wait_for(&format!("{drained} to be in maintenance"), MOVE, || {
        (node(&site, &drained).admin == "maintenance").then_some(())
    })
    .unwrap();
    // Following a drain that is over returns at once.
    let out = site.zy_ok(&["node", "drain", &drained]);
    assert!(out.contains("in maintenance"), "{out}");
    for name in ["d1", "d2"] {
        let v = vm(&site, name);
        assert_eq!(v.state, "running", "{name} keeps running");
        assert_ne!(
            v.node.as_deref(),
            Some(drained.as_str()),
            "{name} moved off"
        );
        assert_eq!(v.migrating_to, None);
    }
    let moved: Vec<zy_api::OpView> = site.zy_json(&["op", "ls"]).unwrap();
    let drains = moved
        .iter()
        .filter(|o| {
            o.migration
                .as_ref()
                .is_some_and(|m| m.cause == "drain" && m.from == drained)
                && o.state == "succeeded"
        })
        .count();
    assert!(drains >= 1, "the guests moved by drain migrations");
    let table = site.zy_ok(&["node", "ls"]);
    assert!(table.contains("maintenance"), "{table}");
    let d = site.node(&drained).unwrap();
    let changes: Vec<String> = d
        .admin_transitions
        .iter()
        .map(|t| format!("{}>{}", t.from, t.to))
        .collect();
    assert_eq!(changes, ["active>draining", "draining>maintenance"]);
    // Back in service.
    let out = site.zy_ok(&["node", "undrain", &drained]);
    assert!(out.contains("active"), "{out}");
}

/// The lab's power driver: `standby NODE` stops that node's agent (its pid in `NODE.pid`),
/// `wake NODE` starts it again (with `NODE.start`), as a BMC would power the server.
const POWER_SCRIPT: &str = r#"#!/bin/sh
d="$(dirname "$0")"
case "$1" in
standby)
  pid=$(cat "$d/$2.pid") || exit 1
  kill -TERM "$pid" || exit 1
  for _ in $(seq 1 150); do
    if [ ! -d "/proc/$pid" ] || grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
      exit 0
    fi
    sleep 0.2
  done
  echo "the agent of $2 ($pid) did not stop" >&2
  exit 1;;
wake)
  setsid sh "$d/$2.start" </dev/null >>"$d/$2.log" 2>&1 &
  echo $! > "$d/$2.pid"
  exit 0;;
esac
echo "usage: power.sh standby|wake NODE" >&2
exit 2
"#;

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn power_dir() -> TempDir {
    let d = std::env::temp_dir().join(format!("zy-power-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("power.sh"), POWER_SCRIPT).unwrap();
    TempDir(d)
}

fn write_agent_files(site: &Site, dir: &Path, nodes: usize) {
    for i in 1..=nodes {
        let pid = site.lab.pid(&format!("agent-n{i}")).unwrap();
        std::fs::write(dir.join(format!("n{i}.pid")), pid.to_string()).unwrap();
        let start = format!(
            "exec ip netns exec {} {} --data-dir {} run\n",
            site.lab.node_ns(i),
            zy_lab::bin("zy-agent").display(),
            site.agent_dir(i).display()
        );
        std::fs::write(dir.join(format!("n{i}.start")), start).unwrap();
    }
}

#[test]
fn consolidation_puts_an_emptied_node_on_standby_and_a_create_that_needs_it_wakes_it() {
    let power = power_dir();
    let script = power.0.join("power.sh").to_string_lossy().into_owned();
    let site = Site::with_agents_configured(&["intranet"; 4], |c| {
        c.power = Some(zy_coordinator::config::PowerConfig {
            standby: vec![
                "sh".into(),
                script.clone(),
                "standby".into(),
                "{name}".into(),
            ],
            wake: vec!["sh".into(), script.clone(), "wake".into(), "{name}".into()],
            timeout: Duration::from_secs(30),
        });
        // Every lab node reports the one host's CPU load (its TCG guests' too), so the load
        // rules would see every node as busy as the host: a mark above 1.0 turns them off.
        c.consolidation.high_water = 10.0;
    })
    .unwrap();
    write_agent_files(&site, &power.0, 4);
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check")
        .unwrap();
    create(&site, "c1", 128, &[]);
    create(&site, "c2", 192, &[]);
    let c1 = wait_vm(&site, "c1", "running");
    let c2 = wait_vm(&site, "c2", "running");
    // Spread them, as a day of creates and deletes would have.
    let on1 = c1.node.clone().unwrap();
    if c2.node.as_deref() == Some(on1.as_str()) {
        let to = if on1 == "n1" { "n2" } else { "n1" };
        site.zy_ok(&["vm", "migrate", "c2", "--to", to]);
    }
    let c2 = vm(&site, "c2");
    assert_ne!(c2.node, vm(&site, "c1").node);

    // The plan: c1 (never moved) joins c2 (just moved, so it stays), its node and the idle
    // nodes beyond the one spare stand by.
    let plan: ConsolidationView = site.zy_json(&["plan", "consolidate"]).unwrap();
    assert!(
        plan.steps
            .iter()
            .any(|s| s.kind == "move" && s.vm.as_deref() == Some("c1")),
        "{}",
        plan.text
    );
    assert!(
        plan.steps.iter().any(|s| s.kind == "standby"),
        "{}",
        plan.text
    );
    let shown = site.zy_ok(&["plan", "consolidate"]);
    assert!(shown.contains("move VM c1"), "{shown}");
    let out = site.zy_ok(&["plan", "consolidate", "--apply"]);
    assert!(out.contains("consolidation finished"), "{out}");
    let c1 = vm(&site, "c1");
    let c2 = vm(&site, "c2");
    assert_eq!(c1.state, "running");
    assert_eq!(c2.state, "running");
    assert_eq!(c1.node, c2.node, "c1 joined c2");
    let standby: Vec<NodeView> = site
        .nodes()
        .unwrap()
        .into_iter()
        .filter(|n| n.admin == "standby")
        .collect();
    assert!(!standby.is_empty(), "{out}");
    assert!(standby.iter().any(|n| Some(&n.name) == Some(&on1)) || standby.len() >= 2);
    // A standby node's silence raises nothing: past the Down grace it is still not down.
    std::thread::sleep(Duration::from_secs(10));
    for n in site
        .nodes()
        .unwrap()
        .iter()
        .filter(|n| n.admin == "standby")
    {
        assert!(!n.connected, "{} was powered down", n.name);
        assert_ne!(n.state, "down", "{} is on standby, not down", n.name);
    }
    let table = site.zy_ok(&["node", "ls"]);
    assert!(table.contains("standby"), "{table}");

    // Room for one more half-node VM is there; for a second one only on a standby node: the
    // create is refused with 503 while that node is woken, and succeeds once it is ready.
    let mem = node(&site, c1.node.as_deref().unwrap())
        .inventory
        .unwrap()
        .memory_bytes
        >> 20;
    let big = (mem * 6 / 10).to_string();
    site.zy_ok(&[
        "vm",
        "create",
        "--name",
        "big1",
        "--zone",
        "intranet",
        "--memory",
        &big,
        "--image",
        "guest",
        "--stopped",
        "--no-wait",
    ]);
    let args = [
        "vm",
        "create",
        "--name",
        "big2",
        "--zone",
        "intranet",
        "--memory",
        &big,
        "--image",
        "guest",
        "--stopped",
        "--no-wait",
    ];
    let out = site.zy(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && err.contains("being woken"),
        "{err}"
    );
    let woken = wait_for("a standby node to be woken and ready", BOOT, || {
        site.nodes().ok()?.into_iter().find(|n| {
            standby.iter().any(|s| s.name == n.name) && n.admin == "active" && n.connected
        })
    })
    .unwrap();
    let placed = wait_for("the create to succeed", BOOT, || {
        let out = site.zy(&args);
        out.status.success().then_some(())
    });
    placed.unwrap();
    let b2 = vm(&site, "big2");
    assert!(b2.node.is_some(), "big2 placed");
    let events = site.node(&woken.name).unwrap();
    assert!(
        events
            .admin_transitions
            .iter()
            .any(|t| t.from == "standby" && t.to == "active"),
        "{:?}",
        events.admin_transitions
    );
}
