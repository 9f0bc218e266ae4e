//! VMs at the coordinator: asked for through the API, placed on a node of their zone, given
//! an address on their zone's network, handed to the node, and tracked through the node's
//! reports.
//!
//! Each zone has its own network (a VXLAN VNI and a subnet); the two never share either.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use zy_common::image::ImageKind;
use zy_common::proto::{CommandKind, VmInfo, WireNic, WireVm};
use zy_common::time::{now_millis, rfc3339};
use zy_common::vm::VmState;
use zy_common::{NodeId, VmId, Zone};

use crate::api::ApiError;
use crate::membership::NodeState;
use crate::placement::{self, Demand, NodeCap};
use crate::store::{VmDeletion, VmDesired, VmRec};
use crate::Coordinator;

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

/// The lowest free address of a network (from .2: .1 is kept for a gateway).
pub fn allocate_ip(net: ZoneNet, taken: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let base = u32::from(net.base);
    let size = 1u32 << (32 - u32::from(net.prefix));
    (2..size - 1)
        .map(|i| Ipv4Addr::from(base + i))
        .find(|ip| !taken.contains(ip))
}

/// `POST /v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub zone: Zone,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_gib: u64,
    pub image: String,
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

/// A VM as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmView {
    pub id: VmId,
    pub name: String,
    pub zone: Zone,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: String,
    pub node: Option<String>,
    pub node_id: Option<NodeId>,
    pub desired: VmDesired,
    pub state: String,
    pub reason: Option<String>,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub pid: Option<u32>,
    pub state_since: String,
    pub created_at: String,
}

fn view(coord: &Coordinator, v: &VmRec) -> VmView {
    let node = v
        .node
        .and_then(|n| coord.fleet.find(&n.to_string()))
        .map(|n| n.record.name);
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
        state: v.state.name().into(),
        reason: match &v.state {
            VmState::Failed(r) => Some(r.clone()),
            _ => None,
        },
        ip: v.ip,
        mac: v
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        pid: v.pid,
        state_since: rfc3339(v.state_since_ms),
        created_at: rfc3339(v.created_at_ms),
    }
}

/// The VMs of the site, in memory; every change is written to the store first.
#[derive(Debug, Default)]
pub struct Vms {
    inner: tokio::sync::Mutex<HashMap<VmId, VmRec>>,
    /// VMs deleted while their node was away, until the node has removed them.
    deleting: std::sync::Mutex<HashMap<VmId, VmDeletion>>,
}

impl Vms {
    /// The VMs and pending deletions the store holds.
    pub fn new(vms: Vec<VmRec>, deletions: Vec<VmDeletion>) -> Self {
        Self {
            inner: tokio::sync::Mutex::new(vms.into_iter().map(|v| (v.id, v)).collect()),
            deleting: std::sync::Mutex::new(deletions.into_iter().map(|d| (d.id, d)).collect()),
        }
    }

    fn deleting(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, VmDeletion>> {
        self.deleting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// VMs deleted while their node was away, not yet removed there.
    pub fn pending_deletions(&self) -> Vec<VmDeletion> {
        self.deleting().values().cloned().collect()
    }

    /// Names of the VMs placed on `node`.
    pub async fn on_node(&self, node: NodeId) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .lock()
            .await
            .values()
            .filter(|v| v.node == Some(node))
            .map(|v| v.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Drops the deletions a removed node can never carry out.
    pub fn forget_node(&self, node: NodeId) -> Vec<VmDeletion> {
        let mut d = self.deleting();
        let gone: Vec<VmDeletion> = d.values().filter(|x| x.node == node).cloned().collect();
        for g in &gone {
            d.remove(&g.id);
        }
        gone
    }
}

async fn persist(coord: &Coordinator, v: &VmRec) -> Result<(), ApiError> {
    let store = coord.store.clone();
    let v = v.clone();
    tokio::task::spawn_blocking(move || store.put_vm(&v))
        .await
        .map_err(ApiError::internal)??;
    Ok(())
}

fn find<'a>(vms: &'a mut HashMap<VmId, VmRec>, key: &str) -> Result<&'a mut VmRec, ApiError> {
    let id = match key.parse::<VmId>() {
        Ok(id) => Some(id),
        Err(_) => vms.values().find(|v| v.name == key).map(|v| v.id),
    };
    id.and_then(|id| vms.get_mut(&id)).ok_or_else(|| {
        ApiError::not_found(format!(
            "no VM `{}`; `zy vm ls` lists them",
            zy_common::ids::truncate_for_error(key)
        ))
    })
}

/// The underlay address of a connected node.
fn node_ip(coord: &Coordinator, node: NodeId) -> Option<Ipv4Addr> {
    let s = coord.fleet.session(node)?;
    match s.remote.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}

fn wire(coord: &Coordinator, v: &VmRec, node: NodeId) -> Result<WireVm, String> {
    let net = zone_net(v.zone);
    let local = node_ip(coord, node).ok_or("the node is not connected")?;
    let peers = coord
        .fleet
        .snapshot()
        .into_iter()
        .filter(|n| n.record.zone == v.zone && n.record.id != node)
        .filter_map(|n| node_ip(coord, n.record.id))
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
            gateway: None,
            peers,
        }],
        start: v.desired == VmDesired::Running,
    })
}

/// Sends a VM command to the VM's node and waits for the answer.
/// The session of a VM's node, or the error that says why there is none.
fn connected(coord: &Coordinator, node: Option<NodeId>) -> Result<crate::fleet::Session, ApiError> {
    let node = node
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "not_placed", "the VM has no node"))?;
    coord.fleet.session(node).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_connected",
            "the VM's node is not connected; try again when it is Ready",
        )
    })
}

async fn command(
    coord: &Coordinator,
    node: Option<NodeId>,
    kind: CommandKind,
) -> Result<(), ApiError> {
    let session = connected(coord, node)?;
    session
        .command(kind, Duration::from_secs(600))
        .await
        .map(|_| ())
        .map_err(ApiError::from)
}

/// Records a state a node reported.
async fn set_state(coord: &Coordinator, id: VmId, from: NodeId, state: VmState, pid: Option<u32>) {
    let mut vms = coord.vms.inner.lock().await;
    let Some(v) = vms.get_mut(&id) else {
        if !coord.vms.deleting().contains_key(&id) {
            warn!(vm = %id, node = %from, "a node reports a VM this coordinator does not know");
        }
        return;
    };
    if v.node != Some(from) {
        warn!(vm = %id, node = %from, "a node reports a VM placed elsewhere");
        return;
    }
    if v.state == state && v.pid == pid {
        return;
    }
    info!(vm = %id, name = %v.name, state = %state, "VM state reported");
    coord.events.publish(
        "vm",
        id.to_string(),
        v.name.clone(),
        state.name().into(),
        match &state {
            VmState::Failed(r) => r.clone(),
            _ => format!("{} -> {}", v.state.name(), state.name()),
        },
    );
    // Running straight to stopped, without a stop under way: the guest powered itself off,
    // and it is to stay off (a restart goes through `stopping`).
    if v.state == VmState::Running && state == VmState::Stopped {
        v.desired = VmDesired::Stopped;
    }
    v.state = state;
    v.pid = pid;
    v.state_since_ms = now_millis();
    let copy = v.clone();
    // Written while the VMs are locked, so that a delete in between cannot be undone by
    // this write.
    if let Err(e) = persist(coord, &copy).await {
        warn!(error = ?e, "cannot record a VM state");
    }
    drop(vms);
}

/// A VM state change from a node.
pub async fn on_event(coord: &Arc<Coordinator>, node: NodeId, info: VmInfo) {
    set_state(coord, info.id, node, info.state, info.pid).await;
}

/// A node's whole picture on connect: states are taken, and VMs placed on the node that it
/// does not have are handed to it again.
pub async fn on_report(coord: &Arc<Coordinator>, node: NodeId, report: Vec<VmInfo>) {
    // A node (re)connected, perhaps from a new address: its zone's segments must know.
    if let Some(n) = coord.fleet.find(&node.to_string()) {
        sync_peers(coord, n.record.zone).await;
    }
    for info in &report {
        set_state(coord, info.id, node, info.state.clone(), info.pid).await;
    }
    // VMs deleted while the node was away go now.
    let deletions: Vec<VmDeletion> = coord
        .vms
        .pending_deletions()
        .into_iter()
        .filter(|d| d.node == node)
        .collect();
    for d in deletions {
        let coord = coord.clone();
        let present = report.iter().any(|r| r.id == d.id);
        tokio::spawn(async move {
            if present {
                if let Err(e) = command(&coord, Some(node), CommandKind::DeleteVm(d.id)).await {
                    warn!(vm = %d.id, name = %d.name, error = %e.message(), "cannot delete a VM on its returned node; will try at its next return");
                    return;
                }
            }
            let store = coord.store.clone();
            match tokio::task::spawn_blocking(move || store.finish_vm_deletion(d.id)).await {
                Ok(Ok(())) => {
                    coord.vms.deleting().remove(&d.id);
                    info!(vm = %d.id, name = %d.name, "VM deleted on its returned node");
                }
                Ok(Err(e)) => warn!(vm = %d.id, error = %e, "cannot record a finished deletion"),
                Err(e) => warn!(vm = %d.id, error = %e, "cannot record a finished deletion"),
            }
        });
    }
    let missing: Vec<VmRec> = coord
        .vms
        .inner
        .lock()
        .await
        .values()
        .filter(|v| v.node == Some(node) && !report.iter().any(|r| r.id == v.id))
        .cloned()
        .collect();
    for v in missing {
        let coord = coord.clone();
        tokio::spawn(async move { hand_over(&coord, v.id).await });
    }
}

/// Tells every connected node of a zone who its network peers are now, so that a segment
/// made before a node joined learns of it.
pub async fn sync_peers(coord: &Arc<Coordinator>, zone: Zone) {
    let nodes: Vec<(NodeId, Ipv4Addr)> = coord
        .fleet
        .snapshot()
        .into_iter()
        .filter(|n| n.record.zone == zone)
        .filter_map(|n| node_ip(coord, n.record.id).map(|ip| (n.record.id, ip)))
        .collect();
    let vni = zone_net(zone).vni;
    for (id, ip) in &nodes {
        let peers: Vec<Ipv4Addr> = nodes
            .iter()
            .filter(|(_, p)| p != ip)
            .map(|(_, p)| *p)
            .collect();
        if let Some(s) = coord.fleet.session(*id) {
            tokio::spawn(async move {
                if let Err(e) = s
                    .command(
                        CommandKind::SyncPeers { vni, peers },
                        Duration::from_secs(30),
                    )
                    .await
                {
                    warn!(node = %s.remote, error = %e, "cannot update a node's network peers");
                }
            });
        }
    }
}

/// Sends a VM to its node; a failure is recorded as the VM's state.
async fn hand_over(coord: &Arc<Coordinator>, id: VmId) {
    let Some(v) = coord.vms.inner.lock().await.get(&id).cloned() else {
        return;
    };
    let Some(node) = v.node else { return };
    let result = match wire(coord, &v, node) {
        Ok(w) => command(coord, Some(node), CommandKind::CreateVm(w))
            .await
            .map_err(|e| e.message().to_string()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        warn!(vm = %id, error = %e, "the node could not take the VM");
        set_state(coord, id, node, VmState::failed(e), None).await;
    }
}

pub async fn create(
    State(coord): State<Arc<Coordinator>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let req: CreateVm = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad VM request: {e}")))?;
    zy_common::ids::validate_name(&req.name)
        .map_err(|e| ApiError::bad_request(e.to_string().replace("node name", "VM name")))?;
    if !(1..=64).contains(&req.vcpus) {
        return Err(ApiError::bad_request(format!(
            "{} vCPUs is outside 1..=64",
            req.vcpus
        )));
    }
    if !(64..=1024 * 1024).contains(&req.memory_mib) {
        return Err(ApiError::bad_request(format!(
            "{} MiB of memory is outside 64 MiB..=1 TiB",
            req.memory_mib
        )));
    }
    if req.disk_gib > 64 * 1024 {
        return Err(ApiError::bad_request(format!(
            "a {} GiB disk is over the 64 TiB limit",
            req.disk_gib
        )));
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
        ImageKind::Kernel { .. } => req.disk_gib,
    };
    let mut vms = coord.vms.inner.lock().await;
    if vms.values().any(|v| v.name == req.name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "exists",
            format!("a VM named `{}` exists", req.name),
        ));
    }
    let nodes: Vec<NodeCap> = coord
        .fleet
        .snapshot()
        .into_iter()
        .map(|n| NodeCap {
            id: n.record.id,
            name: n.record.name.clone(),
            zone: n.record.zone,
            ready: n.record.state == NodeState::Ready && n.session.is_some(),
            memory_mib: n
                .record
                .inventory
                .as_ref()
                .map(|i| i.memory_bytes >> 20)
                .unwrap_or(0),
            disk_free_gib: n
                .record
                .inventory
                .as_ref()
                .map(|i| i.disk_free_bytes >> 30)
                .unwrap_or(0),
        })
        .collect();
    let mut used: HashMap<NodeId, (u64, u64)> = HashMap::new();
    for v in vms.values() {
        if let Some(n) = v.node {
            let e = used.entry(n).or_default();
            e.0 += v.memory_mib;
            e.1 += v.disk_gib;
        }
    }
    let node = placement::place(
        &nodes,
        &used,
        Demand {
            zone: req.zone,
            memory_mib: req.memory_mib,
            disk_gib,
        },
    )
    .map_err(|e| ApiError::new(StatusCode::CONFLICT, "no_room", e.to_string()))?;
    let net = zone_net(req.zone);
    let mut taken: Vec<Ipv4Addr> = vms
        .values()
        .filter(|v| v.zone == req.zone)
        .map(|v| v.ip)
        .collect();
    // A VM deleted while its node was away may still run there: its address stays taken.
    taken.extend(
        coord
            .vms
            .pending_deletions()
            .iter()
            .filter(|d| d.zone == req.zone)
            .map(|d| d.ip),
    );
    let ip = allocate_ip(net, &taken).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_address",
            format!("the {} network is full", req.zone),
        )
    })?;
    let mac = loop {
        let r: [u8; 3] = rand::random();
        let mac = [0x52, 0x54, 0x00, r[0], r[1], r[2]];
        if !vms.values().any(|v| v.mac == mac) {
            break mac;
        }
    };
    let now = now_millis();
    let rec = VmRec {
        id: VmId::new_random(),
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
        state: VmState::Pending,
        state_since_ms: now,
        mac,
        ip,
        pid: None,
        created_at_ms: now,
    };
    persist(&coord, &rec).await?;
    vms.insert(rec.id, rec.clone());
    drop(vms);
    info!(vm = %rec.id, name = %rec.name, node = %node, ip = %ip, "VM placed");
    let c = coord.clone();
    let id = rec.id;
    tokio::spawn(async move { hand_over(&c, id).await });
    Ok((StatusCode::ACCEPTED, Json(view(&coord, &rec))))
}

pub async fn list(State(coord): State<Arc<Coordinator>>) -> Json<Vec<VmView>> {
    let vms = coord.vms.inner.lock().await;
    let mut out: Vec<VmView> = vms.values().map(|v| view(&coord, v)).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Json(out)
}

pub async fn show(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    let mut vms = coord.vms.inner.lock().await;
    let v = find(&mut vms, &key)?;
    Ok(Json(view(&coord, v)))
}

async fn desire(
    coord: &Arc<Coordinator>,
    key: &str,
    desired: VmDesired,
) -> Result<VmRec, ApiError> {
    let mut vms = coord.vms.inner.lock().await;
    let v = find(&mut vms, key)?;
    v.desired = desired;
    let copy = v.clone();
    persist(coord, &copy).await?;
    Ok(copy)
}

/// How long a stop waits for the guest to power off after the ACPI button before QEMU is
/// told to quit.
const STOP_GRACE_MS: u32 = 30_000;

/// What a power request does: the node commands it sends and the desired state each one
/// records once done.
#[derive(Clone, Copy, Debug)]
enum Power {
    Start,
    Stop,
    Restart,
}

async fn power(coord: Arc<Coordinator>, key: &str, p: Power) -> Result<Json<VmView>, ApiError> {
    // What ops asked for is recorded only once the node has done it: a refused or failed
    // request leaves the site's intent and the node's state as they were.
    let (id, node) = {
        let mut vms = coord.vms.inner.lock().await;
        let v = find(&mut vms, key)?;
        (v.id, v.node)
    };
    let stop = CommandKind::StopVm {
        id,
        grace_ms: STOP_GRACE_MS,
    };
    let steps = match p {
        Power::Start => vec![(CommandKind::StartVm(id), VmDesired::Running)],
        Power::Stop => vec![(stop, VmDesired::Stopped)],
        Power::Restart => vec![
            (stop, VmDesired::Stopped),
            (CommandKind::StartVm(id), VmDesired::Running),
        ],
    };
    for (c, desired) in steps {
        command(&coord, node, c).await?;
        desire(&coord, &id.to_string(), desired).await?;
    }
    show(State(coord), Path(id.to_string())).await
}

/// `POST /v1/vms/{vm}/start`.
pub async fn start(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    power(coord, &key, Power::Start).await
}

/// `POST /v1/vms/{vm}/stop`: ACPI powerdown, then quit, then kill.
pub async fn stop(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    power(coord, &key, Power::Stop).await
}

/// `POST /v1/vms/{vm}/restart`: a stop, then a start.
pub async fn restart(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    power(coord, &key, Power::Restart).await
}

pub async fn delete(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    let mut vms = coord.vms.inner.lock().await;
    let v = find(&mut vms, &key)?.clone();
    if let (Some(node), Err(_)) = (v.node, connected(&coord, v.node)) {
        // The node is away (down, cut off, being repaired): the VM goes from the site now
        // and from the node when it returns.
        let d = VmDeletion {
            id: v.id,
            name: v.name.clone(),
            node,
            zone: v.zone,
            ip: v.ip,
            at_ms: now_millis(),
        };
        let store = coord.store.clone();
        let rec = d.clone();
        tokio::task::spawn_blocking(move || store.defer_vm_deletion(&rec))
            .await
            .map_err(ApiError::internal)??;
        coord.vms.deleting().insert(d.id, d);
        vms.remove(&v.id);
        drop(vms);
        info!(vm = %v.id, name = %v.name, node = %node, "VM deleted; its node is away and removes it when it returns");
        return Ok(Json(view(&coord, &v)));
    }
    // The node may take a while (a guest that ignores its power button): not locked.
    drop(vms);
    command(&coord, v.node, CommandKind::DeleteVm(v.id)).await?;
    let mut vms = coord.vms.inner.lock().await;
    let store = coord.store.clone();
    tokio::task::spawn_blocking(move || store.remove_vm(v.id))
        .await
        .map_err(ApiError::internal)??;
    vms.remove(&v.id);
    drop(vms);
    info!(vm = %v.id, name = %v.name, "VM deleted");
    Ok(Json(view(&coord, &v)))
}

/// `GET /v1/vms/{vm}/console?lines=N&follow=true`: the VM's console from its node, as plain
/// text, streamed while `follow` holds.
pub async fn console(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<axum::response::Response, ApiError> {
    let (mut lines, mut follow) = (100u32, false);
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("lines", v)) => {
                lines = v.parse().ok().filter(|n| *n <= 100_000).ok_or_else(|| {
                    ApiError::bad_request("lines must be a number within 0..=100000")
                })?
            }
            Some(("follow", v)) => {
                follow = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("follow must be true or false"))?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{}`: the console takes lines and follow",
                    zy_common::ids::truncate_for_error(pair)
                )))
            }
        }
    }
    let v = {
        let mut vms = coord.vms.inner.lock().await;
        find(&mut vms, &key)?.clone()
    };
    let conn = v
        .node
        .and_then(|n| coord.fleet.session(n))
        .and_then(|s| s.conn)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_connected",
                "the VM's node is not connected",
            )
        })?;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "node_unreachable",
            e.to_string(),
        )
    })?;
    // The version is the one every session speaks today; streams reuse it.
    let version = zy_common::wire::PROTOCOL_VERSIONS.max;
    zy_common::wire::write_frame(
        &mut send,
        version,
        &zy_common::proto::Message::Console {
            id: v.id,
            lines,
            follow,
        },
    )
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "node_unreachable",
            e.to_string(),
        )
    })?;
    let _ = send.finish();
    let stream = futures_util::stream::unfold(recv, |mut recv| async move {
        let mut buf = vec![0u8; 16 * 1024];
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), recv))
            }
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), recv)),
        }
    });
    axum::response::Response::builder()
        .header(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )
        .body(axum::body::Body::from_stream(stream))
        .map_err(ApiError::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_never_share_a_network_and_addresses_are_unique() {
        let (e, i) = (zone_net(Zone::Extranet), zone_net(Zone::Intranet));
        assert_ne!(e.vni, i.vni);
        assert_ne!(e.base, i.base);
        let mut taken = Vec::new();
        for _ in 0..300 {
            let ip = allocate_ip(i, &taken).unwrap();
            assert!(!taken.contains(&ip));
            taken.push(ip);
        }
        assert_eq!(taken[0], Ipv4Addr::new(10, 220, 0, 2));
        let tiny = ZoneNet {
            vni: 1,
            base: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 30,
        };
        assert_eq!(allocate_ip(tiny, &[Ipv4Addr::new(10, 0, 0, 2)]), None);
    }
}
