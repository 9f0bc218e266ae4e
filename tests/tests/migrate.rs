//! Live migration end to end, through `zy`, the coordinator's durable operation, both
//! agents and real QEMU (TCG here): a running guest that counts in memory, writes its disk
//! and is pinged by a peer moves to another node and keeps all three; a migration whose
//! destination agent is killed mid-copy leaves the guest running where it was and, once that
//! agent is back, nothing on the destination; bad requests are refused and change nothing.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zy_api::{OpView, VmView};
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

fn node_no(v: &VmView) -> usize {
    v.node.as_deref().unwrap()[1..].parse().unwrap()
}

fn console(site: &Site, node: usize, v: &VmView) -> String {
    let log = site
        .agent_dir(node)
        .join("vms")
        .join(v.id.to_string())
        .join("console.log");
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The numbers `ZY-COUNT <n>` printed, in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("ZY-COUNT "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The last `ZY-PINGS <ip> sent=<n> lost=<m>` totals.
fn pings(log: &str) -> Option<(u64, u64)> {
    log.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("ZY-PINGS ")?;
        let mut sent = None;
        let mut lost = None;
        for w in rest.split_whitespace() {
            if let Some(v) = w.strip_prefix("sent=") {
                sent = v.parse().ok();
            }
            if let Some(v) = w.strip_prefix("lost=") {
                lost = v.parse().ok();
            }
        }
        Some((sent?, lost?))
    })
}

/// QEMU processes whose command line names this VM's id.
fn qemus_of(v: &VmView) -> usize {
    let id = v.id.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            std::fs::read(e.path().join("cmdline")).ok()
        })
        .filter(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.first()
                .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"))
                && args
                    .iter()
                    .any(|a| String::from_utf8_lossy(a).contains(&id))
        })
        .count()
}

/// The MD5 of the first 32 MiB of a qcow2 disk, as its guest sees them.
fn disk_md5(qcow2: &std::path::Path) -> String {
    let raw = qcow2.with_extension("check.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["dd", "-f", "qcow2", "-O", "raw", "bs=65536", "count=512"])
        .arg(format!("if={}", qcow2.display()))
        .arg(format!("of={}", raw.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("md5sum")
        .arg(&raw)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&raw);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_running_guest_moves_with_its_memory_disk_and_network_and_a_killed_destination_changes_nothing()
{
    // A modest bandwidth cap, so that the copy lasts long enough (seconds) to be cut short.
    let site = Site::with_agents_configured(&["intranet", "intranet", "extranet"], |c| {
        c.migration.max_bandwidth_mib_s = 32;
    })
    .unwrap();
    let cfg = site.cli_config().to_string_lossy().into_owned();
    site.lab
        .spawn_env(
            &site.lab.coord_ns(),
            "events",
            &zy_lab::bin("zy"),
            &["events", "--json"],
            &[("ZY_CONFIG", cfg.as_str())],
        )
        .unwrap();
    // The mover counts, writes its disk for 60 s then checks it; the peer pings it.
    site.import_guest(
        "mover",
        "console=ttyS0 quiet no_timer_check zy.counter=1 zy.diskwrite=vda zy.diskwrite_for=60",
    )
    .unwrap();
    site.import_guest(
        "pinger",
        "console=ttyS0 quiet no_timer_check zy.pingloop=10.220.0.2",
    )
    .unwrap();
    let ok = |args: &[&str]| {
        let out = site.zy(args);
        assert!(
            out.status.success(),
            "zy {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[
        "vm", "create", "--name", "m1", "--zone", "intranet", "--memory", "256", "--disk", "1",
        "--image", "mover",
    ]); // 10.220.0.2
    ok(&[
        "vm", "create", "--name", "p1", "--zone", "intranet", "--memory", "192", "--image",
        "pinger",
    ]);
    let m1 = wait_vm(&site, "m1", "running");
    let p1 = wait_vm(&site, "p1", "running");
    assert_eq!(m1.ip.to_string(), "10.220.0.2");
    let from = node_no(&m1);
    let to = 3 - from; // the other intranet node
    wait_for("the mover to count and the peer to reach it", BOOT, || {
        let log = console(&site, from, &m1);
        let peer = console(&site, node_no(&p1), &p1);
        (counts(&log).len() >= 3 && pings(&peer).is_some_and(|(s, l)| s > l)).then_some(())
    })
    .unwrap();

    // Bad requests: refused with a reason, nothing recorded.
    let refused = |args: &[&str], why: &str| {
        let out = site.zy(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(why),
            "zy {args:?}: {err}"
        );
    };
    refused(&["vm", "migrate", "m1", "--to", "n3"], "zone");
    refused(&["vm", "migrate", "m1", "--to", "nowhere"], "no node");
    refused(
        &["vm", "migrate", "m1", "--to", &format!("n{from}")],
        "already",
    );
    refused(&["vm", "migrate", "nosuchvm"], "no VM");
    assert_eq!(vm(&site, "m1").migrating_to, None);

    // The move, followed by zy to its end.
    let before = counts(&console(&site, from, &m1)).last().copied().unwrap();
    let (peer_sent0, peer_lost0) = pings(&console(&site, node_no(&p1), &p1)).unwrap();
    let t0 = Instant::now();
    let out = ok(&["vm", "migrate", "m1", "--to", &format!("n{to}")]);
    let took = t0.elapsed();
    assert!(out.contains("migrate of VM m1 succeeded"), "{out}");
    assert!(out.contains("paused"), "the measured pause is shown: {out}");
    let moved = vm(&site, "m1");
    assert_eq!(moved.node.as_deref(), Some(format!("n{to}").as_str()));
    assert_eq!(moved.state, "running");
    assert_eq!(moved.migrating_to, None);
    assert_eq!(
        moved.generation, m1.generation,
        "a move is no change of intent"
    );
    // One QEMU, on the destination; nothing of it left on the source.
    assert_eq!(qemus_of(&m1), 1);
    assert!(
        !site
            .agent_dir(from)
            .join("vms")
            .join(m1.id.to_string())
            .exists(),
        "the source removed its copy"
    );
    // Memory: the counter goes on from where it was, never from 1 again; no reboot.
    wait_for("the counter on the destination", BOOT, || {
        (counts(&console(&site, to, &m1)).len() >= 3).then_some(())
    })
    .unwrap();
    let after = counts(&console(&site, to, &m1));
    assert!(
        after[0] >= before && !after.contains(&1),
        "the counter kept its memory: {before} before, {:?} after",
        &after[..after.len().min(5)]
    );
    assert!(
        !console(&site, to, &m1).contains("ZY-READY"),
        "it did not boot again"
    );
    // Network: the peer's pings go on, with few lost.
    wait_for(
        "the peer's pings to be counted after the move",
        BOOT,
        || pings(&console(&site, node_no(&p1), &p1)).filter(|(s, _)| *s >= peer_sent0 + 100),
    )
    .unwrap();
    let (sent, lost) = pings(&console(&site, node_no(&p1), &p1)).unwrap();
    let (sent, lost) = (sent - peer_sent0, lost - peer_lost0);
    eprintln!(
        "migration took {:.1} s; the peer lost {lost} of {sent} pings (5/s) meanwhile",
        took.as_secs_f64()
    );
    assert!(
        lost * 4 <= sent,
        "a quarter of the pings or more were lost: {lost} of {sent}"
    );
    // Disk: what the guest wrote before, during and after the move is what the
    // destination's disk holds.
    let sum = wait_for(
        "the guest's disk checksum",
        Duration::from_secs(180),
        || {
            console(&site, to, &m1).lines().find_map(|l| {
                let rest = l.trim().strip_prefix("ZY-DISKSUM ")?;
                Some(rest.split_whitespace().next()?.to_string())
            })
        },
    )
    .unwrap();
    ok(&["vm", "stop", "m1"]);
    let disk = site
        .agent_dir(to)
        .join("vms")
        .join(m1.id.to_string())
        .join("disk0.qcow2");
    let disk = if disk.exists() {
        disk
    } else {
        // Whatever the runner names it: the one qcow2 of the VM's directory.
        std::fs::read_dir(disk.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .expect("the VM's disk on the destination")
    };
    assert_eq!(
        disk_md5(&disk),
        sum,
        "the disk arrived as the guest wrote it"
    );
    ok(&["vm", "start", "m1"]);
    let m1 = wait_vm(&site, "m1", "running");

    // A second move back, whose destination agent is killed mid-copy: the guest keeps
    // running where it is, the operation fails with the reason, and once the agent is back
    // nothing of the VM is left on it.
    let from = node_no(&m1);
    let to = 3 - from;
    let out = ok(&[
        "vm",
        "migrate",
        "m1",
        "--to",
        &format!("n{to}"),
        "--no-wait",
        "--json",
    ]);
    let op: OpView = serde_json::from_str(&out).unwrap();
    wait_for("the copy to start", MOVE, || {
        let o: OpView = site.zy_json(&["op", "show", &op.id.to_string()]).ok()?;
        (o.current_step >= 2 || o.state != "running").then_some(())
    })
    .unwrap();
    site.lab
        .signal(&format!("agent-n{to}"), Signal::SIGKILL)
        .unwrap();
    let ended: OpView = wait_for("the migration to end", MOVE, || {
        let o: OpView = site.zy_json(&["op", "show", &op.id.to_string()]).ok()?;
        (o.state != "running").then_some(o)
    })
    .unwrap();
    assert_eq!(ended.state, "failed", "{ended:?}");
    let still = vm(&site, "m1");
    assert_eq!(still.node.as_deref(), Some(format!("n{from}").as_str()));
    assert_eq!(still.migrating_to, None);
    let v = wait_vm(&site, "m1", "running");
    let n = counts(&console(&site, from, &v)).len();
    wait_for("the guest to go on counting on the source", BOOT, || {
        (counts(&console(&site, from, &v)).len() > n + 2).then_some(())
    })
    .unwrap();
    site.start_agent(to, &[]).unwrap();
    site.wait_reporting(&format!("n{to}"), 0, Duration::from_secs(60))
        .unwrap();
    wait_for("nothing of the VM on the destination", BOOT, || {
        let dir = site.agent_dir(to).join("vms").join(v.id.to_string());
        (!dir.exists() && qemus_of(&v) == 1).then_some(())
    })
    .unwrap();

    // Deleting leaves nothing anywhere.
    ok(&["vm", "delete", "m1"]);
    ok(&["vm", "delete", "p1"]);
    wait_for("both VMs gone", BOOT, || {
        site.zy_json::<Vec<VmView>>(&["vm", "ls"])
            .ok()?
            .is_empty()
            .then_some(())
    })
    .unwrap();
    assert_eq!(qemus_of(&v), 0);
}
