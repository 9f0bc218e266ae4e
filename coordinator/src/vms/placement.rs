//! Where a new VM goes. For now: the Ready node of the VM's zone with the most free memory
//! that has room for it in every dimension of [`zy_common::resources`] (the bin-packer issue
//! replaces the choice, not the model). Pure: no I/O.

use std::collections::HashMap;

use zy_common::resources::Resources;
use zy_common::{NodeId, Zone};

/// What placement knows of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCap {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub ready: bool,
    /// What it offers to VMs, by the resource model.
    pub capacity: Resources,
}

/// What a VM needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    pub zone: Zone,
    /// Its cost by the resource model.
    pub need: Resources,
}

/// Why a VM has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("no node of zone {0} is ready: enroll one, or wait for it to report")]
    NoNode(Zone),
    #[error("{}", no_room(*zone, need, best))]
    NoRoom {
        zone: Zone,
        need: Resources,
        /// The most left in each dimension on any one ready node of the zone.
        best: Resources,
    },
}

/// Says what ran out: each resource the VM needs more of than any one node has left, or,
/// when every one would fit somewhere, that no node has all of them at once.
fn no_room(zone: Zone, need: &Resources, best: &Resources) -> String {
    let mut short = Vec::new();
    if need.vcpu_milli > best.vcpu_milli {
        short.push(format!(
            "{} vCPU(s) (the most left on one node: {})",
            fmt_vcpus(need.vcpu_milli),
            fmt_vcpus(best.vcpu_milli)
        ));
    }
    if need.memory_mib > best.memory_mib {
        short.push(format!(
            "{} MiB of memory with QEMU's own (the most left on one node: {} MiB)",
            need.memory_mib, best.memory_mib
        ));
    }
    if need.disk_gib > best.disk_gib {
        short.push(format!(
            "a {} GiB disk (the most disk left on one node: {} GiB)",
            need.disk_gib, best.disk_gib
        ));
    }
    if short.is_empty() {
        format!(
            "no node of zone {zone} has room for {} vCPU(s), {} MiB of memory (with QEMU's own) and {} GiB of disk at once, though each would fit on some node",
            fmt_vcpus(need.vcpu_milli),
            need.memory_mib,
            need.disk_gib
        )
    } else {
        format!(
            "no node of zone {zone} has room for {}",
            short.join(", nor for ")
        )
    }
}

fn fmt_vcpus(milli: u64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{:.1}", milli as f64 / 1000.0)
    }
}

/// Picks a node. `used` is what VMs already take of each node, by the resource model.
pub fn place(
    nodes: &[NodeCap],
    used: &HashMap<NodeId, Resources>,
    d: Demand,
) -> Result<NodeId, PlaceError> {
    let candidates: Vec<(&NodeCap, Resources)> = nodes
        .iter()
        .filter(|n| n.zone == d.zone && n.ready)
        .map(|n| {
            let u = used.get(&n.id).copied().unwrap_or_default();
            (n, n.capacity.left(&u))
        })
        .collect();
    if candidates.is_empty() {
        return Err(PlaceError::NoNode(d.zone));
    }
    candidates
        .iter()
        .filter(|(_, left)| left.fits(&Resources::default(), &d.need))
        .max_by(|a, b| {
            a.1.memory_mib
                .cmp(&b.1.memory_mib)
                .then_with(|| b.0.name.cmp(&a.0.name))
        })
        .map(|(n, _)| n.id)
        .ok_or_else(|| PlaceError::NoRoom {
            zone: d.zone,
            need: d.need,
            best: Resources {
                vcpu_milli: candidates.iter().map(|c| c.1.vcpu_milli).max().unwrap_or(0),
                memory_mib: candidates.iter().map(|c| c.1.memory_mib).max().unwrap_or(0),
                disk_gib: candidates.iter().map(|c| c.1.disk_gib).max().unwrap_or(0),
            },
        })
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
            ready: true,
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

    #[test]
    fn fits_within_the_zone_by_free_memory_and_vcpus() {
        let a = node("a", Zone::Intranet, 4096);
        let b = node("b", Zone::Intranet, 8192);
        let c = node("c", Zone::Extranet, 65536);
        let nodes = vec![a.clone(), b.clone(), c.clone()];
        let d = demand(1, 1024);
        assert_eq!(place(&nodes, &HashMap::new(), d), Ok(b.id));
        let used = HashMap::from([(
            b.id,
            Resources {
                memory_mib: 6000,
                ..Resources::default()
            },
        )]);
        assert_eq!(place(&nodes, &used, d), Ok(a.id));
        // b has the memory but no vCPUs left (4 CPUs x 4): a takes it.
        let used = HashMap::from([(
            b.id,
            Resources {
                vcpu_milli: 16_000,
                ..Resources::default()
            },
        )]);
        assert_eq!(place(&nodes, &used, d), Ok(a.id));
        let err = place(&nodes, &HashMap::new(), demand(1, 10_000)).unwrap_err();
        assert!(matches!(err, PlaceError::NoRoom { .. }));
        assert!(
            err.to_string().contains("10256 MiB") && err.to_string().contains("7680 MiB"),
            "{err}"
        );
        assert!(
            !err.to_string().contains("disk"),
            "only memory ran out: {err}"
        );
        let mut down = nodes.clone();
        for n in &mut down {
            n.ready = n.zone != Zone::Intranet;
        }
        assert_eq!(
            place(&down, &HashMap::new(), d),
            Err(PlaceError::NoNode(Zone::Intranet))
        );
    }

    #[test]
    fn a_refusal_names_the_resource_that_ran_out() {
        let nodes = vec![
            node("a", Zone::Intranet, 8192),
            node("b", Zone::Intranet, 4096),
        ];
        let big_disk = Demand {
            zone: Zone::Intranet,
            need: MODEL.cost(VmSize {
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 60_000,
            }),
        };
        let e = place(&nodes, &HashMap::new(), big_disk)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("60000 GiB disk") && !e.contains("memory") && !e.contains("vCPU"),
            "{e}"
        );
        let many_vcpus = demand(40, 256);
        let e = place(&nodes, &HashMap::new(), many_vcpus)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("40 vCPU(s)") && e.contains("16") && !e.contains("memory"),
            "{e}"
        );
        // Each fits somewhere, but not together: a has the memory, b the vCPUs.
        let used = HashMap::from([(
            nodes[0].id,
            Resources {
                vcpu_milli: 16_000,
                ..Resources::default()
            },
        )]);
        let e = place(&nodes, &used, demand(2, 6000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at once"), "{e}");
    }

    proptest! {
        /// Whatever the fleet, a placement is in the right zone, on a ready node, and fits in
        /// every dimension; a refusal means no such node exists.
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
                ready: *r,
                capacity: MODEL.capacity(2, *m, 10),
            }).collect();
            let used: HashMap<NodeId, Resources> = nodes.iter().zip(&mems).map(|(n, (_, _, _, v))| (n.id, Resources { vcpu_milli: *v, memory_mib: 0, disk_gib: 0 })).collect();
            let d = demand(vcpus, want);
            let fits = |n: &NodeCap| n.zone == Zone::Intranet && n.ready && n.capacity.fits(&used[&n.id], &d.need);
            match place(&nodes, &used, d) {
                Ok(id) => prop_assert!(fits(nodes.iter().find(|n| n.id == id).unwrap())),
                Err(_) => prop_assert!(!nodes.iter().any(fits)),
            }
        }
    }
}
