//! Where Zhengyun's VMs go: a stranding-aware vector bin-packer that keeps every zone able
//! to lose any one node (N+1).
//!
//! Pure logic: no I/O, no clock, no async, no randomness (sampling takes its seed from the
//! caller). The coordinator feeds it nodes and current placements from its store and asks
//! for one decision at a time; `zy-coordinator pack` replays traces through the very same
//! code; the packing benchmark runs the baselines of other schedulers through the same
//! hard rules ([`Cluster::place_with`] with another [`Scorer`]).
//!
//! # Model
//! A node offers a capacity vector ([`Res`]: milli-vCPUs, MiB of memory, GiB of disk)
//! multiplied by the policy's overcommit per resource (CPU 4.0, memory and disk 1.0 by
//! default). A VM asks for a demand vector in the same units, in one zone, optionally in an
//! anti-affinity group.
//!
//! # Hard rules (never broken, by any scorer)
//! 1. The zone: a VM goes only to a node of its zone.
//! 2. State: only [`NodeState::Ready`] nodes take VMs (Draining, Maintenance, Standby,
//!    Suspect and Down take nothing).
//! 3. Capacity after overcommit, in every resource.
//! 4. Anti-affinity: two VMs of one group never share a node, nor a rack when either of them
//!    asked for [`Spread::Rack`]. A node without a rack is a rack of its own.
//! 5. N+1 (on by default): for every node f that holds VMs, f's VMs sorted by (memory desc,
//!    vCPUs desc, disk desc, id asc) are placed one by one, first fit over the other Ready
//!    nodes of f's zone in the zone's fixed node order (the order nodes were added), within
//!    capacity and anti-affinity, counting the ones already moved. A state is N+1-safe when
//!    that succeeds for every f. A placement is allowed when every evacuation it changes
//!    still succeeds (so a safe state stays safe; a zone that already lost its margin, for
//!    example after a node died, is reported by [`Cluster::n_plus_one_failures`] but does
//!    not block placements that do not make it worse). A zone with fewer than two Ready
//!    nodes cannot survive the loss of one whatever is placed where; N+1 is not enforced
//!    there (and its nodes are reported by [`Cluster::n_plus_one_failures`]).
//!
//! # Incremental N+1
//! Each node's evacuation is simulated once and remembered with the nodes it moved VMs to
//! and how far along the zone order it looked. Placing a VM on node t changes only t's own
//! evacuation and the evacuations that moved something onto t (less room on t can change
//! nothing else: a first fit that skipped t, or never reached it, still does). Freeing room
//! on t changes only the evacuations that looked at t. First fit itself walks a segment
//! tree of each zone's per-resource maximum room, so a decision costs a few evacuations of
//! O(VMs per node · log nodes) each, not the whole zone ([`Cluster::full_n_plus_one`] is the
//! slow definition, kept for tests).
//!
//! # The score ([`Zhengyun`])
//! Among the nodes that pass every rule: a node already in use before an empty one (keep
//! empty nodes empty, so that they can stand by); among used nodes, the one left with the
//! least room (best fit) and, weighed against it, the least *stranded* room: a node whose
//! remaining vCPUs, memory and disk are out of proportion with the zone's mix (full in
//! memory with idle CPUs, full in disk with both idle, or the reverse) is penalised by that
//! imbalance, so that the shapes that arrive later still find all three; past a threshold
//! ([`Zhengyun::stray`]: tighter for a batch known in advance, whose mix is exact) an empty
//! node is opened instead. Scores within [`Zhengyun::near_tie`] of the best count as equal,
//! and among those the node whose placement changes the fewest remembered N+1 evacuations
//! wins: a node that many evacuations rely on is the zone's reserve, and filling it both
//! costs re-simulating them and later makes N+1 refuse. Ties go to the earlier node in the
//! zone order, so decisions are deterministic.
//!
//! When N+1 refuses the chosen node, every other node that passes the cheap rules is tried
//! in score order before the request is refused (the evacuations that broke for earlier
//! nodes are simulated first: in a full zone the same few break for most nodes).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

pub mod baselines;
pub mod consolidate;
pub mod gen;
pub mod metrics;
pub mod replay;
pub mod trace;
mod tree;

use tree::MaxTree;

/// A small deterministic hasher for the packer's integer keys (FxHash, as rustc uses):
/// the per-member maps are touched on every step of every simulated evacuation, where
/// SipHash cost a tenth of the time.
#[derive(Clone, Copy, Debug, Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Resources, as the packer counts them.
pub const DIMS: usize = 3;
/// The index of each resource in a [`Res`]'s array.
pub const CPU: usize = 0;
pub const MEM: usize = 1;
pub const DISK: usize = 2;
/// Names of the resources, for messages.
pub const RESOURCE_NAMES: [&str; DIMS] = ["vCPU", "memory", "disk"];

/// A resource vector: milli-vCPUs, MiB of memory, GiB of disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Res(pub [u64; DIMS]);

impl Res {
    pub const ZERO: Res = Res([0; DIMS]);

    pub fn new(cpu_milli: u64, mem_mib: u64, disk_gib: u64) -> Res {
        Res([cpu_milli, mem_mib, disk_gib])
    }
    pub fn cpu_milli(&self) -> u64 {
        self.0[CPU]
    }
    pub fn mem_mib(&self) -> u64 {
        self.0[MEM]
    }
    pub fn disk_gib(&self) -> u64 {
        self.0[DISK]
    }
    pub fn plus(&self, o: &Res) -> Res {
        Res(std::array::from_fn(|d| self.0[d].saturating_add(o.0[d])))
    }
    pub fn minus(&self, o: &Res) -> Res {
        Res(std::array::from_fn(|d| self.0[d].saturating_sub(o.0[d])))
    }
    /// Whether `self` has at least `o` in every resource.
    pub fn covers(&self, o: &Res) -> bool {
        (0..DIMS).all(|d| self.0[d] >= o.0[d])
    }
}

impl fmt::Display for Res {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPU, {} MiB, {} GiB",
            fmt_milli(self.0[CPU]),
            self.0[MEM],
            self.0[DISK]
        )
    }
}

/// `2500` milli-vCPUs as "2.5".
pub fn fmt_milli(m: u64) -> String {
    if m % 1000 == 0 {
        (m / 1000).to_string()
    } else {
        format!("{:.1}", m as f64 / 1000.0)
    }
}

/// Where a node is in its life, as far as placement cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    Ready,
    /// VMs are being moved off; it takes no new ones.
    Draining,
    /// Emptied for service.
    Maintenance,
    /// Emptied and powered down on purpose; can be woken for room.
    Standby,
    /// Missed reports; may come back.
    Suspect,
    Down,
}

impl NodeState {
    pub fn takes_vms(self) -> bool {
        self == NodeState::Ready
    }
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Maintenance => "maintenance",
            NodeState::Standby => "standby",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
        }
    }
}

/// How far apart the members of an anti-affinity group must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Spread {
    /// Never two on one node.
    #[default]
    Host,
    /// Never two in one rack.
    Rack,
}

/// An overcommit ratio per resource, in thousandths (4000 = 4.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overcommit(pub [u32; DIMS]);

/// The bounds of an overcommit ratio, in thousandths.
pub const OVERCOMMIT_MILLI: std::ops::RangeInclusive<u32> = 100..=16_000;

impl Default for Overcommit {
    fn default() -> Self {
        Overcommit([4000, 1000, 1000])
    }
}

impl Overcommit {
    /// From ratios such as 4.0, refusing what is not a finite number within
    /// [`OVERCOMMIT_MILLI`].
    pub fn from_ratios(r: [f64; DIMS]) -> Result<Overcommit, Error> {
        let mut out = [0u32; DIMS];
        for (d, &ratio) in r.iter().enumerate() {
            let m = ratio * 1000.0;
            if !m.is_finite()
                || m < f64::from(*OVERCOMMIT_MILLI.start())
                || m > f64::from(*OVERCOMMIT_MILLI.end())
            {
                return Err(Error::Overcommit {
                    resource: RESOURCE_NAMES[d],
                    value: ratio,
                });
            }
            out[d] = m.round() as u32;
        }
        Ok(Overcommit(out))
    }

    /// What a node of raw capacity `raw` offers.
    pub fn apply(&self, raw: &Res) -> Res {
        Res(std::array::from_fn(|d| {
            ((u128::from(raw.0[d]) * u128::from(self.0[d])) / 1000).min(u128::from(u64::MAX)) as u64
        }))
    }
}

/// Site-wide rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub overcommit: Overcommit,
    pub n_plus_one: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            overcommit: Overcommit::default(),
            n_plus_one: true,
        }
    }
}

/// A node as the caller describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub zone: String,
    pub rack: Option<String>,
    /// Raw capacity, before overcommit.
    pub capacity: Res,
    pub state: NodeState,
    /// This node's own ratios, instead of the policy's.
    pub overcommit: Option<Overcommit>,
}

/// A VM to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub zone: String,
    pub demand: Res,
    pub group: Option<String>,
    pub spread: Spread,
    /// Higher goes first when a batch is ordered ([`static_order`]).
    pub priority: i32,
}

/// A node's index in its [`Cluster`] (the order of [`Cluster::add_node`]).
pub type NodeIx = usize;

/// Misuse of the packer's interface (bad input from its caller).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("a node named `{0}` is already in the pool")]
    DuplicateNode(String),
    #[error("a VM `{0}` is already placed")]
    DuplicateVm(String),
    #[error("no VM `{0}` is placed")]
    UnknownVm(String),
    #[error("no node has index {0}")]
    UnknownNode(NodeIx),
    #[error("{resource} overcommit must be a number from 0.1 to 16, not {value}")]
    Overcommit { resource: &'static str, value: f64 },
}

/// Why one node could not take a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// Not Ready.
    State(NodeState),
    /// Short of these resources: (resource index, needed, left).
    Short(Vec<(usize, u64, u64)>),
    /// Holds a member of the group already (or its rack does).
    AntiAffinity { group: String, spread: Spread },
    /// Taking it would leave this node's VMs nowhere to go if `failed` were lost.
    NPlusOne { failed: NodeIx },
    /// A sampling scorer did not look at it.
    NotSampled,
    /// It is in another zone (only for a move to a named node: a decision looks at the
    /// request's zone alone).
    Zone(String),
}

/// A refused request: every node of the zone with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub zone: String,
    pub demand: Res,
    /// Every node of the zone, in zone order, with why it could not take the VM.
    pub nodes: Vec<(NodeIx, String, Why)>,
    /// A node on standby that would take it if woken.
    pub wake: Option<NodeIx>,
}

impl Refusal {
    /// Per resource: how many nodes were short of it, and the most left on any node that
    /// is Ready.
    pub fn shortages(&self) -> Vec<(usize, usize, u64)> {
        let mut out = Vec::new();
        for d in 0..DIMS {
            let mut count = 0;
            let mut most = None::<u64>;
            for (_, _, w) in &self.nodes {
                if let Why::Short(s) = w {
                    if let Some((_, _, left)) = s.iter().find(|(r, _, _)| *r == d) {
                        count += 1;
                        most = Some(most.map_or(*left, |m| m.max(*left)));
                    }
                }
            }
            if count > 0 {
                out.push((d, count, most.unwrap_or(0)));
            }
        }
        out
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes.is_empty() {
            return write!(f, "zone {} has no nodes", self.zone);
        }
        let ready = self
            .nodes
            .iter()
            .filter(|(_, _, w)| !matches!(w, Why::State(_)))
            .count();
        if ready == 0 {
            write!(f, "no node of zone {} is ready", self.zone)?;
        } else {
            write!(
                f,
                "no node of zone {} has room for {} ({} ready)",
                self.zone, self.demand, ready
            )?;
            let mut parts = Vec::new();
            for (d, count, most) in self.shortages() {
                let (need, unit) = match d {
                    CPU => (fmt_milli(self.demand.0[CPU]), " vCPU".to_string()),
                    MEM => (self.demand.0[MEM].to_string(), " MiB of memory".to_string()),
                    _ => (self.demand.0[DISK].to_string(), " GiB of disk".to_string()),
                };
                let most = if d == CPU {
                    fmt_milli(most)
                } else {
                    most.to_string()
                };
                parts.push(format!(
                    "{count} short of {need}{unit} (the most left on one: {most})"
                ));
            }
            let aa = self
                .nodes
                .iter()
                .filter(|(_, _, w)| matches!(w, Why::AntiAffinity { .. }))
                .count();
            if aa > 0 {
                parts.push(format!("{aa} hold a member of its anti-affinity group"));
            }
            let np = self
                .nodes
                .iter()
                .filter(|(_, _, w)| matches!(w, Why::NPlusOne { .. }))
                .count();
            if np > 0 {
                parts.push(format!(
                    "{np} would leave the zone unable to survive the loss of a node (N+1)"
                ));
            }
            if !parts.is_empty() {
                write!(f, ": {}", parts.join("; "))?;
            }
        }
        if let Some(w) = self.wake {
            let name = self
                .nodes
                .iter()
                .find(|(i, _, _)| *i == w)
                .map(|(_, n, _)| n.as_str())
                .unwrap_or("?");
            write!(f, "; waking standby node {name} would make room")?;
        }
        Ok(())
    }
}

/// What a scorer sees of one node that passed the cheap rules.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub node: NodeIx,
    /// Position in the zone's fixed order.
    pub pos: usize,
    /// Capacity after overcommit.
    pub capacity: Res,
    /// Used before this VM.
    pub used: Res,
    pub demand: Res,
    /// VMs on it before this one.
    pub vms: usize,
    /// The largest capacity among the zone's nodes, per resource (for scorers that prefer
    /// to open big nodes).
    pub zone_max: Res,
    /// What the zone's Ready nodes offer in all, and what VMs use of them (before this one).
    pub zone_cap: Res,
    pub zone_used: Res,
    /// The zone's index ([`Cluster::zone_index`]).
    pub zone: usize,
}

impl Candidate {
    /// The share of each resource used once the VM is there (0 for a resource the node
    /// has none of).
    pub fn after(&self) -> [f64; DIMS] {
        std::array::from_fn(|d| {
            let c = self.capacity.0[d];
            if c == 0 {
                0.0
            } else {
                (self.used.0[d] + self.demand.0[d]) as f64 / c as f64
            }
        })
    }
}

/// Ranks the nodes that may take a VM: higher is better; ties go to the earlier node.
pub trait Scorer {
    fn name(&self) -> &str;
    fn score(&self, c: &Candidate) -> f64;
    /// Scores within this much of the best count as equal, and among them the packer takes
    /// the node whose placement changes the fewest remembered N+1 evacuations (the cost of
    /// the decision and of the next ones). 0 (the default): the best score alone decides,
    /// as the other schedulers' scores do.
    fn near_tie(&self) -> f64 {
        0.0
    }
}

/// Zhengyun's own score (see the crate's documentation).
#[derive(Clone, Debug)]
pub struct Zhengyun {
    /// Weight of stranded room against plain remaining room.
    pub stranding: f64,
    /// How far a used node's use (its share of each resource) may stray from the line of
    /// the zone's mix before an empty node is opened instead.
    pub stray: f64,
    /// The zone's mix is what its VMs use plus this share of its capacity, balanced, so
    /// that the first VMs of one shape do not set the mix for all.
    pub prior: f64,
    /// For a batch known in advance (a static trace, a plan): per zone index, the share of
    /// each resource the whole batch will use, which is then the mix from the start.
    pub batch_mix: Vec<Option<[f64; DIMS]>>,
    /// See [`Scorer::near_tie`]: nodes that score this close are equal, and the one that
    /// disturbs the fewest remembered evacuations wins (a node many evacuations would use
    /// is the zone's reserve: filling it is what makes N+1 checks slow, and what later
    /// makes them fail).
    pub near_tie: f64,
}

impl Default for Zhengyun {
    fn default() -> Self {
        Zhengyun {
            stranding: 1.0,
            stray: 0.5,
            prior: 0.1,
            batch_mix: Vec::new(),
            near_tie: NEAR_TIE,
        }
    }
}

/// [`Zhengyun::stray`] for a batch known in advance: its mix is exact from the start, so a
/// node that strays from it is opened against sooner. Online, where the mix is only
/// estimated from what is placed, the default is looser: opening a node for a guessed
/// mix keeps it powered long after (at 100 nodes online, 0.2 held 97 hosts on the
/// government mix where 0.5 held 87).
pub const BATCH_STRAY: f64 = 0.2;

/// A batch's [`Zhengyun::stray`] from its dispersion (the demand-weighted mean sine of the
/// angle between its requests' shapes and its mix): a batch of shapes far from its mix
/// (the adversarial CPU-heavy and memory-heavy blocks) balances a node only over several
/// VMs, each of which strays on the way, so it may stray further before a node is opened.
pub fn batch_stray(dispersion: f64) -> f64 {
    BATCH_STRAY + (dispersion - DISPERSION_KNEE).max(0.0) * 0.5
}

/// The dispersion above which a batch's stray grows ([`batch_stray`]).
pub const DISPERSION_KNEE: f64 = 0.5;

/// The balanced prior added to a batch's mix (see [`Zhengyun::prior`]).
pub const BATCH_PRIOR: f64 = 0.1;

/// Zhengyun's default [`Zhengyun::near_tie`].
pub const NEAR_TIE: f64 = 0.05;
/// At most this many near-equal nodes are weighed by their N+1 cost.
const NEAR_TIE_NODES: usize = 16;

/// What an empty node costs against a used one: more than any used node can score.
const OPEN_PENALTY: f64 = 10.0;

impl Zhengyun {
    /// How far a use vector (a share of each resource) lies from the line of the zone's
    /// mix `s`: the part of it that is out of proportion, whichever resource it strands.
    fn stray_of(u: [f64; DIMS], s: [f64; DIMS]) -> f64 {
        let norm = s.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        let along: f64 = (0..DIMS).map(|d| u[d] * s[d]).sum::<f64>() / norm;
        (0..DIMS)
            .map(|d| {
                let off = u[d] - along * s[d] / norm;
                off * off
            })
            .sum::<f64>()
            .sqrt()
    }
}

impl Scorer for Zhengyun {
    fn name(&self) -> &str {
        "zhengyun"
    }
    fn near_tie(&self) -> f64 {
        self.near_tie
    }
    fn score(&self, c: &Candidate) -> f64 {
        let u = c.after();
        if c.vms == 0 {
            // Opening a node: the biggest first (fewest nodes), measured against the
            // zone's biggest in every resource.
            let size: f64 = (0..DIMS)
                .map(|d| {
                    let m = c.zone_max.0[d];
                    if m == 0 {
                        0.0
                    } else {
                        c.capacity.0[d] as f64 / m as f64
                    }
                })
                .sum::<f64>()
                / DIMS as f64;
            return -OPEN_PENALTY + size;
        }
        // The zone's mix: its use per resource, with a balanced prior.
        let mix: [f64; DIMS] = match self.batch_mix.get(c.zone).copied().flatten() {
            Some(m) => m,
            None => std::array::from_fn(|d| {
                let cap = c.zone_cap.0[d];
                if cap == 0 {
                    0.0
                } else {
                    (c.zone_used.0[d] + c.demand.0[d]) as f64 / cap as f64 + self.prior
                }
            }),
        };
        let before: [f64; DIMS] = std::array::from_fn(|d| {
            let cap = c.capacity.0[d];
            if cap == 0 {
                0.0
            } else {
                c.used.0[d] as f64 / cap as f64
            }
        });
        let stray_after = Self::stray_of(u, mix);
        let stray_before = Self::stray_of(before, mix);
        let left = (0..DIMS).map(|d| 1.0 - u[d]).sum::<f64>() / DIMS as f64;
        let mut score = -(left + self.stranding * stray_after);
        if stray_after > self.stray && stray_after > stray_before {
            // Worse than opening a node: this would strand one resource of this node.
            score -= 2.0 * OPEN_PENALTY;
        }
        score
    }
}

/// How a decision looks at the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every node of the zone.
    All,
    /// As Nomad does: nodes in a random order (from `seed`), the first `limit` that pass
    /// every rule; the best of those.
    Sample { limit: usize, seed: u64 },
}

/// (memory desc, vCPUs desc, disk desc, VM slot).
type EvacKey = (Reverse<u64>, Reverse<u64>, Reverse<u64>, usize);

#[derive(Clone, Debug)]
struct Node {
    spec: NodeSpec,
    zone: usize,
    rack: usize,
    pos: usize,
    cap: Res,
    used: Res,
    /// Evacuation order: memory desc, vCPUs desc, disk desc, VM index order (= id order,
    /// see [`Cluster::ord`]).
    vms: BTreeSet<EvacKey>,
}

impl Node {
    fn room(&self) -> [i64; DIMS] {
        if !self.spec.state.takes_vms() {
            return [-1; DIMS];
        }
        std::array::from_fn(|d| {
            self.cap.0[d]
                .saturating_sub(self.used.0[d])
                .min(i64::MAX as u64) as i64
        })
    }
}

#[derive(Clone, Debug)]
struct Vm<K> {
    key: K,
    demand: Res,
    group: Option<usize>,
    spread: Spread,
    node: NodeIx,
}

#[derive(Clone, Debug)]
struct ZoneSt {
    name: String,
    nodes: Vec<NodeIx>,
    tree: MaxTree,
    max_cap: Res,
    /// Nodes that take VMs.
    ready: usize,
    /// Sums over the Ready nodes: capacity, and what their VMs use.
    ready_cap: Res,
    ready_used: Res,
}

/// The remembered evacuation of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sim {
    ok: bool,
    /// Nodes it moved VMs to.
    targets: Vec<NodeIx>,
    /// What it moved onto each of those, in the same order.
    loads: Vec<Res>,
    /// (target, group) of every grouped VM it moved, sorted.
    host_groups: Vec<(NodeIx, usize)>,
    /// The groups it moved members of, sorted.
    groups: Vec<usize>,
    /// (group, rack) of every grouped VM it moved.
    group_racks: Vec<(usize, usize)>,
    /// Each VM in evacuation order: the zone position it went to, and its demand.
    landed: Vec<(usize, Res)>,
    /// The furthest zone position it looked at (every position up to it was looked at).
    reach: usize,
}

/// What a successful N+1 check simulated, for the VM it checked.
#[derive(Clone, Debug)]
struct Pending<K> {
    key: K,
    node: NodeIx,
    demand: Res,
    group: Option<usize>,
    spread: Spread,
    sims: Vec<(NodeIx, Sim)>,
}

/// The pool, its placements and the remembered N+1 evacuations.
#[derive(Clone, Debug)]
pub struct Cluster<K: Ord + Clone + fmt::Debug> {
    policy: Policy,
    nodes: Vec<Node>,
    by_name: HashMap<String, NodeIx>,
    zones: Vec<ZoneSt>,
    zone_ix: HashMap<String, usize>,
    racks: HashMap<String, usize>,
    /// Per rack: the zone position of its first node.
    rack_first: Vec<usize>,
    groups: HashMap<String, usize>,
    group_names: Vec<String>,
    vms: Vec<Option<Vm<K>>>,
    free: Vec<usize>,
    by_key: BTreeMap<K, usize>,
    /// (group, node) → members.
    on_host: FastMap<(usize, NodeIx), u32>,
    /// (group, rack) → (members, members that asked for rack spread).
    on_rack: FastMap<(usize, usize), (u32, u32)>,
    sims: Vec<Sim>,
    /// node t → nodes whose evacuation moved something onto t.
    users: Vec<BTreeSet<NodeIx>>,
    /// (group, rack) → nodes whose evacuation moved a member of the group into the rack.
    rack_users: FastMap<(usize, usize), BTreeSet<NodeIx>>,
    /// The evacuations a successful N+1 check simulated for (VM, node): what inserting
    /// exactly that VM there next would simulate again. Cleared by every change.
    pending: Option<Pending<K>>,
}

impl<K: Ord + Clone + fmt::Debug> Cluster<K> {
    pub fn new(policy: Policy) -> Self {
        Cluster {
            policy,
            nodes: Vec::new(),
            by_name: HashMap::new(),
            zones: Vec::new(),
            zone_ix: HashMap::new(),
            racks: HashMap::new(),
            rack_first: Vec::new(),
            groups: HashMap::new(),
            group_names: Vec::new(),
            vms: Vec::new(),
            free: Vec::new(),
            by_key: BTreeMap::new(),
            on_host: FastMap::default(),
            on_rack: FastMap::default(),
            sims: Vec::new(),
            users: Vec::new(),
            rack_users: FastMap::default(),
            pending: None,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Adds a node (empty) at the end of its zone's order.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<NodeIx, Error> {
        if self.by_name.contains_key(&spec.name) {
            return Err(Error::DuplicateNode(spec.name));
        }
        self.pending = None;
        let ix = self.nodes.len();
        let zone = match self.zone_ix.get(&spec.zone) {
            Some(z) => *z,
            None => {
                let z = self.zones.len();
                self.zones.push(ZoneSt {
                    name: spec.zone.clone(),
                    nodes: Vec::new(),
                    tree: MaxTree::default(),
                    max_cap: Res::ZERO,
                    ready: 0,
                    ready_cap: Res::ZERO,
                    ready_used: Res::ZERO,
                });
                self.zone_ix.insert(spec.zone.clone(), z);
                z
            }
        };
        // A node without a rack is a rack of its own.
        // Racks are named within their zone.
        let rack_name = match &spec.rack {
            Some(r) => format!("{}\u{0}r:{r}", spec.zone),
            None => format!("{}\u{0}n:{}", spec.zone, spec.name),
        };
        let next = self.racks.len();
        let rack = *self.racks.entry(rack_name).or_insert(next);
        let pos = self.zones[zone].nodes.len();
        if rack == self.rack_first.len() {
            self.rack_first.push(pos);
        }
        let cap = spec
            .overcommit
            .unwrap_or(self.policy.overcommit)
            .apply(&spec.capacity);
        let pos = self.zones[zone].nodes.len();
        self.by_name.insert(spec.name.clone(), ix);
        let node = Node {
            spec,
            zone,
            rack,
            pos,
            cap,
            used: Res::ZERO,
            vms: BTreeSet::new(),
        };
        let room = node.room();
        self.nodes.push(node);
        let z = &mut self.zones[zone];
        z.nodes.push(ix);
        z.tree.push(room);
        z.max_cap = Res(std::array::from_fn(|d| z.max_cap.0[d].max(cap.0[d])));
        if self.nodes[ix].spec.state.takes_vms() {
            z.ready += 1;
            z.ready_cap = z.ready_cap.plus(&cap);
        }
        self.sims.push(Sim {
            ok: true,
            ..Sim::default()
        });
        self.users.push(BTreeSet::new());
        Ok(ix)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn node_index(&self, name: &str) -> Option<NodeIx> {
        self.by_name.get(name).copied()
    }
    pub fn node_name(&self, n: NodeIx) -> &str {
        &self.nodes[n].spec.name
    }
    pub fn node_spec(&self, n: NodeIx) -> &NodeSpec {
        &self.nodes[n].spec
    }
    /// Capacity after overcommit.
    pub fn capacity(&self, n: NodeIx) -> Res {
        self.nodes[n].cap
    }
    pub fn used(&self, n: NodeIx) -> Res {
        self.nodes[n].used
    }
    pub fn vm_count(&self, n: NodeIx) -> usize {
        self.nodes[n].vms.len()
    }
    /// The VMs placed on a node, in evacuation order.
    pub fn vms_on(&self, n: NodeIx) -> Vec<&K> {
        self.nodes[n]
            .vms
            .iter()
            .filter_map(|e| self.vms[e.3].as_ref().map(|v| &v.key))
            .collect()
    }
    pub fn node_of(&self, key: &K) -> Option<NodeIx> {
        self.by_key
            .get(key)
            .and_then(|i| self.vms[*i].as_ref())
            .map(|v| v.node)
    }
    /// The zone's nodes in its fixed order.
    pub fn zone_nodes(&self, zone: &str) -> &[NodeIx] {
        self.zone_ix
            .get(zone)
            .map(|z| self.zones[*z].nodes.as_slice())
            .unwrap_or(&[])
    }
    /// A zone's index, as [`Candidate::zone`] gives it.
    pub fn zone_index(&self, zone: &str) -> Option<usize> {
        self.zone_ix.get(zone).copied()
    }

    /// Zhengyun's scorer for a batch of requests known in advance: each zone's mix is the
    /// share of its Ready capacity that the pool's VMs and the whole batch will use.
    pub fn batch_scorer(&self, reqs: &[Request]) -> Zhengyun {
        let mut total: Vec<Res> = self.zones.iter().map(|z| z.ready_used).collect();
        for r in reqs {
            if let Some(&z) = self.zone_ix.get(&r.zone) {
                total[z] = total[z].plus(&r.demand);
            }
        }
        let batch_mix = self
            .zones
            .iter()
            .zip(&total)
            .map(|(z, t)| {
                let share = |d: usize| {
                    if z.ready_cap.0[d] == 0 {
                        0.0
                    } else {
                        t.0[d] as f64 / z.ready_cap.0[d] as f64
                    }
                };
                Some(std::array::from_fn(|d| share(d) + BATCH_PRIOR))
            })
            .collect();
        // How far the batch's shapes lie from its mix: the demand-weighted mean sine of the
        // angle between each request and its zone's mix line.
        let (mut off, mut all) = (0.0f64, 0.0f64);
        for r in reqs {
            let Some(&z) = self.zone_ix.get(&r.zone) else {
                continue;
            };
            let cap = &self.zones[z].ready_cap;
            let v: [f64; DIMS] = std::array::from_fn(|d| {
                if cap.0[d] == 0 {
                    0.0
                } else {
                    r.demand.0[d] as f64 / cap.0[d] as f64
                }
            });
            let m: [f64; DIMS] = std::array::from_fn(|d| {
                if cap.0[d] == 0 {
                    0.0
                } else {
                    total[z].0[d] as f64 / cap.0[d] as f64
                }
            });
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            off += Zhengyun::stray_of(v, m);
            all += norm;
        }
        let dispersion = if all > 0.0 { off / all } else { 0.0 };
        Zhengyun {
            batch_mix,
            stray: batch_stray(dispersion),
            ..Zhengyun::default()
        }
    }

    pub fn zones(&self) -> impl Iterator<Item = &str> {
        self.zones.iter().map(|z| z.name.as_str())
    }

    /// Nodes whose evacuation fails now (empty when the pool is N+1-safe, or N+1 is off).
    pub fn n_plus_one_failures(&self) -> Vec<NodeIx> {
        if !self.policy.n_plus_one {
            return Vec::new();
        }
        (0..self.nodes.len())
            .filter(|&f| !self.sims[f].ok)
            .collect()
    }

    /// Puts a VM where the caller says (a placement that exists already), checking nothing
    /// but that the key is new: the store is the truth, even when it breaks a rule.
    pub fn insert(&mut self, key: K, req: &Request, node: NodeIx) -> Result<(), Error> {
        if node >= self.nodes.len() {
            return Err(Error::UnknownNode(node));
        }
        if self.by_key.contains_key(&key) {
            return Err(Error::DuplicateVm(format!("{key:?}")));
        }
        let group = req.group.as_ref().map(|g| self.intern_group(g));
        let vm = Vm {
            key: key.clone(),
            demand: req.demand,
            group,
            spread: req.spread,
            node,
        };
        let ix = match self.free.pop() {
            Some(i) => {
                self.vms[i] = Some(vm);
                i
            }
            None => {
                self.vms.push(Some(vm));
                self.vms.len() - 1
            }
        };
        let pending = self.pending.take();
        self.attach(ix);
        if self.policy.n_plus_one {
            match pending {
                Some(p)
                    if p.key == key
                        && p.node == node
                        && p.demand == req.demand
                        && p.group == group
                        && p.spread == req.spread =>
                {
                    for (f, sim) in p.sims {
                        self.store_sim(f, sim);
                    }
                }
                _ => self.resim_after_add(node, group),
            }
        }
        self.by_key.insert(key, ix);
        Ok(())
    }

    /// Takes a VM away (deleted, or moving: insert it again where it goes).
    pub fn remove(&mut self, key: &K) -> Result<NodeIx, Error> {
        let ix = *self
            .by_key
            .get(key)
            .ok_or_else(|| Error::UnknownVm(format!("{key:?}")))?;
        self.pending = None;
        let (node, grouped) = self.vms[ix]
            .as_ref()
            .map(|v| (v.node, v.group))
            .unwrap_or((0, None));
        self.detach(ix);
        self.by_key.remove(key);
        self.vms[ix] = None;
        self.free.push(ix);
        if self.policy.n_plus_one {
            self.resim_after_free(node, grouped);
        }
        Ok(node)
    }

    /// Changes a node's state (a Draining node keeps its VMs; it takes no new ones).
    pub fn set_state(&mut self, n: NodeIx, state: NodeState) -> Result<(), Error> {
        if n >= self.nodes.len() {
            return Err(Error::UnknownNode(n));
        }
        let before = self.nodes[n].spec.state;
        if before == state {
            return Ok(());
        }
        self.pending = None;
        self.nodes[n].spec.state = state;
        let (cap, used) = (self.nodes[n].cap, self.nodes[n].used);
        let z = &mut self.zones[self.nodes[n].zone];
        if state.takes_vms() {
            z.ready += 1;
            z.ready_cap = z.ready_cap.plus(&cap);
            z.ready_used = z.ready_used.plus(&used);
        } else if before.takes_vms() {
            z.ready -= 1;
            z.ready_cap = z.ready_cap.minus(&cap);
            z.ready_used = z.ready_used.minus(&used);
        }
        self.update_tree(n);
        if self.policy.n_plus_one {
            if state.takes_vms() {
                self.resim_after_free(n, None);
            } else if before.takes_vms() {
                self.resim_after_add(n, None);
            }
        }
        Ok(())
    }

    /// Decides where a VM goes by Zhengyun's score and places it there.
    pub fn place(&mut self, key: K, req: &Request) -> Result<NodeIx, Refusal> {
        self.place_with(key, req, &Zhengyun::default(), Selection::All)
    }

    /// Decides without placing (`key` is the VM's id-to-be: N+1 orders equal VMs by it).
    pub fn check(&mut self, key: &K, req: &Request) -> Result<NodeIx, Refusal> {
        self.decide(key, req, &Zhengyun::default(), Selection::All)
    }

    /// Whether node `n` may take the VM, by every hard rule (N+1 included), without
    /// placing it: for a move to a chosen node. The reason when it may not.
    pub fn check_on(&mut self, key: &K, req: &Request, n: NodeIx) -> Result<(), Why> {
        if n >= self.nodes.len() {
            return Err(Why::State(NodeState::Down));
        }
        if self.nodes[n].spec.zone != req.zone {
            return Err(Why::Zone(self.nodes[n].spec.zone.clone()));
        }
        let group = req.group.as_ref().map(|g| self.intern_group(g));
        if let Some(w) = self.why_not(n, req, group) {
            return Err(w);
        }
        match self.n_plus_one_breaks(key, n, req, group, &[]) {
            None => Ok(()),
            Some(failed) => Err(Why::NPlusOne { failed }),
        }
    }

    /// Decides by any scorer under the same hard rules, and places the VM.
    pub fn place_with(
        &mut self,
        key: K,
        req: &Request,
        scorer: &dyn Scorer,
        sel: Selection,
    ) -> Result<NodeIx, Refusal> {
        if self.by_key.contains_key(&key) {
            // A caller's bug; refuse rather than double-count.
            return Err(Refusal {
                zone: req.zone.clone(),
                demand: req.demand,
                nodes: Vec::new(),
                wake: None,
            });
        }
        let n = self.decide(&key, req, scorer, sel)?;
        self.insert(key, req, n)
            .expect("a decided node exists and the key is new");
        Ok(n)
    }

    fn decide(
        &mut self,
        key: &K,
        req: &Request,
        scorer: &dyn Scorer,
        sel: Selection,
    ) -> Result<NodeIx, Refusal> {
        let Some(&z) = self.zone_ix.get(&req.zone) else {
            return Err(Refusal {
                zone: req.zone.clone(),
                demand: req.demand,
                nodes: Vec::new(),
                wake: None,
            });
        };
        // Interned even when new: the N+1 check's simulations must see the group as the
        // placement will.
        let group = req.group.as_ref().map(|g| self.intern_group(g));
        let zone_max = (
            self.zones[z].max_cap,
            self.zones[z].ready_cap,
            self.zones[z].ready_used,
        );
        let mut tried_n1: Vec<(NodeIx, NodeIx)> = Vec::new();
        // The evacuations that broke so far, most recent first.
        let mut breakers: Vec<NodeIx> = Vec::new();
        if let Selection::Sample { limit, seed } = sel {
            // Nomad's way: feasibility (here every hard rule, N+1 included) in random order
            // until `limit` nodes pass, then the best score among them.
            let mut order = self.zones[z].nodes.clone();
            shuffle(&mut order, seed);
            let mut passed = Vec::new();
            for &n in &order {
                if passed.len() >= limit.max(1) {
                    break;
                }
                if self.why_not(n, req, group).is_some() {
                    continue;
                }
                if let Some(f) = self.n_plus_one_breaks(key, n, req, group, &breakers) {
                    tried_n1.push((n, f));
                    note_breaker(&mut breakers, f);
                    continue;
                }
                passed.push(n);
            }
            let best = passed
                .iter()
                .map(|&n| {
                    (
                        scorer.score(&self.candidate(n, req, zone_max)),
                        self.nodes[n].pos,
                        n,
                    )
                })
                .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
            if let Some((_, _, n)) = best {
                return Ok(n);
            }
        } else {
            // One pass for the best node; the rest are ranked only if N+1 refuses it.
            let need: [i64; DIMS] =
                std::array::from_fn(|d| req.demand.0[d].min(i64::MAX as u64) as i64);
            let mut best: Option<(f64, usize, NodeIx)> = None;
            let tie = scorer.near_tie();
            let mut scored: Vec<(f64, usize, NodeIx)> = Vec::new();
            let zone = &self.zones[z];
            for (pos, &n) in zone.nodes.iter().enumerate() {
                let room = zone.tree.get(pos);
                if (0..DIMS).any(|d| room[d] < need[d]) {
                    continue;
                }
                if let Some(g) = group {
                    if self.conflicts(g, req.spread, n) {
                        continue;
                    }
                }
                let sc = scorer.score(&self.candidate(n, req, zone_max));
                if tie > 0.0 {
                    scored.push((sc, pos, n));
                }
                if best.is_none_or(|b| sc > b.0) {
                    best = Some((sc, pos, n));
                }
            }
            if let (Some(b), true) = (best, tie > 0.0 && self.policy.n_plus_one) {
                // Among the near-equal best, the one whose placement changes the fewest
                // remembered evacuations (ties: score, then zone order).
                let mut near: Vec<(f64, usize, NodeIx)> =
                    scored.into_iter().filter(|c| c.0 >= b.0 - tie).collect();
                near.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                near.truncate(NEAR_TIE_NODES);
                // Those fewest evacuations use first: the count of each stops at the least
                // so far, so the search stays short when the best are the zone's reserve.
                near.sort_by_key(|c| self.users[c.2].len());
                let mut least: Option<(usize, (f64, usize, NodeIx))> = None;
                for c in near {
                    let limit = least.map_or(usize::MAX, |l| l.0);
                    let cost = self.add_cost(c.2, &req.demand, group, limit);
                    if least.is_none_or(|l| cost < l.0) {
                        least = Some((cost, c));
                    }
                    if cost <= 1 {
                        break;
                    }
                }
                best = least.map(|l| l.1);
            }
            if let Some((_, _, n)) = best {
                match self.n_plus_one_breaks(key, n, req, group, &breakers) {
                    None => return Ok(n),
                    Some(f) => {
                        tried_n1.push((n, f));
                        note_breaker(&mut breakers, f);
                    }
                }
                let mut cands: Vec<(f64, usize, NodeIx)> = Vec::new();
                for &m in &self.zones[z].nodes {
                    if m != n && self.why_not(m, req, group).is_none() {
                        let sc = scorer.score(&self.candidate(m, req, zone_max));
                        cands.push((sc, self.nodes[m].pos, m));
                    }
                }
                cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                for &(_, _, m) in &cands {
                    match self.n_plus_one_breaks(key, m, req, group, &breakers) {
                        None => return Ok(m),
                        Some(f) => {
                            tried_n1.push((m, f));
                            note_breaker(&mut breakers, f);
                        }
                    }
                }
            }
        }
        Err(self.refusal(z, req, group, &tried_n1, sel))
    }

    fn refusal(
        &self,
        z: usize,
        req: &Request,
        group: Option<usize>,
        tried_n1: &[(NodeIx, NodeIx)],
        sel: Selection,
    ) -> Refusal {
        let mut nodes = Vec::new();
        let mut wake = None;
        for &n in &self.zones[z].nodes {
            let why = if let Some(w) = self.why_not(n, req, group) {
                w
            } else if let Some((_, f)) = tried_n1.iter().find(|(c, _)| *c == n) {
                Why::NPlusOne { failed: *f }
            } else if matches!(sel, Selection::Sample { .. }) {
                Why::NotSampled
            } else {
                // Unreachable in practice: every other node was a candidate and was tried.
                Why::NPlusOne { failed: n }
            };
            if wake.is_none()
                && why == Why::State(NodeState::Standby)
                && self.fits_if_ready(n, req, group)
            {
                wake = Some(n);
            }
            nodes.push((n, self.nodes[n].spec.name.clone(), why));
        }
        Refusal {
            zone: req.zone.clone(),
            demand: req.demand,
            nodes,
            wake,
        }
    }

    fn candidate(&self, n: NodeIx, req: &Request, zone: (Res, Res, Res)) -> Candidate {
        let node = &self.nodes[n];
        Candidate {
            node: n,
            pos: node.pos,
            capacity: node.cap,
            used: node.used,
            demand: req.demand,
            vms: node.vms.len(),
            zone_max: zone.0,
            zone_cap: zone.1,
            zone_used: zone.2,
            zone: node.zone,
        }
    }

    /// The cheap rules: state, capacity, anti-affinity.
    fn why_not(&self, n: NodeIx, req: &Request, group: Option<usize>) -> Option<Why> {
        let node = &self.nodes[n];
        if !node.spec.state.takes_vms() {
            return Some(Why::State(node.spec.state));
        }
        self.short_or_conflict(n, req, group)
    }

    fn short_or_conflict(&self, n: NodeIx, req: &Request, group: Option<usize>) -> Option<Why> {
        let node = &self.nodes[n];
        let left = node.cap.minus(&node.used);
        let short: Vec<(usize, u64, u64)> = (0..DIMS)
            .filter(|&d| left.0[d] < req.demand.0[d])
            .map(|d| (d, req.demand.0[d], left.0[d]))
            .collect();
        if !short.is_empty() {
            return Some(Why::Short(short));
        }
        if let Some(g) = group {
            if self.conflicts(g, req.spread, n) {
                return Some(Why::AntiAffinity {
                    group: self.group_names[g].clone(),
                    spread: req.spread,
                });
            }
        }
        None
    }

    fn fits_if_ready(&self, n: NodeIx, req: &Request, group: Option<usize>) -> bool {
        self.short_or_conflict(n, req, group).is_none()
    }

    fn conflicts(&self, g: usize, spread: Spread, n: NodeIx) -> bool {
        if self.on_host.get(&(g, n)).copied().unwrap_or(0) > 0 {
            return true;
        }
        let (all, strict) = self
            .on_rack
            .get(&(g, self.nodes[n].rack))
            .copied()
            .unwrap_or((0, 0));
        strict > 0 || (spread == Spread::Rack && all > 0)
    }

    fn intern_group(&mut self, g: &str) -> usize {
        if let Some(i) = self.groups.get(g) {
            return *i;
        }
        let i = self.group_names.len();
        self.group_names.push(g.to_string());
        self.groups.insert(g.to_string(), i);
        i
    }

    fn attach(&mut self, ix: usize) {
        self.account(ix, true);
    }

    fn detach(&mut self, ix: usize) {
        self.account(ix, false);
    }

    /// Counts a VM on its node (`add`) or stops counting it: use, the zone's Ready use,
    /// the evacuation set, group members, the tree.
    fn account(&mut self, ix: usize, add: bool) {
        let (node, demand, group, spread) = {
            let v = self.vms[ix].as_ref().expect("a counted VM exists");
            (v.node, v.demand, v.group, v.spread)
        };
        let n = &mut self.nodes[node];
        let entry = (
            Reverse(demand.0[MEM]),
            Reverse(demand.0[CPU]),
            Reverse(demand.0[DISK]),
            ix,
        );
        let step = |r: &Res| {
            if add {
                r.plus(&demand)
            } else {
                r.minus(&demand)
            }
        };
        n.used = step(&n.used);
        if n.spec.state.takes_vms() {
            let z = &mut self.zones[n.zone];
            z.ready_used = step(&z.ready_used);
        }
        if add {
            n.vms.insert(entry);
        } else {
            n.vms.remove(&entry);
        }
        if let Some(g) = group {
            let rack = self.nodes[node].rack;
            let delta = if add { 1 } else { -1 };
            add_member(
                &mut self.on_host,
                &mut self.on_rack,
                g,
                node,
                rack,
                spread,
                delta,
            );
        }
        self.update_tree(node);
    }

    fn update_tree(&mut self, n: NodeIx) {
        let room = self.nodes[n].room();
        let (z, pos) = (self.nodes[n].zone, self.nodes[n].pos);
        self.zones[z].tree.set(pos, room);
    }

    /// f's VMs in evacuation order (memory, vCPUs, disk descending; key ascending). The
    /// node keeps them sorted by demand already: only runs of equal demand, ordered by
    /// slot there, are sorted again by key.
    fn evac_order(&self, f: NodeIx) -> Vec<usize> {
        let set = &self.nodes[f].vms;
        let mut v: Vec<usize> = Vec::with_capacity(set.len());
        let mut run_start = 0;
        let mut last: Option<(Reverse<u64>, Reverse<u64>, Reverse<u64>)> = None;
        let key = |i: usize| &self.vms[i].as_ref().expect("placed").key;
        for e in set {
            let d = (e.0, e.1, e.2);
            if last != Some(d) {
                if v.len() - run_start > 1 {
                    v[run_start..].sort_by(|&a, &b| key(a).cmp(key(b)));
                }
                run_start = v.len();
                last = Some(d);
            }
            v.push(e.3);
        }
        if v.len() - run_start > 1 {
            v[run_start..].sort_by(|&a, &b| key(a).cmp(key(b)));
        }
        v
    }

    /// Simulates losing f: its VMs first fit over the other Ready nodes of its zone.
    /// Leaves the pool as it found it.
    fn simulate(&mut self, f: NodeIx) -> Sim {
        let order = self.evac_order(f);
        if order.is_empty() {
            return Sim {
                ok: true,
                ..Sim::default()
            };
        }
        let z = self.nodes[f].zone;
        let fpos = self.nodes[f].pos;
        let frack = self.nodes[f].rack;
        // f is gone: it takes nothing, and its members leave its rack.
        let saved_room = self.zones[z].tree.get(fpos);
        self.zones[z].tree.set(fpos, [-1; DIMS]);
        for &ix in &order {
            let v = self.vms[ix].as_ref().expect("placed");
            if let Some(g) = v.group {
                let spread = v.spread;
                add_member(
                    &mut self.on_host,
                    &mut self.on_rack,
                    g,
                    f,
                    frack,
                    spread,
                    -1,
                );
            }
        }
        let mut moved: Vec<(usize, NodeIx)> = Vec::new();
        let mut reach = 0;
        let mut ok = true;
        for &ix in &order {
            let (demand, group, spread) = {
                let v = self.vms[ix].as_ref().expect("placed");
                (v.demand, v.group, v.spread)
            };
            let need: [i64; DIMS] =
                std::array::from_fn(|d| demand.0[d].min(i64::MAX as u64) as i64);
            let zone_nodes = &self.zones[z].nodes;
            let nodes = &self.nodes;
            let on_host = &self.on_host;
            let on_rack = &self.on_rack;
            let found = self.zones[z].tree.first_fit(&need, |pos| match group {
                None => true,
                Some(g) => {
                    let t = zone_nodes[pos];
                    if on_host.get(&(g, t)).copied().unwrap_or(0) > 0 {
                        return false;
                    }
                    let (all, strict) = on_rack.get(&(g, nodes[t].rack)).copied().unwrap_or((0, 0));
                    !(strict > 0 || (spread == Spread::Rack && all > 0))
                }
            });
            match found {
                None => {
                    ok = false;
                    reach = self.zones[z].nodes.len();
                    break;
                }
                Some(pos) => {
                    reach = reach.max(pos);
                    let t = self.zones[z].nodes[pos];
                    moved.push((ix, t));
                    self.take_room(z, t, &demand, true);
                    if let Some(g) = group {
                        let rack = self.nodes[t].rack;
                        add_member(&mut self.on_host, &mut self.on_rack, g, t, rack, spread, 1);
                    }
                }
            }
        }
        // Undo.
        for &(ix, t) in moved.iter().rev() {
            let (demand, group, spread) = {
                let v = self.vms[ix].as_ref().expect("placed");
                (v.demand, v.group, v.spread)
            };
            self.take_room(z, t, &demand, false);
            if let Some(g) = group {
                let rack = self.nodes[t].rack;
                add_member(&mut self.on_host, &mut self.on_rack, g, t, rack, spread, -1);
            }
        }
        for &ix in &order {
            let v = self.vms[ix].as_ref().expect("placed");
            if let Some(g) = v.group {
                let spread = v.spread;
                add_member(&mut self.on_host, &mut self.on_rack, g, f, frack, spread, 1);
            }
        }
        self.zones[z].tree.set(fpos, saved_room);
        let mut loads: BTreeMap<NodeIx, Res> = BTreeMap::new();
        let mut host_groups = Vec::new();
        let mut group_racks = Vec::new();
        let mut groups = Vec::new();
        let mut landed = Vec::with_capacity(moved.len());
        for &(ix, t) in &moved {
            let v = self.vms[ix].as_ref().expect("placed");
            let l = loads.entry(t).or_default();
            *l = l.plus(&v.demand);
            if let Some(g) = v.group {
                host_groups.push((t, g));
                group_racks.push((g, self.nodes[t].rack));
                groups.push(g);
            }
            landed.push((self.nodes[t].pos, v.demand));
        }
        host_groups.sort_unstable();
        group_racks.sort_unstable();
        group_racks.dedup();
        groups.sort_unstable();
        groups.dedup();
        let (targets, loads) = loads.into_iter().unzip();
        Sim {
            ok,
            targets,
            loads,
            host_groups,
            groups,
            group_racks,
            landed,
            reach,
        }
    }

    fn take_room(&mut self, z: usize, t: NodeIx, demand: &Res, take: bool) {
        let pos = self.nodes[t].pos;
        let mut r = self.zones[z].tree.get(pos);
        for (r, &x) in r.iter_mut().zip(&demand.0) {
            let x = x.min(i64::MAX as u64) as i64;
            *r = if take { *r - x } else { *r + x };
        }
        self.zones[z].tree.set(pos, r);
    }

    fn store_sim(&mut self, f: NodeIx, sim: Sim) {
        for &t in &self.sims[f].targets {
            self.users[t].remove(&f);
        }
        for gr in &self.sims[f].group_racks {
            if let Some(set) = self.rack_users.get_mut(gr) {
                set.remove(&f);
                if set.is_empty() {
                    self.rack_users.remove(gr);
                }
            }
        }
        for &t in &sim.targets {
            self.users[t].insert(f);
        }
        for gr in &sim.group_racks {
            self.rack_users.entry(*gr).or_default().insert(f);
        }
        self.sims[f] = sim;
    }

    /// The evacuations that less room on t, or one more member of `group` on t, can change:
    /// t's own, the ones that moved something onto t, and the ones that moved a member of
    /// the group into t's rack.
    ///
    /// Called once t's room is already the new one. An evacuation whose load on t still
    /// fits t's new room, with no member of the group among it, is unchanged: each of its
    /// VMs that went to t still fits there at its turn, and each that passed t by (for lack
    /// of room or for its group) still does.
    fn affected_by_add(&self, t: NodeIx, group: Option<usize>) -> Vec<NodeIx> {
        let room = self.zones[self.nodes[t].zone].tree.get(self.nodes[t].pos);
        let mut a: BTreeSet<NodeIx> = BTreeSet::new();
        for &f in &self.users[t] {
            let sim = &self.sims[f];
            let Ok(i) = sim.targets.binary_search(&t) else {
                a.insert(f);
                continue;
            };
            let load = &sim.loads[i];
            let fits = (0..DIMS).all(|d| room[d] >= load.0[d].min(i64::MAX as u64) as i64);
            let clash = group.is_some_and(|g| sim.host_groups.binary_search(&(t, g)).is_ok());
            if !fits || clash {
                a.insert(f);
            }
        }
        if let Some(g) = group {
            if let Some(set) = self.rack_users.get(&(g, self.nodes[t].rack)) {
                a.extend(set.iter().copied());
            }
        }
        a.insert(t);
        a.into_iter().collect()
    }

    /// How many remembered evacuations placing `demand` (of `group`) on t would change:
    /// [`Cluster::affected_by_add`] without the change, counted (up to `limit`: the
    /// count stops there).
    fn add_cost(&self, t: NodeIx, demand: &Res, group: Option<usize>, limit: usize) -> usize {
        let room = self.zones[self.nodes[t].zone].tree.get(self.nodes[t].pos);
        let room: [i64; DIMS] =
            std::array::from_fn(|d| room[d] - demand.0[d].min(i64::MAX as u64) as i64);
        let mut count = 1;
        for &f in &self.users[t] {
            let sim = &self.sims[f];
            let Ok(i) = sim.targets.binary_search(&t) else {
                count += 1;
                continue;
            };
            let load = &sim.loads[i];
            let fits = (0..DIMS).all(|d| room[d] >= load.0[d].min(i64::MAX as u64) as i64);
            let clash = group.is_some_and(|g| sim.host_groups.binary_search(&(t, g)).is_ok());
            if !fits || clash {
                count += 1;
                if count >= limit {
                    return count;
                }
            }
        }
        if let Some(g) = group {
            if let Some(set) = self.rack_users.get(&(g, self.nodes[t].rack)) {
                count += set.len();
            }
        }
        count
    }

    /// Room on t went down (a VM arrived, or t stopped taking VMs): t's own evacuation and
    /// the ones that used t.
    fn resim_after_add(&mut self, t: NodeIx, group: Option<usize>) {
        for f in self.affected_by_add(t, group) {
            let s = self.simulate(f);
            self.store_sim(f, s);
        }
    }

    /// Room on t went up (a VM left, or t takes VMs again): t's own evacuation and the ones
    /// that looked at t, or at any node of t's rack when a member of a group left it.
    ///
    /// Called once t's room is already the new one. A successful evacuation changes only if
    /// one of its VMs that passed t by now fits t's room (its own earlier load on t only
    /// makes that less likely, so this may simulate one too many, never one too few), or,
    /// when a member of `group` left, if it moved members of that group past t's rack.
    fn resim_after_free(&mut self, t: NodeIx, group: Option<usize>) {
        let z = self.nodes[t].zone;
        let pos = self.nodes[t].pos;
        let room = self.zones[z].tree.get(pos);
        let rack_pos = self.rack_first[self.nodes[t].rack].min(pos);
        let affected: Vec<NodeIx> = self.zones[z]
            .nodes
            .iter()
            .copied()
            .filter(|&f| {
                if f == t {
                    return true;
                }
                if self.nodes[f].vms.is_empty() {
                    return false;
                }
                let sim = &self.sims[f];
                if !sim.ok {
                    return true;
                }
                if sim.reach < rack_pos {
                    return false;
                }
                let passed_by = sim.landed.iter().any(|(p, d)| {
                    *p > pos && (0..DIMS).all(|k| room[k] >= d.0[k].min(i64::MAX as u64) as i64)
                });
                passed_by || group.is_some_and(|g| sim.groups.binary_search(&g).is_ok())
            })
            .collect();
        for f in affected {
            let s = self.simulate(f);
            self.store_sim(f, s);
        }
    }

    /// Would placing this VM on n break an evacuation that succeeds now? Returns the node
    /// whose evacuation would fail.
    fn n_plus_one_breaks(
        &mut self,
        key: &K,
        n: NodeIx,
        req: &Request,
        group: Option<usize>,
        breakers: &[NodeIx],
    ) -> Option<NodeIx> {
        if !self.policy.n_plus_one || self.zones[self.nodes[n].zone].ready < 2 {
            return None;
        }
        // Apply, simulate the evacuations it changes, undo.
        let ix = self.vms.len();
        self.vms.push(Some(Vm {
            key: key.clone(),
            demand: req.demand,
            group,
            spread: req.spread,
            node: n,
        }));
        self.attach(ix);
        let mut broke = None;
        let mut sims = Vec::new();
        let mut affected = self.affected_by_add(n, group);
        if !breakers.is_empty() {
            // The evacuations that broke for the other nodes of this decision first: in a
            // full zone the same few break for most of them, and one simulation says no.
            affected.sort_by_key(|f| !breakers.contains(f));
        }
        for f in affected {
            let was_ok = self.sims[f].ok || f == n;
            let sim = self.simulate(f);
            if was_ok && !sim.ok {
                broke = Some(f);
                break;
            }
            sims.push((f, sim));
        }
        self.detach(ix);
        self.vms.pop();
        self.pending = broke.is_none().then(|| Pending {
            key: key.clone(),
            node: n,
            demand: req.demand,
            group,
            spread: req.spread,
            sims,
        });
        broke
    }

    /// The definition, from scratch (slow; for tests and the benchmark's rule check).
    pub fn full_n_plus_one(&mut self) -> Vec<NodeIx> {
        let mut bad = Vec::new();
        for f in 0..self.nodes.len() {
            if !self.simulate(f).ok {
                bad.push(f);
            }
        }
        bad
    }
}

/// Remembers an evacuation that broke, most recent first, a few at most.
fn note_breaker(breakers: &mut Vec<NodeIx>, f: NodeIx) {
    breakers.retain(|&b| b != f);
    breakers.insert(0, f);
    breakers.truncate(4);
}

fn add_member(
    on_host: &mut FastMap<(usize, NodeIx), u32>,
    on_rack: &mut FastMap<(usize, usize), (u32, u32)>,
    g: usize,
    node: NodeIx,
    rack: usize,
    spread: Spread,
    delta: i32,
) {
    let h = on_host.entry((g, node)).or_insert(0);
    *h = h.saturating_add_signed(delta);
    if *h == 0 {
        on_host.remove(&(g, node));
    }
    let r = on_rack.entry((g, rack)).or_insert((0, 0));
    r.0 = r.0.saturating_add_signed(delta);
    if spread == Spread::Rack {
        r.1 = r.1.saturating_add_signed(delta);
    }
    if *r == (0, 0) {
        on_rack.remove(&(g, rack));
    }
}

/// Fisher-Yates with a small deterministic generator (splitmix64).
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let j = (z % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The order in which Zhengyun decides a batch whose members all arrive at once (a static
/// trace, or a plan). Returns indices into `reqs`.
///
/// Higher priority first. Within a priority, requests fall into classes by shape (their
/// CPU to memory ratio against `unit`, a typical node), each class sorted larger first
/// (by the sum of its shares of `unit`; anti-affinity members first among equals), and the
/// classes are interleaved so that every prefix of the order holds each class in the
/// proportion of its whole demand. Big before small, as first-fit decreasing does, but
/// never all of one shape before another: that is what strands a node's CPU behind full
/// memory, or the reverse.
pub fn static_order(reqs: &[Request], unit: &Res) -> Vec<usize> {
    const CLASSES: usize = 6;
    let share = |r: &Request, d: usize| -> f64 {
        if unit.0[d] == 0 {
            0.0
        } else {
            r.demand.0[d] as f64 / unit.0[d] as f64
        }
    };
    let size = |r: &Request| -> f64 { (0..DIMS).map(|d| share(r, d)).sum() };
    let class = |r: &Request| -> usize {
        let (c, m) = (share(r, CPU), share(r, MEM));
        if c + m == 0.0 {
            return 0;
        }
        // The angle from all-memory (0) to all-CPU (pi/2), in equal slices.
        let a = c.atan2(m) / std::f64::consts::FRAC_PI_2;
        ((a * CLASSES as f64) as usize).min(CLASSES - 1)
    };
    let mut prios: Vec<i32> = reqs.iter().map(|r| r.priority).collect();
    prios.sort_unstable_by(|a, b| b.cmp(a));
    prios.dedup();
    let mut out = Vec::with_capacity(reqs.len());
    for p in prios {
        let mut classes: Vec<Vec<usize>> = vec![Vec::new(); CLASSES];
        for (i, r) in reqs.iter().enumerate() {
            if r.priority == p {
                classes[class(r)].push(i);
            }
        }
        let mut totals = [0.0f64; CLASSES];
        for (k, cl) in classes.iter_mut().enumerate() {
            cl.sort_by(|&a, &b| {
                let (ra, rb) = (&reqs[a], &reqs[b]);
                size(rb)
                    .total_cmp(&size(ra))
                    .then(rb.group.is_some().cmp(&ra.group.is_some()))
                    .then(a.cmp(&b))
            });
            totals[k] = cl.iter().map(|&i| size(&reqs[i])).sum();
        }
        let mut next = [0usize; CLASSES];
        let mut taken = [0.0f64; CLASSES];
        loop {
            // The class furthest behind its share of the demand goes next.
            let pick = (0..CLASSES)
                .filter(|&k| next[k] < classes[k].len())
                .min_by(|&a, &b| {
                    let fa = if totals[a] > 0.0 {
                        taken[a] / totals[a]
                    } else {
                        0.0
                    };
                    let fb = if totals[b] > 0.0 {
                        taken[b] / totals[b]
                    } else {
                        0.0
                    };
                    fa.total_cmp(&fb).then(a.cmp(&b))
                });
            let Some(k) = pick else { break };
            let i = classes[k][next[k]];
            next[k] += 1;
            taken[k] += size(&reqs[i]);
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests;
