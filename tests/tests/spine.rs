//! Lab tests of the spine: enrollment, membership, restarts, refusals and garbage, with the
//! real binaries in network namespaces. Run as root.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zy_coordinator::api_types::{NodeView, TokenView};
use zy_lab::site::Site;
use zy_lab::wait_for;

const T: Duration = Duration::from_secs(30);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn three_agents_enroll_and_report_live_load() {
    let site = Site::new(3).unwrap();
    site.join(1, "intranet").unwrap();
    site.join(2, "intranet").unwrap();
    site.join(3, "extranet").unwrap();
    for i in 1..=3 {
        site.start_agent(i, &[]).unwrap();
    }
    for i in 1..=3 {
        let n = site.wait_reporting(&format!("n{i}"), 1, T).unwrap();
        let inv = n.inventory.as_ref().expect("inventory");
        assert!(inv.cpus >= 1 && inv.memory_bytes > 0 && inv.disk_total_bytes > 0);
        assert_eq!(inv.accel.as_str(), "tcg", "this machine has no usable KVM");
        let load = n.load.as_ref().unwrap();
        assert!(load.mem_available_bytes > 0);
        assert!(n.connected);
    }
    let nodes: Vec<NodeView> = site.nodes().unwrap();
    let zones: Vec<_> = nodes.iter().map(|n| (n.name.as_str(), n.zone.as_str())).collect();
    assert_eq!(zones, vec![("n1", "intranet"), ("n2", "intranet"), ("n3", "extranet")]);
    // The table view shows the same, and load keeps flowing.
    let table = String::from_utf8(site.zy(&["node", "ls"]).stdout).unwrap();
    assert!(table.contains("NAME") && table.contains("n3") && table.contains("extranet"), "{table}");
    let before = nodes[0].load.as_ref().unwrap().seq;
    site.wait_reporting("n1", before + 2, T).unwrap();
    let ping = site.zy(&["node", "ping", "n2"]);
    assert!(ping.status.success(), "{}", stderr(&ping));
    wait_for("n1's first transition", T, || {
        let t = site.node("n1").ok()?.transitions.into_iter().next()?;
        (t.from == "enrolled" && t.to == "ready").then_some(())
    })
    .unwrap();
}

#[test]
fn dead_agent_goes_suspect_then_down_and_returns() {
    let site = Site::new(1).unwrap();
    site.join(1, "intranet").unwrap();
    site.start_agent(1, &[]).unwrap();
    site.wait_reporting("n1", 0, T).unwrap();
    let killed = Instant::now();
    site.lab.signal("agent-n1", Signal::SIGKILL);
    // Defaults: Suspect after 2.5 s of silence, Down after 8 s (one report a second).
    let suspect = wait_for("n1 suspect", T, || {
        site.nodes().ok()?.into_iter().find(|n| n.state == "suspect").map(|_| killed.elapsed())
    })
    .unwrap();
    let down = wait_for("n1 down", T, || {
        site.nodes().ok()?.into_iter().find(|n| n.state == "down").map(|_| killed.elapsed())
    })
    .unwrap();
    // Correctness of the thresholds, with generous slack for a busy machine; the figures
    // themselves come from the benchmark.
    assert!(suspect >= Duration::from_millis(1500), "suspect too early: {suspect:?}");
    assert!(suspect < Duration::from_secs(8), "suspect too late: {suspect:?}");
    assert!(down >= Duration::from_secs(7), "down too early: {down:?}");
    assert!(down < Duration::from_secs(20), "down too late: {down:?}");
    site.start_agent(1, &[]).unwrap();
    site.wait_state("n1", "ready", T).unwrap();
    // History is written by the next membership tick, a moment after the state changes.
    let want = vec!["ready", "suspect", "down", "ready"];
    wait_for("the history to be recorded", T, || {
        let detail = site.node("n1").ok()?;
        let path: Vec<String> = detail.transitions.iter().map(|t| t.to.clone()).collect();
        (path == want).then_some(())
    })
    .unwrap();
}

#[test]
fn coordinator_kill9_loses_nothing_and_agents_reconnect() {
    let site = Site::new(2).unwrap();
    site.join(1, "intranet").unwrap();
    site.join(2, "extranet").unwrap();
    let spare = site.token("intranet").unwrap();
    site.start_agent(1, &[]).unwrap();
    site.start_agent(2, &[]).unwrap();
    site.wait_reporting("n1", 0, T).unwrap();
    site.wait_reporting("n2", 0, T).unwrap();
    let before = site.nodes().unwrap();
    let tokens_before: Vec<TokenView> = site.zy_json(&["token", "ls"]).unwrap();

    site.lab.signal("coordinator", Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    site.start_coordinator().unwrap();

    let after = site.nodes().unwrap();
    assert_eq!(
        before.iter().map(|n| (n.id, &n.name, n.zone)).collect::<Vec<_>>(),
        after.iter().map(|n| (n.id, &n.name, n.zone)).collect::<Vec<_>>()
    );
    let tokens_after: Vec<TokenView> = site.zy_json(&["token", "ls"]).unwrap();
    assert_eq!(tokens_before, tokens_after);
    // Agents come back by themselves, on new sessions (their report counters go on).
    for (i, n) in before.iter().enumerate() {
        let seq = n.load.as_ref().unwrap().seq;
        site.wait_reporting(&format!("n{}", i + 1), seq, T).unwrap();
    }
    assert!(site.lab.is_running("agent-n1") && site.lab.is_running("agent-n2"));
    // The unused token still enrolls a node after the crash.
    let out = site.join_with(1, &spare);
    assert!(!out.status.success(), "n1's data dir is already enrolled");
    assert!(stderr(&out).contains("already enrolled"), "{}", stderr(&out));
}
