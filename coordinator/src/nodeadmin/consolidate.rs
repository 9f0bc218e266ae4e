//! Consolidation: the packer's plan ([`zy_packer::consolidate::plan_consolidate`]) on the
//! site as it stands, shown (`GET /v1/plan/consolidate`) or carried out
//! (`POST /v1/plan/consolidate`, and every `[consolidation] every` when set).
//!
//! ```text
//!  inputs: the pool (nodes by admin state then heartbeats, every VM's hold), max moves,
//!          min gain, each VM's last move, spares per zone, each node's averaged CPU load
//!          and the high-water mark
//!  apply:  loop { plan again; first step:
//!            Move    -> migrate::start(.., MoveCause::Consolidate), wait for its end;
//!                       stop if it failed
//!            Standby -> the power driver, then the mark; stop if it failed
//!          } until the plan is empty or the moves asked for are spent
//! ```
//!
//! Each step is an event. The run's progress is kept in memory ([`zy_api::ConsolidationRun`])
//! for `zy plan consolidate --apply` to follow; the migrations themselves are durable
//! operations, and a plan interrupted by a restart is simply planned again next time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use tracing::{info, warn};
use zy_api::{ConsolidateRequest, ConsolidationRun, ConsolidationView, PlanStep, VmDesired};
use zy_common::time::now_millis;
use zy_common::{NodeId, VmId};
use zy_packer::consolidate::{
    plan_consolidate, render_step, ConsolidateInput, ConsolidatePlan, NodeLoad, Step,
};
use zy_packer::Cluster;

use crate::api::ApiError;
use crate::config::{ConsolidationConfig, MAX_CONSOLIDATION_MOVES};
use crate::ops::MoveCause;
use crate::vms::placement::{self, NodeCap};
use crate::Coordinator;

/// What a plan is asked for, checked: moves within 1..=1000, gain within 0..=1.
pub fn limits(cfg: &ConsolidationConfig, req: &ConsolidateRequest) -> Result<(usize, f64), String> {
    let moves = req.max_moves.unwrap_or(cfg.max_moves);
    if !(1..=MAX_CONSOLIDATION_MOVES).contains(&moves) {
        return Err(format!(
            "max_moves is {moves}: a plan makes 1 to {MAX_CONSOLIDATION_MOVES} moves"
        ));
    }
    let gain = req.min_gain.unwrap_or(cfg.min_gain);
    if !(0.0..=1.0).contains(&gain) || gain.is_nan() {
        return Err(format!(
            "min_gain is {gain}: it is a share of a node, within 0.0 to 1.0"
        ));
    }
    Ok((moves as usize, gain))
}

/// The plan's inputs from the site: per node its averaged load and the mark, per VM its
/// last move (VMs migrating now count as just moved: they are left alone). Pure.
pub fn input(
    cfg: &ConsolidationConfig,
    max_moves: usize,
    min_gain: f64,
    now_ms: u64,
    ids: &[NodeId],
    busy: impl Fn(NodeId) -> Option<f64>,
    vms: &[(VmId, Option<u64>, bool)],
) -> ConsolidateInput<(VmId, bool)> {
    let mut last_moved = BTreeMap::new();
    for &(id, moved, migrating) in vms {
        let at = if migrating { Some(now_ms) } else { moved };
        if let Some(at) = at {
            last_moved.insert((id, false), at);
            last_moved.insert((id, true), at);
        }
    }
    let load = ids
        .iter()
        .enumerate()
        .filter_map(|(ix, id)| {
            busy(*id).map(|b| {
                (
                    ix,
                    NodeLoad {
                        busy: b,
                        high_water: cfg.high_water,
                    },
                )
            })
        })
        .collect();
    ConsolidateInput {
        now_ms,
        max_moves,
        min_gain,
        last_moved,
        spares_per_zone: cfg.spares as usize,
        load,
    }
}

/// A plan and what it was made on.
pub struct Planned {
    pub cluster: Cluster<(VmId, bool)>,
    pub ids: Vec<NodeId>,
    pub nodes: Vec<NodeCap>,
    pub names: HashMap<VmId, String>,
    pub plan: ConsolidatePlan<(VmId, bool)>,
}

impl std::fmt::Debug for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planned")
            .field("steps", &self.plan.steps.len())
            .finish()
    }
}

impl Planned {
    /// A packer text with VM and node names as ops know them.
    fn words(&self, text: &str) -> String {
        let mut t = super::drain::operator_text(text, &self.nodes);
        for (id, name) in &self.names {
            for arriving in [false, true] {
                t = t.replace(&format!("{:?}", (*id, arriving)), name);
            }
        }
        t
    }

    fn node_name(&self, ix: usize) -> String {
        self.nodes
            .iter()
            .find(|n| Some(n.id) == self.ids.get(ix).copied())
            .map(|n| n.name.clone())
            .unwrap_or_default()
    }

    pub fn step_view(&self, s: &Step<(VmId, bool)>) -> PlanStep {
        let text = self.words(&render_step(&self.cluster, s));
        match s {
            Step::Move { vm, from, to, .. } => PlanStep {
                kind: "move".into(),
                vm: Some(self.names.get(&vm.0).cloned().unwrap_or_default()),
                from: self.node_name(*from),
                to: Some(self.node_name(*to)),
                text,
            },
            Step::Standby { node } => PlanStep {
                kind: "standby".into(),
                vm: None,
                from: self.node_name(*node),
                to: None,
                text,
            },
        }
    }

    pub fn view(&self, run: Option<ConsolidationRun>) -> ConsolidationView {
        ConsolidationView {
            steps: self.plan.steps.iter().map(|s| self.step_view(s)).collect(),
            text: self.words(&self.plan.render(&self.cluster)),
            run,
        }
    }
}

/// Plans a consolidation of the site as it stands.
pub fn plan(coord: &Coordinator, max_moves: usize, min_gain: f64) -> Planned {
    let nodes = crate::vms::node_caps(coord);
    let model = coord.config.resource_model();
    let policy = coord.config.packer_policy();
    let now = now_millis();
    let (cluster, ids, names, vms) = coord.vms.with(|t| {
        let (c, ids) = placement::cluster(policy, &nodes, crate::vms::placed_vms(t, &model));
        let names = t.vms.values().map(|v| (v.id, v.name.clone())).collect();
        let vms: Vec<(VmId, Option<u64>, bool)> = t
            .vms
            .values()
            .map(|v| {
                (
                    v.id,
                    v.moved_at_ms,
                    v.migrating_to.is_some()
                        || t.running_op(v.id).is_some()
                        || v.desired != VmDesired::Running,
                )
            })
            .collect();
        (c, ids, names, vms)
    });
    let cfg = &coord.config.consolidation;
    let input = input(
        cfg,
        max_moves,
        min_gain,
        now,
        &ids,
        |id| coord.nodeadmin.load.busy(id),
        &vms,
    );
    let plan = plan_consolidate(&cluster, &input);
    Planned {
        cluster,
        ids,
        nodes,
        names,
        plan,
    }
}

/// `GET /v1/plan/consolidate`: a plan, shown, and the last run.
pub async fn show(
    State(coord): State<Arc<Coordinator>>,
    Query(req): Query<ConsolidateRequest>,
) -> Result<Json<ConsolidationView>, ApiError> {
    let (moves, gain) = limits(&coord.config.consolidation, &req).map_err(ApiError::bad_request)?;
    let p = plan(&coord, moves, gain);
    Ok(Json(p.view(coord.nodeadmin.run())))
}

/// `POST /v1/plan/consolidate`: plans and starts carrying the plan out.
pub async fn apply(
    State(coord): State<Arc<Coordinator>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ConsolidationView>), ApiError> {
    let req: ConsolidateRequest = if body.is_empty() {
        ConsolidateRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad consolidation request: {e}")))?
    };
    let (moves, gain) = limits(&coord.config.consolidation, &req).map_err(ApiError::bad_request)?;
    let p = plan(&coord, moves, gain);
    let run = begin(&coord).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "a consolidation is being carried out already; follow it with zy plan consolidate",
        )
    })?;
    let view = p.view(Some(run));
    drop(p);
    let c = coord.clone();
    tokio::spawn(async move { carry_out(&c, moves, gain).await });
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Marks a run as started; `None` if one is running.
fn begin(coord: &Coordinator) -> Option<ConsolidationRun> {
    let mut g = coord.nodeadmin.lock();
    if g.run.as_ref().is_some_and(|r| r.running) {
        return None;
    }
    let r = ConsolidationRun {
        started_at_ms: now_millis(),
        running: true,
        done: Vec::new(),
        error: None,
    };
    g.run = Some(r.clone());
    Some(r)
}

fn record(coord: &Coordinator, done: Option<String>, error: Option<String>, end: bool) {
    let mut g = coord.nodeadmin.lock();
    if let Some(r) = g.run.as_mut() {
        if let Some(d) = done {
            r.done.push(d);
        }
        if error.is_some() {
            r.error = error;
        }
        if end {
            r.running = false;
        }
    }
}

fn event(coord: &Coordinator, state: &str, detail: String) {
    info!(detail = %detail, "consolidation");
    coord.events.publish(
        "consolidation",
        String::new(),
        coord.config.site.clone(),
        state.into(),
        detail,
    );
}

/// Carries a plan out, one step at a time, planning again after each.
async fn carry_out(coord: &Arc<Coordinator>, max_moves: usize, min_gain: f64) {
    event(
        coord,
        "started",
        format!("consolidation started: at most {max_moves} move(s)"),
    );
    let mut moves_left = max_moves;
    let mut guard = max_moves + coord.fleet.snapshot().len() + 1;
    let outcome: Result<(), String> = loop {
        guard = guard.saturating_sub(1);
        if guard == 0 {
            break Ok(());
        }
        let p = plan(coord, moves_left.max(1), min_gain);
        let step = p
            .plan
            .steps
            .iter()
            .find(|s| moves_left > 0 || matches!(s, Step::Standby { .. }))
            .cloned();
        let Some(step) = step else {
            break Ok(());
        };
        let view = p.step_view(&step);
        match step {
            Step::Move { vm, to, .. } => {
                let dest = p.ids[to];
                drop(p);
                match move_and_wait(coord, vm.0, dest).await {
                    Ok(()) => {
                        moves_left -= 1;
                        event(coord, "moved", format!("done: {}", view.text));
                        record(coord, Some(view.text), None, false);
                    }
                    Err(e) => break Err(format!("{}: {e}", view.text)),
                }
            }
            Step::Standby { node } => {
                let id = p.ids[node];
                drop(p);
                match super::standby(coord, &id.to_string(), "consolidation: empty, powered down")
                    .await
                {
                    Ok(_) => {
                        event(coord, "standby", format!("done: {}", view.text));
                        record(coord, Some(view.text), None, false);
                    }
                    Err(e) => break Err(format!("{}: {}", view.text, e.message())),
                }
            }
        }
    };
    match outcome {
        Ok(()) => {
            event(coord, "finished", "consolidation finished".into());
            record(coord, None, None, true);
        }
        Err(e) => {
            warn!(error = %e, "consolidation stopped");
            event(coord, "failed", format!("consolidation stopped: {e}"));
            record(coord, None, Some(e), true);
        }
    }
}

/// Starts a consolidation migration and waits for its end.
async fn move_and_wait(coord: &Arc<Coordinator>, vm: VmId, to: NodeId) -> Result<(), String> {
    let a = crate::vms::migrate::start(
        coord,
        &vm.to_string(),
        Some(&to.to_string()),
        MoveCause::Consolidate,
        None,
    )
    .await
    .map_err(|e| e.message().to_string())?;
    coord.vms.wake.notify_one();
    let op = a.operation.id;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let state = coord
            .vms
            .with(|t| t.ops.get(&op).map(|o| (o.is_running(), o.state.clone())));
        match state {
            None => return Err(format!("operation {op} was forgotten")),
            Some((true, _)) => {}
            Some((false, crate::ops::OpState::Succeeded)) => return Ok(()),
            Some((false, crate::ops::OpState::Failed(why))) => {
                return Err(format!("the migration failed: {why}"))
            }
            Some((false, s)) => return Err(format!("the migration ended {}", s.name())),
        }
    }
}

/// The periodic mode: a plan carried out every `[consolidation] every`, when set.
pub async fn periodic(coord: Arc<Coordinator>) {
    let cfg = coord.config.consolidation;
    let Some(every) = cfg.every else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        if begin(&coord).is_some() {
            carry_out(&coord, cfg.max_moves as usize, cfg.min_gain).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_limits_are_refused_and_defaults_come_from_the_config() {
        let cfg = ConsolidationConfig::default();
        assert_eq!(limits(&cfg, &ConsolidateRequest::default()), Ok((10, 0.25)));
        let r = |m: Option<u32>, g: Option<f64>| {
            limits(
                &cfg,
                &ConsolidateRequest {
                    max_moves: m,
                    min_gain: g,
                },
            )
        };
        assert_eq!(r(Some(3), Some(0.5)), Ok((3, 0.5)));
        assert!(r(Some(0), None).unwrap_err().contains("max_moves is 0"));
        assert!(r(Some(1_000_000), None).unwrap_err().contains("1 to 1000"));
        assert!(r(None, Some(-0.1)).unwrap_err().contains("min_gain"));
        assert!(r(None, Some(7.0)).unwrap_err().contains("min_gain"));
        assert!(r(None, Some(f64::NAN)).is_err());
    }

    #[test]
    fn inputs_carry_loads_by_packer_index_and_migrating_vms_as_just_moved() {
        let cfg = ConsolidationConfig::default();
        let (a, b) = (NodeId::new_random(), NodeId::new_random());
        let (v1, v2, v3) = (VmId::new_random(), VmId::new_random(), VmId::new_random());
        let i = input(
            &cfg,
            4,
            0.3,
            1_000,
            &[a, b],
            |id| (id == b).then_some(0.9),
            &[(v1, Some(500), false), (v2, None, true), (v3, None, false)],
        );
        assert_eq!(i.max_moves, 4);
        assert_eq!(i.min_gain, 0.3);
        assert_eq!(i.spares_per_zone, 1);
        assert_eq!(i.load.len(), 1);
        assert_eq!(i.load[&1].busy, 0.9);
        assert_eq!(i.load[&1].high_water, 0.85);
        assert_eq!(i.last_moved.get(&(v1, false)), Some(&500));
        assert_eq!(i.last_moved.get(&(v2, false)), Some(&1_000));
        assert_eq!(i.last_moved.get(&(v3, false)), None);
    }
}
