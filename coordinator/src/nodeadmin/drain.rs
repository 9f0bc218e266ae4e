//! The drain driver: every tick (and at once when a drain is asked), for each Draining
//! node as its record says, moves the next VMs off.
//!
//! ```text
//!  each tick, per Draining node N:
//!    nothing placed on N, nothing arriving        -> Maintenance (recorded, an event)
//!    migrations off N under way >= [drain] parallel -> wait
//!    else plan_drain on the pool as it stands (VMs moving, stopped or just tried left out)
//!         first planned moves -> migrate::start(.., MoveCause::Drain) each
//!         a VM that fits nowhere -> a note naming it and the packer's reasons; wake the
//!                                   standby node the packer names, if any
//!         a stopped VM           -> a note: it cannot move live; N stays Draining
//! ```
//!
//! Level-triggered: nothing of a drain lives in memory but notes and the time of the last
//! attempt per VM (a failed migration is tried again after [`RETRY_AFTER`]). A restarted
//! coordinator finds its Draining nodes in the store and carries on; a migration that was
//! under way is its own durable operation and ends by itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use zy_api::{OpKind, VmDesired};
use zy_common::vm::VmState;
use zy_common::VmId;
use zy_packer::consolidate::{plan_drain, DrainError, Step};

use super::{next, note, set_admin, AdminCmd};
use crate::fleet::NodeLive;
use crate::ops::MoveCause;
use crate::store::Admin;
use crate::vms::placement;
use crate::Coordinator;

/// How often Draining nodes are looked at (a drain asked wakes the driver at once).
const TICK: Duration = Duration::from_secs(1);
/// How long after a migration of a VM was started a drain may start another of it (the
/// first one failed, since the VM is still there).
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Runs the driver until the coordinator stops.
pub async fn run(coord: Arc<Coordinator>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = coord.drain_wake.notified() => {}
        }
        sample_load(&coord);
        let nodes = coord.fleet.snapshot();
        for n in nodes.iter().filter(|n| n.record.admin == Admin::Draining) {
            step(&coord, n).await;
        }
    }
}

/// Takes the latest load reports into the averages; forgets woken nodes that reported.
fn sample_load(coord: &Coordinator) {
    let now = Instant::now();
    let nodes = coord.fleet.snapshot();
    for n in &nodes {
        if let (Some(l), Some(_)) = (&n.load, &n.session) {
            coord
                .nodeadmin
                .load
                .observe(n.record.id, l.seq, l.cpu_percent, now);
        }
    }
    let ids: HashSet<_> = nodes.iter().map(|n| n.record.id).collect();
    coord.nodeadmin.load.retain(|k| ids.contains(k));
    let mut g = coord.nodeadmin.lock();
    g.waking.retain(|id, _| {
        nodes
            .iter()
            .any(|n| n.record.id == *id && n.session.is_none())
    });
    g.drain_attempts.retain(|_, t| t.elapsed() < RETRY_AFTER);
}

/// What a drain step sees of its node's VMs.
#[derive(Debug, Default, PartialEq)]
pub struct Census {
    /// VMs that hold room on the node (placed there, tombstones included, or arriving).
    pub holding: usize,
    /// Migrations off it under way.
    pub moving: usize,
    /// VMs that cannot move live (not running), by name and state.
    pub stopped: Vec<(String, String)>,
    /// VMs left out of this step's plan: moving, not running, or tried a moment ago.
    pub left_out: HashSet<VmId>,
}

/// Counts a node's VMs for a drain step. Pure.
pub fn census(t: &crate::vms::Table, node: zy_common::NodeId, tried: &HashSet<VmId>) -> Census {
    let mut c = Census::default();
    for v in t.vms.values() {
        if v.migrating_to == Some(node) {
            c.holding += 1;
        }
        if v.node != Some(node) {
            continue;
        }
        c.holding += 1;
        if let Some(op) = t.running_op(v.id) {
            if op.kind == OpKind::Migrate {
                c.moving += 1;
            }
            c.left_out.insert(v.id);
            continue;
        }
        let running = v.desired == VmDesired::Running
            && v.observed
                .as_ref()
                .is_some_and(|o| o.state == VmState::Running && o.intent >= v.generation);
        if !running {
            if v.desired != VmDesired::Deleted {
                let state = v
                    .observed
                    .as_ref()
                    .map(|o| o.state.name())
                    .unwrap_or("pending");
                c.stopped.push((v.name.clone(), state.to_string()));
            }
            c.left_out.insert(v.id);
        } else if tried.contains(&v.id) {
            c.left_out.insert(v.id);
        }
    }
    c.stopped.sort();
    c
}

/// One tick of one Draining node.
async fn step(coord: &Arc<Coordinator>, n: &NodeLive) {
    let id = n.record.id;
    let tried: HashSet<VmId> = coord
        .nodeadmin
        .lock()
        .drain_attempts
        .keys()
        .copied()
        .collect();
    let c = coord.vms.with(|t| census(t, id, &tried));
    let holding: Vec<String> = (0..c.holding).map(|i| i.to_string()).collect();
    if let Ok(Some(to)) = next(&n.record.name, n.record.admin, AdminCmd::Drained, &holding) {
        if let Err(e) = set_admin(
            coord,
            id,
            Admin::Draining,
            to,
            "drained: no VM left on it, none arriving",
        )
        .await
        {
            warn!(node = %id, error = %e.message(), "could not mark a drained node");
        }
        note(coord, n, None);
        return;
    }
    let parallel = coord.config.drain.parallel as usize;
    if c.moving >= parallel {
        return;
    }
    let mut notes = Vec::new();
    if !c.stopped.is_empty() {
        let names: Vec<String> = c
            .stopped
            .iter()
            .map(|(n, s)| format!("{n} ({s})"))
            .collect();
        notes.push(format!(
            "cannot move {} live: only running VMs migrate; start them, or delete them, and \
             the drain goes on (they stay on the node meanwhile): {}",
            if names.len() == 1 {
                "this VM"
            } else {
                "these VMs"
            },
            names.join(", ")
        ));
    }
    let Some(DrainPlanned {
        plan,
        ids,
        names,
        nodes,
    }) = plan(coord, id, &c.left_out)
    else {
        return;
    };
    let name_of = |v: &VmId| names.get(v).cloned().unwrap_or_else(|| v.to_string());
    let steps = match plan {
        Ok(p) => p.steps,
        Err(DrainError::Stuck { planned, stuck, .. }) => {
            for (vm, refusal) in &stuck {
                let mut text = format!(
                    "VM {} fits on no other node: {}",
                    name_of(&vm.0),
                    operator_text(&refusal.to_string(), &nodes)
                );
                if let Some(w) = refusal.wake {
                    let wid = ids[w];
                    let wname = coord.fleet.name_of(wid).unwrap_or_default();
                    if coord.nodeadmin.power.is_some() {
                        text.push_str(&format!("; waking standby node {wname} to make room"));
                        super::wake_in_background(
                            coord,
                            wid,
                            format!("woken to make room for the drain of node {}", n.record.name),
                        );
                    } else {
                        text.push_str(&format!(
                            "; waking standby node {wname} would make room, but no power driver is configured"
                        ));
                    }
                }
                notes.push(text);
            }
            planned
        }
        Err(e) => {
            notes.push(operator_text(&e.to_string(), &nodes));
            Vec::new()
        }
    };
    let mut started = 0;
    for s in steps {
        if c.moving + started >= parallel {
            break;
        }
        let Step::Move { vm, to, .. } = s else {
            continue;
        };
        let (vid, _) = vm;
        coord
            .nodeadmin
            .lock()
            .drain_attempts
            .insert(vid, Instant::now());
        let dest = ids[to];
        match crate::vms::migrate::start(
            coord,
            &vid.to_string(),
            Some(&dest.to_string()),
            MoveCause::Drain,
            None,
        )
        .await
        {
            Ok(a) => {
                started += 1;
                let to_name = coord.fleet.name_of(dest).unwrap_or_default();
                info!(node = %id, vm = %vid, to = %to_name, op = %a.operation.id, "drain: migration started");
                coord.events.publish(
                    "node",
                    id.to_string(),
                    n.record.name.clone(),
                    Admin::Draining.as_str().into(),
                    format!(
                        "drain: moving VM {} to {to_name} (operation {})",
                        name_of(&vid),
                        a.operation.id
                    ),
                );
                coord.vms.wake.notify_one();
            }
            Err(e) => notes.push(format!(
                "could not start moving VM {}: {} (tried again in {} s)",
                name_of(&vid),
                e.message(),
                RETRY_AFTER.as_secs()
            )),
        }
    }
    note(
        coord,
        n,
        (!notes.is_empty()).then(|| format!("drain held back: {}", notes.join("; "))),
    );
}

/// A VM as the packer's pool keys it (its id, and whether this is its arriving half).
type Key = (VmId, bool);

/// A drain plan of a node on the pool as it stands, with what it was made on.
#[derive(Debug)]
pub struct DrainPlanned {
    pub plan: Result<zy_packer::consolidate::DrainPlan<Key>, DrainError<Key>>,
    pub ids: Vec<zy_common::NodeId>,
    pub names: std::collections::HashMap<VmId, String>,
    pub nodes: Vec<placement::NodeCap>,
}

/// Plans the drain of node `id`, the VMs of `left_out` left where they are (not planned).
/// `None` if the node is not in the pool.
pub fn plan(
    coord: &Coordinator,
    id: zy_common::NodeId,
    left_out: &HashSet<VmId>,
) -> Option<DrainPlanned> {
    let nodes = crate::vms::node_caps(coord);
    let model = coord.config.resource_model();
    let policy = coord.config.packer_policy();
    let (cluster, ids, names) = coord.vms.with(|t| {
        let placed = crate::vms::placed_vms(t, &model)
            .into_iter()
            .filter(|p| !(p.node == id && !p.arriving && left_out.contains(&p.id)));
        let (cl, ids) = placement::cluster(policy, &nodes, placed);
        let names: std::collections::HashMap<VmId, String> =
            t.vms.values().map(|v| (v.id, v.name.clone())).collect();
        (cl, ids, names)
    });
    let ix = ids.iter().position(|x| *x == id)?;
    Some(DrainPlanned {
        plan: plan_drain(&cluster, ix),
        ids,
        names,
        nodes,
    })
}

/// Why a drain asked now would be stuck for room that no standby node can make: the VMs
/// that fit nowhere, with the packer's reasons; `None` if it can go (VMs that cannot move
/// live are not counted: the drain waits for them with a note).
pub fn stuck_for_good(coord: &Coordinator, id: zy_common::NodeId) -> Option<String> {
    let c = coord.vms.with(|t| census(t, id, &HashSet::new()));
    let p = plan(coord, id, &c.left_out)?;
    let Err(DrainError::Stuck { stuck, .. }) = &p.plan else {
        return None;
    };
    let power = coord.nodeadmin.power.is_some();
    let hopeless: Vec<String> = stuck
        .iter()
        .filter(|(_, r)| !(power && r.wake.is_some()))
        .map(|((vm, _), r)| {
            format!(
                "VM {} fits on no other node: {}",
                p.names.get(vm).cloned().unwrap_or_else(|| vm.to_string()),
                operator_text(&r.to_string(), &p.nodes)
            )
        })
        .collect();
    (!hopeless.is_empty()).then(|| hopeless.join("; "))
}

/// The packer's text with node names as the operator knows them.
pub fn operator_text(text: &str, nodes: &[placement::NodeCap]) -> String {
    let mut text = text.to_string();
    for n in nodes {
        text = text.replace(&format!("{}/{}", n.name, n.id), &n.name);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Observed, VmRec};
    use zy_common::vm::Generation;

    fn vm(name: &str, node: zy_common::NodeId, running: bool) -> VmRec {
        VmRec {
            id: VmId::new_random(),
            name: name.into(),
            zone: zy_common::Zone::Intranet,
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: "i".into(),
            boot: zy_common::image::ImageKind::Kernel {
                kernel: zy_common::blob::BlobHash([0; 32]),
                initrd: None,
                cmdline: String::new(),
            },
            node: Some(node),
            desired: if running {
                VmDesired::Running
            } else {
                VmDesired::Stopped
            },
            generation: Generation(1),
            observed: Some(Observed {
                state: if running {
                    VmState::Running
                } else {
                    VmState::Stopped
                },
                pid: None,
                intent: Generation(1),
                generation: Generation(1),
                at_ms: 0,
            }),
            mac: [0; 6],
            ip: std::net::Ipv4Addr::LOCALHOST,
            created_at_ms: 0,
            rev: 1,
            ssh_keys: vec![],
            user_data: None,
            anti_affinity: None,
            migrating_to: None,
            moved_at_ms: None,
        }
    }

    #[test]
    fn a_census_counts_arrivals_and_leaves_out_stopped_moving_and_tried_vms() {
        let a = zy_common::NodeId::new_random();
        let b = zy_common::NodeId::new_random();
        let mut t = crate::vms::Table::default();
        let run = vm("run", a, true);
        let stopped = vm("stopped", a, false);
        let tried = vm("tried", a, true);
        let mut arriving = vm("arriving", b, true);
        arriving.migrating_to = Some(a);
        let elsewhere = vm("elsewhere", b, true);
        for v in [&run, &stopped, &tried, &arriving, &elsewhere] {
            t.vms.insert(v.id, v.clone());
        }
        let c = census(&t, a, &[tried.id].into_iter().collect());
        assert_eq!(c.holding, 4, "three placed, one arriving");
        assert_eq!(c.moving, 0);
        assert_eq!(
            c.stopped,
            vec![("stopped".to_string(), "stopped".to_string())]
        );
        assert_eq!(
            c.left_out,
            [stopped.id, tried.id].into_iter().collect::<HashSet<_>>()
        );
        // Empty once nothing is placed there or arriving.
        let c = census(&crate::vms::Table::default(), a, &HashSet::new());
        assert_eq!(c, Census::default());
    }
}
