//! Replays a [`Trace`] through a packer: Zhengyun's, or a baseline of another scheduler
//! (`crate::baselines`), all under the same hard rules of [`Cluster`].
//!
//! The crate reads no clock: the caller passes one (`clock`, in nanoseconds), used only to
//! time each decision.
//!
//! - **Static** traces (every request arrives at 0 and never departs) are decided one by one
//!   in the order the packer picks ([`Order`]): Zhengyun **reorders** them by
//!   [`crate::static_order`], first-fit and best-fit decreasing by decreasing size, Nomad and
//!   Kubernetes keep the trace's order (they are online schedulers). The output's
//!   `placements` are in the order decided, and its `meta.reordered` says whether that is
//!   not the trace's order.
//! - **Online** traces are replayed in time order; at equal times departures come before
//!   arrivals (then trace order). Each arrival is decided from the past only: the packer
//!   sees the pool as the earlier events left it and nothing of what comes later.
//!
//! Every request ends exactly once in the placements or in the rejected.

use crate::trace::{PlacementOut, Placements, PlacementsMeta, Trace};
use crate::{static_order, Cluster, NodeIx, Res, Scorer, Selection, DIMS};

/// The order in which a packer decides a static trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// The trace's order.
    Given,
    /// Zhengyun's [`static_order`].
    Zhengyun,
    /// Decreasing size: the sum of the request's shares of a typical node (the mean node
    /// capacity after overcommit) in every resource, ties in trace order.
    Decreasing,
}

/// A packer: a scorer, how it looks at the nodes, and its static order.
pub struct Packer {
    pub name: String,
    pub scorer: Box<dyn Scorer>,
    /// Nomad's limit iterator: look at max(2, ⌈log2 n⌉) nodes of the zone, in a random order
    /// (seeded per decision from `seed`), that pass every rule.
    pub sampled: bool,
    pub seed: u64,
    pub order: Order,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer")
            .field("name", &self.name)
            .field("sampled", &self.sampled)
            .field("order", &self.order)
            .finish()
    }
}

/// What happened during a replay, in order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    /// Request `req` (index into the trace) went to node `node` (index into the trace's nodes).
    Place {
        req: usize,
        node: NodeIx,
    },
    Reject {
        req: usize,
    },
    /// A placed request left.
    Depart {
        req: usize,
    },
}

/// The outcome of a replay.
#[derive(Clone, Debug)]
pub struct Replay {
    pub packer: String,
    pub is_static: bool,
    /// A static trace decided in another order than its own.
    pub reordered: bool,
    /// (time, event), in the order they happened.
    pub log: Vec<(f64, Event)>,
    /// Per decision (placed or rejected), how long it took, in ns.
    pub decision_ns: Vec<u64>,
}

/// The replay could not run (a bug of the caller or of the packer, never of the trace: the
/// trace was validated).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the packer refused node `{node}`")]
    Node {
        node: String,
        #[source]
        source: crate::Error,
    },
    #[error("request `{request}` could not be removed")]
    Remove {
        request: String,
        #[source]
        source: crate::Error,
    },
}

/// The mean capacity after overcommit of the trace's nodes (a "typical node").
pub fn typical_node(trace: &Trace) -> Res {
    let n = trace.nodes.len().max(1) as u128;
    let o = trace.policy.overcommit;
    let mut sum = [0u128; DIMS];
    for node in &trace.nodes {
        let c = o.apply(&node.capacity);
        for (s, v) in sum.iter_mut().zip(c.0) {
            *s += u128::from(v);
        }
    }
    Res(std::array::from_fn(|d| (sum[d] / n) as u64))
}

/// The order in which `packer` decides the static trace `trace` (indices of requests).
pub fn decision_order(trace: &Trace, packer: &Packer) -> Vec<usize> {
    let unit = typical_node(trace);
    match packer.order {
        Order::Given => (0..trace.requests.len()).collect(),
        Order::Zhengyun => {
            let reqs: Vec<_> = (0..trace.requests.len())
                .map(|i| trace.request(i))
                .collect();
            static_order(&reqs, &unit)
        }
        Order::Decreasing => {
            let share = |i: usize| -> f64 {
                let d = trace.requests[i].demand;
                (0..DIMS)
                    .filter(|&k| unit.0[k] > 0)
                    .map(|k| d.0[k] as f64 / unit.0[k] as f64)
                    .sum()
            };
            let mut idx: Vec<usize> = (0..trace.requests.len()).collect();
            idx.sort_by(|&a, &b| share(b).total_cmp(&share(a)).then(a.cmp(&b)));
            idx
        }
    }
}

/// Nomad's limit for a zone of `n` nodes: max(2, ⌈log2 n⌉) (scheduler/stack.go).
pub fn nomad_limit(n: usize) -> usize {
    if n == 0 {
        return 2;
    }
    ((n as f64).log2().ceil() as usize).max(2)
}

fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Replays `trace` through `packer`; `clock` returns nanoseconds from any fixed point.
pub fn replay(
    trace: &Trace,
    packer: &Packer,
    clock: &mut dyn FnMut() -> u64,
) -> Result<Replay, ReplayError> {
    let mut cluster: Cluster<String> = Cluster::new(trace.policy);
    for i in 0..trace.nodes.len() {
        cluster
            .add_node(trace.node_spec(i))
            .map_err(|source| ReplayError::Node {
                node: trace.nodes[i].id.clone(),
                source,
            })?;
    }
    let zone_size = |zone: &str, c: &Cluster<String>| c.zone_nodes(zone).len();
    let is_static = trace.is_static();
    let mut out = Replay {
        packer: packer.name.clone(),
        is_static,
        reordered: false,
        log: Vec::with_capacity(trace.requests.len() * 2),
        decision_ns: Vec::with_capacity(trace.requests.len()),
    };
    let mut placed = vec![false; trace.requests.len()];
    let mut decisions = 0u64;
    // A static batch is known in advance: Zhengyun's score then takes the batch's own mix.
    let batch = (is_static && packer.order == Order::Zhengyun).then(|| {
        let reqs: Vec<_> = (0..trace.requests.len())
            .map(|i| trace.request(i))
            .collect();
        cluster.batch_scorer(&reqs)
    });
    let scorer: &dyn Scorer = match &batch {
        Some(b) => b,
        None => packer.scorer.as_ref(),
    };
    let mut decide = |i: usize, t: f64, cluster: &mut Cluster<String>, out: &mut Replay| {
        let req = trace.request(i);
        let sel = if packer.sampled {
            Selection::Sample {
                limit: nomad_limit(zone_size(&req.zone, cluster)),
                seed: mix(packer.seed, decisions),
            }
        } else {
            Selection::All
        };
        decisions += 1;
        let t0 = clock();
        let r = cluster.place_with(trace.requests[i].id.clone(), &req, scorer, sel);
        let t1 = clock();
        out.decision_ns.push(t1.saturating_sub(t0));
        match r {
            Ok(node) => {
                out.log.push((t, Event::Place { req: i, node }));
                true
            }
            Err(_) => {
                out.log.push((t, Event::Reject { req: i }));
                false
            }
        }
    };
    if is_static {
        let order = decision_order(trace, packer);
        out.reordered = order.iter().enumerate().any(|(k, &i)| k != i);
        for i in order {
            placed[i] = decide(i, 0.0, &mut cluster, &mut out);
        }
    } else {
        // (time, 0 = departure / 1 = arrival, request)
        let mut events: Vec<(f64, u8, usize)> = Vec::with_capacity(trace.requests.len() * 2);
        for (i, r) in trace.requests.iter().enumerate() {
            events.push((r.arrive, 1, i));
            if let Some(d) = r.depart {
                events.push((d, 0, i));
            }
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (t, kind, i) in events {
            if kind == 1 {
                placed[i] = decide(i, t, &mut cluster, &mut out);
            } else if placed[i] {
                cluster
                    .remove(&trace.requests[i].id)
                    .map_err(|source| ReplayError::Remove {
                        request: trace.requests[i].id.clone(),
                        source,
                    })?;
                out.log.push((t, Event::Depart { req: i }));
            }
        }
    }
    Ok(out)
}

/// Mean, p50 and p99 of the decision times, in µs.
pub fn latency_us(ns: &[u64]) -> (f64, f64, f64) {
    if ns.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v: Vec<u64> = ns.to_vec();
    v.sort_unstable();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1000.0;
    let q = |p: f64| -> f64 {
        let k = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[k] as f64 / 1000.0
    };
    (mean, q(0.5), q(0.99))
}

impl Replay {
    /// `PLACEMENTS.json`.
    pub fn placements(&self, trace: &Trace) -> Placements {
        let mut placements = Vec::new();
        let mut rejected = Vec::new();
        for (_, e) in &self.log {
            match *e {
                Event::Place { req, node } => placements.push(PlacementOut {
                    request: trace.requests[req].id.clone(),
                    node: trace.nodes[node].id.clone(),
                }),
                Event::Reject { req } => rejected.push(trace.requests[req].id.clone()),
                Event::Depart { .. } => {}
            }
        }
        let (mean, p50, p99) = latency_us(&self.decision_ns);
        Placements {
            placements,
            rejected,
            meta: PlacementsMeta {
                packer: self.packer.clone(),
                decision_us_mean: mean,
                decision_us_p99: p99,
                decision_us_p50: p50,
                mode: if self.is_static { "static" } else { "online" }.into(),
                reordered: self.reordered,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::by_name;
    use crate::trace::Trace;

    fn trace(
        n_plus_one: bool,
        nodes: &[(&str, u64, u64)],
        reqs: &[(&str, u64, u64, f64, Option<f64>)],
    ) -> Trace {
        let v = serde_json::json!({
            "policy": {"cpu_overcommit": 1.0, "n_plus_one": n_plus_one},
            "nodes": nodes.iter().map(|(id, c, m)| serde_json::json!({
                "id": id, "zone": "z", "vcpus": c, "memory_mib": m, "disk_gib": 100
            })).collect::<Vec<_>>(),
            "requests": reqs.iter().map(|(id, c, m, a, d)| serde_json::json!({
                "id": id, "zone": "z", "vcpus": c, "memory_mib": m, "disk_gib": 1,
                "arrive": a, "depart": d
            })).collect::<Vec<_>>(),
        });
        Trace::parse(&v.to_string()).unwrap()
    }

    fn clock() -> impl FnMut() -> u64 {
        let mut t = 0;
        move || {
            t += 1000;
            t
        }
    }

    #[test]
    fn departures_come_before_arrivals_at_equal_times() {
        // One node with room for one VM: b can only go in because a left at 10 first.
        let t = trace(
            false,
            &[("n", 4, 4096)],
            &[
                ("b", 4, 4096, 10.0, None),
                ("a", 4, 4096, 0.0, Some(10.0)),
                ("c", 4, 4096, 10.0, Some(20.0)),
            ],
        );
        for name in crate::baselines::NAMES {
            let p = by_name(name).unwrap();
            let r = replay(&t, &p, &mut clock()).unwrap();
            assert!(!r.is_static);
            assert_eq!(
                r.log,
                vec![
                    (0.0, Event::Place { req: 1, node: 0 }),
                    (10.0, Event::Depart { req: 1 }),
                    (10.0, Event::Place { req: 0, node: 0 }),
                    (10.0, Event::Reject { req: 2 }),
                ],
                "{name}"
            );
            // c was rejected: its departure is no event.
            let out = r.placements(&t);
            assert_eq!(out.placements.len(), 2);
            assert_eq!(out.rejected, vec!["c".to_string()]);
            assert_eq!(out.meta.mode, "online");
            assert_eq!(r.decision_ns, vec![1000; 3]);
            assert_eq!(out.meta.decision_us_p99, 1.0);
        }
    }

    #[test]
    fn every_request_once_and_the_static_order_is_the_packers() {
        let reqs: Vec<(String, u64, u64)> = (0..40)
            .map(|i| (format!("r{i:02}"), 1 + i % 5, 512 * (1 + i % 7)))
            .collect();
        let reqs: Vec<(&str, u64, u64, f64, Option<f64>)> = reqs
            .iter()
            .map(|(id, c, m)| (id.as_str(), *c, *m, 0.0, None))
            .collect();
        let t = trace(
            true,
            &[("n1", 8, 8192), ("n2", 8, 8192), ("n3", 8, 8192)],
            &reqs,
        );
        assert!(t.is_static());
        for name in crate::baselines::NAMES {
            let p = by_name(name).unwrap();
            let r = replay(&t, &p, &mut clock()).unwrap();
            let out = r.placements(&t);
            let mut seen: Vec<&str> = out
                .placements
                .iter()
                .map(|p| p.request.as_str())
                .chain(out.rejected.iter().map(String::as_str))
                .collect();
            seen.sort_unstable();
            let mut want: Vec<&str> = t.requests.iter().map(|r| r.id.as_str()).collect();
            want.sort_unstable();
            assert_eq!(seen, want, "{name}: every request exactly once");
            assert!(!out.rejected.is_empty(), "{name}: the fleet is too small");
            // Ours and the decreasing ones reorder; Nomad's and Kubernetes' do not.
            let reorders = matches!(p.order, Order::Zhengyun | Order::Decreasing);
            assert_eq!(out.meta.reordered, reorders, "{name}");
            // The placements are in decision order: the order's first placed comes first.
            let order = decision_order(&t, &p);
            let first_decided = t.requests[order[0]].id.as_str();
            let first_out = r.log.first().map(|(_, e)| match *e {
                Event::Place { req, .. } | Event::Reject { req } | Event::Depart { req } => {
                    t.requests[req].id.as_str()
                }
            });
            assert_eq!(first_out, Some(first_decided), "{name}");
        }
    }

    #[test]
    fn decreasing_order_and_nomads_limit() {
        let t = trace(
            false,
            &[("n1", 8, 8192)],
            &[
                ("s", 1, 512, 0.0, None),
                ("l", 4, 4096, 0.0, None),
                ("m", 2, 1024, 0.0, None),
            ],
        );
        let p = by_name("ffd").unwrap();
        assert_eq!(decision_order(&t, &p), vec![1, 2, 0]);
        assert_eq!(nomad_limit(0), 2);
        assert_eq!(nomad_limit(3), 2);
        assert_eq!(nomad_limit(5), 3);
        assert_eq!(nomad_limit(1000), 10);
        assert_eq!(nomad_limit(1024), 10);
        assert_eq!(nomad_limit(1025), 11);
        assert_eq!(latency_us(&[]), (0.0, 0.0, 0.0));
        let (mean, p50, p99) = latency_us(&(1..=100).map(|x| x * 1000).collect::<Vec<_>>());
        assert_eq!((mean, p50, p99), (50.5, 50.0, 99.0));
    }
}
