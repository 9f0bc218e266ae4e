//! Every VM of the node: creates them, finds them again after an agent restart, and routes
//! requests to their actors.
//!
//! A VM being made (its image fetched, its disk made) is a *preparation*: one slot per VM
//! id, so that a second hand-over of the same VM joins the first instead of racing it, and a
//! failed preparation removes only the directory it made itself. A preparation writes a
//! marker into the directory it creates; an agent that restarts finds a directory with the
//! marker and no record half-made by itself, and removes it (the coordinator hands the VM
//! over again, since the node no longer reports it).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use tracing::{error, info, warn};
use zy_common::proto::VmInfo;
use zy_common::time::now_millis;
use zy_common::vm::{Generation, VmState};
use zy_common::VmId;

use super::actor::{self, Ctx, VmEvent, VmHandle, VmStatus};
use super::record::{Desired, VmRecord};
use super::runner;
use super::spec::{SpecError, VmPaths, VmSpec};

/// The file that marks a VM directory as being made by a preparation.
pub const PREPARING_MARKER: &str = ".preparing";

/// A VM being made.
#[derive(Debug)]
struct Prep {
    name: String,
    desired: Desired,
    intent: Generation,
    stop_grace_ms: u32,
    /// Creating while under way; Failed once it failed (kept, so that the node reports the
    /// failure until the VM is deleted or handed over again with a newer generation).
    state: VmState,
    generation: Generation,
    cancelled: bool,
    done: watch::Sender<bool>,
}

/// What [`VmManager::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// The VM exists: give the intent to its actor.
    Actor(VmHandle),
    /// A preparation is under way (or failed, and this intent is not newer): nothing to do.
    Joined(VmInfo),
    /// A preparation was claimed: the caller makes the VM and calls [`VmManager::finish`].
    Claimed(VmInfo),
    /// This node deleted the VM: an intent for it is late news and makes nothing.
    Deleted,
}

/// How many deleted VM ids the manager remembers (a late intent for an older one could make
/// it again, but intents only arrive late within a few seconds of a reconnect).
const DELETED_KEPT: usize = 100_000;

/// VMs this node deleted, most recent last.
#[derive(Debug, Default)]
struct Deleted {
    ids: std::collections::HashSet<VmId>,
    order: std::collections::VecDeque<VmId>,
}

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("VM {0} already exists on this node")]
    Exists(VmId),
    #[error("cannot make the VM's directory {path}")]
    Files {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM could not be made: {0}")]
    Failed(String),
}

/// The node's VMs.
#[derive(Debug)]
pub struct VmManager {
    ctx: Ctx,
    vms: Mutex<HashMap<VmId, VmHandle>>,
    preparing: Mutex<HashMap<VmId, Prep>>,
    /// VMs deleted here while this agent runs: a command of an ended session carried out
    /// late must not make one anew.
    deleted: Mutex<Deleted>,
    /// QEMU processes of this data directory that no record names (found at start).
    strays: Vec<Stray>,
}

/// A QEMU started for a VM of this node that the agent has no record of (its record was
/// lost or unreadable): left running, reported, for ops to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stray {
    pub pid: i32,
    pub id: VmId,
}

/// QEMU processes whose pid file lies under `vms_dir` (so this agent started them) and
/// whose VM is not in `known`.
pub fn find_strays(vms_dir: &std::path::Path, known: &dyn Fn(VmId) -> bool) -> Vec<Stray> {
    let mut out = Vec::new();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for p in procs {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let value = |flag: &[u8]| {
            args.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| String::from_utf8_lossy(w[1]).into_owned())
        };
        let (Some(uuid), Some(pidfile)) = (value(b"-uuid"), value(b"-pidfile")) else {
            continue;
        };
        // Component-wise: `<data>/vms-old/...` is not under `<data>/vms`.
        if !std::path::Path::new(&pidfile).starts_with(vms_dir) || !runner::pid_alive(pid) {
            continue;
        }
        if let Ok(id) = uuid.parse::<VmId>() {
            if !known(id) {
                out.push(Stray { pid, id });
            }
        }
    }
    out
}

/// What a preparation made of a VM: its spec, the networks of its taps and, for a disk
/// image, the cloud-init seed it wrote.
#[derive(Debug)]
pub struct Prepared {
    pub spec: VmSpec,
    pub ports: Vec<(String, crate::netdev::Segment)>,
    pub seed: Option<super::seed::Seed>,
}

impl VmManager {
    /// Finds every VM recorded under the data directory, re-attaches to the QEMU processes
    /// still running, and starts those that should run and do not.
    pub async fn recover(ctx: Ctx) -> Self {
        let mut vms = HashMap::new();
        let dir = ctx.data_dir.join("vms");
        let entries = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for entry in entries {
            let path = VmPaths { dir: entry.path() }.record();
            let incoming = entry.path().join(super::migration::INCOMING);
            if incoming.exists() {
                if path.exists() {
                    // Activated (the record is written only then); the marker was left.
                    let _ = std::fs::remove_file(&incoming);
                } else {
                    // A migration's destination that was never activated: its QEMU and
                    // files go; the coordinator finds the migration unknown and aborts it.
                    let id = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<VmId>().ok());
                    if let Some(id) = id {
                        ctx.runner
                            .kill_incoming(id, &VmPaths { dir: entry.path() })
                            .await;
                    }
                    match std::fs::remove_dir_all(entry.path()) {
                        Ok(()) => {
                            info!(dir = %entry.path().display(), "removed a migration's destination that an agent restart cut short")
                        }
                        Err(e) => {
                            warn!(dir = %entry.path().display(), error = %e, "cannot remove a migration's destination")
                        }
                    }
                    continue;
                }
            }
            if !path.exists() && entry.path().join(PREPARING_MARKER).exists() {
                // Half-made by a preparation of this agent that a restart cut short.
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        info!(dir = %entry.path().display(), "removed a VM directory a cut-short preparation left")
                    }
                    Err(e) => {
                        warn!(dir = %entry.path().display(), error = %e, "cannot remove a half-made VM directory")
                    }
                }
                continue;
            }
            let rec = match VmRecord::load(&path) {
                Ok(r) => r,
                Err(e) => {
                    // Never delete what cannot be read: ops decide.
                    error!(error = %e, "skipping a VM whose record cannot be read");
                    continue;
                }
            };
            let paths = VmPaths::new(&ctx.data_dir, rec.spec.id);
            let live = match ctx.runner.find(&rec.spec, &paths).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(vm = %rec.spec.id, error = %e, "found QEMU but could not attach; it will be treated as stopped");
                    None
                }
            };
            if let Some(l) = &live {
                info!(vm = %rec.spec.id, pid = l.pid(), "re-attached to a running VM");
            }
            let id = rec.spec.id;
            // A migration that completed before the restart holds the VM from the first
            // command on (its actor decides at start whether the guest is still paused).
            let marker = paths.dir.join(super::migration::MIGRATED_OUT);
            if let Some(m) = super::migration::read_marker(&marker) {
                let side = super::migration::Side::Source;
                if let (_, Some(h)) = ctx.migrations.claim(id, m, side, vec![]) {
                    h.update(|s| {
                        s.phase = zy_common::proto::MigrationPhase::Completed {
                            downtime_ms: 0,
                            total_ms: 0,
                        }
                    });
                }
            }
            vms.insert(id, actor::spawn(ctx.clone(), rec, live));
        }
        let strays = find_strays(&dir, &|id| vms.contains_key(&id));
        for s in &strays {
            warn!(vm = %s.id, pid = s.pid, "a QEMU of this node runs a VM it has no record of; left running for ops to decide");
        }
        Self {
            ctx,
            vms: Mutex::new(vms),
            preparing: Mutex::new(HashMap::new()),
            deleted: Mutex::new(Deleted::default()),
            strays,
        }
    }

    fn preps(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Prep>> {
        self.preparing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, id: VmId, p: &Prep) {
        let _ = self.ctx.events.try_send(VmEvent {
            id,
            name: p.name.clone(),
            status: VmStatus {
                state: p.state.clone(),
                pid: None,
                startup: None,
                since_ms: now_millis(),
                intent: p.intent,
                generation: p.generation,
            },
        });
    }

    fn prep_info(id: VmId, p: &Prep) -> VmInfo {
        VmInfo {
            id,
            name: p.name.clone(),
            state: p.state.clone(),
            pid: None,
            intent: p.intent,
            generation: p.generation,
        }
    }

    /// Where an intent for `id` goes: its actor, a preparation under way, or a new
    /// preparation claimed by the caller. Never two preparations of one VM at once.
    pub fn begin(
        &self,
        id: VmId,
        name: &str,
        desired: Desired,
        intent: Generation,
        stop_grace_ms: u32,
    ) -> Begin {
        let mut preps = self.preps();
        if let Some(h) = self.get(id) {
            return Begin::Actor(h);
        }
        if self.was_deleted(id) {
            return Begin::Deleted;
        }
        if let Some(p) = preps.get_mut(&id) {
            let newer = intent > p.intent;
            if newer {
                p.desired = desired;
                p.intent = intent;
                p.stop_grace_ms = stop_grace_ms;
            }
            let retry = newer && matches!(p.state, VmState::Failed(_));
            if retry {
                p.state = VmState::Creating;
            }
            if newer {
                p.generation = self.ctx.clock.next();
                self.emit(id, p);
            }
            let info = Self::prep_info(id, p);
            return if retry {
                Begin::Claimed(info)
            } else {
                Begin::Joined(info)
            };
        }
        let (done, _) = watch::channel(false);
        let p = Prep {
            name: name.to_string(),
            desired,
            intent,
            stop_grace_ms,
            state: VmState::Creating,
            generation: self.ctx.clock.next(),
            cancelled: false,
            done,
        };
        self.emit(id, &p);
        let info = Self::prep_info(id, &p);
        preps.insert(id, p);
        Begin::Claimed(info)
    }

    /// Ends a preparation claimed with [`VmManager::begin`]: the VM is recorded and its actor
    /// started as the latest intent says, or the failure is kept and reported; either way
    /// the directory the preparation made goes if the VM is not kept.
    pub async fn finish(
        &self,
        id: VmId,
        made: Result<Prepared, String>,
        own_dir: bool,
    ) -> Result<(), String> {
        let paths = VmPaths::new(&self.ctx.data_dir, id);
        let (desired, intent, grace, cancelled) = match self.preps().get(&id) {
            Some(p) => (p.desired, p.intent, p.stop_grace_ms, p.cancelled),
            None => return Err(format!("no preparation of VM {id} under way")),
        };
        let made = match made {
            Ok(m) if !cancelled => Ok(m),
            Ok(_) => Err(None),
            Err(e) => Err(Some(e)),
        };
        let result = match made {
            Ok(Prepared { spec, ports, seed }) => {
                let rec = VmRecord {
                    spec,
                    desired,
                    intent,
                    stop_grace_ms: grace,
                    created_at_ms: now_millis(),
                    ports,
                    seed,
                };
                match actor::save_record(&rec, &paths).await {
                    Ok(()) => Ok(rec),
                    Err(e) => Err(Some(format!("cannot record the VM: {e}"))),
                }
            }
            Err(e) => Err(e),
        };
        let reason = {
            let mut preps = self.preps();
            let Some(p) = preps.get_mut(&id) else {
                return Err(format!("the preparation of VM {id} vanished"));
            };
            match result {
                Ok(mut rec) if !p.cancelled => {
                    // Intents taken while the record was written.
                    rec.desired = p.desired;
                    rec.intent = p.intent;
                    rec.stop_grace_ms = p.stop_grace_ms;
                    let _ = std::fs::remove_file(paths.dir.join(PREPARING_MARKER));
                    let handle = actor::spawn(self.ctx.clone(), rec, None);
                    self.lock().insert(id, handle);
                    if let Some(p) = preps.remove(&id) {
                        p.done.send_replace(true);
                    }
                    return Ok(());
                }
                Err(Some(e)) => Some(e),
                _ => None,
            }
        };
        // Only what this preparation made: the slot guarantees nobody else made it.
        let removed = if own_dir {
            actor::remove_vm_dir(paths.dir.clone()).await
        } else {
            Ok(())
        };
        let mut preps = self.preps();
        let Some(p) = preps.get_mut(&id) else {
            return Err(format!("the preparation of VM {id} vanished"));
        };
        match reason {
            Some(e) if !p.cancelled => {
                p.state = VmState::failed(e.clone());
                p.generation = self.ctx.clock.next();
                self.emit(id, p);
                p.done.send_replace(true);
                Err(e)
            }
            _ => {
                if let Some(p) = preps.remove(&id) {
                    p.done.send_replace(true);
                }
                removed
            }
        }
    }

    /// Cancels the preparation of `id`, if any. Returns a receiver that turns true once it
    /// has ended and cleaned up; `None` when there is no preparation under way (a failed one
    /// is forgotten at once: it has cleaned up already).
    pub fn cancel(&self, id: VmId) -> Option<watch::Receiver<bool>> {
        let mut preps = self.preps();
        let p = preps.get_mut(&id)?;
        if matches!(p.state, VmState::Failed(_)) {
            preps.remove(&id);
            return None;
        }
        p.cancelled = true;
        Some(p.done.subscribe())
    }

    /// Every VM and its state, preparations included, each as a fresh observation; the
    /// report's own generation is taken first, so every VM it lists is at least as new.
    pub fn report(&self) -> zy_common::proto::VmReport {
        let generation = self.ctx.clock.next();
        let preps = self.preps();
        let mut out: Vec<VmInfo> = preps
            .iter()
            .map(|(id, p)| VmInfo {
                generation: self.ctx.clock.next(),
                ..Self::prep_info(*id, p)
            })
            .collect();
        for h in self.list() {
            let s = h.status.borrow().clone();
            out.push(VmInfo {
                id: h.id,
                name: h.name.clone(),
                state: s.state,
                pid: s.pid.map(|p| p as u32),
                intent: s.intent,
                generation: self.ctx.clock.next(),
            });
        }
        zy_common::proto::VmReport {
            generation,
            vms: out,
        }
    }

    /// QEMU processes found at start that no record names.
    pub fn strays(&self) -> &[Stray] {
        &self.strays
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, VmHandle>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a VM from a spec whose disks already exist, through the same preparation
    /// slot and [`VmManager::finish`] as a hand-over (used where nothing needs fetching, as
    /// in tests): recorded, and its actor started (which starts it when `desired` says so).
    pub async fn create(
        &self,
        spec: VmSpec,
        ports: Vec<(String, crate::netdev::Segment)>,
        desired: Desired,
        intent: Generation,
    ) -> Result<VmHandle, CreateError> {
        spec.validate()?;
        let id = spec.id;
        let grace = super::record::DEFAULT_STOP_GRACE_MS;
        match self.begin(id, &spec.name, desired, intent, grace) {
            Begin::Claimed(_) => {}
            Begin::Actor(_) | Begin::Joined(_) | Begin::Deleted => {
                return Err(CreateError::Exists(id))
            }
        }
        let paths = VmPaths::new(&self.ctx.data_dir, id);
        // A failure removes the directory only if this call made it.
        let own_dir = !paths.dir.exists();
        let made = std::fs::create_dir_all(&paths.dir).map_err(|source| CreateError::Files {
            path: paths.dir.display().to_string(),
            source,
        });
        let result = match made {
            Ok(()) => {
                let prepared = Prepared {
                    spec,
                    ports,
                    seed: None,
                };
                self.finish(id, Ok(prepared), own_dir).await
            }
            Err(e) => {
                let _ = self.finish(id, Err(e.to_string()), false).await;
                return Err(e);
            }
        };
        result.map_err(CreateError::Failed)?;
        self.get(id)
            .ok_or(CreateError::Failed(format!("VM {id} vanished")))
    }

    /// Remembers that this node deleted `id`.
    pub fn mark_deleted(&self, id: VmId) {
        let mut d = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        if d.ids.insert(id) {
            d.order.push_back(id);
            if d.order.len() > DELETED_KEPT {
                if let Some(old) = d.order.pop_front() {
                    d.ids.remove(&old);
                }
            }
        }
    }

    /// Whether this node deleted `id`.
    pub fn was_deleted(&self, id: VmId) -> bool {
        self.deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .contains(&id)
    }

    /// A VM's handle.
    pub fn get(&self, id: VmId) -> Option<VmHandle> {
        self.lock().get(&id).cloned()
    }

    /// Every VM's handle.
    pub fn list(&self) -> Vec<VmHandle> {
        self.lock().values().cloned().collect()
    }

    /// The data directory the VMs live under.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.ctx.data_dir
    }

    /// Removes what the supervisor kept for VM `id` (a cgroup, a failed unit), whose QEMU
    /// is gone.
    pub async fn cleanup_supervisor(&self, id: VmId) {
        self.ctx.runner.cleanup(id).await;
    }

    /// Forgets a deleted VM.
    pub fn forget(&self, id: VmId) {
        self.lock().remove(&id);
    }

    /// What runs the node's VMs.
    pub fn runner(&self) -> &std::sync::Arc<dyn super::runner::VmRunner> {
        &self.ctx.runner
    }

    /// The node's migrations.
    pub fn migrations(&self) -> &std::sync::Arc<super::migration::Migrations> {
        &self.ctx.migrations
    }

    /// Makes a VM that arrived by migration and runs here an ordinary VM of the node
    /// (its record written by the caller): its actor takes its QEMU. A VM deleted here
    /// before (one that migrated away and now comes back) is no longer deleted.
    pub fn adopt(
        &self,
        rec: VmRecord,
        live: Box<dyn super::runner::RunningVm>,
    ) -> Result<VmHandle, CreateError> {
        let id = rec.spec.id;
        let preps = self.preps();
        if preps.contains_key(&id) || self.lock().contains_key(&id) {
            return Err(CreateError::Exists(id));
        }
        {
            let mut d = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
            if d.ids.remove(&id) {
                d.order.retain(|v| *v != id);
            }
        }
        let h = actor::spawn(self.ctx.clone(), rec, Some(live));
        self.lock().insert(id, h.clone());
        drop(preps);
        Ok(h)
    }

    /// Whether the node has `id` as a VM or a preparation.
    pub fn knows(&self, id: VmId) -> bool {
        self.preps().contains_key(&id) || self.lock().contains_key(&id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use zy_common::vm::{Desired, Generation};
    use zy_common::VmId;

    use super::{Begin, VmManager, PREPARING_MARKER};
    use crate::fake::{self, FakeRunner, TempDir};
    use crate::vm::actor::Request;
    use crate::vm::spec::VmPaths;

    /// Every observation the node makes is newer than the last: within a report (whose
    /// own generation comes first), from report to report, in each VM's events, and
    /// across an agent restart.
    #[tokio::test(start_paused = true)]
    async fn observed_generations_only_increase() {
        let tmp = TempDir::new("manager");
        let runner = FakeRunner::default();
        let (ctx, mut events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx).await;
        let a = m
            .create(fake::spec("a"), vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        let b = VmId::new_random();
        assert!(matches!(
            m.begin(b, "b", Desired::Running, Generation(1), 1000),
            Begin::Claimed(_)
        ));
        let mut status = a.status.clone();
        fake::until(&mut status, "running", |s| s.state.name() == "running").await;

        let mut last = Generation(0);
        let check = |r: zy_common::proto::VmReport, last: &mut Generation| {
            assert!(r.generation > *last, "{r:?} after {last}");
            assert_eq!(r.vms.len(), 2, "{r:?}");
            for v in &r.vms {
                assert!(v.generation > r.generation, "{v:?} in {r:?}");
                *last = (*last).max(v.generation);
            }
        };
        check(m.report(), &mut last);
        a.send(Request::Intent {
            desired: Desired::Stopped,
            generation: Generation(2),
            stop_grace_ms: 0,
        })
        .unwrap();
        fake::until(&mut status, "stopped", |s| s.state.name() == "stopped").await;
        check(m.report(), &mut last);
        check(m.report(), &mut last);

        let mut per_vm: HashMap<VmId, Generation> = HashMap::new();
        while let Ok(e) = events.try_recv() {
            let before = per_vm.insert(e.id, e.status.generation);
            assert!(before < Some(e.status.generation), "{e:?} after {before:?}");
        }
        assert!(per_vm.values().all(|g| *g < last));

        // A restarted agent starts above everything the last one said.
        drop(a);
        drop(m);
        fake::ended(status).await;
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx).await;
        let r = m.report();
        assert!(r.generation > last, "{r:?} after {last}");
    }

    /// A directory a preparation was making when the agent stopped is removed at start;
    /// one without the preparation's marker is not ours to remove.
    #[tokio::test(start_paused = true)]
    async fn a_preparation_cut_short_by_a_restart_leaves_nothing() {
        let tmp = TempDir::new("manager");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let (half, other) = (VmId::new_random(), VmId::new_random());
        let half = VmPaths::new(&tmp.0, half);
        let other = VmPaths::new(&tmp.0, other);
        std::fs::create_dir_all(&half.dir).unwrap();
        std::fs::write(half.dir.join(PREPARING_MARKER), b"").unwrap();
        std::fs::write(half.dir.join("disk0.qcow2"), b"half").unwrap();
        std::fs::create_dir_all(&other.dir).unwrap();
        std::fs::write(other.dir.join("precious"), b"x").unwrap();
        let m = VmManager::recover(ctx).await;
        assert!(!half.dir.exists());
        assert!(other.dir.join("precious").exists());
        assert!(m.list().is_empty());
        assert!(m.report().vms.is_empty());
    }

    /// One preparation per VM: a second hand-over joins it and a newer intent updates it;
    /// once failed, only a newer intent tries again.
    #[tokio::test(start_paused = true)]
    async fn one_preparation_per_vm() {
        let tmp = TempDir::new("manager");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx).await;
        let id = VmId::new_random();
        let begin = |g| m.begin(id, "w", Desired::Running, Generation(g), 1000);
        assert!(matches!(begin(1), Begin::Claimed(_)));
        assert!(matches!(begin(1), Begin::Joined(i) if i.intent == Generation(1)));
        assert!(matches!(begin(2), Begin::Joined(i) if i.intent == Generation(2)));
        assert!(m.finish(id, Err("no image".into()), false).await.is_err());
        let r = m.report();
        assert_eq!(r.vms[0].state.name(), "failed");
        assert!(matches!(begin(2), Begin::Joined(i) if i.state.name() == "failed"));
        assert!(matches!(begin(3), Begin::Claimed(i) if i.state.name() == "creating"));
    }
}
