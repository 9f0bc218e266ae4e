//! Group commit of the VM table: every writer of the table hands its batch to one committer
//! thread, which writes all the batches waiting in one redb transaction and one fsync.
//!
//! ```text
//!   writer ──batch──▶ ┌─────────┐  take all queued   ┌────────────────────────────┐
//!   writer ──batch──▶ │  queue  │ ─────────────────▶ │ one write transaction:     │
//!   writer ──batch──▶ └─────────┘  (≤ max per group) │  check + write each batch  │
//!      ▲                                             │  in order; a refused batch │
//!      │                                             │  is left out, alone        │
//!      │                                             │ commit (one fsync)         │
//!      │                                             │ apply to memory, in order  │
//!      └────────────── answer each ──────────────────┴────────────────────────────┘
//! ```
//!
//! redb has one writer at a time, so before this every batch was a transaction and an fsync
//! of its own, and N concurrent changes of N different VMs waited for each other's fsyncs.
//! Now the batches that arrive while one group is being committed make the next group: one
//! writer alone still commits at once (nothing waits for company), many share an fsync.
//!
//! A dedicated thread rather than a leader elected among the waiting writers: a writer is
//! often an API request whose future is dropped when its client goes away, and a leader
//! dropped halfway would strand the followers; the thread also keeps redb's blocking work
//! off the runtime's threads without handing each group to the blocking pool. The thread
//! ends when its [`Committer`] is dropped, which waits for it (so the store is closed once
//! the coordinator is).
//!
//! What callers see is what they saw when each batch was its own transaction: a batch is
//! answered only after its group's fsync (or its refusal); one whose compare-and-swap fails
//! against the transaction as the batches before it left it is refused alone with the same
//! conflict as before, memory takes the stored row, and the writer plans again. An error of
//! the store itself fails every batch of the group, and none is written.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use super::{Batch, Table};
use crate::store::{Store, StoreError, VmWrite};

/// Most batches in one transaction: a bound on its size and on how long the last batch of
/// a group waits for the others.
pub const MAX_GROUP: usize = 256;

/// How many batches were handed over, taken into groups and refused, and how many groups
/// (write transactions, each one fsync) were committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub submitted: u64,
    pub taken: u64,
    pub refused: u64,
    pub groups: u64,
}

#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    taken: AtomicU64,
    refused: AtomicU64,
    groups: AtomicU64,
}

/// The committer stopped (it panicked): nothing can be written to the VM table.
#[derive(Debug, thiserror::Error)]
#[error("the VM table's committer stopped")]
pub struct CommitterGone;

/// A batch handed over and where its outcome goes.
struct Job {
    batch: Batch,
    answer: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// What the committer thread shares with the [`super::Vms`] it writes for.
pub(super) struct Shared {
    pub store: Arc<Store>,
    pub table: Arc<Mutex<Table>>,
    pub wake: Arc<tokio::sync::Notify>,
}

/// The handle of the committer thread.
#[derive(Debug)]
pub(super) struct Committer {
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Committer {
    /// Starts the committer thread; at most `max_group` batches share a transaction.
    pub fn start(shared: Shared, max_group: usize) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("zy-vm-commit".into())
            .spawn(move || run(&rx, &shared, &c, max_group.max(1)))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
            counters,
        })
    }

    /// Hands `batch` over and waits for its group: `Ok` once it is durable and in memory.
    pub async fn submit(&self, batch: Batch) -> Result<Result<(), StoreError>, CommitterGone> {
        let (answer, outcome) = tokio::sync::oneshot::channel();
        let queue = self.queue.as_ref().ok_or(CommitterGone)?;
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        queue
            .send(Job { batch, answer })
            .map_err(|_| CommitterGone)?;
        outcome.await.map_err(|_| CommitterGone)
    }

    pub fn stats(&self) -> CommitStats {
        let c = &self.counters;
        CommitStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            taken: c.taken.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            groups: c.groups.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has answered what it holds.
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(rx: &mpsc::Receiver<Job>, shared: &Shared, counters: &Counters, max_group: usize) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_group {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        counters
            .taken
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        // A panic fails this group's writers (their answers are dropped), not the next.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| commit(shared, counters, jobs)));
        if r.is_err() {
            tracing::error!("committing a group of VM table writes panicked");
        }
    }
}

/// Commits one group, applies what was written to memory in order, and answers.
fn commit(shared: &Shared, counters: &Counters, jobs: Vec<Job>) {
    let group = shared
        .store
        .commit_group(jobs.iter().map(|j| (&j.batch.vms[..], &j.batch.ops[..])));
    let group = match group {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %zy_common::error::chain(&e), batches = jobs.len(), "a group of VM table writes failed");
            let e = Arc::new(e);
            for j in jobs {
                let _ = j.answer.send(Err(StoreError::Shared(e.clone())));
            }
            return;
        }
    };
    counters.groups.fetch_add(1, Ordering::Relaxed);
    let mut written = false;
    {
        let mut t = shared.table.lock().unwrap_or_else(|p| p.into_inner());
        for (j, outcome) in jobs.iter().zip(&group.outcomes) {
            match outcome {
                Ok(()) => {
                    apply(&mut t, &j.batch);
                    written = true;
                }
                Err(e) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    refresh(&mut t, e);
                }
            }
        }
        for id in &group.pruned {
            t.ops.remove(id);
        }
    }
    if written {
        shared.wake.notify_one();
    }
    for (j, outcome) in jobs.into_iter().zip(group.outcomes) {
        // A writer that went away (its request was dropped) is not waiting.
        let _ = j.answer.send(outcome);
    }
}

/// Takes what a committed batch wrote. Rows are taken only if newer than what memory holds.
fn apply(t: &mut Table, b: &Batch) {
    for w in &b.vms {
        match w {
            VmWrite::Put { rec, .. } => {
                if t.vms.get(&rec.id).is_none_or(|m| m.rev < rec.rev) {
                    t.vms.insert(rec.id, (**rec).clone());
                }
            }
            VmWrite::Remove { id, expect } => {
                if t.vms.get(id).is_some_and(|m| Some(m.rev) <= *expect) {
                    t.vms.remove(id);
                }
            }
        }
    }
    for op in &b.ops {
        if t.ops.get(&op.id).is_none_or(|m| m.rev < op.rev) {
            t.ops.insert(op.id, op.clone());
        }
    }
}

/// Takes the row the store held when a batch was refused for it: its writer plans again
/// from there.
fn refresh(t: &mut Table, e: &StoreError) {
    match e {
        StoreError::Conflict { vm, current, .. } => match current {
            Some(c) => {
                if t.vms.get(vm).is_none_or(|m| m.rev < c.rev) {
                    t.vms.insert(*vm, (**c).clone());
                }
            }
            None => {
                t.vms.remove(vm);
            }
        },
        StoreError::OpConflict {
            op,
            current: Some(c),
        } if t.ops.get(op).is_none_or(|m| m.rev < c.rev) => {
            t.ops.insert(*op, (**c).clone());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use zy_api::OpKind;
    use zy_common::VmId;

    use super::*;
    use crate::api::ApiError;
    use crate::ops::OpRec;
    use crate::store::{test_vm, VmRec};
    use crate::vms::Vms;

    /// A store in a directory of its own, removed at the end.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (Dir, Arc<Store>) {
        let dir = std::env::temp_dir().join(format!(
            "zy-commit-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        (Dir(dir), Arc::new(s))
    }

    /// Waits (up to a minute) until the committer's counters satisfy `f`.
    async fn until(vms: &Vms, f: impl Fn(CommitStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f(vms.commit_stats()) {
            assert!(Instant::now() < deadline, "{:?}", vms.commit_stats());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn create(rec: &VmRec) -> impl FnMut(&Table) -> Result<(Batch, ()), ApiError> + '_ {
        move |_| {
            let mut b = Batch::default();
            b.put(None, rec.clone());
            Ok((b, ()))
        }
    }

    /// A batch changing VM `id` as `f` says, from the table's revision of it.
    fn change(t: &Table, id: VmId, f: impl Fn(&mut VmRec)) -> Batch {
        let old = &t.vms[&id];
        let mut new = old.clone();
        f(&mut new);
        let mut b = Batch::default();
        b.put(Some(old), new);
        b
    }

    /// Memory and store hold the same rows.
    fn agree(vms: &Vms, store: &Store) {
        let t = vms.snapshot();
        let mut stored = store.vms().unwrap();
        stored.sort_by_key(|v| v.id);
        assert_eq!(t.vms.values().cloned().collect::<Vec<_>>(), stored);
        let mut ops = store.ops().unwrap();
        ops.sort_by_key(|o| o.id);
        assert_eq!(t.ops.values().cloned().collect::<Vec<_>>(), ops);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_of_different_vms_share_transactions() {
        let (_dir, store) = store();
        let vms = Arc::new(Vms::new(store.clone(), vec![], vec![]).unwrap());
        // Another writer holds the store: the committer's first group waits for it and every
        // other batch queues behind.
        let held = store.hold_writer();
        let writers: Vec<_> = (0..64)
            .map(|i| {
                let vms = vms.clone();
                tokio::spawn(async move {
                    let rec = test_vm(&format!("vm{i}"));
                    vms.write(create(&rec)).await
                })
            })
            .collect();
        until(&vms, |s| s.submitted == 64).await;
        assert_eq!(vms.commit_stats().groups, 0);
        drop(held);
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let s = vms.commit_stats();
        assert!(s.groups <= 2, "64 batches in {} transactions", s.groups);
        assert_eq!((s.taken, s.refused), (64, 0));
        assert_eq!(store.vms().unwrap().len(), 64);
        agree(&vms, &store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflicting_batch_is_refused_alone_and_retried_while_the_others_land() {
        let (_dir, store) = store();
        let (x, y, d) = (test_vm("x"), test_vm("y"), test_vm("d"));
        let vms = Arc::new(Vms::new(store.clone(), vec![], vec![]).unwrap());
        vms.write(create(&x)).await.unwrap();
        vms.write(create(&y)).await.unwrap();
        let before = vms.commit_stats();

        let held = store.hold_writer();
        // The first group, [d], waits for the store...
        let first = tokio::spawn({
            let (vms, d) = (vms.clone(), d.clone());
            async move { vms.write(create(&d)).await }
        });
        until(&vms, |s| s.taken == before.taken + 1).await;
        // ... while a, b and c queue for the next, in that order. a and b are planned from the
        // same revision of x: a lands, b is refused and plans again.
        let planned_b = Arc::new(AtomicU64::new(0));
        let mut writers = Vec::new();
        for (i, w) in ["a", "b", "c"].into_iter().enumerate() {
            let (v, planned_b) = (vms.clone(), planned_b.clone());
            let (xid, yid) = (x.id, y.id);
            writers.push(tokio::spawn(async move {
                v.write(|t| {
                    let b = match w {
                        "a" => change(t, xid, |v| v.vcpus += 1),
                        "b" => {
                            planned_b.fetch_add(1, Ordering::Relaxed);
                            change(t, xid, |v| v.memory_mib += 1)
                        }
                        _ => change(t, yid, |v| v.vcpus += 10),
                    };
                    Ok((b, ()))
                })
                .await
            }));
            until(&vms, |s| s.submitted == before.submitted + 2 + i as u64).await;
        }
        drop(held);
        first.await.unwrap().unwrap();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let s = vms.commit_stats();
        // [d], [a, b refused, c], [b again].
        assert_eq!(s.groups - before.groups, 3, "{s:?}");
        assert_eq!(s.refused - before.refused, 1);
        assert_eq!(planned_b.load(Ordering::Relaxed), 2);
        let t = vms.snapshot();
        let (x2, y2) = (&t.vms[&x.id], &t.vms[&y.id]);
        assert_eq!((x2.vcpus, x2.memory_mib, x2.rev), (2, 129, 3));
        assert_eq!((y2.vcpus, y2.rev), (11, 2));
        assert!(t.vms.contains_key(&d.id));
        agree(&vms, &store);
    }

    /// Many writers change a few VMs at random (one or two rows a batch, some with an
    /// operation): every write that was acknowledged is in the store, in memory, and counted
    /// once, and memory agrees with the store. Seeded: the choices repeat, the interleaving
    /// is the machine's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_and_store_agree_after_a_storm_of_concurrent_writes() {
        for (seed, max_group) in [(1, MAX_GROUP), (2, MAX_GROUP), (3, 1), (4, 3)] {
            let (_dir, store) = store();
            let vms =
                Arc::new(Vms::with_max_group(store.clone(), vec![], vec![], max_group).unwrap());
            let recs: Vec<VmRec> = (0..6).map(|i| test_vm(&format!("vm{i}"))).collect();
            for r in &recs {
                vms.write(create(r)).await.unwrap();
            }
            let ids: Arc<Vec<VmId>> = Arc::new(recs.iter().map(|r| r.id).collect());
            let writers: Vec<_> = (0..12u64)
                .map(|w| {
                    let (vms, ids) = (vms.clone(), ids.clone());
                    tokio::spawn(async move {
                        let mut rng = StdRng::seed_from_u64(seed * 1000 + w);
                        // Acknowledged increments per VM, and operations written.
                        let mut done = vec![0u64; ids.len()];
                        let mut ops = 0u64;
                        for _ in 0..25 {
                            let a = rng.random_range(0..ids.len());
                            let two = rng
                                .random_bool(0.3)
                                .then(|| (a + rng.random_range(1..ids.len())) % ids.len());
                            let with_op = rng.random_bool(0.2);
                            let r = vms
                                .write(|t| {
                                    let mut b = change(t, ids[a], |v| v.memory_mib += 1);
                                    if let Some(c) = two {
                                        b.vms.extend(change(t, ids[c], |v| v.memory_mib += 1).vms);
                                    }
                                    if with_op {
                                        let v = &t.vms[&ids[a]];
                                        let op =
                                            OpRec::new(OpKind::Start, v, v.generation, None, 1);
                                        b.op(None, op);
                                    }
                                    Ok((b, ()))
                                })
                                .await;
                            match r {
                                Ok(()) => {
                                    done[a] += 1;
                                    if let Some(c) = two {
                                        done[c] += 1;
                                    }
                                    ops += u64::from(with_op);
                                }
                                // Refused every time it tried: nothing of it was written.
                                Err(e) => assert_eq!(e.code(), "contended", "{}", e.message()),
                            }
                            if rng.random_bool(0.5) {
                                tokio::task::yield_now().await;
                            }
                        }
                        (done, ops)
                    })
                })
                .collect();
            let mut done = vec![0u64; ids.len()];
            let mut ops = 0;
            for w in writers {
                let (d, o) = w.await.unwrap();
                for (sum, n) in done.iter_mut().zip(d) {
                    *sum += n;
                }
                ops += o;
            }
            let t = vms.snapshot();
            for (i, id) in ids.iter().enumerate() {
                let v = &t.vms[id];
                assert_eq!(v.memory_mib - 128, done[i], "seed {seed}: VM {i}");
                assert_eq!(v.rev, 1 + done[i], "seed {seed}: VM {i}");
            }
            assert_eq!(t.ops.len() as u64, ops, "seed {seed}");
            agree(&vms, &store);
            let s = vms.commit_stats();
            assert_eq!(s.submitted, s.taken);
            if max_group == 1 {
                assert_eq!(s.groups, s.taken, "seed {seed}: one transaction per batch");
            }
        }
    }
}
