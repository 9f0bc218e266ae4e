//! Live migration as the coordinator drives it: a durable operation whose steps are
//! commands to two nodes (protocol version 4; the agents' side is `zy_agent::vm::migration`
//! and the engine `zy_agent::vm::migrate`).
//!
//! ```text
//!  API / drain / consolidation: check the move (zone, state, room after overcommit,
//!  anti-affinity, N+1 as the pool will be once it is done), then in one transaction:
//!  the VM's record holds room on the destination (`migrating_to`) + the operation
//!                       |
//!   1 destination listening   MigrateIn -> destination   (QEMU -incoming, NBD export)
//!   2 copied                  MigrateOut -> source, then MigrateStatus until Completed
//!   3 running on the dest.    "activation sent" recorded, then MigrateActivate ->
//!                             destination: it answers the VM running
//!   4 record moved            the VM's node := destination, in the same write as 3
//!   5 source cleaned up       MigrateFinish -> source
//!
//!  abort (a failure, a refusal, a delete of the VM, a node removed), recorded first:
//!    activation not sent: MigrateAbort -> source (it resumes the guest) and -> destination
//!    activation sent:     MigrateAbort -> destination, and only once it confirmed: -> source
//!    then: the room on the destination is released and the operation fails
//! ```
//!
//! The rules that keep a VM from being lost or run twice:
//! - The record moves only when the destination answers that the VM runs there (step 3),
//!   and in the same write the operation passes step 4. A report of the VM from the
//!   destination before that is ignored (the VM is "placed elsewhere"); so is one from the
//!   source after it.
//! - Until MigrateActivate may have been sent, the destination cannot run the guest (it
//!   waits, paused, for that command), so the source may be resumed at any time. That it
//!   is sent is recorded before it goes; from then on only the destination's answer
//!   decides: a lost answer is asked again (every command is idempotent by migration id),
//!   never taken for a refusal, and the source stays paused until the destination has
//!   answered or was removed. A destination that is away when the copy completes (its
//!   agent died) is given [`ACTIVATE_WAIT`], then the guest resumes on the source.
//! - Every step is re-entered from the store after a coordinator restart: the destination
//!   is asked for its target again (the same answer), the source for the migration's
//!   status; a side that forgot the migration (its agent restarted) answers NotFound, which
//!   aborts it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use tracing::{info, warn};
use zy_api::{Accepted, MigrateVm, OpId, OpKind, VmDesired};
use zy_common::ids::MigrationId;
use zy_common::proto::{
    CommandKind, MigrateIn, MigrateOut, MigrateTarget, MigrationEvent, MigrationPhase,
    MigrationStatus, ReplyErrorKind, ReplyKind, MIGRATION_SINCE,
};
use zy_common::time::now_millis;
use zy_common::vm::VmState;
use zy_common::NodeId;

use super::placement::{self, Demand};
use super::{busy_with, idempotency_key, op_view, replay, view, write, Batch, Table};
use crate::api::ApiError;
use crate::fleet::CommandError;
use crate::ops::{MigrationRec, MoveCause, OpRec};
use crate::store::{Observed, VmRec};
use crate::Coordinator;

/// How often a running migration's source is asked where it stands.
const POLL: Duration = Duration::from_millis(500);
/// How long to wait before a command that could not be delivered is sent again.
const RETRY: Duration = Duration::from_secs(1);
/// The destination may have to fetch the VM's base image first.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a source may stay silent (disconnected, or not answering) mid-copy before the
/// migration is abandoned (its guest keeps running there).
const SOURCE_SILENCE: Duration = Duration::from_secs(120);
/// How many times a source may fail to resume its guest before the abort is told.
const RESUME_TRIES: u32 = 30;
/// How many times a destination may fail to get ready before the migration is abandoned.
const PREPARE_TRIES: u32 = 3;
/// How long a destination that went away before activation is waited for.
const ACTIVATE_WAIT: Duration = Duration::from_secs(30);
/// How long a destination may take to answer MigrateIn before the migration is abandoned.
const PREPARE_GIVE_UP: Duration = Duration::from_secs(35 * 60);

/// The migrations under way, in memory: which ones have a driver, and what their sources
/// last reported.
#[derive(Debug, Default)]
pub struct Migrations {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    driving: HashSet<OpId>,
    progress: HashMap<OpId, MigrationStatus>,
}

impl Migrations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest progress of a migration, as the API shows it.
    pub fn progress(&self, op: OpId) -> Option<zy_api::MigrationProgress> {
        self.lock().progress.get(&op).map(progress_view)
    }

    /// A source's progress event. Only a migration this coordinator drives is taken: the
    /// event names its operation's id.
    pub fn on_event(&self, e: &MigrationEvent) {
        let op = OpId(e.migration.0);
        let mut g = self.lock();
        if g.driving.contains(&op) {
            g.progress.insert(op, e.status.clone());
        }
    }

    fn claim(&self, op: OpId) -> bool {
        self.lock().driving.insert(op)
    }

    fn release(&self, op: OpId) {
        let mut g = self.lock();
        g.driving.remove(&op);
        g.progress.remove(&op);
    }

    fn set_progress(&self, op: OpId, s: MigrationStatus) {
        self.lock().progress.insert(op, s);
    }
}

fn progress_view(s: &MigrationStatus) -> zy_api::MigrationProgress {
    zy_api::MigrationProgress {
        phase: s.phase.as_str().into(),
        disk_done: s.disk_done,
        disk_total: s.disk_total,
        memory_transferred: s.memory_transferred,
        memory_remaining: s.memory_remaining,
        memory_total: s.memory_total,
        dirty_rate: s.dirty_rate,
        expected_downtime_ms: s.expected_downtime_ms,
        cpu_throttle_percent: s.cpu_throttle_percent,
    }
}

/// The migration id of an operation: its own id.
pub fn migration_id(op: &OpRec) -> MigrationId {
    MigrationId(op.id.0)
}

/// A migration of the VM `key_path` to `to` and its operation, as one batch; refused when
/// the VM is not running, is busy with another operation or is migrating. The move itself
/// (room, zone, rules) is checked by the caller against the same table. Pure.
pub fn plan_migrate(
    t: &Table,
    v: &VmRec,
    to: NodeId,
    cause: MoveCause,
    key: Option<String>,
    now: u64,
) -> Result<(Batch, VmRec, OpRec), ApiError> {
    if let Some(op) = t.running_op(v.id) {
        return Err(busy_with(op));
    }
    let Some(from) = v.node else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_placed",
            format!("VM {} has no node", v.name),
        ));
    };
    if from == to {
        return Err(ApiError::bad_request(format!(
            "VM {} runs on that node already",
            v.name
        )));
    }
    let running = v.desired == VmDesired::Running
        && v.observed
            .as_ref()
            .is_some_and(|o| o.state == VmState::Running && o.intent >= v.generation);
    if !running {
        let state = v
            .observed
            .as_ref()
            .map(|o| o.state.name())
            .unwrap_or("pending");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!(
                "VM {} is {state}, not running: only a running VM migrates live (a stopped one \
                 moves with its disk by a later release)",
                v.name
            ),
        ));
    }
    let mut n = v.clone();
    n.migrating_to = Some(to);
    let mut op = OpRec::new(OpKind::Migrate, &n, n.generation, key, now);
    op.migration = Some(MigrationRec {
        from,
        to,
        cause,
        downtime_ms: None,
        total_ms: None,
        aborting: None,
        activation_sent_ms: None,
    });
    let mut b = Batch::default();
    b.put(Some(v), n.clone());
    b.op(None, op.clone());
    Ok((b, n, op))
}

/// Starts a migration of a VM: to `to` (name or id) if given, else where the packer puts
/// it. Checks every rule against the table it records into, so two moves never take the
/// same room. Used by the API, drains and consolidation.
pub async fn start(
    coord: &Arc<Coordinator>,
    vm_key: &str,
    to: Option<&str>,
    cause: MoveCause,
    key: Option<String>,
) -> Result<Accepted, ApiError> {
    let to = match to {
        None => None,
        Some(name) => Some(
            coord
                .fleet
                .find(name)
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "no node `{}`; `zy node ls` lists them",
                        zy_common::ids::truncate_for_error(name)
                    ))
                })?
                .record
                .id,
        ),
    };
    let nodes = super::node_caps(coord);
    let model = coord.config.resource_model();
    let policy = coord.config.packer_policy();
    let now = now_millis();
    write(coord, |t| {
        if let Some(a) = replay(coord, t, &key) {
            return Ok((Batch::default(), a));
        }
        let v = t
            .find(vm_key)
            .filter(|v| v.desired != VmDesired::Deleted)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no VM `{}`; `zy vm ls` lists them",
                    zy_common::ids::truncate_for_error(vm_key)
                ))
            })?;
        if let Some(op) = t.running_op(v.id) {
            return Err(busy_with(op));
        }
        let from = v.node.ok_or_else(|| {
            ApiError::new(StatusCode::CONFLICT, "not_placed", "the VM has no node")
        })?;
        if to == Some(from) {
            return Err(ApiError::bad_request(format!(
                "VM {} runs on that node already",
                v.name
            )));
        }
        let placed = super::placed_vms(t, &model);
        let demand = Demand {
            zone: v.zone,
            need: model.cost(v.size()),
            group: v.anti_affinity.clone(),
        };
        let dest = placement::check_move(policy, &nodes, placed, v.id, &demand, from, to)
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, "no_room", e.to_string()))?;
        for (node, side) in [(from, "source"), (dest, "destination")] {
            match coord.fleet.session(node) {
                None => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "node_unavailable",
                        format!("the {side} node is not connected"),
                    ))
                }
                Some(s) if s.version < MIGRATION_SINCE => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "node_too_old",
                        format!(
                            "the {side} node's agent speaks protocol {}, and live migration \
                             needs {MIGRATION_SINCE}: upgrade it first",
                            s.version
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let (b, n, op) = plan_migrate(t, v, dest, cause, key.clone(), now)?;
        let a = Accepted {
            operation: op_view(coord, &op),
            vm: Some(view(coord, &n, Some(op.id))),
        };
        Ok((b, a))
    })
    .await
}

/// `POST /v1/vms/{vm}/migrate`: a live migration, to `to` or where the packer puts it.
pub async fn migrate(
    State(coord): State<Arc<Coordinator>>,
    Path(vm): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let key = idempotency_key(&headers)?;
    let req: MigrateVm = if body.is_empty() {
        MigrateVm::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad migration request: {e}")))?
    };
    let a = start(&coord, &vm, req.to.as_deref(), MoveCause::Asked, key).await?;
    info!(vm = %a.operation.vm, name = %a.operation.vm_name, op = %a.operation.id, "migration recorded");
    coord.vms.wake.notify_one();
    Ok((StatusCode::ACCEPTED, Json(a)))
}

/// Starts a driver for every running migration that has none (after a restart: all of
/// them). Called by the reconciler's tick.
pub fn drive_all(coord: &Arc<Coordinator>) {
    let ops: Vec<OpId> = coord.vms.with(|t| {
        t.ops
            .values()
            .filter(|o| o.kind == OpKind::Migrate && o.is_running())
            .map(|o| o.id)
            .collect()
    });
    for id in ops {
        if coord.migrations.claim(id) {
            let coord = coord.clone();
            tokio::spawn(async move {
                drive(&coord, id).await;
                coord.migrations.release(id);
            });
        }
    }
}

/// The operation and its VM as the table holds them.
fn load(coord: &Coordinator, id: OpId) -> Option<(OpRec, Option<VmRec>)> {
    coord.vms.with(|t| {
        let op = t.ops.get(&id)?.clone();
        let vm = t.vms.get(&op.vm).cloned();
        Some((op, vm))
    })
}

/// What the last attempt of a step decided.
enum Next {
    /// Look again (the step or the operation changed, or a retry is due).
    Again,
    /// Abandon the migration for this reason.
    Abort(String),
}

/// Why a migration is to be abandoned now, if it is: what was recorded, or a delete of the
/// VM, a node removed, the deadline. Once the record has moved the VM is the destination's
/// and only the source's cleanup is left, never an abort; once activation may have been
/// sent, a delete or a removed source waits for the move to end (the destination may run
/// the guest already), and only the destination's own word ends it otherwise. Pure.
pub fn abort_reason(
    op: &OpRec,
    m: &MigrationRec,
    vm: &VmRec,
    enrolled: &HashSet<NodeId>,
    now: u64,
) -> Option<String> {
    if op.current >= 5 {
        return None;
    }
    let sent = m.activation_sent_ms.is_some();
    let limit = crate::ops::deadline_ms(OpKind::Migrate).unwrap_or(u64::MAX);
    m.aborting
        .clone()
        .or_else(|| {
            (!sent && vm.desired == VmDesired::Deleted).then(|| "the VM was deleted".into())
        })
        .or_else(|| {
            (!sent && !enrolled.contains(&m.from)).then(|| "the source node was removed".into())
        })
        .or_else(|| (!enrolled.contains(&m.to)).then(|| "the destination node was removed".into()))
        .or_else(|| {
            (!sent && now.saturating_sub(op.created_at_ms) > limit)
                .then(|| format!("it did not finish within {} hours", limit / 3_600_000))
        })
}

/// Drives one migration to its end.
async fn drive(coord: &Arc<Coordinator>, id: OpId) {
    let mut target: Option<MigrateTarget> = None;
    loop {
        let Some((op, vm)) = load(coord, id) else {
            return;
        };
        if !op.is_running() {
            return;
        }
        let Some(m) = op.migration.clone() else {
            fail(
                coord,
                id,
                "a migration operation without its nodes",
                now_millis(),
            )
            .await;
            return;
        };
        let Some(vm) = vm else {
            // Forgotten (deleted and confirmed): nothing left to move.
            fail(coord, id, "the VM was deleted", now_millis()).await;
            return;
        };
        let enrolled = coord.fleet.enrolled_among([m.from, m.to]);
        let reason = abort_reason(&op, &m, &vm, &enrolled, now_millis());
        if let Some(reason) = reason {
            abort(coord, &op, &m, &reason, &enrolled).await;
            return;
        }
        let next = match op.current {
            1 => listen(coord, &op, &vm, &m, &mut target).await,
            2 => copy(coord, &op, &vm, &m, &mut target).await,
            3 | 4 => activate(coord, &op, &vm, &m).await,
            _ => finish(coord, &op, &m).await,
        };
        if let Next::Abort(reason) = next {
            mark_aborting(coord, id, &reason).await;
        }
    }
}

/// Sends a command to a node, once: the reply, or why there is none.
async fn call(
    coord: &Coordinator,
    node: NodeId,
    kind: CommandKind,
    timeout: Duration,
) -> Result<ReplyKind, CommandError> {
    let Some(s) = coord.fleet.session(node) else {
        return Err(CommandError::Disconnected);
    };
    s.command(kind, timeout).await
}

/// Step 1: the destination gets ready and says where to send.
async fn listen(
    coord: &Arc<Coordinator>,
    op: &OpRec,
    vm: &VmRec,
    m: &MigrationRec,
    target: &mut Option<MigrateTarget>,
) -> Next {
    match prepare(coord, op, vm, m).await {
        Ok(t) => {
            *target = Some(t);
            step_done(coord, op.id, op.current).await;
            Next::Again
        }
        Err(next) => next,
    }
}

/// MigrateIn to the destination until it answers or cannot.
async fn prepare(
    coord: &Arc<Coordinator>,
    op: &OpRec,
    vm: &VmRec,
    m: &MigrationRec,
) -> Result<MigrateTarget, Next> {
    let started = tokio::time::Instant::now();
    let mut failures = 0;
    loop {
        let wire = match super::wire(coord, vm, m.to) {
            Ok(w) => w,
            Err(e) => {
                if started.elapsed() > SOURCE_SILENCE {
                    return Err(Next::Abort(format!("the destination: {e}")));
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let cmd = CommandKind::MigrateIn(Box::new(MigrateIn {
            migration: migration_id(op),
            vm: wire,
            generation: vm.generation,
            source: m.from,
        }));
        match call(coord, m.to, cmd, PREPARE_TIMEOUT).await {
            Ok(ReplyKind::MigrateListening(t)) => return Ok(t),
            Ok(other) => {
                return Err(Next::Abort(format!(
                    "the destination answered {other:?} to MigrateIn"
                )))
            }
            Err(CommandError::Rejected(e))
                if !matches!(e.kind, ReplyErrorKind::Busy | ReplyErrorKind::Failed) =>
            {
                return Err(Next::Abort(format!(
                    "the destination refused: {}",
                    e.message
                )))
            }
            // A host error may pass (a full disk freed); not three times in a row.
            Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::Failed => {
                failures += 1;
                if failures >= PREPARE_TRIES {
                    return Err(Next::Abort(format!(
                        "the destination could not get ready: {}",
                        e.message
                    )));
                }
                tokio::time::sleep(RETRY).await;
            }
            Err(e) => {
                if started.elapsed() > PREPARE_GIVE_UP {
                    return Err(Next::Abort(format!(
                        "the destination did not get ready: {e}"
                    )));
                }
                if !still_at(coord, op.id, op.current) {
                    return Err(Next::Again);
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Step 2: the source copies the disks and the memory; done when it reports Completed.
async fn copy(
    coord: &Arc<Coordinator>,
    op: &OpRec,
    vm: &VmRec,
    m: &MigrationRec,
    target: &mut Option<MigrateTarget>,
) -> Next {
    let t = match target.clone() {
        Some(t) => t,
        // After a restart: the destination answers the same target again.
        None => match prepare(coord, op, vm, m).await {
            Ok(t) => {
                *target = Some(t.clone());
                t
            }
            Err(next) => return next,
        },
    };
    let cfg = coord.config.migration;
    let out = CommandKind::MigrateOut(Box::new(MigrateOut {
        migration: migration_id(op),
        vm: vm.id,
        dest: m.to,
        target: t,
        max_bandwidth_mib_s: cfg.max_bandwidth_mib_s,
        max_downtime_ms: cfg.max_downtime_ms,
    }));
    let mut started = false;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        if !still_at(coord, op.id, op.current) {
            return Next::Again;
        }
        if !started {
            match call(coord, m.from, out.clone(), COMMAND_TIMEOUT).await {
                Ok(_) => {
                    started = true;
                    last_heard = tokio::time::Instant::now();
                }
                Err(CommandError::Rejected(e)) if e.kind != ReplyErrorKind::Busy => {
                    return Next::Abort(format!("the source refused: {}", e.message));
                }
                Err(e) => {
                    if last_heard.elapsed() > SOURCE_SILENCE {
                        return Next::Abort(format!("the source did not start: {e}"));
                    }
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let status = CommandKind::MigrateStatus {
            migration: migration_id(op),
            vm: vm.id,
        };
        match call(coord, m.from, status, COMMAND_TIMEOUT).await {
            Ok(ReplyKind::Migration(s)) => {
                last_heard = tokio::time::Instant::now();
                let phase = s.phase.clone();
                coord.migrations.set_progress(op.id, s);
                match phase {
                    MigrationPhase::Completed {
                        downtime_ms,
                        total_ms,
                    } => {
                        record_copied(coord, op.id, downtime_ms, total_ms).await;
                        return Next::Again;
                    }
                    MigrationPhase::Failed { reason } => {
                        return Next::Abort(format!("the copy failed: {reason}"))
                    }
                    MigrationPhase::Cancelled => {
                        return Next::Abort("the source cancelled the copy".into())
                    }
                    MigrationPhase::Finished | MigrationPhase::Active => {
                        return Next::Abort(format!(
                            "the source reports the migration {}, which this step cannot be",
                            phase.as_str()
                        ))
                    }
                    _ => {}
                }
            }
            Ok(other) => {
                return Next::Abort(format!("the source answered {other:?} to MigrateStatus"))
            }
            Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::NotFound => {
                return Next::Abort(
                    "the source no longer knows the migration (its agent restarted)".into(),
                );
            }
            Err(e) => {
                if last_heard.elapsed() > SOURCE_SILENCE {
                    return Next::Abort(format!("the source went silent: {e}"));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Steps 3 and 4: the destination runs the VM; its record moves there in the same write.
async fn activate(coord: &Arc<Coordinator>, op: &OpRec, vm: &VmRec, m: &MigrationRec) -> Next {
    let cmd = CommandKind::MigrateActivate {
        migration: migration_id(op),
        vm: vm.id,
    };
    if m.activation_sent_ms.is_none() {
        // Nothing sent yet: the source may still take the guest back. A destination that is
        // away (its agent died mid-copy) is given a while, then the migration is abandoned.
        let waited = tokio::time::Instant::now();
        while coord.fleet.session(m.to).is_none() {
            if waited.elapsed() > ACTIVATE_WAIT {
                return Next::Abort(
                    "the destination went away before the VM could run there".into(),
                );
            }
            if !still_at(coord, op.id, op.current) {
                return Next::Again;
            }
            tokio::time::sleep(RETRY).await;
        }
        let now = now_millis();
        let r = write(coord, |t| {
            let mut b = Batch::default();
            if let Some(o) = t
                .ops
                .get(&op.id)
                .filter(|o| o.is_running() && o.current == op.current)
            {
                let mut n = o.clone();
                if let Some(mm) = n.migration.as_mut().filter(|mm| mm.aborting.is_none()) {
                    mm.activation_sent_ms = Some(now);
                    n.updated_at_ms = now;
                    b.op(Some(o), n);
                }
            }
            Ok((b, ()))
        })
        .await;
        if let Err(e) = r {
            warn!(error = %e.message(), "cannot record that activation is sent; trying again");
            tokio::time::sleep(RETRY).await;
        }
        // Sent only from the record that says so.
        return Next::Again;
    }
    loop {
        if !still_at(coord, op.id, op.current) {
            return Next::Again;
        }
        match call(coord, m.to, cmd.clone(), COMMAND_TIMEOUT).await {
            Ok(ReplyKind::Vm(info)) if info.id == vm.id => {
                let now = now_millis();
                let r = write(coord, |t| {
                    let (Some(o), Some(v)) = (t.ops.get(&op.id), t.vms.get(&vm.id)) else {
                        return Ok((Batch::default(), false));
                    };
                    if !o.is_running() || o.current != op.current {
                        return Ok((Batch::default(), false));
                    }
                    let mut n = v.clone();
                    n.node = Some(m.to);
                    n.migrating_to = None;
                    n.moved_at_ms = Some(now);
                    // The destination's observations are numbered by its own generation.
                    n.observed = Some(Observed {
                        state: info.state.clone(),
                        pid: info.pid,
                        intent: info.intent,
                        generation: info.generation,
                        at_ms: now,
                    });
                    let mut next = o.clone();
                    while next.current < 5 {
                        next.step_done(now);
                    }
                    let mut b = Batch::default();
                    b.put(Some(v), n);
                    b.op(Some(o), next);
                    Ok((b, true))
                })
                .await;
                match r {
                    Ok(true) => {
                        info!(vm = %vm.id, name = %vm.name, to = %m.to, "VM moved: it runs on its new node");
                        // Its segment there was made from the peers of the migration's start.
                        super::reconcile::peers_stale(
                            &mut coord.reconciler.lock().unwrap_or_else(|p| p.into_inner()),
                            m.to,
                        );
                        coord.events.publish(
                            "vm",
                            vm.id.to_string(),
                            vm.name.clone(),
                            "running".into(),
                            format!("migrated to {}", node_name(coord, m.to)),
                        );
                        super::publish_op_of(coord, op.id);
                        coord.vms.wake.notify_one();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e.message(), "cannot record a migrated VM's new node; trying again");
                        tokio::time::sleep(RETRY).await;
                    }
                }
                return Next::Again;
            }
            Ok(other) => {
                // Never taken as a refusal: the destination may run it. Asked again.
                warn!(vm = %vm.id, answer = ?other, "unexpected answer to MigrateActivate");
            }
            Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::NotFound => {
                // The destination has nothing of it (an activated VM it would name, even
                // after its agent restarted): the source may run it again.
                return Next::Abort(format!(
                    "the destination lost the migrated VM before it ran ({})",
                    e.message
                ));
            }
            Err(CommandError::Rejected(e))
                if matches!(e.kind, ReplyErrorKind::Failed | ReplyErrorKind::Refused) =>
            {
                // Its activation failed for good (it stopped what it started and says so):
                // the abort asks it to confirm it holds nothing before the source resumes.
                return Next::Abort(format!(
                    "the destination could not run the VM: {}",
                    e.message
                ));
            }
            Err(e) => {
                warn!(vm = %vm.id, error = %e, "the destination has not answered MigrateActivate; the guest stays paused until it does");
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Step 5: the source removes its copy.
async fn finish(coord: &Arc<Coordinator>, op: &OpRec, m: &MigrationRec) -> Next {
    let cmd = CommandKind::MigrateFinish {
        migration: migration_id(op),
        vm: op.vm,
    };
    loop {
        if !still_at(coord, op.id, op.current) {
            return Next::Again;
        }
        if !coord.fleet.enrolled_among([m.from]).contains(&m.from) {
            break;
        }
        match call(coord, m.from, cmd.clone(), COMMAND_TIMEOUT).await {
            Ok(_) => break,
            Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::NotFound => break,
            Err(e) => {
                tracing::debug!(error = %e, "the source has not removed its copy yet");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    step_done(coord, op.id, op.current).await;
    if let Some(m) = load(coord, op.id).and_then(|(o, _)| o.migration) {
        info!(op = %op.id, vm = %op.vm_name, downtime_ms = ?m.downtime_ms, total_ms = ?m.total_ms, "migration succeeded");
    }
    Next::Again
}

/// Abandons a migration: the destination's copy goes, the source's guest runs on, the room
/// on the destination is released and the operation fails with `reason`.
async fn abort(
    coord: &Arc<Coordinator>,
    op: &OpRec,
    m: &MigrationRec,
    reason: &str,
    enrolled: &HashSet<NodeId>,
) {
    let (mid, vm) = (migration_id(op), op.vm);
    let cmd = CommandKind::MigrateAbort { migration: mid, vm };
    // Activation may have been sent: the destination's word comes first.
    let activation_sent = m.activation_sent_ms.is_some();
    let mut dest_done = !enrolled.contains(&m.to);
    if activation_sent {
        while !dest_done {
            if !coord
                .vms
                .with(|t| t.ops.get(&op.id).is_some_and(|o| o.is_running()))
            {
                return;
            }
            match call(coord, m.to, cmd.clone(), COMMAND_TIMEOUT).await {
                Ok(_) => dest_done = true,
                Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::NotFound => {
                    dest_done = true
                }
                Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::Refused => {
                    // It runs the guest: the move goes on to its end instead.
                    warn!(vm = %vm, reason = %e.message, "the destination runs the VM: completing the move instead of aborting it");
                    clear_aborting(coord, op.id).await;
                    return;
                }
                Err(e) => {
                    warn!(vm = %vm, error = %e, "waiting for the destination to confirm its abort before resuming the source");
                    tokio::time::sleep(RETRY).await;
                    if !coord.fleet.enrolled_among([m.to]).contains(&m.to) {
                        dest_done = true;
                    }
                }
            }
        }
    } else if let Ok(_) | Err(CommandError::Rejected(_)) =
        call(coord, m.to, cmd.clone(), COMMAND_TIMEOUT).await
    {
        dest_done = true;
    }
    // The source resumes the guest (or finds it running: nothing to do). A failure to
    // resume is tried again a while, then told.
    let mut source_trouble = None;
    let mut failures = 0;
    loop {
        if !coord.fleet.enrolled_among([m.from]).contains(&m.from) {
            break;
        }
        match call(coord, m.from, cmd.clone(), COMMAND_TIMEOUT).await {
            Ok(_) => break,
            Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::Failed => {
                failures += 1;
                if failures >= RESUME_TRIES {
                    source_trouble = Some(e.message);
                    break;
                }
                tokio::time::sleep(RETRY).await;
            }
            Err(CommandError::Rejected(e)) if e.kind != ReplyErrorKind::Busy => break,
            Err(e) => {
                warn!(vm = %vm, error = %e, "the source has not confirmed the abort yet");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    if !dest_done {
        // Not activated, so it cannot run the guest; told again in the background until
        // it answers, and its agent removes a stale incoming VM at its restart anyway.
        let (coord2, cmd2, to) = (coord.clone(), cmd.clone(), m.to);
        tokio::spawn(async move {
            for _ in 0..600 {
                if !coord2.fleet.enrolled_among([to]).contains(&to) {
                    return;
                }
                match call(&coord2, to, cmd2.clone(), COMMAND_TIMEOUT).await {
                    Ok(_) | Err(CommandError::Rejected(_)) => return,
                    Err(_) => tokio::time::sleep(RETRY).await,
                }
            }
        });
    }
    let now = now_millis();
    let r = write(coord, |t| {
        let mut b = Batch::default();
        if let Some(v) = t.vms.get(&op.vm) {
            if v.migrating_to == Some(m.to) {
                let mut n = v.clone();
                n.migrating_to = None;
                b.put(Some(v), n);
            }
        }
        if let Some(o) = t.ops.get(&op.id).filter(|o| o.is_running()) {
            let mut n = o.clone();
            let outcome = match &source_trouble {
                None => format!("the VM stays on its node {}", node_name(coord, m.from)),
                Some(why) => format!(
                    "the VM stays on its node {}, but its guest could not be resumed there \
                     ({why}): see `zy vm console`, and restart the VM if it stays paused",
                    node_name(coord, m.from)
                ),
            };
            n.fail(format!("{reason}; {outcome}"), now);
            b.op(Some(o), n);
        }
        Ok((b, ()))
    })
    .await;
    if let Err(e) = r {
        warn!(error = %e.message(), "cannot record an abandoned migration; trying again");
        return;
    }
    warn!(op = %op.id, vm = %op.vm_name, %reason, "migration abandoned; the VM stays where it was");
    super::publish_op_of(coord, op.id);
    coord.vms.wake.notify_one();
}

/// The destination runs the guest after all: the abort is taken back and the move goes on.
async fn clear_aborting(coord: &Arc<Coordinator>, id: OpId) {
    let _ = write(coord, |t| {
        let mut b = Batch::default();
        if let Some(o) = t.ops.get(&id).filter(|o| o.is_running()) {
            let mut n = o.clone();
            if let Some(m) = n.migration.as_mut().filter(|m| m.aborting.is_some()) {
                m.aborting = None;
                b.op(Some(o), n);
            }
        }
        Ok((b, ()))
    })
    .await;
    tokio::time::sleep(RETRY).await;
}

/// Records that the migration is being abandoned, before any abort is sent, so that a
/// restarted coordinator finishes the abort.
async fn mark_aborting(coord: &Arc<Coordinator>, id: OpId, reason: &str) {
    let now = now_millis();
    let r = write(coord, |t| {
        let mut b = Batch::default();
        if let Some(o) = t.ops.get(&id).filter(|o| o.is_running()) {
            let mut n = o.clone();
            if let Some(m) = n.migration.as_mut().filter(|m| m.aborting.is_none()) {
                m.aborting = Some(reason.to_string());
                n.updated_at_ms = now;
                b.op(Some(o), n);
            }
        }
        Ok((b, ()))
    })
    .await;
    if let Err(e) = r {
        warn!(error = %e.message(), "cannot record a migration's abort; trying again");
        tokio::time::sleep(RETRY).await;
    }
}

/// The source's figures, and step 2 done.
async fn record_copied(coord: &Arc<Coordinator>, id: OpId, downtime_ms: u64, total_ms: u64) {
    let now = now_millis();
    let _ = write(coord, |t| {
        let mut b = Batch::default();
        if let Some(o) = t.ops.get(&id).filter(|o| o.is_running() && o.current == 2) {
            let mut n = o.clone();
            if let Some(m) = n.migration.as_mut() {
                m.downtime_ms = Some(downtime_ms);
                m.total_ms = Some(total_ms);
            }
            n.step_done(now);
            b.op(Some(o), n);
        }
        Ok((b, ()))
    })
    .await;
    super::publish_op_of(coord, id);
}

/// Marks step `at` of the operation done, if it is still there.
async fn step_done(coord: &Arc<Coordinator>, id: OpId, at: usize) {
    let now = now_millis();
    let _ = write(coord, |t| {
        let mut b = Batch::default();
        if let Some(o) = t.ops.get(&id).filter(|o| o.is_running() && o.current == at) {
            let mut n = o.clone();
            n.step_done(now);
            b.op(Some(o), n);
        }
        Ok((b, ()))
    })
    .await;
    super::publish_op_of(coord, id);
}

/// Ends the operation failed (with nothing to undo).
async fn fail(coord: &Arc<Coordinator>, id: OpId, reason: &str, now: u64) {
    let _ = write(coord, |t| {
        let mut b = Batch::default();
        if let Some(o) = t.ops.get(&id).filter(|o| o.is_running()) {
            let mut n = o.clone();
            n.fail(reason, now);
            b.op(Some(o), n);
        }
        Ok((b, ()))
    })
    .await;
    super::publish_op_of(coord, id);
}

/// Whether the operation still runs at step `at` with no abort recorded.
fn still_at(coord: &Coordinator, id: OpId, at: usize) -> bool {
    coord.vms.with(|t| {
        t.ops.get(&id).is_some_and(|o| {
            o.is_running()
                && o.current == at
                && o.migration.as_ref().is_some_and(|m| m.aborting.is_none())
                && t.vms
                    .get(&o.vm)
                    .is_some_and(|v| v.desired != VmDesired::Deleted)
        })
    })
}

fn node_name(coord: &Coordinator, n: NodeId) -> String {
    coord
        .fleet
        .find(&n.to_string())
        .map(|l| l.record.name)
        .unwrap_or_else(|| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zy_common::vm::Generation;

    fn running(v: &mut VmRec) {
        v.observed = Some(Observed {
            state: VmState::Running,
            pid: Some(1),
            intent: v.generation,
            generation: Generation(3),
            at_ms: 0,
        });
    }

    #[test]
    fn what_ends_a_migration_depends_on_how_far_it_went() {
        let mut v = crate::store::test_vm("w1");
        running(&mut v);
        let to = NodeId::new_random();
        let (_, _, mut op) =
            plan_migrate(&Table::default(), &v, to, MoveCause::Asked, None, 0).unwrap();
        let m = op.migration.clone().unwrap();
        let both: HashSet<NodeId> = [m.from, m.to].into_iter().collect();
        let only_to: HashSet<NodeId> = [m.to].into_iter().collect();
        let only_from: HashSet<NodeId> = [m.from].into_iter().collect();
        assert_eq!(abort_reason(&op, &m, &v, &both, 1), None);
        let mut deleted = v.clone();
        deleted.desired = VmDesired::Deleted;
        // Before activation: a delete, a removed node or the deadline abandon it.
        assert!(abort_reason(&op, &m, &deleted, &both, 1)
            .unwrap()
            .contains("deleted"));
        assert!(abort_reason(&op, &m, &v, &only_to, 1)
            .unwrap()
            .contains("source"));
        assert!(abort_reason(&op, &m, &v, &only_from, 1)
            .unwrap()
            .contains("destination"));
        assert!(abort_reason(&op, &m, &v, &both, 7 * 3_600_000)
            .unwrap()
            .contains("hours"));
        // Activation sent: the destination may run the guest; a delete, a removed source
        // or age wait for the move to end. Only the destination's removal (or its own word,
        // recorded as `aborting`) ends it.
        let mut sent = m.clone();
        sent.activation_sent_ms = Some(1);
        op.current = 3;
        assert_eq!(
            abort_reason(&op, &sent, &deleted, &only_to, 7 * 3_600_000),
            None
        );
        assert!(abort_reason(&op, &sent, &v, &only_from, 1).is_some());
        // The record moved: never an abort, whatever was recorded.
        op.current = 5;
        let mut told = sent.clone();
        told.aborting = Some("x".into());
        assert_eq!(
            abort_reason(&op, &told, &deleted, &HashSet::new(), u64::MAX),
            None
        );
    }

    #[test]
    fn a_delete_aborts_a_migration_only_before_activation_may_have_been_sent() {
        let mut t = Table::default();
        let mut v = crate::store::test_vm("w1");
        running(&mut v);
        let (_, n, op) =
            plan_migrate(&t, &v, NodeId::new_random(), MoveCause::Asked, None, 0).unwrap();
        t.vms.insert(n.id, n.clone());
        t.ops.insert(op.id, op.clone());
        let (b, _, _) = super::super::plan_delete(&t, "w1", None, 1).unwrap();
        let aborted = b.ops.iter().find(|o| o.id == op.id).cloned().unwrap();
        assert!(
            aborted.is_running(),
            "the driver aborts it: the op stays open"
        );
        assert!(aborted
            .migration
            .unwrap()
            .aborting
            .unwrap()
            .contains("delete"));
        // Activation sent: the move ends first; the delete then reaches the new node.
        let mut later = op.clone();
        later.current = 3;
        later.migration.as_mut().unwrap().activation_sent_ms = Some(1);
        t.ops.insert(later.id, later.clone());
        let (b, _, _) = super::super::plan_delete(&t, "w1", None, 1).unwrap();
        assert!(b.ops.iter().all(|o| o.id != later.id));
    }

    #[test]
    fn only_a_running_vm_with_no_operation_under_way_migrates() {
        let mut t = Table::default();
        let mut v = crate::store::test_vm("w1");
        let to = NodeId::new_random();
        // Not yet reported running.
        let e = plan_migrate(&t, &v, to, MoveCause::Asked, None, 1).unwrap_err();
        assert!(e.message().contains("not running"), "{}", e.message());
        running(&mut v);
        v.desired = VmDesired::Stopped;
        assert!(plan_migrate(&t, &v, to, MoveCause::Asked, None, 1).is_err());
        v.desired = VmDesired::Running;
        // To its own node.
        let e = plan_migrate(&t, &v, v.node.unwrap(), MoveCause::Asked, None, 1).unwrap_err();
        assert!(e.message().contains("already"), "{}", e.message());
        let (b, n, op) = plan_migrate(&t, &v, to, MoveCause::Drain, Some("k".into()), 1).unwrap();
        assert_eq!(n.migrating_to, Some(to));
        assert_eq!(n.generation, v.generation, "a move is no change of intent");
        let m = op.migration.clone().unwrap();
        assert_eq!(
            (m.from, m.to, m.cause),
            (v.node.unwrap(), to, MoveCause::Drain)
        );
        assert_eq!(op.current, 1, "room held, nothing sent yet");
        assert!(!b.is_empty());
        // A second migration of it at once is refused as busy.
        t.vms.insert(n.id, n.clone());
        t.ops.insert(op.id, op);
        let e = plan_migrate(&t, &n, NodeId::new_random(), MoveCause::Asked, None, 2).unwrap_err();
        assert!(
            e.message().contains("busy with a migrate"),
            "{}",
            e.message()
        );
    }
}
