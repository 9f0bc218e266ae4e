//! Certificates that rotate, for real: a node's certificate renewed over its live link under
//! a running VM (the link not dropped, the VM untouched), the coordinator's own certificate
//! renewed and served without a restart, the API reachable by any TLS client at the
//! advertised address, and a node whose certificate expired while it was away refused with
//! the words that say what to do. Certificates here last seconds
//! (`short_validity_for_tests`), so a renewal comes within a minute.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use zy_api::{CaView, NodeView, VmView};
use zy_common::tls::{self, CertInfo};
use zy_coordinator::config::{CoordinatorConfig, CONFIG_FILE};
use zy_coordinator::store::statedir::StateDir;
use zy_lab::site::Site;
use zy_lab::{wait_for, API_PORT, COORD_IP};

const T: Duration = Duration::from_secs(30);

/// Restarts the coordinator with certificates that last `node` and `server`; with
/// `server_now`, its current server certificate is first replaced by one that lasts that
/// long (so that the test sees it renewed).
fn short_certs(site: &Site, node: Duration, server: Duration, server_now: Option<Duration>) {
    site.lab.signal("coordinator", Signal::SIGTERM);
    let path = site.state.join(CONFIG_FILE);
    let mut cfg = CoordinatorConfig::load(&path).unwrap();
    cfg.certs.short_validity_for_tests = true;
    cfg.certs.node_validity = node;
    cfg.certs.server_validity = server;
    std::fs::write(&path, cfg.to_toml()).unwrap();
    if let Some(v) = server_now {
        let sd = StateDir::new(&site.state);
        let old = sd.load_server().unwrap();
        let info = CertInfo::parse(&tls::certs_from_pem("s", &old.cert_pem).unwrap()[0]).unwrap();
        let pair = sd.load_ca().unwrap().issue_server(&info.sans, v).unwrap();
        sd.store_server(&pair).unwrap();
    }
    site.start_coordinator().unwrap();
}

/// The certificate on a node's disk.
fn disk_cert(site: &Site, i: usize) -> CertInfo {
    let pem = std::fs::read_to_string(site.agent_dir(i).join("identity/node.crt")).unwrap();
    CertInfo::parse(&tls::certs_from_pem("node", &pem).unwrap()[0]).unwrap()
}

fn server_cert(site: &Site) -> CertInfo {
    let pem = std::fs::read_to_string(site.state.join("server.crt")).unwrap();
    CertInfo::parse(&tls::certs_from_pem("server", &pem).unwrap()[0]).unwrap()
}

fn node(site: &Site, name: &str) -> NodeView {
    site.nodes()
        .unwrap()
        .into_iter()
        .find(|n| n.name == name)
        .unwrap()
}

/// `curl --cacert ca.crt https://<advertised address>/v1/health` from a node.
fn curl_health(site: &Site) -> std::process::Output {
    let ca = site.state.join("ca.crt");
    site.lab.exec(
        &site.lab.node_ns(1),
        Path::new("curl"),
        &[
            "--silent",
            "--show-error",
            "--fail",
            "--cacert",
            &ca.to_string_lossy(),
            &format!("https://{COORD_IP}:{API_PORT}/v1/health"),
        ],
        &[],
    )
}

#[test]
fn a_certificate_renewed_under_a_running_vm_drops_no_link() {
    let site = Site::new(1).unwrap();

    // As init made it: at most 397 days, the advertised address an IP SAN, and any TLS
    // client that trusts the site CA reaches the API there.
    let ca: CaView = site.zy_json(&["ca", "show"]).unwrap();
    let first = server_cert(&site);
    assert!(first.validity_ms() <= tls::SERVER_VALIDITY_MAX.as_millis() as u64);
    assert!(first.validity_ms() < 825 * 86_400_000);
    assert!(
        ca.server.sans.iter().any(|s| *s == COORD_IP.to_string()),
        "{:?}",
        ca.server.sans
    );
    assert_eq!(ca.server.serial, first.serial);
    assert!(ca.server.days_left >= 396, "{}", ca.server.days_left);
    assert!(ca.ca.days_left > 3000, "{}", ca.ca.days_left);
    let out = curl_health(&site);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\""));

    // Node certificates of 40 s, a server certificate of 30 s now (renewed within 20 s).
    let s = Duration::from_secs;
    short_certs(&site, s(40), s(60), Some(s(30)));
    let short_server = server_cert(&site);
    site.join(1, "intranet").unwrap();
    site.start_agent(1, &[]).unwrap();
    site.wait_reporting("n1", 0, T).unwrap();
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check")
        .unwrap();
    site.zy_ok(&[
        "vm", "create", "--name", "w1", "--zone", "intranet", "--memory", "128", "--image", "guest",
    ]);
    let vm: VmView = wait_for("w1 to run", Duration::from_secs(120), || {
        let v: VmView = site.zy_json(&["vm", "show", "w1"]).ok()?;
        (v.state == "running").then_some(v)
    })
    .unwrap();
    let before = node(&site, "n1");
    let since = before.connected_since_ms.expect("connected");
    let enrolled = disk_cert(&site, 1);
    assert_eq!(before.cert.as_ref().unwrap().serial, enrolled.serial);
    assert_eq!(enrolled.validity_ms(), 40_000);

    // Renewed over the link: a new certificate (and key) on disk, known to the coordinator.
    let renewed = wait_for(
        "n1's certificate to be renewed",
        Duration::from_secs(60),
        || {
            let d = disk_cert(&site, 1);
            let n = node(&site, "n1");
            (d.serial != enrolled.serial && n.cert.as_ref()?.serial == d.serial).then_some((d, n))
        },
    )
    .unwrap();
    let (disk, after) = renewed;
    assert!(disk.not_after_ms > enrolled.not_after_ms);
    assert_eq!(after.cert.as_ref().unwrap().not_after_ms, disk.not_after_ms);
    // No link drop: the same connection, one connect in the agent's whole log.
    assert_eq!(after.connected_since_ms, Some(since));
    // (The agent logs the renewal just after writing it: wait for the line.)
    let log = wait_for("the agent to log its renewal", T, || {
        let log = site.lab.log("agent-n1");
        log.contains("certificate renewed; the next connection uses it")
            .then_some(log)
    })
    .unwrap();
    assert_eq!(
        log.matches("connected to the coordinator").count(),
        1,
        "{log}"
    );
    assert!(site
        .lab
        .log("coordinator")
        .contains("node certificate renewed"));
    // The VM untouched.
    let v: VmView = site.zy_json(&["vm", "show", "w1"]).unwrap();
    assert_eq!((v.state.as_str(), v.pid), ("running", vm.pid));
    let qemu = vm.pid.unwrap();
    assert!(Path::new(&format!("/proc/{qemu}")).exists());

    // The server certificate renewed meanwhile, on disk and served, without a restart: new
    // clients get it, and the node's link never noticed.
    let served = wait_for("the server certificate to be renewed", T, || {
        let s = server_cert(&site);
        let ca: CaView = site.zy_json(&["ca", "show"]).ok()?;
        (s.serial != short_server.serial && ca.server.serial == s.serial).then_some(s)
    })
    .unwrap();
    assert_eq!(served.validity_ms(), 60_000);
    assert!(served.sans.iter().any(|s| *s == COORD_IP.to_string()));
    let out = curl_health(&site);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(site
        .lab
        .log("coordinator")
        .contains("server certificate renewed"));
    assert_eq!(node(&site, "n1").connected_since_ms, Some(since));

    // A restarted agent connects with the renewed certificate (the coordinator sees the
    // serial on its disk) and finds its VM running.
    site.lab.signal("agent-n1", Signal::SIGTERM);
    site.start_agent(1, &[]).unwrap();
    let back = wait_for("n1 to reconnect with its renewed certificate", T, || {
        let n = node(&site, "n1");
        let d = disk_cert(&site, 1);
        (n.connected_since_ms.is_some_and(|s| s > since)
            && n.cert.as_ref()?.serial == d.serial
            && d.serial != enrolled.serial)
            .then_some(n)
    })
    .unwrap();
    assert_eq!(back.state, "ready");
    let v: VmView = site.zy_json(&["vm", "show", "w1"]).unwrap();
    assert_eq!((v.state.as_str(), v.pid), ("running", vm.pid));
    site.zy_ok(&["vm", "delete", "w1"]);
}

#[test]
fn a_node_whose_certificate_expired_while_away_is_told_to_re_enroll() {
    let site = Site::new(1).unwrap();
    short_certs(
        &site,
        Duration::from_secs(12),
        Duration::from_secs(86_400),
        None,
    );
    site.join(1, "extranet").unwrap();
    site.start_agent(1, &[]).unwrap();
    site.wait_reporting("n1", 0, T).unwrap();
    site.lab.signal("agent-n1", Signal::SIGTERM);
    let cert = disk_cert(&site, 1);

    // Warned of before it ends (a sixth left), and told it ended.
    wait_for("a warning of n1's certificate", T, || {
        let log = site.lab.log("coordinator");
        (log.contains("node n1's certificate expires at") && log.contains("has not been renewed"))
            .then_some(())
    })
    .unwrap();
    wait_for("n1's certificate to be reported expired", T, || {
        let log = site.lab.log("coordinator");
        log.contains("node n1's certificate expired at")
            .then_some(())
    })
    .unwrap();
    assert!(zy_common::time::now_millis() >= cert.not_after_ms);

    // The agent does not try: it says what to do and stops for good (78: systemd leaves it).
    site.start_agent(1, &[]).unwrap();
    let st = site
        .lab
        .wait_exit("agent-n1", T)
        .expect("the agent stops by itself");
    assert_eq!(st.code(), Some(78));
    let log = site.lab.log("agent-n1");
    assert!(
        log.contains("expired at")
            && log.contains("Re-enroll it")
            && log.contains("zy node remove n1"),
        "{log}"
    );
}
