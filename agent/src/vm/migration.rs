//! The agent's side of a live migration: one [`Migration`] per VM in memory, on either
//! side, and the pure rules the node's commands follow ([`decide`], [`holds_vm`],
//! [`apply`]). The engine that moves the bytes is [`super::migrate`]; the commands are
//! carried out in `node::migrate`; the source's part runs inside the VM's actor, which owns
//! its QEMU.
//!
//! ```text
//!  source (the VM's actor drives the engine; events at least once a second)
//!    MigrateOut ─▶ Preparing ─▶ Mirroring ─▶ Memory ─▶ Switchover ─▶ Completed ─Finish─▶ Finished
//!                     │             │           │           │           │ (paused, recorded
//!                     └─────────────┴───────────┴───────────┴──▶ Failed │  on disk first)
//!                          MigrateAbort: cancel ─▶ Cancelled ◀──────────┘ Abort: `cont`
//!
//!  destination (a task of its own waits for the VM; nothing of it is a VM of this node yet)
//!    MigrateIn ─▶ Preparing (listening) ─▶ Completed (arrived, paused) ─Activate─▶ Active
//!                     │ failed / Abort            │ Abort                   (an ordinary VM)
//!                     ▼                           ▼
//!                  Failed / Cancelled: its QEMU killed, its directory removed
//! ```
//!
//! While a migration holds a VM on the source (from `MigrateOut` until it failed, was
//! cancelled or finished), intents for the VM answer `Busy`. Repeats are no-ops: a command
//! naming the migration this node holds for the VM answers from it, never starts a second.
//!
//! What survives an agent restart is on disk: the source writes [`MIGRATED_OUT`] into the
//! VM's directory *before* it reports `Completed` (a restarted agent then keeps the guest
//! paused, and never starts it again, until Finish or Abort); the destination works in a
//! VM directory marked [`INCOMING`] until activation (a restarted agent kills its QEMU and
//! removes the directory: the coordinator gets `NotFound` and aborts).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};
use zy_common::proto::{MigrateTarget, MigrationEvent, MigrationPhase, MigrationStatus};
use zy_common::time::now_millis;
use zy_common::{MigrationId, VmId};

use super::migrate::Progress;
use super::record::VmRecord;
use super::runner::IncomingVm;

/// The file in a source VM's directory saying its migration completed (the guest is paused
/// for good unless the migration is aborted). Holds the migration id.
pub const MIGRATED_OUT: &str = "migrated-out";
/// The file marking a VM directory as a migration's destination not yet activated. Holds
/// the migration id.
pub const INCOMING: &str = ".incoming";
/// The file in an activated destination's VM directory naming the migration that brought
/// the VM here: after an agent restart (the migration forgotten), a repeated
/// `MigrateActivate` still answers the VM, and a `MigrateAbort` is refused, since the VM
/// runs here. Holds the migration id.
pub const MIGRATED_IN: &str = "migrated-in";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which side of a migration this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// One migration of one VM, on this node.
#[derive(Debug)]
pub struct Migration {
    pub id: MigrationId,
    pub vm: VmId,
    pub side: Side,
    /// Asks the engine to stop (checked at every poll).
    pub cancel: AtomicBool,
    status: watch::Sender<MigrationStatus>,
    events: mpsc::Sender<MigrationEvent>,
    /// Destination: the ports it holds.
    pub ports: Vec<u16>,
    /// Destination: where it listens, once it does.
    pub target: Mutex<Option<MigrateTarget>>,
    /// Destination: the arrived VM, from `Completed` until activated or aborted. Held
    /// across activation and abort, which it serializes.
    pub arrival: tokio::sync::Mutex<Option<Arrival>>,
}

/// A VM that arrived by migration, paused, and what it becomes when activated.
#[derive(Debug)]
pub struct Arrival {
    pub incoming: Box<dyn IncomingVm>,
    /// Its record as an ordinary VM of this node (desired running at the migration's
    /// generation), written at activation.
    pub rec: VmRecord,
}

impl Migration {
    /// The status now.
    pub fn status(&self) -> MigrationStatus {
        self.status.borrow().clone()
    }

    /// The phase now.
    pub fn phase(&self) -> MigrationPhase {
        self.status.borrow().phase.clone()
    }

    /// Watches the status.
    pub fn watch(&self) -> watch::Receiver<MigrationStatus> {
        self.status.subscribe()
    }

    /// Changes the status; the source reports every phase change at once.
    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut changed_phase = false;
        self.status.send_modify(|s| {
            let before = s.phase.as_str();
            f(s);
            *s = s.clone().clamped();
            changed_phase = before != s.phase.as_str();
        });
        if changed_phase {
            tracing::info!(migration = %self.id, vm = %self.vm, phase = self.phase().as_str(), "migration phase");
            self.emit();
        }
    }

    /// Sends the status to the coordinator (from the source only; a full queue drops it:
    /// the next one a second later says as much).
    pub fn emit(&self) {
        if self.side == Side::Source {
            let _ = self.events.try_send(MigrationEvent {
                migration: self.id,
                vm: self.vm,
                status: self.status(),
            });
        }
    }

    /// Waits (at most `limit`) until the migration is at an end on this side.
    pub async fn ended(&self, limit: std::time::Duration) -> MigrationPhase {
        let mut rx = self.watch();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.phase.is_end())).await;
        self.phase()
    }
}

/// What a command naming migration `id` does, given the migration this node holds for the
/// VM (pure: every case has a test).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is held: start it.
    Start,
    /// It is the one held: answer from it.
    Repeat,
    /// Another one holds the VM: busy until it ends.
    Busy(MigrationId),
}

/// See [`Decision`]. A held migration at its end (failed, cancelled, finished, active)
/// gives way to a new one.
pub fn decide(held: Option<(MigrationId, &MigrationPhase)>, id: MigrationId) -> Decision {
    match held {
        None => Decision::Start,
        Some((h, _)) if h == id => Decision::Repeat,
        Some((h, phase)) if holds(phase) => Decision::Busy(h),
        Some(_) => Decision::Start,
    }
}

fn holds(phase: &MigrationPhase) -> bool {
    !matches!(
        phase,
        MigrationPhase::Failed { .. }
            | MigrationPhase::Cancelled
            | MigrationPhase::Finished
            | MigrationPhase::Active
    )
}

/// Whether a migration in `phase` holds its VM: intents and deletes for it answer `Busy`.
/// On the source from the start until it failed, was cancelled or finished (a completed
/// one too: its guest is paused and may be resumed by an abort); on the destination until
/// it is active (then it is an ordinary VM) or has ended.
pub fn holds_vm(phase: &MigrationPhase) -> bool {
    holds(phase)
}

/// What the engine's progress means for the status (pure).
pub fn apply(s: &mut MigrationStatus, p: &Progress) {
    match p {
        Progress::MirrorsStarted { .. } => s.phase = MigrationPhase::Mirroring,
        Progress::Mirror { done, total } => {
            s.disk_done = *done;
            s.disk_total = *total;
        }
        Progress::DisksSynced => {
            s.disk_done = s.disk_total;
            s.phase = MigrationPhase::Memory;
        }
        Progress::Memory {
            transferred,
            remaining,
            total,
            dirty_rate,
            expected_downtime_ms,
            cpu_throttle_percent,
            ..
        } => {
            s.memory_transferred = *transferred;
            s.memory_remaining = *remaining;
            s.memory_total = *total;
            s.dirty_rate = *dirty_rate;
            s.expected_downtime_ms = *expected_downtime_ms;
            s.cpu_throttle_percent = (*cpu_throttle_percent).min(100) as u8;
        }
        Progress::Switchover => s.phase = MigrationPhase::Switchover,
    }
}

/// Every migration this node holds, one per VM, and the ports its destinations listen on.
#[derive(Debug)]
pub struct Migrations {
    by_vm: Mutex<HashMap<VmId, Arc<Migration>>>,
    events: mpsc::Sender<MigrationEvent>,
    ports: Mutex<BTreeSet<u16>>,
}

impl Migrations {
    /// An empty registry and the stream of its events (for the coordinator).
    pub fn new() -> (Self, mpsc::Receiver<MigrationEvent>) {
        let (tx, rx) = mpsc::channel(256);
        (
            Self {
                by_vm: Mutex::new(HashMap::new()),
                events: tx,
                ports: Mutex::new(BTreeSet::new()),
            },
            rx,
        )
    }

    /// The migration held for `vm`.
    pub fn get(&self, vm: VmId) -> Option<Arc<Migration>> {
        lock(&self.by_vm).get(&vm).cloned()
    }

    /// The migration that holds `vm` now (see [`holds_vm`]).
    pub fn holding(&self, vm: VmId) -> Option<Arc<Migration>> {
        self.get(vm).filter(|m| holds_vm(&m.phase()))
    }

    /// Decides a command for `vm` naming migration `id` and, when it is to start, puts a
    /// new migration in its place at once (so that a repeat arriving meanwhile is a
    /// repeat). Returns the decision and the migration it concerns.
    pub fn claim(
        &self,
        vm: VmId,
        id: MigrationId,
        side: Side,
        ports: Vec<u16>,
    ) -> (Decision, Option<Arc<Migration>>) {
        let mut map = lock(&self.by_vm);
        let held = map.get(&vm).cloned();
        let held_phase = held.as_ref().map(|m| (m.id, m.phase()));
        let d = decide(held_phase.as_ref().map(|(h, p)| (*h, p)), id);
        match d {
            Decision::Start => {
                if let Some(old) = held {
                    self.release(&old.ports);
                }
                let m = Arc::new(Migration {
                    id,
                    vm,
                    side,
                    cancel: AtomicBool::new(false),
                    status: watch::channel(MigrationStatus::new(MigrationPhase::Preparing)).0,
                    events: self.events.clone(),
                    ports,
                    target: Mutex::new(None),
                    arrival: tokio::sync::Mutex::new(None),
                });
                map.insert(vm, m.clone());
                (d, Some(m))
            }
            Decision::Repeat => {
                self.release(&ports);
                (d, held)
            }
            Decision::Busy(_) => {
                self.release(&ports);
                (d, held)
            }
        }
    }

    /// Forgets the migration of `vm` if it is `id` (its ports are free again).
    pub fn remove(&self, vm: VmId, id: MigrationId) {
        let mut map = lock(&self.by_vm);
        if map.get(&vm).is_some_and(|m| m.id == id) {
            if let Some(m) = map.remove(&vm) {
                self.release(&m.ports);
            }
        }
    }

    /// Every migration held (for reports and tests).
    pub fn list(&self) -> Vec<Arc<Migration>> {
        lock(&self.by_vm).values().cloned().collect()
    }

    fn release(&self, ports: &[u16]) {
        let mut p = lock(&self.ports);
        for port in ports {
            p.remove(port);
        }
    }

    /// Picks `n` free TCP ports on `ip` that no other migration of this node holds, and
    /// holds them until the migration is removed or replaced. The OS says a port is free
    /// by binding it; the listeners are closed just before QEMU binds the ports.
    pub fn pick_ports(&self, ip: IpAddr, n: usize) -> std::io::Result<Vec<u16>> {
        let mut held = lock(&self.ports);
        let mut listeners = Vec::new();
        let mut out = Vec::new();
        for _ in 0..(n * 20).max(20) {
            if out.len() == n {
                break;
            }
            let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
            let port = l.local_addr()?.port();
            if !held.contains(&port) && !out.contains(&port) {
                out.push(port);
            }
            listeners.push(l);
        }
        if out.len() < n {
            return Err(std::io::Error::other("no free port found"));
        }
        held.extend(out.iter().copied());
        Ok(out)
    }
}

/// Writes a marker file holding a migration id, durably (it decides what a restarted
/// agent does).
pub fn write_marker(path: &Path, id: MigrationId) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("zy-migration 1 {id}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The migration id a marker file holds; `None` when there is none or it is unreadable.
pub fn read_marker(path: &Path) -> Option<MigrationId> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = text.trim().strip_prefix("zy-migration 1 ")?;
    rest.parse().ok()
}

/// The time now, for events.
pub fn at_ms() -> u64 {
    now_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mid(n: u64) -> MigrationId {
        format!("00000000-0000-0000-0000-{n:012}").parse().unwrap()
    }

    #[test]
    fn a_command_starts_repeats_or_finds_the_vm_busy() {
        let running = MigrationPhase::Memory;
        let completed = MigrationPhase::Completed {
            downtime_ms: 1,
            total_ms: 2,
        };
        assert_eq!(decide(None, mid(1)), Decision::Start);
        assert_eq!(decide(Some((mid(1), &running)), mid(1)), Decision::Repeat);
        assert_eq!(decide(Some((mid(1), &completed)), mid(1)), Decision::Repeat);
        let failed = MigrationPhase::Failed { reason: "x".into() };
        // A repeat of an ended one answers from it (it is not started again).
        assert_eq!(decide(Some((mid(1), &failed)), mid(1)), Decision::Repeat);
        // Another migration while one runs, or is completed but not finished: busy.
        assert_eq!(
            decide(Some((mid(1), &running)), mid(2)),
            Decision::Busy(mid(1))
        );
        assert_eq!(
            decide(Some((mid(1), &completed)), mid(2)),
            Decision::Busy(mid(1))
        );
        assert_eq!(
            decide(Some((mid(1), &MigrationPhase::Preparing)), mid(2)),
            Decision::Busy(mid(1))
        );
        // One at its end gives way.
        for p in [
            failed,
            MigrationPhase::Cancelled,
            MigrationPhase::Finished,
            MigrationPhase::Active,
        ] {
            assert_eq!(decide(Some((mid(1), &p)), mid(2)), Decision::Start, "{p:?}");
            assert!(!holds_vm(&p));
        }
        for p in [
            MigrationPhase::Preparing,
            MigrationPhase::Mirroring,
            MigrationPhase::Memory,
            MigrationPhase::Switchover,
            completed,
        ] {
            assert!(holds_vm(&p), "{p:?}");
        }
    }

    #[test]
    fn progress_moves_the_phase_and_the_figures() {
        let mut s = MigrationStatus::new(MigrationPhase::Preparing);
        apply(&mut s, &Progress::MirrorsStarted { disks: 2 });
        assert_eq!(s.phase, MigrationPhase::Mirroring);
        apply(&mut s, &Progress::Mirror { done: 5, total: 10 });
        assert_eq!((s.disk_done, s.disk_total), (5, 10));
        apply(&mut s, &Progress::DisksSynced);
        assert_eq!((s.phase.clone(), s.disk_done), (MigrationPhase::Memory, 10));
        apply(
            &mut s,
            &Progress::Memory {
                transferred: 7,
                remaining: 3,
                total: 100,
                dirty_rate: 4096,
                expected_downtime_ms: 30,
                downtime_limit_ms: 100,
                cpu_throttle_percent: 250,
            },
        );
        assert_eq!(s.memory_remaining, 3);
        assert_eq!(s.dirty_rate, 4096);
        assert_eq!(s.cpu_throttle_percent, 100);
        apply(&mut s, &Progress::Switchover);
        assert_eq!(s.phase, MigrationPhase::Switchover);
    }

    #[tokio::test]
    async fn a_claim_is_one_per_vm_and_phase_changes_are_reported_by_the_source_only() {
        let (ms, mut rx) = Migrations::new();
        let vm = VmId::new_random();
        let (d, m) = ms.claim(vm, mid(1), Side::Source, vec![]);
        assert_eq!(d, Decision::Start);
        let m = m.unwrap();
        let (d, again) = ms.claim(vm, mid(1), Side::Source, vec![]);
        assert_eq!(d, Decision::Repeat);
        assert!(Arc::ptr_eq(&m, &again.unwrap()));
        assert_eq!(
            ms.claim(vm, mid(2), Side::Source, vec![]).0,
            Decision::Busy(mid(1))
        );
        assert!(ms.holding(vm).is_some());
        m.update(|s| s.phase = MigrationPhase::Mirroring);
        let ev = rx.try_recv().unwrap();
        assert_eq!(ev.status.phase, MigrationPhase::Mirroring);
        // Figures alone are not a phase change: reported by the ticker, not at once.
        m.update(|s| s.disk_done = 0);
        assert!(rx.try_recv().is_err());
        m.update(|s| s.phase = MigrationPhase::Cancelled);
        assert!(ms.holding(vm).is_none());
        assert_eq!(
            ms.claim(vm, mid(2), Side::Source, vec![]).0,
            Decision::Start
        );

        let other = VmId::new_random();
        let (_, d) = ms.claim(other, mid(3), Side::Destination, vec![]);
        d.unwrap().update(|s| s.phase = MigrationPhase::Memory);
        assert!(rx.try_recv().is_ok(), "the source's event above");
        assert!(rx.try_recv().is_err(), "the destination sends none");
    }

    #[test]
    fn two_destinations_never_share_a_port() {
        let (ms, _rx) = Migrations::new();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = ms.pick_ports(ip, 2).unwrap();
        let b = ms.pick_ports(ip, 2).unwrap();
        assert_eq!(a.len(), 2);
        assert!(a[0] != a[1] && !b.contains(&a[0]) && !b.contains(&a[1]));
        let vm = VmId::new_random();
        ms.claim(vm, mid(1), Side::Destination, a.clone());
        ms.remove(vm, mid(1));
        assert!(lock(&ms.ports).iter().all(|p| !a.contains(p)));
    }

    #[test]
    fn markers_hold_their_migration_id() {
        let dir = std::env::temp_dir().join(format!("zy-marker-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(MIGRATED_OUT);
        assert_eq!(read_marker(&p), None);
        write_marker(&p, mid(9)).unwrap();
        assert_eq!(read_marker(&p), Some(mid(9)));
        std::fs::write(&p, "garbage").unwrap();
        assert_eq!(read_marker(&p), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
