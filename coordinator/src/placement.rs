//! Where a new VM goes. For now: the Ready node of the VM's zone with the most free memory
//! that also has the disk it needs (the bin-packer issue replaces this). Pure: no I/O.

use std::collections::HashMap;

use zy_common::{NodeId, Zone};

/// Memory kept for the host itself on every node.
pub const HOST_RESERVE_MIB: u64 = 512;

/// What placement knows of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCap {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub ready: bool,
    pub memory_mib: u64,
    pub disk_free_gib: u64,
}

/// What a VM needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    pub zone: Zone,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// Why a VM has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("no node of zone {0} is ready: enroll one, or wait for it to report")]
    NoNode(Zone),
    #[error("no node of zone {zone} has room for {memory_mib} MiB and {disk_gib} GiB of disk: the most free memory on one node is {best_free_mib} MiB")]
    NoRoom {
        zone: Zone,
        memory_mib: u64,
        disk_gib: u64,
        best_free_mib: u64,
    },
}

/// Picks a node. `used` is memory (MiB) and disk (GiB) already given to VMs per node.
pub fn place(
    nodes: &[NodeCap],
    used: &HashMap<NodeId, (u64, u64)>,
    d: Demand,
) -> Result<NodeId, PlaceError> {
    let candidates: Vec<(&NodeCap, u64, u64)> = nodes
        .iter()
        .filter(|n| n.zone == d.zone && n.ready)
        .map(|n| {
            let (mem, disk) = used.get(&n.id).copied().unwrap_or((0, 0));
            (
                n,
                n.memory_mib
                    .saturating_sub(HOST_RESERVE_MIB)
                    .saturating_sub(mem),
                n.disk_free_gib.saturating_sub(disk),
            )
        })
        .collect();
    if candidates.is_empty() {
        return Err(PlaceError::NoNode(d.zone));
    }
    candidates
        .iter()
        .filter(|(_, mem, disk)| *mem >= d.memory_mib && *disk >= d.disk_gib)
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.name.cmp(&a.0.name)))
        .map(|(n, _, _)| n.id)
        .ok_or(PlaceError::NoRoom {
            zone: d.zone,
            memory_mib: d.memory_mib,
            disk_gib: d.disk_gib,
            best_free_mib: candidates.iter().map(|c| c.1).max().unwrap_or(0),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str, zone: Zone, mem: u64) -> NodeCap {
        NodeCap {
            id: NodeId::new_random(),
            name: name.into(),
            zone,
            ready: true,
            memory_mib: mem,
            disk_free_gib: 100,
        }
    }

    #[test]
    fn fits_within_the_zone_by_free_memory() {
        let a = node("a", Zone::Intranet, 4096);
        let b = node("b", Zone::Intranet, 8192);
        let c = node("c", Zone::Extranet, 65536);
        let nodes = vec![a.clone(), b.clone(), c.clone()];
        let d = Demand {
            zone: Zone::Intranet,
            memory_mib: 1024,
            disk_gib: 1,
        };
        assert_eq!(place(&nodes, &HashMap::new(), d), Ok(b.id));
        let used = HashMap::from([(b.id, (6000, 0))]);
        assert_eq!(place(&nodes, &used, d), Ok(a.id));
        let big = Demand {
            memory_mib: 10_000,
            ..d
        };
        assert!(matches!(
            place(&nodes, &HashMap::new(), big),
            Err(PlaceError::NoRoom { .. })
        ));
        let mut down = nodes.clone();
        for n in &mut down {
            n.ready = n.zone != Zone::Intranet;
        }
        assert_eq!(
            place(&down, &HashMap::new(), d),
            Err(PlaceError::NoNode(Zone::Intranet))
        );
    }

    proptest! {
        /// Whatever the fleet, a placement is in the right zone, on a ready node, and fits.
        #[test]
        fn placements_respect_zone_readiness_and_room(
            mems in proptest::collection::vec((1024u64..65536, any::<bool>(), any::<bool>()), 1..20),
            want in 64u64..16384,
        ) {
            let nodes: Vec<NodeCap> = mems.iter().enumerate().map(|(i, (m, z, r))| NodeCap {
                id: NodeId::new_random(),
                name: format!("n{i}"),
                zone: if *z { Zone::Intranet } else { Zone::Extranet },
                ready: *r,
                memory_mib: *m,
                disk_free_gib: 10,
            }).collect();
            let d = Demand { zone: Zone::Intranet, memory_mib: want, disk_gib: 1 };
            if let Ok(id) = place(&nodes, &HashMap::new(), d) {
                let n = nodes.iter().find(|n| n.id == id).unwrap();
                prop_assert!(n.zone == Zone::Intranet && n.ready);
                prop_assert!(n.memory_mib - HOST_RESERVE_MIB >= want);
            } else {
                prop_assert!(!nodes.iter().any(|n| n.zone == Zone::Intranet && n.ready && n.memory_mib.saturating_sub(HOST_RESERVE_MIB) >= want));
            }
        }
    }
}
