//! Lab tests of the spine: enrollment, membership, restarts, refusals and garbage, with the
//! real binaries in network namespaces. Run as root.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zy_api::{NodeView, TokenView};
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
    let zones: Vec<_> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.zone.as_str()))
        .collect();
    assert_eq!(
        zones,
        vec![("n1", "intranet"), ("n2", "intranet"), ("n3", "extranet")]
    );
    // The table view shows the same, and load keeps flowing.
    let table = String::from_utf8(site.zy(&["node", "ls"]).stdout).unwrap();
    assert!(
        table.contains("NAME") && table.contains("n3") && table.contains("extranet"),
        "{table}"
    );
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
        site.nodes()
            .ok()?
            .into_iter()
            .find(|n| n.state == "suspect")
            .map(|_| killed.elapsed())
    })
    .unwrap();
    let down = wait_for("n1 down", T, || {
        site.nodes()
            .ok()?
            .into_iter()
            .find(|n| n.state == "down")
            .map(|_| killed.elapsed())
    })
    .unwrap();
    // Correctness of the thresholds, with generous slack for a busy machine; the figures
    // themselves come from the benchmark.
    assert!(
        suspect >= Duration::from_millis(1500),
        "suspect too early: {suspect:?}"
    );
    assert!(
        suspect < Duration::from_secs(8),
        "suspect too late: {suspect:?}"
    );
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
        before
            .iter()
            .map(|n| (n.id, &n.name, n.zone))
            .collect::<Vec<_>>(),
        after
            .iter()
            .map(|n| (n.id, &n.name, n.zone))
            .collect::<Vec<_>>()
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
    assert!(
        stderr(&out).contains("already enrolled"),
        "{}",
        stderr(&out)
    );
}

/// The parts of a bootstrap token: zyj1-<id>-<secret>-<fingerprint>.
fn token_parts(t: &str) -> Vec<String> {
    t.split('-').map(str::to_string).collect()
}

#[test]
fn tokens_enroll_one_node_of_their_zone_and_nothing_else() {
    let site = Site::new(2).unwrap();
    let t = site.token("intranet").unwrap();
    let ok = site.join_with(1, &t);
    assert!(ok.status.success(), "{}", stderr(&ok));

    let refused = |out: std::process::Output, want: &str| {
        assert!(!out.status.success(), "join should fail with `{want}`");
        let e = stderr(&out);
        assert!(e.contains(want), "expected `{want}` in: {e}");
    };
    // Reused.
    refused(site.join_with(2, &t), "already used");
    // Revoked.
    let t2 = site.token("extranet").unwrap();
    let id = &token_parts(&t2)[1];
    let rev = site.zy(&["token", "revoke", id]);
    assert!(rev.status.success(), "{}", stderr(&rev));
    refused(site.join_with(2, &t2), "revoked");
    // Forged: a real id with a made-up secret, and an id never issued.
    let t3 = site.token("extranet").unwrap();
    let mut p = token_parts(&t3);
    p[2] = "0".repeat(32);
    refused(site.join_with(2, &p.join("-")), "forged");
    let mut p = token_parts(&t3);
    p[1] = "0".repeat(16);
    refused(
        site.join_with(2, &p.join("-")),
        "not issued by this coordinator",
    );
    // Pinned to another CA: the agent refuses the coordinator before sending anything.
    let mut p = token_parts(&t3);
    p[3] = "ab".repeat(32);
    refused(
        site.join_with(2, &p.join("-")),
        "does not match the fingerprint",
    );
    // Not a token at all.
    refused(site.join_with(2, "hello"), "not a Zhengyun bootstrap token");
    // A bootstrap token is no API token.
    let out = site.zy(&["--token", &t3, "node", "ls"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // Expired: written into the store while the coordinator is stopped.
    site.lab.signal("coordinator", Signal::SIGTERM);
    let secret = zy_common::token::Secret::new_random();
    let expired = {
        let store = zy_coordinator::store::Store::open(&site.state.join("zy.redb")).unwrap();
        let id = zy_common::TokenId::new_random();
        store
            .insert_token(&zy_coordinator::store::TokenRecord {
                id,
                secret_hash: secret.hash(),
                zone: zy_common::Zone::Intranet,
                created_at_ms: 1,
                expires_at_ms: 2,
                revoked_at_ms: None,
                used: None,
                created_by: id,
            })
            .unwrap();
        let fp = token_parts(&t3)[3].clone();
        format!("zyj1-{id}-{}-{fp}", zy_common::token::hex(&secret.0))
    };
    site.start_coordinator().unwrap();
    refused(site.join_with(2, &expired), "expired");
    // The unused token still works, and the zone is the token's.
    let ok = site.join_with(2, &t3);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let zones: Vec<(String, String)> = site
        .nodes()
        .unwrap()
        .into_iter()
        .map(|n| (n.name, n.zone.to_string()))
        .collect();
    assert_eq!(
        zones,
        vec![
            ("n1".into(), "intranet".into()),
            ("n2".into(), "extranet".into())
        ]
    );
    let tokens: Vec<TokenView> = site.zy_json(&["token", "ls"]).unwrap();
    let status = |t: &str| {
        let id = &token_parts(t)[1];
        tokens.iter().find(|x| &x.id == id).unwrap().status.clone()
    };
    assert_eq!(status(&t), "used");
    assert_eq!(status(&t2), "revoked");
    assert_eq!(status(&t3), "used");
    assert_eq!(status(&expired), "expired");
}

#[test]
fn removed_nodes_and_foreign_certificates_are_refused_on_both_sides() {
    let site = Site::new(2).unwrap();
    site.join(1, "intranet").unwrap();
    site.start_agent(1, &[]).unwrap();
    site.wait_reporting("n1", 0, T).unwrap();

    let rm = site.zy(&["node", "remove", "n1"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    let st = site
        .lab
        .wait_exit("agent-n1", T)
        .expect("the removed agent exits");
    assert_eq!(st.code(), Some(78));
    assert!(
        site.lab.log("agent-n1").contains("was removed"),
        "{}",
        site.lab.log("agent-n1")
    );
    // It stays refused after a restart, and is gone from the listing.
    site.start_agent(1, &[]).unwrap();
    let st = site.lab.wait_exit("agent-n1", T).expect("refused again");
    assert_eq!(st.code(), Some(78));
    assert!(site.nodes().unwrap().is_empty());
    assert!(site.lab.log("coordinator").contains("refused a node"));
    // Its name is free again once the server re-enrolls from scratch.
    std::fs::remove_dir_all(site.agent_dir(1)).unwrap();
    site.join(1, "intranet").unwrap();

    // A certificate from another CA, for a node id nobody enrolled.
    let (foreign, _) = zy_common::tls::SiteCa::generate("elsewhere").unwrap();
    let (key, csr) = zy_common::tls::node_request("n2").unwrap();
    let id = zy_common::NodeId::new_random();
    let cert = foreign
        .issue_node(
            &csr,
            id,
            zy_common::Zone::Intranet,
            zy_common::tls::NODE_VALIDITY_DEFAULT,
        )
        .unwrap();
    let dir = site.agent_dir(2).join("identity");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: String, mode: u32| {
        zy_common::files::write_atomic(&dir.join(name), text.as_bytes(), mode).unwrap()
    };
    write("node.key", key.serialize_pem(), 0o600);
    write("node.crt", zy_common::tls::pem_cert(&cert), 0o644);
    let real_ca = std::fs::read_to_string(site.state.join("ca.crt")).unwrap();
    write("ca.crt", real_ca, 0o644);
    write(
        "node.toml",
        format!(
            "node_id = \"{id}\"\nname = \"n2\"\nzone = \"intranet\"\ncoordinator = \"{}\"\n",
            site.lab.daemon_addr()
        ),
        0o644,
    );
    site.start_agent(2, &[]).unwrap();
    wait_for("both sides to log the refusal", T, || {
        let agent = site.lab.log("agent-n2");
        let coord = site.lab.log("coordinator");
        (agent.contains("refused this node's certificate")
            && coord.contains("refused a connection during the TLS handshake"))
        .then_some(())
    })
    .unwrap();
    assert!(
        site.lab.is_running("agent-n2"),
        "it keeps retrying; ops fix it"
    );
    assert!(site.nodes().unwrap().iter().all(|n| n.id != id));
}
