//! Durable operations: every multi-step change of a VM (create, start, stop, restart,
//! delete; later migrate, drain, failover) is recorded in the store, with its steps, before
//! any command is sent, in the same transaction as the change of intent it makes. The
//! reconciler ([`crate::vms::reconcile`]) then drives it to its end, after a reconnect or a
//! coordinator restart alike, and an operation that cannot finish ends failed with its
//! reason.
//!
//! ```text
//!                  API request (idempotency key: a repeat returns the same operation)
//!                       |
//!                       v   one transaction: the VM's new desired generation + the op
//!                 +-----------+
//!                 |  Running  |---- step condition met ----> next step (a step may bump
//!                 | (step i)  |                              the desired generation again,
//!                 +-----------+                              as restart's start does)
//!                   |   |   |
//!   last step done  |   |   +-- the VM reports failed at the step's generation,
//!                   |   |       the deadline passes, or the node is removed
//!                   v   |                          |
//!             Succeeded |                          v
//!                       +-- a delete of the VM --> Failed(reason)
//!                           supersedes it
//! ```
//!
//! Steps by kind (the first is done in the recording transaction):
//! - create:  placed and recorded -> node has taken the VM -> VM running (or stopped)
//! - start:   intent recorded -> VM running
//! - stop:    intent recorded -> VM stopped
//! - restart: stop recorded -> VM stopped -> start recorded -> VM running
//! - delete:  tombstone recorded -> node has removed the VM -> forgotten
//!
//! Deleting writes its tombstone first, always: the VM record stays, with desired state
//! `deleted`, until its node confirms (or is removed), so a lost reply or a crash can never
//! let a report bring the VM back.
//!
//! Everything here is pure: [`advance`] takes an operation, the VM as the store has it and
//! the time, and says what changes. The I/O is the reconciler's.

use serde::{Deserialize, Serialize};
use zy_api::{OpId, OpKind, VmDesired};
use zy_common::vm::{Desired, Generation, VmState};
use zy_common::VmId;

use crate::store::VmRec;

/// How long an operation of a kind may take before it ends failed. A delete waits for its
/// node however long it is away.
pub fn deadline_ms(kind: OpKind) -> Option<u64> {
    match kind {
        // Fetching a large image to a node on a slow link.
        OpKind::Create => Some(30 * 60_000),
        OpKind::Start | OpKind::Stop => Some(10 * 60_000),
        OpKind::Restart => Some(15 * 60_000),
        OpKind::Delete => None,
        // Bounded by the migration's own limits; the operation's deadline only catches a
        // coordinator that lost track of it.
        OpKind::Migrate => Some(6 * 60 * 60_000),
    }
}

/// A migration's steps. Until "copied" the source runs untouched and an abort resumes
/// it; from "copied" on, only the destination's answer decides (see [`crate::vms::migrate`]).
pub const MIGRATE_STEPS: [&str; 6] = [
    "room held on the destination",
    "destination listening",
    "copied",
    "running on the destination",
    "record moved",
    "source cleaned up",
];

/// The names of an operation's steps, in order.
pub fn step_names(kind: OpKind, start: bool) -> Vec<&'static str> {
    match kind {
        OpKind::Create if start => vec!["placed and recorded", "node has the VM", "running"],
        OpKind::Create => vec!["placed and recorded", "node has the VM", "stopped"],
        OpKind::Start => vec!["intent recorded", "running"],
        OpKind::Stop => vec!["intent recorded", "stopped"],
        OpKind::Restart => vec!["stop recorded", "stopped", "start recorded", "running"],
        OpKind::Delete => vec!["tombstone recorded", "node has removed it", "forgotten"],
        OpKind::Migrate => MIGRATE_STEPS.to_vec(),
    }
}

/// Where an operation stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    Running,
    Succeeded,
    Failed(String),
}

impl OpState {
    pub fn name(&self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::Failed(_) => "failed",
        }
    }
}

/// One step of an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub done_at_ms: Option<u64>,
}

/// An operation as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpRec {
    pub id: OpId,
    /// The client's idempotency key: a second request with the same key gets this operation.
    pub key: Option<String>,
    pub kind: OpKind,
    pub vm: VmId,
    pub vm_name: String,
    pub steps: Vec<Step>,
    /// The index of the step under way (== steps.len() once finished).
    pub current: usize,
    pub state: OpState,
    /// The VM's desired generation the current step waits for.
    pub target: Generation,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Bumped by every write: writes are compare-and-swap on it.
    pub rev: u64,
    /// A migration's nodes and outcome (`kind` migrate only).
    pub migration: Option<MigrationRec>,
}

/// Why a VM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveCause {
    /// Asked for by ops (`zy vm migrate`).
    Asked,
    /// Its node is draining.
    Drain,
    /// A consolidation plan's step.
    Consolidate,
}

impl MoveCause {
    pub fn as_str(&self) -> &'static str {
        match self {
            MoveCause::Asked => "asked",
            MoveCause::Drain => "drain",
            MoveCause::Consolidate => "consolidate",
        }
    }
}

/// A live migration's nodes and outcome, kept with its operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRec {
    pub from: zy_common::NodeId,
    pub to: zy_common::NodeId,
    pub cause: MoveCause,
    /// The guest's pause at the switch-over, as the source's QEMU measured it.
    pub downtime_ms: Option<u64>,
    /// From the first byte to the switch-over.
    pub total_ms: Option<u64>,
    /// Why it is being abandoned: set before the first abort command is sent, so that a
    /// restarted coordinator finishes the abort (the destination first, then the source).
    pub aborting: Option<String>,
    /// When MigrateActivate was first sent: recorded before it goes. From then on the
    /// destination may run the guest, and only its answer may let the source resume it.
    pub activation_sent_ms: Option<u64>,
}

impl OpRec {
    /// A new operation whose first step (the recording) is done.
    pub fn new(
        kind: OpKind,
        vm: &VmRec,
        target: Generation,
        key: Option<String>,
        now_ms: u64,
    ) -> Self {
        let start = vm.desired == VmDesired::Running;
        let mut steps: Vec<Step> = step_names(kind, start)
            .into_iter()
            .map(|n| Step {
                name: n.to_string(),
                done_at_ms: None,
            })
            .collect();
        steps[0].done_at_ms = Some(now_ms);
        Self {
            id: OpId::new_random(),
            key,
            kind,
            vm: vm.id,
            vm_name: vm.name.clone(),
            steps,
            current: 1,
            state: OpState::Running,
            target,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            rev: 1,
            migration: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.state == OpState::Running
    }

    /// Marks the current step done and moves on; the last one ends the operation.
    pub fn step_done(&mut self, now_ms: u64) {
        if let Some(s) = self.steps.get_mut(self.current) {
            s.done_at_ms = Some(now_ms);
        }
        self.current += 1;
        self.updated_at_ms = now_ms;
        if self.current >= self.steps.len() {
            self.state = OpState::Succeeded;
        }
    }

    /// Ends the operation failed.
    pub fn fail(&mut self, reason: impl Into<String>, now_ms: u64) {
        self.state = OpState::Failed(reason.into());
        self.updated_at_ms = now_ms;
    }
}

/// What [`advance`] decided.
#[derive(Clone, Debug, PartialEq)]
// Made once per operation per tick and consumed at once: boxing would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
pub enum Advance {
    /// Nothing to do yet.
    Wait,
    /// Write this operation (a step done, or the end), and this VM if given (a step that
    /// changes the intent).
    Write(OpRec, Option<Box<VmRec>>),
}

/// The next move of a running operation, given the VM as the store has it (`None` once
/// the VM is forgotten) and whether its node is still enrolled.
pub fn advance(op: &OpRec, vm: Option<&VmRec>, node_enrolled: bool, now_ms: u64) -> Advance {
    if !op.is_running() {
        return Advance::Wait;
    }
    let mut next = op.clone();
    next.rev += 1;
    let Some(vm) = vm else {
        // Only a delete forgets a VM; any other operation on it is over.
        if op.kind == OpKind::Delete {
            while next.is_running() {
                next.step_done(now_ms);
            }
        } else {
            next.fail("the VM was deleted", now_ms);
        }
        return Advance::Write(next, None);
    };
    if matches!(op.kind, OpKind::Delete | OpKind::Migrate) {
        // A delete is finished by the reconciler when the node confirms; a migration by
        // its own driver (`vms::migrate`), which alone may undo what it began.
        return Advance::Wait;
    }
    if !node_enrolled {
        next.fail("the VM's node was removed", now_ms);
        return Advance::Write(next, None);
    }
    if let Some(limit) = deadline_ms(op.kind) {
        if now_ms.saturating_sub(op.created_at_ms) > limit {
            let seen = vm
                .observed
                .as_ref()
                .map(|o| o.state.to_string())
                .unwrap_or_else(|| "nothing yet".into());
            next.fail(
                format!(
                    "did not finish within {} minutes (the node last reported: {seen}); the VM \
                     stays as asked and gets there when its node can, or delete it",
                    limit / 60_000
                ),
                now_ms,
            );
            return Advance::Write(next, None);
        }
    }
    let step = op.steps.get(op.current).map(|s| s.name.as_str());
    let obs = vm.observed.as_ref().filter(|o| o.intent >= op.target);
    match (op.kind, step) {
        (OpKind::Create, Some("node has the VM")) => {
            if obs.is_some() {
                next.step_done(now_ms);
                // The VM may be there already: look again at once.
                return match advance(&next, Some(vm), node_enrolled, now_ms) {
                    Advance::Wait => Advance::Write(next, None),
                    other => other,
                };
            }
            Advance::Wait
        }
        (OpKind::Restart, Some("start recorded")) => {
            let mut v = vm.clone();
            v.desired = VmDesired::Running;
            v.generation = v.generation.next();
            next.target = v.generation;
            next.step_done(now_ms);
            Advance::Write(next, Some(Box::new(v)))
        }
        (_, Some(want @ ("running" | "stopped"))) => {
            let Some(o) = obs else { return Advance::Wait };
            match &o.state {
                VmState::Failed(r) => {
                    next.fail(r.clone(), now_ms);
                    Advance::Write(next, None)
                }
                s if s.name() == want => {
                    next.step_done(now_ms);
                    Advance::Write(next, None)
                }
                _ => Advance::Wait,
            }
        }
        _ => Advance::Wait,
    }
}

/// The desired state a VM's node is to be given, from the stored desired state.
pub fn node_desired(d: VmDesired) -> Option<Desired> {
    match d {
        VmDesired::Running => Some(Desired::Running),
        VmDesired::Stopped => Some(Desired::Stopped),
        VmDesired::Deleted => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Observed;

    fn vm(desired: VmDesired, generation: u64) -> VmRec {
        VmRec {
            desired,
            generation: Generation(generation),
            ..crate::store::test_vm("w1")
        }
    }

    fn seen(v: &mut VmRec, state: VmState, intent: u64, generation: u64) {
        v.observed = Some(Observed {
            state,
            pid: None,
            intent: Generation(intent),
            generation: Generation(generation),
            at_ms: 0,
        });
    }

    fn step_of(a: &Advance) -> (usize, OpState) {
        match a {
            Advance::Write(op, _) => (op.current, op.state.clone()),
            Advance::Wait => (usize::MAX, OpState::Running),
        }
    }

    #[test]
    fn a_create_waits_for_the_node_then_for_running() {
        let mut v = vm(VmDesired::Running, 1);
        let op = OpRec::new(OpKind::Create, &v, Generation(1), None, 0);
        assert_eq!(advance(&op, Some(&v), true, 1), Advance::Wait);
        // Old news (an older intent) does not count.
        seen(&mut v, VmState::Running, 0, 5);
        assert_eq!(advance(&op, Some(&v), true, 1), Advance::Wait);
        seen(&mut v, VmState::Creating, 1, 6);
        let Advance::Write(op, None) = advance(&op, Some(&v), true, 2) else {
            panic!()
        };
        assert_eq!(op.current, 2);
        assert_eq!(advance(&op, Some(&v), true, 3), Advance::Wait);
        seen(&mut v, VmState::Running, 1, 7);
        assert_eq!(
            step_of(&advance(&op, Some(&v), true, 4)).1,
            OpState::Succeeded
        );
        // Already running when first looked at: both steps at once.
        let op = OpRec::new(OpKind::Create, &v, Generation(1), None, 0);
        assert_eq!(
            step_of(&advance(&op, Some(&v), true, 4)).1,
            OpState::Succeeded
        );
    }

    #[test]
    fn a_failure_at_the_target_generation_fails_the_op_and_an_older_one_does_not() {
        let mut v = vm(VmDesired::Running, 3);
        let op = OpRec::new(OpKind::Start, &v, Generation(3), None, 0);
        seen(&mut v, VmState::failed("old crash"), 2, 9);
        assert_eq!(advance(&op, Some(&v), true, 1), Advance::Wait);
        seen(&mut v, VmState::failed("no such kernel"), 3, 10);
        assert_eq!(
            step_of(&advance(&op, Some(&v), true, 1)).1,
            OpState::Failed("no such kernel".into())
        );
    }

    #[test]
    fn a_restart_stops_then_records_a_new_start_intent() {
        let mut v = vm(VmDesired::Stopped, 4);
        let op = OpRec::new(OpKind::Restart, &v, Generation(4), None, 0);
        seen(&mut v, VmState::Stopped, 4, 11);
        let Advance::Write(op, None) = advance(&op, Some(&v), true, 1) else {
            panic!()
        };
        let Advance::Write(op, Some(v2)) = advance(&op, Some(&v), true, 2) else {
            panic!()
        };
        let v2 = *v2;
        assert_eq!(
            (v2.desired, v2.generation),
            (VmDesired::Running, Generation(5))
        );
        assert_eq!(op.target, Generation(5));
        let mut v = v2;
        // Still stopped at the old generation: wait.
        assert_eq!(advance(&op, Some(&v), true, 3), Advance::Wait);
        seen(&mut v, VmState::Running, 5, 12);
        assert_eq!(
            step_of(&advance(&op, Some(&v), true, 4)).1,
            OpState::Succeeded
        );
    }

    #[test]
    fn deadlines_removed_nodes_and_vanished_vms_end_operations() {
        let v = vm(VmDesired::Running, 1);
        let op = OpRec::new(OpKind::Start, &v, Generation(1), None, 0);
        assert!(matches!(
            step_of(&advance(&op, Some(&v), true, 11 * 60_000)).1,
            OpState::Failed(r) if r.contains("10 minutes")
        ));
        assert!(matches!(
            step_of(&advance(&op, Some(&v), false, 1)).1,
            OpState::Failed(r) if r.contains("removed")
        ));
        assert!(matches!(
            step_of(&advance(&op, None, true, 1)).1,
            OpState::Failed(_)
        ));
        let del = OpRec::new(OpKind::Delete, &v, Generation(2), None, 0);
        // A delete never times out, and ends when the VM is forgotten.
        assert_eq!(advance(&del, Some(&v), true, u64::MAX / 2), Advance::Wait);
        assert_eq!(step_of(&advance(&del, None, true, 1)).1, OpState::Succeeded);
    }
}
