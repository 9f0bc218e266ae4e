//! A real QEMU (TCG here) booting the test guest: start, readiness on the console, QMP,
//! graceful stop by ACPI powerdown, and a crash noticed with the console's last lines.
//! Needs qemu-system-x86_64 and images/out (scripts/test.sh provides both).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use zy_agent::vm::runner::{self, StopHow};
use zy_agent::vm::spec::{Boot, DiskSpec, VmPaths, VmSpec};
use zy_common::proto::Accel;
use zy_common::VmId;

fn guest() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("ZY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out"));
    let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.gz"));
    assert!(
        k.exists() && i.exists(),
        "the test guest is missing in {}: run images/make-test-guest.sh (scripts/test.sh does)",
        dir.display()
    );
    (k, i)
}

/// The agent as QEMU's parent (the systemd path is tested in a real systemd, in the lab).
fn direct() -> runner::Supervisor {
    runner::Supervisor::Direct(zy_agent::vm::limits::Cgroups::detect(std::path::Path::new(
        "/sys/fs/cgroup",
    )))
}

fn qemu() -> PathBuf {
    PathBuf::from("/usr/bin/qemu-system-x86_64")
}

/// The real VM runner: this QEMU, supervised directly.
fn real_runner() -> std::sync::Arc<dyn runner::VmRunner> {
    std::sync::Arc::new(runner::QemuRunner {
        qemu: qemu(),
        supervisor: direct(),
        consoles: Default::default(),
    })
}

/// A test's directory; on drop (a failing test included) every QEMU whose command line
/// points into it is killed, then the directory is removed.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spec(name: &str, disk: Option<PathBuf>) -> VmSpec {
    let (kernel, initrd) = guest();
    VmSpec {
        id: VmId::new_random(),
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
        boot: Boot::Kernel {
            kernel,
            initrd: Some(initrd),
            cmdline: format!("console=ttyS0 quiet zy.name={name}"),
        },
        disks: disk
            .into_iter()
            .map(|path| DiskSpec {
                path,
                format: "qcow2".into(),
                base: None,
            })
            .collect(),
        nics: vec![],
    }
}

async fn wait_console(log: &std::path::Path, marker: &str, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(marker)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "no `{marker}` on the console within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn boots_reports_running_and_powers_off_gracefully() {
    let tmp = TempDir(std::env::temp_dir().join(format!("zy-vm-{}", rand::random::<u64>())));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let disk = tmp.0.join("root.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = spec("vm-test-1", Some(disk));
    let paths = VmPaths::new(&tmp.0, s.id);
    let mut l = runner::launch(&qemu(), &s, &paths, &direct(), &Default::default())
        .await
        .unwrap();
    assert_eq!(l.qmp.status().await.unwrap(), "running");
    wait_console(
        &paths.console_log(),
        "ZY-READY vm-test-1",
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        runner::stop(&mut l, Duration::from_secs(30)).await,
        StopHow::Graceful
    );
    assert_eq!(
        runner::stop(&mut l, Duration::from_secs(1)).await,
        StopHow::AlreadyGone
    );
}

#[tokio::test]
async fn a_crash_is_noticed_with_the_last_console_lines() {
    let tmp = TempDir(std::env::temp_dir().join(format!("zy-vm-{}", rand::random::<u64>())));
    let s = spec("vm-test-2", None);
    let paths = VmPaths::new(&tmp.0, s.id);
    let mut l = runner::launch(&qemu(), &s, &paths, &direct(), &Default::default())
        .await
        .unwrap();
    wait_console(&paths.console_log(), "ZY-READY", Duration::from_secs(120)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(l.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), l.proc.exited())
        .await
        .unwrap()
        .unwrap();
    assert!(status.contains("SIGKILL"), "{status}");
    let tail = runner::console_tail(&paths.console_log(), 20);
    assert!(
        tail.iter().any(|l| l.contains("ZY-READY vm-test-2")),
        "{tail:?}"
    );
    // The QMP session notices too.
    assert!(l.qmp.status().await.is_err());
}

#[tokio::test]
async fn bad_specs_and_a_missing_qemu_leave_nothing_behind() {
    let tmp = TempDir(std::env::temp_dir().join(format!("zy-vm-{}", rand::random::<u64>())));
    let s = spec("vm-test-3", None);
    let paths = VmPaths::new(&tmp.0, s.id);
    let err = runner::launch(
        std::path::Path::new("/nonexistent/qemu"),
        &s,
        &paths,
        &direct(),
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not installed"), "{err}");
    let mut bad = s.clone();
    bad.vcpus = 1000;
    assert!(
        runner::launch(&qemu(), &bad, &paths, &direct(), &Default::default())
            .await
            .is_err()
    );
    assert!(!paths.dir.exists(), "nothing was made for a refused spec");
    // A kernel that is not there: QEMU exits at once, and says why.
    let mut gone = s.clone();
    gone.boot = Boot::Kernel {
        kernel: tmp.0.join("nope"),
        initrd: None,
        cmdline: String::new(),
    };
    let err = runner::launch(&qemu(), &gone, &paths, &direct(), &Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exited at start"), "{err}");
}

mod manager {
    use super::*;
    use tokio::sync::{mpsc, oneshot};
    use zy_agent::vm::actor::{Ctx, Request};
    use zy_agent::vm::manager::VmManager;
    use zy_common::vm::{Desired, Generation, VmState};

    fn ctx(dir: &std::path::Path) -> (Ctx, mpsc::Receiver<zy_agent::vm::actor::VmEvent>) {
        let (tx, rx) = mpsc::channel(64);
        std::fs::create_dir_all(dir).unwrap();
        (
            Ctx {
                data_dir: dir.to_path_buf(),
                events: tx,
                networks: None,
                runner: real_runner(),
                clock: std::sync::Arc::new(
                    zy_agent::vm::observed::ObservedClock::open(&dir.join("observed-generation"))
                        .unwrap(),
                ),
                migrations: std::sync::Arc::new(zy_agent::vm::migration::Migrations::new().0),
            },
            rx,
        )
    }

    fn intent(desired: Desired, g: u64) -> Request {
        Request::Intent {
            desired,
            generation: Generation(g),
            stop_grace_ms: 30_000,
        }
    }

    async fn wait_state(h: &zy_agent::vm::actor::VmHandle, want: &str) -> Option<i32> {
        let t0 = Instant::now();
        loop {
            let s = h.status.borrow().clone();
            if s.state.name() == want {
                return s.pid;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "VM is {} not {want}",
                s.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn vms_outlive_the_agent_and_are_reattached_or_restarted() {
        let tmp = TempDir(std::env::temp_dir().join(format!("zy-vmm-{}", rand::random::<u64>())));
        let (c, _events) = ctx(&tmp.0);
        let m = VmManager::recover(c.clone()).await;
        let s = spec("vm-keep", None);
        let id = s.id;
        let paths = VmPaths::new(&tmp.0, id);
        let h = m
            .create(s.clone(), vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        let pid = wait_state(&h, "running").await.unwrap();
        wait_console(
            &paths.console_log(),
            "ZY-READY vm-keep",
            Duration::from_secs(120),
        )
        .await;
        // Its CPU and memory are limited by a cgroup of its own (v1 here, v2 in production).
        let runner::Supervisor::Direct(cg) = direct() else {
            unreachable!("these tests supervise QEMU directly")
        };
        let dirs = cg.dirs(id);
        assert!(!dirs.is_empty(), "this host has usable cgroups");
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == pid.to_string()),
                "{} holds {procs}",
                d.display()
            );
        }
        match &cg {
            zy_agent::vm::limits::Cgroups::V1(_) => {
                let quota = std::fs::read_to_string(dirs[0].join("cpu.cfs_quota_us")).unwrap();
                assert_eq!(quota.trim(), "100000");
                let mem = std::fs::read_to_string(dirs[1].join("memory.limit_in_bytes")).unwrap();
                assert_eq!(mem.trim().parse::<u64>().unwrap(), (256 + 256) << 20);
            }
            zy_agent::vm::limits::Cgroups::V2(_) => {
                let max = std::fs::read_to_string(dirs[0].join("cpu.max")).unwrap();
                assert_eq!(max.trim(), "100000 100000");
            }
            zy_agent::vm::limits::Cgroups::None => unreachable!(),
        }
        assert!(matches!(
            m.create(s, vec![], Desired::Running, Generation(1)).await,
            Err(zy_agent::vm::manager::CreateError::Exists(_))
        ));

        // The "agent" goes away: its actors end, QEMU does not.
        drop(h);
        drop(m);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(runner::is_qemu_of(pid, id), "QEMU outlived the agent");

        // A new agent finds the same process, running and controllable.
        let m = VmManager::recover(c.clone()).await;
        let h = m.get(id).unwrap();
        assert_eq!(wait_state(&h, "running").await, Some(pid));
        h.send(intent(Desired::Stopped, 2)).unwrap();
        wait_state(&h, "stopped").await;
        // An older intent, arriving late, is a no-op.
        h.send(intent(Desired::Running, 1)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.state(), VmState::Stopped);
        assert_eq!(h.status.borrow().intent, Generation(2));
        assert!(
            cg.dirs(id).iter().all(|d| !d.exists()),
            "its cgroups went with it"
        );
        drop(h);
        drop(m);

        // Stopped stays stopped across a restart; started again, then lost while the agent
        // is away, it is started anew by the next agent.
        let m = VmManager::recover(c.clone()).await;
        let h = m.get(id).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.state(), VmState::Stopped);
        assert_eq!(
            h.status.borrow().intent,
            Generation(2),
            "the intent was recorded"
        );
        h.send(intent(Desired::Running, 3)).unwrap();
        let pid2 = wait_state(&h, "running").await.unwrap();
        drop(h);
        drop(m);
        tokio::time::sleep(Duration::from_millis(300)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid2),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = VmManager::recover(c).await;
        let h = m.get(id).unwrap();
        let pid3 = wait_state(&h, "running").await.unwrap();
        assert_ne!(pid3, pid2);

        // Delete stops it and leaves nothing behind.
        let (tx, rx) = oneshot::channel();
        h.send(Request::Delete(tx)).unwrap();
        rx.await.unwrap().unwrap();
        m.forget(id);
        assert!(!paths.dir.exists());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!runner::is_qemu_of(pid3, id));
    }

    #[tokio::test]
    async fn a_crash_and_a_guest_poweroff_are_told_apart() {
        let tmp = TempDir(std::env::temp_dir().join(format!("zy-vmm-{}", rand::random::<u64>())));
        let (c, mut events) = ctx(&tmp.0);
        let m = VmManager::recover(c).await;
        let a = m
            .create(
                spec("vm-crash", None),
                vec![],
                Desired::Running,
                Generation(1),
            )
            .await
            .unwrap();
        let mut off = spec("vm-off", None);
        if let Boot::Kernel { cmdline, .. } = &mut off.boot {
            cmdline.push_str(" zy.poweroff_after=3");
        }
        let b = m
            .create(off, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        let mut panics = spec("vm-panic", None);
        if let Boot::Kernel { cmdline, .. } = &mut panics.boot {
            cmdline.push_str(" zy.panic_after=3");
        }
        let p = m
            .create(panics, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        let pa = wait_state(&a, "running").await.unwrap();
        wait_state(&b, "running").await;
        for (h, name) in [(&a, "vm-crash"), (&b, "vm-off"), (&p, "vm-panic")] {
            wait_console(
                &VmPaths::new(&tmp.0, h.id).console_log(),
                &format!("ZY-READY {name}"),
                Duration::from_secs(120),
            )
            .await;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pa),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_state(&a, "failed").await;
        let reason = a.state().to_string();
        assert!(
            reason.contains("QEMU died") && reason.contains("ZY-READY vm-crash"),
            "{reason}"
        );
        // The other guest powers itself off (zy.poweroff_after): noticed as a stop.
        wait_state(&b, "stopped").await;
        // A guest whose kernel panics (zy.panic_after) is not left "running": pvpanic tells
        // QEMU, which exits, and the reason says what happened.
        wait_state(&p, "failed").await;
        let reason = p.state().to_string();
        assert!(
            reason.contains("the guest's kernel panicked: ") && reason.contains("sysrq"),
            "{reason}"
        );
        let console = std::fs::read_to_string(VmPaths::new(&tmp.0, p.id).console_log()).unwrap();
        assert!(console.contains("ZY-PANIC vm-panic"));
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push((e.id, e.status.state.name()));
        }
        assert!(
            seen.contains(&(a.id, "failed")) && seen.contains(&(b.id, "stopped")),
            "{seen:?}"
        );
    }
}

/// A QEMU of this node whose record is gone is found, reported and left alone.
#[tokio::test]
async fn a_qemu_without_a_record_is_reported_not_touched() {
    let tmp = TempDir(std::env::temp_dir().join(format!("zy-stray-{}", rand::random::<u64>())));
    let s = spec("vm-stray", None);
    let paths = VmPaths::new(&tmp.0, s.id);
    let mut l = runner::launch(&qemu(), &s, &paths, &direct(), &Default::default())
        .await
        .unwrap();
    // No record was ever written for it.
    let (tx, _rx) = tokio::sync::mpsc::channel(8);
    std::fs::create_dir_all(&tmp.0).unwrap();
    let ctx = zy_agent::vm::actor::Ctx {
        data_dir: tmp.0.clone(),
        events: tx,
        networks: None,
        runner: real_runner(),
        clock: std::sync::Arc::new(
            zy_agent::vm::observed::ObservedClock::open(&tmp.0.join("observed-generation"))
                .unwrap(),
        ),
        migrations: std::sync::Arc::new(zy_agent::vm::migration::Migrations::new().0),
    };
    let m = zy_agent::vm::manager::VmManager::recover(ctx).await;
    assert!(m.list().is_empty());
    assert_eq!(
        m.strays(),
        &[zy_agent::vm::manager::Stray {
            pid: l.pid,
            id: s.id
        }]
    );
    assert!(runner::pid_alive(l.pid), "left running");
    // Another data directory's QEMU is not this node's business.
    let other = std::env::temp_dir().join(format!("zy-other-{}", rand::random::<u64>()));
    assert!(zy_agent::vm::manager::find_strays(&other.join("vms"), &|_| false).is_empty());
    runner::stop(&mut l, Duration::ZERO).await;
}

/// Review finding 1: a second hand-over of the same VM (a reconnect while the first is
/// still being prepared) must never remove what the first made.
mod handover {
    use super::*;
    use zy_agent::node::Node;
    use zy_common::blob::BlobDir;
    use zy_common::image::ImageKind;
    use zy_common::proto::{CommandKind, ReplyKind, VmIntent, WireVm};
    use zy_common::vm::{Desired, Generation};

    #[tokio::test]
    async fn a_repeated_hand_over_leaves_the_vm_it_already_made() {
        let tmp = TempDir(std::env::temp_dir().join(format!("zy-vmh-{}", rand::random::<u64>())));
        std::fs::create_dir_all(&tmp.0).unwrap();
        let (kernel, initrd) = guest();
        let cache = BlobDir::open(&tmp.0.join("images")).unwrap();
        let put = |p: &std::path::Path| {
            cache
                .put(&mut std::fs::File::open(p).unwrap(), 1 << 30)
                .unwrap()
                .0
        };
        let (k, i) = (put(&kernel), put(&initrd));
        let (_published, uplink) = zy_agent::uplink::Uplink::new();
        let (node, _events) = Node::start(qemu(), &tmp.0, Accel::Tcg, direct(), uplink)
            .await
            .unwrap();
        let vm = WireVm {
            id: VmId::new_random(),
            name: "twice".into(),
            zone: zy_common::Zone::Intranet,
            vcpus: 1,
            memory_mib: 128,
            // A disk to make: the first hand-over is still preparing when the second comes.
            disk_gib: 1,
            image: ImageKind::Kernel {
                kernel: k,
                initrd: Some(i),
                cmdline: "console=ttyS0 quiet no_timer_check".into(),
            },
            nics: vec![],
            ssh_keys: vec![],
            user_data: None,
        };
        let ensure = |g: u64| {
            CommandKind::EnsureVm(Box::new(VmIntent {
                vm: vm.clone(),
                desired: Desired::Stopped,
                generation: Generation(g),
                stop_grace_ms: 1000,
            }))
        };
        // The second hand-over arrives while the first is still making the disk.
        let (a, b) = tokio::join!(node.handle(ensure(1)), node.handle(ensure(1)));
        assert!(matches!(a, Ok(ReplyKind::Vm(_))), "{a:?}");
        assert!(matches!(b, Ok(ReplyKind::Vm(_))), "{b:?}");
        let paths = VmPaths::new(&tmp.0, vm.id);
        let t0 = Instant::now();
        while node.vms.get(vm.id).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the VM was never made"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(paths.record().exists(), "the VM's record is there");
        assert!(paths.dir.join("disk0.qcow2").exists(), "and its disk");
        // A third, late one changes nothing either.
        let c = node.handle(ensure(1)).await;
        assert!(
            matches!(c, Ok(ReplyKind::Vm(ref i)) if i.intent == Generation(1)),
            "{c:?}"
        );
        assert!(paths.record().exists());
        // A delete of an older generation than the VM holds is refused, a real one removes it.
        let old = node
            .handle(CommandKind::DeleteVm {
                id: vm.id,
                generation: Generation(0),
            })
            .await;
        assert!(old.is_err(), "{old:?}");
        node.handle(CommandKind::DeleteVm {
            id: vm.id,
            generation: Generation(2),
        })
        .await
        .unwrap();
        assert!(!paths.dir.exists());
        assert!(node.vms.get(vm.id).is_none());
    }

    /// A directory the agent did not make is never removed by a failed hand-over.
    #[tokio::test]
    async fn a_failed_hand_over_leaves_a_directory_it_did_not_make() {
        let tmp = TempDir(std::env::temp_dir().join(format!("zy-vmh-{}", rand::random::<u64>())));
        std::fs::create_dir_all(&tmp.0).unwrap();
        let (_published, uplink) = zy_agent::uplink::Uplink::new();
        let (node, _events) = Node::start(qemu(), &tmp.0, Accel::Tcg, direct(), uplink)
            .await
            .unwrap();
        let id = VmId::new_random();
        let paths = VmPaths::new(&tmp.0, id);
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(paths.dir.join("precious"), b"x").unwrap();
        let vm = WireVm {
            id,
            name: "squatter".into(),
            zone: zy_common::Zone::Intranet,
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            image: ImageKind::Kernel {
                kernel: zy_common::blob::BlobHash([9; 32]),
                initrd: None,
                cmdline: String::new(),
            },
            nics: vec![],
            ssh_keys: vec![],
            user_data: None,
        };
        node.handle(CommandKind::EnsureVm(Box::new(VmIntent {
            vm,
            desired: Desired::Running,
            generation: Generation(1),
            stop_grace_ms: 1000,
        })))
        .await
        .unwrap();
        let t0 = Instant::now();
        loop {
            let r = node.report();
            if r.vms
                .iter()
                .any(|i| i.id == id && i.state.name() == "failed")
            {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(paths.dir.join("precious").exists());
    }
}
