//! Other schedulers' scores, as [`Scorer`]s, so that the benchmark and `zy-coordinator pack`
//! run them through the very same hard rules as Zhengyun's (zone, state, capacity after
//! overcommit, anti-affinity, N+1): only the choice among the nodes that pass differs.
//! Ties go to the earlier node in the zone order, as for every scorer of the crate.
//!
//! | name | score | static order |
//! |---|---|---|
//! | `ffd` | first fit: every node scores the same, so the first in zone order wins | decreasing size |
//! | `bfd` | best fit: the least room left, summed over the resources as shares | decreasing size |
//! | `nomad` | Nomad's `ScoreFitBinPack` over every node | the trace's |
//! | `nomad-sampled` | the same over max(2, ⌈log2 n⌉) nodes, as Nomad's limit iterator | the trace's |
//! | `k8s-least` | Kubernetes `NodeResourcesFit` LeastAllocated, CPU and memory weight 1 | the trace's |
//! | `k8s-most` | Kubernetes `NodeResourcesFit` MostAllocated, CPU and memory weight 1 | the trace's |
//!
//! Online (a trace with arrivals over time) first-fit and best-fit decreasing are plain first
//! fit and best fit: nothing can be sorted that has not arrived.

use crate::replay::{Order, Packer};
use crate::{Candidate, Scorer, Zhengyun, CPU, DIMS, MEM};

/// Every packer by name, Zhengyun's first.
pub const NAMES: [&str; 7] = [
    "zhengyun",
    "ffd",
    "bfd",
    "nomad",
    "nomad-sampled",
    "k8s-least",
    "k8s-most",
];

/// The seed of Nomad's sampled node order (each decision derives its own from it).
pub const NOMAD_SEED: u64 = 0x5A59_4E4F_4D41_4431;

/// A packer by name (one of [`NAMES`]).
pub fn by_name(name: &str) -> Option<Packer> {
    let (scorer, sampled, order): (Box<dyn Scorer>, bool, Order) = match name {
        "zhengyun" => (Box::new(Zhengyun::default()), false, Order::Zhengyun),
        "ffd" => (Box::new(FirstFit), false, Order::Decreasing),
        "bfd" => (Box::new(BestFit), false, Order::Decreasing),
        "nomad" => (Box::new(NomadBinPack), false, Order::Given),
        "nomad-sampled" => (Box::new(NomadBinPack), true, Order::Given),
        "k8s-least" => (Box::new(K8sLeastAllocated), false, Order::Given),
        "k8s-most" => (Box::new(K8sMostAllocated), false, Order::Given),
        _ => return None,
    };
    Some(Packer {
        name: name.to_string(),
        scorer,
        sampled,
        seed: NOMAD_SEED,
        order,
    })
}

/// First fit: every node scores 0, so the first that passes every rule (in zone order)
/// takes the VM.
#[derive(Clone, Copy, Debug)]
pub struct FirstFit;

impl Scorer for FirstFit {
    fn name(&self) -> &str {
        "ffd"
    }
    fn score(&self, _c: &Candidate) -> f64 {
        0.0
    }
}

/// Best fit for vectors: the node left with the least room, room measured as the sum over
/// the resources of the share of the node's capacity left once the VM is there (the L1
/// "norm-based greedy" of Panigrahy et al., *Heuristics for Vector Bin Packing*, Microsoft
/// Research 2011). A resource the node has none of counts as fully left (0 used).
#[derive(Clone, Copy, Debug)]
pub struct BestFit;

impl Scorer for BestFit {
    fn name(&self) -> &str {
        "bfd"
    }
    fn score(&self, c: &Candidate) -> f64 {
        let u = c.after();
        -(0..DIMS).map(|d| 1.0 - u[d]).sum::<f64>()
    }
}

/// Nomad's `ScoreFitBinPack` (hashicorp/nomad, `nomad/structs/funcs.go`, with
/// `computeFreePercentage` beside it; "BestFit v3" of Google's data-centre scheduling
/// slides): with freeCpu and freeRam the shares of the node left once the allocation is
/// counted, `score = 20 - (10^freeCpu + 10^freeRam)`, clamped to [0, 18]. Disk does not
/// enter it. Nomad divides the result by 18 when it normalises scores; that changes no
/// choice. Nomad's capacity is the node's minus its reservation; here, the capacity after
/// overcommit.
#[derive(Clone, Copy, Debug)]
pub struct NomadBinPack;

/// Nomad's formula on the free shares.
pub fn nomad_fit_binpack(free_cpu: f64, free_ram: f64) -> f64 {
    let total = 10f64.powf(free_cpu) + 10f64.powf(free_ram);
    (20.0 - total).clamp(0.0, 18.0)
}

impl Scorer for NomadBinPack {
    fn name(&self) -> &str {
        "nomad"
    }
    fn score(&self, c: &Candidate) -> f64 {
        let u = c.after();
        nomad_fit_binpack(1.0 - u[CPU], 1.0 - u[MEM])
    }
}

/// Kubernetes' `MaxNodeScore`.
pub const K8S_MAX_NODE_SCORE: i64 = 100;

/// Kubernetes `leastRequestedScore` (kubernetes/kubernetes,
/// `pkg/scheduler/framework/plugins/noderesources/least_allocated.go`), in its integer
/// arithmetic: `(capacity - requested) * 100 / capacity`, 0 when over capacity or no
/// capacity.
pub fn k8s_least_requested(requested: i64, capacity: i64) -> i64 {
    if capacity == 0 || requested > capacity {
        return 0;
    }
    (capacity - requested) * K8S_MAX_NODE_SCORE / capacity
}

/// Kubernetes `mostRequestedScore` (`.../noderesources/most_allocated.go`):
/// `requested * 100 / capacity`, requested capped at capacity, 0 without capacity.
pub fn k8s_most_requested(requested: i64, capacity: i64) -> i64 {
    if capacity == 0 {
        return 0;
    }
    requested.min(capacity) * K8S_MAX_NODE_SCORE / capacity
}

/// `requested` (the node's plus the pod's) and `capacity` (allocatable) per CPU and memory,
/// as the Kubernetes scorers take them.
fn k8s_inputs(c: &Candidate) -> [(i64, i64); 2] {
    let f = |d: usize| {
        let cap = c.capacity.0[d].min(i64::MAX as u64 / 200) as i64;
        let req = (c.used.0[d].saturating_add(c.demand.0[d])).min(i64::MAX as u64 / 200) as i64;
        (req, cap)
    };
    [f(CPU), f(MEM)]
}

/// Kubernetes `NodeResourcesFit` with the LeastAllocated strategy, CPU and memory weight 1
/// (the default): the weighted mean of [`k8s_least_requested`] in integers. Kubernetes
/// breaks ties at random among the best; here the earlier node wins.
#[derive(Clone, Copy, Debug)]
pub struct K8sLeastAllocated;

impl Scorer for K8sLeastAllocated {
    fn name(&self) -> &str {
        "k8s-least"
    }
    fn score(&self, c: &Candidate) -> f64 {
        let s: i64 = k8s_inputs(c)
            .iter()
            .map(|&(r, cap)| k8s_least_requested(r, cap))
            .sum();
        (s / 2) as f64
    }
}

/// Kubernetes `NodeResourcesFit` with the MostAllocated strategy, CPU and memory weight 1.
#[derive(Clone, Copy, Debug)]
pub struct K8sMostAllocated;

impl Scorer for K8sMostAllocated {
    fn name(&self) -> &str {
        "k8s-most"
    }
    fn score(&self, c: &Candidate) -> f64 {
        let s: i64 = k8s_inputs(c)
            .iter()
            .map(|&(r, cap)| k8s_most_requested(r, cap))
            .sum();
        (s / 2) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Res;

    fn cand(cap: Res, used: Res, demand: Res) -> Candidate {
        Candidate {
            node: 0,
            pos: 0,
            capacity: cap,
            used,
            demand,
            vms: 1,
            zone_max: cap,
            zone_cap: cap,
            zone_used: used,
            zone: 0,
        }
    }

    #[test]
    fn nomad_formula() {
        // Empty after placing (all free): 20 - 20 = 0; full: 20 - 2 = 18.
        assert_eq!(nomad_fit_binpack(1.0, 1.0), 0.0);
        assert_eq!(nomad_fit_binpack(0.0, 0.0), 18.0);
        let half = 20.0 - 2.0 * 10f64.sqrt();
        assert!((nomad_fit_binpack(0.5, 0.5) - half).abs() < 1e-12);
        // Overfit (negative free) is capped at 18.
        assert_eq!(nomad_fit_binpack(-0.5, 0.0), 18.0);
        // On a node of 100 vCPU-milli / 100 MiB, 50 used + 25 asked: 75 % used in both.
        let c = cand(
            Res::new(100, 100, 0),
            Res::new(50, 50, 0),
            Res::new(25, 25, 0),
        );
        let want = 20.0 - 2.0 * 10f64.powf(0.25);
        assert!((NomadBinPack.score(&c) - want).abs() < 1e-12);
    }

    #[test]
    fn kubernetes_formulas_in_integers() {
        assert_eq!(k8s_least_requested(25, 100), 75);
        assert_eq!(k8s_least_requested(101, 100), 0);
        assert_eq!(k8s_least_requested(5, 0), 0);
        assert_eq!(k8s_least_requested(1, 3), 66);
        assert_eq!(k8s_most_requested(25, 100), 25);
        assert_eq!(k8s_most_requested(150, 100), 100);
        assert_eq!(k8s_most_requested(2, 3), 66);
        assert_eq!(k8s_most_requested(5, 0), 0);
        // CPU 30 % and memory 61 % requested after the pod: least (70 + 39) / 2 = 54,
        // most (30 + 61) / 2 = 45 (integer division).
        let c = cand(
            Res::new(1000, 1000, 10),
            Res::new(200, 510, 0),
            Res::new(100, 100, 5),
        );
        assert_eq!(K8sLeastAllocated.score(&c), 54.0);
        assert_eq!(K8sMostAllocated.score(&c), 45.0);
    }

    #[test]
    fn best_fit_prefers_the_least_room_left_and_first_fit_the_first_node() {
        let cap = Res::new(1000, 1000, 100);
        let d = Res::new(100, 100, 10);
        let full = cand(cap, Res::new(700, 700, 50), d);
        let empty = cand(cap, Res::ZERO, d);
        assert!(BestFit.score(&full) > BestFit.score(&empty));
        // sum of shares left: 0.2 + 0.2 + 0.4
        assert!((BestFit.score(&full) + 0.8).abs() < 1e-12);
        assert_eq!(FirstFit.score(&full), FirstFit.score(&empty));
        assert!(K8sMostAllocated.score(&full) > K8sMostAllocated.score(&empty));
        assert!(K8sLeastAllocated.score(&full) < K8sLeastAllocated.score(&empty));
        assert!(NomadBinPack.score(&full) > NomadBinPack.score(&empty));
    }

    #[test]
    fn every_name_is_a_packer() {
        for n in NAMES {
            assert_eq!(by_name(n).unwrap().name, n);
        }
        assert!(by_name("random").is_none());
        assert!(by_name("nomad-sampled").unwrap().sampled);
    }
}
