//! Where a new VM goes: the coordinator's nodes and VMs handed to the packer
//! ([`zy_packer`], which holds every rule and the score). This module only translates: the
//! resource model's capacities and costs into the packer's vectors, membership into the
//! packer's node states, and a refusal into the API's message. Pure: no I/O.

use zy_common::resources::Resources;
use zy_common::{NodeId, VmId, Zone};
use zy_packer::{Cluster, NodeSpec, NodeState, Policy, Request, Res, Spread, Why};

use crate::fleet::membership::NodeState as FleetState;
use crate::store::Admin;

/// What placement knows of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCap {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub state: NodeState,
    /// What it offers to VMs by the resource model, before CPU overcommit (the packer's
    /// policy applies that).
    pub capacity: Resources,
}

/// What a VM needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demand {
    pub zone: Zone,
    /// Its cost by the resource model.
    pub need: Resources,
    /// Its anti-affinity group.
    pub group: Option<String>,
}

/// The packer's view of a node: what ops asked of it first (a draining, maintained or
/// standby node takes nothing, whatever its heartbeats say), then its heartbeats.
pub fn packer_state(admin: Admin, state: FleetState, connected: bool) -> NodeState {
    match admin {
        Admin::Draining => NodeState::Draining,
        Admin::Maintenance => NodeState::Maintenance,
        Admin::Standby => NodeState::Standby,
        Admin::Active if state == FleetState::Ready && connected => NodeState::Ready,
        Admin::Active if state == FleetState::Down => NodeState::Down,
        Admin::Active => NodeState::Suspect,
    }
}

/// A VM that holds room on a node (tombstones included: a deleted VM may still run on a
/// node that is away).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub id: VmId,
    pub zone: Zone,
    pub need: Resources,
    pub node: NodeId,
    pub group: Option<String>,
    /// The room a migration holds on its destination (the VM also holds its own node's).
    pub arriving: bool,
}

/// Why a VM has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("no node of zone {0} is ready: enroll one, or wait for it to report")]
    NoNode(Zone),
    /// The packer's refusal, which names what ran out where.
    #[error("{0}")]
    NoRoom(String),
}

fn res(r: &Resources) -> Res {
    Res::new(r.vcpu_milli, r.memory_mib, r.disk_gib)
}

/// The pool as the packer sees it: nodes in name order (the zone's fixed order for N+1)
/// and every placed VM. Returns the cluster and the node ids by packer index.
pub fn cluster(
    policy: Policy,
    nodes: &[NodeCap],
    placed: impl IntoIterator<Item = Placed>,
) -> (Cluster<(VmId, bool)>, Vec<NodeId>) {
    let mut sorted: Vec<&NodeCap> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    let mut c = Cluster::new(policy);
    let mut ids = Vec::with_capacity(sorted.len());
    let mut ix = std::collections::HashMap::new();
    for n in sorted {
        let spec = NodeSpec {
            // Names are unique among enrolled nodes; the id keeps the packer's key unique
            // even if a stale record shared one.
            name: format!("{}/{}", n.name, n.id),
            zone: n.zone.as_str().to_string(),
            rack: None,
            capacity: res(&n.capacity),
            state: n.state,
            overcommit: None,
        };
        if let Ok(i) = c.add_node(spec) {
            ix.insert(n.id, i);
            ids.push(n.id);
        }
    }
    for p in placed {
        if let Some(&i) = ix.get(&p.node) {
            let req = request(p.zone, &p.need, p.group.clone());
            // The store is the truth: a placement is counted even where it breaks a rule.
            let _ = c.insert((p.id, p.arriving), &req, i);
        }
    }
    (c, ids)
}

fn request(zone: Zone, need: &Resources, group: Option<String>) -> Request {
    Request {
        zone: zone.as_str().to_string(),
        demand: res(need),
        group,
        spread: Spread::Host,
        priority: 0,
    }
}

/// The packer's refusal in the operator's words: node names as enrolled, not the packer's
/// keys.
fn operator_text(text: String, nodes: &[NodeCap]) -> String {
    let mut text = text;
    for n in nodes {
        text = text.replace(&format!("{}/{}", n.name, n.id), &n.name);
    }
    text
}

/// One node's reason, in words.
fn why_text(w: &Why, node: &str, failed: Option<&str>) -> String {
    match w {
        Why::State(s) => format!("node {node} is {} and takes no VMs", s.as_str()),
        Why::Short(short) => {
            let parts: Vec<String> = short
                .iter()
                .map(|&(d, need, left)| {
                    if d == zy_packer::CPU {
                        format!(
                            "vCPU (needs {}, {} left)",
                            zy_packer::fmt_milli(need),
                            zy_packer::fmt_milli(left)
                        )
                    } else if d == zy_packer::MEM {
                        format!("memory (needs {need} MiB, {left} MiB left)")
                    } else {
                        format!("disk (needs {need} GiB, {left} GiB left)")
                    }
                })
                .collect();
            format!("node {node} is short of {}", parts.join(", "))
        }
        Why::AntiAffinity { group, .. } => {
            format!("node {node} already holds a VM of anti-affinity group `{group}`")
        }
        Why::NPlusOne { .. } => format!(
            "moving it to node {node} would leave the VMs of node {} nowhere to go if that              node were lost (N+1)",
            failed.unwrap_or("?")
        ),
        Why::NotSampled => format!("node {node} was not looked at"),
        Why::Zone(z) => format!("node {node} is in zone {z}, the VM in another"),
    }
}

/// Where VM `id` may move, now on `from`: to node `to` if given, else the packer's choice.
/// Judged as the pool will be once the move is done (the VM off `from`), so that N+1,
/// room and anti-affinity hold afterwards; the VM keeps its room on `from` meanwhile,
/// which the caller's table already counts. `from` itself is never chosen.
pub fn check_move(
    policy: Policy,
    nodes: &[NodeCap],
    placed: impl IntoIterator<Item = Placed>,
    id: VmId,
    d: &Demand,
    from: NodeId,
    to: Option<NodeId>,
) -> Result<NodeId, PlaceError> {
    // The source takes nothing in the judgement, not even its own VM back.
    let nodes: Vec<NodeCap> = nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            if n.id == from && n.state == NodeState::Ready {
                n.state = NodeState::Draining;
            }
            n
        })
        .collect();
    let (mut c, ids) = cluster(policy, &nodes, placed.into_iter().filter(|p| p.id != id));
    let key = (id, false);
    let req = request(d.zone, &d.need, d.group.clone());
    let name_of = |i: usize| {
        nodes
            .iter()
            .find(|n| n.id == ids[i])
            .map(|n| n.name.clone())
            .unwrap_or_default()
    };
    match to {
        Some(to) => {
            let Some(i) = ids.iter().position(|n| *n == to) else {
                return Err(PlaceError::NoRoom(format!("node {to} is not enrolled")));
            };
            c.check_on(&key, &req, i).map(|()| to).map_err(|w| {
                let failed = match &w {
                    Why::NPlusOne { failed } => Some(name_of(*failed)),
                    _ => None,
                };
                PlaceError::NoRoom(why_text(&w, &name_of(i), failed.as_deref()))
            })
        }
        None => c
            .check(&key, &req)
            .map(|i| ids[i])
            .map_err(|r| PlaceError::NoRoom(operator_text(r.to_string(), &nodes))),
    }
}

/// The standby node whose waking would let VM `id` be placed under every rule (N+1
/// included), if it fits on no awake node.
pub fn wake_candidate(
    policy: Policy,
    nodes: &[NodeCap],
    placed: impl IntoIterator<Item = Placed>,
    id: VmId,
    d: &Demand,
) -> Option<NodeId> {
    let (mut c, ids) = cluster(policy, nodes, placed);
    let req = request(d.zone, &d.need, d.group.clone());
    match zy_packer::consolidate::wake_for(&mut c, &(id, false), &req) {
        zy_packer::consolidate::Wake::Node(i) => Some(ids[i]),
        _ => None,
    }
}

/// Picks a node for VM `id`.
pub fn place(
    policy: Policy,
    nodes: &[NodeCap],
    placed: impl IntoIterator<Item = Placed>,
    id: VmId,
    d: &Demand,
) -> Result<NodeId, PlaceError> {
    if !nodes
        .iter()
        .any(|n| n.zone == d.zone && n.state == NodeState::Ready)
    {
        return Err(PlaceError::NoNode(d.zone));
    }
    let (mut c, ids) = cluster(policy, nodes, placed);
    let req = request(d.zone, &d.need, d.group.clone());
    match c.check(&(id, false), &req) {
        Ok(i) => Ok(ids[i]),
        Err(refusal) => Err(PlaceError::NoRoom(operator_text(
            refusal.to_string(),
            nodes,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zy_common::resources::{VmSize, MODEL};

    fn node(name: &str, zone: Zone, mem: u64) -> NodeCap {
        NodeCap {
            id: NodeId::new_random(),
            name: name.into(),
            zone,
            state: NodeState::Ready,
            capacity: MODEL.capacity(4, mem, 100),
        }
    }

    fn demand(vcpus: u32, memory_mib: u64) -> Demand {
        Demand {
            zone: Zone::Intranet,
            need: MODEL.cost(VmSize {
                vcpus,
                memory_mib,
                disk_gib: 1,
            }),
            group: None,
        }
    }

    fn policy() -> Policy {
        Policy {
            overcommit: zy_packer::Overcommit([1000, 1000, 1000]),
            n_plus_one: false,
        }
    }

    fn used(node: &NodeCap, need: Resources) -> Placed {
        Placed {
            id: VmId::new_random(),
            zone: node.zone,
            need,
            node: node.id,
            group: None,
            arriving: false,
        }
    }

    #[test]
    fn fits_within_the_zone_on_a_used_node_first() {
        let a = node("a", Zone::Intranet, 4096);
        let b = node("b", Zone::Intranet, 8192);
        let c = node("c", Zone::Extranet, 65536);
        let nodes = vec![a.clone(), b.clone(), c.clone()];
        let d = demand(1, 1024);
        // Empty pool: the biggest node of the zone is opened.
        assert_eq!(
            place(policy(), &nodes, [], VmId::new_random(), &d),
            Ok(b.id)
        );
        // a is in use and has room: it takes the VM, b stays empty.
        let on_a = used(
            &a,
            MODEL.cost(VmSize {
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 1,
            }),
        );
        assert_eq!(
            place(policy(), &nodes, [on_a], VmId::new_random(), &d),
            Ok(a.id)
        );
        // a has the memory but no vCPUs left (4 CPUs x 4 = 16): b takes it.
        let full_cpu = used(
            &a,
            Resources {
                vcpu_milli: 16_000,
                ..Resources::default()
            },
        );
        assert_eq!(
            place(policy(), &nodes, [full_cpu], VmId::new_random(), &d),
            Ok(b.id)
        );
        let err = place(policy(), &nodes, [], VmId::new_random(), &demand(1, 10_000)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no node of zone intranet has room"), "{text}");
        assert!(
            text.contains("10256 MiB") && text.contains("7680"),
            "{text}"
        );
        assert!(!text.contains("disk"), "only memory ran out: {text}");
        assert!(
            !text.contains('/'),
            "node names as the operator knows them: {text}"
        );
        let mut down = nodes.clone();
        for n in &mut down {
            if n.zone == Zone::Intranet {
                n.state = NodeState::Down;
            }
        }
        assert_eq!(
            place(policy(), &down, [], VmId::new_random(), &d),
            Err(PlaceError::NoNode(Zone::Intranet))
        );
    }

    #[test]
    fn n_plus_one_is_on_by_default_and_names_itself() {
        let nodes = vec![
            node("a", Zone::Intranet, 8192),
            node("b", Zone::Intranet, 8192),
        ];
        let d = demand(1, 3000);
        let mut placed = Vec::new();
        let p = Policy {
            overcommit: zy_packer::Overcommit([4000, 1000, 1000]),
            ..Policy::default()
        };
        for _ in 0..2 {
            let id = VmId::new_random();
            let n = place(p, &nodes, placed.clone(), id, &d).unwrap();
            placed.push(Placed {
                id,
                zone: Zone::Intranet,
                need: d.need,
                node: n,
                group: None,
                arriving: false,
            });
        }
        // Two of 3 GiB fit beside each other on either node; a third would leave one node's
        // VMs nowhere to go.
        let e = place(p, &nodes, placed, VmId::new_random(), &d).unwrap_err();
        assert!(e.to_string().contains("N+1"), "{e}");
    }

    #[test]
    fn anti_affinity_and_migrations_hold_room_where_they_should() {
        let a = node("a", Zone::Intranet, 8192);
        let b = node("b", Zone::Intranet, 8192);
        let x = node("x", Zone::Extranet, 8192);
        let nodes = vec![a.clone(), b.clone(), x.clone()];
        let d = Demand {
            group: Some("portal".into()),
            ..demand(1, 1024)
        };
        let first = Placed {
            group: Some("portal".into()),
            ..used(&a, d.need)
        };
        // The pair's second half never joins the first, though a is used and has room.
        assert_eq!(
            place(policy(), &nodes, [first.clone()], VmId::new_random(), &d),
            Ok(b.id)
        );
        // A move goes to the packer's choice, never back to its own node, or to a named
        // node; another zone and a node holding its group are refused with the reason.
        let plain = demand(1, 1024);
        let v = used(&a, plain.need);
        let m = |to| check_move(policy(), &nodes, [v.clone()], v.id, &plain, a.id, to);
        assert_eq!(m(None), Ok(b.id));
        assert_eq!(m(Some(b.id)), Ok(b.id));
        let e = m(Some(x.id)).unwrap_err().to_string();
        assert!(e.contains("zone"), "{e}");
        let e = m(Some(a.id)).unwrap_err().to_string();
        assert!(e.contains("draining") || e.contains("takes no VMs"), "{e}");
        let grouped = Placed {
            group: Some("portal".into()),
            ..used(&b, d.need)
        };
        let e = check_move(
            policy(),
            &nodes,
            [first.clone(), grouped],
            first.id,
            &d,
            a.id,
            Some(b.id),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("anti-affinity group `portal`"), "{e}");
        // A migration under way holds its room on the destination too: b, with 7 of 8 GiB
        // held by an arriving VM, has no room for another 2 GiB.
        let arriving = Placed {
            arriving: true,
            ..used(&b, demand(1, 7000).need)
        };
        let home = Placed {
            id: arriving.id,
            ..used(&a, demand(1, 7000).need)
        };
        let e = place(
            policy(),
            &nodes,
            [home, arriving],
            VmId::new_random(),
            &demand(1, 2048),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory"), "{e}");
    }

    #[test]
    fn a_standby_node_is_named_for_waking_only_when_its_room_is_needed() {
        let a = node("a", Zone::Intranet, 4096);
        let mut s = node("s", Zone::Intranet, 8192);
        s.state = NodeState::Standby;
        let nodes = vec![a.clone(), s.clone()];
        // Fits on a: nothing to wake.
        assert_eq!(
            wake_candidate(policy(), &nodes, [], VmId::new_random(), &demand(1, 1024)),
            None
        );
        // Only s is big enough: it is named, and nothing else changes.
        let big = demand(1, 6000);
        assert!(place(policy(), &nodes, [], VmId::new_random(), &big).is_err());
        assert_eq!(
            wake_candidate(policy(), &nodes, [], VmId::new_random(), &big),
            Some(s.id)
        );
        // Too big for any node: nothing to wake.
        assert_eq!(
            wake_candidate(policy(), &nodes, [], VmId::new_random(), &demand(1, 60_000)),
            None
        );
    }

    #[test]
    fn what_ops_asked_of_a_node_comes_before_its_heartbeats() {
        use FleetState as F;
        assert_eq!(
            packer_state(Admin::Active, F::Ready, true),
            NodeState::Ready
        );
        assert_eq!(
            packer_state(Admin::Active, F::Ready, false),
            NodeState::Suspect
        );
        assert_eq!(packer_state(Admin::Active, F::Down, false), NodeState::Down);
        assert_eq!(
            packer_state(Admin::Draining, F::Ready, true),
            NodeState::Draining
        );
        assert_eq!(
            packer_state(Admin::Standby, F::Down, false),
            NodeState::Standby
        );
        assert_eq!(
            packer_state(Admin::Maintenance, F::Ready, true),
            NodeState::Maintenance
        );
    }

    proptest! {
        /// Whatever the fleet, a placement is in the right zone, on a ready node, and fits in
        /// every dimension; a refusal means no such node exists (N+1 off).
        #[test]
        fn placements_respect_zone_readiness_and_room(
            mems in proptest::collection::vec((1024u64..65536, any::<bool>(), any::<bool>(), 0u64..20_000), 1..20),
            want in 64u64..16384,
            vcpus in 1u32..16,
        ) {
            let nodes: Vec<NodeCap> = mems.iter().enumerate().map(|(i, (m, z, r, _))| NodeCap {
                id: NodeId::new_random(),
                name: format!("n{i}"),
                zone: if *z { Zone::Intranet } else { Zone::Extranet },
                state: if *r { NodeState::Ready } else { NodeState::Suspect },
                capacity: MODEL.capacity(2, *m, 10),
            }).collect();
            let placed: Vec<Placed> = nodes.iter().zip(&mems).map(|(n, (_, _, _, v))| used(n, Resources { vcpu_milli: *v, memory_mib: 0, disk_gib: 0 })).collect();
            let d = demand(vcpus, want);
            let fits = |n: &NodeCap| {
                let u = placed.iter().find(|p| p.node == n.id).unwrap().need;
                n.zone == Zone::Intranet && n.state == NodeState::Ready && n.capacity.fits(&u, &d.need)
            };
            match place(policy(), &nodes, placed.clone(), VmId::new_random(), &d) {
                Ok(id) => prop_assert!(fits(nodes.iter().find(|n| n.id == id).unwrap())),
                Err(_) => prop_assert!(!nodes.iter().any(fits)),
            }
        }
    }
}
