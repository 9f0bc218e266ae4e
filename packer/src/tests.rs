use super::*;
use proptest::prelude::*;

fn spec(name: &str, zone: &str, rack: Option<&str>, cpus: u64, mem: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        zone: zone.into(),
        rack: rack.map(String::from),
        capacity: Res::new(cpus * 1000, mem, 1000),
        state: NodeState::Ready,
        overcommit: None,
    }
}

fn req(zone: &str, vcpus: u64, mem: u64, group: Option<&str>) -> Request {
    Request {
        zone: zone.into(),
        demand: Res::new(vcpus * 1000, mem, 10),
        group: group.map(String::from),
        spread: Spread::Host,
        priority: 0,
    }
}

fn cluster(n_plus_one: bool, nodes: &[NodeSpec]) -> Cluster<u32> {
    let mut c = Cluster::new(Policy {
        n_plus_one,
        ..Policy::default()
    });
    for n in nodes {
        c.add_node(n.clone()).unwrap();
    }
    c
}

#[test]
fn a_vm_goes_only_to_a_ready_node_of_its_zone_with_room() {
    let mut c = cluster(
        false,
        &[
            spec("a", "intranet", None, 4, 8192),
            spec("b", "extranet", None, 64, 262144),
            spec("c", "intranet", None, 64, 262144),
        ],
    );
    c.set_state(2, NodeState::Draining).unwrap();
    assert_eq!(c.place(1, &req("intranet", 2, 4096, None)), Ok(0));
    // 16 vCPUs of a's 4x4 = 16: one more 16 does not fit anywhere Ready of the zone.
    let e = c.place(2, &req("intranet", 16, 1024, None)).unwrap_err();
    assert_eq!(e.nodes.len(), 2);
    assert_eq!(e.nodes[1].2, Why::State(NodeState::Draining));
    assert!(matches!(&e.nodes[0].2, Why::Short(s) if s[0].0 == CPU));
    let msg = e.to_string();
    assert!(
        msg.contains("short of 16 vCPU") && msg.contains("most left on one: 14"),
        "{msg}"
    );
    let e = c.place(3, &req("nowhere", 1, 1, None)).unwrap_err();
    assert!(e.to_string().contains("no nodes"), "{e}");
}

#[test]
fn the_score_keeps_empty_nodes_empty_and_opens_the_biggest() {
    let mut c = cluster(
        false,
        &[
            spec("small", "z", None, 8, 16384),
            spec("big", "z", None, 32, 131072),
            spec("big2", "z", None, 32, 131072),
        ],
    );
    assert_eq!(c.place(1, &req("z", 1, 1024, None)), Ok(1));
    assert_eq!(c.place(2, &req("z", 1, 1024, None)), Ok(1));
    assert_eq!(c.place(3, &req("z", 1, 1024, Some("g"))), Ok(1));
    // Its group-mate cannot share big: big2 (bigger than small) is opened.
    assert_eq!(c.place(4, &req("z", 1, 1024, Some("g"))), Ok(2));
}

#[test]
fn anti_affinity_by_rack_when_asked() {
    let mut c = cluster(
        false,
        &[
            spec("a1", "z", Some("A"), 8, 16384),
            spec("a2", "z", Some("A"), 8, 16384),
            spec("b1", "z", Some("B"), 8, 16384),
        ],
    );
    let mut r = req("z", 1, 1024, Some("db"));
    r.spread = Spread::Rack;
    assert_eq!(c.place(1, &r), Ok(0));
    assert_eq!(c.place(2, &r), Ok(2));
    let e = c.place(3, &r).unwrap_err();
    assert!(e
        .nodes
        .iter()
        .all(|(_, _, w)| matches!(w, Why::AntiAffinity { .. })));
    // A host-spread member may not go into a rack where a rack-spread member is.
    let e = c.place(4, &req("z", 1, 1024, Some("db"))).unwrap_err();
    assert!(e.to_string().contains("anti-affinity"), "{e}");
}

#[test]
fn n_plus_one_keeps_room_for_the_biggest_loss_and_says_so() {
    // Three nodes of 8 GiB: filling two and a half of them leaves no room to evacuate.
    let mut c = cluster(
        true,
        &[
            spec("a", "z", None, 16, 8192),
            spec("b", "z", None, 16, 8192),
            spec("c", "z", None, 16, 8192),
        ],
    );
    let mut placed = 0;
    for i in 0..12 {
        if c.place(i, &req("z", 1, 2048, None)).is_ok() {
            placed += 1;
        }
    }
    // 12 slots of 2 GiB; surviving any one loss allows 8.
    assert_eq!(placed, 8);
    assert!(c.n_plus_one_failures().is_empty());
    assert!(c.full_n_plus_one().is_empty());
    let e = c.place(100, &req("z", 1, 2048, None)).unwrap_err();
    assert!(
        e.nodes
            .iter()
            .any(|(_, _, w)| matches!(w, Why::NPlusOne { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("N+1"), "{e}");
    // Without N+1 all 12 fit.
    let mut c = cluster(
        false,
        &[
            spec("a", "z", None, 16, 8192),
            spec("b", "z", None, 16, 8192),
            spec("c", "z", None, 16, 8192),
        ],
    );
    assert_eq!(
        (0..13)
            .filter(|i| c.place(*i, &req("z", 1, 2048, None)).is_ok())
            .count(),
        12
    );
}

#[test]
fn a_zone_of_one_ready_node_takes_vms_though_it_cannot_be_n_plus_one() {
    let mut c = cluster(
        true,
        &[spec("a", "z", None, 4, 8192), spec("b", "z", None, 4, 8192)],
    );
    c.set_state(1, NodeState::Down).unwrap();
    assert_eq!(c.place(1, &req("z", 1, 1024, None)), Ok(0));
    assert_eq!(c.n_plus_one_failures(), vec![0]);
}

#[test]
fn a_standby_node_that_would_fit_is_named_for_waking() {
    let mut c = cluster(
        false,
        &[
            spec("a", "z", None, 4, 4096),
            spec("s", "z", None, 16, 65536),
        ],
    );
    c.set_state(1, NodeState::Standby).unwrap();
    let e = c.place(1, &req("z", 2, 8192, None)).unwrap_err();
    assert_eq!(e.wake, Some(1));
    assert!(e.to_string().contains("waking standby node s"), "{e}");
    c.set_state(1, NodeState::Ready).unwrap();
    assert_eq!(c.place(1, &req("z", 2, 8192, None)), Ok(1));
}

#[test]
fn removing_frees_room_and_keys_are_unique() {
    let mut c = cluster(
        true,
        &[spec("a", "z", None, 4, 4096), spec("b", "z", None, 4, 4096)],
    );
    assert!(c.place(1, &req("z", 1, 2048, None)).is_ok());
    assert!(c.place(1, &req("z", 1, 1024, None)).is_err());
    assert_eq!(c.remove(&1), Ok(0));
    assert!(c.remove(&1).is_err());
    assert_eq!(c.used(0), Res::ZERO);
}

#[test]
fn overcommit_ratios_are_checked() {
    assert!(Overcommit::from_ratios([4.0, 1.0, 1.0]).is_ok());
    for bad in [f64::NAN, f64::INFINITY, 0.0, -1.0, 17.0] {
        let e = Overcommit::from_ratios([bad, 1.0, 1.0]).unwrap_err();
        assert!(e.to_string().contains("vCPU overcommit"), "{e}");
    }
    assert_eq!(
        Overcommit([4000, 1000, 1500]).apply(&Res::new(2000, 100, 10)),
        Res::new(8000, 100, 15)
    );
}

// ---- properties over random clusters ----

#[derive(Clone, Debug)]
enum Step {
    Place {
        zone: u8,
        cpu: u8,
        mem: u8,
        group: Option<u8>,
        rack: bool,
    },
    Remove(u8),
    State(u8, u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..2, 1u8..9, 1u8..17, proptest::option::weighted(0.4, 0u8..4), proptest::bool::weighted(0.2))
            .prop_map(|(zone, cpu, mem, group, rack)| Step::Place { zone, cpu, mem, group, rack }),
        2 => any::<u8>().prop_map(Step::Remove),
        1 => (any::<u8>(), 0u8..6).prop_map(|(n, s)| Step::State(n, s)),
    ]
}

const STATES: [NodeState; 6] = [
    NodeState::Ready,
    NodeState::Ready,
    NodeState::Draining,
    NodeState::Standby,
    NodeState::Suspect,
    NodeState::Ready,
];

/// Checks every hard rule from scratch, by brute force.
fn check_rules(
    c: &mut Cluster<u32>,
    placed: &BTreeMap<u32, Request>,
    safe_before: bool,
) -> Result<(), String> {
    let mut used = vec![Res::ZERO; c.node_count()];
    for (k, r) in placed {
        let n = c.node_of(k).ok_or(format!("{k} lost"))?;
        if c.node_spec(n).zone != r.zone {
            return Err(format!("{k} in the wrong zone"));
        }
        used[n] = used[n].plus(&r.demand);
        if let Some(g) = &r.group {
            for (k2, r2) in placed {
                if k2 <= k || r2.group.as_ref() != Some(g) {
                    continue;
                }
                let n2 = c.node_of(k2).unwrap();
                if n2 == n {
                    return Err(format!("{k} and {k2} share a node"));
                }
                let same_rack = match (&c.node_spec(n).rack, &c.node_spec(n2).rack) {
                    (Some(a), Some(b)) => a == b && c.node_spec(n).zone == c.node_spec(n2).zone,
                    _ => false,
                };
                if same_rack && (r.spread == Spread::Rack || r2.spread == Spread::Rack) {
                    return Err(format!("{k} and {k2} share a rack"));
                }
            }
        }
    }
    for (n, u) in used.iter().enumerate() {
        if c.used(n) != *u {
            return Err(format!("node {n} counts {:?}, really {:?}", c.used(n), u));
        }
        if !c.capacity(n).covers(u) {
            return Err(format!("node {n} over capacity"));
        }
    }
    let mut full = c.full_n_plus_one();
    full.sort();
    let inc = c.n_plus_one_failures();
    if full != inc {
        return Err(format!("incremental N+1 {inc:?} but full {full:?}"));
    }
    if safe_before && !full.is_empty() {
        return Err(format!("a placement broke N+1: {full:?}"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn no_step_breaks_a_rule_and_incremental_n_plus_one_agrees(
        sizes in proptest::collection::vec((2u64..9, 4u64..33, 0u8..3), 2..9),
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let mut c: Cluster<u32> = Cluster::new(Policy::default());
        for (i, (cpus, gib, rack)) in sizes.iter().enumerate() {
            c.add_node(NodeSpec {
                name: format!("n{i}"),
                zone: if i % 3 == 2 { "b".into() } else { "a".into() },
                rack: Some(format!("r{rack}")),
                capacity: Res::new(cpus * 1000, gib * 1024, 200),
                state: NodeState::Ready,
                overcommit: None,
            }).unwrap();
        }
        let mut placed: BTreeMap<u32, Request> = BTreeMap::new();
        let mut next = 0u32;
        for s in steps {
            match s {
                Step::Place { zone, cpu, mem, group, rack } => {
                    let r = Request {
                        zone: if zone == 0 { "a".into() } else { "b".into() },
                        demand: Res::new(u64::from(cpu) * 1000, u64::from(mem) * 1024, 5),
                        group: group.map(|g| format!("g{g}")),
                        spread: if rack { Spread::Rack } else { Spread::Host },
                        priority: 0,
                    };
                    let zone_ready = c
                        .zone_nodes(&r.zone)
                        .iter()
                        .filter(|&&n| c.node_spec(n).state == NodeState::Ready)
                        .count();
                    let safe = c.n_plus_one_failures().is_empty() && zone_ready >= 2;
                    next += 1;
                    if let Ok(n) = c.place(next, &r) {
                        prop_assert!(c.node_spec(n).state == NodeState::Ready);
                        placed.insert(next, r);
                        check_rules(&mut c, &placed, safe).map_err(TestCaseError::fail)?;
                    } else {
                        check_rules(&mut c, &placed, false).map_err(TestCaseError::fail)?;
                    }
                }
                Step::Remove(i) => {
                    if let Some(k) = placed.keys().nth(usize::from(i) % placed.len().max(1)).copied() {
                        c.remove(&k).unwrap();
                        placed.remove(&k);
                    }
                    check_rules(&mut c, &placed, false).map_err(TestCaseError::fail)?;
                }
                Step::State(n, s) => {
                    let n = usize::from(n) % c.node_count();
                    // Only empty nodes stand by; any node may become Draining or Suspect.
                    let st = STATES[usize::from(s)];
                    if st == NodeState::Standby && c.vm_count(n) > 0 {
                        continue;
                    }
                    c.set_state(n, st).unwrap();
                    check_rules(&mut c, &placed, false).map_err(TestCaseError::fail)?;
                }
            }
        }
    }
}

#[test]
fn a_batch_is_ordered_big_first_but_never_one_shape_before_another() {
    // 20 CPU-heavy and 20 memory-heavy requests given in two blocks.
    let mut reqs = Vec::new();
    for i in 0..20 {
        reqs.push(req("z", 16, 2048 + i, None));
    }
    for i in 0..20 {
        reqs.push(req("z", 1, 32768 + i, None));
    }
    let mut high = req("z", 1, 1024, None);
    high.priority = 5;
    reqs.push(high);
    let order = static_order(&reqs, &Res::new(64_000, 65536, 1000));
    assert_eq!(order.len(), reqs.len());
    assert_eq!(order[0], 40, "the higher priority first");
    let mut seen: Vec<usize> = order.clone();
    seen.sort();
    assert_eq!(seen, (0..41).collect::<Vec<_>>(), "every request once");
    // In every prefix of ten, both shapes.
    for w in order[1..].chunks(10) {
        assert!(
            w.iter().any(|&i| i < 20) && w.iter().any(|&i| (20..40).contains(&i)),
            "{order:?}"
        );
    }
    // Within a shape, bigger first.
    let cpu: Vec<usize> = order.iter().copied().filter(|&i| i < 20).collect();
    assert_eq!(cpu, (0..20).rev().collect::<Vec<_>>());
}

#[test]
fn the_score_counts_disk_among_the_stranded_resources() {
    // A balanced zone mix; a disk-heavy VM. Node a is fuller, but the VM would fill its
    // disk with half its CPU and memory idle; on node b it evens b out.
    let z = Zhengyun {
        batch_mix: vec![Some([0.6, 0.6, 0.6])],
        ..Zhengyun::default()
    };
    let cap = Res::new(100_000, 100_000, 1000);
    let demand = Res::new(5_000, 5_000, 450);
    let cand = |used: Res| Candidate {
        node: 0,
        pos: 0,
        capacity: cap,
        used,
        demand,
        vms: 3,
        zone_max: cap,
        zone_cap: cap,
        zone_used: used,
        zone: 0,
    };
    let a = cand(Res::new(50_000, 50_000, 500));
    let b = cand(Res::new(50_000, 50_000, 100));
    assert!(
        z.score(&b) > z.score(&a),
        "{} vs {}",
        z.score(&b),
        z.score(&a)
    );
    // Without the disk demand, the fuller node wins (best fit).
    let (mut a2, mut b2) = (a, b);
    a2.demand = Res::new(5_000, 5_000, 0);
    b2.demand = a2.demand;
    b2.used = Res::new(40_000, 40_000, 400);
    a2.used = Res::new(50_000, 50_000, 500);
    assert!(z.score(&a2) > z.score(&b2));
}

#[test]
fn among_near_equal_nodes_the_one_fewest_evacuations_use_wins() {
    let nodes: Vec<NodeSpec> = (0..4)
        .map(|i| spec(&format!("n{i}"), "z", None, 8, 16384))
        .collect();
    let mut c = cluster(true, &nodes);
    for i in 0..4u32 {
        c.insert(i, &req("z", 2, 8192, None), i as usize).unwrap();
    }
    // Every evacuation but n0's lands on n0 (the first with room); n0's on n1.
    assert_eq!(c.users[0].len(), 3);
    let small = req("z", 1, 1024, None);
    assert_eq!(c.add_cost(0, &small.demand, None, usize::MAX), 4);
    assert_eq!(c.add_cost(0, &small.demand, None, 2), 2);
    assert_eq!(c.add_cost(1, &small.demand, None, usize::MAX), 2);
    assert_eq!(c.add_cost(2, &small.demand, None, usize::MAX), 1);
    // Four equal scores: plain best score takes the first, n0; Zhengyun takes n2, which
    // no evacuation uses.
    let plain = Zhengyun {
        near_tie: 0.0,
        ..Zhengyun::default()
    };
    assert_eq!(
        c.clone().place_with(10, &small, &plain, Selection::All),
        Ok(0)
    );
    assert_eq!(c.place(10, &small), Ok(2));
    assert!(c.full_n_plus_one().is_empty());
}

#[test]
fn a_batch_of_shapes_far_from_its_mix_may_stray_further() {
    let c = cluster(
        true,
        &[
            spec("a", "z", None, 32, 262144),
            spec("b", "z", None, 32, 262144),
        ],
    );
    // Balanced: every request in the proportion of the node (4 vCPU per 8 GiB... of 32
    // cores x4 and 256 GiB).
    let balanced: Vec<Request> = (0..10).map(|_| req("z", 4, 8192, None)).collect();
    assert_eq!(c.batch_scorer(&balanced).stray, BATCH_STRAY);
    // CPU-heavy and memory-heavy halves (the adversarial mix).
    let mut split: Vec<Request> = (0..5).map(|_| req("z", 32, 4096, None)).collect();
    split.extend((0..5).map(|_| req("z", 2, 65536, None)));
    let s = c.batch_scorer(&split).stray;
    assert!(s > BATCH_STRAY, "{s}");
    assert_eq!(batch_stray(DISPERSION_KNEE), BATCH_STRAY);
    assert!((batch_stray(DISPERSION_KNEE + 0.2) - (BATCH_STRAY + 0.1)).abs() < 1e-12);
}
