use super::*;
use crate::{NodeSpec, Overcommit, Policy, Res, Spread};
use proptest::prelude::*;

const GIB: u64 = 1024;
const MIN: u64 = 60_000;

fn spec(name: &str, zone: &str, rack: Option<&str>, cpus: u64, gib: u64) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        zone: zone.into(),
        rack: rack.map(String::from),
        capacity: Res::new(cpus * 1000, gib * GIB, 1000),
        state: NodeState::Ready,
        overcommit: None,
    }
}

fn req(zone: &str, vcpus: u64, gib: u64, group: Option<&str>) -> Request {
    Request {
        zone: zone.into(),
        demand: Res::new(vcpus * 1000, gib * GIB, 10),
        group: group.map(String::from),
        spread: Spread::Host,
        priority: 0,
    }
}

fn cluster(nodes: &[NodeSpec]) -> Cluster<u32> {
    let mut c = Cluster::new(Policy::default());
    for n in nodes {
        c.add_node(n.clone()).unwrap();
    }
    c
}

fn input(loads: &[(NodeIx, f64)]) -> ConsolidateInput<u32> {
    ConsolidateInput {
        now_ms: 10 * MIN_MOVE_INTERVAL_MS,
        max_moves: 10,
        min_gain: 0.25,
        last_moved: BTreeMap::new(),
        spares_per_zone: 0,
        load: loads
            .iter()
            .map(|&(n, busy)| {
                (
                    n,
                    NodeLoad {
                        busy,
                        high_water: 0.85,
                    },
                )
            })
            .collect(),
    }
}

/// Applies every step, checking after each that the pool is N+1-safe from scratch.
fn apply_all(c: &mut Cluster<u32>, steps: &[Step<u32>]) {
    for s in steps {
        apply(c, s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert_eq!(c.full_n_plus_one(), Vec::<NodeIx>::new(), "after {s:?}");
    }
}

/// Four nodes of 16 vCPUs and 64 GiB, two small VMs on each, all lightly loaded.
fn light_four() -> Cluster<u32> {
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 64),
        spec("n1", "z", None, 16, 64),
        spec("n2", "z", None, 16, 64),
        spec("n3", "z", None, 16, 64),
    ]);
    for i in 0..8u32 {
        c.insert(i, &req("z", 2, 8, None), (i / 2) as NodeIx)
            .unwrap();
    }
    assert!(c.full_n_plus_one().is_empty());
    c
}

#[test]
fn a_lightly_loaded_four_node_zone_empties_a_node_and_a_request_that_needs_it_wakes_it() {
    let mut c = light_four();
    let inp = input(&[(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.1)]);
    let plan = plan_consolidate(&c, &inp);
    assert_eq!(plan, plan_consolidate(&c, &inp), "deterministic");
    let standby: Vec<NodeIx> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Standby { node } => Some(*node),
            _ => None,
        })
        .collect();
    assert!(!standby.is_empty(), "{plan:#?}");
    // The least used first; ties to the fewest VMs, then the first node.
    assert_eq!(standby[0], 0);
    assert!(plan.moves() <= inp.max_moves);
    for s in &plan.steps {
        if let Step::Move { from, reason, .. } = s {
            assert_eq!(reason, &MoveReason::Empty { node: *from });
        }
    }
    apply_all(&mut c, &plan.steps);
    for &n in &standby {
        assert_eq!(c.node_spec(n).state, NodeState::Standby);
        assert_eq!(c.vm_count(n), 0);
    }
    // The packer's hint names n0 for a VM of 60 GiB (n0 has the room), but n0 awake could
    // not be evacuated (n1 and n3 have 16 and 48 GiB free): waking it does not do.
    let huge = req("z", 4, 60, None);
    let hint = c.check(&99, &huge).unwrap_err().wake;
    assert_eq!(hint, Some(0));
    assert!(matches!(wake_for(&mut c, &99, &huge), Wake::Nowhere(_)));
    // A VM of 40 GiB fits on no node in use (on n3, n3's loss would strand it): waking
    // the first standby node makes room.
    let big = req("z", 4, 40, None);
    assert_eq!(wake_for(&mut c, &100, &big), Wake::Node(standby[0]));
    assert_eq!(
        c.node_spec(standby[0]).state,
        NodeState::Standby,
        "put back"
    );
    // With no spare kept, the plan packed the zone to its N+1 margin exactly: even a
    // small VM needs a node woken (keep spares for headroom).
    let small = req("z", 1, 1, None);
    assert_eq!(wake_for(&mut c, &101, &small), Wake::Node(standby[0]));
}

#[test]
fn the_spares_stay_awake() {
    let c = light_four();
    let mut inp = input(&[(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.1)]);
    inp.spares_per_zone = 1;
    let plan = plan_consolidate(&c, &inp);
    // The first node emptied is the zone's spare; it does not stand by.
    assert_eq!(
        plan.considered[0],
        Considered {
            node: 0,
            goal: Goal::Empty,
            outcome: Outcome::Planned {
                moves: 2,
                standby: false
            }
        }
    );
    assert!(!plan.steps.contains(&Step::Standby { node: 0 }));
    let mut w = c.clone();
    apply_all(&mut w, &plan.steps);
    let spares = (0..4)
        .filter(|&n| w.node_spec(n).state == NodeState::Ready && w.vm_count(n) == 0)
        .count();
    assert!(spares >= 1);
}

#[test]
fn an_empty_node_beyond_the_spares_stands_by_without_moves() {
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 64),
        spec("n1", "z", None, 16, 64),
        spec("n2", "z", None, 16, 64),
        spec("n3", "z", None, 16, 64),
    ]);
    c.insert(1, &req("z", 8, 40, None), 0).unwrap();
    c.insert(2, &req("z", 8, 40, None), 1).unwrap();
    let mut inp = input(&[(0, 0.5), (1, 0.5), (2, 0.0), (3, 0.0)]);
    inp.spares_per_zone = 1;
    let plan = plan_consolidate(&c, &inp);
    assert_eq!(plan.steps, vec![Step::Standby { node: 3 }], "{plan:#?}");
    assert!(plan.considered.contains(&Considered {
        node: 2,
        goal: Goal::Idle,
        outcome: Outcome::Skipped(Skip::Spare)
    }));
}

#[test]
fn a_vm_moved_ten_minutes_ago_is_not_moved_again() {
    let c = light_four();
    let mut inp = input(&[(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.1)]);
    inp.last_moved.insert(1, inp.now_ms - 10 * MIN);
    // Moved two hours ago: free to move.
    inp.last_moved.insert(3, inp.now_ms - 120 * MIN);
    let plan = plan_consolidate(&c, &inp);
    assert_eq!(
        plan.considered[0],
        Considered {
            node: 0,
            goal: Goal::Empty,
            outcome: Outcome::Skipped(Skip::RecentlyMoved {
                vm: 1,
                ago_ms: Some(10 * MIN)
            })
        }
    );
    for s in &plan.steps {
        assert!(!matches!(s, Step::Move { vm: 1, .. }), "{s:?}");
    }
    assert!(plan.steps.contains(&Step::Standby { node: 1 }), "{plan:#?}");
}

#[test]
fn a_hot_node_is_relieved_below_its_mark() {
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 64),
        spec("n1", "z", None, 16, 64),
        spec("n2", "z", None, 16, 64),
    ]);
    for i in 0..4u32 {
        c.insert(i, &req("z", 4, 8, None), 0).unwrap();
    }
    c.insert(10, &req("z", 4, 8, None), 1).unwrap();
    c.insert(11, &req("z", 4, 8, None), 2).unwrap();
    let mut inp = input(&[(0, 0.95), (1, 0.2), (2, 0.2)]);
    inp.min_gain = 0.1;
    let plan = plan_consolidate(&c, &inp);
    let Some(Step::Move {
        vm,
        from: 0,
        reason:
            MoveReason::Relieve {
                node: 0,
                load_before,
                load_after,
            },
        ..
    }) = plan.steps.first()
    else {
        panic!("{plan:#?}")
    };
    // The busiest VM first (all equal: the lowest id); one move takes a quarter off.
    assert_eq!(*vm, 0);
    assert!((load_before - 0.95).abs() < 1e-9);
    assert!((load_after - 0.7125).abs() < 1e-9, "{load_after}");
    assert_eq!(
        plan.considered[0],
        Considered {
            node: 0,
            goal: Goal::Relieve,
            outcome: Outcome::Planned {
                moves: 1,
                standby: false
            }
        }
    );
    apply_all(&mut c, &plan.steps);
}

#[test]
fn a_hot_node_that_cannot_come_down_to_its_mark_moves_nothing() {
    let mut c = cluster(&[spec("n0", "z", None, 16, 64), spec("n1", "z", None, 16, 64)]);
    for i in 0..4u32 {
        c.insert(i, &req("z", 4, 8, None), 0).unwrap();
    }
    c.insert(10, &req("z", 4, 8, None), 1).unwrap();
    // n1 is nearly at its own mark: nothing of n0's fits under it.
    let mut inp = input(&[(0, 0.95), (1, 0.8)]);
    inp.min_gain = 0.1;
    let plan = plan_consolidate(&c, &inp);
    assert!(plan.steps.is_empty(), "{plan:#?}");
    assert!(matches!(
        plan.considered[0].outcome,
        Outcome::Skipped(Skip::CannotRelieve { stuck: 4, .. })
    ));
}

#[test]
fn a_plan_that_would_break_n_plus_one_is_cut_short_with_the_reason() {
    // Three nodes of 8 GiB. Emptying n2 onto n0 is fine while n2 is awake, but n2's
    // standby would leave n0's 6 GiB nowhere but n1's 4 GiB free.
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 8),
        spec("n1", "z", None, 16, 8),
        spec("n2", "z", None, 16, 8),
    ]);
    c.insert(1, &req("z", 1, 2, None), 0).unwrap();
    c.insert(2, &req("z", 1, 2, None), 0).unwrap();
    c.insert(3, &req("z", 1, 2, None), 1).unwrap();
    c.insert(4, &req("z", 1, 2, None), 1).unwrap();
    c.insert(5, &req("z", 1, 2, None), 2).unwrap();
    assert!(c.full_n_plus_one().is_empty());
    let plan = plan_consolidate(&c, &input(&[(0, 0.1), (1, 0.1), (2, 0.1)]));
    assert!(plan.steps.is_empty(), "{plan:#?}");
    assert_eq!(
        plan.considered[0],
        Considered {
            node: 2,
            goal: Goal::Empty,
            outcome: Outcome::Skipped(Skip::StandbyBreaksNPlusOne { failed: 0 })
        }
    );
    // Carried out by hand, the standby is refused and changes nothing.
    let mut w = c.clone();
    apply(
        &mut w,
        &Step::Move {
            vm: 5,
            from: 2,
            to: 0,
            reason: MoveReason::Empty { node: 2 },
        },
    )
    .unwrap();
    let e = apply(&mut w, &Step::Standby { node: 2 }).unwrap_err();
    assert!(e.to_string().contains("N+1"), "{e}");
    assert_eq!(w.node_spec(2).state, NodeState::Ready);
}

#[test]
fn a_drain_of_one_node_of_three() {
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 64),
        spec("n1", "z", None, 16, 64),
        spec("n2", "z", None, 16, 64),
    ]);
    for i in 0..6u32 {
        c.place(i, &req("z", 2, 4 + u64::from(i), None)).unwrap();
    }
    let on0: Vec<u32> = c.vms_on(0).into_iter().copied().collect();
    assert!(!on0.is_empty());
    let plan = plan_drain(&c, 0).unwrap();
    assert_eq!(plan, plan_drain(&c, 0).unwrap(), "deterministic");
    assert_eq!(plan.steps.len(), on0.len());
    // The largest in memory first, as N+1 evacuates.
    let order: Vec<u32> = plan
        .steps
        .iter()
        .map(|s| match s {
            Step::Move {
                vm, from: 0, to, ..
            } => {
                assert_ne!(*to, 0);
                *vm
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let mut want = on0.clone();
    want.sort_by(|a, b| b.cmp(a));
    assert_eq!(order, want);
    c.set_state(0, NodeState::Draining).unwrap();
    apply_all(&mut c, &plan.steps);
    assert_eq!(c.vm_count(0), 0);
    // Planning again on the drained node: nothing left to move.
    assert!(plan_drain(&c, 0).unwrap().steps.is_empty());
}

#[test]
fn a_vm_that_fits_nowhere_stops_the_drain_with_the_reasons() {
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 64),
        spec("n1", "z", None, 16, 64),
        spec("n2", "z", None, 16, 64),
        spec("s", "z", None, 16, 64),
    ]);
    c.set_state(3, NodeState::Standby).unwrap();
    c.insert(1, &req("z", 1, 4, Some("db")), 0).unwrap();
    c.insert(2, &req("z", 1, 4, Some("db")), 1).unwrap();
    c.insert(3, &req("z", 1, 4, Some("db")), 2).unwrap();
    c.insert(4, &req("z", 1, 4, None), 0).unwrap();
    let Err(DrainError::Stuck { planned, stuck, .. }) = plan_drain(&c, 0) else {
        panic!("the db member has nowhere to go")
    };
    assert_eq!(planned.len(), 1);
    assert_eq!(stuck.len(), 1);
    let (vm, refusal) = &stuck[0];
    assert_eq!(*vm, 1);
    assert!(matches!(refusal.nodes[1].2, Why::AntiAffinity { .. }));
    assert!(matches!(refusal.nodes[2].2, Why::AntiAffinity { .. }));
    // s has room for it, but a member of db on s could not be evacuated (n1 and n2 hold
    // the others): waking s would not let it move under N+1.
    assert_eq!(refusal.wake, None);
    let msg = plan_drain(&c, 0).unwrap_err().to_string();
    assert!(
        msg.starts_with("1 VM(s) of node n0 fit on no other node; the first, 1:")
            && msg.contains("2 hold a member of its anti-affinity group"),
        "{msg}"
    );
    // Bad input.
    assert_eq!(plan_drain(&c, 9), Err(DrainError::UnknownNode(9)));
    assert!(matches!(
        plan_drain(&c, 3),
        Err(DrainError::NotRunning {
            state: NodeState::Standby,
            ..
        })
    ));
}

#[test]
fn wake_for_names_the_standby_node_that_makes_room() {
    // N+1 off: which node fits the request itself.
    let mut c: Cluster<u32> = Cluster::new(Policy {
        n_plus_one: false,
        ..Policy::default()
    });
    for n in [
        spec("a", "z", None, 4, 4),
        spec("b", "z", None, 4, 4),
        spec("small", "z", None, 4, 8),
        spec("big", "z", None, 16, 64),
    ] {
        c.add_node(n).unwrap();
    }
    c.set_state(2, NodeState::Standby).unwrap();
    c.set_state(3, NodeState::Standby).unwrap();
    assert!(matches!(
        wake_for(&mut c, &1, &req("z", 1, 1, None)),
        Wake::Fits(0 | 1)
    ));
    assert_eq!(wake_for(&mut c, &1, &req("z", 1, 6, None)), Wake::Node(2));
    assert_eq!(wake_for(&mut c, &1, &req("z", 1, 32, None)), Wake::Node(3));
    let Wake::Nowhere(r) = wake_for(&mut c, &1, &req("z", 1, 100, None)) else {
        panic!("nothing holds 100 GiB")
    };
    assert_eq!(r.wake, None);
    assert_eq!(c.node_spec(2).state, NodeState::Standby);
    assert_eq!(c.node_spec(3).state, NodeState::Standby);
}

#[test]
fn bad_steps_change_nothing() {
    let mut c = cluster(&[
        spec("a", "z", None, 4, 8),
        spec("b", "z", None, 4, 8),
        spec("x", "other", None, 4, 8),
    ]);
    c.insert(1, &req("z", 1, 2, None), 0).unwrap();
    let mv = |vm, from, to| Step::Move {
        vm,
        from,
        to,
        reason: MoveReason::Drain,
    };
    let before = format!("{:?}", (c.used(0), c.used(1), c.used(2)));
    assert!(matches!(
        apply(&mut c, &mv(1, 1, 0)),
        Err(StepError::NotOn { .. })
    ));
    assert!(matches!(
        apply(&mut c, &mv(9, 0, 1)),
        Err(StepError::UnknownVm(_))
    ));
    assert!(matches!(
        apply(&mut c, &mv(1, 0, 7)),
        Err(StepError::UnknownNode(7))
    ));
    let e = apply(&mut c, &mv(1, 0, 2)).unwrap_err();
    assert!(e.to_string().contains("another zone"), "{e}");
    c.set_state(1, NodeState::Draining).unwrap();
    let e = apply(&mut c, &mv(1, 0, 1)).unwrap_err();
    assert!(e.to_string().contains("draining"), "{e}");
    assert!(matches!(
        apply(&mut c, &Step::Standby { node: 0 }),
        Err(StepError::NotEmpty { vms: 1, .. })
    ));
    assert_eq!(before, format!("{:?}", (c.used(0), c.used(1), c.used(2))));
    assert_eq!(c.node_of(&1), Some(0));
}

// ---- properties over random clusters ----

/// A random pool: nodes in zones a and b over three racks, some with their own
/// overcommit; VMs placed under every rule (anti-affinity groups, some rack-spread), by
/// the packer or, for a pool that has drifted apart, by Kubernetes' LeastAllocated; then
/// some nodes change state (only empty ones stand by).
#[allow(clippy::type_complexity)]
fn pool() -> impl Strategy<
    Value = (
        Vec<(u64, u64, u8, u8)>,
        Vec<(u8, u8, u8, Option<u8>, bool)>,
        Vec<(u8, u8)>,
        bool,
    ),
> {
    (
        proptest::collection::vec((2u64..9, 4u64..33, 0u8..3, 0u8..4), 2..13),
        proptest::collection::vec(
            (
                0u8..2,
                1u8..9,
                1u8..13,
                proptest::option::weighted(0.4, 0u8..4),
                proptest::bool::weighted(0.2),
            ),
            0..40,
        ),
        proptest::collection::vec((any::<u8>(), 0u8..6), 0..4),
        any::<bool>(),
    )
}

const STATES: [NodeState; 6] = [
    NodeState::Ready,
    NodeState::Draining,
    NodeState::Standby,
    NodeState::Suspect,
    NodeState::Maintenance,
    NodeState::Down,
];

#[allow(clippy::type_complexity)]
fn build(
    nodes: &[(u64, u64, u8, u8)],
    vms: &[(u8, u8, u8, Option<u8>, bool)],
    states: &[(u8, u8)],
    spread_out: bool,
) -> (Cluster<u32>, BTreeMap<u32, Request>) {
    let mut c: Cluster<u32> = Cluster::new(Policy::default());
    for (i, &(cpus, gib, rack, oc)) in nodes.iter().enumerate() {
        c.add_node(NodeSpec {
            name: format!("n{i}"),
            zone: if i % 3 == 2 { "b".into() } else { "a".into() },
            rack: Some(format!("r{rack}")),
            capacity: Res::new(cpus * 1000, gib * GIB, 200),
            state: NodeState::Ready,
            overcommit: match oc {
                0 => Some(Overcommit([2000, 1000, 1000])),
                1 => Some(Overcommit([8000, 1500, 1000])),
                _ => None,
            },
        })
        .unwrap();
    }
    let mut placed = BTreeMap::new();
    for (i, &(zone, cpu, mem, group, rack)) in vms.iter().enumerate() {
        let r = Request {
            zone: if zone == 0 { "a".into() } else { "b".into() },
            demand: Res::new(u64::from(cpu) * 1000, u64::from(mem) * GIB, 5),
            group: group.map(|g| format!("g{g}")),
            spread: if rack { Spread::Rack } else { Spread::Host },
            priority: 0,
        };
        let done = if spread_out {
            let scorer = crate::baselines::K8sLeastAllocated;
            c.place_with(i as u32, &r, &scorer, crate::Selection::All)
        } else {
            c.place(i as u32, &r)
        };
        if done.is_ok() {
            placed.insert(i as u32, r);
        }
    }
    for &(n, s) in states {
        let n = usize::from(n) % c.node_count();
        let st = STATES[usize::from(s)];
        if st == NodeState::Standby && c.vm_count(n) > 0 {
            continue;
        }
        c.set_state(n, st).unwrap();
    }
    (c, placed)
}

fn spares_in_zone(c: &Cluster<u32>, n: NodeIx) -> usize {
    let zone = c.node_spec(n).zone.clone();
    c.zone_nodes(&zone)
        .iter()
        .filter(|&&m| c.node_spec(m).state == NodeState::Ready && c.vm_count(m) == 0)
        .count()
}

fn ready_in_zone(c: &Cluster<u32>, n: NodeIx) -> usize {
    let zone = c.node_spec(n).zone.clone();
    c.zone_nodes(&zone)
        .iter()
        .filter(|&&m| c.node_spec(m).state == NodeState::Ready)
        .count()
}

/// Every hard rule but N+1, by brute force from the requests as placed.
fn check_rules(c: &Cluster<u32>, placed: &BTreeMap<u32, Request>) -> Result<(), String> {
    let mut used = vec![Res::ZERO; c.node_count()];
    for (k, r) in placed {
        let n = c.node_of(k).ok_or(format!("{k} lost"))?;
        if c.node_spec(n).zone != r.zone {
            return Err(format!("{k} in the wrong zone"));
        }
        used[n] = used[n].plus(&r.demand);
        let Some(g) = &r.group else { continue };
        for (k2, r2) in placed.range(k + 1..) {
            if r2.group.as_ref() != Some(g) {
                continue;
            }
            let n2 = c.node_of(k2).ok_or(format!("{k2} lost"))?;
            if n2 == n {
                return Err(format!("{k} and {k2} share a node"));
            }
            let (a, b) = (c.node_spec(n), c.node_spec(n2));
            // Racks are named within their zone.
            let same_rack = a.rack == b.rack && a.zone == b.zone;
            if same_rack && (r.spread == Spread::Rack || r2.spread == Spread::Rack) {
                return Err(format!("{k} and {k2} share a rack"));
            }
        }
    }
    for (n, u) in used.iter().enumerate() {
        if c.used(n) != *u {
            return Err(format!("node {n} counts {:?}, really {u:?}", c.used(n)));
        }
        if !c.capacity(n).covers(u) {
            return Err(format!("node {n} over capacity"));
        }
    }
    Ok(())
}

/// Carries out one step on `c` and checks every rule after it: the brute-force rules,
/// N+1 recomputed from scratch (no evacuation that succeeded fails now, unless the zone
/// has fewer than two Ready nodes), and the incremental N+1 agreeing with it.
fn step_and_check(
    c: &mut Cluster<u32>,
    placed: &BTreeMap<u32, Request>,
    s: &Step<u32>,
) -> Result<(), TestCaseError> {
    let mut before = c.full_n_plus_one();
    before.sort();
    let node = match s {
        Step::Move { from, to, .. } => {
            prop_assert_eq!(c.node_spec(*to).state, NodeState::Ready, "{:?}", s);
            prop_assert_eq!(
                c.node_spec(*from).zone.clone(),
                c.node_spec(*to).zone.clone()
            );
            *to
        }
        Step::Standby { node } => {
            prop_assert_eq!(c.vm_count(*node), 0, "standby of a used node");
            *node
        }
    };
    let enforce = ready_in_zone(c, node) >= 2;
    apply(c, s).map_err(|e| TestCaseError::fail(format!("{s:?}: {e}")))?;
    check_rules(c, placed).map_err(TestCaseError::fail)?;
    let mut after = c.full_n_plus_one();
    after.sort();
    prop_assert_eq!(
        &after,
        &c.n_plus_one_failures(),
        "incremental N+1 disagrees"
    );
    if enforce {
        for f in &after {
            prop_assert!(before.contains(f), "{:?} broke N+1 for node {}", s, f);
        }
    }
    Ok(())
}

proptest! {
    // About one case in four plans moves (the rest skip every goal, for reasons that are
    // checked too): enough cases that every kind of step is exercised.
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn no_drain_step_breaks_a_rule(
        (nodes, vms, states, spread_out) in pool(),
        which in any::<u8>(),
    ) {
        let (c, placed) = build(&nodes, &vms, &states, spread_out);
        let n = usize::from(which) % c.node_count();
        let state = c.node_spec(n).state;
        let plan = plan_drain(&c, n);
        prop_assert_eq!(&plan, &plan_drain(&c, n), "deterministic");
        let (steps, complete) = match plan {
            Ok(p) => (p.steps, true),
            Err(DrainError::Stuck { planned, stuck, .. }) => {
                for (vm, r) in &stuck {
                    prop_assert_eq!(c.node_of(vm), Some(n));
                    prop_assert!(r.wake.is_none_or(|w| c.node_spec(w).state == NodeState::Standby));
                }
                (planned, false)
            }
            Err(DrainError::NotRunning { state: s, .. }) => {
                prop_assert!(matches!(s, NodeState::Down | NodeState::Suspect | NodeState::Standby));
                prop_assert_eq!(s, state);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        let mut w = c.clone();
        if state == NodeState::Ready {
            w.set_state(n, NodeState::Draining).unwrap();
        }
        let mut seen = BTreeSet::new();
        for s in &steps {
            let Step::Move { vm, from, to, reason } = s else {
                return Err(TestCaseError::fail("a drain only moves"));
            };
            prop_assert_eq!(*from, n);
            prop_assert_ne!(*to, n);
            prop_assert_eq!(reason, &MoveReason::Drain);
            prop_assert!(seen.insert(*vm), "moved twice");
            step_and_check(&mut w, &placed, s)?;
        }
        if complete {
            prop_assert_eq!(w.vm_count(n), 0);
        }
    }

    #[test]
    fn no_consolidation_step_breaks_a_rule_and_plans_are_bounded(
        (nodes, vms, states, spread_out) in pool(),
        loads in proptest::collection::vec(proptest::option::weighted(0.9, (0u32..101, 70u32..96)), 12),
        moved in proptest::collection::vec(proptest::option::weighted(0.3, 0u64..7_200_000), 40),
        max_moves in 0usize..9,
        min_gain in prop_oneof![Just(0.0), Just(0.1), Just(0.25), Just(0.5)],
        spares in 0usize..3,
    ) {
        let (c, placed) = build(&nodes, &vms, &states, spread_out);
        let now_ms = 100 * MIN_MOVE_INTERVAL_MS;
        let inp = ConsolidateInput {
            now_ms,
            max_moves,
            min_gain,
            last_moved: moved
                .iter()
                .enumerate()
                .filter_map(|(i, m)| m.map(|ago| (i as u32, now_ms - ago)))
                .collect(),
            spares_per_zone: spares,
            load: loads
                .iter()
                .enumerate()
                .take(c.node_count())
                .filter_map(|(i, l)| {
                    l.map(|(busy, hw)| {
                        (i, NodeLoad { busy: f64::from(busy) / 100.0, high_water: f64::from(hw) / 100.0 })
                    })
                })
                .collect(),
        };
        let plan = plan_consolidate(&c, &inp);
        prop_assert_eq!(&plan, &plan_consolidate(&c, &inp), "deterministic");
        prop_assert!(plan.moves() <= max_moves, "{} moves", plan.moves());
        let emptied: BTreeSet<NodeIx> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Move { reason: MoveReason::Empty { node }, .. } => Some(*node),
                _ => None,
            })
            .collect();
        let mut w = c.clone();
        let mut seen = BTreeSet::new();
        let mut relief: BTreeMap<NodeIx, f64> = BTreeMap::new();
        for s in &plan.steps {
            if let Step::Move { vm, from, to, reason } = s {
                prop_assert!(seen.insert(*vm), "{} moved twice", vm);
                if let Some(t) = inp.last_moved.get(vm) {
                    prop_assert!(now_ms - t >= MIN_MOVE_INTERVAL_MS, "{} moved within the hour", vm);
                }
                prop_assert!(!emptied.contains(to), "a node being emptied took {}", vm);
                prop_assert!(inp.load.contains_key(from) && inp.load.contains_key(to));
                match reason {
                    MoveReason::Empty { node } => {
                        prop_assert_eq!(node, from);
                        prop_assert!(w.vm_count(*to) > 0, "emptied into an empty node");
                    }
                    MoveReason::Relieve { node, load_after, .. } => {
                        prop_assert_eq!(node, from);
                        relief.insert(*node, *load_after);
                    }
                    MoveReason::Drain => return Err(TestCaseError::fail("a drain move")),
                }
            }
            // Spares: a step never takes the zone below its count (nor further below).
            let node = match s {
                Step::Move { to, .. } => *to,
                Step::Standby { node } => *node,
            };
            let spares_before = spares_in_zone(&w, node);
            step_and_check(&mut w, &placed, s)?;
            let spares_after = spares_in_zone(&w, node);
            prop_assert!(
                spares_after >= spares_before.min(spares),
                "{:?}: {} spares, {} before", s, spares_after, spares_before
            );
            if let Step::Standby { node } = s {
                let zone = w.node_spec(*node).zone.clone();
                let spare = w
                    .zone_nodes(&zone)
                    .iter()
                    .filter(|&&m| w.node_spec(m).state == NodeState::Ready && w.vm_count(m) == 0)
                    .count();
                prop_assert!(spare >= spares, "standby left {} spares", spare);
            }
        }
        // No partial evacuation: every node the plan empties ends empty, and every hot
        // node it relieves ends at or below its mark.
        for n in &emptied {
            prop_assert_eq!(w.vm_count(*n), 0, "node {} left part full", n);
        }
        for (n, l) in &relief {
            prop_assert!(*l <= inp.load[n].high_water, "node {} still hot: {}", n, l);
        }
    }
}

#[test]
fn a_drain_that_would_break_n_plus_one_is_refused_with_the_reason() {
    // Three nodes of 8 GiB, 4 GiB used on each. Draining n0 leaves two: whichever takes
    // its VMs could no longer be evacuated onto the other.
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 8),
        spec("n1", "z", None, 16, 8),
        spec("n2", "z", None, 16, 8),
        spec("s", "z", None, 16, 8),
    ]);
    c.set_state(3, NodeState::Standby).unwrap();
    for i in 0..6u32 {
        c.insert(i, &req("z", 1, 2, None), (i / 2) as NodeIx)
            .unwrap();
    }
    assert!(c.full_n_plus_one().is_empty());
    let Err(DrainError::Stuck { planned, stuck, .. }) = plan_drain(&c, 0) else {
        panic!("nowhere to go without breaking N+1")
    };
    assert!(planned.is_empty());
    assert_eq!(stuck.len(), 2);
    let r = &stuck[0].1;
    assert!(matches!(r.nodes[1].2, Why::NPlusOne { failed: 1 }), "{r:?}");
    // On n2, n1's evacuation fails too (n1 is the first to fail).
    assert!(matches!(r.nodes[2].2, Why::NPlusOne { failed: 1 }), "{r:?}");
    assert_eq!(r.wake, Some(3));
    assert!(r.to_string().contains("N+1"), "{r}");
    let msg = plan_drain(&c, 0).unwrap_err().to_string();
    assert!(
        msg.contains("waking standby node s would make room"),
        "{msg}"
    );
    // Woken, s gives the room.
    c.set_state(3, NodeState::Ready).unwrap();
    let plan = plan_drain(&c, 0).unwrap();
    c.set_state(0, NodeState::Draining).unwrap();
    apply_all(&mut c, &plan.steps);
}

#[test]
fn a_drain_names_the_margin_it_costs() {
    // n1 and n2 can each be evacuated only into the empty n0: draining n0 costs both.
    let c = {
        let mut c = cluster(&[
            spec("n0", "z", None, 16, 8),
            spec("n1", "z", None, 16, 8),
            spec("n2", "z", None, 16, 8),
        ]);
        c.insert(1, &req("z", 1, 6, None), 1).unwrap();
        c.insert(2, &req("z", 1, 6, None), 2).unwrap();
        c
    };
    let plan = plan_drain(&c, 0).unwrap();
    assert!(plan.steps.is_empty());
    assert_eq!(plan.margin_lost, vec![1, 2]);
}

#[test]
fn a_plan_reads_as_steps_then_what_was_considered() {
    let mut c = light_four();
    let mut inp = input(&[(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.1)]);
    inp.last_moved.insert(1, inp.now_ms - 10 * MIN);
    let plan = plan_consolidate(&c, &inp);
    let text = plan.render(&c);
    assert!(text.contains("  1. move VM "), "{text}");
    assert!(text.contains("standby n1"), "{text}");
    assert!(
        text.contains("n0 (empty): skipped: VM 1 moved 10 min ago"),
        "{text}"
    );
    assert!(
        text.contains("n1 (empty): planned: 2 move(s), then standby"),
        "{text}"
    );
    c.set_state(0, NodeState::Draining).unwrap();
    let plan = plan_drain(&c, 0).unwrap();
    assert!(render_step(&c, &plan.steps[0]).ends_with(": drains it"));
}

#[test]
fn relief_takes_an_empty_node_only_beyond_the_spares() {
    let mut c = cluster(&[
        spec("n0", "z", None, 16, 64),
        spec("n1", "z", None, 16, 64),
        spec("n2", "z", None, 16, 64),
    ]);
    for i in 0..4u32 {
        c.insert(i, &req("z", 4, 8, None), 0).unwrap();
    }
    c.insert(10, &req("z", 4, 8, None), 1).unwrap();
    // n1 is too busy to take any of n0's load; n2 is the zone's only empty node.
    let mut inp = input(&[(0, 0.95), (1, 0.8), (2, 0.0)]);
    inp.min_gain = 0.1;
    inp.spares_per_zone = 1;
    let plan = plan_consolidate(&c, &inp);
    assert!(
        !plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::Move { to: 2, .. })),
        "{plan:#?}"
    );
    assert!(matches!(
        plan.considered[0].outcome,
        Outcome::Skipped(Skip::CannotRelieve { .. })
    ));
    inp.spares_per_zone = 0;
    let plan = plan_consolidate(&c, &inp);
    assert!(
        matches!(
            plan.steps.first(),
            Some(Step::Move {
                from: 0,
                to: 2,
                reason: MoveReason::Relieve { node: 0, .. },
                ..
            })
        ),
        "{plan:#?}"
    );
    apply_all(&mut c, &plan.steps);
}

proptest! {
    // One case in sixteen or so names a node to wake: enough cases to see a few dozen.
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn a_node_named_for_waking_makes_room_and_the_pool_is_left_as_it_was(
        (nodes, vms, states, spread_out) in pool(),
        (zone, cpu, mem, group) in (0u8..2, 1u8..9, 1u8..25, proptest::option::weighted(0.4, 0u8..4)),
        sleep in proptest::collection::vec(any::<u8>(), 0..8),
        keep in 0usize..25,
    ) {
        // Fewer VMs than the other properties place: room left awake and asleep.
        let (mut c, _) = build(&nodes, &vms[..keep.min(vms.len())], &states, spread_out);
        for s in sleep {
            let n = usize::from(s) % c.node_count();
            if c.vm_count(n) == 0 {
                c.set_state(n, NodeState::Standby).unwrap();
            }
        }
        let r = Request {
            zone: if zone == 0 { "a".into() } else { "b".into() },
            demand: Res::new(u64::from(cpu) * 1000, u64::from(mem) * GIB, 5),
            group: group.map(|g| format!("g{g}")),
            spread: Spread::Host,
            priority: 0,
        };
        let states_before: Vec<NodeState> = (0..c.node_count()).map(|n| c.node_spec(n).state).collect();
        let failing_before = c.n_plus_one_failures();
        let w = wake_for(&mut c, &1000, &r);
        prop_assert_eq!(&w, &wake_for(&mut c, &1000, &r), "deterministic");
        let states_after: Vec<NodeState> = (0..c.node_count()).map(|n| c.node_spec(n).state).collect();
        prop_assert_eq!(states_before, states_after);
        prop_assert_eq!(&failing_before, &c.n_plus_one_failures());
        match w {
            Wake::Fits(n) => prop_assert_eq!(c.place(1000, &r), Ok(n)),
            Wake::Node(s) => {
                prop_assert_eq!(c.node_spec(s).state, NodeState::Standby);
                prop_assert!(c.check(&1000, &r).is_err());
                c.set_state(s, NodeState::Ready).unwrap();
                prop_assert!(c.place(1000, &r).is_ok());
            }
            Wake::Nowhere(_) => {
                prop_assert!(c.check(&1000, &r).is_err());
                let standby: Vec<NodeIx> = c
                    .zone_nodes(&r.zone)
                    .iter()
                    .copied()
                    .filter(|&n| c.node_spec(n).state == NodeState::Standby)
                    .collect();
                for s in standby {
                    let mut w = c.clone();
                    w.set_state(s, NodeState::Ready).unwrap();
                    prop_assert!(w.check(&1000, &r).is_err(), "waking {} would do", s);
                }
            }
        }
    }
}
