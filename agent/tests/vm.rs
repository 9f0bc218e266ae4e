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

fn qemu() -> PathBuf {
    PathBuf::from("/usr/bin/qemu-system-x86_64")
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
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
    let mut l = runner::launch(&qemu(), &s, &paths).await.unwrap();
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
    let mut l = runner::launch(&qemu(), &s, &paths).await.unwrap();
    wait_console(&paths.console_log(), "ZY-READY", Duration::from_secs(120)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(l.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), l.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
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
    let err = runner::launch(std::path::Path::new("/nonexistent/qemu"), &s, &paths)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not installed"), "{err}");
    let mut bad = s.clone();
    bad.vcpus = 1000;
    assert!(runner::launch(&qemu(), &bad, &paths).await.is_err());
    assert!(!paths.dir.exists(), "nothing was made for a refused spec");
    // A kernel that is not there: QEMU exits at once, and says why.
    let mut gone = s.clone();
    gone.boot = Boot::Kernel {
        kernel: tmp.0.join("nope"),
        initrd: None,
        cmdline: String::new(),
    };
    let err = runner::launch(&qemu(), &gone, &paths).await.unwrap_err();
    assert!(err.to_string().contains("exited at start"), "{err}");
}
