//! Where a new VM goes: the coordinator's nodes and VMs handed to the packer
//! ([`zy_packer`], which holds every rule and the score). This module only translates: the
//! resource model's capacities and costs into the packer's vectors, membership into the
//! packer's node states, and a refusal into the API's message. Pure: no I/O.

use zy_common::resources::Resources;
use zy_common::{NodeId, VmId, Zone};
use zy_packer::{Cluster, NodeSpec, NodeState, Policy, Request, Res, Spread};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    pub zone: Zone,
    /// Its cost by the resource model.
    pub need: Resources,
}

/// A VM that holds room on a node (tombstones included: a deleted VM may still run on a
/// node that is away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub id: VmId,
    pub zone: Zone,
    pub need: Resources,
    pub node: NodeId,
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
) -> (Cluster<VmId>, Vec<NodeId>) {
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
            let req = Request {
                zone: p.zone.as_str().to_string(),
                demand: res(&p.need),
                group: None,
                spread: Spread::Host,
                priority: 0,
            };
            // The store is the truth: a placement is counted even where it breaks a rule.
            let _ = c.insert(p.id, &req, i);
        }
    }
    (c, ids)
}

/// Picks a node for VM `id`.
pub fn place(
    policy: Policy,
    nodes: &[NodeCap],
    placed: impl IntoIterator<Item = Placed>,
    id: VmId,
    d: Demand,
) -> Result<NodeId, PlaceError> {
    if !nodes
        .iter()
        .any(|n| n.zone == d.zone && n.state == NodeState::Ready)
    {
        return Err(PlaceError::NoNode(d.zone));
    }
    let (mut c, ids) = cluster(policy, nodes, placed);
    let req = Request {
        zone: d.zone.as_str().to_string(),
        demand: res(&d.need),
        group: None,
        spread: Spread::Host,
        priority: 0,
    };
    match c.check(&id, &req) {
        Ok(i) => Ok(ids[i]),
        Err(refusal) => {
            // The packer names nodes by its own key: show the operator's names.
            let mut text = refusal.to_string();
            for n in nodes {
                text = text.replace(&format!("{}/{}", n.name, n.id), &n.name);
            }
            Err(PlaceError::NoRoom(text))
        }
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
        assert_eq!(place(policy(), &nodes, [], VmId::new_random(), d), Ok(b.id));
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
            place(policy(), &nodes, [on_a], VmId::new_random(), d),
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
            place(policy(), &nodes, [full_cpu], VmId::new_random(), d),
            Ok(b.id)
        );
        let err = place(policy(), &nodes, [], VmId::new_random(), demand(1, 10_000)).unwrap_err();
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
            place(policy(), &down, [], VmId::new_random(), d),
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
            let n = place(p, &nodes, placed.clone(), id, d).unwrap();
            placed.push(Placed {
                id,
                zone: Zone::Intranet,
                need: d.need,
                node: n,
            });
        }
        // Two of 3 GiB fit beside each other on either node; a third would leave one node's
        // VMs nowhere to go.
        let e = place(p, &nodes, placed, VmId::new_random(), d).unwrap_err();
        assert!(e.to_string().contains("N+1"), "{e}");
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
            match place(policy(), &nodes, placed.clone(), VmId::new_random(), d) {
                Ok(id) => prop_assert!(fits(nodes.iter().find(|n| n.id == id).unwrap())),
                Err(_) => prop_assert!(!nodes.iter().any(fits)),
            }
        }
    }
}
