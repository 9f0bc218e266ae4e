//! One task per VM owns its state and its QEMU process; everything else talks to it through
//! a small bounded channel. A dispatcher that finds the channel full answers "busy" at once,
//! so one stuck VM (a QEMU that ignores QMP) never stalls the node.
//!
//! The actor takes *intents*: "be running (or stopped) as of desired generation g". An
//! intent of a generation the actor already holds, or an older one, is a no-op; a newer one
//! is recorded on disk before it is acted on, so that an agent restarted in between carries
//! it out. Every state the actor publishes carries a fresh observed generation.
//!
//! ```text
//!   intent(g) --g <= held--> ignored
//!      |
//!      +-- g > held --> record (desired, g) --> start / stop as desired
//!   delete --> stop (no grace: the disk goes) --> remove the VM's directory --> end
//!   migrate out --> the engine runs here, on the actor's QEMU; requests wait until it
//!                   ends (the node answers intents `Busy` meanwhile); progress goes to
//!                   the migration ([`super::migration`]), an event at least once a second
//! ```
//!
//! A migration that completed leaves the guest paused; the actor records that in the VM's
//! directory ([`super::migration::MIGRATED_OUT`]) before it reports it, and an actor that
//! starts (after an agent restart) and finds it never starts or resumes the guest on its
//! own: only an abort ([`Request::Resume`]) or a finish (a [`Request::Delete`]) ends that.
//! A migration found under way in a QEMU it re-attaches to is undone (the guest runs on).

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};
use zy_common::time::now_millis;
use zy_common::vm::{Desired, Generation, VmState};
use zy_common::VmId;

use super::migrate::{MigrateError, OutgoingPlan, Progress};
use super::migration::{self, Migration, Migrations, MIGRATED_OUT};
use super::observed::ObservedClock;
use super::record::VmRecord;
use super::runner::{self, Exit, Recovered, RunningVm, StopHow, VmRunner};
use super::spec::VmPaths;
use crate::netdev::Networks;

/// Requests an actor takes.
#[derive(Debug)]
pub enum Request {
    /// Be as desired, as of `generation`; ignored unless newer than what the actor holds.
    Intent {
        desired: Desired,
        generation: Generation,
        stop_grace_ms: u32,
    },
    /// Stops the VM if it runs and removes every file of it. Answers once the files are
    /// gone, or with why they could not be removed.
    Delete(oneshot::Sender<Result<(), String>>),
    /// Migrates the VM out (it must run); answers once the engine has started, then reports
    /// through `migration`.
    MigrateOut {
        migration: Arc<Migration>,
        plan: Box<OutgoingPlan>,
        sizes: Vec<u64>,
        started: oneshot::Sender<Result<(), String>>,
    },
    /// After a completed migration that is aborted: the guest runs here again (resumed, or
    /// started from its disks if its QEMU is gone).
    Resume(oneshot::Sender<Result<(), String>>),
}

/// A VM's state as its actor last published it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmStatus {
    pub state: VmState,
    pub pid: Option<i32>,
    pub startup: Option<Duration>,
    pub since_ms: u64,
    /// The desired generation the actor holds.
    pub intent: Generation,
    /// This status's observed generation.
    pub generation: Generation,
}

/// A state change, for the link to report.
#[derive(Clone, Debug, PartialEq)]
pub struct VmEvent {
    pub id: VmId,
    pub name: String,
    pub status: VmStatus,
}

impl VmEvent {
    /// The event as the wire carries it.
    pub fn info(&self) -> zy_common::proto::VmInfo {
        zy_common::proto::VmInfo {
            id: self.id,
            name: self.name.clone(),
            state: self.status.state.clone(),
            pid: self.status.pid.map(|p| p as u32),
            intent: self.status.intent,
            generation: self.status.generation,
        }
    }
}

/// What every actor shares.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub data_dir: PathBuf,
    /// State changes; full means the link is away and the coordinator will get the whole
    /// picture on reconnect anyway, so events are dropped rather than waited for.
    pub events: mpsc::Sender<VmEvent>,
    /// Joins taps to their networks (none on a host without netlink).
    pub networks: Option<Arc<dyn Networks>>,
    /// Runs the VMs: QEMU under systemd or the agent itself.
    pub runner: Arc<dyn VmRunner>,
    /// Numbers every observation.
    pub clock: Arc<ObservedClock>,
    /// The node's live migrations, one per VM.
    pub migrations: Arc<Migrations>,
}

/// How others reach a VM's actor.
#[derive(Clone, Debug)]
pub struct VmHandle {
    pub id: VmId,
    pub name: String,
    tx: mpsc::Sender<Request>,
    pub status: watch::Receiver<VmStatus>,
}

/// The actor's queue is full.
#[derive(Debug, thiserror::Error)]
#[error("VM {0} is busy with earlier requests; try again")]
pub struct Busy(pub VmId);

impl VmHandle {
    /// Hands a request to the actor without waiting for room.
    pub fn send(&self, r: Request) -> Result<(), Busy> {
        self.tx.try_send(r).map_err(|_| Busy(self.id))
    }

    /// Whether the actor has ended (its VM deleted).
    pub fn ended(&self) -> bool {
        self.tx.is_closed()
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.status.borrow().state.clone()
    }
}

/// Starts a VM's actor. `live` is its QEMU if one was found running.
pub fn spawn(ctx: Ctx, rec: VmRecord, live: Option<Box<dyn RunningVm>>) -> VmHandle {
    let (tx, rx) = mpsc::channel(4);
    let initial = VmStatus {
        state: if live.is_some() {
            VmState::Running
        } else {
            VmState::Stopped
        },
        pid: live.as_ref().map(|l| l.pid()),
        startup: None,
        since_ms: now_millis(),
        intent: rec.intent,
        generation: ctx.clock.next(),
    };
    let (state_tx, state_rx) = watch::channel(initial);
    let id = rec.spec.id;
    let name = rec.spec.name.clone();
    tokio::spawn(
        Actor {
            ctx,
            rec,
            live,
            state: state_tx,
        }
        .run(rx),
    );
    VmHandle {
        id,
        name,
        tx,
        status: state_rx,
    }
}

/// Writes a VM's record off the runtime thread (it fsyncs).
pub async fn save_record(rec: &VmRecord, paths: &VmPaths) -> Result<(), String> {
    let (rec, paths) = (rec.clone(), paths.clone());
    tokio::task::spawn_blocking(move || rec.save(&paths).map_err(|e| zy_common::error::chain(&e)))
        .await
        .map_err(|e| format!("the record writer failed: {e}"))?
}

struct Actor {
    ctx: Ctx,
    rec: VmRecord,
    live: Option<Box<dyn RunningVm>>,
    state: watch::Sender<VmStatus>,
}

impl Actor {
    fn paths(&self) -> VmPaths {
        VmPaths::new(&self.ctx.data_dir, self.rec.spec.id)
    }

    fn set(&self, state: VmState) {
        let status = VmStatus {
            state,
            pid: self.live.as_ref().map(|l| l.pid()),
            startup: self.live.as_ref().map(|l| l.startup()),
            since_ms: now_millis(),
            intent: self.rec.intent,
            generation: self.ctx.clock.next(),
        };
        info!(vm = %self.rec.spec.id, name = %self.rec.spec.name, state = %status.state, "VM state");
        let _ = self.ctx.events.try_send(VmEvent {
            id: self.rec.spec.id,
            name: self.rec.spec.name.clone(),
            status: status.clone(),
        });
        self.state.send_replace(status);
    }

    /// Records what the VM should be (by the agent's own decision, as when the guest
    /// powers itself off: the generation stays).
    async fn want(&mut self, desired: Desired) {
        if self.rec.desired != desired {
            self.rec.desired = desired;
            if let Err(e) = save_record(&self.rec, &self.paths()).await {
                warn!(vm = %self.rec.spec.id, error = %e, "cannot record the VM's desired state");
            }
        }
    }

    /// Takes an intent if it is newer than the one held: recorded first, then acted on.
    async fn intent(&mut self, desired: Desired, generation: Generation, grace_ms: u32) {
        if generation <= self.rec.intent {
            return;
        }
        let before = self.rec.clone();
        self.rec.desired = desired;
        self.rec.intent = generation;
        self.rec.stop_grace_ms = grace_ms;
        if let Err(e) = save_record(&self.rec, &self.paths()).await {
            // Not taken: the coordinator sees the old generation and sends it again.
            warn!(vm = %self.rec.spec.id, error = %e, "cannot record an intent; it is not taken");
            self.rec = before;
            return;
        }
        info!(vm = %self.rec.spec.id, desired = desired.as_str(), %generation, "intent taken");
        match (desired, self.live.is_some()) {
            (Desired::Running, false) => {
                let _ = self.start().await;
            }
            (Desired::Stopped, true) => {
                self.halt(Duration::from_millis(grace_ms.into())).await;
            }
            // Already as desired: say so with the new generation.
            _ => {
                let state = self.state.borrow().state.clone();
                self.set(state);
            }
        }
    }

    async fn start(&mut self) -> Result<(), String> {
        self.set(VmState::Starting);
        if let Some(seed) = self.rec.seed.clone() {
            // A seed lost from the VM's directory is written again from the record: the
            // guest's cloud-init sees the same instance, keys and user-data.
            let path = self.paths().dir.join(super::seed::SEED_FILE);
            let made = tokio::task::spawn_blocking(move || match path.try_exists() {
                Ok(true) => Ok(false),
                _ => seed.write(&path).map(|()| true),
            })
            .await;
            match made {
                Ok(Ok(true)) => {
                    warn!(vm = %self.rec.spec.id, "the cloud-init seed was missing; written again")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    let reason = format!("cannot write its missing cloud-init seed: {e}");
                    self.set(VmState::failed(reason.clone()));
                    return Err(reason);
                }
                Err(e) => {
                    let reason = format!("cannot write its missing cloud-init seed: {e}");
                    self.set(VmState::failed(reason.clone()));
                    return Err(reason);
                }
            }
        }
        let launched = self.ctx.runner.start(&self.rec.spec, &self.paths()).await;
        match launched {
            Ok(l) => {
                self.live = Some(l);
                if let Err(e) = self.plug().await {
                    // A VM without its network is not what was asked for.
                    self.halt(Duration::from_secs(5)).await;
                    let reason = format!("cannot join its network: {e}");
                    self.set(VmState::failed(reason.clone()));
                    return Err(reason);
                }
                self.set(VmState::Running);
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                self.set(VmState::failed(reason.clone()));
                Err(reason)
            }
        }
    }

    /// Joins each tap (made by QEMU) to its network; idempotent.
    async fn plug(&self) -> Result<(), crate::netdev::NetdevError> {
        match &self.ctx.networks {
            Some(n) => n.join(&self.rec.ports).await,
            None => Ok(()),
        }
    }

    /// Removes networks no VM uses any more (the taps went with QEMU).
    async fn unplug(&self) {
        let Some(n) = &self.ctx.networks else { return };
        for e in n.leave(&self.rec.ports).await {
            warn!(vm = %self.rec.spec.id, error = %e, "cannot release a network");
        }
    }

    /// At start: what a migration left. Returns true when a completed migration holds the
    /// VM (its guest must not run here unless the migration is aborted).
    async fn recover_migration(&mut self) -> bool {
        let id = self.rec.spec.id;
        let marker = self.paths().dir.join(MIGRATED_OUT);
        let completed = migration::read_marker(&marker);
        let found = match self.live.as_mut() {
            Some(l) => l.recover_migration(&self.rec.spec).await,
            None => Recovered::Nothing,
        };
        let live = self.live.is_some();
        match (found, completed, live) {
            // Paused after a migration it recorded as completed, or its QEMU gone since:
            // the VM may run on the destination by now.
            (Recovered::Completed, Some(m), _) | (Recovered::Nothing, Some(m), false) => {
                // The manager holds it as completed already (before any command is taken).
                warn!(vm = %id, migration = %m, "this VM migrated away before the agent restarted; it stays paused here until the coordinator finishes or aborts the migration");
                true
            }
            (Recovered::Completed, _, _) => {
                // Completed but never recorded, so never reported, so never activated
                // there: it runs here again.
                warn!(vm = %id, "a migration completed but was never recorded before the agent restarted; resuming the guest here");
                if let Some(l) = self.live.as_mut() {
                    if let Err(e) = l.resume().await {
                        warn!(vm = %id, error = %e, "cannot resume the guest");
                    }
                }
                let _ = std::fs::remove_file(&marker);
                false
            }
            (_, completed, _) => {
                // Undone, or resumed by an abort whose marker was left: it runs on (the
                // destination was aborted before that abort, so it cannot run there too).
                let _ = std::fs::remove_file(&marker);
                if let Some(m) = completed {
                    if let Some(h) = self.ctx.migrations.get(id).filter(|h| h.id == m) {
                        h.update(|s| s.phase = zy_common::proto::MigrationPhase::Cancelled);
                    }
                }
                false
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        if self.live.is_some() {
            if let Err(e) = self.plug().await {
                warn!(vm = %self.rec.spec.id, error = %e, "re-attached VM cannot rejoin its network");
            }
        }
        if self.recover_migration().await {
            // Paused (or gone) after a completed migration: neither started nor stopped
            // until the coordinator finishes or aborts it.
        } else {
            self.reconcile().await;
        }
        loop {
            let req = match self.live.as_mut() {
                // The agent is stopping: the VM's state stays as it is (QEMU keeps running
                // and is re-attached later).
                None => match rx.recv().await {
                    None => return,
                    Some(r) => r,
                },
                Some(live) => tokio::select! {
                    req = rx.recv() => match req {
                        None => return,
                        Some(r) => r,
                    },
                    status = live.exited() => {
                        self.exited(status).await;
                        continue;
                    }
                },
            };
            if !self.handle(req, &mut rx).await {
                return;
            }
        }
    }

    /// Carries out one request; false when the actor is to end.
    async fn handle(&mut self, req: Request, rx: &mut mpsc::Receiver<Request>) -> bool {
        match req {
            Request::Intent {
                desired,
                generation,
                stop_grace_ms,
            } => self.intent(desired, generation, stop_grace_ms).await,
            Request::Delete(reply) => {
                // Its disk is about to be discarded: no need to wait for the guest.
                if self.live.is_some() {
                    self.halt(Duration::ZERO).await;
                }
                let _ = reply.send(self.delete().await);
                return false;
            }
            Request::MigrateOut {
                migration,
                plan,
                sizes,
                started,
            } => {
                return Box::pin(self.migrate_out(migration, *plan, sizes, started, rx)).await;
            }
            Request::Resume(done) => {
                let r = self.resume().await;
                let _ = done.send(r);
            }
        }
        true
    }

    /// Runs the engine on this VM's QEMU until the migration ends; requests that come
    /// meanwhile wait (and are carried out after). False when the agent stops meanwhile
    /// (the engine is dropped mid-way: the next agent finds and undoes what it left).
    async fn migrate_out(
        &mut self,
        m: Arc<Migration>,
        plan: OutgoingPlan,
        sizes: Vec<u64>,
        started: oneshot::Sender<Result<(), String>>,
        rx: &mut mpsc::Receiver<Request>,
    ) -> bool {
        let Some(live) = self.live.as_mut() else {
            let why = format!("VM {} does not run on this node", self.rec.spec.id);
            m.update(|s| {
                s.phase = zy_common::proto::MigrationPhase::Failed {
                    reason: why.clone(),
                }
            });
            let _ = started.send(Err(why));
            return true;
        };
        let _ = started.send(Ok(()));
        let spec = self.rec.spec.clone();
        let m2 = m.clone();
        let mut progress = move |p: Progress| m2.update(|s| migration::apply(s, &p));
        let mut deferred = Vec::new();
        let mut agent_stops = false;
        let result = {
            let fut = live.migrate_out(&spec, &plan, &sizes, &m.cancel, &mut progress);
            tokio::pin!(fut);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    r = &mut fut => break Some(r),
                    _ = tick.tick() => m.emit(),
                    req = rx.recv(), if !agent_stops => match req {
                        Some(r) => deferred.push(r),
                        None => agent_stops = true,
                    },
                }
                if agent_stops {
                    break None;
                }
            }
        };
        let Some(result) = result else {
            return false;
        };
        use zy_common::proto::MigrationPhase;
        match result {
            Ok(o) => {
                // Recorded before it is reported: a restarted agent must not run the guest.
                let marker = self.paths().dir.join(MIGRATED_OUT);
                let id = m.id;
                let recorded =
                    tokio::task::spawn_blocking(move || migration::write_marker(&marker, id))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                match recorded {
                    Ok(()) => {
                        info!(vm = %spec.id, downtime_ms = o.downtime_ms, total_ms = o.total_ms, "migration completed; the guest stays paused here");
                        m.update(|s| {
                            s.phase = MigrationPhase::Completed {
                                downtime_ms: o.downtime_ms,
                                total_ms: o.total_ms,
                            }
                        });
                    }
                    Err(e) => {
                        // Never reported completed, so never activated there: it runs here.
                        let reason = format!("cannot record the completed migration: {e}");
                        warn!(vm = %spec.id, %reason, "resuming the guest here");
                        if let Some(l) = self.live.as_mut() {
                            if let Err(e) = l.resume().await {
                                warn!(vm = %spec.id, error = %e, "cannot resume the guest");
                            }
                        }
                        m.update(|s| s.phase = MigrationPhase::Failed { reason });
                    }
                }
            }
            Err(MigrateError::Cancelled) => m.update(|s| s.phase = MigrationPhase::Cancelled),
            Err(e) => {
                let reason = zy_common::error::chain(&e);
                warn!(vm = %spec.id, %reason, "migration failed; the VM runs on here");
                m.update(|s| s.phase = MigrationPhase::Failed { reason });
            }
        }
        for r in deferred {
            if !Box::pin(self.handle(r, rx)).await {
                return false;
            }
        }
        true
    }

    /// The guest runs here again after an aborted migration that had completed.
    async fn resume(&mut self) -> Result<(), String> {
        let r = match self.live.as_mut() {
            Some(l) => l.resume().await.map_err(|e| zy_common::error::chain(&e)),
            // QEMU went meanwhile: the disks are as the migration left them, whole.
            None if self.rec.desired == Desired::Running => self.start().await,
            None => Ok(()),
        };
        if r.is_ok() {
            let marker = self.paths().dir.join(MIGRATED_OUT);
            if let Err(e) = std::fs::remove_file(&marker) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(vm = %self.rec.spec.id, error = %e, "cannot remove the completed migration's marker");
                }
            }
            let state = if self.live.is_some() {
                VmState::Running
            } else {
                self.state.borrow().state.clone()
            };
            self.set(state);
        }
        r
    }

    /// Starts what should run and does not, and stops what runs but should not (an agent
    /// killed in the middle of a stop re-attaches to a QEMU whose intent, already taken and
    /// recorded, says stopped: nobody would send it again).
    async fn reconcile(&mut self) {
        match (self.live.is_some(), self.rec.desired) {
            (false, Desired::Running) => {
                let _ = self.start().await;
            }
            (true, Desired::Stopped) => {
                info!(vm = %self.rec.spec.id, "re-attached VM should be stopped; stopping it");
                let grace = Duration::from_millis(self.rec.stop_grace_ms.into());
                self.halt(grace).await;
            }
            _ => {}
        }
    }

    /// Stops QEMU (the desired state is the caller's to record).
    async fn halt(&mut self, grace: Duration) -> StopHow {
        self.set(VmState::Stopping);
        let how = match self.live.as_mut() {
            Some(l) => l.stop(grace).await,
            None => StopHow::AlreadyGone,
        };
        self.live = None;
        self.unplug().await;
        self.ctx.runner.cleanup(self.rec.spec.id).await;
        self.set(VmState::Stopped);
        how
    }

    /// QEMU is gone without being asked: the guest powered off, or QEMU died.
    async fn exited(&mut self, status: Option<String>) {
        let Some(l) = self.live.take() else {
            return;
        };
        let exit = l.ended(status).await;
        self.unplug().await;
        self.ctx.runner.cleanup(self.rec.spec.id).await;
        let (status, guest_panicked) = match exit {
            Exit::GuestPoweroff => {
                // The guest chose to be off: it stays off across agent restarts until the
                // next intent says otherwise.
                self.want(Desired::Stopped).await;
                self.set(VmState::Stopped);
                return;
            }
            Exit::GuestPanic(status) => (status, true),
            Exit::Died(status) => (status, false),
        };
        let tail = runner::console_tail(&self.paths().console_log(), 10).join(" | ");
        let how = status.unwrap_or_else(|| "it exited".to_string());
        let what = if guest_panicked {
            // The first line of the oops says most; the tail is mostly its stack trace.
            let first = runner::console_tail(&self.paths().console_log(), 80)
                .into_iter()
                .find(|l| {
                    ["Kernel panic", "Oops", "BUG:", "sysrq: Trigger"]
                        .iter()
                        .any(|m| l.contains(m))
                });
            match first {
                Some(l) => format!("the guest's kernel panicked: {}", l.trim()),
                None => "the guest's kernel panicked".to_string(),
            }
        } else {
            "QEMU died".to_string()
        };
        self.set(VmState::failed(format!(
            "{what} ({how}); last console lines: {tail}"
        )));
    }

    async fn delete(&mut self) -> Result<(), String> {
        remove_vm_dir(self.paths().dir).await
    }
}

/// Removes a VM's directory off the runtime thread; one already gone is fine.
pub async fn remove_vm_dir(dir: PathBuf) -> Result<(), String> {
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
    })
    .await
    .map_err(|e| format!("the remover failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use zy_common::vm::{Desired, Generation, VmState};

    use super::{Request, VmHandle, VmStatus};
    use crate::fake::{self, Ending, FakeNetworks, FakeRunner, TempDir};
    use crate::vm::manager::VmManager;
    use crate::vm::record::VmRecord;
    use crate::vm::spec::VmPaths;

    fn intent(desired: Desired, g: u64) -> Request {
        Request::Intent {
            desired,
            generation: Generation(g),
            stop_grace_ms: 1000,
        }
    }

    fn failure(s: VmStatus) -> String {
        match s.state {
            VmState::Failed(r) => r,
            other => panic!("{other} is not a failure"),
        }
    }

    async fn state(h: &VmHandle, name: &str) -> VmStatus {
        let mut rx = h.status.clone();
        fake::until(&mut rx, name, |s| s.state.name() == name).await
    }

    /// A newer intent is acted on; a repeated or older one changes nothing, not even the
    /// observed generation (it is not news).
    #[tokio::test(start_paused = true)]
    async fn an_older_or_repeated_intent_is_a_no_op() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx).await;
        let s = fake::spec("w1");
        let id = s.id;
        let h = m
            .create(s, vec![], Desired::Stopped, Generation(1))
            .await
            .unwrap();
        fake::settle().await;
        assert_eq!(h.state(), VmState::Stopped);
        assert_eq!(runner.starts(id), 0);

        h.send(intent(Desired::Running, 2)).unwrap();
        let running = state(&h, "running").await;
        assert_eq!(running.intent, Generation(2));
        assert_eq!(runner.starts(id), 1);

        // The same intent again, and an older one that says otherwise.
        h.send(intent(Desired::Running, 2)).unwrap();
        h.send(intent(Desired::Stopped, 1)).unwrap();
        fake::settle().await;
        assert_eq!(*h.status.borrow(), running, "nothing changed");
        assert_eq!(runner.starts(id), 1);
        assert!(runner.stops(id).is_empty());
        let rec = VmRecord::load(&VmPaths::new(m.data_dir(), id).record()).unwrap();
        assert_eq!((rec.desired, rec.intent), (Desired::Running, Generation(2)));

        // A newer one is taken, with its grace.
        h.send(intent(Desired::Stopped, 3)).unwrap();
        let stopped = state(&h, "stopped").await;
        assert_eq!(stopped.intent, Generation(3));
        assert!(stopped.generation > running.generation);
        assert_eq!(runner.stops(id), vec![Duration::from_millis(1000)]);
    }

    /// A guest's own poweroff is recorded as the VM's desired state, so a restarted agent
    /// does not start it again.
    #[tokio::test(start_paused = true)]
    async fn a_guest_that_powers_itself_off_stays_stopped_across_an_agent_restart() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx.clone()).await;
        let s = fake::spec("w1");
        let id = s.id;
        let h = m
            .create(s, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        state(&h, "running").await;
        runner.exit(id, Some("exit status: 0"), Ending::Poweroff);
        state(&h, "stopped").await;
        assert_eq!(runner.cleanups(id), 1);

        // The agent stops and starts again.
        let status = h.status.clone();
        drop((h, m));
        fake::ended(status).await;
        let m = VmManager::recover(ctx).await;
        let h = m.get(id).unwrap();
        fake::settle().await;
        assert_eq!(h.state(), VmState::Stopped);
        assert_eq!(h.status.borrow().intent, Generation(1));
        assert_eq!(runner.starts(id), 1, "not started again");

        // A newer intent starts it.
        h.send(intent(Desired::Running, 2)).unwrap();
        state(&h, "running").await;
        assert_eq!(runner.starts(id), 2);
    }

    /// A VM running when the agent stops is found again, not started twice; one that
    /// should run but was lost meanwhile is started.
    #[tokio::test(start_paused = true)]
    async fn a_restarted_agent_reattaches_or_restarts() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx.clone()).await;
        let (a, b) = (fake::spec("a"), fake::spec("b"));
        let (ia, ib) = (a.id, b.id);
        for s in [a, b] {
            let h = m
                .create(s, vec![], Desired::Running, Generation(1))
                .await
                .unwrap();
            state(&h, "running").await;
        }
        let pa = runner.pid(ia).unwrap();
        let statuses: Vec<_> = m.list().iter().map(|h| h.status.clone()).collect();
        drop(m);
        for s in statuses {
            fake::ended(s).await;
        }
        // b's QEMU dies while no agent watches.
        runner.exit(ib, Some("signal: 9 (SIGKILL)"), Ending::Crash);
        let m = VmManager::recover(ctx).await;
        let ha = m.get(ia).unwrap();
        let hb = m.get(ib).unwrap();
        assert_eq!(state(&ha, "running").await.pid, Some(pa));
        state(&hb, "running").await;
        assert_eq!((runner.starts(ia), runner.starts(ib)), (1, 2));
    }

    /// An agent killed after it recorded a stop intent but before QEMU went (the lab's chaos
    /// run found it: a SIGKILL during the guest's ACPI grace) finds the QEMU again and stops
    /// it: the intent is taken, so nobody would send it again.
    #[tokio::test(start_paused = true)]
    async fn a_stop_cut_short_by_an_agent_restart_is_finished() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx.clone()).await;
        let s = fake::spec("w1");
        let id = s.id;
        let h = m
            .create(s, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        state(&h, "running").await;
        let status = h.status.clone();
        drop((h, m));
        fake::ended(status).await;
        // What the killed agent left: the intent recorded, QEMU still running.
        let paths = VmPaths::new(&tmp.0, id);
        let mut rec = VmRecord::load(&paths.record()).unwrap();
        rec.desired = Desired::Stopped;
        rec.intent = Generation(2);
        rec.save(&paths).unwrap();
        assert!(runner.pid(id).is_some());

        let m = VmManager::recover(ctx).await;
        let h = m.get(id).unwrap();
        let stopped = state(&h, "stopped").await;
        assert_eq!(stopped.intent, Generation(2));
        assert!(runner.pid(id).is_none(), "QEMU was stopped");
        assert_eq!(runner.stops(id).len(), 1);
        assert_eq!(runner.starts(id), 1);
    }

    /// QEMU dying is a failure, with how it died and the console's last lines; a panicking
    /// guest's reason names the panic.
    #[tokio::test(start_paused = true)]
    async fn qemu_dying_is_reported_failed_with_its_reason() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let nets = Arc::new(FakeNetworks::default());
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, Some(nets.clone()));
        let m = VmManager::recover(ctx).await;
        let (a, b) = (fake::spec("a"), fake::spec("b"));
        let (ia, ib) = (a.id, b.id);
        let ha = m
            .create(
                a,
                vec![fake::port("zyta0", 7)],
                Desired::Running,
                Generation(1),
            )
            .await
            .unwrap();
        let hb = m
            .create(b, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        state(&ha, "running").await;
        state(&hb, "running").await;
        assert_eq!(nets.port("zyta0"), Some(7));
        let log = VmPaths::new(&tmp.0, ia).console_log();
        std::fs::write(&log, "booting\r\nZY-READY a\r\n").unwrap();
        runner.exit(ia, Some("signal: 9 (SIGKILL)"), Ending::Crash);
        let reason = failure(state(&ha, "failed").await);
        assert!(
            reason.contains("QEMU died (signal: 9 (SIGKILL))"),
            "{reason}"
        );
        assert!(reason.contains("booting | ZY-READY a"), "{reason}");
        assert_eq!(nets.segments(), Vec::<u32>::new(), "its network went");
        assert_eq!(runner.cleanups(ia), 1);

        let log = VmPaths::new(&tmp.0, ib).console_log();
        std::fs::write(
            &log,
            "ZY-READY b\nKernel panic - not syncing: sysrq triggered crash\nCall Trace:\n",
        )
        .unwrap();
        runner.exit(ib, Some("exit status: 0"), Ending::Panic);
        let reason = failure(state(&hb, "failed").await);
        assert!(
            reason.starts_with(
                "the guest's kernel panicked: Kernel panic - not syncing: sysrq triggered crash (exit status: 0)"
            ),
            "{reason}"
        );
    }

    /// A VM without its network is not what was asked for: it is stopped again and failed.
    #[tokio::test(start_paused = true)]
    async fn a_vm_whose_network_cannot_be_joined_is_halted_and_reported_failed() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let nets = Arc::new(FakeNetworks::default());
        nets.break_segment(9);
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, Some(nets.clone()));
        let m = VmManager::recover(ctx).await;
        let s = fake::spec("w1");
        let id = s.id;
        let ports = vec![fake::port("zytx0", 9)];
        let h = m
            .create(s, ports, Desired::Running, Generation(1))
            .await
            .unwrap();
        let reason = failure(state(&h, "failed").await);
        assert!(reason.starts_with("cannot join its network: "), "{reason}");
        assert_eq!(runner.starts(id), 1);
        assert_eq!(runner.pid(id), None, "QEMU was stopped");
        assert_eq!(runner.stops(id), vec![Duration::from_secs(5)]);
        assert_eq!(nets.segments(), Vec::<u32>::new(), "nothing left behind");
    }

    /// QEMU that exits at start fails the VM with what it said.
    #[tokio::test(start_paused = true)]
    async fn a_start_that_fails_is_reported_with_qemus_words() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx).await;
        let s = fake::spec("w1");
        runner.refuse_start(s.id, "could not open kernel file");
        let h = m
            .create(s, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        let reason = failure(state(&h, "failed").await);
        assert!(reason.contains("could not open kernel file"), "{reason}");
    }

    /// Delete stops the VM at once (its disk goes) and removes its directory.
    #[tokio::test(start_paused = true)]
    async fn delete_stops_without_grace_and_removes_the_files() {
        let tmp = TempDir::new("actor");
        let runner = FakeRunner::default();
        let (ctx, _events) = fake::ctx(&tmp.0, &runner, None);
        let m = VmManager::recover(ctx).await;
        let s = fake::spec("w1");
        let id = s.id;
        let h = m
            .create(s, vec![], Desired::Running, Generation(1))
            .await
            .unwrap();
        state(&h, "running").await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.send(Request::Delete(tx)).unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(runner.stops(id), vec![Duration::ZERO]);
        assert!(!VmPaths::new(&tmp.0, id).dir.exists());
        assert!(h.ended());
    }
}
