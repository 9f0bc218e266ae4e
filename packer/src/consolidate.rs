//! Moving running VMs on purpose: the plan to drain a node, the plan to consolidate a pool
//! (empty its least used nodes so that they can stand by, relieve its hot ones), and which
//! standby node to wake when a request fits nowhere awake.
//!
//! Pure logic like the rest of the crate: no I/O, no clock (the caller passes `now_ms`), no
//! randomness. Every planner works on a clone of the caller's [`Cluster`] and returns
//! steps; [`apply`] carries one step out on a [`Cluster`] under the same checks, so that the
//! coordinator records each real migration as it completes and plans again from there.
//!
//! # The rules every step keeps
//! A [`Step::Move`] keeps the packer's hard rules on the state left by the steps before it:
//! the zone, capacity after overcommit, anti-affinity, a Ready destination, and N+1 in this
//! form: *no node whose evacuation succeeds before the step fails after it* (the same
//! incremental evacuations as [`Cluster::place`], and the same exception for a zone with
//! fewer than two Ready nodes). A move is a removal and an insertion in one step, so both
//! halves are judged together: the insertion alone could be fine while the removal changed
//! a first fit elsewhere. A [`Step::Standby`] takes an empty node's room away, so it is held
//! to the same N+1 test. Destinations are ranked by the packer's own score ([`Zhengyun`]),
//! ties to the earlier node of the zone, and the first one that keeps every rule is taken.
//!
//! # Drain ([`plan_drain`])
//! The node is marked Draining (in the planner's copy; the coordinator marks it for real
//! before the first migration), then its VMs go one at a time in N+1's evacuation order
//! (memory, vCPUs, disk, largest first; then id), each to the best node that keeps every
//! rule. Marking the node Draining takes its room away, which may cost the zone its N+1
//! margin: the plan names the nodes whose evacuation that breaks ([`DrainPlan::margin_lost`])
//! rather than refuse a drain that an operator asked for. A VM that fits nowhere is
//! reported with the packer's [`Refusal`] (every node and why, and, in its `wake`, the
//! first standby node whose waking lets the VM move under every rule, N+1 included) and
//! the drain fails as a whole ([`DrainError::Stuck`]).
//!
//! ```text
//!   Ready ──mark──▶ Draining ──move 1──▶ … ──move k──▶ Draining, empty ──▶ Maintenance
//!                      │ (each move: best score among the nodes that keep every rule)
//!                      └─ a VM fits nowhere: DrainError::Stuck, with its Refusal
//! ```
//!
//! # Consolidation ([`plan_consolidate`])
//! Three phases over the planner's copy, each made of *goals*. A goal is planned move by
//! move on the copy and kept only whole: an emptying one of whose VMs finds no
//! destination, a relief that cannot bring its node down to its mark, a goal that would
//! overrun the budget, or one whose standby would break N+1 is undone entirely and
//! reported as skipped, with the reason. So no plan holds part of an evacuation.
//!
//! 1. **Relieve** each hot node (measured CPU load above its high-water mark), hottest
//!    first: its VMs, busiest first, move to nodes that stay at or below their own mark
//!    (an empty node only if its zone keeps its spares without it), until its load is at
//!    or below its mark.
//! 2. **Empty** the least used nodes (the larger of their CPU and memory shares, then
//!    fewest VMs, then index): all of a node's VMs move to nodes already in use (never to
//!    an empty node, which would gain nothing, never to a node that was emptied, never past
//!    a destination's high-water mark). The emptied node then stands by if its zone still
//!    has its spare nodes (Ready and empty) without it; otherwise it stays awake as one.
//! 3. **Idle** nodes (Ready, empty) beyond the zone's spares stand by, the last of the
//!    zone's order first.
//!
//! ```text
//!   before              relieve n1          empty n3            then
//!   n1 [██████▓▓] hot   n1 [██████  ]       n1 [██████  ]       n1 [██████  ]
//!   n2 [███     ]       n2 [███▓▓   ]       n2 [███▓▓▒  ]       n2 [███▓▓▒  ]
//!   n3 [▒       ]       n3 [▒       ]       n3 [        ]       n3  standby
//!   n4 [        ] spare n4 [        ]       n4 [        ]       n4 [        ] spare
//!   steps: 1. Move ▓▓ n1→n2 (relieve n1)  2. Move ▒ n3→n2 (empty n3)  3. Standby n3
//! ```
//!
//! # Waking ([`wake_for`])
//! For a request that fits on no awake node, each standby node of its zone is woken in
//! turn, in zone order, and put back; the first whose room lets the packer place the
//! request under every rule is named. That is more than [`Refusal::wake`], which names the
//! first standby node with room for the VM alone: with N+1 on, a woken node must also
//! leave room to evacuate whichever node takes the VM.
//!
//! # Gain
//! A move's gain is the share of a node it wins back:
//! - emptying a node that holds k VMs wins one node in k moves, so each of them gains 1/k;
//! - relieving a hot node, a move gains the share of that node's vCPUs whose measured
//!   load it takes away.
//!
//! Moves below [`ConsolidateInput::min_gain`] are not made (0.25 empties nodes of at most
//! four VMs and moves only VMs that carry a quarter of a hot node's load). Besides, a move
//! is only ever planned as part of a goal that the plan completes: a node it empties, or a
//! hot node it brings down to its mark.
//!
//! # Load
//! The agents report per node the fraction of its vCPUs (before overcommit) that were busy
//! over a window ([`NodeLoad::busy`]). A VM is taken to carry its node's busy vCPUs in
//! proportion to the vCPUs it asks for; a move carries that load to its destination. A
//! node without a report is neither a source nor a destination of consolidation.
//!
//! # Bounds
//! At most [`ConsolidateInput::max_moves`] moves in a plan; no VM moves if it moved less
//! than [`MIN_MOVE_INTERVAL_MS`] before `now_ms`, nor twice in one plan; each node is
//! considered once per phase, and each goal tries each of its VMs once, so planning costs
//! O(VMs of the candidates · nodes of the zone) evacuations at worst.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::{Cluster, NodeIx, NodeState, Refusal, Request, Scorer, Why, Zhengyun, CPU, MEM};

/// No VM moves again less than an hour after it last moved.
pub const MIN_MOVE_INTERVAL_MS: u64 = 3_600_000;

/// Why a VM moves.
#[derive(Clone, Debug, PartialEq)]
pub enum MoveReason {
    /// Its node is being drained.
    Drain,
    /// Part of emptying `node`, which the plan empties completely.
    Empty { node: NodeIx },
    /// Takes load off hot `node`: its estimated load (a fraction of its vCPUs) before and
    /// after this move.
    Relieve {
        node: NodeIx,
        load_before: f64,
        load_after: f64,
    },
}

/// One step of a plan, carried out in order, each on the state the ones before it left.
#[derive(Clone, Debug, PartialEq)]
pub enum Step<K> {
    /// Live-migrate `vm` from `from` to `to`.
    Move {
        vm: K,
        from: NodeIx,
        to: NodeIx,
        reason: MoveReason,
    },
    /// Power an empty node down on purpose.
    Standby { node: NodeIx },
}

/// The moves that empty a node for service.
#[derive(Clone, Debug, PartialEq)]
pub struct DrainPlan<K> {
    pub node: NodeIx,
    /// Every VM of the node, one [`Step::Move`] each, in order.
    pub steps: Vec<Step<K>>,
    /// Nodes whose N+1 evacuation succeeds now but fails once the node is Draining (its
    /// room gone): the margin the drain itself costs the zone.
    pub margin_lost: Vec<NodeIx>,
}

/// A drain that cannot be planned.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DrainError<K: fmt::Debug> {
    #[error("no node has index {0}")]
    UnknownNode(NodeIx),
    #[error("node {node} is {}: its VMs cannot be live-migrated", .state.as_str())]
    NotRunning { node: String, state: NodeState },
    #[error("{} VM(s) of node {node} fit on no other node{}", .stuck.len(), first_stuck(.stuck))]
    Stuck {
        node: String,
        /// The moves of the VMs that do fit, as planned with the stuck ones left in place.
        planned: Vec<Step<K>>,
        /// Every VM that fits nowhere, with every node of the zone and why; the refusal's
        /// `wake` is a standby node whose waking lets it move under every rule.
        stuck: Vec<(K, Refusal)>,
    },
}

fn first_stuck<K: fmt::Debug>(stuck: &[(K, Refusal)]) -> String {
    stuck
        .first()
        .map(|(vm, r)| format!("; the first, {vm:?}: {r}"))
        .unwrap_or_default()
}

/// A step that cannot be carried out; the cluster is left as it was.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StepError {
    #[error("no VM {0} is placed")]
    UnknownVm(String),
    #[error("no node has index {0}")]
    UnknownNode(NodeIx),
    #[error("VM {vm} is on node {on}, not on {from} (a stale plan)")]
    NotOn {
        vm: String,
        on: String,
        from: String,
    },
    #[error("VM {vm} cannot move from node {from} to {to}: {why}")]
    Refused {
        vm: String,
        from: String,
        to: String,
        why: String,
    },
    #[error("node {node} still holds {vms} VM(s): only an empty node stands by")]
    NotEmpty { node: String, vms: usize },
    #[error("node {node} cannot stand by: node {failed}'s VMs would have nowhere to go (N+1)")]
    StandbyBreaksNPlusOne { node: String, failed: String },
}

/// What an agent reports of a node's CPU, and where it counts as hot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeLoad {
    /// The fraction of the node's vCPUs (before overcommit) busy, averaged over a window.
    pub busy: f64,
    /// Above this fraction the node is hot (0.85, say).
    pub high_water: f64,
}

/// What a consolidation plan is asked to respect; all plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsolidateInput<K> {
    /// The time, in milliseconds, on the clock of `last_moved`.
    pub now_ms: u64,
    /// The most moves the plan may hold.
    pub max_moves: usize,
    /// The least gain a move must bring (see the module's documentation).
    pub min_gain: f64,
    /// When each VM last moved (VMs not listed never did).
    pub last_moved: BTreeMap<K, u64>,
    /// Ready, empty nodes to keep awake in every zone.
    pub spares_per_zone: usize,
    /// Per node, its measured load; nodes not listed are left alone.
    pub load: BTreeMap<NodeIx, NodeLoad>,
}

/// What a consolidation plan set out to do with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Bring a hot node down to its high-water mark.
    Relieve,
    /// Empty it, so that it can stand by.
    Empty,
    /// Put an already empty node on standby.
    Idle,
}

/// Why a goal is not in the plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Skip<K> {
    /// No load report for the node.
    NoLoadReport,
    /// It needs more moves than the plan has left.
    Budget { needs: usize, left: usize },
    /// Each of its moves would gain less than the minimum.
    LowGain { gain: f64, min: f64 },
    /// One of its VMs moved too recently (`ago_ms` is `None` when this plan moves it).
    RecentlyMoved { vm: K, ago_ms: Option<u64> },
    /// One of its VMs fits nowhere: the packer's reasons per node, and the nodes that pass
    /// the rules but the plan keeps free (emptied or empty, the VM's own node, or they
    /// would turn hot).
    Stuck {
        vm: K,
        refusal: Refusal,
        set_aside: Vec<NodeIx>,
    },
    /// Once empty, its standby would leave node `failed`'s VMs nowhere to go.
    StandbyBreaksNPlusOne { failed: NodeIx },
    /// A hot node that cannot be brought down to its mark: the best load reached, and how
    /// many of its VMs were left because they moved recently, would gain too little, or
    /// fit nowhere, and the moves that were left.
    CannotRelieve {
        load_after: f64,
        recent: usize,
        small: usize,
        stuck: usize,
        budget_left: usize,
    },
    /// Kept awake as one of its zone's spare nodes.
    Spare,
}

/// What became of one goal.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<K> {
    /// In the plan with this many moves, and a standby (an emptied node that does not
    /// stand by stays awake as one of its zone's spares).
    Planned {
        moves: usize,
        standby: bool,
    },
    Skipped(Skip<K>),
}

/// One node the plan considered, in the order it did.
#[derive(Clone, Debug, PartialEq)]
pub struct Considered<K> {
    pub node: NodeIx,
    pub goal: Goal,
    pub outcome: Outcome<K>,
}

/// A bounded consolidation plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsolidatePlan<K> {
    /// In order; each keeps every rule on the state the ones before it left.
    pub steps: Vec<Step<K>>,
    /// Every goal looked at and what became of it.
    pub considered: Vec<Considered<K>>,
}

impl<K> ConsolidatePlan<K> {
    pub fn moves(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Move { .. }))
            .count()
    }
}

impl<K: Ord + Clone + fmt::Debug> ConsolidatePlan<K> {
    /// The plan in words, with node names (what `zy plan consolidate` shows): the
    /// numbered steps, then every goal considered and what became of it.
    pub fn render(&self, c: &Cluster<K>) -> String {
        let mut out = String::new();
        if self.steps.is_empty() {
            out.push_str("nothing to do\n");
        }
        for (i, s) in self.steps.iter().enumerate() {
            out.push_str(&format!("{:>3}. {}\n", i + 1, render_step(c, s)));
        }
        if !self.considered.is_empty() {
            out.push_str("considered:\n");
        }
        for k in &self.considered {
            let goal = match k.goal {
                Goal::Relieve => "relieve",
                Goal::Empty => "empty",
                Goal::Idle => "stand by",
            };
            let what = match &k.outcome {
                Outcome::Planned { moves, standby } => format!(
                    "planned: {moves} move(s){}",
                    if *standby {
                        ", then standby"
                    } else if k.goal == Goal::Empty {
                        ", stays awake as a spare"
                    } else {
                        ""
                    }
                ),
                Outcome::Skipped(s) => format!("skipped: {}", render_skip(c, s)),
            };
            out.push_str(&format!("  {} ({goal}): {what}\n", c.node_name(k.node)));
        }
        out
    }
}

/// One step in words, with node names.
pub fn render_step<K: Ord + Clone + fmt::Debug>(c: &Cluster<K>, s: &Step<K>) -> String {
    match s {
        Step::Move {
            vm,
            from,
            to,
            reason,
        } => {
            let why = match reason {
                MoveReason::Drain => "drains it".to_string(),
                MoveReason::Empty { node } => format!("empties {}", c.node_name(*node)),
                MoveReason::Relieve {
                    node,
                    load_before,
                    load_after,
                } => format!(
                    "relieves {} (load {:.0} % to {:.0} %)",
                    c.node_name(*node),
                    load_before * 100.0,
                    load_after * 100.0
                ),
            };
            format!(
                "move VM {vm:?} from {} to {}: {why}",
                c.node_name(*from),
                c.node_name(*to)
            )
        }
        Step::Standby { node } => format!("standby {}", c.node_name(*node)),
    }
}

fn render_skip<K: Ord + Clone + fmt::Debug>(c: &Cluster<K>, s: &Skip<K>) -> String {
    match s {
        Skip::NoLoadReport => "no load report".into(),
        Skip::Budget { needs, left } => format!("needs {needs} move(s), {left} left"),
        Skip::LowGain { gain, min } => {
            format!("each move would gain {gain:.2} of a node, less than {min:.2}")
        }
        Skip::RecentlyMoved { vm, ago_ms: None } => format!("VM {vm:?} moves in this plan"),
        Skip::RecentlyMoved {
            vm,
            ago_ms: Some(ago),
        } => format!("VM {vm:?} moved {} min ago", ago / 60_000),
        Skip::Stuck {
            vm,
            refusal,
            set_aside,
        } => {
            let mut t = format!("VM {vm:?} fits nowhere: {refusal}");
            if !set_aside.is_empty() {
                let names: Vec<&str> = set_aside.iter().map(|&n| c.node_name(n)).collect();
                t.push_str(&format!(" (kept free by the plan: {})", names.join(", ")));
            }
            t
        }
        Skip::StandbyBreaksNPlusOne { failed } => format!(
            "its standby would leave node {}'s VMs nowhere to go (N+1)",
            c.node_name(*failed)
        ),
        Skip::CannotRelieve {
            load_after,
            recent,
            small,
            stuck,
            budget_left,
        } => format!(
            "cannot come down to its mark (at best {:.0} %; VMs moved recently {recent}, \
             too small {small}, fitting nowhere {stuck}; {budget_left} move(s) left)",
            load_after * 100.0
        ),
        Skip::Spare => "kept awake as a spare".into(),
    }
}

/// Where a request goes, or which standby node to wake for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// It fits on an awake node: nothing to wake.
    Fits(NodeIx),
    /// Waking this standby node makes room for it (on that node, or elsewhere once that
    /// node's room keeps the zone N+1-safe).
    Node(NodeIx),
    /// Waking no single standby node helps: the refusal as the pool stands.
    Nowhere(Refusal),
}

/// Which standby node to wake for a request that fits on no awake node: the first of its
/// zone's order whose waking lets the packer place it under every rule, N+1 included.
/// The cluster is left as it was (each node is woken and put back in turn).
pub fn wake_for<K: Ord + Clone + fmt::Debug>(c: &mut Cluster<K>, key: &K, req: &Request) -> Wake {
    let refusal = match c.check(key, req) {
        Ok(n) => return Wake::Fits(n),
        Err(r) => r,
    };
    let standby: Vec<NodeIx> = c
        .zone_nodes(&req.zone)
        .iter()
        .copied()
        .filter(|&n| c.nodes[n].spec.state == NodeState::Standby)
        .collect();
    for n in standby {
        // Setting a known node's state cannot fail.
        let _ = c.set_state(n, NodeState::Ready);
        let fits = c.check(key, req).is_ok();
        let _ = c.set_state(n, NodeState::Standby);
        if fits {
            return Wake::Node(n);
        }
    }
    Wake::Nowhere(refusal)
}

/// Plans moving every VM off `node`, one at a time, each to the best node under every
/// rule. A node that is Ready, Draining or in Maintenance can be drained; planning again
/// after each real migration continues from where it stands.
pub fn plan_drain<K: Ord + Clone + fmt::Debug>(
    c: &Cluster<K>,
    node: NodeIx,
) -> Result<DrainPlan<K>, DrainError<K>> {
    if node >= c.node_count() {
        return Err(DrainError::UnknownNode(node));
    }
    let state = c.nodes[node].spec.state;
    if matches!(
        state,
        NodeState::Down | NodeState::Suspect | NodeState::Standby
    ) {
        return Err(DrainError::NotRunning {
            node: c.node_name(node).to_string(),
            state,
        });
    }
    let mut w = c.clone();
    let z = w.nodes[node].zone;
    let before = zone_failures(&w, z);
    if state == NodeState::Ready {
        let _ = w.set_state(node, NodeState::Draining);
    }
    let margin_lost = zone_failures(&w, z).difference(&before).copied().collect();
    let mut steps = Vec::new();
    let mut stuck = Vec::new();
    let vms: Vec<K> = w.vms_on(node).into_iter().cloned().collect();
    for vm in order_for_evacuation(&w, vms) {
        match move_vm(&mut w, &vm, &|_: &Cluster<K>, _: NodeIx| true) {
            Ok(to) => steps.push(Step::Move {
                vm,
                from: node,
                to,
                reason: MoveReason::Drain,
            }),
            Err((mut refusal, _)) => {
                refusal.wake = wake_to_move(&mut w, &vm);
                stuck.push((vm, refusal));
            }
        }
    }
    if stuck.is_empty() {
        Ok(DrainPlan {
            node,
            steps,
            margin_lost,
        })
    } else {
        Err(DrainError::Stuck {
            node: c.node_name(node).to_string(),
            planned: steps,
            stuck,
        })
    }
}

/// The first standby node of the VM's zone whose waking lets the VM move under every
/// rule, N+1 included; `c` is left as it was.
fn wake_to_move<K: Ord + Clone + fmt::Debug>(c: &mut Cluster<K>, vm: &K) -> Option<NodeIx> {
    let (req, _, from) = request_of(c, vm)?;
    let standby: Vec<NodeIx> = c
        .zone_nodes(&req.zone)
        .iter()
        .copied()
        .filter(|&n| c.nodes[n].spec.state == NodeState::Standby)
        .collect();
    for n in standby {
        let _ = c.set_state(n, NodeState::Ready);
        let moved = move_vm(c, vm, &|_: &Cluster<K>, _: NodeIx| true).is_ok();
        if moved {
            let _ = c.remove(vm);
            reinsert(c, vm, &req, from);
        }
        let _ = c.set_state(n, NodeState::Standby);
        if moved {
            return Some(n);
        }
    }
    None
}

/// Carries out one step on `c` if it keeps every rule (see the module's documentation);
/// otherwise says why and leaves `c` as it was.
pub fn apply<K: Ord + Clone + fmt::Debug>(
    c: &mut Cluster<K>,
    step: &Step<K>,
) -> Result<(), StepError> {
    match step {
        Step::Move { vm, from, to, .. } => {
            let (req, group, on) =
                request_of(c, vm).ok_or_else(|| StepError::UnknownVm(format!("{vm:?}")))?;
            if *to >= c.node_count() {
                return Err(StepError::UnknownNode(*to));
            }
            if *from >= c.node_count() {
                return Err(StepError::UnknownNode(*from));
            }
            if on != *from {
                return Err(StepError::NotOn {
                    vm: format!("{vm:?}"),
                    on: c.node_name(on).to_string(),
                    from: c.node_name(*from).to_string(),
                });
            }
            let refused = |c: &Cluster<K>, why: String| StepError::Refused {
                vm: format!("{vm:?}"),
                from: c.node_name(on).to_string(),
                to: c.node_name(*to).to_string(),
                why,
            };
            if *to == on {
                return Err(refused(c, "it is there already".into()));
            }
            let z = c.nodes[on].zone;
            if c.nodes[*to].zone != z {
                return Err(refused(c, "the node is in another zone".into()));
            }
            let enforce = c.policy.n_plus_one && c.zones[z].ready >= 2;
            let before = zone_failures(c, z);
            c.remove(vm)
                .map_err(|e| StepError::UnknownVm(e.to_string()))?;
            let why = match c.why_not(*to, &req, group) {
                Some(w) => Some(w),
                None => land(c, vm, &req, *to, z, enforce, &before)
                    .err()
                    .map(|failed| Why::NPlusOne { failed }),
            };
            match why {
                None => Ok(()),
                Some(w) => {
                    reinsert(c, vm, &req, on);
                    Err(refused(c, describe(c, &w)))
                }
            }
        }
        Step::Standby { node } => standby(c, *node),
    }
}

/// Plans consolidation: relieve hot nodes, empty the least used ones, stand by what is
/// empty beyond the spares (see the module's documentation). Deterministic: the same
/// cluster and input give the same plan.
pub fn plan_consolidate<K: Ord + Clone + fmt::Debug>(
    c: &Cluster<K>,
    input: &ConsolidateInput<K>,
) -> ConsolidatePlan<K> {
    let mut p = Planner::new(c, input);
    p.relieve();
    p.empty();
    p.idle();
    ConsolidatePlan {
        steps: p.steps,
        considered: p.considered,
    }
}

// ---- the consolidation planner ----

struct Planner<'a, K: Ord + Clone + fmt::Debug> {
    w: Cluster<K>,
    input: &'a ConsolidateInput<K>,
    lim: Limits<K>,
    moved: BTreeSet<K>,
    left: usize,
    steps: Vec<Step<K>>,
    considered: Vec<Considered<K>>,
}

/// What the plan itself asks of a destination, besides the hard rules.
struct Limits<K> {
    /// Per node: its raw vCPUs (milli) and, when reported, its busy milli-vCPUs and mark.
    raw: Vec<f64>,
    busy: Vec<Option<f64>>,
    mark: Vec<f64>,
    /// Per VM on a reported node: the busy milli-vCPUs it carries.
    carries: BTreeMap<K, f64>,
    /// Nodes emptied by the plan: they take nothing.
    emptied: BTreeSet<NodeIx>,
    /// Spare nodes to keep per zone.
    spares: usize,
}

impl<K: Ord + Clone + fmt::Debug> Limits<K> {
    fn load(&self, n: NodeIx) -> Option<f64> {
        self.busy[n].map(|b| {
            if self.raw[n] > 0.0 {
                b / self.raw[n]
            } else {
                0.0
            }
        })
    }

    fn hot(&self, n: NodeIx) -> bool {
        self.load(n).is_some_and(|l| l > self.mark[n])
    }

    /// Whether `to` may take `vm`: not emptied by the plan; in use, unless `into_empty`
    /// and its zone keeps its spares without it; reported, and at or below its mark with
    /// `vm`'s load.
    fn may_take(&self, c: &Cluster<K>, vm: &K, to: NodeIx, into_empty: bool) -> bool {
        if self.emptied.contains(&to) {
            return false;
        }
        if c.vm_count(to) == 0 && !(into_empty && spares_without(c, to) >= self.spares) {
            return false;
        }
        let (Some(b), Some(carry)) = (self.busy[to], self.carries.get(vm)) else {
            return false;
        };
        self.raw[to] > 0.0 && (b + carry) / self.raw[to] <= self.mark[to]
    }

    /// A VM's load moves with it.
    fn shift(&mut self, vm: &K, from: NodeIx, to: NodeIx) {
        let carry = self.carries.get(vm).copied().unwrap_or(0.0);
        if let Some(b) = &mut self.busy[from] {
            *b -= carry;
        }
        if let Some(b) = &mut self.busy[to] {
            *b += carry;
        }
    }
}

/// A goal's moves so far, to undo if it is not kept.
struct Txn<K> {
    mark: usize,
    moves: Vec<(K, NodeIx, NodeIx)>,
}

impl<'a, K: Ord + Clone + fmt::Debug> Planner<'a, K> {
    fn new(c: &Cluster<K>, input: &'a ConsolidateInput<K>) -> Self {
        let w = c.clone();
        let n = w.node_count();
        let raw: Vec<f64> = (0..n)
            .map(|i| w.nodes[i].spec.capacity.0[CPU] as f64)
            .collect();
        let mut busy = vec![None; n];
        let mut mark = vec![0.0; n];
        let mut carries = BTreeMap::new();
        for (&i, l) in input.load.range(..n) {
            let b = l.busy * raw[i];
            busy[i] = Some(b);
            mark[i] = l.high_water;
            let used = w.nodes[i].used.0[CPU] as f64;
            for k in w.vms_on(i) {
                let ix = w.by_key[k];
                let cpu = w.vms[ix].as_ref().map_or(0, |v| v.demand.0[CPU]) as f64;
                let share = if used > 0.0 { b * cpu / used } else { 0.0 };
                carries.insert(k.clone(), share);
            }
        }
        Planner {
            w,
            input,
            lim: Limits {
                raw,
                busy,
                mark,
                carries,
                emptied: BTreeSet::new(),
                spares: input.spares_per_zone,
            },
            moved: BTreeSet::new(),
            left: input.max_moves,
            steps: Vec::new(),
            considered: Vec::new(),
        }
    }

    fn note(&mut self, node: NodeIx, goal: Goal, outcome: Outcome<K>) {
        self.considered.push(Considered {
            node,
            goal,
            outcome,
        });
    }

    /// How long ago `vm` moved, if too recently to move again.
    fn recent(&self, vm: &K) -> Option<Option<u64>> {
        if self.moved.contains(vm) {
            return Some(None);
        }
        let t = *self.input.last_moved.get(vm)?;
        let ago = self.input.now_ms.saturating_sub(t);
        (ago < MIN_MOVE_INTERVAL_MS).then_some(Some(ago))
    }

    /// Moves `vm` in the working copy to the best node the plan allows.
    fn try_move(&mut self, vm: &K, into_empty: bool) -> Result<(NodeIx, NodeIx), Blocked> {
        let from = self.w.node_of(vm).expect("a planned VM is placed");
        let lim = &self.lim;
        let to = move_vm(&mut self.w, vm, &|c: &Cluster<K>, to: NodeIx| {
            lim.may_take(c, vm, to, into_empty)
        })?;
        self.lim.shift(vm, from, to);
        Ok((from, to))
    }

    fn begin(&self) -> Txn<K> {
        Txn {
            mark: self.steps.len(),
            moves: Vec::new(),
        }
    }

    fn record(&mut self, t: &mut Txn<K>, vm: K, from: NodeIx, to: NodeIx, reason: MoveReason) {
        t.moves.push((vm.clone(), from, to));
        self.moved.insert(vm.clone());
        self.left -= 1;
        self.steps.push(Step::Move {
            vm,
            from,
            to,
            reason,
        });
    }

    fn undo(&mut self, t: Txn<K>) {
        for (vm, from, to) in t.moves.into_iter().rev() {
            let (req, _, _) = request_of(&self.w, &vm).expect("moved VM is placed");
            let _ = self.w.remove(&vm);
            reinsert(&mut self.w, &vm, &req, from);
            self.lim.shift(&vm, to, from);
            self.moved.remove(&vm);
            self.left += 1;
        }
        self.steps.truncate(t.mark);
    }

    /// Phase 1: hot nodes, hottest first.
    fn relieve(&mut self) {
        let mut hot: Vec<(f64, NodeIx)> = (0..self.w.node_count())
            .filter(|&n| self.w.nodes[n].spec.state.takes_vms() && self.lim.hot(n))
            .filter_map(|n| self.lim.load(n).map(|l| (l, n)))
            .collect();
        hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, h) in hot {
            self.relieve_one(h);
        }
    }

    fn relieve_one(&mut self, h: NodeIx) {
        let mut vms: Vec<(f64, K)> = self
            .w
            .vms_on(h)
            .into_iter()
            .map(|k| (self.lim.carries.get(k).copied().unwrap_or(0.0), k.clone()))
            .collect();
        vms.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut t = self.begin();
        let (mut recent, mut small, mut stuck) = (0, 0, 0);
        for (carry, vm) in vms {
            if !self.lim.hot(h) || self.left == 0 {
                break;
            }
            if self.recent(&vm).is_some() {
                recent += 1;
                continue;
            }
            // Too little to count (busiest first, so the rest are too; counted for the
            // report).
            if self.lim.raw[h] <= 0.0 || carry / self.lim.raw[h] < self.input.min_gain {
                small += 1;
                continue;
            }
            let before = self.lim.load(h).unwrap_or(0.0);
            match self.try_move(&vm, true) {
                Ok((from, to)) => {
                    let after = self.lim.load(h).unwrap_or(0.0);
                    let reason = MoveReason::Relieve {
                        node: h,
                        load_before: before,
                        load_after: after,
                    };
                    self.record(&mut t, vm, from, to, reason);
                }
                Err(_) => stuck += 1,
            }
        }
        if self.lim.hot(h) {
            let load_after = self.lim.load(h).unwrap_or(0.0);
            let budget_left = self.left + t.moves.len();
            self.undo(t);
            self.note(
                h,
                Goal::Relieve,
                Outcome::Skipped(Skip::CannotRelieve {
                    load_after,
                    recent,
                    small,
                    stuck,
                    budget_left,
                }),
            );
        } else {
            let moves = t.moves.len();
            self.note(
                h,
                Goal::Relieve,
                Outcome::Planned {
                    moves,
                    standby: false,
                },
            );
        }
    }

    /// The larger of a node's CPU and memory shares.
    fn use_share(&self, n: NodeIx) -> f64 {
        let node = &self.w.nodes[n];
        [CPU, MEM]
            .iter()
            .map(|&d| {
                if node.cap.0[d] == 0 {
                    0.0
                } else {
                    node.used.0[d] as f64 / node.cap.0[d] as f64
                }
            })
            .fold(0.0, f64::max)
    }

    /// Phase 2: the least used nodes, least first.
    fn empty(&mut self) {
        let mut cands: Vec<(f64, usize, NodeIx)> = (0..self.w.node_count())
            .filter(|&n| {
                self.w.nodes[n].spec.state.takes_vms() && self.w.vm_count(n) > 0 && !self.lim.hot(n)
            })
            .map(|n| (self.use_share(n), self.w.vm_count(n), n))
            .collect();
        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (_, _, n) in cands {
            let outcome = self.empty_one(n);
            self.note(n, Goal::Empty, outcome);
        }
    }

    fn empty_one(&mut self, n: NodeIx) -> Outcome<K> {
        if self.lim.busy[n].is_none() {
            return Outcome::Skipped(Skip::NoLoadReport);
        }
        let k = self.w.vm_count(n);
        if k == 0 {
            // Emptied since it was listed (nothing moves onto a node being emptied, but
            // nothing here relies on it).
            return Outcome::Skipped(Skip::Spare);
        }
        let gain = 1.0 / k as f64;
        if gain < self.input.min_gain {
            return Outcome::Skipped(Skip::LowGain {
                gain,
                min: self.input.min_gain,
            });
        }
        if k > self.left {
            return Outcome::Skipped(Skip::Budget {
                needs: k,
                left: self.left,
            });
        }
        let vms: Vec<K> = self.w.vms_on(n).into_iter().cloned().collect();
        for vm in &vms {
            if let Some(ago_ms) = self.recent(vm) {
                return Outcome::Skipped(Skip::RecentlyMoved {
                    vm: vm.clone(),
                    ago_ms,
                });
            }
        }
        // Nothing moves onto the node while it is emptied.
        self.lim.emptied.insert(n);
        let mut t = self.begin();
        for vm in order_for_evacuation(&self.w, vms) {
            match self.try_move(&vm, false) {
                Ok((from, to)) => self.record(&mut t, vm, from, to, MoveReason::Empty { node: n }),
                Err((refusal, set_aside)) => {
                    self.undo(t);
                    self.lim.emptied.remove(&n);
                    return Outcome::Skipped(Skip::Stuck {
                        vm,
                        refusal,
                        set_aside,
                    });
                }
            }
        }
        let moves = t.moves.len();
        if self.spares_without(n) < self.input.spares_per_zone {
            // Awake, empty: one of the zone's spares.
            return Outcome::Planned {
                moves,
                standby: false,
            };
        }
        match standby(&mut self.w, n) {
            Ok(()) => {
                self.steps.push(Step::Standby { node: n });
                Outcome::Planned {
                    moves,
                    standby: true,
                }
            }
            Err(_) => {
                let failed = self.standby_blocker(n);
                self.undo(t);
                self.lim.emptied.remove(&n);
                Outcome::Skipped(Skip::StandbyBreaksNPlusOne { failed })
            }
        }
    }

    /// The node whose evacuation fails once `n` stands by (`n` itself if none is found).
    fn standby_blocker(&mut self, n: NodeIx) -> NodeIx {
        let z = self.w.nodes[n].zone;
        let before = zone_failures(&self.w, z);
        let _ = self.w.set_state(n, NodeState::Standby);
        let after = zone_failures(&self.w, z);
        let _ = self.w.set_state(n, NodeState::Ready);
        after.difference(&before).next().copied().unwrap_or(n)
    }

    /// The zone's Ready, empty nodes other than `n`.
    fn spares_without(&self, n: NodeIx) -> usize {
        spares_without(&self.w, n)
    }

    /// Phase 3: empty nodes beyond the spares, the last of each zone's order first.
    fn idle(&mut self) {
        for z in 0..self.w.zones.len() {
            let nodes: Vec<NodeIx> = self.w.zones[z].nodes.iter().rev().copied().collect();
            for n in nodes {
                if self.lim.emptied.contains(&n)
                    || !self.w.nodes[n].spec.state.takes_vms()
                    || self.w.vm_count(n) > 0
                {
                    continue;
                }
                if self.spares_without(n) < self.input.spares_per_zone {
                    self.note(n, Goal::Idle, Outcome::Skipped(Skip::Spare));
                    continue;
                }
                let outcome = match standby(&mut self.w, n) {
                    Ok(()) => {
                        self.steps.push(Step::Standby { node: n });
                        self.lim.emptied.insert(n);
                        Outcome::Planned {
                            moves: 0,
                            standby: true,
                        }
                    }
                    Err(_) => Outcome::Skipped(Skip::StandbyBreaksNPlusOne {
                        failed: self.standby_blocker(n),
                    }),
                };
                self.note(n, Goal::Idle, outcome);
            }
        }
    }
}

// ---- shared by the planners and `apply` ----

/// The Ready, empty nodes of `n`'s zone other than `n`.
fn spares_without<K: Ord + Clone + fmt::Debug>(c: &Cluster<K>, n: NodeIx) -> usize {
    c.zones[c.nodes[n].zone]
        .nodes
        .iter()
        .filter(|&&m| m != n && c.nodes[m].spec.state.takes_vms() && c.vm_count(m) == 0)
        .count()
}

/// A VM that fits nowhere: the packer's refusal, and the nodes the planner set aside.
type Blocked = (Refusal, Vec<NodeIx>);

/// The nodes of zone `z` whose N+1 evacuation fails (none when N+1 is off).
fn zone_failures<K: Ord + Clone + fmt::Debug>(c: &Cluster<K>, z: usize) -> BTreeSet<NodeIx> {
    if !c.policy.n_plus_one {
        return BTreeSet::new();
    }
    c.zones[z]
        .nodes
        .iter()
        .copied()
        .filter(|&f| !c.sims[f].ok)
        .collect()
}

/// A placed VM as a request, its group's index, and its node.
fn request_of<K: Ord + Clone + fmt::Debug>(
    c: &Cluster<K>,
    key: &K,
) -> Option<(Request, Option<usize>, NodeIx)> {
    let v = c.vms[*c.by_key.get(key)?].as_ref()?;
    let req = Request {
        zone: c.zones[c.nodes[v.node].zone].name.clone(),
        demand: v.demand,
        group: v.group.map(|g| c.group_names[g].clone()),
        spread: v.spread,
        priority: 0,
    };
    Some((req, v.group, v.node))
}

/// VMs in N+1's evacuation order: memory, vCPUs, disk, largest first; then key.
fn order_for_evacuation<K: Ord + Clone + fmt::Debug>(c: &Cluster<K>, mut vms: Vec<K>) -> Vec<K> {
    let demand = |k: &K| {
        request_of(c, k).map_or([0; 3], |(r, _, _)| {
            [r.demand.0[MEM], r.demand.0[CPU], r.demand.0[crate::DISK]]
        })
    };
    vms.sort_by(|a, b| demand(b).cmp(&demand(a)).then(a.cmp(b)));
    vms
}

/// Puts back a VM just taken off `node` (the state it was in is known to be valid).
fn reinsert<K: Ord + Clone + fmt::Debug>(c: &mut Cluster<K>, key: &K, req: &Request, node: NodeIx) {
    c.insert(key.clone(), req, node)
        .expect("a VM just removed goes back where it was");
}

/// Inserts a removed VM on `to` and keeps it there unless that breaks an evacuation that
/// succeeded in `before`; then takes it off again and names the node whose evacuation broke.
fn land<K: Ord + Clone + fmt::Debug>(
    c: &mut Cluster<K>,
    key: &K,
    req: &Request,
    to: NodeIx,
    z: usize,
    enforce: bool,
    before: &BTreeSet<NodeIx>,
) -> Result<(), NodeIx> {
    reinsert(c, key, req, to);
    if enforce {
        if let Some(&f) = zone_failures(c, z).difference(before).next() {
            let _ = c.remove(key);
            return Err(f);
        }
    }
    Ok(())
}

/// Moves a VM to the best node by the packer's score that passes every rule and
/// `allowed`. On failure the VM stays where it was.
fn move_vm<K: Ord + Clone + fmt::Debug>(
    c: &mut Cluster<K>,
    key: &K,
    allowed: &dyn Fn(&Cluster<K>, NodeIx) -> bool,
) -> Result<NodeIx, Blocked> {
    let (req, group, from) = request_of(c, key).expect("a planned VM is placed");
    let z = c.nodes[from].zone;
    let enforce = c.policy.n_plus_one && c.zones[z].ready >= 2;
    let before = zone_failures(c, z);
    let _ = c.remove(key);
    let zone = (
        c.zones[z].max_cap,
        c.zones[z].ready_cap,
        c.zones[z].ready_used,
    );
    let scorer = Zhengyun::default();
    let mut ranked = Vec::new();
    let mut set_aside = Vec::new();
    for &m in &c.zones[z].nodes {
        if c.why_not(m, &req, group).is_some() {
            continue;
        }
        if m == from || !allowed(c, m) {
            set_aside.push(m);
            continue;
        }
        ranked.push((scorer.score(&c.candidate(m, &req, zone)), c.nodes[m].pos, m));
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut tried = Vec::new();
    for (_, _, m) in ranked {
        match land(c, key, &req, m, z, enforce, &before) {
            Ok(()) => return Ok(m),
            Err(f) => tried.push((m, f)),
        }
    }
    let mut nodes = Vec::new();
    let mut wake = None;
    for &m in &c.zones[z].nodes {
        let why = match c.why_not(m, &req, group) {
            Some(w) => w,
            None => match tried.iter().find(|(t, _)| *t == m) {
                Some(&(_, failed)) => Why::NPlusOne { failed },
                None => continue,
            },
        };
        if wake.is_none()
            && why == Why::State(NodeState::Standby)
            && c.fits_if_ready(m, &req, group)
        {
            wake = Some(m);
        }
        nodes.push((m, c.nodes[m].spec.name.clone(), why));
    }
    reinsert(c, key, &req, from);
    Err((
        Refusal {
            zone: req.zone.clone(),
            demand: req.demand,
            nodes,
            wake,
        },
        set_aside,
    ))
}

/// Puts an empty node on standby unless that breaks an evacuation that succeeds now.
fn standby<K: Ord + Clone + fmt::Debug>(c: &mut Cluster<K>, n: NodeIx) -> Result<(), StepError> {
    if n >= c.node_count() {
        return Err(StepError::UnknownNode(n));
    }
    if c.vm_count(n) > 0 {
        return Err(StepError::NotEmpty {
            node: c.node_name(n).to_string(),
            vms: c.vm_count(n),
        });
    }
    let state = c.nodes[n].spec.state;
    let z = c.nodes[n].zone;
    let enforce = c.policy.n_plus_one && state.takes_vms() && c.zones[z].ready >= 2;
    let before = zone_failures(c, z);
    let _ = c.set_state(n, NodeState::Standby);
    if enforce {
        if let Some(&f) = zone_failures(c, z).difference(&before).next() {
            let _ = c.set_state(n, state);
            return Err(StepError::StandbyBreaksNPlusOne {
                node: c.node_name(n).to_string(),
                failed: c.node_name(f).to_string(),
            });
        }
    }
    Ok(())
}

/// A rule's refusal in words, with node names.
fn describe<K: Ord + Clone + fmt::Debug>(c: &Cluster<K>, why: &Why) -> String {
    match why {
        Why::State(s) => format!("the node is {}", s.as_str()),
        Why::Short(s) => s
            .iter()
            .map(|(d, need, left)| {
                format!(
                    "short of {} (needs {need}, {left} left)",
                    crate::RESOURCE_NAMES[*d]
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        Why::AntiAffinity { group, spread } => {
            format!("holds a member of anti-affinity group {group} ({spread:?} spread)")
        }
        Why::NPlusOne { failed } => format!(
            "node {}'s VMs would have nowhere to go if it were lost (N+1)",
            c.node_name(*failed)
        ),
        // Whatever else a newer packer may say.
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests;
