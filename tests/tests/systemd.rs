//! The systemd path for real: a node whose agent is the `zy-agent.service` of `systemd/`
//! under a real systemd (a stateless nspawn container of the host's OS in a lab node
//! namespace), running each VM's QEMU as a transient unit in `zy-vms.slice` with the VM's
//! limits. VMs outlive the agent's service being stopped, a QEMU killed under systemd is
//! reported with how its unit ended, and nothing is left in systemd after stop and delete.

use std::time::Duration;

use zy_api::VmView;
use zy_lab::nspawn::{agent_node, SystemdNode, AGENT_DIR};
use zy_lab::site::Site;
use zy_lab::wait_for;

const BOOT: Duration = Duration::from_secs(120);

fn vm(site: &Site, name: &str) -> VmView {
    site.zy_json(&["vm", "show", name]).unwrap()
}

fn wait_vm(site: &Site, node: &SystemdNode, name: &str, want: &str) -> VmView {
    wait_for(&format!("{name} to be {want}"), BOOT, || {
        let v = vm(site, name);
        if v.state == "failed" && want != "failed" {
            panic!(
                "{name} failed: {:?}\nagent journal:\n{}",
                v.reason,
                node.journal("zy-agent.service")
            );
        }
        (v.state == want).then_some(v)
    })
    .unwrap()
}

#[test]
fn under_systemd_vms_are_transient_units_that_outlive_the_agent() {
    let site = Site::new(1).unwrap();
    site.join(1, "intranet").unwrap();
    let data = site.agent_dir(1);
    let node = agent_node(&site, 1).unwrap();
    site.wait_reporting("n1", 0, Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nzy-agent.service is {:?}\njournal:\n{}\ncontainer:\n{}",
                node.active_state("zy-agent.service"),
                node.journal("zy-agent.service"),
                node.console_text()
            )
        });
    assert_eq!(
        node.active_state("zy-agent.service").as_deref(),
        Some("active"),
        "Type=notify: active only once the agent said READY"
    );

    // A `$` in an image's command line reaches the guest as it is (systemd would expand it).
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check zy.note=$HOME")
        .unwrap();
    site.zy_ok(&[
        "vm", "create", "--name", "s1", "--zone", "intranet", "--vcpus", "2", "--memory", "300",
        "--image", "guest",
    ]);
    let v = wait_vm(&site, &node, "s1", "running");
    let unit = format!("zy-vm-{}.service", v.id);

    // QEMU is the unit's main process, in the VM slice, with the VM's limits.
    assert_eq!(node.active_state(&unit).as_deref(), Some("active"));
    let pid = node.main_pid(&unit).unwrap();
    assert_eq!(v.pid, Some(pid as u32), "the agent reports the unit's QEMU");
    let cgroup = node.property(&unit, "Service", "ControlGroup").unwrap();
    assert!(cgroup.contains("/zy.slice/zy-vms.slice/zy-vm-"), "{cgroup}");
    assert_eq!(
        node.property(&unit, "Service", "MemoryMax").as_deref(),
        Some(format!("t {}", (300u64 + 256) << 20).as_str())
    );
    assert_eq!(
        node.property(&unit, "Service", "CPUQuotaPerSecUSec")
            .as_deref(),
        Some("t 2000000")
    );
    // Sandboxed: only CAP_NET_ADMIN, no new privileges, the system read-only, and of the
    // agent's data directory only its own VM and the images in sight.
    let qemu_host_pid = node.host_pid(pid).expect("QEMU is in the container");
    let status = std::fs::read_to_string(format!("/proc/{qemu_host_pid}/status")).unwrap();
    let seen = |p: &str| {
        std::path::Path::new(&format!("/proc/{qemu_host_pid}/root{AGENT_DIR}/{p}")).exists()
    };
    assert!(seen(&format!("vms/{}/console.log", v.id)) && seen("images"));
    assert!(
        !seen("identity") && !seen("identity/node.key"),
        "the node's key is hidden"
    );
    let vms_seen: Vec<_> = std::fs::read_dir(format!("/proc/{qemu_host_pid}/root{AGENT_DIR}/vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(vms_seen.len(), 1, "no other VM in sight: {vms_seen:?}");
    let cmdline = std::fs::read(format!("/proc/{qemu_host_pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("zy.note=$HOME"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    assert!(
        status.contains("CapBnd:\t0000000000001000") && status.contains("NoNewPrivs:\t1"),
        "{status}"
    );
    assert_eq!(
        node.property(&unit, "Service", "ProtectSystem").as_deref(),
        Some("s \"strict\"")
    );
    let console = data.join("vms").join(v.id.to_string()).join("console.log");
    wait_for("the guest's readiness marker", BOOT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("ZY-READY s1")
            .then_some(())
    })
    .unwrap();

    // Stopping the agent's service (its whole cgroup) leaves the VM running: QEMU is not
    // in it. Started again, the agent finds the same QEMU under the same unit.
    let host_pid = node.host_pid(pid).expect("QEMU is in the container");
    node.unit_verb("StopUnit", "zy-agent.service").unwrap();
    wait_for("the agent to stop", Duration::from_secs(30), || {
        (node.active_state("zy-agent.service").as_deref() != Some("active")
            && node.active_state("zy-agent.service").as_deref() != Some("deactivating"))
        .then_some(())
    })
    .unwrap();
    assert!(zy_lab::pid_alive(host_pid), "QEMU outlived its agent");
    assert_eq!(node.active_state(&unit).as_deref(), Some("active"));
    node.unit_verb("StartUnit", "zy-agent.service").unwrap();
    wait_for(
        "the new agent to re-attach",
        Duration::from_secs(60),
        || {
            node.journal("zy-agent.service")
                .contains("re-attached to a running VM")
                .then_some(())
        },
    )
    .unwrap();
    let after = vm(&site, "s1");
    assert_eq!(after.state, "running");
    assert_eq!(after.pid, Some(pid as u32), "same QEMU, re-attached");
    assert_eq!(node.main_pid(&unit), Some(pid), "same unit");

    // Stop: the unit goes away with QEMU. Start: a new unit.
    site.zy_ok(&["vm", "stop", "s1"]);
    wait_vm(&site, &node, "s1", "stopped");
    assert!(!zy_lab::pid_alive(host_pid));
    wait_for(
        "the stopped VM's unit to be gone",
        Duration::from_secs(10),
        || node.active_state(&unit).is_none().then_some(()),
    )
    .unwrap();
    site.zy_ok(&["vm", "start", "s1"]);
    wait_vm(&site, &node, "s1", "running");
    let pid2 = node.main_pid(&unit).unwrap();
    assert_ne!(pid2, pid);

    // QEMU killed under systemd: reported failed with how its unit ended, and no failed
    // unit is left behind to block the next start.
    node.busctl(&[
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "KillUnit",
        "ssi",
        &unit,
        "main",
        "9",
    ])
    .unwrap();
    let failed = wait_vm(&site, &node, "s1", "failed");
    let reason = failed.reason.unwrap_or_default();
    assert!(
        reason.contains("killed by SIGKILL") && reason.contains("unit result signal"),
        "{reason}"
    );
    assert!(node.active_state(&unit).is_none(), "failed unit reset");
    site.zy_ok(&["vm", "start", "s1"]);
    wait_vm(&site, &node, "s1", "running");

    // Delete: no unit, no process, no files.
    let pid3 = node.main_pid(&unit).unwrap();
    let host_pid3 = node.host_pid(pid3).unwrap();
    site.zy_ok(&["vm", "delete", "s1"]);
    wait_for("the VM to be gone", BOOT, || {
        (!site.zy(&["vm", "show", "s1"]).status.success()).then_some(())
    })
    .unwrap();
    wait_for(
        "its unit and process to be gone",
        Duration::from_secs(20),
        || (node.active_state(&unit).is_none() && !zy_lab::pid_alive(host_pid3)).then_some(()),
    )
    .unwrap();
    assert!(!data.join("vms").join(v.id.to_string()).exists());
}
