//! The VM table's write path against a real redb file: VM writes per second and fsyncs
//! (write transactions) per second with 1, 8 and 64 concurrent writers, each changing a VM of
//! its own, with group commit (the coordinator's setting) and without it (each batch its own
//! transaction, as before group commit). It drives the coordinator's own table
//! (`zy_coordinator::vms::Vms::write`, the path every API request, node report and
//! reconciler step takes) in a temporary directory; no agent, no network. No figure is
//! asserted.
//!
//! ```text
//! cargo bench -p zy-lab --bench store     # also run by scripts/bench.sh
//! ```
//!
//! | variable               | default   | meaning                                             |
//! |------------------------|-----------|-----------------------------------------------------|
//! | `ZY_BENCH_STORE_SECS`  | 3         | seconds each (writers, setting) pair runs           |
//! | `ZY_BENCH_WRITE`       | 1         | 0 to leave docs/PERFORMANCE.md alone                |

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use zy_api::VmDesired;
use zy_common::time::now_millis;
use zy_common::vm::Generation;
use zy_common::{NodeId, VmId, Zone};
use zy_coordinator::store::{Store, VmRec};
use zy_coordinator::vms::commit::MAX_GROUP;
use zy_coordinator::vms::{Batch, Vms};
use zy_lab::bench::{
    docs_wanted, env_overrides, env_u64, DocSection, Machine, Results, SectionHead,
};

const DOCS: DocSection<'static> = DocSection {
    name: "store",
    after: Some("storm"),
    preamble: "Measured figures of Zhengyun. The sections between the `bench:` markers are written by the benchmarks (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_STORE_SECS",
};

const WRITERS: [usize; 3] = [1, 8, 64];

/// How one run went.
#[derive(Debug)]
struct Run {
    writes: u64,
    transactions: u64,
    took: Duration,
    /// The slowest write, from handing it over to its answer.
    worst: Duration,
}

/// A directory of its own under the system's temporary one, removed at the end.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vm(i: usize) -> VmRec {
    VmRec {
        id: VmId::new_random(),
        name: format!("vm{i}"),
        zone: Zone::Intranet,
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        image: "guest".into(),
        boot: zy_common::image::ImageKind::Kernel {
            kernel: zy_common::blob::BlobHash([1; 32]),
            initrd: None,
            cmdline: String::new(),
        },
        node: Some(NodeId::new_random()),
        desired: VmDesired::Running,
        generation: Generation(1),
        observed: None,
        mac: [0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8],
        ip: std::net::Ipv4Addr::from(0x0adc_0002u32 + i as u32),
        created_at_ms: 1,
        rev: 1,
        ssh_keys: Vec::new(),
        user_data: None,
        anti_affinity: None,
        migrating_to: None,
        moved_at_ms: None,
    }
}

/// `writers` tasks, each changing its own VM one write after another for `secs`.
async fn run(writers: usize, max_group: usize, secs: u64) -> Result<Run> {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "zy-bench-store-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    )));
    std::fs::create_dir_all(&dir.0).context("making the temporary directory")?;
    let store = Arc::new(Store::open(&dir.0.join("zy.redb"))?);
    let vms = Arc::new(Vms::with_max_group(store, vec![], vec![], max_group)?);
    let mut ids = Vec::new();
    for i in 0..writers {
        let rec = vm(i);
        ids.push(rec.id);
        vms.write(|_| {
            let mut b = Batch::default();
            b.put(None, rec.clone());
            Ok((b, ()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating a VM: {}", e.message()))?;
    }
    let before = vms.commit_stats();
    let stop = Arc::new(AtomicBool::new(false));
    let worst_ns = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let (vms, stop, worst_ns) = (vms.clone(), stop.clone(), worst_ns.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    vms.write(|t| {
                        let old = &t.vms[&id];
                        let mut new = old.clone();
                        new.memory_mib += 1;
                        let mut b = Batch::default();
                        b.put(Some(old), new);
                        Ok((b, ()))
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("writing a VM: {}", e.message()))?;
                    worst_ns.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for t in tasks {
        writes += t.await??;
    }
    let took = t0.elapsed();
    let after = vms.commit_stats();
    Ok(Run {
        writes,
        transactions: after.groups - before.groups,
        took,
        worst: Duration::from_nanos(worst_ns.load(Ordering::Relaxed)),
    })
}

/// The type of the filesystem holding `path`, as /proc/mounts says (the mount whose point is
/// the longest prefix of the path).
fn filesystem_of(path: &std::path::Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && path.starts_with(f[1])).then(|| (f[1].len(), f[2]))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs.to_string())
        .unwrap_or_else(|| "an unknown filesystem".into())
}

fn main() -> Result<()> {
    let secs = env_u64("ZY_BENCH_STORE_SECS").unwrap_or(3).max(1);
    let m = Machine::read();
    let started = now_millis();
    let t0 = Instant::now();
    println!("VM table write bench on {}", m.describe());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut res = Results::new(60, 70);
    for writers in WRITERS {
        let who = if writers == 1 {
            "1 writer".to_string()
        } else {
            format!("{writers} writers")
        };
        let mut rate = [0.0; 2];
        for (i, (what, max_group)) in [
            ("one transaction per batch", 1),
            ("group commit", MAX_GROUP),
        ]
        .into_iter()
        .enumerate()
        {
            let r = rt.block_on(run(writers, max_group, secs))?;
            println!("[store] {who}, {what}: {r:?}");
            let s = r.took.as_secs_f64();
            rate[i] = r.writes as f64 / s;
            res.row(
                format!("{who}, {what}: VM writes per second"),
                format!(
                    "{:.0} ({:.0} fsyncs per second, {:.1} writes per fsync; slowest write {:.1} ms)",
                    rate[i],
                    r.transactions as f64 / s,
                    r.writes as f64 / r.transactions.max(1) as f64,
                    r.worst.as_secs_f64() * 1000.0
                ),
                "—",
            );
        }
        res.note(format!(
            "{who}: group commit writes {:.1}× as many VMs per second.",
            rate[1] / rate[0].max(f64::MIN_POSITIVE)
        ));
    }
    let overrides = env_overrides(|k| k.starts_with("ZY_BENCH_STORE") || k == "ZY_BENCH_WRITE");
    let head = SectionHead {
        title: "VM table writes: group commit",
        bench: "store",
        machine: &m,
        more_machine: vec![(
            "Store",
            format!(
                "a redb file in the system's temporary directory, on {}; fsyncs are real",
                filesystem_of(&std::env::temp_dir())
            ),
        )],
        started_ms: started,
        took: t0.elapsed(),
        command: "`cargo bench -p zy-lab --bench store` (run by `scripts/bench.sh`)",
        overrides: &overrides,
        settings: format!(
            "{secs} s per row; 1, 8 and 64 writers, each changing a VM of its own; a runtime of two worker threads; at most {MAX_GROUP} batches per transaction with group commit."
        ),
    };
    let method = [
        "Each writer is a task that writes its VM (one row, revision compare-and-swap) through `Vms::write` (`coordinator/src/vms/mod.rs`), the path every VM change of the coordinator takes, one write after another: it plans the batch from the in-memory table, hands it to the committer thread (`coordinator/src/vms/commit.rs`) and waits for its answer, which comes after the fsync and after memory took the write. **Group commit** is the coordinator's setting: the committer writes every batch waiting in one redb transaction. **One transaction per batch** is the same committer limited to one batch per transaction, which is what the coordinator did before group commit (every batch its own `spawn_blocking` transaction; redb lets one writer in at a time, so they queued the same way). An fsync is one durable redb commit, counted by the committer; writes per fsync is the average group.\n".to_string(),
        "Since every writer waits for its write before the next, N writers have at most N batches waiting: with one writer there is nothing to group and the two settings should match; the gain grows with the writers until the transaction's own work, not the fsync, is what it costs.\n".to_string(),
    ];
    let text = head.text(&res, &method);
    DOCS.publish(&text, docs_wanted(true));
    Ok(())
}
