//! Live migration with local disks between two real QEMU processes (TCG) on this machine,
//! 127.0.0.1 to 127.0.0.1, both streams under QEMU's TLS with certificates from a site CA
//! made here. Needs qemu-system-x86_64, qemu-img and images/out (scripts/test.sh provides
//! them). Every QEMU and file a test makes is removed on every exit path ([`TempDir`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde_json::json;
use zy_agent::vm::console::Consoles;
use zy_agent::vm::limits::Cgroups;
use zy_agent::vm::migrate::{self, Incoming, IncomingPlan, Limits, OutgoingPlan, Progress, Tls};
use zy_agent::vm::qmp::Qmp;
use zy_agent::vm::runner::{self, Launched, Supervisor};
use zy_agent::vm::spec::{BaseImage, Boot, DiskSpec, VmPaths, VmSpec};
use zy_common::proto::Accel;
use zy_common::tls::{node_request, pem_cert, SiteCa};
use zy_common::{NodeId, VmId, Zone};

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

/// Both QEMUs of a test share a VM id on one machine: no cgroup limits (they would be one
/// cgroup for two processes), and each side its own consoles.
fn sup() -> Supervisor {
    Supervisor::Direct(Cgroups::None)
}

/// A test's directory; on drop (a failing test included) every QEMU whose command line
/// points into it is killed, then the directory is removed.
struct TempDir(PathBuf);
impl TempDir {
    fn new(what: &str) -> Self {
        let d = std::env::temp_dir().join(format!("zy-mig-{what}-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}
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

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &Path, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
}

/// A site CA and one node's certificate for node-to-node TLS, written as QEMU reads them.
fn node_tls(ca: &SiteCa, node: NodeId, dir: &Path) {
    let (key, csr) = node_request("node").unwrap();
    let cert = ca
        .issue_node_peer(&csr, node, Zone::Extranet, Duration::from_secs(3600))
        .unwrap();
    migrate::write_tls_dir(
        dir,
        &pem_cert(ca.cert_der()),
        &pem_cert(&cert),
        &key.serialize_pem(),
    )
    .unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The world of one test: a CA, a source node and a destination node, a VM with two
/// disks: `vda` an overlay on a base image (mirrored `sync=top` to an overlay on the same
/// base), `vdb` a standalone data disk (`sync=full`) that the guest keeps writing.
struct World {
    tmp: TempDir,
    src_node: NodeId,
    dst_node: NodeId,
    spec: VmSpec,
    base: BaseImage,
    /// What the console shows once the guest is as the test wants it.
    marker: &'static str,
}

impl World {
    fn new(what: &str, prefill: &str) -> Self {
        Self::with_guest(what, prefill, true)
    }

    /// `busy`: the guest keeps writing its data disk; otherwise it idles.
    fn with_guest(what: &str, prefill: &str, busy: bool) -> Self {
        let tmp = TempDir::new(what);
        let (ca, _) = SiteCa::generate("test").unwrap();
        let (src_node, dst_node) = (NodeId::new_random(), NodeId::new_random());
        node_tls(&ca, src_node, &tmp.0.join("src-tls"));
        node_tls(&ca, dst_node, &tmp.0.join("dst-tls"));
        let base = tmp.0.join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "32M"]);
        qemu_io(&base, "write -P 0x11 0 8M");
        let root = tmp.0.join("src-root.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            root.to_str().unwrap(),
        ]);
        qemu_io(&root, "write -P 0x22 4M 2M");
        let data = tmp.0.join("src-data.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", data.to_str().unwrap(), "64M"]);
        qemu_io(&data, prefill);
        let (kernel, initrd) = guest();
        let base = BaseImage {
            path: base,
            format: "qcow2".into(),
        };
        let spec = VmSpec {
            id: VmId::new_random(),
            name: "mig-1".into(),
            vcpus: 1,
            memory_mib: 256,
            accel: Accel::Tcg,
            boot: Boot::Kernel {
                kernel,
                initrd: Some(initrd),
                cmdline: format!(
                    "console=ttyS0 quiet zy.name=mig-1 zy.ip=10.9.0.2/24{}",
                    if busy { " zy.diskwrite=vdb" } else { "" }
                ),
            },
            disks: vec![
                DiskSpec {
                    path: root,
                    format: "qcow2".into(),
                    base: Some(base.clone()),
                },
                DiskSpec {
                    path: data,
                    format: "qcow2".into(),
                    base: None,
                },
            ],
            nics: vec![],
        };
        Self {
            tmp,
            src_node,
            dst_node,
            spec,
            base,
            marker: if busy {
                "ZY-DISKWRITE vdb"
            } else {
                "ZY-READY mig-1"
            },
        }
    }

    fn src_paths(&self) -> VmPaths {
        VmPaths {
            dir: self.tmp.0.join("src-vm"),
        }
    }

    async fn start_source(&self) -> Launched {
        let l = runner::launch(
            &qemu(),
            &self.spec,
            &self.src_paths(),
            &sup(),
            &Consoles::default(),
        )
        .await
        .unwrap();
        wait_console(
            &self.src_paths().console_log(),
            self.marker,
            Duration::from_secs(60),
        )
        .await;
        l
    }

    /// A destination attempt `n`: its own directory and target disk paths.
    fn incoming_plan(&self, n: u32, sizes: &[migrate::SourceDisk], limits: Limits) -> IncomingPlan {
        let dir = self.tmp.0.join(format!("dst{n}"));
        IncomingPlan {
            spec: self.spec.clone(),
            paths: VmPaths {
                dir: dir.join("vm"),
            },
            disks: sizes
                .iter()
                .zip(&self.spec.disks)
                .enumerate()
                .map(|(i, (s, d))| migrate::TargetDisk {
                    path: self.tmp.0.join(format!("dst{n}-disk{i}.qcow2")),
                    virtual_size: s.virtual_size,
                    base: d.base.as_ref().map(|_| self.base.clone()),
                })
                .collect(),
            nbd: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            stream: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            tls: Tls {
                dir: self.tmp.0.join("dst-tls"),
                peer_hostname: String::new(),
                peer_dn: migrate::peer_dn(self.src_node, Zone::Extranet),
            },
            limits,
        }
    }

    fn outgoing_plan(&self, inc: &IncomingPlan, limits: Limits) -> OutgoingPlan {
        OutgoingPlan {
            syncs: inc.mirror_syncs(),
            nbd: inc.nbd,
            stream: inc.stream,
            tls: Tls {
                dir: self.tmp.0.join("src-tls"),
                peer_hostname: format!("{}.node.zhengyun", self.dst_node),
                peer_dn: String::new(),
            },
            limits,
        }
    }
}

async fn wait_console(log: &Path, marker: &str, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(marker)
        {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "no `{marker}` on the console within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a source must look like after a failed attempt: running, no job, no NBD node.
async fn assert_source_untouched(q: &mut Qmp) {
    assert_eq!(q.status().await.unwrap(), "running");
    let jobs = q.execute("query-block-jobs", None).await.unwrap();
    assert_eq!(jobs, json!([]), "block jobs left on the source");
    let nodes = q.execute("query-named-block-nodes", None).await.unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("zymig")),
        "migration nodes left on the source: {names:?}"
    );
}

fn assert_gone(plan: &IncomingPlan) {
    for d in &plan.disks {
        assert!(!d.path.exists(), "{} left behind", d.path.display());
    }
    assert!(
        !plan.paths.dir.exists(),
        "{} left behind",
        plan.paths.dir.display()
    );
}

/// Runs one migration to a prepared destination; the outcome and the destination, paused
/// with the whole VM (or the error).
async fn migrate_once(
    w: &World,
    src: &mut Launched,
    dst: &mut Incoming,
    out: &OutgoingPlan,
    on_progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<migrate::Outcome, migrate::MigrateError> {
    let cancel = AtomicBool::new(false);
    let cancel_dst = AtomicBool::new(false);
    let (o, d) = tokio::join!(
        migrate::migrate_out(&mut src.qmp, &w.spec, out, &cancel, on_progress),
        dst.wait_complete(&cancel_dst)
    );
    let o = o?;
    d?;
    Ok(o)
}

async fn hmp(q: &mut Qmp, cmd: &str) -> String {
    let r = q
        .execute("human-monitor-command", Some(json!({"command-line": cmd})))
        .await
        .unwrap();
    r.as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_writing_guest_moves_with_its_disks_and_arrives_identical() {
    let w = World::new("ok", "write -P 0x33 0 16M");
    let mut src = w.start_source().await;
    let sizes = migrate::source_disks(&mut src.qmp, &w.spec).await.unwrap();
    assert_eq!(sizes[0].virtual_size, 32 << 20);
    assert_eq!(sizes[1].virtual_size, 64 << 20);
    let inc = w.incoming_plan(1, &sizes, Limits::default());
    let mut dst = Incoming::prepare(&qemu(), &sup(), &Consoles::default(), inc.clone())
        .await
        .unwrap();
    let out = w.outgoing_plan(&inc, Limits::default());
    let mut seen = Vec::new();
    let t0 = Instant::now();
    let o = migrate_once(&w, &mut src, &mut dst, &out, &mut |p| seen.push(p))
        .await
        .unwrap();
    let wall = t0.elapsed();
    assert!(seen.contains(&Progress::DisksSynced));
    assert!(seen.contains(&Progress::Switchover));
    assert!(seen.iter().any(|p| matches!(p, Progress::Memory { .. })));
    assert_eq!(src.qmp.status().await.unwrap(), "postmigrate");
    // At switchover: the source is paused with its disks inactive (flushed), the
    // destination paused with the whole VM. Flush the destination's qcow2 metadata to its
    // files and compare each disk.
    let q = dst.qmp().unwrap();
    assert_eq!(q.status().await.unwrap(), "paused");
    for i in 0..2 {
        hmp(q, &format!("qemu-io disk{i} flush")).await;
    }
    for (i, d) in w.spec.disks.iter().enumerate() {
        let target = &inc.disks[i].path;
        qemu_img(&[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            d.path.to_str().unwrap(),
            target.to_str().unwrap(),
        ]);
    }
    // sync=top: the destination's root is an overlay on the same base, holding only the top.
    let info = qemu_img(&["info", "-U", inc.disks[0].path.to_str().unwrap()]);
    assert!(info.contains("backing file"), "{info}");
    let mut running = dst.activate().await.unwrap();
    assert_eq!(running.qmp.status().await.unwrap(), "running");
    // The guest goes on writing there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(running.qmp.status().await.unwrap(), "running");
    println!(
        "migration: downtime {} ms, memory {} ms, total {} ms (wall {:?}), ram {} KiB, downtime limit {} ms",
        o.downtime_ms,
        o.memory_ms,
        o.total_ms,
        wall,
        o.ram_transferred / 1024,
        o.downtime_limit_ms
    );
    let _ = running.qmp.execute("quit", None).await;
    let _ = src.qmp.execute("quit", None).await;
}

#[tokio::test]
async fn a_destination_killed_during_the_mirror_leaves_the_source_running_and_clean() {
    // 48 MiB of data at 8 MiB/s: the mirror takes about 6 s.
    let w = World::new("kill", "write -P 0x44 0 48M");
    let mut src = w.start_source().await;
    let sizes = migrate::source_disks(&mut src.qmp, &w.spec).await.unwrap();
    let slow = Limits {
        max_bandwidth: 8 << 20,
        ..Limits::default()
    };
    let inc = w.incoming_plan(1, &sizes, slow.clone());
    let mut dst = Incoming::prepare(&qemu(), &sup(), &Consoles::default(), inc.clone())
        .await
        .unwrap();
    let pid = dst.pid().unwrap();
    let out = w.outgoing_plan(&inc, slow);
    let mut killed = false;
    let cancel = AtomicBool::new(false);
    let r = migrate::migrate_out(&mut src.qmp, &w.spec, &out, &cancel, &mut |p| {
        if let Progress::Mirror { done, .. } = p {
            if done > 4 << 20 && !killed {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed = true;
            }
        }
    })
    .await;
    assert!(killed, "the destination was never killed");
    let e = r.expect_err("a migration to a dead destination succeeded");
    println!("as expected: {e}");
    assert_source_untouched(&mut src.qmp).await;
    // The destination side notices and cleans up.
    let never = AtomicBool::new(false);
    assert!(dst.wait_complete(&never).await.is_err());
    dst.abort().await;
    assert_gone(&inc);

    // The next attempt succeeds.
    let inc2 = w.incoming_plan(2, &sizes, Limits::default());
    let mut dst2 = Incoming::prepare(&qemu(), &sup(), &Consoles::default(), inc2.clone())
        .await
        .unwrap();
    let out2 = w.outgoing_plan(&inc2, Limits::default());
    let o = migrate_once(&w, &mut src, &mut dst2, &out2, &mut |_| {})
        .await
        .unwrap();
    let mut running = dst2.activate().await.unwrap();
    assert_eq!(running.qmp.status().await.unwrap(), "running");
    println!(
        "second attempt: downtime {} ms, total {} ms",
        o.downtime_ms, o.total_ms
    );
    let _ = running.qmp.execute("quit", None).await;
    let _ = src.qmp.execute("quit", None).await;
}

#[tokio::test]
async fn a_destination_with_another_cas_certificate_is_refused() {
    let w = World::new("badca", "write -P 0x55 0 1M");
    // The destination's certificate (and CA) come from another site.
    let (other, _) = SiteCa::generate("elsewhere").unwrap();
    node_tls(&other, w.dst_node, &w.tmp.0.join("dst-tls"));
    let mut src = w.start_source().await;
    let sizes = migrate::source_disks(&mut src.qmp, &w.spec).await.unwrap();
    let inc = w.incoming_plan(1, &sizes, Limits::default());
    let dst = Incoming::prepare(&qemu(), &sup(), &Consoles::default(), inc.clone())
        .await
        .unwrap();
    let out = w.outgoing_plan(&inc, Limits::default());
    let cancel = AtomicBool::new(false);
    // A plan that would mirror only the top of a disk that has no base is refused first.
    let mut top = out.clone();
    top.syncs[1] = migrate::MirrorSync::Top;
    let e = migrate::migrate_out(&mut src.qmp, &w.spec, &top, &cancel, &mut |_| {})
        .await
        .expect_err("sync=top of a disk without a base");
    assert!(matches!(e, migrate::MigrateError::TopWithoutBase(1)), "{e}");
    let e = migrate::migrate_out(&mut src.qmp, &w.spec, &out, &cancel, &mut |_| {})
        .await
        .expect_err("a destination of another CA was accepted");
    println!("as expected: {e}");
    assert_source_untouched(&mut src.qmp).await;
    dst.abort().await;
    assert_gone(&inc);
    let _ = src.qmp.execute("quit", None).await;
}

/// Why [`SiteCa::issue_node_peer`] exists: QEMU will not serve TLS with the certificate
/// a node is given at enrollment (clientAuth only).
#[tokio::test]
async fn an_enrollment_node_certificate_cannot_serve_qemus_tls() {
    let tmp = TempDir::new("enroll");
    let (ca, _) = SiteCa::generate("test").unwrap();
    let (key, csr) = node_request("node").unwrap();
    let cert = ca
        .issue_node(
            &csr,
            NodeId::new_random(),
            Zone::Extranet,
            Duration::from_secs(3600),
        )
        .unwrap();
    let dir = tmp.0.join("tls");
    migrate::write_tls_dir(
        &dir,
        &pem_cert(ca.cert_der()),
        &pem_cert(&cert),
        &key.serialize_pem(),
    )
    .unwrap();
    let paths = VmPaths {
        dir: tmp.0.join("vm"),
    };
    let spec = VmSpec {
        id: VmId::new_random(),
        name: "tls-1".into(),
        vcpus: 1,
        memory_mib: 64,
        accel: Accel::Tcg,
        boot: Boot::Kernel {
            kernel: guest().0,
            initrd: None,
            cmdline: String::new(),
        },
        disks: vec![],
        nics: vec![],
    };
    let args = spec.incoming_args(&paths).unwrap();
    let mut l = runner::launch_args(&qemu(), &spec, &paths, &sup(), &Consoles::default(), args)
        .await
        .unwrap();
    let r = l
        .qmp
        .execute(
            "object-add",
            Some(
                json!({"qom-type": "tls-creds-x509", "id": "t", "dir": dir.display().to_string(),
                        "endpoint": "server", "verify-peer": true}),
            ),
        )
        .await;
    let e = r.expect_err("QEMU accepted a clientAuth-only certificate for a TLS server");
    println!("as expected: {e}");
    let _ = l.qmp.execute("quit", None).await;
}

/// The destination accepts only the expected source: a certificate of the same CA for
/// another node is refused by its `tls-authz`.
#[tokio::test]
async fn a_source_other_than_the_expected_node_is_refused() {
    let w = World::new("authz", "write -P 0x66 0 1M");
    let mut src = w.start_source().await;
    let sizes = migrate::source_disks(&mut src.qmp, &w.spec).await.unwrap();
    let mut inc = w.incoming_plan(1, &sizes, Limits::default());
    inc.tls.peer_dn = migrate::peer_dn(NodeId::new_random(), Zone::Extranet);
    let dst = Incoming::prepare(&qemu(), &sup(), &Consoles::default(), inc.clone())
        .await
        .unwrap();
    let out = w.outgoing_plan(&inc, Limits::default());
    let cancel = AtomicBool::new(false);
    let e = migrate::migrate_out(&mut src.qmp, &w.spec, &out, &cancel, &mut |_| {})
        .await
        .expect_err("a source of the wrong node was accepted");
    println!("as expected: {e}");
    assert_source_untouched(&mut src.qmp).await;
    dst.abort().await;
    assert_gone(&inc);
    let _ = src.qmp.execute("quit", None).await;
}

/// A cancel while the memory moves: the source runs on, clean; the destination is removed.
#[tokio::test]
async fn a_cancel_during_the_memory_stream_leaves_the_source_running() {
    let w = World::new("cancel", "write -P 0x77 0 1M");
    let mut src = w.start_source().await;
    let sizes = migrate::source_disks(&mut src.qmp, &w.spec).await.unwrap();
    // Slow enough that the memory stream lasts a few polls.
    let slow = Limits {
        max_bandwidth: 32 << 20,
        ..Limits::default()
    };
    let inc = w.incoming_plan(1, &sizes, slow.clone());
    let dst = Incoming::prepare(&qemu(), &sup(), &Consoles::default(), inc.clone())
        .await
        .unwrap();
    let out = w.outgoing_plan(&inc, slow);
    let cancel = AtomicBool::new(false);
    let e = migrate::migrate_out(&mut src.qmp, &w.spec, &out, &cancel, &mut |p| {
        if matches!(p, Progress::Memory { transferred, .. } if transferred > 0) {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .await
    .expect_err("a cancelled migration succeeded");
    assert!(matches!(e, migrate::MigrateError::Cancelled), "{e}");
    assert_source_untouched(&mut src.qmp).await;
    let m = src.qmp.execute("query-migrate", None).await.unwrap();
    assert_eq!(m["status"], "cancelled", "{m}");
    dst.abort().await;
    assert_gone(&inc);
    let _ = src.qmp.execute("quit", None).await;
}

/// The same migrations driven through the node's command handler, as the coordinator
/// drives them (`MigrateIn`, `MigrateOut`, `MigrateStatus`, `MigrateActivate`,
/// `MigrateFinish`, `MigrateAbort`): two agents' node sides in one process, each with its
/// own data directory, identity (certificates of one site CA) and real QEMU runner, on
/// 127.0.0.1. No coordinator, no networks (the VM has no NIC).
mod node_level {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    use futures_util::future::BoxFuture;
    use zy_agent::identity::{IdentityDir, NodeFile};
    use zy_agent::node::{Host, Node};
    use zy_agent::uplink::{BlobSource, FetchError};
    use zy_agent::vm::runner::QemuRunner;
    use zy_common::blob::{BlobDir, BlobHash};
    use zy_common::image::ImageKind;
    use zy_common::proto::{
        CommandKind, MigrateIn, MigrateOut, MigrateTarget, MigrationPhase, MigrationStatus,
        ReplyKind, VmIntent, WireVm,
    };
    use zy_common::vm::{Desired, Generation, VmState};
    use zy_common::MigrationId;

    /// Image blobs from files of this machine (the test guest).
    #[derive(Debug)]
    struct LocalBlobs(HashMap<BlobHash, PathBuf>);

    impl BlobSource for LocalBlobs {
        fn ensure_blob<'a>(
            &'a self,
            hash: BlobHash,
            dir: &'a BlobDir,
        ) -> BoxFuture<'a, Result<(), FetchError>> {
            Box::pin(async move {
                if dir.has(&hash) {
                    return Ok(());
                }
                let path = self.0.get(&hash).ok_or(FetchError::NotFound(hash))?;
                let bytes = std::fs::read(path).map_err(|e| FetchError::Transfer {
                    hash,
                    message: e.to_string(),
                })?;
                dir.put(&mut bytes.as_slice(), u64::MAX)?;
                Ok(())
            })
        }
    }

    struct Agent {
        node: Arc<Node>,
        id: NodeId,
        dir: PathBuf,
        blobs: Arc<LocalBlobs>,
    }

    impl Agent {
        async fn new(dir: PathBuf, ca: &SiteCa, blobs: Arc<LocalBlobs>) -> Self {
            let blobs_kept = blobs.clone();
            let id = NodeId::new_random();
            let (key, csr) = node_request("n").unwrap();
            let cert = ca
                .issue_node_peer(&csr, id, Zone::Intranet, Duration::from_secs(3600))
                .unwrap();
            IdentityDir::new(&dir)
                .store(
                    &NodeFile {
                        node_id: id,
                        name: "n".into(),
                        zone: Zone::Intranet,
                        coordinator: "127.0.0.1:1".into(),
                    },
                    &key.serialize_pem(),
                    &cert,
                    ca.cert_der(),
                )
                .unwrap();
            let consoles = Consoles::default();
            let host = Host {
                runner: Arc::new(QemuRunner {
                    qemu: qemu(),
                    supervisor: sup(),
                    consoles: consoles.clone(),
                }),
                networks: None,
                blobs,
                consoles,
            };
            let (node, _events) = Node::with_host(host, &dir, Accel::Tcg).await.unwrap();
            node.set_underlay("127.0.0.1".parse().unwrap());
            Self {
                node,
                id,
                dir,
                blobs: blobs_kept,
            }
        }

        /// The agent stops (its QEMUs run on) and starts again on the same data directory.
        async fn restart(self) -> Self {
            let statuses: Vec<_> = self
                .node
                .vms
                .list()
                .iter()
                .map(|h| h.status.clone())
                .collect();
            let blobs = self.blobs.clone();
            let Agent { node, id, dir, .. } = self;
            drop(node);
            // Until every actor has ended and let go of its QEMU's QMP socket.
            for mut s in statuses {
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    while s.changed().await.is_ok() {}
                })
                .await;
            }
            let consoles = Consoles::default();
            let host = Host {
                runner: Arc::new(QemuRunner {
                    qemu: qemu(),
                    supervisor: sup(),
                    consoles: consoles.clone(),
                }),
                networks: None,
                blobs: blobs.clone(),
                consoles,
            };
            let (node, _events) = Node::with_host(host, &dir, Accel::Tcg).await.unwrap();
            node.set_underlay("127.0.0.1".parse().unwrap());
            Self {
                node,
                id,
                dir,
                blobs,
            }
        }

        fn vm_dir(&self, vm: VmId) -> PathBuf {
            VmPaths::new(&self.dir, vm).dir
        }

        async fn cmd(&self, kind: CommandKind) -> ReplyKind {
            let what = format!("{kind:?}");
            self.node
                .handle(kind)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", &what[..what.len().min(80)]))
        }

        async fn status(&self, m: MigrationId, vm: VmId) -> MigrationStatus {
            match self
                .cmd(CommandKind::MigrateStatus { migration: m, vm })
                .await
            {
                ReplyKind::Migration(s) => s,
                other => panic!("{other:?}"),
            }
        }

        /// Polls the migration until `done` says so; the last status.
        async fn until(
            &self,
            m: MigrationId,
            vm: VmId,
            limit: Duration,
            done: impl Fn(&MigrationPhase) -> bool,
        ) -> MigrationStatus {
            let t0 = Instant::now();
            loop {
                let s = self.status(m, vm).await;
                if done(&s.phase) {
                    return s;
                }
                assert!(t0.elapsed() < limit, "still {:?} after {limit:?}", s);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }

        fn pid(&self, vm: VmId) -> Option<i32> {
            let text = std::fs::read_to_string(VmPaths::new(&self.dir, vm).pidfile()).ok()?;
            text.trim().parse().ok()
        }
    }

    /// CPU time a process used (clock ticks): a paused guest uses next to none.
    fn cpu_ticks(pid: i32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let f = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the `)`.
        f(11) + f(12)
    }

    async fn guest_runs(pid: i32) -> bool {
        let a = cpu_ticks(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        cpu_ticks(pid) - a > 20
    }

    struct Lab {
        tmp: TempDir,
        src: Agent,
        dst: Agent,
        vm: WireVm,
    }

    impl Lab {
        async fn new(what: &str) -> Self {
            let tmp = TempDir::new(what);
            let (ca, _) = SiteCa::generate("test").unwrap();
            let (kernel, initrd) = guest();
            let (kb, ib) = (
                std::fs::read(&kernel).unwrap(),
                std::fs::read(&initrd).unwrap(),
            );
            let (kh, ih) = (BlobHash::of(&kb), BlobHash::of(&ib));
            let blobs = Arc::new(LocalBlobs(HashMap::from([(kh, kernel), (ih, initrd)])));
            let src = Agent::new(tmp.0.join("src"), &ca, blobs.clone()).await;
            let dst = Agent::new(tmp.0.join("dst"), &ca, blobs).await;
            let vm = WireVm {
                id: VmId::new_random(),
                name: "mig-node".into(),
                zone: Zone::Intranet,
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
                image: ImageKind::Kernel {
                    kernel: kh,
                    initrd: Some(ih),
                    cmdline: "console=ttyS0 quiet zy.ip=10.9.0.2/24 zy.diskwrite=vda".into(),
                },
                nics: vec![],
                ssh_keys: vec![],
                user_data: None,
            };
            Self { tmp, src, dst, vm }
        }

        /// The VM made and running on the source, its guest writing its disk.
        async fn start(&self) {
            self.src
                .cmd(CommandKind::EnsureVm(Box::new(VmIntent {
                    vm: self.vm.clone(),
                    desired: Desired::Running,
                    generation: Generation(1),
                    stop_grace_ms: 1000,
                })))
                .await;
            let log = VmPaths::new(&self.src.dir, self.vm.id).console_log();
            wait_console(&log, "ZY-DISKWRITE vda", Duration::from_secs(300)).await;
        }

        async fn migrate(&self, m: MigrationId, mib_s: u32) -> MigrateTarget {
            let target = match self
                .dst
                .cmd(CommandKind::MigrateIn(Box::new(MigrateIn {
                    migration: m,
                    vm: self.vm.clone(),
                    generation: Generation(4),
                    source: self.src.id,
                })))
                .await
            {
                ReplyKind::MigrateListening(t) => t,
                other => panic!("{other:?}"),
            };
            let r = self
                .src
                .cmd(CommandKind::MigrateOut(Box::new(MigrateOut {
                    migration: m,
                    vm: self.vm.id,
                    dest: self.dst.id,
                    target: target.clone(),
                    max_bandwidth_mib_s: mib_s,
                    max_downtime_ms: 2000,
                })))
                .await;
            assert_eq!(r, ReplyKind::Done);
            target
        }

        async fn completed(&self, m: MigrationId) -> MigrationStatus {
            let id = self.vm.id;
            let s = self
                .src
                .until(m, id, Duration::from_secs(300), |p| p.is_end())
                .await;
            assert!(matches!(s.phase, MigrationPhase::Completed { .. }), "{s:?}");
            self.dst
                .until(m, id, Duration::from_secs(60), |p| p.is_end())
                .await;
            s
        }
    }

    #[tokio::test]
    async fn a_disk_writing_guest_migrates_activates_and_the_source_is_left_with_nothing() {
        let lab = Lab::new("node-ok").await;
        let id = lab.vm.id;
        lab.start().await;
        let src_pid = lab.src.pid(id).unwrap();
        let m = MigrationId::new_random();
        let target = lab.migrate(m, 1024).await;
        assert_eq!(target.disks.len(), 1);
        assert_eq!(target.disks[0].virtual_size, 1 << 30);
        let s = lab.completed(m).await;
        println!("through the node: {s:?}");
        assert!(!guest_runs(src_pid).await, "the source is paused");
        let info = match lab
            .dst
            .cmd(CommandKind::MigrateActivate {
                migration: m,
                vm: id,
            })
            .await
        {
            ReplyKind::Vm(i) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(info.state, VmState::Running);
        assert_eq!(info.intent, Generation(4));
        let dst_pid = lab.dst.pid(id).unwrap();
        assert!(
            guest_runs(dst_pid).await,
            "the guest runs on the destination"
        );
        assert!(VmPaths::new(&lab.dst.dir, id).record().exists());
        assert!(!lab.dst.vm_dir(id).join(".incoming").exists());
        assert!(!lab.dst.vm_dir(id).join("migration-tls").exists());
        assert_eq!(
            lab.src
                .cmd(CommandKind::MigrateFinish {
                    migration: m,
                    vm: id
                })
                .await,
            ReplyKind::Done
        );
        assert!(!lab.src.vm_dir(id).exists(), "the source's files are gone");
        assert!(!runner::pid_alive(src_pid), "the source's QEMU is gone");
        assert!(lab.src.node.report().vms.is_empty());
        // The destination's VM is an ordinary one: it goes with a delete.
        lab.dst
            .cmd(CommandKind::DeleteVm {
                id,
                generation: Generation(5),
            })
            .await;
        assert!(!lab.dst.vm_dir(id).exists());
        drop(lab.tmp);
    }

    #[tokio::test]
    async fn an_abort_after_completion_resumes_the_source() {
        let lab = Lab::new("node-abort").await;
        let id = lab.vm.id;
        lab.start().await;
        let src_pid = lab.src.pid(id).unwrap();
        let m = MigrationId::new_random();
        lab.migrate(m, 1024).await;
        lab.completed(m).await;
        let dst_pid = lab.dst.pid(id).unwrap();
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(lab.dst.cmd(abort.clone()).await, ReplyKind::Done);
        assert!(!lab.dst.vm_dir(id).exists(), "the destination left nothing");
        assert!(
            !runner::pid_alive(dst_pid),
            "the destination's QEMU is gone"
        );
        assert_eq!(lab.src.cmd(abort).await, ReplyKind::Done);
        assert!(guest_runs(src_pid).await, "the source runs again");
        assert!(!lab.src.vm_dir(id).join("migrated-out").exists());
        assert_eq!(lab.src.status(m, id).await.phase, MigrationPhase::Cancelled);
        drop(lab.tmp);
    }

    /// The source's agent restarts: mid-migration, the next one finds its QEMU migrating
    /// and undoes it (the guest runs on, nothing of the attempt left in QEMU); after
    /// `Completed`, the guest stays paused and the migration `Completed` until an abort
    /// resumes it.
    #[tokio::test]
    async fn a_restarted_source_undoes_a_migration_under_way_and_keeps_a_completed_one() {
        let mut lab = Lab::new("node-restart").await;
        let id = lab.vm.id;
        lab.start().await;
        let src_pid = lab.src.pid(id).unwrap();
        let m = MigrationId::new_random();
        lab.migrate(m, 8).await;
        lab.src
            .until(m, id, Duration::from_secs(120), |p| {
                *p != MigrationPhase::Preparing
            })
            .await;
        lab.src = lab.src.restart().await;
        assert!(
            lab.src
                .node
                .handle(CommandKind::MigrateStatus {
                    migration: m,
                    vm: id
                })
                .await
                .is_err(),
            "the migration is unknown after the restart"
        );
        assert_eq!(lab.src.pid(id), Some(src_pid), "the same QEMU");
        assert!(guest_runs(src_pid).await, "the guest runs on");
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(lab.dst.cmd(abort).await, ReplyKind::Done);

        // Again, to completion, then a restart.
        let m = MigrationId::new_random();
        lab.migrate(m, 1024).await;
        lab.completed(m).await;
        lab.src = lab.src.restart().await;
        let s = lab.src.status(m, id).await;
        assert!(matches!(s.phase, MigrationPhase::Completed { .. }), "{s:?}");
        assert!(!guest_runs(src_pid).await, "still paused");
        let busy = lab
            .src
            .node
            .handle(CommandKind::DeleteVm {
                id,
                generation: Generation(9),
            })
            .await;
        assert!(busy.is_err(), "{busy:?}");
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(lab.dst.cmd(abort.clone()).await, ReplyKind::Done);
        assert_eq!(lab.src.cmd(abort).await, ReplyKind::Done);
        assert!(guest_runs(src_pid).await, "resumed");
        drop(lab.tmp);
    }

    #[tokio::test]
    async fn a_killed_destination_leaves_the_source_running() {
        let lab = Lab::new("node-kill").await;
        let id = lab.vm.id;
        lab.start().await;
        let src_pid = lab.src.pid(id).unwrap();
        let m = MigrationId::new_random();
        // 8 MiB/s: the mirror of the 32 MiB the guest writes takes seconds.
        lab.migrate(m, 8).await;
        lab.src
            .until(m, id, Duration::from_secs(120), |p| {
                *p != MigrationPhase::Preparing
            })
            .await;
        let dst_pid = lab.dst.pid(id).unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(dst_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let s = lab
            .src
            .until(m, id, Duration::from_secs(120), |p| p.is_end())
            .await;
        assert!(matches!(s.phase, MigrationPhase::Failed { .. }), "{s:?}");
        println!("as expected: {s:?}");
        assert!(guest_runs(src_pid).await, "the source runs on");
        let d = lab
            .dst
            .until(m, id, Duration::from_secs(60), |p| p.is_end())
            .await;
        assert!(matches!(d.phase, MigrationPhase::Failed { .. }), "{d:?}");
        assert!(!lab.dst.vm_dir(id).exists(), "the destination left nothing");
        // The VM is an ordinary one again: a delete takes it.
        lab.src
            .cmd(CommandKind::DeleteVm {
                id,
                generation: Generation(2),
            })
            .await;
        drop(lab.tmp);
    }
}

// The downtime figures: `tests/benches/migration.rs` (a benchmark through the node's
// command handler, which writes its section of docs/PERFORMANCE.md).
