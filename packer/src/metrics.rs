//! How well a replay packed, judged from the trace and the replay's log alone: none of it
//! asks the [`crate::Cluster`] anything, so that a bug in the packer's bookkeeping cannot
//! hide itself. Capacities after overcommit, anti-affinity and N+1 are recomputed here from
//! scratch, with code of their own.
//!
//! # Figures
//! - **Lower bound** (per zone): per resource, the fewest nodes of the zone whose
//!   capacities (after overcommit), taken biggest first, add up to the zone's demand in that
//!   resource; the bound is the largest of these over the resources. Any set of nodes that
//!   holds the demand has at least that much of every resource, and no set of k nodes has
//!   more of a resource than the k biggest, so no packing uses fewer nodes. It ignores
//!   anti-affinity, N+1 and the shapes of the VMs, so it may be unreachable; a zone whose
//!   demand exceeds its capacity counts all its nodes. Summed over the zones.
//! - **Hosts used**: nodes holding at least one VM. Static: at the end, against the bound
//!   of the whole trace's demand. Online: averaged over time from 0 to the trace's end
//!   ([`crate::trace::Trace::end`]), against the lower bound of the demand present at each
//!   moment by the trace (rejected requests included: the bound is the same for every
//!   packer), averaged the same way; the **gap** is hosts / bound − 1.
//! - **Stranded capacity**: on every used node where one resource (vCPU or memory) is at
//!   least [`STRANDED_FULL`] used, the room left in the other one cannot be sold to
//!   anything that needs both: that room, summed over the nodes, as a share of the fleet's
//!   capacity in that resource (after overcommit). Static: at the end; online: the mean
//!   over [`SAMPLES`] evenly spaced points of the log.
//! - **Rule check**: every placement is checked when it happens (zone, capacity after
//!   overcommit, anti-affinity across hosts); every request must be decided exactly once;
//!   N+1 by the exact definition (for every node f holding VMs, f's VMs sorted by
//!   memory desc, vCPUs desc, disk desc, id asc, each placed first fit over the other
//!   nodes of the zone in trace order, within capacity and anti-affinity, counting those
//!   already moved) is recomputed from scratch at the end of a static replay, and online
//!   at [`N1_SAMPLES`] evenly spaced points of the log plus the end. Only a failure that a
//!   placement brought about counts as a violation of the packer: an online departure can
//!   make a first-fit evacuation fail (first fit is not monotone), which no placement rule
//!   could prevent; those are counted apart. A trace with `n_plus_one` false is not
//!   checked for it.

use std::collections::HashMap;

use crate::replay::{latency_us, Event, Replay};
use crate::trace::Trace;
use crate::{Res, CPU, DIMS, MEM};

/// A resource this share used makes its node "full" for stranding.
pub const STRANDED_FULL: f64 = 0.95;
/// Points of an online log where stranding is measured.
pub const SAMPLES: usize = 200;
/// Points of an online log where N+1 is recomputed (plus the end).
pub const N1_SAMPLES: usize = 10;

/// The lower bound of one zone (see the module's documentation); `None` when the zone's
/// capacity does not cover the demand.
pub fn lower_bound(demand: &Res, caps: &[Res]) -> Option<usize> {
    ZoneCaps::new(caps).bound(&demand.0.map(u128::from))
}

/// Per resource, the sums of the k biggest capacities of a zone.
#[derive(Clone, Debug)]
struct ZoneCaps {
    n: usize,
    prefix: [Vec<u128>; DIMS],
}

impl ZoneCaps {
    fn new(caps: &[Res]) -> ZoneCaps {
        let prefix = std::array::from_fn(|d| {
            let mut v: Vec<u64> = caps.iter().map(|c| c.0[d]).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            let mut p = Vec::with_capacity(v.len() + 1);
            let mut s = 0u128;
            p.push(0);
            for x in v {
                s += u128::from(x);
                p.push(s);
            }
            p
        });
        ZoneCaps {
            n: caps.len(),
            prefix,
        }
    }

    fn bound(&self, demand: &[u128; DIMS]) -> Option<usize> {
        let mut k = 0;
        for (p, &want) in self.prefix.iter().zip(demand) {
            let i = p.partition_point(|&s| s < want);
            if i > self.n {
                return None;
            }
            k = k.max(i);
        }
        Some(k)
    }
}

/// Rules found broken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Violations {
    pub zone: u64,
    pub capacity: u64,
    pub anti_affinity: u64,
    /// Nodes whose evacuation failed at a check point right after a placement.
    pub n_plus_one: u64,
    /// Requests decided never or more than once, or departing without being placed.
    pub accounting: u64,
}

impl Violations {
    pub fn total(&self) -> u64 {
        self.zone + self.capacity + self.anti_affinity + self.n_plus_one + self.accounting
    }
}

/// The figures of one replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub packer: String,
    pub placed: usize,
    pub rejected: usize,
    /// Static: at the end; online: time-averaged.
    pub hosts: f64,
    pub bound: f64,
    pub stranded_cpu_pct: f64,
    pub stranded_mem_pct: f64,
    pub violations: Violations,
    /// N+1 failures found at check points that followed a departure (not the packer's).
    pub n_plus_one_after_departure: u64,
    /// N+1 check points.
    pub n1_checks: usize,
    pub decision_us_mean: f64,
    pub decision_us_p50: f64,
    pub decision_us_p99: f64,
}

impl Report {
    /// Hosts over the lower bound, in %.
    pub fn gap_pct(&self) -> f64 {
        if self.bound <= 0.0 {
            0.0
        } else {
            (self.hosts / self.bound - 1.0) * 100.0
        }
    }
}

/// The checker's own view of the pool.
struct Pool<'a> {
    trace: &'a Trace,
    cap: Vec<[u64; DIMS]>,
    used: Vec<[u64; DIMS]>,
    vms: Vec<Vec<usize>>,
    groups: Vec<HashMap<&'a str, u32>>,
    zone_nodes: Vec<Vec<usize>>,
    zone_caps: Vec<ZoneCaps>,
    zone_ix: HashMap<&'a str, usize>,
    used_hosts: usize,
}

const BLOCK: usize = 64;

impl<'a> Pool<'a> {
    fn new(trace: &'a Trace) -> Pool<'a> {
        let o = trace.policy.overcommit.0;
        let cap: Vec<[u64; DIMS]> = trace
            .nodes
            .iter()
            .map(|n| {
                std::array::from_fn(|d| {
                    (u128::from(n.capacity.0[d]) * u128::from(o[d]) / 1000)
                        .min(u128::from(u64::MAX)) as u64
                })
            })
            .collect();
        let mut zone_ix: HashMap<&str, usize> = HashMap::new();
        let mut zone_nodes: Vec<Vec<usize>> = Vec::new();
        for (i, n) in trace.nodes.iter().enumerate() {
            let next = zone_ix.len();
            let z = *zone_ix.entry(n.zone.as_str()).or_insert(next);
            if z == zone_nodes.len() {
                zone_nodes.push(Vec::new());
            }
            zone_nodes[z].push(i);
        }
        let zone_caps = zone_nodes
            .iter()
            .map(|ns| ZoneCaps::new(&ns.iter().map(|&i| Res(cap[i])).collect::<Vec<_>>()))
            .collect();
        Pool {
            trace,
            used: vec![[0; DIMS]; cap.len()],
            vms: vec![Vec::new(); cap.len()],
            groups: vec![HashMap::new(); cap.len()],
            cap,
            zone_nodes,
            zone_caps,
            zone_ix,
            used_hosts: 0,
        }
    }

    /// Places request r on node n, counting the rules it breaks.
    fn place(&mut self, r: usize, n: usize, v: &mut Violations) {
        let req = &self.trace.requests[r];
        if self.trace.nodes[n].zone != req.zone {
            v.zone += 1;
        }
        if (0..DIMS).any(|d| self.used[n][d] + req.demand.0[d] > self.cap[n][d]) {
            v.capacity += 1;
        }
        if let Some(g) = &req.anti_affinity {
            if self.groups[n].get(g.as_str()).copied().unwrap_or(0) > 0 {
                v.anti_affinity += 1;
            }
            *self.groups[n].entry(g.as_str()).or_insert(0) += 1;
        }
        for d in 0..DIMS {
            self.used[n][d] += req.demand.0[d];
        }
        if self.vms[n].is_empty() {
            self.used_hosts += 1;
        }
        self.vms[n].push(r);
    }

    fn depart(&mut self, r: usize, n: usize) {
        let req = &self.trace.requests[r];
        for d in 0..DIMS {
            self.used[n][d] -= req.demand.0[d];
        }
        if let Some(g) = &req.anti_affinity {
            if let Some(c) = self.groups[n].get_mut(g.as_str()) {
                *c -= 1;
                if *c == 0 {
                    self.groups[n].remove(g.as_str());
                }
            }
        }
        self.vms[n].retain(|&x| x != r);
        if self.vms[n].is_empty() {
            self.used_hosts -= 1;
        }
    }

    /// (stranded vCPU, stranded memory) as shares of the fleet's, in %.
    fn stranded(&self) -> (f64, f64) {
        let mut st = [0u128; 2];
        let mut total = [0u128; 2];
        for n in 0..self.cap.len() {
            let (c, u) = (self.cap[n], self.used[n]);
            for (k, &d) in [CPU, MEM].iter().enumerate() {
                total[k] += u128::from(c[d]);
            }
            if self.vms[n].is_empty() {
                continue;
            }
            let full = |d: usize| c[d] > 0 && u[d] as f64 >= STRANDED_FULL * c[d] as f64;
            if full(MEM) {
                st[0] += u128::from(c[CPU].saturating_sub(u[CPU]));
            }
            if full(CPU) {
                st[1] += u128::from(c[MEM].saturating_sub(u[MEM]));
            }
        }
        let pct = |k: usize| {
            if total[k] == 0 {
                0.0
            } else {
                st[k] as f64 / total[k] as f64 * 100.0
            }
        };
        (pct(0), pct(1))
    }

    /// The nodes whose evacuation fails, by the definition, from scratch.
    fn n_plus_one_failures(&self) -> u64 {
        if !self.trace.policy.n_plus_one {
            return 0;
        }
        let reqs = &self.trace.requests;
        let mut failures = 0;
        for nodes in &self.zone_nodes {
            // Room per node and an upper bound of it per block of the zone order: moves only
            // lower room, so a block whose bound is short can be skipped.
            let room: Vec<[u64; DIMS]> = nodes
                .iter()
                .map(|&n| std::array::from_fn(|d| self.cap[n][d].saturating_sub(self.used[n][d])))
                .collect();
            let blocks: Vec<[u64; DIMS]> = room
                .chunks(BLOCK)
                .map(|c| std::array::from_fn(|d| c.iter().map(|r| r[d]).max().unwrap_or(0)))
                .collect();
            for (fp, &f) in nodes.iter().enumerate() {
                if self.vms[f].is_empty() {
                    continue;
                }
                let mut order = self.vms[f].clone();
                order.sort_by(|&a, &b| {
                    let (da, db) = (reqs[a].demand.0, reqs[b].demand.0);
                    db[MEM]
                        .cmp(&da[MEM])
                        .then(db[CPU].cmp(&da[CPU]))
                        .then(db[2].cmp(&da[2]))
                        .then(reqs[a].id.cmp(&reqs[b].id))
                });
                // Room taken by the VMs moved so far, and the groups they brought.
                let mut taken: HashMap<usize, [u64; DIMS]> = HashMap::new();
                let mut brought: HashMap<(usize, &str), u32> = HashMap::new();
                let mut ok = true;
                for &r in &order {
                    let need = reqs[r].demand.0;
                    let group = reqs[r].anti_affinity.as_deref();
                    let mut found = None;
                    'blocks: for (b, bmax) in blocks.iter().enumerate() {
                        if (0..DIMS).any(|d| bmax[d] < need[d]) {
                            continue;
                        }
                        let end = ((b + 1) * BLOCK).min(nodes.len());
                        for p in b * BLOCK..end {
                            if p == fp {
                                continue;
                            }
                            let t = room_after(&room[p], taken.get(&p));
                            if (0..DIMS).any(|d| t[d] < need[d]) {
                                continue;
                            }
                            if let Some(g) = group {
                                let n = nodes[p];
                                if self.groups[n].get(g).copied().unwrap_or(0) > 0
                                    || brought.get(&(p, g)).copied().unwrap_or(0) > 0
                                {
                                    continue;
                                }
                            }
                            found = Some(p);
                            break 'blocks;
                        }
                    }
                    match found {
                        None => {
                            ok = false;
                            break;
                        }
                        Some(p) => {
                            let e = taken.entry(p).or_insert([0; DIMS]);
                            for d in 0..DIMS {
                                e[d] += need[d];
                            }
                            if let Some(g) = group {
                                *brought.entry((p, g)).or_insert(0) += 1;
                            }
                        }
                    }
                }
                if !ok {
                    failures += 1;
                }
            }
        }
        failures
    }
}

fn room_after(room: &[u64; DIMS], taken: Option<&[u64; DIMS]>) -> [u64; DIMS] {
    match taken {
        None => *room,
        Some(t) => std::array::from_fn(|d| room[d].saturating_sub(t[d])),
    }
}

/// The lower bound of the trace's own demand, the same for every packer whatever it
/// rejected: static, of every request; online, the integral over [0, end] of the bound of
/// the requests present (arrived and not yet departed), from the trace's events alone
/// (departures before arrivals at equal times).
fn demand_bound(trace: &Trace, pool: &Pool<'_>, end: f64) -> f64 {
    let zone = |r: &crate::trace::TraceRequest| pool.zone_ix.get(r.zone.as_str()).copied();
    let mut demand = vec![[0u128; DIMS]; pool.zone_caps.len()];
    let bound = |demand: &[[u128; DIMS]]| -> usize {
        pool.zone_caps
            .iter()
            .zip(demand)
            .map(|(zc, d)| zc.bound(d).unwrap_or(zc.n))
            .sum()
    };
    if trace.is_static() {
        for r in &trace.requests {
            if let Some(z) = zone(r) {
                for (x, &v) in demand[z].iter_mut().zip(&r.demand.0) {
                    *x += u128::from(v);
                }
            }
        }
        return bound(&demand) as f64;
    }
    // (time, 0 = departure / 1 = arrival, request)
    let mut ev: Vec<(f64, u8, usize)> = Vec::new();
    for (i, r) in trace.requests.iter().enumerate() {
        ev.push((r.arrive, 1, i));
        if let Some(d) = r.depart {
            ev.push((d, 0, i));
        }
    }
    ev.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let (mut area, mut t_prev, mut cur) = (0.0f64, 0.0f64, 0usize);
    for (t, kind, i) in ev {
        if t > t_prev {
            area += cur as f64 * (t.min(end) - t_prev.min(end)).max(0.0);
            t_prev = t;
        }
        let r = &trace.requests[i];
        if let Some(z) = zone(r) {
            for (x, &v) in demand[z].iter_mut().zip(&r.demand.0) {
                if kind == 1 {
                    *x += u128::from(v);
                } else {
                    *x -= u128::from(v);
                }
            }
        }
        cur = bound(&demand);
    }
    if end > t_prev {
        area += cur as f64 * (end - t_prev);
    }
    area
}

/// Judges a replay of `trace` from its log.
pub fn evaluate(trace: &Trace, replay: &Replay) -> Report {
    let mut pool = Pool::new(trace);
    let mut v = Violations::default();
    let mut decided = vec![0u32; trace.requests.len()];
    let mut node_of: Vec<Option<usize>> = vec![None; trace.requests.len()];
    let end = if replay.is_static { 0.0 } else { trace.end() };
    let log = &replay.log;
    let n1_points: Vec<usize> = if replay.is_static || log.is_empty() {
        Vec::new()
    } else {
        (1..=N1_SAMPLES)
            .map(|k| k * log.len() / (N1_SAMPLES + 1))
            .collect()
    };
    let st_points: Vec<usize> = if replay.is_static || log.is_empty() {
        Vec::new()
    } else {
        (1..=SAMPLES)
            .map(|k| k * log.len() / (SAMPLES + 1))
            .collect()
    };
    let mut host_time = 0.0f64;
    let mut t_prev = 0.0f64;
    let mut n1_fail = 0u64;
    let mut n1_after_dep = 0u64;
    let mut n1_checks = 0usize;
    let mut strand = (0.0f64, 0.0f64, 0usize);
    let (mut placed, mut rejected) = (0usize, 0usize);
    let (mut ni, mut si) = (0usize, 0usize);
    for (k, &(t, e)) in log.iter().enumerate() {
        if !replay.is_static && t > t_prev {
            let dt = (t.min(end) - t_prev.min(end)).max(0.0);
            host_time += pool.used_hosts as f64 * dt;
            t_prev = t;
        }
        let last_was_departure;
        match e {
            Event::Place { req, node } => {
                decided[req] += 1;
                placed += 1;
                if node >= trace.nodes.len() {
                    v.zone += 1;
                    last_was_departure = false;
                } else {
                    pool.place(req, node, &mut v);
                    node_of[req] = Some(node);
                    last_was_departure = false;
                }
            }
            Event::Reject { req } => {
                decided[req] += 1;
                rejected += 1;
                last_was_departure = false;
            }
            Event::Depart { req } => {
                match node_of[req].take() {
                    Some(n) => pool.depart(req, n),
                    None => v.accounting += 1,
                }
                last_was_departure = true;
            }
        }
        while si < st_points.len() && st_points[si] == k {
            let (c, m) = pool.stranded();
            strand = (strand.0 + c, strand.1 + m, strand.2 + 1);
            si += 1;
        }
        while ni < n1_points.len() && n1_points[ni] == k {
            let f = pool.n_plus_one_failures();
            n1_checks += 1;
            if last_was_departure {
                n1_after_dep += f;
            } else {
                n1_fail += f;
            }
            ni += 1;
        }
    }
    let (hosts, bound);
    if replay.is_static {
        hosts = pool.used_hosts as f64;
        bound = demand_bound(trace, &pool, end);
        let (c, m) = pool.stranded();
        strand = (c, m, 1);
    } else {
        if end > t_prev {
            host_time += pool.used_hosts as f64 * (end - t_prev);
        }
        let span = if end > 0.0 { end } else { 1.0 };
        hosts = host_time / span;
        bound = demand_bound(trace, &pool, end) / span;
    }
    // The end, always (after a departure online, or the static end).
    let last_dep = matches!(log.last(), Some((_, Event::Depart { .. })));
    let f = pool.n_plus_one_failures();
    n1_checks += 1;
    if last_dep {
        n1_after_dep += f;
    } else {
        n1_fail += f;
    }
    v.n_plus_one = n1_fail;
    v.accounting += decided.iter().filter(|&&c| c != 1).count() as u64;
    let strand_n = strand.2.max(1) as f64;
    let (mean, p50, p99) = latency_us(&replay.decision_ns);
    Report {
        packer: replay.packer.clone(),
        placed,
        rejected,
        hosts,
        bound,
        stranded_cpu_pct: strand.0 / strand_n,
        stranded_mem_pct: strand.1 / strand_n,
        violations: v,
        n_plus_one_after_departure: n1_after_dep,
        n1_checks,
        decision_us_mean: mean,
        decision_us_p50: p50,
        decision_us_p99: p99,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{Event, Replay};
    use crate::trace::Trace;

    #[test]
    fn the_lower_bound_takes_the_biggest_nodes_first_in_every_resource() {
        let caps = [
            Res::new(10, 100, 0),
            Res::new(5, 400, 0),
            Res::new(5, 50, 0),
        ];
        assert_eq!(lower_bound(&Res::ZERO, &caps), Some(0));
        assert_eq!(lower_bound(&Res::new(10, 0, 0), &caps), Some(1));
        assert_eq!(lower_bound(&Res::new(12, 0, 0), &caps), Some(2));
        assert_eq!(lower_bound(&Res::new(20, 0, 0), &caps), Some(3));
        assert_eq!(lower_bound(&Res::new(21, 0, 0), &caps), None);
        // CPU needs 1 node, memory 2 (400 + 100): the bound is 2.
        assert_eq!(lower_bound(&Res::new(3, 450, 0), &caps), Some(2));
        assert_eq!(lower_bound(&Res::new(0, 0, 1), &caps), None);
    }

    fn trace() -> Trace {
        let v = serde_json::json!({
            "policy": {"cpu_overcommit": 2.0, "n_plus_one": true},
            "nodes": [
                {"id": "n1", "zone": "z", "vcpus": 4, "memory_mib": 1000, "disk_gib": 10},
                {"id": "n2", "zone": "z", "vcpus": 4, "memory_mib": 1000, "disk_gib": 10},
                {"id": "x1", "zone": "y", "vcpus": 4, "memory_mib": 1000, "disk_gib": 10}
            ],
            "requests": [
                {"id": "a", "zone": "z", "vcpus": 2, "memory_mib": 400, "disk_gib": 1, "anti_affinity": "g", "arrive": 0},
                {"id": "b", "zone": "z", "vcpus": 1, "memory_mib": 400, "disk_gib": 1, "anti_affinity": "g", "arrive": 0},
                {"id": "c", "zone": "z", "vcpus": 1, "memory_mib": 400, "disk_gib": 1, "arrive": 0},
                {"id": "d", "zone": "z", "vcpus": 1, "memory_mib": 700, "disk_gib": 1, "arrive": 0}
            ]
        });
        Trace::parse(&v.to_string()).unwrap()
    }

    fn replay(log: Vec<Event>) -> Replay {
        Replay {
            packer: "test".into(),
            is_static: true,
            reordered: false,
            decision_ns: vec![1000; log.len()],
            log: log.into_iter().map(|e| (0.0, e)).collect(),
        }
    }

    #[test]
    fn a_good_placement_list_passes() {
        let t = trace();
        // b on n1, c on n2, a and d rejected: each node's VM fits on the other.
        let r = replay(vec![
            Event::Place { req: 1, node: 0 },
            Event::Place { req: 2, node: 1 },
            Event::Reject { req: 0 },
            Event::Reject { req: 3 },
        ]);
        let rep = evaluate(&t, &r);
        assert_eq!(rep.violations, Violations::default());
        assert_eq!((rep.placed, rep.rejected), (2, 2));
        assert_eq!(rep.hosts, 2.0);
        // The whole trace's demand, rejected requests included: 1900 MiB in zone z need two
        // nodes; nothing in y.
        assert_eq!(rep.bound, 2.0);
        assert!(rep.gap_pct().abs() < 1e-9);
    }

    #[test]
    fn the_checker_catches_every_broken_rule() {
        let t = trace();
        let cases = [
            // d (700) and c (400) on one node of 1000 MiB: capacity.
            (
                vec![
                    Event::Place { req: 3, node: 0 },
                    Event::Place { req: 2, node: 0 },
                    Event::Reject { req: 0 },
                    Event::Reject { req: 1 },
                ],
                Violations {
                    capacity: 1,
                    // and n1's two VMs cannot both go to n2
                    n_plus_one: 1,
                    ..Violations::default()
                },
            ),
            // a and b of group g on one node.
            (
                vec![
                    Event::Place { req: 0, node: 0 },
                    Event::Place { req: 1, node: 0 },
                    Event::Reject { req: 2 },
                    Event::Reject { req: 3 },
                ],
                Violations {
                    anti_affinity: 1,
                    n_plus_one: 1,
                    ..Violations::default()
                },
            ),
            // c into the other zone.
            (
                vec![
                    Event::Place { req: 2, node: 2 },
                    Event::Reject { req: 0 },
                    Event::Reject { req: 1 },
                    Event::Reject { req: 3 },
                ],
                Violations {
                    zone: 1,
                    // x1 is alone in its zone y: its VM has nowhere to go
                    n_plus_one: 1,
                    ..Violations::default()
                },
            ),
            // c twice, d never.
            (
                vec![
                    Event::Place { req: 2, node: 0 },
                    Event::Reject { req: 2 },
                    Event::Reject { req: 0 },
                    Event::Reject { req: 1 },
                ],
                Violations {
                    accounting: 2,
                    ..Violations::default()
                },
            ),
            // N+1 alone: d on n1 and c on n2 fit, but losing either leaves 700 + 400 >
            // 1000 on the other.
            (
                vec![
                    Event::Place { req: 3, node: 0 },
                    Event::Place { req: 2, node: 1 },
                    Event::Reject { req: 0 },
                    Event::Reject { req: 1 },
                ],
                Violations {
                    n_plus_one: 2,
                    ..Violations::default()
                },
            ),
        ];
        for (log, want) in cases {
            let rep = evaluate(&t, &replay(log.clone()));
            assert_eq!(rep.violations, want, "{log:?}");
            assert!(rep.violations.total() > 0);
        }
    }

    #[test]
    fn online_hosts_and_bound_are_averaged_over_time() {
        let v = serde_json::json!({
            "policy": {"cpu_overcommit": 1.0, "n_plus_one": false},
            "horizon": 10.0,
            "nodes": [
                {"id": "n1", "zone": "z", "vcpus": 4, "memory_mib": 1000, "disk_gib": 10},
                {"id": "n2", "zone": "z", "vcpus": 4, "memory_mib": 1000, "disk_gib": 10}
            ],
            "requests": [
                {"id": "a", "zone": "z", "vcpus": 1, "memory_mib": 100, "disk_gib": 1, "arrive": 0, "depart": 5},
                {"id": "b", "zone": "z", "vcpus": 1, "memory_mib": 100, "disk_gib": 1, "arrive": 0}
            ]
        });
        let t = Trace::parse(&v.to_string()).unwrap();
        // Spread over two hosts until 5, then one: 1.5 hosts on average; the bound is 1.
        let r = Replay {
            packer: "test".into(),
            is_static: false,
            reordered: false,
            decision_ns: vec![1, 1],
            log: vec![
                (0.0, Event::Place { req: 0, node: 0 }),
                (0.0, Event::Place { req: 1, node: 1 }),
                (5.0, Event::Depart { req: 0 }),
            ],
        };
        let rep = evaluate(&t, &r);
        assert!((rep.hosts - 1.5).abs() < 1e-9, "{}", rep.hosts);
        assert!((rep.bound - 1.0).abs() < 1e-9, "{}", rep.bound);
        assert_eq!(rep.violations, Violations::default());
    }
}
