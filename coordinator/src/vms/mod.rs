//! VMs at the coordinator: asked for through the API, placed on a node of their zone, given
//! an address on their zone's network, and brought to what was asked by the reconciler
//! ([`reconcile`]) through durable operations ([`crate::ops`]).
//!
//! The VM table lives in memory behind one mutex held only for map updates (never across
//! I/O); every change is a batch computed from it and handed to the committer ([`commit`]),
//! which writes the batches waiting together in one transaction and one fsync, each
//! compare-and-swap on its rows' revisions, then applies them to memory. A writer that lost
//! a race retries from what the store now holds.
//!
//! Each zone has its own network (a VXLAN VNI and a subnet); the two never share either.

pub mod commit;
pub mod console;
pub mod guest;
pub mod images;
pub mod migrate;
pub mod placement;
pub mod reconcile;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use tracing::info;
use zy_api::{Accepted, CreateVm, OpId, OpKind, OpView, StepView, VmDesired, VmView};
use zy_common::image::ImageKind;
use zy_common::proto::{WireNic, WireVm};
use zy_common::time::{now_millis, rfc3339};
use zy_common::vm::{Generation, VmState};
use zy_common::{NodeId, VmId, Zone};

use crate::api::ApiError;
use crate::ops::{OpRec, OpState};
use crate::store::{Store, StoreError, VmRec, VmWrite};
use crate::Coordinator;
use placement::{Demand, NodeCap, Placed};
use zy_common::resources::VmSize;

/// A zone's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneNet {
    pub vni: u32,
    pub base: Ipv4Addr,
    pub prefix: u8,
}

/// The network of each zone: separate VNIs and subnets, never shared.
pub fn zone_net(zone: Zone) -> ZoneNet {
    match zone {
        Zone::Extranet => ZoneNet {
            vni: 10,
            base: Ipv4Addr::new(10, 210, 0, 0),
            prefix: 16,
        },
        Zone::Intranet => ZoneNet {
            vni: 20,
            base: Ipv4Addr::new(10, 220, 0, 0),
            prefix: 16,
        },
    }
}

/// The lowest free address of a network (from .2: .1 is kept for a gateway), never the
/// zone's configured gateway.
pub fn allocate_ip(
    net: ZoneNet,
    gateway: Option<Ipv4Addr>,
    taken: &[Ipv4Addr],
) -> Option<Ipv4Addr> {
    let base = u32::from(net.base);
    let size = 1u32 << (32 - u32::from(net.prefix));
    (2..size - 1)
        .map(|i| Ipv4Addr::from(base + i))
        .find(|ip| !taken.contains(ip) && Some(*ip) != gateway)
}

/// VMs that hold the address their zone's configured gateway has: the coordinator does not
/// start with such a config (the gateway would answer for a VM, or the VM for it).
pub fn gateway_conflicts(config: &crate::config::CoordinatorConfig, vms: &[VmRec]) -> Vec<String> {
    // Tombstones too: a deleted VM may still run on a node that is away.
    vms.iter()
        .filter(|v| config.zones.get(v.zone).gateway == Some(v.ip))
        .map(|v| {
            format!(
                "VM {} ({}) holds {}, the gateway of zone {}",
                v.name, v.id, v.ip, v.zone
            )
        })
        .collect()
}

/// The operation's view.
pub fn op_view(coord: &Coordinator, op: &OpRec) -> OpView {
    let name = |n: NodeId| {
        coord
            .fleet
            .find(&n.to_string())
            .map(|l| l.record.name)
            .unwrap_or_else(|| n.to_string())
    };
    OpView {
        id: op.id,
        kind: op.kind,
        vm: op.vm,
        vm_name: op.vm_name.clone(),
        state: op.state.name().into(),
        reason: match &op.state {
            OpState::Failed(r) => Some(r.clone()),
            _ => None,
        },
        steps: op
            .steps
            .iter()
            .map(|s| StepView {
                name: s.name.clone(),
                done_at: s.done_at_ms.map(rfc3339),
            })
            .collect(),
        current_step: op.current,
        created_at: rfc3339(op.created_at_ms),
        updated_at: rfc3339(op.updated_at_ms),
        migration: op.migration.as_ref().map(|m| zy_api::MigrationView {
            from: name(m.from),
            to: name(m.to),
            cause: m.cause.as_str().into(),
            downtime_ms: m.downtime_ms,
            total_ms: m.total_ms,
            aborting: m.aborting.clone(),
            progress: op
                .is_running()
                .then(|| coord.migrations.progress(op.id))
                .flatten(),
        }),
    }
}

/// The state shown for a VM: what its node last said, or pending.
fn shown_state(v: &VmRec) -> (String, Option<String>, u64) {
    if v.desired == VmDesired::Deleted {
        return ("deleting".into(), None, v.created_at_ms);
    }
    match &v.observed {
        None => ("pending".into(), None, v.created_at_ms),
        Some(o) => (
            o.state.name().into(),
            match &o.state {
                VmState::Failed(r) => Some(r.clone()),
                _ => None,
            },
            o.at_ms,
        ),
    }
}

/// Every node as placement sees it.
pub(crate) fn node_caps(coord: &Coordinator) -> Vec<NodeCap> {
    let model = coord.config.resource_model();
    // The packer applies the CPU overcommit: capacities go to it as the host has them.
    let host = zy_common::resources::ResourceModel {
        cpu_overcommit_milli: 1000,
        ..model
    };
    coord
        .fleet
        .snapshot()
        .into_iter()
        .map(|n| NodeCap {
            id: n.record.id,
            name: n.record.name.clone(),
            zone: n.record.zone,
            // A node whose power command runs takes nothing meanwhile.
            state: if coord.nodeadmin.is_powering(n.record.id) {
                zy_packer::NodeState::Maintenance
            } else {
                placement::packer_state(n.record.admin, n.record.state, n.session.is_some())
            },
            capacity: n
                .record
                .inventory
                .as_ref()
                .map(|i| host.capacity(i.cpus, i.memory_bytes >> 20, i.disk_free_bytes >> 30))
                .unwrap_or_default(),
        })
        .collect()
}

/// Every VM's hold on a node, as placement counts it: tombstones too (a deleted VM may
/// still run on a node that is away), and a migrating VM on both of its nodes.
pub(crate) fn placed_vms(t: &Table, model: &zy_common::resources::ResourceModel) -> Vec<Placed> {
    let mut out = Vec::with_capacity(t.vms.len());
    for v in t.vms.values() {
        let Some(node) = v.node else { continue };
        let p = Placed {
            id: v.id,
            zone: v.zone,
            need: model.cost(v.size()),
            node,
            group: v.anti_affinity.clone(),
            arriving: false,
        };
        if let Some(to) = v.migrating_to {
            out.push(Placed {
                node: to,
                arriving: true,
                ..p.clone()
            });
        }
        out.push(p);
    }
    out
}

fn view(coord: &Coordinator, v: &VmRec, op: Option<OpId>) -> VmView {
    let node = v
        .node
        .and_then(|n| coord.fleet.find(&n.to_string()))
        .map(|n| n.record.name);
    let (state, reason, since) = shown_state(v);
    VmView {
        id: v.id,
        name: v.name.clone(),
        zone: v.zone,
        vcpus: v.vcpus,
        memory_mib: v.memory_mib,
        disk_gib: v.disk_gib,
        image: v.image.clone(),
        node,
        node_id: v.node,
        desired: v.desired,
        generation: v.generation.0,
        node_intent: v.observed.as_ref().map(|o| o.intent.0),
        observed_generation: v.observed.as_ref().map(|o| o.generation.0),
        state,
        reason,
        ip: v.ip,
        mac: v
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        pid: v.observed.as_ref().and_then(|o| o.pid),
        state_since: rfc3339(since),
        created_at: rfc3339(v.created_at_ms),
        operation: op,
        ssh_keys: v.ssh_keys.iter().map(|k| k.to_string()).collect(),
        user_data_bytes: v.user_data.as_ref().map(|u| u.len() as u64),
        anti_affinity: v.anti_affinity.clone(),
        migrating_to: v.migrating_to.map(|n| {
            coord
                .fleet
                .find(&n.to_string())
                .map(|n| n.record.name)
                .unwrap_or_else(|| n.to_string())
        }),
    }
}

/// The VM table and the operations, as the store holds them. Ordered maps: whatever is
/// planned from the table comes out in the same order every time (the simulation's
/// reproducibility by seed depends on it, and so does reading a log twice).
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub vms: BTreeMap<VmId, VmRec>,
    pub ops: BTreeMap<OpId, OpRec>,
}

impl Table {
    /// The operation under way on a VM.
    pub fn running_op(&self, vm: VmId) -> Option<&OpRec> {
        self.ops.values().find(|o| o.vm == vm && o.is_running())
    }

    /// A VM by id or name; a live VM wins over a tombstone of the same name.
    pub fn find(&self, key: &str) -> Option<&VmRec> {
        if let Ok(id) = key.parse::<VmId>() {
            return self.vms.get(&id);
        }
        let mut named = self.vms.values().filter(|v| v.name == key);
        let first = named.next()?;
        if first.desired != VmDesired::Deleted {
            return Some(first);
        }
        Some(
            named
                .find(|v| v.desired != VmDesired::Deleted)
                .unwrap_or(first),
        )
    }
}

impl Table {
    /// Applies a batch as the store would: every row compare-and-swap on its revision, all
    /// or nothing. (The in-memory twin of [`crate::store::Store::commit`], for simulations.)
    pub fn commit(&mut self, b: &Batch) -> Result<(), String> {
        for w in &b.vms {
            let (id, expect) = match w {
                VmWrite::Put { rec, expect } => (rec.id, *expect),
                VmWrite::Remove { id, expect } => (*id, *expect),
            };
            let found = self.vms.get(&id).map(|v| v.rev);
            if found != expect {
                return Err(format!(
                    "VM {id}: stored revision {found:?}, expected {expect:?}"
                ));
            }
        }
        for op in &b.ops {
            let found = self.ops.get(&op.id).map_or(0, |o| o.rev);
            if found + 1 != op.rev {
                return Err(format!(
                    "operation {}: stored revision {found}, written {}",
                    op.id, op.rev
                ));
            }
        }
        for w in &b.vms {
            match w {
                VmWrite::Put { rec, .. } => {
                    self.vms.insert(rec.id, (**rec).clone());
                }
                VmWrite::Remove { id, .. } => {
                    self.vms.remove(id);
                }
            }
        }
        for op in &b.ops {
            self.ops.insert(op.id, op.clone());
        }
        Ok(())
    }
}

/// A batch of writes, committed in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub vms: Vec<VmWrite>,
    pub ops: Vec<OpRec>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.ops.is_empty()
    }

    /// Writes a changed VM (its revision bumped here).
    pub fn put(&mut self, old: Option<&VmRec>, mut new: VmRec) {
        new.rev = old.map_or(1, |o| o.rev + 1);
        self.vms.push(VmWrite::Put {
            rec: Box::new(new),
            expect: old.map(|o| o.rev),
        });
    }

    /// Forgets a VM.
    pub fn remove(&mut self, old: &VmRec) {
        self.vms.push(VmWrite::Remove {
            id: old.id,
            expect: Some(old.rev),
        });
    }

    /// Writes a changed operation (its revision bumped here if the caller did not).
    pub fn op(&mut self, old: Option<&OpRec>, mut new: OpRec) {
        new.rev = old.map_or(1, |o| o.rev + 1);
        self.ops.push(new);
    }
}

/// The VMs of the site, in memory; every change is written to the store first.
#[derive(Debug)]
pub struct Vms {
    table: Arc<std::sync::Mutex<Table>>,
    committer: commit::Committer,
    /// Wakes the reconciler (a new intent, an observation).
    pub wake: Arc<tokio::sync::Notify>,
}

impl Vms {
    /// The VMs and operations the store holds; changes are written to `store`, up to
    /// [`commit::MAX_GROUP`] batches in one transaction.
    pub fn new(store: Arc<Store>, vms: Vec<VmRec>, ops: Vec<OpRec>) -> std::io::Result<Self> {
        Self::with_max_group(store, vms, ops, commit::MAX_GROUP)
    }

    /// As [`Vms::new`], with at most `max_group` batches in one transaction (1: each batch
    /// is a transaction and an fsync of its own, as before group commit).
    pub fn with_max_group(
        store: Arc<Store>,
        vms: Vec<VmRec>,
        ops: Vec<OpRec>,
        max_group: usize,
    ) -> std::io::Result<Self> {
        let table = Arc::new(std::sync::Mutex::new(Table {
            vms: vms.into_iter().map(|v| (v.id, v)).collect(),
            ops: ops.into_iter().map(|o| (o.id, o)).collect(),
        }));
        let wake = Arc::new(tokio::sync::Notify::new());
        let committer = commit::Committer::start(
            commit::Shared {
                store,
                table: table.clone(),
                wake: wake.clone(),
            },
            max_group,
        )?;
        Ok(Self {
            table,
            committer,
            wake,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the table (the lock is held only to copy).
    pub fn snapshot(&self) -> Table {
        self.lock().clone()
    }

    /// Runs `f` on the table under the lock (no I/O in `f`).
    pub fn with<T>(&self, f: impl FnOnce(&Table) -> T) -> T {
        f(&self.lock())
    }

    /// Names of the live (not deleted) VMs placed on `node`.
    pub fn on_node(&self, node: NodeId) -> Vec<String> {
        let mut names: Vec<String> = self
            .lock()
            .vms
            .values()
            .filter(|v| v.node == Some(node) && v.desired != VmDesired::Deleted)
            .map(|v| v.name.clone())
            .collect();
        names.sort();
        names
    }

    /// A VM by id or name.
    pub fn find(&self, key: &str) -> Result<VmRec, ApiError> {
        self.lock().find(key).cloned().ok_or_else(|| {
            ApiError::not_found(format!(
                "no VM `{}`; `zy vm ls` lists them",
                zy_common::ids::truncate_for_error(key)
            ))
        })
    }

    /// How many batches were committed in how many transactions.
    pub fn commit_stats(&self) -> commit::CommitStats {
        self.committer.stats()
    }

    /// Computes a batch from the table with `plan` and commits it, compare-and-swap on every
    /// row; a writer that lost a race to another retries from what the store holds now.
    /// Returns what `plan` returned with the batch, once the batch is durable and in memory.
    pub async fn write<T>(
        &self,
        mut plan: impl FnMut(&Table) -> Result<(Batch, T), ApiError>,
    ) -> Result<T, ApiError> {
        for _ in 0..16 {
            let (batch, out) = self.with(&mut plan)?;
            if batch.is_empty() {
                return Ok(out);
            }
            match self
                .committer
                .submit(batch)
                .await
                .map_err(ApiError::internal)?
            {
                Ok(()) => return Ok(out),
                // The committer has taken the stored row into memory.
                Err(e @ (StoreError::Conflict { .. } | StoreError::OpConflict { .. })) => {
                    tracing::debug!(error = %e, "a VM write lost a race; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "contended",
            "the VM is being changed by many writers at once; try again",
        ))
    }
}

/// Computes a batch from the table with `plan` and commits it ([`Vms::write`]).
pub async fn write<T>(
    coord: &Coordinator,
    plan: impl FnMut(&Table) -> Result<(Batch, T), ApiError>,
) -> Result<T, ApiError> {
    coord.vms.write(plan).await
}

/// The underlay address of a connected node.
fn node_ip(coord: &Coordinator, node: NodeId) -> Option<Ipv4Addr> {
    session_ip(&coord.fleet.session(node)?)
}

/// The underlay address a session comes from.
pub fn session_ip(s: &crate::fleet::Session) -> Option<Ipv4Addr> {
    match s.remote.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}

/// Whether a node has a VM that boots from this blob, placed there or migrating there (a
/// destination fetches the base image it does not have yet): a node gets no other blob.
pub fn needs_blob(t: &Table, node: NodeId, hash: &zy_common::blob::BlobHash) -> bool {
    t.vms.values().any(|v| {
        (v.node == Some(node) || v.migrating_to == Some(node))
            && v.desired != VmDesired::Deleted
            && v.boot.blobs().contains(hash)
    })
}

/// The nodes that host VMs (tombstones included: theirs may still run): only they take part
/// in their zone's network.
pub fn hosting(t: &Table) -> std::collections::HashSet<NodeId> {
    t.vms
        .values()
        .flat_map(|v| [v.node, v.migrating_to])
        .flatten()
        .collect()
}

/// The VM as its node is to be given it, with its network's peers: the other connected
/// nodes of its zone that host VMs.
pub fn wire(coord: &Coordinator, v: &VmRec, node: NodeId) -> Result<WireVm, String> {
    let net = zone_net(v.zone);
    let zone = coord.config.zones.get(v.zone);
    let local = node_ip(coord, node).ok_or("the node is not connected")?;
    let hosts = coord.vms.with(hosting);
    let peers = coord
        .fleet
        .connected_among(&hosts)
        .into_iter()
        .filter(|(id, zone, _)| *zone == v.zone && *id != node)
        .filter_map(|(_, _, s)| session_ip(&s))
        .collect();
    Ok(WireVm {
        id: v.id,
        name: v.name.clone(),
        zone: v.zone,
        vcpus: v.vcpus,
        memory_mib: v.memory_mib,
        disk_gib: v.disk_gib,
        image: v.boot.clone(),
        nics: vec![WireNic {
            vni: net.vni,
            local,
            mac: v.mac,
            ip: v.ip,
            prefix: net.prefix,
            gateway: zone.gateway,
            nameservers: zone.nameservers.clone(),
            search: zone.search.clone(),
            peers,
        }],
        ssh_keys: v.ssh_keys.clone(),
        user_data: v.user_data.clone(),
    })
}

/// Reads the optional `Idempotency-Key` header: a second request with the same key gets the
/// first one's operation instead of a second operation.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| (1..=128).contains(&k.len()) && k.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1 to 128 printable ASCII characters")
        })?;
    Ok(Some(key.to_string()))
}

/// The operation a key already started, as an answer.
fn replay(coord: &Coordinator, t: &Table, key: &Option<String>) -> Option<Accepted> {
    let key = key.as_ref()?;
    let op = t.ops.values().find(|o| o.key.as_ref() == Some(key))?;
    Some(Accepted {
        operation: op_view(coord, op),
        vm: t.vms.get(&op.vm).map(|v| view(coord, v, Some(op.id))),
    })
}

fn busy_with(op: &OpRec) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "operation_in_progress",
        format!(
            "VM {} is busy with a {} operation ({}); follow it with `zy op show {}`, or delete the VM",
            op.vm_name,
            op.kind.as_str(),
            op.id,
            op.id
        ),
    )
}

/// Publishes an operation as the table holds it now.
fn publish_op_of(coord: &Coordinator, id: OpId) {
    if let Some(op) = coord.vms.with(|t| t.ops.get(&id).cloned()) {
        publish_op(coord, &op);
    }
}

fn publish_op(coord: &Coordinator, op: &OpRec) {
    let detail = match &op.state {
        OpState::Failed(r) => format!("{} failed: {r}", op.kind.as_str()),
        OpState::Succeeded => format!("{} succeeded", op.kind.as_str()),
        OpState::Running => format!(
            "{}: {}",
            op.kind.as_str(),
            op.steps
                .get(op.current)
                .map(|s| s.name.as_str())
                .unwrap_or("")
        ),
    };
    coord.events.publish(
        "op",
        op.id.to_string(),
        op.vm_name.clone(),
        op.state.name().into(),
        detail,
    );
}

pub async fn create(
    State(coord): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let key = idempotency_key(&headers)?;
    let req: CreateVm = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad VM request: {e}")))?;
    zy_common::ids::validate_name_of("VM", &req.name)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(g) = &req.anti_affinity {
        zy_common::ids::validate_name_of("anti-affinity group", g)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    zy_common::resources::VmSize {
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        disk_gib: req.disk_gib,
    }
    .check()
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ssh_keys = guest::ssh_keys(&req.ssh_keys).map_err(ApiError::bad_request)?;
    if let Some(u) = &req.user_data {
        guest::user_data(u).map_err(ApiError::bad_request)?;
    }
    if let Some(a) = coord.vms.with(|t| replay(&coord, t, &key)) {
        return Ok((StatusCode::OK, Json(a)));
    }
    let store = coord.store.clone();
    let image_name = req.image.clone();
    let image = tokio::task::spawn_blocking(move || store.image(&image_name))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "no image `{}`; `zy image ls` lists them",
                zy_common::ids::truncate_for_error(&req.image)
            ))
        })?;
    if image.zone.is_some_and(|z| z != req.zone) {
        return Err(ApiError::bad_request(format!(
            "image {} belongs to the {} zone; a {} VM boots an image of its own zone or a shared one",
            image.name,
            image.zone.map(|z| z.to_string()).unwrap_or_default(),
            req.zone
        )));
    }
    let disk_gib = match &image.kind {
        ImageKind::Disk { virtual_size, .. } => {
            let min = virtual_size.div_ceil(1 << 30);
            if req.disk_gib != 0 && req.disk_gib < min {
                return Err(ApiError::bad_request(format!(
                    "image {} needs a disk of at least {min} GiB",
                    image.name
                )));
            }
            req.disk_gib.max(min)
        }
        ImageKind::Kernel { .. } => {
            if !ssh_keys.is_empty() || req.user_data.is_some() {
                return Err(ApiError::bad_request(format!(
                    "image {} boots a kernel directly, with no cloud-init seed: ssh_keys and \
                     user_data reach only the guests of disk images",
                    image.name
                )));
            }
            req.disk_gib
        }
    };
    let model = coord.config.resource_model();
    let nodes = node_caps(&coord);
    let policy = coord.config.packer_policy();
    let mac: [u8; 3] = rand::random();
    let id = VmId::new_random();
    let now = now_millis();
    let mut wake = None;
    let accepted = write(&coord, |t| {
        if let Some(a) = replay(&coord, t, &key) {
            return Ok((Batch::default(), a));
        }
        if t.vms
            .values()
            .any(|v| v.name == req.name && v.desired != VmDesired::Deleted)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "exists",
                format!("a VM named `{}` exists", req.name),
            ));
        }
        let placed = placed_vms(t, &model);
        let size = VmSize {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_gib,
        };
        let demand = Demand {
            zone: req.zone,
            need: model.cost(size),
            group: req.anti_affinity.clone(),
        };
        let node = placement::place(policy, &nodes, placed.clone(), id, &demand).map_err(|e| {
            // Room a standby node would make: it is woken, and the create refused meanwhile.
            wake = placement::wake_candidate(policy, &nodes, placed, id, &demand);
            ApiError::new(StatusCode::CONFLICT, "no_room", e.to_string())
        })?;
        let taken: Vec<Ipv4Addr> = t
            .vms
            .values()
            .filter(|v| v.zone == req.zone)
            .map(|v| v.ip)
            .collect();
        let gateway = coord.config.zones.get(req.zone).gateway;
        let ip = allocate_ip(zone_net(req.zone), gateway, &taken).ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no_address",
                format!("the {} network is full", req.zone),
            )
        })?;
        let mut m = [0x52, 0x54, 0x00, mac[0], mac[1], mac[2]];
        while t.vms.values().any(|v| v.mac == m) {
            m[5] = m[5].wrapping_add(1);
        }
        let rec = VmRec {
            id,
            name: req.name.clone(),
            zone: req.zone,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_gib,
            image: image.name.clone(),
            boot: image.kind.clone(),
            node: Some(node),
            desired: if req.start {
                VmDesired::Running
            } else {
                VmDesired::Stopped
            },
            generation: Generation(1),
            observed: None,
            mac: m,
            ip,
            created_at_ms: now,
            rev: 1,
            ssh_keys: ssh_keys.clone(),
            user_data: req.user_data.clone(),
            anti_affinity: req.anti_affinity.clone(),
            migrating_to: None,
            moved_at_ms: None,
        };
        let (b, op) = plan_create(t, rec.clone(), key.clone(), now)?;
        let a = Accepted {
            operation: op_view(&coord, &op),
            vm: Some(view(&coord, &rec, Some(op.id))),
        };
        Ok((b, a))
    })
    .await;
    let accepted = match accepted {
        Ok(a) => a,
        Err(e) if e.code() == "no_room" => {
            return Err(crate::nodeadmin::waking_for_room(&coord, wake, req.zone).unwrap_or(e))
        }
        Err(e) => return Err(e),
    };
    info!(vm = %accepted.operation.vm, name = %accepted.operation.vm_name, op = %accepted.operation.id, "VM placed");
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

pub async fn list(State(coord): State<Arc<Coordinator>>) -> Json<Vec<VmView>> {
    let mut out: Vec<VmView> = coord.vms.with(|t| {
        t.vms
            .values()
            .map(|v| view(&coord, v, t.running_op(v.id).map(|o| o.id)))
            .collect()
    });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Json(out)
}

pub async fn show(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    coord
        .vms
        .with(|t| {
            t.find(&key)
                .map(|v| view(&coord, v, t.running_op(v.id).map(|o| o.id)))
        })
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no VM `{}`; `zy vm ls` lists them",
                zy_common::ids::truncate_for_error(&key)
            ))
        })
}

/// A change of intent (start, stop, restart) and its operation, as one batch; refused while
/// another operation runs on the VM. Pure.
pub fn plan_intend(
    t: &Table,
    key_path: &str,
    kind: OpKind,
    key: Option<String>,
    now: u64,
) -> Result<(Batch, VmRec, OpRec), ApiError> {
    let v = t
        .find(key_path)
        .filter(|v| v.desired != VmDesired::Deleted)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no VM `{}`; `zy vm ls` lists them",
                zy_common::ids::truncate_for_error(key_path)
            ))
        })?;
    if let Some(op) = t.running_op(v.id) {
        return Err(busy_with(op));
    }
    let mut n = v.clone();
    n.desired = match kind {
        OpKind::Start => VmDesired::Running,
        _ => VmDesired::Stopped,
    };
    n.generation = v.generation.next();
    let op = OpRec::new(kind, &n, n.generation, key, now);
    let mut b = Batch::default();
    b.put(Some(v), n.clone());
    b.op(None, op.clone());
    Ok((b, n, op))
}

/// A delete: its tombstone and operation as one batch, superseding an operation under way;
/// deleting what is being deleted returns the delete under way (an empty batch). Pure.
pub fn plan_delete(
    t: &Table,
    key_path: &str,
    key: Option<String>,
    now: u64,
) -> Result<(Batch, VmRec, OpRec), ApiError> {
    let v = t.find(key_path).ok_or_else(|| {
        ApiError::not_found(format!(
            "no VM `{}`; `zy vm ls` lists them",
            zy_common::ids::truncate_for_error(key_path)
        ))
    })?;
    let mut b = Batch::default();
    if v.desired == VmDesired::Deleted {
        if let Some(op) = t.running_op(v.id) {
            return Ok((b, v.clone(), op.clone()));
        }
    }
    if let Some(op) = t.running_op(v.id) {
        let mut o = op.clone();
        match o.migration.as_mut() {
            // A migration cannot just stop: its driver aborts it (the destination's copy
            // goes, the source's guest runs on), then the delete proceeds on the source,
            // whose agent answers "busy" until then.
            Some(m) if o.kind == OpKind::Migrate => {
                // Once activation may have been sent (or the record moved), the move ends
                // first and the delete then goes to the VM's new node.
                if m.aborting.is_none() && m.activation_sent_ms.is_none() && o.current < 5 {
                    m.aborting = Some("superseded by a delete of the VM".into());
                    o.updated_at_ms = now;
                    b.op(Some(op), o);
                }
            }
            _ => {
                o.fail("superseded by a delete of the VM", now);
                b.op(Some(op), o);
            }
        }
    }
    let mut n = v.clone();
    n.desired = VmDesired::Deleted;
    n.generation = v.generation.next();
    let op = OpRec::new(OpKind::Delete, &n, n.generation, key, now);
    b.put(Some(v), n.clone());
    b.op(None, op.clone());
    Ok((b, n, op))
}

/// A new VM, placed and addressed, and its create operation, as one batch; refused if a
/// live VM has its name. Pure.
pub fn plan_create(
    t: &Table,
    rec: VmRec,
    key: Option<String>,
    now: u64,
) -> Result<(Batch, OpRec), ApiError> {
    if t.vms
        .values()
        .any(|v| v.name == rec.name && v.desired != VmDesired::Deleted)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("a VM named `{}` exists", rec.name),
        ));
    }
    let op = OpRec::new(OpKind::Create, &rec, rec.generation, key, now);
    let mut b = Batch::default();
    b.put(None, rec);
    b.op(None, op.clone());
    Ok((b, op))
}

/// Records a change of intent (start, stop, restart) and its operation in one transaction.
async fn intend(
    coord: Arc<Coordinator>,
    headers: &HeaderMap,
    key_path: &str,
    kind: OpKind,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let key = idempotency_key(headers)?;
    let now = now_millis();
    let accepted = write(&coord, |t| {
        if let Some(a) = replay(&coord, t, &key) {
            return Ok((Batch::default(), a));
        }
        let (b, n, op) = plan_intend(t, key_path, kind, key.clone(), now)?;
        let a = Accepted {
            operation: op_view(&coord, &op),
            vm: Some(view(&coord, &n, Some(op.id))),
        };
        Ok((b, a))
    })
    .await?;
    info!(vm = %accepted.operation.vm, name = %accepted.operation.vm_name, op = %accepted.operation.id, kind = kind.as_str(), "VM intent recorded");
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// How long a stop waits for the guest to power off after the ACPI button before QEMU is
/// told to quit.
pub const STOP_GRACE_MS: u32 = 30_000;

/// `POST /v1/vms/{vm}/start`.
pub async fn start(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    intend(coord, &headers, &key, OpKind::Start).await
}

/// `POST /v1/vms/{vm}/stop`: ACPI powerdown, then quit, then kill.
pub async fn stop(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    intend(coord, &headers, &key, OpKind::Stop).await
}

/// `POST /v1/vms/{vm}/restart`: a stop, then a start.
pub async fn restart(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    intend(coord, &headers, &key, OpKind::Restart).await
}

/// `DELETE /v1/vms/{vm}`: the tombstone is written first, always; an operation under way on
/// the VM is superseded. The node removes the VM when it can (now, or when it returns).
pub async fn delete(
    State(coord): State<Arc<Coordinator>>,
    Path(key_path): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let key = idempotency_key(&headers)?;
    let now = now_millis();
    let accepted = write(&coord, |t| {
        if let Some(a) = replay(&coord, t, &key) {
            return Ok((Batch::default(), a));
        }
        let (b, n, op) = plan_delete(t, &key_path, key.clone(), now)?;
        let a = Accepted {
            operation: op_view(&coord, &op),
            vm: Some(view(&coord, &n, Some(op.id))),
        };
        Ok((b, a))
    })
    .await?;
    info!(vm = %accepted.operation.vm, name = %accepted.operation.vm_name, op = %accepted.operation.id, "VM deleted at the site; its node removes it");
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// `GET /v1/ops`: operations, newest first (running ones and the most recent finished).
pub async fn list_ops(State(coord): State<Arc<Coordinator>>) -> Json<Vec<OpView>> {
    let mut ops: Vec<OpRec> = coord.vms.with(|t| t.ops.values().cloned().collect());
    ops.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(b.id.cmp(&a.id)));
    Json(ops.iter().map(|o| op_view(&coord, o)).collect())
}

/// `GET /v1/ops/{id}`.
pub async fn show_op(
    State(coord): State<Arc<Coordinator>>,
    Path(id): Path<String>,
) -> Result<Json<OpView>, ApiError> {
    let id: OpId = id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "`{}` is not an operation id",
            zy_common::ids::truncate_for_error(&id)
        ))
    })?;
    coord
        .vms
        .with(|t| t.ops.get(&id).map(|o| op_view(&coord, o)))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no operation {id}; `zy op ls` lists them")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_fetches_the_blobs_of_its_vms_and_of_those_migrating_to_it_only() {
        let mut t = Table::default();
        let v = crate::store::test_vm("w1");
        let hash = v.boot.blobs()[0];
        let (home, dest, other) = (v.node.unwrap(), NodeId::new_random(), NodeId::new_random());
        t.vms.insert(v.id, v.clone());
        assert!(needs_blob(&t, home, &hash));
        assert!(!needs_blob(&t, dest, &hash));
        t.vms.get_mut(&v.id).unwrap().migrating_to = Some(dest);
        assert!(
            needs_blob(&t, dest, &hash),
            "a destination fetches the base it lacks"
        );
        assert!(!needs_blob(&t, other, &hash));
        assert!(!needs_blob(&t, home, &zy_common::blob::BlobHash([9; 32])));
    }

    #[test]
    fn zones_never_share_a_network_and_addresses_are_unique() {
        let (e, i) = (zone_net(Zone::Extranet), zone_net(Zone::Intranet));
        assert_ne!(e.vni, i.vni);
        assert_ne!(e.base, i.base);
        let mut taken = Vec::new();
        for _ in 0..300 {
            let ip = allocate_ip(i, None, &taken).unwrap();
            assert!(!taken.contains(&ip));
            taken.push(ip);
        }
        assert_eq!(taken[0], Ipv4Addr::new(10, 220, 0, 2));
        let tiny = ZoneNet {
            vni: 1,
            base: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 30,
        };
        assert_eq!(allocate_ip(tiny, None, &[Ipv4Addr::new(10, 0, 0, 2)]), None);
    }

    #[test]
    fn the_zones_gateway_is_never_a_vms_address() {
        let i = zone_net(Zone::Intranet);
        let gw = Some(Ipv4Addr::new(10, 220, 0, 3));
        let taken = [Ipv4Addr::new(10, 220, 0, 2)];
        assert_eq!(
            allocate_ip(i, gw, &taken),
            Some(Ipv4Addr::new(10, 220, 0, 4))
        );
        let mut cfg = crate::config::CoordinatorConfig::default();
        let mut vm = crate::store::test_vm("w1");
        assert!(gateway_conflicts(&cfg, std::slice::from_ref(&vm)).is_empty());
        cfg.zones.intranet.gateway = Some(vm.ip);
        let c = gateway_conflicts(&cfg, std::slice::from_ref(&vm));
        assert!(
            c.len() == 1 && c[0].contains("VM w1") && c[0].contains("gateway of zone intranet"),
            "{c:?}"
        );
        vm.zone = Zone::Extranet;
        assert!(gateway_conflicts(&cfg, &[vm]).is_empty());
    }
}
