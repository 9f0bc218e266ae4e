//! Live migration's downtime and total time, through the agent's own command handler
//! (`Node::handle`: `MigrateIn`, `MigrateOut`, `MigrateStatus`, `MigrateActivate`,
//! `MigrateFinish`, as the coordinator sends them) between two agents' node sides in one
//! process on 127.0.0.1, each with its own data directory, identity (certificates of one
//! site CA) and real QEMU (TCG). An idle guest and one that keeps writing its disk. No
//! figure is asserted: under TCG they are ours to report.
//!
//! ```text
//! cargo bench -p zy-lab --bench migration     # also run by scripts/bench.sh
//! ```
//!
//! | variable               | default | meaning                                        |
//! |------------------------|---------|------------------------------------------------|
//! | `ZY_BENCH_MIG_RUNS`    | 5       | migrations per kind of guest                   |
//! | `ZY_BENCH_WRITE`       | 1       | 0 to leave docs/PERFORMANCE.md alone           |
//!
//! Needs root (QEMU's TLS files, process control), qemu-system-x86_64, qemu-img and the
//! test guest in `images/out` (`images/make-test-guest.sh`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::future::BoxFuture;
use zy_agent::identity::{IdentityDir, NodeFile};
use zy_agent::node::{Host, Node};
use zy_agent::uplink::{BlobSource, FetchError};
use zy_agent::vm::console::Consoles;
use zy_agent::vm::limits::Cgroups;
use zy_agent::vm::runner::{QemuRunner, Supervisor};
use zy_agent::vm::spec::VmPaths;
use zy_common::blob::{BlobDir, BlobHash};
use zy_common::image::ImageKind;
use zy_common::proto::{
    Accel, CommandKind, MigrateIn, MigrateOut, MigrationPhase, MigrationStatus, ReplyKind,
    VmIntent, WireVm,
};
use zy_common::time::now_millis;
use zy_common::tls::{node_request, SiteCa};
use zy_common::vm::{Desired, Generation};
use zy_common::{MigrationId, NodeId, VmId, Zone};
use zy_lab::bench::{
    docs_wanted, env_overrides, env_u64, DocSection, Machine, Results, SectionHead,
};

const DOCS: DocSection<'static> = DocSection {
    name: "migration",
    after: Some("systemd"),
    preamble: "Measured figures of Zhengyun. The sections between the `bench:` markers are written by the benchmarks (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_MIG_RUNS",
};

/// The bandwidth cap and downtime limit the coordinator would send.
const MIB_S: u32 = 1024;
const MAX_DOWNTIME_MS: u32 = 2000;

fn guest_dir() -> PathBuf {
    std::env::var_os("ZY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

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

/// A directory removed on drop, after every QEMU whose command line names it is killed.
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

struct Agent {
    node: Arc<Node>,
    id: NodeId,
    dir: PathBuf,
}

impl Agent {
    async fn new(dir: PathBuf, ca: &SiteCa, blobs: Arc<LocalBlobs>) -> Result<Self> {
        let id = NodeId::new_random();
        let (key, csr) = node_request("n")?;
        let cert = ca.issue_node_peer(&csr, id, Zone::Intranet, Duration::from_secs(3600))?;
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
            .map_err(|e| anyhow!("{e}"))?;
        let consoles = Consoles::default();
        let host = Host {
            runner: Arc::new(QemuRunner {
                qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
                // Both QEMUs of a VM share its id on one machine: no cgroup limits.
                supervisor: Supervisor::Direct(Cgroups::None),
                consoles: consoles.clone(),
            }),
            networks: None,
            blobs,
            consoles,
        };
        let (node, _events) = Node::with_host(host, &dir, Accel::Tcg)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        node.set_underlay("127.0.0.1".parse()?);
        Ok(Self { node, id, dir })
    }

    async fn cmd(&self, kind: CommandKind) -> Result<ReplyKind> {
        self.node.handle(kind).await.map_err(|e| anyhow!("{e}"))
    }

    async fn until_end(
        &self,
        m: MigrationId,
        vm: VmId,
        limit: Duration,
    ) -> Result<MigrationStatus> {
        let t0 = Instant::now();
        loop {
            let s = match self
                .cmd(CommandKind::MigrateStatus { migration: m, vm })
                .await?
            {
                ReplyKind::Migration(s) => s,
                other => bail!("unexpected {other:?}"),
            };
            if s.phase.is_end() {
                return Ok(s);
            }
            if t0.elapsed() > limit {
                bail!("still {} after {limit:?}", s.phase.as_str());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One migration: (downtime ms, total ms as the source measured them, activation ms).
async fn one(busy: bool, run: usize) -> Result<(u64, u64, u64)> {
    let tmp =
        TempDir(std::env::temp_dir().join(format!("zy-bench-mig-{run}-{}", rand::random::<u64>())));
    std::fs::create_dir_all(&tmp.0)?;
    let (ca, _) = SiteCa::generate("bench")?;
    let (kernel, initrd) = (
        guest_dir().join("vmlinuz"),
        guest_dir().join("initramfs.gz"),
    );
    let (kb, ib) = (
        std::fs::read(&kernel).context("the test guest (images/make-test-guest.sh)")?,
        std::fs::read(&initrd)?,
    );
    let (kh, ih) = (BlobHash::of(&kb), BlobHash::of(&ib));
    let blobs = Arc::new(LocalBlobs(HashMap::from([(kh, kernel), (ih, initrd)])));
    let src = Agent::new(tmp.0.join("src"), &ca, blobs.clone()).await?;
    let dst = Agent::new(tmp.0.join("dst"), &ca, blobs).await?;
    let vm = WireVm {
        id: VmId::new_random(),
        name: "bench".into(),
        zone: Zone::Intranet,
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        image: ImageKind::Kernel {
            kernel: kh,
            initrd: Some(ih),
            cmdline: format!(
                "console=ttyS0 quiet zy.ip=10.9.0.2/24{}",
                if busy { " zy.diskwrite=vda" } else { "" }
            ),
        },
        nics: vec![],
        ssh_keys: vec![],
        user_data: None,
    };
    let id = vm.id;
    src.cmd(CommandKind::EnsureVm(Box::new(VmIntent {
        vm: vm.clone(),
        desired: Desired::Running,
        generation: Generation(1),
        stop_grace_ms: 1000,
    })))
    .await?;
    let log = VmPaths::new(&src.dir, id).console_log();
    let marker = if busy {
        "ZY-DISKWRITE vda"
    } else {
        "ZY-READY bench"
    };
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(marker)
    {
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the guest never printed {marker}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: a few seconds of the guest's steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = MigrationId::new_random();
    let target = match dst
        .cmd(CommandKind::MigrateIn(Box::new(MigrateIn {
            migration: m,
            vm: vm.clone(),
            generation: Generation(2),
            source: src.id,
        })))
        .await?
    {
        ReplyKind::MigrateListening(t) => t,
        other => bail!("unexpected {other:?}"),
    };
    src.cmd(CommandKind::MigrateOut(Box::new(MigrateOut {
        migration: m,
        vm: id,
        dest: dst.id,
        target,
        max_bandwidth_mib_s: MIB_S,
        max_downtime_ms: MAX_DOWNTIME_MS,
    })))
    .await?;
    let s = src.until_end(m, id, Duration::from_secs(600)).await?;
    let MigrationPhase::Completed {
        downtime_ms,
        total_ms,
    } = s.phase
    else {
        bail!("the migration ended {:?}", s.phase);
    };
    dst.until_end(m, id, Duration::from_secs(60)).await?;
    let ta = Instant::now();
    dst.cmd(CommandKind::MigrateActivate {
        migration: m,
        vm: id,
    })
    .await?;
    let activation = ta.elapsed().as_millis() as u64;
    src.cmd(CommandKind::MigrateFinish {
        migration: m,
        vm: id,
    })
    .await?;
    dst.cmd(CommandKind::DeleteVm {
        id,
        generation: Generation(3),
    })
    .await?;
    drop(tmp);
    Ok((downtime_ms, total_ms, activation))
}

fn p50(v: &[u64]) -> u64 {
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let runs = env_u64("ZY_BENCH_MIG_RUNS").unwrap_or(5).max(1) as usize;
    let m = Machine::read();
    let started = now_millis();
    let t0 = Instant::now();
    println!("migration bench on {}", m.describe());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut res = Results::new(60, 70);
    for busy in [false, true] {
        let what = if busy {
            "guest writing its disk"
        } else {
            "idle guest"
        };
        let (mut down, mut total, mut act) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let (d, t, a) = rt.block_on(one(busy, run))?;
            println!(
                "[migration] {what}, run {run}: downtime {d} ms, total {t} ms, activation {a} ms"
            );
            down.push(d);
            total.push(t);
            act.push(a);
        }
        for v in [&mut down, &mut total, &mut act] {
            v.sort_unstable();
        }
        res.row(
            format!("{what}: downtime (guest paused at switchover)"),
            format!("p50 {} ms, max {} ms", p50(&down), down[runs - 1]),
            "— (QEMU's default limit is 300 ms)",
        );
        res.row(
            format!("{what}: total time (mirror, then memory)"),
            format!("p50 {} ms, max {} ms", p50(&total), total[runs - 1]),
            "—",
        );
        res.row(
            format!("{what}: MigrateActivate (cont, announce-self, record)"),
            format!("p50 {} ms, max {} ms", p50(&act), act[runs - 1]),
            "—",
        );
    }
    res.note("Under TCG the guest's vCPU is emulated: the figures are this machine's, not a KVM host's, and are reported, not asserted.");
    let overrides = env_overrides(|k| k.starts_with("ZY_BENCH_MIG") || k == "ZY_BENCH_WRITE");
    let head = SectionHead {
        title: "Live migration: downtime and total time",
        bench: "migration",
        machine: &m,
        more_machine: vec![(
            "Guests",
            "QEMU with TCG (no KVM), 1 vCPU, 256 MiB of memory, a 1 GiB qcow2 disk; source and destination on 127.0.0.1".into(),
        )],
        started_ms: started,
        took: t0.elapsed(),
        command: "`cargo bench -p zy-lab --bench migration` (run by `scripts/bench.sh`)",
        overrides: &overrides,
        settings: format!(
            "{runs} migrations per kind of guest; bandwidth cap {MIB_S} MiB/s; downtime limit 100 ms at first, raised up to {MAX_DOWNTIME_MS} ms while the memory does not converge."
        ),
    };
    let method = [
        "Each run makes a fresh pair of agents' node sides in one process (`zy_agent::node::Node`, each with its own data directory, a node certificate of one site CA and the real QEMU runner) and drives them with the protocol's commands exactly as the coordinator sends them: `EnsureVm` on the source, `MigrateIn` to the destination, `MigrateOut` with its answer to the source, `MigrateStatus` polled every 50 ms until the source reports `Completed`, then `MigrateActivate` on the destination and `MigrateFinish` on the source. The disk is mirrored over NBD and the memory sent over QEMU's migration stream, both under TLS with the nodes' certificates (`agent/src/vm/migrate.rs`).\n".to_string(),
        "**Downtime** is QEMU's own measure on the source (`query-migrate` `downtime`: from the guest's pause to the end of the migration, which includes completing the disk mirrors at switchover). **Total time** is from the first NBD attach to completion, as the engine measures it. **MigrateActivate** is the destination's answer time: close the NBD exports, `cont`, `announce-self`, write the VM's record and start its actor. The idle guest boots the test guest and sits at its shell; the busy one keeps writing random 64 KiB blocks, synced, over the first 32 MiB of its disk (`zy.diskwrite=vda`), so the mirror runs in write-blocking mode while the guest writes.\n".to_string(),
    ];
    let text = head.text(&res, &method);
    DOCS.publish(&text, docs_wanted(true));
    Ok(())
}
