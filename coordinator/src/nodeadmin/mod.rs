//! Node administration: what ops ask of a node beside what its heartbeats say (drain,
//! maintenance, standby, wake), the power driver that standby and wake go through, the
//! drain driver, and consolidation.
//!
//! ```text
//!              drain                   no VM on it, none arriving       undrain
//!   Active ----------> Draining -----------------------------> Maintenance -----> Active
//!     ^  |                |   \  undrain (a migration under way finishes)            |
//!     |  |                |    +------------------------------------------> Active  |
//!     |  | standby: empty, power command first, then the mark                       |
//!     |  +-----------------------------------> Standby <---- standby (empty) --------+
//!     |            wake: power command, then the mark  |
//!     +------------------------------------------------+
//! ```
//!
//! The state lives in the node's record ([`crate::store::Admin`]), changed only here, each
//! change compare-and-swap on the state it left and recorded with its reason
//! ([`crate::store::AdminTransition`]) and published as an event. Everything that acts on
//! it is level-triggered from that record: the drain driver looks at every Draining node
//! each tick and moves the next VM off, so a coordinator restarted mid-drain carries on
//! where the store says it was (migrations under way are their own durable operations,
//! driven by [`crate::vms::migrate`]). What lives only in memory is advisory: the last
//! note of a node (why its drain is held back), which nodes a power command is running
//! for (they take nothing meanwhile), which were just woken, and the CPU load averages.
//!
//! [`next`] is the pure rule for every command; the handlers check it, then act.

pub mod consolidate;
pub mod drain;
pub mod load;
pub mod power;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use tracing::{info, warn};
use zy_api::NodeView;
use zy_common::time::now_millis;
use zy_common::NodeId;

use crate::api::ApiError;
use crate::fleet::NodeLive;
use crate::store::Admin;
use crate::Coordinator;
use power::{Power, PowerAction, PowerTarget};

/// What ops ask of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCmd {
    Drain,
    Undrain,
    Standby,
    Wake,
    /// The drain driver found the node empty.
    Drained,
}

/// Why a command does not apply to a node as it stands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    #[error("node {node} is on standby: wake it first (zy node wake {node})")]
    OnStandby { node: String },
    #[error("node {node} is draining: undrain it, or wait until it is in maintenance")]
    Draining { node: String },
    #[error("node {node} holds {count} VM(s) ({names}): only an empty node stands by; drain it first (zy node drain {node})")]
    NotEmpty {
        node: String,
        count: usize,
        names: String,
    },
    #[error("node {node} is not on standby (it is {state}): only a standby node is woken")]
    NotOnStandby { node: String, state: &'static str },
}

/// The state a command leads to from `from`: `Ok(None)` when it changes nothing (a repeat),
/// a refusal when it does not apply. `holds` names the VMs on the node (placed there,
/// tombstones, or arriving). Pure.
pub fn next(
    node: &str,
    from: Admin,
    cmd: AdminCmd,
    holds: &[String],
) -> Result<Option<Admin>, AdminRefusal> {
    use Admin::*;
    let node = node.to_string();
    match (cmd, from) {
        (AdminCmd::Drain, Active) => Ok(Some(Draining)),
        (AdminCmd::Drain, Draining | Maintenance) => Ok(None),
        (AdminCmd::Drain, Standby) => Err(AdminRefusal::OnStandby { node }),
        (AdminCmd::Undrain, Draining | Maintenance) => Ok(Some(Active)),
        (AdminCmd::Undrain, Active) => Ok(None),
        (AdminCmd::Undrain, Standby) => Err(AdminRefusal::OnStandby { node }),
        (AdminCmd::Standby, Standby) => Ok(None),
        (AdminCmd::Standby, Draining) => Err(AdminRefusal::Draining { node }),
        (AdminCmd::Standby, Active | Maintenance) if !holds.is_empty() => {
            let mut names: Vec<&str> = holds.iter().map(|s| s.as_str()).take(5).collect();
            if holds.len() > 5 {
                names.push("...");
            }
            Err(AdminRefusal::NotEmpty {
                node,
                count: holds.len(),
                names: names.join(", "),
            })
        }
        (AdminCmd::Standby, Active | Maintenance) => Ok(Some(Standby)),
        (AdminCmd::Wake, Standby) => Ok(Some(Active)),
        (AdminCmd::Wake, s) => Err(AdminRefusal::NotOnStandby {
            node,
            state: s.as_str(),
        }),
        (AdminCmd::Drained, Draining) if holds.is_empty() => Ok(Some(Maintenance)),
        (AdminCmd::Drained, _) => Ok(None),
    }
}

/// How long a woken node is counted as "being woken" before it reports.
const WAKING_FOR: Duration = Duration::from_secs(15 * 60);

/// What node administration keeps in memory (advisory; the truth is in the store).
#[derive(Debug, Default)]
pub struct NodeAdmin {
    inner: Mutex<Inner>,
    /// The power driver, if `[power]` is configured.
    pub power: Option<Arc<dyn Power>>,
    /// The CPU load averages the consolidation reads.
    pub load: load::LoadAverages,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last note of each node (why its drain is held back, ...).
    notes: HashMap<NodeId, String>,
    /// Nodes whose power command is running: they take nothing meanwhile.
    powering: HashSet<NodeId>,
    /// Nodes woken and not yet reporting, since when.
    waking: HashMap<NodeId, Instant>,
    /// Drain migrations started, per VM, so a failed one is not retried at once.
    drain_attempts: HashMap<zy_common::VmId, Instant>,
    /// The consolidation being applied, or the last one.
    run: Option<zy_api::ConsolidationRun>,
}

impl NodeAdmin {
    pub fn new(power: Option<Arc<dyn Power>>, load_window: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            power,
            load: load::LoadAverages::new(load_window),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a power command is running for the node (placement leaves it alone).
    pub fn is_powering(&self, id: NodeId) -> bool {
        self.lock().powering.contains(&id)
    }

    /// The node's last note.
    pub fn note_of(&self, id: NodeId) -> Option<String> {
        self.lock().notes.get(&id).cloned()
    }

    /// Sets the node's note; true if it changed (worth an event).
    fn set_note(&self, id: NodeId, note: Option<String>) -> bool {
        let mut g = self.lock();
        match note {
            Some(n) => g.notes.insert(id, n.clone()).as_ref() != Some(&n),
            None => g.notes.remove(&id).is_some(),
        }
    }

    /// The node woken most recently in `among` that has not reported since.
    fn waking_among(&self, among: &[NodeLive]) -> Option<String> {
        let mut g = self.lock();
        g.waking.retain(|_, t| t.elapsed() < WAKING_FOR);
        among
            .iter()
            .find(|n| g.waking.contains_key(&n.record.id) && n.session.is_none())
            .map(|n| n.record.name.clone())
    }

    pub fn run(&self) -> Option<zy_api::ConsolidationRun> {
        self.lock().run.clone()
    }
}

/// Releases a node's power slot when the command is over, whatever happens.
struct Powering<'a> {
    admin: &'a NodeAdmin,
    id: NodeId,
}

impl Drop for Powering<'_> {
    fn drop(&mut self) {
        self.admin.lock().powering.remove(&self.id);
    }
}

fn claim_power<'a>(admin: &'a NodeAdmin, n: &NodeLive) -> Result<Powering<'a>, ApiError> {
    if !admin.lock().powering.insert(n.record.id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            format!(
                "a power command for node {} is running already",
                n.record.name
            ),
        ));
    }
    Ok(Powering {
        admin,
        id: n.record.id,
    })
}

/// The VMs that hold room on a node: placed there (tombstones too) or arriving.
pub fn holds(coord: &Coordinator, id: NodeId) -> Vec<String> {
    coord.vms.with(|t| {
        let mut v: Vec<String> = t
            .vms
            .values()
            .filter(|v| v.node == Some(id) || v.migrating_to == Some(id))
            .map(|v| v.name.clone())
            .collect();
        v.sort();
        v
    })
}

fn find(coord: &Coordinator, key: &str) -> Result<NodeLive, ApiError> {
    coord.fleet.find(key).ok_or_else(|| {
        ApiError::not_found(format!(
            "no node `{}`; `zy node ls` lists them",
            zy_common::ids::truncate_for_error(key)
        ))
    })
}

fn refused(e: AdminRefusal) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "not_now", e.to_string())
}

/// Records a change of a node's administrative state: in the store (if it is still
/// `from`), in the fleet, as an event. Returns the record as it now is.
pub async fn set_admin(
    coord: &Coordinator,
    id: NodeId,
    from: Admin,
    to: Admin,
    reason: &str,
) -> Result<crate::store::NodeRecord, ApiError> {
    let store = coord.store.clone();
    let now = now_millis();
    let why = reason.to_string();
    let rec = tokio::task::spawn_blocking(move || store.set_admin(id, from, to, now, &why))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("node {id} was removed")))?;
    if rec.admin != to || rec.admin_since_ms != now {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "contended",
            format!(
                "node {} changed meanwhile (it is {} now); try again",
                rec.name,
                rec.admin.as_str()
            ),
        ));
    }
    coord.fleet.set_admin(id, to, now, Instant::now());
    info!(node = %id, name = %rec.name, from = from.as_str(), to = to.as_str(), reason, "node administration changed");
    coord.events.publish(
        "node",
        id.to_string(),
        rec.name.clone(),
        to.as_str().into(),
        format!("{} -> {}: {reason}", from.as_str(), to.as_str()),
    );
    Ok(rec)
}

/// Publishes a note about a node (once per distinct note).
pub fn note(coord: &Coordinator, n: &NodeLive, text: Option<String>) {
    if coord.nodeadmin.set_note(n.record.id, text.clone()) {
        if let Some(t) = text {
            warn!(node = %n.record.id, name = %n.record.name, note = %t, "node administration");
            coord.events.publish(
                "node",
                n.record.id.to_string(),
                n.record.name.clone(),
                n.record.admin.as_str().into(),
                t,
            );
        }
    }
}

fn view(coord: &Coordinator, id: NodeId) -> Result<NodeView, ApiError> {
    let n = find(coord, &id.to_string())?;
    Ok(crate::api::node_view(coord, &n))
}

fn power_of(coord: &Coordinator) -> Result<Arc<dyn Power>, ApiError> {
    coord.nodeadmin.power.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "power_not_configured",
            "no power driver is configured: add a [power] table to coordinator.toml with \
             the commands that power a node down and up, e.g. standby = [\"ipmitool\", \"-I\", \
             \"lanplus\", \"-H\", \"{name}-bmc\", \"chassis\", \"power\", \"soft\"] and wake = \
             [... \"power\", \"on\"] (see the operations guide), then restart the coordinator",
        )
    })
}

fn target(n: &NodeLive) -> PowerTarget {
    PowerTarget {
        node: n.record.id.to_string(),
        name: n.record.name.clone(),
        ip: n
            .session
            .as_ref()
            .and_then(crate::vms::session_ip)
            .map(|i| i.to_string())
            .unwrap_or_default(),
    }
}

/// `POST /v1/nodes/{node}/drain`.
pub async fn drain_node(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let n = find(&coord, &key)?;
    if let Some(to) = next(&n.record.name, n.record.admin, AdminCmd::Drain, &[]).map_err(refused)? {
        // A drain that could never end is refused, and nothing changes.
        if let Some(why) = drain::stuck_for_good(&coord, n.record.id) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_room",
                format!(
                    "node {} cannot be drained: {why}; make room (or enroll a node) first",
                    n.record.name
                ),
            ));
        }
        set_admin(
            &coord,
            n.record.id,
            n.record.admin,
            to,
            "drain asked: its VMs move off, one at a time",
        )
        .await?;
        coord.nodeadmin.set_note(n.record.id, None);
        coord.drain_wake.notify_one();
    }
    Ok(Json(view(&coord, n.record.id)?))
}

/// `POST /v1/nodes/{node}/undrain`.
pub async fn undrain_node(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let n = find(&coord, &key)?;
    if let Some(to) =
        next(&n.record.name, n.record.admin, AdminCmd::Undrain, &[]).map_err(refused)?
    {
        set_admin(
            &coord,
            n.record.id,
            n.record.admin,
            to,
            "undrain asked: it takes VMs again",
        )
        .await?;
        coord.nodeadmin.set_note(n.record.id, None);
    }
    Ok(Json(view(&coord, n.record.id)?))
}

/// Puts an empty node on standby: the power command, then the mark.
pub async fn standby(
    coord: &Arc<Coordinator>,
    key: &str,
    reason: &str,
) -> Result<NodeLive, ApiError> {
    let n = find(coord, key)?;
    let Some(to) = next(
        &n.record.name,
        n.record.admin,
        AdminCmd::Standby,
        &holds(coord, n.record.id),
    )
    .map_err(refused)?
    else {
        return Ok(n);
    };
    let power = power_of(coord)?;
    let _slot = claim_power(&coord.nodeadmin, &n)?;
    // Nothing lands on it from here (placement skips a node being powered); check again
    // that nothing did just before.
    next(
        &n.record.name,
        n.record.admin,
        AdminCmd::Standby,
        &holds(coord, n.record.id),
    )
    .map_err(refused)?;
    power
        .run(PowerAction::Standby, &target(&n))
        .await
        .map_err(|e| {
            let msg = zy_common::error::chain(&e);
            warn!(node = %n.record.id, error = %msg, "standby failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "power_failed",
                format!(
                    "node {} was not put on standby (it stays {}): {msg}",
                    n.record.name,
                    n.record.admin.as_str()
                ),
            )
        })?;
    set_admin(coord, n.record.id, n.record.admin, to, reason).await?;
    find(coord, key)
}

/// Wakes a standby node: the power command, then the mark (Ready once it reports).
pub async fn wake(coord: &Arc<Coordinator>, key: &str, reason: &str) -> Result<NodeLive, ApiError> {
    let n = find(coord, key)?;
    let Some(to) = next(&n.record.name, n.record.admin, AdminCmd::Wake, &[]).map_err(refused)?
    else {
        return Ok(n);
    };
    let power = power_of(coord)?;
    let _slot = claim_power(&coord.nodeadmin, &n)?;
    power
        .run(PowerAction::Wake, &target(&n))
        .await
        .map_err(|e| {
            let msg = zy_common::error::chain(&e);
            warn!(node = %n.record.id, error = %msg, "wake failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "power_failed",
                format!(
                    "node {} was not woken (it stays on standby): {msg}",
                    n.record.name
                ),
            )
        })?;
    set_admin(coord, n.record.id, Admin::Standby, to, reason).await?;
    coord
        .nodeadmin
        .lock()
        .waking
        .insert(n.record.id, Instant::now());
    find(coord, key)
}

/// `POST /v1/nodes/{node}/standby`.
pub async fn standby_node(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let n = standby(&coord, &key, "standby asked: powered down").await?;
    Ok(Json(view(&coord, n.record.id)?))
}

/// `POST /v1/nodes/{node}/wake`.
pub async fn wake_node(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let n = wake(&coord, &key, "wake asked: powered up").await?;
    Ok(Json(view(&coord, n.record.id)?))
}

/// Starts waking `node` in the background for room the packer needs (once: not again while
/// a power command for it runs, or once it is woken).
pub fn wake_in_background(coord: &Arc<Coordinator>, node: NodeId, why: String) {
    if coord.nodeadmin.is_powering(node) || coord.nodeadmin.power.is_none() {
        return;
    }
    let coord = coord.clone();
    tokio::spawn(async move {
        let key = node.to_string();
        if let Err(e) = wake(&coord, &key, &why).await {
            if let Some(n) = coord.fleet.find(&key) {
                note(
                    &coord,
                    &n,
                    Some(format!("could not wake it: {}", e.message())),
                );
            }
        }
    });
}

/// The answer to a create that fits nowhere awake but would once `node` is woken (or that
/// comes while a node of its zone is being woken): 503, saying which node and to retry.
pub fn waking_for_room(
    coord: &Arc<Coordinator>,
    node: Option<NodeId>,
    zone: zy_common::Zone,
) -> Option<ApiError> {
    if let Some(id) = node {
        let n = coord.fleet.find(&id.to_string())?;
        if coord.nodeadmin.power.is_none() {
            return Some(ApiError::new(
                StatusCode::CONFLICT,
                "no_room",
                format!(
                    "no awake node has room; standby node {} would, but no power driver is \
                     configured to wake it ([power] in coordinator.toml)",
                    n.record.name
                ),
            ));
        }
        wake_in_background(
            coord,
            id,
            "woken by the packer: a new VM needs its room".into(),
        );
        return Some(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "waking",
            format!(
                "no awake node has room: node {} is being woken for it; retry once it is \
                 ready (zy node ls shows it ready)",
                n.record.name
            ),
        ));
    }
    let zone_nodes: Vec<NodeLive> = coord
        .fleet
        .snapshot()
        .into_iter()
        .filter(|n| n.record.zone == zone)
        .collect();
    let name = coord.nodeadmin.waking_among(&zone_nodes)?;
    Some(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "waking",
        format!(
            "no awake node has room: node {name} is being woken; retry once it is ready \
             (zy node ls shows it ready)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Admin::*;

    fn n(from: Admin, cmd: AdminCmd, holds: &[&str]) -> Result<Option<Admin>, AdminRefusal> {
        let holds: Vec<String> = holds.iter().map(|s| s.to_string()).collect();
        next("n1", from, cmd, &holds)
    }

    #[test]
    fn drain_and_undrain_walk_the_diagram_and_repeats_change_nothing() {
        assert_eq!(n(Active, AdminCmd::Drain, &["a"]), Ok(Some(Draining)));
        assert_eq!(n(Draining, AdminCmd::Drain, &[]), Ok(None));
        assert_eq!(n(Maintenance, AdminCmd::Drain, &[]), Ok(None));
        assert_eq!(n(Draining, AdminCmd::Drained, &["a"]), Ok(None));
        assert_eq!(n(Draining, AdminCmd::Drained, &[]), Ok(Some(Maintenance)));
        assert_eq!(n(Active, AdminCmd::Drained, &[]), Ok(None));
        assert_eq!(n(Draining, AdminCmd::Undrain, &["a"]), Ok(Some(Active)));
        assert_eq!(n(Maintenance, AdminCmd::Undrain, &[]), Ok(Some(Active)));
        assert_eq!(n(Active, AdminCmd::Undrain, &[]), Ok(None));
        let e = n(Standby, AdminCmd::Drain, &[]).unwrap_err().to_string();
        assert!(e.contains("wake it first"), "{e}");
        assert!(n(Standby, AdminCmd::Undrain, &[]).is_err());
    }

    #[test]
    fn only_an_empty_active_or_maintained_node_stands_by_and_only_standby_wakes() {
        assert_eq!(n(Active, AdminCmd::Standby, &[]), Ok(Some(Standby)));
        assert_eq!(n(Maintenance, AdminCmd::Standby, &[]), Ok(Some(Standby)));
        assert_eq!(n(Standby, AdminCmd::Standby, &[]), Ok(None));
        let e = n(Active, AdminCmd::Standby, &["web-1", "db-1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 VM(s)") && e.contains("web-1, db-1"), "{e}");
        let e = n(Draining, AdminCmd::Standby, &[]).unwrap_err().to_string();
        assert!(e.contains("draining"), "{e}");
        assert_eq!(n(Standby, AdminCmd::Wake, &[]), Ok(Some(Active)));
        for s in [Active, Draining, Maintenance] {
            let e = n(s, AdminCmd::Wake, &[]).unwrap_err().to_string();
            assert!(
                e.contains("not on standby") && e.contains(s.as_str()),
                "{e}"
            );
        }
    }
}
