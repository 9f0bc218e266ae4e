//! Seeded trace generators for the packing benchmark (`packer/benches/packing.rs`), in three
//! mixes (issue 9, item 3). Deterministic: the same mix, size, mode and seed give the same
//! trace, byte for byte.
//!
//! - **Government**: department VMs of catalogue sizes from 1 vCPU / 1 GiB to 16 vCPU /
//!   64 GiB (small ones commonest), a third of services as redundant anti-affinity pairs,
//!   three node models (24, 40 and 64 cores with 192, 384 and 768 GiB), two zones
//!   (intranet 60 %, extranet 40 %), racks of 16; CPU overcommit 4.
//! - **Azure-style**: demands as fractions of one machine model (40 cores, 320 GiB) in the
//!   style of the public Azure packing trace (Hadary et al., *Protean*, OSDI 2020): CPU shares
//!   from 1/64 to 1/2 of a machine, the small ones commonest, memory as that share times
//!   ½, 1 or 2; fractional vCPUs; no overcommit; two zones of equal size.
//! - **Adversarial**: CPU-heavy VMs (16 to 32 vCPU with 4 or 8 GiB) and memory-heavy ones
//!   (2 or 4 vCPU with 32 to 64 GiB) in alternating blocks, on 32-core 256 GiB nodes with CPU
//!   overcommit 4; two zones.
//!
//! **Static** traces are feasible by construction: they are built from a *witness packing*.
//! Each zone's nodes are filled one by one with draws of the mix (the adversarial mix draws
//! the shape whose resource the node has used less of) until [`MISSES`] draws in a row no
//! longer fit under [`FILL`] of the node's capacity after overcommit in every resource, so
//! each node ends near [`FILL`] in its binding resource; a pair's second member goes to the
//! next node of the zone. A tenth of each zone's nodes (2 to [`MAX_SPARES`]), spread
//! evenly, are filled only to [`SPARE_FILL`]: the room that an evacuation's VMs too large
//! for the others' remaining 15 % need. The witness is then checked by the trace's own
//! rules, N+1 recomputed by its definition ([`Cluster::full_n_plus_one`]); while a node's
//! evacuation fails, it drops its largest service (rare). The requests are the witness's
//! VMs, shuffled (the adversarial mix's in alternating blocks of one shape, half the zone's
//! node count each); [`generate_with_witness`] returns the witness too, so "a packer
//! rejected what the fleet could hold" is a fact, not a guess. **Online** traces start
//! from such a population at time 0, each VM with an exponential remaining lifetime of mean
//! [`LIFETIME`] (the steady state of the process), then arrivals at the rate that keeps
//! that population (population / [`LIFETIME`]) until [`HORIZON`], each with an exponential
//! lifetime; a pair arrives and departs together. In the adversarial mix the arrivals
//! alternate between the CPU-heavy and the memory-heavy shapes every [`BLOCK_TIME`].
//! Online arrivals are not witnessed: they are drawn, not packed.

use crate::trace::{Trace, TraceNode, TraceRequest};
use crate::{Cluster, NodeSpec, NodeState, Overcommit, Policy, Request, Res, Spread};

/// The share of each witness node's capacity (after overcommit), in every resource, that
/// its VMs may use: the binding resource ends near it.
pub const FILL: f64 = 0.85;
/// Mean lifetime of an online VM.
pub const LIFETIME: f64 = 200.0;
/// The end of an online trace.
pub const HORIZON: f64 = 400.0;
/// How long each block of one shape lasts in the adversarial online trace.
pub const BLOCK_TIME: f64 = 50.0;

/// The mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    Government,
    Azure,
    Adversarial,
}

impl Mix {
    pub const ALL: [Mix; 3] = [Mix::Government, Mix::Azure, Mix::Adversarial];
    pub fn name(self) -> &'static str {
        match self {
            Mix::Government => "government",
            Mix::Azure => "azure",
            Mix::Adversarial => "adversarial",
        }
    }
    pub fn from_name(s: &str) -> Option<Mix> {
        Mix::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// splitmix64.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// An index drawn with these weights.
    pub fn weighted(&mut self, w: &[u32]) -> usize {
        let total: u64 = w.iter().map(|&x| u64::from(x)).sum();
        let mut x = self.next_u64() % total.max(1);
        for (i, &wi) in w.iter().enumerate() {
            if x < u64::from(wi) {
                return i;
            }
            x -= u64::from(wi);
        }
        w.len() - 1
    }
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

const GIB: u64 = 1024;

struct MixSpec {
    policy: Policy,
    zones: Vec<(&'static str, f64)>,
    /// (model, cores, GiB, disk GiB, weight)
    models: Vec<(&'static str, u64, u64, u64, u32)>,
    rack_size: usize,
}

fn spec(mix: Mix) -> MixSpec {
    match mix {
        Mix::Government => MixSpec {
            policy: Policy::default(),
            zones: vec![("intranet", 0.6), ("extranet", 0.4)],
            models: vec![
                ("gov-24c-192g", 24, 192, 2000, 4),
                ("gov-40c-384g", 40, 384, 4000, 4),
                ("gov-64c-768g", 64, 768, 8000, 2),
            ],
            rack_size: 16,
        },
        Mix::Azure => MixSpec {
            policy: Policy {
                overcommit: Overcommit([1000, 1000, 1000]),
                n_plus_one: true,
            },
            zones: vec![("zone-a", 0.5), ("zone-b", 0.5)],
            models: vec![("azure-40c-320g", 40, 320, 2048, 1)],
            rack_size: 20,
        },
        Mix::Adversarial => MixSpec {
            policy: Policy::default(),
            zones: vec![("zone-a", 0.5), ("zone-b", 0.5)],
            models: vec![("adv-32c-256g", 32, 256, 4000, 1)],
            rack_size: 16,
        },
    }
}

/// Draws one service's shape; `cpu_heavy` picks the adversarial block.
fn shape(mix: Mix, rng: &mut Rng, cpu_heavy: bool) -> (Res, bool) {
    match mix {
        Mix::Government => {
            const CAT: [(u64, u64); 10] = [
                (1, 1),
                (1, 2),
                (2, 4),
                (2, 8),
                (4, 8),
                (4, 16),
                (8, 16),
                (8, 32),
                (16, 32),
                (16, 64),
            ];
            const W: [u32; 10] = [10, 12, 16, 12, 14, 10, 8, 8, 5, 5];
            const DISK: [u64; 5] = [20, 40, 80, 160, 500];
            let (c, m) = CAT[rng.weighted(&W)];
            let disk = DISK[rng.weighted(&[20, 30, 25, 15, 10])];
            let pair = rng.below(3) == 0;
            (Res::new(c * 1000, m * GIB, disk), pair)
        }
        Mix::Azure => {
            // Shares of a 40-core, 320 GiB machine.
            const SHARE: [f64; 6] = [1.0 / 64.0, 1.0 / 32.0, 1.0 / 16.0, 0.125, 0.25, 0.5];
            let s = SHARE[rng.weighted(&[30, 25, 20, 13, 8, 4])];
            let f = [0.5, 1.0, 2.0][rng.weighted(&[25, 50, 25])];
            let m = (s * f).min(1.0);
            let cpu = (s * 40_000.0).round() as u64;
            let mem = (m * 320.0 * GIB as f64).round() as u64;
            let disk = (s * 2048.0).round() as u64;
            (Res::new(cpu, mem, disk), false)
        }
        Mix::Adversarial => {
            if cpu_heavy {
                let c = [16, 24, 32][rng.below(3)];
                let m = [4, 8][rng.below(2)];
                (Res::new(c * 1000, m * GIB, 40), false)
            } else {
                let c = [2, 4][rng.below(2)];
                let m = [32, 48, 64][rng.below(3)];
                (Res::new(c * 1000, m * GIB, 40), false)
            }
        }
    }
}

/// A VM of the witness packing: its service, its zone, the node (index into the trace's
/// nodes) that holds it there, its demand and its request id.
#[derive(Clone, Debug)]
struct WitnessVm {
    service: usize,
    zone: usize,
    node: usize,
    demand: Res,
    id: String,
}

/// The witness packing of one zone: per node a mix of the zone's shapes up to [`FILL`] of
/// its capacity in every resource (so the binding one ends near [`FILL`]), each pair's two
/// members on two different nodes. Returns the VMs; services are numbered from `first`.
#[allow(clippy::too_many_arguments)]
fn fill_zone(
    mix: Mix,
    rng: &mut Rng,
    zone: usize,
    nodes: &[usize],
    caps: &[Res],
    first: usize,
) -> Vec<WitnessVm> {
    // Spare nodes, spread evenly through the zone, filled only to SPARE_FILL: an
    // evacuation's VMs larger than the FILL room left on the others go there.
    let spares = (caps.len() / 10).clamp(2, MAX_SPARES).min(caps.len());
    let every = (caps.len() / spares).max(1);
    let limit: Vec<Res> = caps
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let fill = if i % every == every - 1 && i / every < spares {
                SPARE_FILL
            } else {
                FILL
            };
            Res(c.0.map(|x| (x as f64 * fill) as u64))
        })
        .collect();
    let mut used = vec![Res::ZERO; caps.len()];
    let mut out: Vec<WitnessVm> = Vec::new();
    let mut service = first;
    let fits = |used: &Res, d: &Res, limit: &Res| limit.covers(&used.plus(d));
    for i in 0..caps.len() {
        let mut misses = 0;
        while misses < MISSES {
            // The adversarial mix fills each node with both shapes: the one whose
            // resource the node has used less of.
            let share = |d: usize| used[i].0[d] as f64 / caps[i].0[d].max(1) as f64;
            let cpu_heavy = share(crate::CPU) <= share(crate::MEM);
            let (d, pair) = shape(mix, rng, cpu_heavy);
            if !fits(&used[i], &d, &limit[i]) {
                misses += 1;
                continue;
            }
            // A pair's other member goes to the next node of the zone (the first, for the
            // last), whatever it already holds.
            let other = (i + 1) % caps.len();
            if pair && (other == i || !fits(&used[other], &d, &limit[other])) {
                misses += 1;
                continue;
            }
            misses = 0;
            let members: &[usize] = if pair { &[i, other] } else { &[i] };
            for &m in members {
                used[m] = used[m].plus(&d);
                out.push(WitnessVm {
                    service,
                    zone,
                    node: nodes[m],
                    demand: d,
                    id: String::new(),
                });
            }
            service += 1;
        }
    }
    out
}

/// The fill of a zone's spare nodes in the witness.
pub const SPARE_FILL: f64 = 0.4;
/// At most this many spare nodes per zone (a tenth of its nodes, at least 2).
pub const MAX_SPARES: usize = 8;

/// Consecutive draws that do not fit before a node of the witness counts as full.
pub const MISSES: usize = 40;

/// A trace of `mix` with about `nodes` nodes; online with arrivals and lifetimes or static.
pub fn generate(mix: Mix, nodes: usize, online: bool, seed: u64) -> Trace {
    generate_with_witness(mix, nodes, online, seed).0
}

/// [`generate`], with the witness packing of the requests present at time 0: (request
/// index, node index) for each of them. It keeps every hard rule of the trace's policy,
/// N+1 included, so a packer that rejects one of those requests rejects what the fleet
/// could hold.
pub fn generate_with_witness(
    mix: Mix,
    nodes: usize,
    online: bool,
    seed: u64,
) -> (Trace, Vec<(usize, usize)>) {
    let sp = spec(mix);
    let mut rng = Rng::new(seed ^ (mix as u64).wrapping_mul(0x1000_0000_01B3));
    // Nodes: each zone its share, models drawn by weight, racks in order.
    let mut tnodes = Vec::new();
    let mut zone_nodes: Vec<Vec<usize>> = vec![Vec::new(); sp.zones.len()];
    let mut zone_caps: Vec<Vec<Res>> = vec![Vec::new(); sp.zones.len()];
    let weights: Vec<u32> = sp.models.iter().map(|m| m.4).collect();
    for (z, &(zone, share)) in sp.zones.iter().enumerate() {
        let n = ((nodes as f64 * share).round() as usize).max(2);
        for i in 0..n {
            let (model, cores, gib, disk, _) = sp.models[rng.weighted(&weights)];
            let raw = Res::new(cores * 1000, gib * GIB, disk);
            zone_caps[z].push(sp.policy.overcommit.apply(&raw));
            zone_nodes[z].push(tnodes.len());
            tnodes.push(TraceNode {
                id: format!("{zone}-n{:05}", i),
                zone: zone.to_string(),
                rack: Some(format!("{zone}-rack{:03}", i / sp.rack_size)),
                capacity: raw,
                model: serde_json::Value::String(model.to_string()),
            });
        }
    }
    // The witness: every node filled by its own mix, then checked against the trace's
    // own rules (N+1 by its definition, from scratch); a node whose evacuation fails gives
    // up its largest service until every evacuation succeeds.
    let mut vms: Vec<WitnessVm> = Vec::new();
    for z in 0..sp.zones.len() {
        let first = vms.last().map_or(0, |v| v.service + 1);
        vms.extend(fill_zone(
            mix,
            &mut rng,
            z,
            &zone_nodes[z],
            &zone_caps[z],
            first,
        ));
    }
    for (k, v) in vms.iter_mut().enumerate() {
        v.id = format!("vm{k:08}");
    }
    let node_specs: Vec<NodeSpec> = (0..tnodes.len())
        .map(|i| NodeSpec {
            name: tnodes[i].id.clone(),
            zone: tnodes[i].zone.clone(),
            rack: tnodes[i].rack.clone(),
            capacity: tnodes[i].capacity,
            state: NodeState::Ready,
            overcommit: None,
        })
        .collect();
    loop {
        let failing = witness_failures(&sp, &node_specs, &vms);
        if failing.is_empty() {
            break;
        }
        let mut drop: std::collections::BTreeSet<usize> = Default::default();
        for f in failing {
            // The node's largest VM by the evacuation order (memory, vCPUs, disk).
            if let Some(v) = vms.iter().filter(|v| v.node == f).max_by_key(|v| {
                (
                    v.demand.0[crate::MEM],
                    v.demand.0[crate::CPU],
                    v.demand.0[crate::DISK],
                )
            }) {
                drop.insert(v.service);
            }
        }
        vms.retain(|v| !drop.contains(&v.service));
    }
    // Services in request order: department requests come in no particular order; the
    // adversarial mix's in blocks of one shape, as many VMs as half the zone's nodes each.
    let mut services: Vec<Vec<usize>> = Vec::new();
    {
        let mut by_service: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, v) in vms.iter().enumerate() {
            by_service.entry(v.service).or_default().push(i);
        }
        let mut by_zone: Vec<Vec<Vec<usize>>> = vec![Vec::new(); sp.zones.len()];
        for (_, members) in by_service {
            let z = vms[members[0]].zone;
            by_zone[z].push(members);
        }
        let mut queues: Vec<std::collections::VecDeque<Vec<usize>>> = Vec::new();
        for (z, mut list) in by_zone.into_iter().enumerate() {
            for i in (1..list.len()).rev() {
                let j = rng.below(i + 1);
                list.swap(i, j);
            }
            if mix == Mix::Adversarial {
                let block = (zone_caps[z].len() / 2).max(4);
                let heavy = |s: &Vec<usize>| {
                    let d = vms[s[0]].demand;
                    d.0[crate::CPU] as f64 / 1000.0 > d.0[crate::MEM] as f64 / GIB as f64
                };
                let (mut cpu, mut mem): (
                    std::collections::VecDeque<_>,
                    std::collections::VecDeque<_>,
                ) = (Default::default(), Default::default());
                for s in list {
                    if heavy(&s) {
                        cpu.push_back(s);
                    } else {
                        mem.push_back(s);
                    }
                }
                let mut blocked = std::collections::VecDeque::new();
                let mut k = 0usize;
                while !cpu.is_empty() || !mem.is_empty() {
                    let q = if (k / block) % 2 == 0 {
                        &mut cpu
                    } else {
                        &mut mem
                    };
                    match q.pop_front() {
                        Some(s) => blocked.push_back(s),
                        None => {
                            let other = if cpu.is_empty() { &mut mem } else { &mut cpu };
                            blocked.extend(other.drain(..));
                        }
                    }
                    k += 1;
                }
                queues.push(blocked);
            } else {
                queues.push(list.into());
            }
        }
        // Interleave the zones, keeping each zone's own order.
        let total: usize = queues.iter().map(|q| q.len()).sum();
        while services.len() < total {
            let left: Vec<u32> = queues.iter().map(|q| q.len() as u32).collect();
            let z = rng.weighted(&left);
            if let Some(s) = queues[z].pop_front() {
                services.push(s);
            }
        }
    }
    let population = services.len();
    let zone_weights: Vec<u32> = {
        let mut c = vec![0u32; sp.zones.len()];
        for s in &services {
            c[vms[s[0]].zone] += 1;
        }
        c
    };
    let mut requests = Vec::new();
    let mut witness = Vec::new();
    for s in &services {
        let depart = online.then(|| rng.exp(LIFETIME).max(0.001));
        let group = (s.len() > 1).then(|| format!("svc{:07}", vms[s[0]].service));
        for &i in s {
            let v = &vms[i];
            witness.push((requests.len(), v.node));
            requests.push(TraceRequest {
                id: v.id.clone(),
                zone: sp.zones[v.zone].0.to_string(),
                demand: v.demand,
                anti_affinity: group.clone(),
                arrive: 0.0,
                depart,
            });
        }
    }
    if online {
        let rate = population as f64 / LIFETIME;
        let mut t = 0.0;
        let mut k = vms.len();
        let mut svc = vms.last().map_or(0, |v| v.service + 1);
        loop {
            t += rng.exp(1.0 / rate.max(1e-9));
            if t > HORIZON {
                break;
            }
            let z = rng.weighted(&zone_weights);
            let cpu_heavy = ((t / BLOCK_TIME) as u64) % 2 == 0;
            let (d, pair) = shape(mix, &mut rng, cpu_heavy);
            let life = rng.exp(LIFETIME).max(0.001);
            let group = pair.then(|| format!("svc{svc:07}"));
            svc += 1;
            for _ in 0..if pair { 2 } else { 1 } {
                requests.push(TraceRequest {
                    id: format!("vm{k:08}"),
                    zone: sp.zones[z].0.to_string(),
                    demand: d,
                    anti_affinity: group.clone(),
                    arrive: t,
                    depart: Some(t + life),
                });
                k += 1;
            }
        }
    }
    let trace = Trace {
        meta: serde_json::json!({
            "generator": "zy-packer gen",
            "mix": mix.name(),
            "nodes": tnodes.len(),
            "mode": if online { "online" } else { "static" },
            "seed": seed,
            "fill": FILL,
            "witness": "every request present at 0 fits a packing that keeps every rule, N+1 included",
        }),
        policy: sp.policy,
        horizon: online.then_some(HORIZON),
        nodes: tnodes,
        requests,
    };
    (trace, witness)
}

/// The nodes (trace indices) whose N+1 evacuation fails in the witness packing, by the
/// definition ([`Cluster::full_n_plus_one`]), with the VMs' own ids as keys.
fn witness_failures(sp: &MixSpec, nodes: &[NodeSpec], vms: &[WitnessVm]) -> Vec<usize> {
    let mut c: Cluster<String> = Cluster::new(Policy {
        n_plus_one: false,
        ..sp.policy
    });
    for n in nodes {
        c.add_node(n.clone())
            .expect("generated node names are unique");
    }
    let mut groups: std::collections::HashMap<usize, usize> = Default::default();
    for v in vms {
        *groups.entry(v.service).or_insert(0) += 1;
    }
    for v in vms {
        let req = Request {
            zone: nodes[v.node].zone.clone(),
            demand: v.demand,
            group: (groups[&v.service] > 1).then(|| format!("svc{:07}", v.service)),
            spread: Spread::Host,
            priority: 0,
        };
        c.insert(v.id.clone(), &req, v.node)
            .expect("witness ids are unique and nodes exist");
    }
    c.full_n_plus_one()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};

    /// The witness holds every request present at 0 exactly once, within capacity after
    /// overcommit, with no two members of a group on one node, and N+1-safe by the
    /// definition; and the static fill is near FILL in each node's binding resource.
    #[test]
    fn the_witness_keeps_every_rule() {
        for mix in Mix::ALL {
            for online in [false, true] {
                let (t, w) = generate_with_witness(mix, 60, online, 7);
                let at_zero: Vec<usize> = (0..t.requests.len())
                    .filter(|&i| t.requests[i].arrive == 0.0)
                    .collect();
                let placed: BTreeSet<usize> = w.iter().map(|x| x.0).collect();
                assert_eq!(placed.len(), w.len(), "{mix:?}: a request twice");
                assert_eq!(placed, at_zero.iter().copied().collect(), "{mix:?}");
                let mut c: Cluster<String> = Cluster::new(t.policy);
                for i in 0..t.nodes.len() {
                    c.add_node(t.node_spec(i)).unwrap();
                }
                let mut on: HashMap<(String, usize), u32> = HashMap::new();
                for &(r, n) in &w {
                    let req = t.request(r);
                    assert_eq!(t.nodes[n].zone, req.zone);
                    if let Some(g) = &req.group {
                        let k = on.entry((g.clone(), n)).or_insert(0);
                        *k += 1;
                        assert_eq!(*k, 1, "{mix:?}: group {g} twice on a node");
                    }
                    c.insert(t.requests[r].id.clone(), &req, n).unwrap();
                }
                let mut binding = Vec::new();
                for n in 0..t.nodes.len() {
                    let (cap, used) = (c.capacity(n), c.used(n));
                    assert!(cap.covers(&used), "{mix:?}: node {n} over capacity");
                    let share = (0..crate::DIMS)
                        .map(|d| used.0[d] as f64 / cap.0[d] as f64)
                        .fold(0.0, f64::max);
                    binding.push(share);
                }
                assert!(
                    c.full_n_plus_one().is_empty(),
                    "{mix:?}: witness not N+1-safe"
                );
                assert!(c.n_plus_one_failures().is_empty());
                binding.sort_by(f64::total_cmp);
                let median = binding[binding.len() / 2];
                assert!(
                    median > FILL - 0.05 && median <= FILL,
                    "{mix:?}: median binding fill {median}"
                );
            }
        }
    }

    #[test]
    fn generation_is_deterministic_and_the_seed_matters() {
        let a = generate(Mix::Government, 40, true, 3);
        assert_eq!(a, generate(Mix::Government, 40, true, 3));
        assert_ne!(a, generate(Mix::Government, 40, true, 4));
    }
}
