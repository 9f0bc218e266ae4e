//! The reconciler: one task that brings every VM to what the site wants and every operation
//! to its end, from what the store holds, whatever happened before (a coordinator restart,
//! a node that reconnects, a reply that never came).
//!
//! Each tick (and whenever woken by a new intent or observation):
//! 1. every running operation is advanced ([`crate::ops::advance`]), written with
//!    compare-and-swap;
//! 2. every VM whose node has not taken up its desired generation is sent its intent
//!    ([`CommandKind::EnsureVm`] or [`CommandKind::DeleteVm`]), at most one in flight per VM,
//!    sent again after a timeout, a disconnect or a busy node. Intents are idempotent by
//!    (VM, generation) at the agent, so sending one twice is harmless;
//! 3. every connected node whose zone's peers changed is told them, coalesced: one update per
//!    node once its zone's membership has settled, not one per report.
//!
//! Observations from nodes ([`observe`]) are applied only when newer than the stored one
//! (the agent's observed generation), a whole report in one transaction.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use zy_api::{OpKind, VmDesired};
use zy_common::proto::{CommandKind, ReplyErrorKind, ReplyKind, VmInfo, VmIntent};
use zy_common::time::now_millis;
use zy_common::vm::{Desired, Generation, VmState};
use zy_common::{NodeId, VmId, Zone};

use super::{publish_op, write, zone_net, Batch, Table};
use crate::fleet::CommandError;
use crate::ops::{self, Advance};
use crate::store::{Observed, VmRec};
use crate::Coordinator;

/// How often the reconciler looks, when nothing wakes it sooner.
pub const TICK: Duration = Duration::from_millis(250);
/// How long an intent may go unanswered before it is sent again.
const ENSURE_TIMEOUT: Duration = Duration::from_secs(30);
/// A delete stops QEMU at once and removes the VM's files: allow for a slow disk.
const DELETE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait before sending again to a node that was busy or went away.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long to wait before sending again an intent the node refused or failed.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// Peer updates wait for the zone's membership to be unchanged this long...
pub const PEERS_SETTLE: Duration = Duration::from_millis(500);
/// ...but no longer than this while it keeps changing.
pub const PEERS_MAX_DELAY: Duration = Duration::from_secs(5);
/// How long a node whose peer update failed waits for the next one.
pub const PEERS_RETRY: Duration = Duration::from_secs(10);

/// What the reconciler keeps between ticks (in memory only: after a restart every intent is
/// simply sent again).
#[derive(Debug, Default)]
pub struct State {
    /// Per VM: the generation sent, the session it went on, and when it may be sent again
    /// (at once if the node's session changed meanwhile).
    inflight: HashMap<VmId, (Generation, u64, Instant)>,
    /// Per node: the session and the peers it was last told, per VNI.
    peers_sent: HashMap<NodeId, (u64, u32, Vec<Ipv4Addr>)>,
    peers_inflight: HashSet<NodeId>,
    /// Per zone: its connected nodes as last seen, since when, and when last sent.
    zones: HashMap<Zone, ZonePeers>,
    /// The fleet epoch peers were last computed at, and whether an update failed since.
    peers_epoch: Option<u64>,
    peers_retry: bool,
    /// Per node whose last update failed: not before when to send it again.
    peers_backoff: HashMap<NodeId, Instant>,
    /// The nodes hosting VMs when peers were last computed.
    peers_hosting: HashSet<NodeId>,
    /// Peer updates sent (for the reconnect-storm benchmark).
    pub peer_updates: u64,
}

#[derive(Debug)]
struct ZonePeers {
    /// Connected members: node, underlay address, session (a reconnect is a change too: the
    /// node, or its peers, may have lost what they were told).
    members: Vec<(NodeId, Ipv4Addr, u64)>,
    changed: Instant,
    first_unsent_change: Option<Instant>,
    /// A change not yet told to every member.
    dirty: bool,
}

/// Runs until the coordinator stops.
pub async fn run(coord: Arc<Coordinator>) {
    let state = coord.reconciler.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            // Wake-ups while a tick runs are kept as one by the Notify.
            _ = coord.vms.wake.notified() => {}
        }
        tick(&coord, &state).await;
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a VM's node is to be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    Ensure(Desired),
    Delete,
}

/// The VMs whose node has not taken up what is wanted (in a settled site, none), each with
/// what to send it. Pure.
pub fn pending_intents(t: &Table) -> Vec<(VmRec, Intent)> {
    t.vms
        .values()
        .filter_map(|v| match ops::node_desired(v.desired) {
            None => Some((v.clone(), Intent::Delete)),
            Some(d) if v.observed.as_ref().is_none_or(|o| o.intent < v.generation) => {
                Some((v.clone(), Intent::Ensure(d)))
            }
            Some(_) => None,
        })
        .collect()
}

/// One pass.
pub async fn tick(coord: &Arc<Coordinator>, state: &Arc<Mutex<State>>) {
    // Only the nodes of VMs with work to do are looked up: a tick of a settled site costs
    // what its VM table costs, not what its fleet does.
    let in_play = coord.vms.with(nodes_in_play);
    let enrolled = coord.fleet.enrolled_among(in_play);
    advance_ops(coord, &enrolled).await;
    super::migrate::drive_all(coord);
    let pending = coord.vms.with(pending_intents);
    let now = Instant::now();
    let mut forget = Vec::new();
    for (v, intent) in &pending {
        let Some(node) = v.node.filter(|n| enrolled.contains(n)) else {
            if v.desired == VmDesired::Deleted {
                forget.push(v.id);
            }
            continue;
        };
        let Some(session) = coord.fleet.session(node) else {
            continue;
        };
        {
            let s = lock(state);
            match s.inflight.get(&v.id) {
                Some((g, sid, until))
                    if *g >= v.generation && *sid == session.id && *until > now =>
                {
                    continue
                }
                _ => {}
            }
        }
        let (kind, timeout) = match *intent {
            Intent::Delete => (
                CommandKind::DeleteVm {
                    id: v.id,
                    generation: v.generation,
                },
                DELETE_TIMEOUT,
            ),
            Intent::Ensure(desired) => {
                let vm = match super::wire(coord, v, node) {
                    Ok(w) => w,
                    Err(e) => {
                        warn!(vm = %v.id, error = %e, "cannot describe the VM to its node yet");
                        continue;
                    }
                };
                (
                    CommandKind::EnsureVm(Box::new(VmIntent {
                        vm,
                        desired,
                        generation: v.generation,
                        stop_grace_ms: super::STOP_GRACE_MS,
                    })),
                    ENSURE_TIMEOUT,
                )
            }
        };
        lock(state)
            .inflight
            .insert(v.id, (v.generation, session.id, now + timeout));
        let (coord, state, id, generation) = (coord.clone(), state.clone(), v.id, v.generation);
        let sid = session.id;
        tokio::spawn(async move {
            let result = session.command(kind, timeout).await;
            let retry = match result {
                Ok(ReplyKind::Vm(info)) => {
                    observe(&coord, node, vec![info], None).await;
                    None
                }
                Ok(_) => {
                    // A delete is done.
                    finish_deletion(&coord, id).await;
                    None
                }
                Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::NotFound => {
                    finish_deletion(&coord, id).await;
                    None
                }
                Err(CommandError::Rejected(e)) if e.kind == ReplyErrorKind::Busy => {
                    Some(RETRY_AFTER)
                }
                Err(CommandError::Rejected(e)) => {
                    warn!(vm = %id, %generation, error = %e.message, "the node refused the VM's intent");
                    fail_op(&coord, id, &format!("the node refused: {}", e.message)).await;
                    Some(RETRY_REFUSED)
                }
                Err(e) => {
                    tracing::debug!(vm = %id, error = %e, "intent not delivered; sending again");
                    Some(RETRY_AFTER)
                }
            };
            // Answered: the node reports taking the intent up as it does (an actor busy
            // starting the VM takes it after that), so the entry stands until its timeout or
            // a new session. Not delivered: sent again soon.
            if let Some(after) = retry {
                lock(&state)
                    .inflight
                    .insert(id, (generation, sid, Instant::now() + after));
            }
        });
    }
    for id in forget {
        warn!(vm = %id, "a deleted VM's node was removed before it removed the VM; forgotten (wipe that server before enrolling it again)");
        finish_deletion(coord, id).await;
    }
    sync_peers(coord, state, now);
}

/// The nodes of VMs that have an operation running or an intent their node has not taken
/// up: the only nodes a tick asks about. Pure.
pub fn nodes_in_play(t: &Table) -> HashSet<NodeId> {
    let ops = t
        .ops
        .values()
        .filter(|o| o.is_running())
        .filter_map(|o| t.vms.get(&o.vm)?.node);
    let intents = t.vms.values().filter_map(|v| {
        let pending = match ops::node_desired(v.desired) {
            None => true,
            Some(_) => v.observed.as_ref().is_none_or(|o| o.intent < v.generation),
        };
        v.node.filter(|_| pending)
    });
    ops.chain(intents).collect()
}

/// Advances every running operation as far as it goes now.
/// Every running operation advanced as far as it goes now, as a batch and the operations it
/// writes. Pure.
pub fn plan_advance(t: &Table, nodes: &HashSet<NodeId>, now: u64) -> (Batch, Vec<ops::OpRec>) {
    let mut b = Batch::default();
    let mut done = Vec::new();
    for op in t.ops.values().filter(|o| o.is_running()) {
        let vm = t.vms.get(&op.vm);
        let enrolled = vm.and_then(|v| v.node).is_some_and(|n| nodes.contains(&n));
        if let Advance::Write(next, v) = ops::advance(op, vm, enrolled, now) {
            if let (Some(v), Some(old)) = (v, vm) {
                b.put(Some(old), *v);
            }
            b.op(Some(op), next.clone());
            done.push(next);
        }
    }
    (b, done)
}

async fn advance_ops(coord: &Arc<Coordinator>, nodes: &HashSet<NodeId>) {
    let now = now_millis();
    let changed = write(coord, |t| Ok(plan_advance(t, nodes, now))).await;
    match changed {
        Ok(ops) => {
            for op in &ops {
                publish_op(coord, op);
                if !op.is_running() {
                    info!(op = %op.id, vm = %op.vm_name, kind = op.kind.as_str(), state = op.state.name(), "operation ended");
                }
            }
        }
        Err(e) => warn!(error = %e.message(), "cannot advance operations"),
    }
}

/// Ends the operation under way on a VM as failed.
async fn fail_op(coord: &Arc<Coordinator>, vm: VmId, reason: &str) {
    let now = now_millis();
    let r = write(coord, |t| {
        let mut b = Batch::default();
        let mut out = None;
        if let Some(op) = t
            .running_op(vm)
            .filter(|o| !matches!(o.kind, OpKind::Delete | OpKind::Migrate))
        {
            let mut n = op.clone();
            n.fail(reason, now);
            b.op(Some(op), n.clone());
            out = Some(n);
        }
        Ok((b, out))
    })
    .await;
    if let Ok(Some(op)) = r {
        publish_op(coord, &op);
    }
}

/// A deleted VM is gone from its node (or its node is gone): forget it, and finish its
/// delete operation, in one transaction.
pub async fn finish_deletion(coord: &Arc<Coordinator>, id: VmId) {
    let now = now_millis();
    let r = write(coord, |t| Ok(plan_forget(t, id, now))).await;
    match r {
        Ok(Some((name, ops))) => {
            for op in &ops {
                publish_op(coord, op);
            }
            coord.events.publish(
                "vm",
                id.to_string(),
                name,
                "deleted".into(),
                "removed from its node and forgotten".into(),
            );
            info!(vm = %id, "VM deleted");
        }
        // Forgotten already (a report said so first).
        Ok(None) => {}
        Err(e) => warn!(vm = %id, error = %e.message(), "cannot record a finished deletion"),
    }
}

/// A deleted VM's end, if it is a tombstone: the batch, its name and the operations
/// written. Pure.
pub fn plan_forget(t: &Table, id: VmId, now: u64) -> (Batch, Option<(String, Vec<ops::OpRec>)>) {
    let mut b = Batch::default();
    let out = t
        .vms
        .get(&id)
        .filter(|v| v.desired == VmDesired::Deleted)
        .map(|v| (v.name.clone(), forget(t, v, &mut b, now)));
    (b, out)
}

/// Adds to `b` the end of a deleted VM: its record goes, its delete operation succeeds and
/// any other still running fails. Returns the operations as written.
fn forget(t: &Table, v: &VmRec, b: &mut Batch, now: u64) -> Vec<ops::OpRec> {
    b.remove(v);
    let mut out = Vec::new();
    for op in t.ops.values().filter(|o| o.vm == v.id && o.is_running()) {
        let mut n = op.clone();
        if n.kind == OpKind::Delete {
            while n.is_running() {
                n.step_done(now);
            }
        } else {
            n.fail("the VM was deleted", now);
        }
        b.op(Some(op), n.clone());
        out.push(n);
    }
    out
}

/// A state change to publish: VM, name, state, detail.
pub type Change = (VmId, String, String, String);

/// What a node said, as a batch: each observation taken if newer than the stored one, and
/// for a `full` report what the node does not list (see [`observe`]). Pure.
pub fn plan_observe(
    t: &Table,
    node: NodeId,
    infos: &[VmInfo],
    full: Option<Generation>,
    now: u64,
) -> (Batch, Vec<Change>) {
    let mut b = Batch::default();
    let mut changes: Vec<Change> = Vec::new();
    for info in infos {
        let Some(v) = t.vms.get(&info.id) else {
            if full.is_none() {
                warn!(vm = %info.id, node = %node, "a node reports a VM this coordinator does not know");
            }
            continue;
        };
        if v.node != Some(node) {
            warn!(vm = %info.id, node = %node, "a node reports a VM placed elsewhere");
            continue;
        }
        if v.observed
            .as_ref()
            .is_some_and(|o| o.generation >= info.generation)
        {
            continue;
        }
        let before = v.observed.as_ref().map(|o| o.state.clone());
        let mut n = v.clone();
        // Running straight to stopped at the current intent with no operation under
        // way: the guest powered itself off, and it is to stay off.
        if before == Some(VmState::Running)
            && info.state == VmState::Stopped
            && v.desired == VmDesired::Running
            && info.intent >= v.generation
            && t.running_op(v.id).is_none()
        {
            n.desired = VmDesired::Stopped;
            n.generation = v.generation.next();
        }
        n.observed = Some(Observed {
            state: info.state.clone(),
            pid: info.pid,
            intent: info.intent,
            generation: info.generation,
            at_ms: now,
        });
        if before.as_ref() != Some(&info.state) {
            changes.push((
                v.id,
                v.name.clone(),
                info.state.name().to_string(),
                match &info.state {
                    VmState::Failed(r) => r.clone(),
                    s => format!(
                        "{} -> {}",
                        before.as_ref().map(|b| b.name()).unwrap_or("pending"),
                        s.name()
                    ),
                },
            ));
        }
        b.put(Some(v), n);
    }
    if let Some(report) = full {
        let listed: HashSet<VmId> = infos.iter().map(|i| i.id).collect();
        for v in t.vms.values().filter(|v| {
            v.node == Some(node)
                && !listed.contains(&v.id)
                // Seen since the report was taken: the report is old news about it.
                && v.observed.as_ref().is_none_or(|o| o.generation < report)
        }) {
            match (&v.desired, v.observed.as_ref().map(|o| &o.state)) {
                // Forgotten only when the node confirms the delete, never on absence: a
                // report cannot prove that no command made the VM since it was taken.
                (VmDesired::Deleted, _) => {}
                (_, None | Some(VmState::Pending | VmState::Creating | VmState::Failed(_))) => {
                    // Never made (or its making was cut short): absent as of the report, so
                    // that older news of it is refused, and handed over again (no intent).
                    let mut n = v.clone();
                    n.observed = Some(Observed {
                        state: VmState::Pending,
                        pid: None,
                        intent: Generation(0),
                        generation: report,
                        at_ms: now,
                    });
                    b.put(Some(v), n);
                }
                (_, Some(_)) => {
                    let mut n = v.clone();
                    let reason = "lost: its node reported it no longer has this VM (its disk is gone); `zy vm start` makes it anew from its image, `zy vm delete` removes it";
                    if let Some(o) = n.observed.as_mut() {
                        o.state = VmState::failed(reason);
                        o.pid = None;
                        o.generation = report;
                        o.at_ms = now;
                    }
                    changes.push((v.id, v.name.clone(), "failed".into(), reason.into()));
                    b.put(Some(v), n);
                }
            }
        }
    }
    (b, changes)
}

/// What a node said of its VMs: each observation taken if newer than the stored one. A
/// `full` report (with its generation) is the node's whole picture as of that generation,
/// so a VM placed on it that it does not list, and of which nothing newer was heard, was
/// not there: one it never had is handed over again, one it had is lost (failed, not
/// silently made anew with a blank disk). A deleted one is forgotten only when the node
/// confirms its delete.
pub async fn observe(
    coord: &Arc<Coordinator>,
    node: NodeId,
    infos: Vec<VmInfo>,
    full: Option<Generation>,
) {
    let now = now_millis();
    let result = write(coord, |t| Ok(plan_observe(t, node, &infos, full, now))).await;
    match result {
        Ok(changes) => {
            for (id, name, state, detail) in changes {
                info!(vm = %id, %name, %state, "VM state reported");
                coord
                    .events
                    .publish("vm", id.to_string(), name, state, detail);
            }
        }
        Err(e) => warn!(node = %node, error = %e.message(), "cannot record what a node reported"),
    }
}

/// A connected node as peer planning sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerNode {
    pub id: NodeId,
    pub zone: Zone,
    /// Its underlay address.
    pub ip: Ipv4Addr,
    /// Its session (a reconnect is a change: the node, or its peers, may have lost what
    /// they were told).
    pub session: u64,
}

/// A peer update to send: `node`, on `session`, is to be told `peers` for `vni`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub node: NodeId,
    pub session: u64,
    pub vni: u32,
    pub peers: Vec<Ipv4Addr>,
}

/// The peer updates due now, coalesced per zone: a zone's update waits until its membership
/// has been unchanged for [`PEERS_SETTLE`] (or changing for [`PEERS_MAX_DELAY`]), then goes
/// once to each member that was not already told exactly that on its current session.
/// `connected` is every connected node, or at least those in `hosting` (`epoch` the fleet's epoch: unchanged membership and
/// hosting with no update pending or failed is answered at once with nothing); only nodes in
/// `hosting` take part. Each update returned is in flight until [`peers_answered`].
/// Pure, so the reconnect-storm benchmark drives this very code.
/// Forgets what `node` was told of its peers, so that the next planning tells it again
/// (only it): after a VM arrived there by migration, whose segment was made from the peers
/// of the moment the migration began.
pub fn peers_stale(s: &mut State, node: NodeId) {
    s.peers_sent.remove(&node);
    s.peers_epoch = None;
}

pub fn plan_peers(
    s: &mut State,
    epoch: u64,
    hosting: &HashSet<NodeId>,
    connected: &[PeerNode],
    now: Instant,
) -> Vec<PeerUpdate> {
    // A zone's network spans the nodes that host its VMs; the others need nothing (a node's
    // first VM brings it the peers of the moment).
    if s.peers_hosting != *hosting {
        s.peers_hosting = hosting.clone();
        s.peers_epoch = None;
    }
    if peers_unchanged(s, epoch, hosting) {
        return Vec::new();
    }
    s.peers_epoch = Some(epoch);
    s.peers_retry = false;
    let mut by_zone: HashMap<Zone, Vec<PeerNode>> = HashMap::new();
    for n in connected.iter().filter(|n| hosting.contains(&n.id)) {
        by_zone.entry(n.zone).or_default().push(*n);
    }
    let live: HashSet<NodeId> = by_zone.values().flatten().map(|n| n.id).collect();
    s.peers_sent.retain(|n, _| live.contains(n));
    s.peers_backoff.retain(|n, _| live.contains(n));
    let mut out = Vec::new();
    for zone in [Zone::Extranet, Zone::Intranet] {
        let nodes = by_zone.get(&zone).map(Vec::as_slice).unwrap_or_default();
        let mut members: Vec<(NodeId, Ipv4Addr, u64)> =
            nodes.iter().map(|n| (n.id, n.ip, n.session)).collect();
        members.sort();
        let z = s.zones.entry(zone).or_insert(ZonePeers {
            members: Vec::new(),
            changed: now,
            first_unsent_change: None,
            dirty: false,
        });
        if z.members != members {
            z.members = members.clone();
            z.changed = now;
            z.first_unsent_change.get_or_insert(now);
            z.dirty = true;
        }
        let settled = now.duration_since(z.changed) >= PEERS_SETTLE
            || z.first_unsent_change
                .is_some_and(|f| now.duration_since(f) >= PEERS_MAX_DELAY);
        if !settled {
            continue;
        }
        z.first_unsent_change = None;
        // A change of membership (a node's session included) is told to every member,
        // even one whose list stays the same: it is also how a node's drifted state (an
        // entry removed by hand, a device rebuilt) gets repaired.
        let everyone = std::mem::take(&mut z.dirty);
        let vni = zone_net(zone).vni;
        for n in nodes {
            let peers: Vec<Ipv4Addr> = members
                .iter()
                .filter(|(_, p, _)| *p != n.ip)
                .map(|(_, p, _)| *p)
                .collect();
            let up_to_date = !everyone
                && s.peers_sent
                    .get(&n.id)
                    .is_some_and(|(sid, v, p)| *sid == n.session && *v == vni && *p == peers);
            if up_to_date {
                continue;
            }
            if s.peers_inflight.contains(&n.id)
                || s.peers_backoff.get(&n.id).is_some_and(|t| *t > now)
            {
                // Looked at again once that one is answered, or its backoff is over.
                s.peers_retry = true;
                continue;
            }
            s.peers_inflight.insert(n.id);
            s.peer_updates += 1;
            out.push(PeerUpdate {
                node: n.id,
                session: n.session,
                vni,
                peers,
            });
        }
    }
    out
}

/// Whether [`plan_peers`] would plan nothing without looking at the nodes: membership
/// (`epoch`) and hosting as last planned, no update failed since, no zone waiting to settle.
pub fn peers_unchanged(s: &State, epoch: u64, hosting: &HashSet<NodeId>) -> bool {
    s.peers_epoch == Some(epoch)
        && s.peers_hosting == *hosting
        && !s.peers_retry
        && s.zones.values().all(|z| !z.dirty)
}

/// How a planned peer update ended: taken (the node knows), or not (it is sent again, not
/// before [`PEERS_RETRY`]).
pub fn peers_answered(s: &mut State, u: PeerUpdate, ok: bool, now: Instant) {
    s.peers_inflight.remove(&u.node);
    if ok {
        s.peers_backoff.remove(&u.node);
        s.peers_sent.insert(u.node, (u.session, u.vni, u.peers));
    } else {
        // A node that cannot take it is not asked again every tick.
        s.peers_backoff.insert(u.node, now + PEERS_RETRY);
        s.peers_retry = true;
    }
}

/// Tells connected nodes that host VMs their zone's peers when they changed
/// ([`plan_peers`]).
fn sync_peers(coord: &Arc<Coordinator>, state: &Arc<Mutex<State>>, now: Instant) {
    let epoch = coord.fleet.epoch();
    let hosting = coord.vms.with(super::hosting);
    if peers_unchanged(&lock(state), epoch, &hosting) {
        return;
    }
    let mut sessions: HashMap<NodeId, crate::fleet::Session> = HashMap::new();
    let mut connected = Vec::new();
    for (id, zone, session) in coord.fleet.connected_among(&hosting) {
        let Some(ip) = super::session_ip(&session) else {
            continue;
        };
        connected.push(PeerNode {
            id,
            zone,
            ip,
            session: session.id,
        });
        sessions.insert(id, session);
    }
    let updates = plan_peers(&mut lock(state), epoch, &hosting, &connected, now);
    for u in updates {
        let Some(session) = sessions.get(&u.node).cloned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let r = session
                .command(
                    CommandKind::SyncPeers {
                        vni: u.vni,
                        peers: u.peers.clone(),
                    },
                    Duration::from_secs(30),
                )
                .await;
            if let Err(e) = &r {
                warn!(node = %session.remote, error = %e, "cannot update a node's network peers; will try again");
            }
            peers_answered(&mut lock(&state), u, r.is_ok(), Instant::now());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<PeerNode> {
        (0..n)
            .map(|i| PeerNode {
                id: NodeId(uuid::Uuid::from_u128(i as u128 + 1)),
                zone: if i % 2 == 0 {
                    Zone::Intranet
                } else {
                    Zone::Extranet
                },
                ip: Ipv4Addr::from(0x0a40_0000u32 + i as u32),
                session: 1,
            })
            .collect()
    }

    /// Plans for `ticks` ticks from `t0` with `connected`, every update answered at once;
    /// returns the updates sent.
    fn drive(
        s: &mut State,
        epoch: u64,
        hosting: &HashSet<NodeId>,
        connected: &[PeerNode],
        t0: Instant,
        ticks: u32,
    ) -> Vec<PeerUpdate> {
        let mut sent = Vec::new();
        for k in 0..ticks {
            let now = t0 + TICK * k;
            for u in plan_peers(s, epoch, hosting, connected, now) {
                sent.push(u.clone());
                peers_answered(s, u, true, now);
            }
        }
        sent
    }

    /// Review finding: a VM that arrived by migration made its node's segment from the
    /// peers of the migration's start, and nothing told the node again. After a move the
    /// destination (and only it) is told its peers as they are.
    #[test]
    fn a_migration_destination_is_told_its_peers_again_and_only_it() {
        let all = nodes(10);
        let hosting: HashSet<NodeId> = all.iter().map(|n| n.id).collect();
        let mut s = State::default();
        let t0 = Instant::now();
        assert_eq!(drive(&mut s, 1, &hosting, &all, t0, 40).len(), 10);
        // Settled: nothing more, the same epoch.
        assert!(drive(&mut s, 1, &hosting, &all, t0 + TICK * 50, 10).is_empty());
        peers_stale(&mut s, all[3].id);
        let sent = drive(&mut s, 1, &hosting, &all, t0 + TICK * 100, 10);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].node, all[3].id);
        assert_eq!(sent[0].peers.len(), 4);
    }

    #[test]
    fn peer_updates_go_once_per_node_and_only_where_something_changed() {
        let all = nodes(40);
        let hosting: HashSet<NodeId> = all.iter().map(|n| n.id).collect();
        let mut s = State::default();
        let t0 = Instant::now();
        // First sight: each node told its zone's other members, once.
        let sent = drive(&mut s, 1, &hosting, &all, t0, 40);
        assert_eq!(sent.len(), 40);
        assert!(sent.iter().all(|u| u.peers.len() == 19));

        // One agent restarts (a new session, same address): its zone is told again, once
        // each (which also repairs a member's drifted state); the other zone not.
        let mut again = all.clone();
        again[0].session = 2;
        let sent = drive(&mut s, 2, &hosting, &again, t0 + TICK * 100, 40);
        assert_eq!(sent.len(), 20);
        assert!(sent.iter().all(|u| u.vni == zone_net(Zone::Intranet).vni));

        // A node leaves: every other member of its zone is told, once; the other zone not.
        let left: Vec<PeerNode> = again[1..].to_vec();
        let sent = drive(&mut s, 3, &hosting, &left, t0 + TICK * 200, 40);
        assert_eq!(sent.len(), 19);
        assert!(sent.iter().all(|u| u.vni == zone_net(Zone::Intranet).vni));
        assert!(sent.iter().all(|u| !u.peers.contains(&all[0].ip)));

        // Nodes without VMs take no part.
        let few: HashSet<NodeId> = all[..4].iter().map(|n| n.id).collect();
        let mut s = State::default();
        let sent = drive(&mut s, 1, &few, &all, t0, 40);
        assert_eq!(sent.len(), 4);
    }

    #[test]
    fn a_reconnect_storm_sends_one_update_per_node_once_it_settles() {
        let all = nodes(200);
        let hosting: HashSet<NodeId> = all.iter().map(|n| n.id).collect();
        let mut s = State::default();
        let t0 = Instant::now();
        let mut sent = 0;
        // Back one by one over 2 s (well inside the longest delay): one update each, once
        // the membership has settled, not one per arrival.
        for k in 0..60u32 {
            let now = t0 + TICK * k;
            let back = (all.len() * (k as usize + 1) / 8).min(all.len());
            for u in plan_peers(&mut s, k.into(), &hosting, &all[..back], now) {
                sent += 1;
                peers_answered(&mut s, u, true, now);
            }
        }
        assert_eq!(sent, 200);
    }

    #[test]
    fn a_settled_site_is_planned_without_looking_at_its_nodes() {
        let all = nodes(10);
        let hosting: HashSet<NodeId> = all.iter().map(|n| n.id).collect();
        let mut s = State::default();
        let t0 = Instant::now();
        assert!(!peers_unchanged(&s, 1, &hosting), "never planned");
        drive(&mut s, 1, &hosting, &all, t0, 40);
        assert!(peers_unchanged(&s, 1, &hosting));
        assert!(!peers_unchanged(&s, 2, &hosting), "membership changed");
        let fewer: HashSet<NodeId> = all[1..].iter().map(|n| n.id).collect();
        assert!(!peers_unchanged(&s, 1, &fewer), "hosting changed");
        let u = plan_peers(&mut s, 2, &hosting, &all[1..], t0 + TICK * 100);
        assert!(u.is_empty(), "the zone waits to settle");
        assert!(!peers_unchanged(&s, 2, &hosting), "a zone waits to settle");
        let mut s2 = State::default();
        let mut failed = false;
        for k in 0..40u32 {
            for u in plan_peers(&mut s2, 1, &hosting, &all, t0 + TICK * k) {
                peers_answered(&mut s2, u, failed, t0 + TICK * k);
                failed = true;
            }
        }
        assert!(!peers_unchanged(&s2, 1, &hosting), "an update failed");
    }

    #[test]
    fn a_tick_asks_only_about_the_nodes_of_vms_with_work_to_do() {
        use crate::store::{test_vm, Observed};
        use zy_common::vm::{Generation, VmState};
        let mut t = Table::default();
        let settled = {
            let mut v = test_vm("settled");
            v.observed = Some(Observed {
                state: VmState::Running,
                pid: Some(1),
                intent: Generation(1),
                generation: Generation(1),
                at_ms: 1,
            });
            v
        };
        let unanswered = test_vm("unanswered");
        let deleted = {
            let mut v = settled.clone();
            v.id = zy_common::VmId::new_random();
            v.node = Some(NodeId::new_random());
            v.desired = VmDesired::Deleted;
            v
        };
        let unplaced = {
            let mut v = test_vm("unplaced");
            v.node = None;
            v
        };
        for v in [&settled, &unanswered, &deleted, &unplaced] {
            t.vms.insert(v.id, v.clone());
        }
        let want: HashSet<NodeId> = [unanswered.node, deleted.node]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(nodes_in_play(&t), want);
        t.vms.remove(&unanswered.id);
        t.vms.remove(&deleted.id);
        assert!(
            nodes_in_play(&t).is_empty(),
            "a settled site asks about no node"
        );
    }
}
