//! The node's side of the migration commands (protocol version 4). The states and rules
//! are [`crate::vm::migration`]'s; the engine is [`crate::vm::migrate`]'s. Here: what each
//! command does on this node, as the destination or the source.
//!
//! What the agent relies on from the coordinator (its durable migration operation):
//!
//! - `MigrateOut` only with the target the destination answered to `MigrateIn` of the
//!   same migration id; one migration of a VM at a time (another is answered `Busy`).
//! - `MigrateActivate` only after the source reported `Completed`; `MigrateFinish` only
//!   after the destination's VM runs and the VM's record names the destination.
//! - `MigrateAbort` to the source after its `Completed` only once the destination has
//!   confirmed its own abort (the source then resumes the guest: it must not run twice).
//! - A command that got no answer may be sent again: every one is idempotent by
//!   migration id.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{info, warn};
use zy_common::image::ImageKind;
use zy_common::proto::{
    MigrateDisk, MigrateIn, MigrateOut, MigrateTarget, MigrationPhase, MigrationStatus,
    MirrorSync as WireSync, ReplyError, ReplyErrorKind, VmInfo, WireVm,
};
use zy_common::time::now_millis;
use zy_common::{MigrationId, NodeId, VmId, Zone};

use super::{blocking, failed, kernel_cmdline, nics_of, refused, Node};
use crate::identity::IdentityDir;
use crate::vm::actor::Request;
use crate::vm::migrate::{self as engine, IncomingPlan, MirrorSync, OutgoingPlan, TargetDisk, Tls};
use crate::vm::migration::{self, Arrival, Decision, Migration, Side, INCOMING, MIGRATED_IN};
use crate::vm::record::{VmRecord, DEFAULT_STOP_GRACE_MS};
use crate::vm::spec::{BaseImage, Boot, DiskSpec, VmPaths, VmSpec};

/// How long a command waits for the migration's own task to reach a state it can answer
/// from (the destination listening, a cancel taking effect); past it, `Busy`.
const ANSWER_WAIT: Duration = Duration::from_secs(90);
/// The directory of a migration's TLS files inside the VM's directory.
const TLS_DIR: &str = "migration-tls";

fn busy(message: impl AsRef<str>) -> ReplyError {
    ReplyError::new(ReplyErrorKind::Busy, message)
}

fn not_found(message: impl AsRef<str>) -> ReplyError {
    ReplyError::new(ReplyErrorKind::NotFound, message)
}

/// This node's certificate, key and site CA, as QEMU reads them, and who it is.
struct NodeTls {
    node: NodeId,
    zone: Zone,
    cert_der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

impl Node {
    /// `Busy` while a migration holds the VM (intents and deletes wait for its end).
    pub(super) fn not_migrating(&self, id: VmId) -> Result<(), ReplyError> {
        match self.vms.migrations().holding(id) {
            Some(m) => Err(busy(format!(
                "VM {id} is migrating (migration {}, {}); ask again once it has ended",
                m.id,
                m.phase().as_str()
            ))),
            None => Ok(()),
        }
    }

    /// Sets the node's underlay address (the link's local address).
    pub fn set_underlay(&self, ip: IpAddr) {
        *self.underlay.lock().unwrap_or_else(|p| p.into_inner()) = Some(ip);
    }

    /// Read at each migration: a renewal replaces the files.
    async fn node_tls(&self) -> Result<NodeTls, ReplyError> {
        let dir = IdentityDir::new(self.vms.data_dir());
        blocking(move || {
            let id = dir.load().map_err(|e| {
                format!(
                    "this node's identity cannot be read: {}",
                    zy_common::error::chain(&e)
                )
            })?;
            let read = |p: std::path::PathBuf| {
                std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            Ok(NodeTls {
                node: id.node.node_id,
                zone: id.node.zone,
                cert_der: id.creds().chain[0].to_vec(),
                cert_pem: read(dir.cert())?,
                key_pem: read(dir.key())?,
                ca_pem: read(dir.ca())?,
            })
        })
        .await
        .map_err(refused)
    }

    fn limits(&self) -> engine::Limits {
        self.migration_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where this node's migration endpoints listen: the VM's NICs' local address (the
    /// coordinator's word for this node's underlay), else the link's.
    fn endpoint_ip(&self, vm: &WireVm) -> Result<IpAddr, ReplyError> {
        if let Some(n) = vm.nics.first() {
            return Ok(IpAddr::V4(n.local));
        }
        self.underlay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| refused("this node does not know its underlay address yet"))
    }

    // ---- destination ----

    /// `MigrateIn`: readies the destination (in a task of its own) and answers where it
    /// listens. A repeat answers the same.
    pub(super) async fn migrate_in(
        self: &Arc<Self>,
        m: MigrateIn,
    ) -> Result<MigrateTarget, ReplyError> {
        let id = m.vm.id;
        let migs = self.vms.migrations().clone();
        if let Some(h) = migs.get(id).filter(|h| h.id == m.migration) {
            return listening(&h).await;
        }
        if self.vms.knows(id) {
            return Err(refused(format!(
                "VM {id} is on this node already: it cannot migrate here"
            )));
        }
        let tls = self.node_tls().await?;
        zy_common::tls::check_serves_tls(&tls.cert_der)
            .map_err(|e| refused(format!("this node cannot receive a migration: {e}")))?;
        if m.source == tls.node {
            return Err(refused("a VM cannot migrate from a node to itself"));
        }
        if m.vm.zone != tls.zone {
            return Err(refused(format!(
                "VM {id} is of the {} zone and this node of the {}: zones never mix",
                m.vm.zone, tls.zone
            )));
        }
        let ip = self.endpoint_ip(&m.vm)?;
        let ports = migs
            .pick_ports(ip, 2)
            .map_err(|e| failed(format!("no free ports for the migration on {ip}: {e}")))?;
        let (d, held) = migs.claim(id, m.migration, Side::Destination, ports.clone());
        let mig = match (d, held) {
            (Decision::Busy(other), _) => {
                return Err(busy(format!(
                    "VM {id} is migrating already (migration {other})"
                )))
            }
            (Decision::Repeat, Some(h)) => return listening(&h).await,
            (Decision::Start, Some(h)) => h,
            _ => return Err(failed("the migration vanished")),
        };
        info!(vm = %id, migration = %m.migration, source = %m.source, "receiving a VM");
        let node = self.clone();
        tokio::spawn(node.receive(mig.clone(), m, tls, ip, ports));
        listening(&mig).await
    }

    /// The destination's task: readies, waits for the whole VM, keeps it for activation.
    async fn receive(
        self: Arc<Self>,
        mig: Arc<Migration>,
        m: MigrateIn,
        tls: NodeTls,
        ip: IpAddr,
        ports: Vec<u16>,
    ) {
        let id = m.vm.id;
        let paths = VmPaths::new(self.vms.data_dir(), id);
        let made = self
            .ready_incoming(&mig, &m, &tls, ip, &ports, &paths)
            .await;
        let (mut incoming, rec) = match made {
            Ok(x) => x,
            Err(e) => {
                warn!(vm = %id, migration = %mig.id, error = %e, "cannot receive the VM");
                remove_incoming_dir(&paths).await;
                mig.update(|s| s.phase = MigrationPhase::Failed { reason: e });
                return;
            }
        };
        let arrived = incoming.wait_complete(&mig.cancel).await;
        match arrived {
            Ok(()) => {
                *mig.arrival.lock().await = Some(Arrival { incoming, rec });
                info!(vm = %id, migration = %mig.id, "the VM has arrived, paused");
                mig.update(|s| {
                    s.phase = MigrationPhase::Completed {
                        downtime_ms: 0,
                        total_ms: 0,
                    }
                });
            }
            Err(e) => {
                incoming.abort().await;
                remove_incoming_dir(&paths).await;
                let phase = match e {
                    engine::MigrateError::Cancelled => MigrationPhase::Cancelled,
                    e => MigrationPhase::Failed {
                        reason: zy_common::error::chain(&e),
                    },
                };
                warn!(vm = %id, migration = %mig.id, phase = phase.as_str(), "the VM did not arrive; the destination is cleaned up");
                mig.update(|s| s.phase = phase);
            }
        }
    }

    /// Makes the destination's directory (marked [`INCOMING`]), its TLS files and target
    /// disks, and starts its QEMU waiting for the stream.
    async fn ready_incoming(
        &self,
        mig: &Migration,
        m: &MigrateIn,
        tls: &NodeTls,
        ip: IpAddr,
        ports: &[u16],
        paths: &VmPaths,
    ) -> Result<(Box<dyn crate::vm::runner::IncomingVm>, VmRecord), String> {
        let vm = &m.vm;
        let dir = paths.dir.clone();
        let mid = mig.id;
        blocking(move || {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
            }
            std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
            migration::write_marker(&dir.join(INCOMING), mid)
                .map_err(|e| format!("cannot mark {}: {e}", dir.display()))
        })
        .await?;
        let tls_dir = paths.dir.join(TLS_DIR);
        let (d, c, k, a) = (
            tls_dir.clone(),
            tls.cert_pem.clone(),
            tls.key_pem.clone(),
            tls.ca_pem.clone(),
        );
        blocking(move || engine::write_tls_dir(&d, &a, &c, &k).map_err(|e| e.to_string())).await?;
        for blob in vm.image.blobs() {
            self.blobs
                .ensure_blob(blob, &self.cache)
                .await
                .map_err(|e| format!("cannot get the image: {e}"))?;
        }
        let (spec, targets, disks) = self.incoming_spec(vm, paths).await?;
        let (_, ports_of_vm) = nics_of(vm);
        let nbd = SocketAddr::new(ip, ports[0]);
        let stream = SocketAddr::new(ip, ports[1]);
        let plan = IncomingPlan {
            spec: spec.clone(),
            paths: paths.clone(),
            disks: targets.clone(),
            nbd,
            stream,
            tls: Tls {
                dir: tls_dir,
                peer_hostname: String::new(),
                // Zones never mix: the source is a node of this node's zone.
                peer_dn: engine::peer_dn(m.source, tls.zone),
            },
            limits: self.limits(),
        };
        let incoming = self
            .vms_runner()
            .incoming(plan)
            .await
            .map_err(|e| zy_common::error::chain(&e))?;
        *mig.target.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(MigrateTarget { nbd, stream, disks });
        let mut spec = spec;
        spec.disks = targets
            .iter()
            .map(|t| DiskSpec {
                path: t.path.clone(),
                format: "qcow2".into(),
                base: t.base.clone(),
            })
            .collect();
        let rec = VmRecord {
            spec,
            desired: zy_common::vm::Desired::Running,
            intent: m.generation,
            stop_grace_ms: DEFAULT_STOP_GRACE_MS,
            created_at_ms: now_millis(),
            ports: ports_of_vm,
            // The seed arrived as a disk of its own; nothing writes it again here.
            seed: None,
        };
        Ok((incoming, rec))
    }

    fn vms_runner(&self) -> Arc<dyn crate::vm::runner::VmRunner> {
        self.vms.runner().clone()
    }

    /// The VM as this node will run it, with one target per disk the source has (in the
    /// source's order: made as [`Node::prepare`] makes a VM's disks) and how each is
    /// mirrored: an overlay on the same cached base takes only the top.
    async fn incoming_spec(
        &self,
        vm: &WireVm,
        paths: &VmPaths,
    ) -> Result<(VmSpec, Vec<TargetDisk>, Vec<MigrateDisk>), String> {
        let mut targets = Vec::new();
        let boot = match &vm.image {
            ImageKind::Disk { blob, format, .. } => {
                let base = BaseImage {
                    path: self.cache.path(blob),
                    format: format.as_str().to_string(),
                };
                let size = if vm.disk_gib > 0 {
                    vm.disk_gib << 30
                } else {
                    let b = base.clone();
                    blocking(move || virtual_size(&b.path, &b.format)).await?
                };
                targets.push(TargetDisk {
                    path: paths.dir.join("disk0.qcow2"),
                    virtual_size: size,
                    base: Some(base),
                });
                targets.push(TargetDisk {
                    path: paths.dir.join("seed.qcow2"),
                    virtual_size: crate::vm::seed::SIZE,
                    base: None,
                });
                Boot::Disk
            }
            ImageKind::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                if vm.disk_gib > 0 {
                    targets.push(TargetDisk {
                        path: paths.dir.join("disk0.qcow2"),
                        virtual_size: vm.disk_gib << 30,
                        base: None,
                    });
                }
                Boot::Kernel {
                    kernel: self.cache.path(kernel),
                    initrd: initrd.map(|i| self.cache.path(&i)),
                    cmdline: kernel_cmdline(cmdline, vm),
                }
            }
        };
        let (nics, _) = nics_of(vm);
        let spec = VmSpec {
            id: vm.id,
            name: vm.name.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            accel: self.accel,
            boot,
            disks: targets
                .iter()
                .map(|t| DiskSpec {
                    path: t.path.clone(),
                    format: "qcow2".into(),
                    base: t.base.clone(),
                })
                .collect(),
            nics,
        };
        spec.validate().map_err(|e| e.to_string())?;
        let disks = targets
            .iter()
            .enumerate()
            .map(|(i, t)| MigrateDisk {
                export: format!("disk{i}"),
                virtual_size: t.virtual_size,
                sync: if t.base.is_some() {
                    WireSync::Top
                } else {
                    WireSync::Full
                },
            })
            .collect();
        Ok((spec, targets, disks))
    }

    /// `MigrateActivate`: the arrived VM runs here and becomes an ordinary VM of the node.
    pub(super) async fn migrate_activate(
        &self,
        mid: MigrationId,
        id: VmId,
    ) -> Result<VmInfo, ReplyError> {
        let Some(mig) = self
            .vms
            .migrations()
            .get(id)
            .filter(|m| m.id == mid && m.side == Side::Destination)
        else {
            // Activated before this agent restarted: the VM runs here.
            if self.arrived_by(id, mid) {
                return self.vm_info(id);
            }
            return Err(not_found(format!(
                "this node is not receiving VM {id} by migration {mid}"
            )));
        };
        let mut arrival = mig.arrival.lock().await;
        match mig.phase() {
            MigrationPhase::Active => return self.vm_info(id),
            MigrationPhase::Completed { .. } => {}
            MigrationPhase::Failed { reason } => {
                return Err(refused(format!("migration {mid} failed: {reason}")))
            }
            MigrationPhase::Cancelled => {
                return Err(refused(format!("migration {mid} was aborted")))
            }
            p => {
                return Err(busy(format!(
                    "VM {id} has not arrived yet ({}); ask again",
                    p.as_str()
                )))
            }
        }
        let Some(a) = arrival.take() else {
            return Err(failed("the arrived VM vanished"));
        };
        let paths = VmPaths::new(self.vms.data_dir(), id);
        let fail = |why: String| {
            let mig = mig.clone();
            async move {
                mig.update(|s| {
                    s.phase = MigrationPhase::Failed {
                        reason: why.clone(),
                    }
                });
                failed(why)
            }
        };
        // The taps on this node's bridges before the guest runs; the guest then announces
        // itself there.
        if let Some(n) = &self.networks {
            if let Err(e) = n.join(&a.rec.ports).await {
                a.incoming.abort().await;
                let _ = n.leave(&a.rec.ports).await;
                remove_incoming_dir(&paths).await;
                return Err(fail(format!("cannot join the VM's networks: {e}")).await);
            }
        }
        let live = match a.incoming.activate().await {
            Ok(l) => l,
            Err(e) => {
                if let Some(n) = &self.networks {
                    let _ = n.leave(&a.rec.ports).await;
                }
                remove_incoming_dir(&paths).await;
                return Err(fail(format!(
                    "the VM did not start here: {}",
                    zy_common::error::chain(&e)
                ))
                .await);
            }
        };
        if let Err(e) = crate::vm::actor::save_record(&a.rec, &paths).await {
            // It runs, but an agent restart would not know it: it must not stay so.
            let mut live = live;
            live.stop(Duration::ZERO).await;
            if let Some(n) = &self.networks {
                let _ = n.leave(&a.rec.ports).await;
            }
            remove_incoming_dir(&paths).await;
            return Err(fail(format!("cannot record the VM: {e}")).await);
        }
        if let Err(e) = migration::write_marker(&paths.dir.join(MIGRATED_IN), mid) {
            // Without it a restarted agent could not tell a repeated command that the VM
            // runs here: it must not stay so.
            let mut live = live;
            live.stop(Duration::ZERO).await;
            if let Some(n) = &self.networks {
                let _ = n.leave(&a.rec.ports).await;
            }
            remove_incoming_dir(&paths).await;
            return Err(fail(format!("cannot record the migration's arrival: {e}")).await);
        }
        let _ = std::fs::remove_file(paths.dir.join(INCOMING));
        let _ = std::fs::remove_dir_all(paths.dir.join(TLS_DIR));
        self.vms
            .adopt(a.rec, live)
            .map_err(|e| failed(e.to_string()))?;
        mig.update(|s| s.phase = MigrationPhase::Active);
        info!(vm = %id, migration = %mid, "the migrated VM runs on this node");
        self.vm_info(id)
    }

    /// Whether VM `id` is an ordinary VM of this node that migration `mid` brought here.
    fn arrived_by(&self, id: VmId, mid: MigrationId) -> bool {
        let paths = VmPaths::new(self.vms.data_dir(), id);
        self.vms.get(id).is_some()
            && migration::read_marker(&paths.dir.join(MIGRATED_IN)) == Some(mid)
    }

    fn vm_info(&self, id: VmId) -> Result<VmInfo, ReplyError> {
        let h = self
            .vms
            .get(id)
            .ok_or_else(|| not_found(format!("VM {id} is not on this node")))?;
        let s = h.status.borrow().clone();
        Ok(VmInfo {
            id,
            name: h.name.clone(),
            state: s.state,
            pid: s.pid.map(|p| p as u32),
            intent: s.intent,
            generation: s.generation,
        })
    }

    // ---- source ----

    /// `MigrateOut`: starts migrating the running VM; `Done` once the engine runs.
    pub(super) async fn migrate_out(&self, o: MigrateOut) -> Result<(), ReplyError> {
        let id = o.vm;
        let migs = self.vms.migrations().clone();
        if migs.get(id).is_some_and(|m| m.id == o.migration) {
            return Ok(());
        }
        let Some(h) = self.vms.get(id) else {
            return Err(refused(format!("VM {id} is not on this node")));
        };
        if let Some(m) = migs.holding(id) {
            return Err(busy(format!(
                "VM {id} is migrating already (migration {})",
                m.id
            )));
        }
        let state = h.state();
        if state != zy_common::vm::VmState::Running {
            return Err(refused(format!(
                "VM {id} is {state} here, not running: only a running VM migrates"
            )));
        }
        for (i, d) in o.target.disks.iter().enumerate() {
            if d.export != format!("disk{i}") {
                return Err(refused(format!(
                    "the destination exports disk {i} as `{}`; this agent mirrors disk{i}",
                    d.export
                )));
            }
        }
        let tls = self.node_tls().await?;
        if o.dest == tls.node {
            return Err(refused("a VM cannot migrate from a node to itself"));
        }
        let paths = VmPaths::new(self.vms.data_dir(), id);
        let tls_dir = paths.dir.join(TLS_DIR);
        let d = tls_dir.clone();
        blocking(move || {
            engine::write_tls_dir(&d, &tls.ca_pem, &tls.cert_pem, &tls.key_pem)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(failed)?;
        let max_downtime = u64::from(o.max_downtime_ms);
        let plan = OutgoingPlan {
            syncs: o
                .target
                .disks
                .iter()
                .map(|d| match d.sync {
                    WireSync::Top => MirrorSync::Top,
                    WireSync::Full => MirrorSync::Full,
                })
                .collect(),
            nbd: o.target.nbd,
            stream: o.target.stream,
            tls: Tls {
                dir: tls_dir.clone(),
                peer_hostname: format!("{}.node.zhengyun", o.dest),
                peer_dn: String::new(),
            },
            limits: engine::Limits {
                max_bandwidth: u64::from(o.max_bandwidth_mib_s) << 20,
                downtime_ms: engine::Limits::default().downtime_ms.min(max_downtime),
                max_downtime_ms: max_downtime,
                ..self.limits()
            },
        };
        let sizes: Vec<u64> = o.target.disks.iter().map(|d| d.virtual_size).collect();
        let (d, held) = migs.claim(id, o.migration, Side::Source, vec![]);
        let mig = match (d, held) {
            (Decision::Busy(other), _) => {
                return Err(busy(format!(
                    "VM {id} is migrating already (migration {other})"
                )))
            }
            (Decision::Repeat, _) => return Ok(()),
            (Decision::Start, Some(m)) => m,
            _ => return Err(failed("the migration vanished")),
        };
        let (tx, rx) = oneshot::channel();
        let sent = h.send(Request::MigrateOut {
            migration: mig.clone(),
            plan: Box::new(plan),
            sizes,
            started: tx,
        });
        if let Err(e) = sent {
            migs.remove(id, o.migration);
            return Err(busy(e.to_string()));
        }
        // The TLS files go when the migration has ended.
        let watched = mig.clone();
        tokio::spawn(async move {
            let mut rx = watched.watch();
            let _ = rx.wait_for(|s| s.phase.is_end()).await;
            let _ = tokio::fs::remove_dir_all(&tls_dir).await;
        });
        info!(vm = %id, migration = %o.migration, dest = %o.dest, "migrating a VM out");
        match tokio::time::timeout(ANSWER_WAIT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(refused(why)),
            Ok(Err(_)) => Err(failed("the VM's actor stopped")),
            // Queued behind earlier work of the actor: it starts when that is done.
            Err(_) => Ok(()),
        }
    }

    /// `MigrateFinish`: the VM runs on the destination now; nothing of it stays here.
    pub(super) async fn migrate_finish(
        &self,
        mid: MigrationId,
        id: VmId,
    ) -> Result<(), ReplyError> {
        let mig = self.vms.migrations().get(id).filter(|m| m.id == mid);
        let Some(mig) = mig.filter(|m| m.side == Side::Source) else {
            if self.vms.get(id).is_none() {
                // Finished before (this agent restarted since), or never here.
                self.vms.mark_deleted(id);
                return Ok(());
            }
            return Err(refused(format!(
                "this node has no completed migration {mid} of VM {id}: it keeps the VM"
            )));
        };
        match mig.phase() {
            MigrationPhase::Finished => return Ok(()),
            MigrationPhase::Completed { .. } => {}
            p => {
                return Err(refused(format!(
                    "migration {mid} of VM {id} is {}, not completed: it cannot be finished",
                    p.as_str()
                )))
            }
        }
        // Marked first: a late intent for it must not make it again.
        self.vms.mark_deleted(id);
        if let Some(h) = self.vms.get(id) {
            if !h.ended() {
                let (tx, rx) = oneshot::channel();
                h.send(Request::Delete(tx))
                    .map_err(|e| busy(e.to_string()))?;
                let done = rx.await;
                if done.is_ok() || h.ended() {
                    self.vms.forget(id);
                }
                done.map_err(|_| failed("the VM's actor stopped"))?
                    .map_err(failed)?;
            }
            self.vms.forget(id);
        }
        mig.update(|s| s.phase = MigrationPhase::Finished);
        info!(vm = %id, migration = %mid, "migration finished; the VM is gone from this node");
        Ok(())
    }

    // ---- either side ----

    /// `MigrateStatus`.
    pub(super) fn migrate_status(
        &self,
        mid: MigrationId,
        id: VmId,
    ) -> Result<MigrationStatus, ReplyError> {
        self.vms
            .migrations()
            .get(id)
            .filter(|m| m.id == mid)
            .map(|m| m.status())
            .ok_or_else(|| {
                not_found(format!(
                    "this node knows no migration {mid} of VM {id} (never started, or its agent restarted)"
                ))
            })
    }

    /// `MigrateAbort`: the destination removes what it made; the source makes sure the
    /// guest runs as before.
    pub(super) async fn migrate_abort(&self, mid: MigrationId, id: VmId) -> Result<(), ReplyError> {
        let Some(mig) = self.vms.migrations().get(id).filter(|m| m.id == mid) else {
            if self.arrived_by(id, mid) {
                return Err(refused(format!(
                    "migration {mid} is activated: VM {id} runs on this node now"
                )));
            }
            return Ok(());
        };
        mig.cancel.store(true, Ordering::Relaxed);
        match mig.side {
            Side::Destination => {
                let phase = mig.ended(ANSWER_WAIT).await;
                if !phase.is_end() {
                    return Err(busy("the destination is still being readied; ask again"));
                }
                let mut arrival = mig.arrival.lock().await;
                if mig.phase() == MigrationPhase::Active {
                    return Err(refused(format!(
                        "migration {mid} is activated: VM {id} runs on this node now"
                    )));
                }
                if let Some(a) = arrival.take() {
                    a.incoming.abort().await;
                }
                remove_incoming_dir(&VmPaths::new(self.vms.data_dir(), id)).await;
                if !matches!(mig.phase(), MigrationPhase::Failed { .. }) {
                    mig.update(|s| s.phase = MigrationPhase::Cancelled);
                }
                Ok(())
            }
            Side::Source => match mig.ended(ANSWER_WAIT).await {
                MigrationPhase::Completed { .. } => {
                    let h = self
                        .vms
                        .get(id)
                        .ok_or_else(|| failed(format!("VM {id} vanished")))?;
                    let (tx, rx) = oneshot::channel();
                    h.send(Request::Resume(tx))
                        .map_err(|e| busy(e.to_string()))?;
                    match tokio::time::timeout(ANSWER_WAIT, rx).await {
                        Ok(Ok(Ok(()))) => {}
                        Ok(Ok(Err(why))) => {
                            return Err(failed(format!("cannot resume the guest: {why}")))
                        }
                        Ok(Err(_)) => return Err(failed("the VM's actor stopped")),
                        Err(_) => return Err(busy("the guest is being resumed; ask again")),
                    }
                    mig.update(|s| s.phase = MigrationPhase::Cancelled);
                    info!(vm = %id, migration = %mid, "completed migration aborted; the guest runs here again");
                    Ok(())
                }
                MigrationPhase::Finished => Err(refused(format!(
                    "migration {mid} is finished: VM {id} is gone from this node"
                ))),
                p if p.is_end() => Ok(()),
                _ => Err(busy("the migration is being cancelled; ask again")),
            },
        }
    }
}

/// Waits (bounded) until the destination listens, and answers where; or why it cannot.
async fn listening(mig: &Migration) -> Result<MigrateTarget, ReplyError> {
    let t0 = tokio::time::Instant::now();
    loop {
        if let Some(t) = mig.target.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(t);
        }
        match mig.phase() {
            MigrationPhase::Failed { reason } => {
                return Err(failed(format!(
                    "the destination cannot be readied: {reason}"
                )))
            }
            MigrationPhase::Cancelled => {
                return Err(refused(format!("migration {} was aborted", mig.id)))
            }
            _ => {}
        }
        if t0.elapsed() > ANSWER_WAIT {
            return Err(busy("the destination is still being readied; ask again"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Removes a destination's directory, but only one never activated (marked, no record).
async fn remove_incoming_dir(paths: &VmPaths) {
    if paths.dir.join(INCOMING).exists() && !paths.record().exists() {
        if let Err(e) = crate::vm::actor::remove_vm_dir(paths.dir.clone()).await {
            warn!(dir = %paths.dir.display(), error = %e, "cannot remove a migration's destination");
        }
    }
}

/// A disk image's virtual size (bytes).
fn virtual_size(path: &std::path::Path, format: &str) -> Result<u64, String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", format])
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    v["virtual-size"]
        .as_u64()
        .ok_or_else(|| "qemu-img info gave no virtual size".to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;
    use zy_common::image::ImageKind;
    use zy_common::proto::{
        CommandKind, MigrateIn, MigrateOut, MigrateTarget, MigrationEvent, MigrationPhase,
        ReplyErrorKind, ReplyKind, VmIntent, WireNic, WireVm,
    };
    use zy_common::tls::SiteCa;
    use zy_common::vm::{Desired, Generation, VmState};
    use zy_common::{MigrationId, NodeId, VmId};

    use crate::fake::{self, FakeBlobs, FakeNetworks, FakeRunner, TempDir};
    use crate::node::{Host, Node};
    use crate::vm::actor::VmEvent;
    use crate::vm::migration::{INCOMING, MIGRATED_OUT};
    use crate::vm::spec::VmPaths;

    /// One node on fakes, enrolled.
    struct Side {
        tmp: TempDir,
        runner: FakeRunner,
        nets: Arc<FakeNetworks>,
        id: NodeId,
    }

    impl Side {
        fn new(ca: &SiteCa, peer: bool) -> Self {
            let tmp = TempDir::new("mignode");
            let id = NodeId::new_random();
            fake::enroll(&tmp.0, ca, id, peer);
            Self {
                tmp,
                runner: FakeRunner::default(),
                nets: Arc::default(),
                id,
            }
        }

        async fn node(&self, blobs: &Arc<FakeBlobs>) -> (Arc<Node>, mpsc::Receiver<VmEvent>) {
            let host = Host {
                runner: Arc::new(self.runner.clone()),
                networks: Some(self.nets.clone()),
                blobs: blobs.clone(),
                consoles: Default::default(),
            };
            Node::with_host(host, &self.tmp.0, zy_common::proto::Accel::Tcg)
                .await
                .unwrap()
        }

        fn paths(&self, id: VmId) -> VmPaths {
            VmPaths::new(&self.tmp.0, id)
        }
    }

    struct World {
        _ca: SiteCa,
        blobs: Arc<FakeBlobs>,
        src: Side,
        dst: Side,
        vm: WireVm,
    }

    impl World {
        fn new() -> Self {
            Self::with_dst_kind(true)
        }

        fn with_dst_kind(peer: bool) -> Self {
            let (ca, _) = SiteCa::generate("test").unwrap();
            let blobs = Arc::new(FakeBlobs::default());
            let kernel = blobs.add(b"a kernel");
            let vm = WireVm {
                id: VmId::new_random(),
                name: "w1".into(),
                zone: zy_common::Zone::Intranet,
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
                image: ImageKind::Kernel {
                    kernel,
                    initrd: None,
                    cmdline: "console=ttyS0".into(),
                },
                nics: vec![WireNic {
                    vni: 5,
                    local: "127.0.0.1".parse().unwrap(),
                    mac: [2, 0, 0, 0, 0, 1],
                    ip: "192.168.5.2".parse().unwrap(),
                    prefix: 24,
                    gateway: None,
                    nameservers: vec![],
                    search: vec![],
                    peers: vec![],
                }],
                ssh_keys: vec![],
                user_data: None,
            };
            Self {
                src: Side::new(&ca, true),
                dst: Side::new(&ca, peer),
                _ca: ca,
                blobs,
                vm,
            }
        }

        fn migrate_in(&self, m: MigrationId) -> CommandKind {
            CommandKind::MigrateIn(Box::new(MigrateIn {
                migration: m,
                vm: self.vm.clone(),
                generation: Generation(7),
                source: self.src.id,
            }))
        }

        fn migrate_out(&self, m: MigrationId, target: MigrateTarget) -> CommandKind {
            CommandKind::MigrateOut(Box::new(MigrateOut {
                migration: m,
                vm: self.vm.id,
                dest: self.dst.id,
                target,
                max_bandwidth_mib_s: 100,
                max_downtime_ms: 300,
            }))
        }
    }

    fn ensure(vm: &WireVm, g: u64) -> CommandKind {
        CommandKind::EnsureVm(Box::new(VmIntent {
            vm: vm.clone(),
            desired: Desired::Running,
            generation: Generation(g),
            stop_grace_ms: 1000,
        }))
    }

    fn status(m: MigrationId, vm: VmId) -> CommandKind {
        CommandKind::MigrateStatus { migration: m, vm }
    }

    async fn phase_of(node: &Arc<Node>, m: MigrationId, vm: VmId) -> MigrationPhase {
        match node.handle(status(m, vm)).await {
            Ok(ReplyKind::Migration(s)) => s.phase,
            other => panic!("no status: {other:?}"),
        }
    }

    /// Waits (under the paused clock) until the migration reaches `want` on `node`.
    async fn until_phase(node: &Arc<Node>, m: MigrationId, vm: VmId, want: &str) {
        for _ in 0..600 {
            if phase_of(node, m, vm).await.as_str() == want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("never {want}: {:?}", phase_of(node, m, vm).await);
    }

    async fn running_source(w: &World) -> (Arc<Node>, mpsc::Receiver<VmEvent>) {
        let (src, mut ev) = w.src.node(&w.blobs).await;
        src.handle(ensure(&w.vm, 1)).await.unwrap();
        loop {
            let e = ev.recv().await.unwrap();
            if e.id == w.vm.id && e.status.state == VmState::Running {
                break;
            }
        }
        (src, ev)
    }

    async fn listening(node: &Arc<Node>, cmd: CommandKind) -> MigrateTarget {
        match node.handle(cmd).await {
            Ok(ReplyKind::MigrateListening(t)) => t,
            other => panic!("not listening: {other:?}"),
        }
    }

    fn err_kind(r: Result<ReplyKind, zy_common::proto::ReplyError>) -> ReplyErrorKind {
        r.expect_err("an error").kind
    }

    fn drain(rx: &mut mpsc::Receiver<MigrationEvent>) -> Vec<MigrationEvent> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    /// The whole sequence: in, out, completed, activated, finished; every repeat a no-op;
    /// the VM busy while it migrates and gone from the source at the end.
    #[tokio::test(start_paused = true)]
    async fn a_vm_migrates_activates_and_the_source_forgets_it() {
        let w = World::new();
        let (src, _ev) = running_source(&w).await;
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        let id = w.vm.id;
        let m = MigrationId::new_random();
        let target = listening(&dst, w.migrate_in(m)).await;
        assert_eq!(target.disks.len(), 1);
        assert_eq!(target.disks[0].virtual_size, 1 << 30);
        assert_ne!(target.nbd.port(), target.stream.port());
        // A repeat answers the same target.
        assert_eq!(listening(&dst, w.migrate_in(m)).await, target);
        let dir = w.dst.paths(id).dir;
        assert!(dir.join(INCOMING).exists() && w.dst.runner.receiving(id));
        assert!(
            dst.vms.get(id).is_none(),
            "not a VM of the node before activation"
        );
        assert!(dst.report().vms.is_empty());

        let mut events = src.migration_events.lock().await;
        w.src.runner.hold_switchover();
        assert_eq!(
            src.handle(w.migrate_out(m, target.clone())).await,
            Ok(ReplyKind::Done)
        );
        assert_eq!(
            src.handle(w.migrate_out(m, target.clone())).await,
            Ok(ReplyKind::Done),
            "a repeat"
        );
        until_phase(&src, m, id, "memory").await;
        // Busy while it migrates: intents, deletes, another migration.
        assert_eq!(
            err_kind(src.handle(ensure(&w.vm, 2)).await),
            ReplyErrorKind::Busy
        );
        let del = CommandKind::DeleteVm {
            id,
            generation: Generation(3),
        };
        assert_eq!(
            err_kind(src.handle(del.clone()).await),
            ReplyErrorKind::Busy
        );
        let other = MigrationId::new_random();
        assert_eq!(
            err_kind(src.handle(w.migrate_out(other, target.clone())).await),
            ReplyErrorKind::Busy
        );
        // Progress at least once a second while it waits.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let seen = drain(&mut events);
        assert!(seen.len() >= 3, "{seen:?}");
        w.src.runner.release_switchover();
        until_phase(&src, m, id, "completed").await;
        let seen = drain(&mut events);
        assert!(
            matches!(
                seen.last().map(|e| &e.status.phase),
                Some(MigrationPhase::Completed {
                    downtime_ms: 42,
                    total_ms: 800
                })
            ),
            "{seen:?}"
        );
        assert!(w.src.runner.paused(id));
        assert!(w.src.paths(id).dir.join(MIGRATED_OUT).exists(), "recorded");
        // Still busy: the guest is paused, not gone.
        assert_eq!(
            err_kind(src.handle(del.clone()).await),
            ReplyErrorKind::Busy
        );

        // Activation waits for the VM's arrival.
        let act = CommandKind::MigrateActivate {
            migration: m,
            vm: id,
        };
        assert_eq!(
            err_kind(dst.handle(act.clone()).await),
            ReplyErrorKind::Busy
        );
        w.dst.runner.arrive(id, Ok(()));
        until_phase(&dst, m, id, "completed").await;
        let info = match dst.handle(act.clone()).await {
            Ok(ReplyKind::Vm(i)) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(info.intent, Generation(7));
        assert!(w.dst.runner.announced(id));
        assert_eq!(
            w.dst
                .nets
                .port(&format!("zyt{}0", &id.to_string().replace('-', "")[..8])),
            Some(5)
        );
        assert!(!dir.join(INCOMING).exists() && w.dst.paths(id).record().exists());
        assert!(dst.vms.get(id).is_some());
        // A repeat answers the same VM.
        assert!(matches!(dst.handle(act).await, Ok(ReplyKind::Vm(i)) if i.id == id));
        assert_eq!(phase_of(&dst, m, id).await, MigrationPhase::Active);

        let fin = CommandKind::MigrateFinish {
            migration: m,
            vm: id,
        };
        assert_eq!(src.handle(fin.clone()).await, Ok(ReplyKind::Done));
        assert_eq!(
            src.handle(fin.clone()).await,
            Ok(ReplyKind::Done),
            "a repeat"
        );
        assert!(src.vms.get(id).is_none());
        assert!(!w.src.paths(id).dir.exists(), "nothing left");
        assert_eq!(w.src.runner.pid(id), None);
        assert!(src.report().vms.is_empty());
        assert_eq!(w.src.nets.segments(), Vec::<u32>::new());
        assert_eq!(phase_of(&src, m, id).await, MigrationPhase::Finished);
        // Later intents for it are late news.
        assert_eq!(
            err_kind(src.handle(ensure(&w.vm, 9)).await),
            ReplyErrorKind::Refused
        );
        // An abort after the finish cannot bring it back.
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(err_kind(src.handle(abort).await), ReplyErrorKind::Refused);
    }

    /// An abort after `Completed` (the destination aborted first): the guest runs here
    /// again, and the VM is an ordinary one once more.
    #[tokio::test(start_paused = true)]
    async fn an_abort_after_completion_resumes_the_source_and_cleans_the_destination() {
        let w = World::new();
        let (src, _ev) = running_source(&w).await;
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        let id = w.vm.id;
        let m = MigrationId::new_random();
        let target = listening(&dst, w.migrate_in(m)).await;
        src.handle(w.migrate_out(m, target)).await.unwrap();
        until_phase(&src, m, id, "completed").await;
        w.dst.runner.arrive(id, Ok(()));
        until_phase(&dst, m, id, "completed").await;
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(dst.handle(abort.clone()).await, Ok(ReplyKind::Done));
        assert!(!w.dst.paths(id).dir.exists() && !w.dst.runner.receiving(id));
        assert_eq!(
            dst.handle(abort.clone()).await,
            Ok(ReplyKind::Done),
            "a repeat"
        );
        assert_eq!(
            err_kind(
                dst.handle(CommandKind::MigrateActivate {
                    migration: m,
                    vm: id
                })
                .await
            ),
            ReplyErrorKind::Refused
        );
        assert_eq!(src.handle(abort.clone()).await, Ok(ReplyKind::Done));
        assert!(!w.src.runner.paused(id));
        assert_eq!(w.src.runner.resumes(id), 1);
        assert!(!w.src.paths(id).dir.join(MIGRATED_OUT).exists());
        assert_eq!(phase_of(&src, m, id).await, MigrationPhase::Cancelled);
        assert_eq!(src.handle(abort).await, Ok(ReplyKind::Done), "a repeat");
        assert_eq!(w.src.runner.resumes(id), 1);
        // An ordinary VM again: intents are taken.
        assert!(matches!(
            src.handle(ensure(&w.vm, 2)).await,
            Ok(ReplyKind::Vm(_))
        ));
        // Finishing an aborted migration is refused: the VM stays.
        let fin = CommandKind::MigrateFinish {
            migration: m,
            vm: id,
        };
        assert_eq!(err_kind(src.handle(fin).await), ReplyErrorKind::Refused);
        assert!(src.vms.get(id).is_some());
    }

    /// An abort while it runs cancels it: the guest runs on; a failed one leaves it
    /// running too; a new migration may follow either.
    #[tokio::test(start_paused = true)]
    async fn an_abort_or_a_failure_under_way_leaves_the_source_running() {
        let w = World::new();
        let (src, _ev) = running_source(&w).await;
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        let id = w.vm.id;
        let m = MigrationId::new_random();
        let target = listening(&dst, w.migrate_in(m)).await;
        w.src.runner.hold_switchover();
        src.handle(w.migrate_out(m, target.clone())).await.unwrap();
        until_phase(&src, m, id, "memory").await;
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(src.handle(abort.clone()).await, Ok(ReplyKind::Done));
        assert_eq!(phase_of(&src, m, id).await, MigrationPhase::Cancelled);
        assert!(!w.src.runner.paused(id) && w.src.runner.pid(id).is_some());
        assert_eq!(dst.handle(abort).await, Ok(ReplyKind::Done));
        assert!(!w.dst.paths(id).dir.exists());
        assert_eq!(phase_of(&dst, m, id).await, MigrationPhase::Cancelled);

        // A second attempt, which fails: the VM runs on, and is no longer held.
        let m2 = MigrationId::new_random();
        let target = listening(&dst, w.migrate_in(m2)).await;
        w.src.runner.release_switchover();
        w.src
            .runner
            .fail_migration(id, "the destination QEMU is gone");
        src.handle(w.migrate_out(m2, target)).await.unwrap();
        until_phase(&src, m2, id, "failed").await;
        match phase_of(&src, m2, id).await {
            MigrationPhase::Failed { reason } => {
                assert!(reason.contains("QEMU is gone"), "{reason}")
            }
            p => panic!("{p:?}"),
        }
        assert!(w.src.runner.pid(id).is_some() && !w.src.runner.paused(id));
        assert!(matches!(
            src.handle(ensure(&w.vm, 2)).await,
            Ok(ReplyKind::Vm(_))
        ));
        // The destination's stream fails too; it cleans up by itself.
        w.dst.runner.arrive(id, Err("the source went away"));
        until_phase(&dst, m2, id, "failed").await;
        assert!(!w.dst.paths(id).dir.exists() && !w.dst.runner.receiving(id));
    }

    /// What is refused, with why: a VM that does not run here, a destination whose
    /// certificate cannot serve TLS, a VM the destination has already.
    #[tokio::test(start_paused = true)]
    async fn bad_requests_are_refused_and_change_nothing() {
        let w = World::with_dst_kind(false);
        let (src, _ev) = w.src.node(&w.blobs).await;
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        let m = MigrationId::new_random();
        let e = dst.handle(w.migrate_in(m)).await.unwrap_err();
        assert_eq!(e.kind, ReplyErrorKind::Refused);
        assert!(e.message.contains("keyEncipherment"), "{}", e.message);
        assert!(!w.dst.paths(w.vm.id).dir.exists());
        let target = MigrateTarget {
            nbd: "127.0.0.1:1000".parse().unwrap(),
            stream: "127.0.0.1:1001".parse().unwrap(),
            disks: vec![],
        };
        let e = src.handle(w.migrate_out(m, target)).await.unwrap_err();
        assert_eq!(e.kind, ReplyErrorKind::Refused);
        assert!(e.message.contains("not on this node"), "{}", e.message);
        // Unknown migrations: status and activation not found; abort and finish done.
        let id = w.vm.id;
        assert_eq!(
            err_kind(dst.handle(status(m, id)).await),
            ReplyErrorKind::NotFound
        );
        assert_eq!(
            err_kind(
                dst.handle(CommandKind::MigrateActivate {
                    migration: m,
                    vm: id
                })
                .await
            ),
            ReplyErrorKind::NotFound
        );
        assert_eq!(
            dst.handle(CommandKind::MigrateAbort {
                migration: m,
                vm: id
            })
            .await,
            Ok(ReplyKind::Done)
        );
        // A VM of another zone.
        let w = World::new();
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        let mut other = w.migrate_in(m);
        if let CommandKind::MigrateIn(i) = &mut other {
            i.vm.zone = zy_common::Zone::Extranet;
        }
        let e = dst.handle(other).await.unwrap_err();
        assert_eq!(e.kind, ReplyErrorKind::Refused);
        assert!(e.message.contains("zones never mix"), "{}", e.message);
        drop(dst);
        // A VM the destination has already.
        let w = World::new();
        let (dst, mut ev) = w.dst.node(&w.blobs).await;
        dst.handle(ensure(&w.vm, 1)).await.unwrap();
        while ev.recv().await.unwrap().status.state != VmState::Running {}
        let e = dst.handle(w.migrate_in(m)).await.unwrap_err();
        assert_eq!(e.kind, ReplyErrorKind::Refused);
        assert!(e.message.contains("already"), "{}", e.message);
    }

    /// Agent restarts: a destination before activation is removed (its QEMU killed) and
    /// the migration unknown; a source after `Completed` keeps the guest paused and the
    /// migration held until an abort resumes it; one under way is undone.
    /// Review finding: a destination whose agent restarted after activating answered a
    /// repeated MigrateActivate NotFound, which the coordinator takes for "never ran here"
    /// and resumes the source: the guest ran twice. An activated VM is an ordinary VM of the
    /// node, and a repeat must say so.
    #[tokio::test(start_paused = true)]
    async fn a_destination_restarted_after_activation_still_answers_the_vm() {
        let w = World::new();
        let (src, _ev) = running_source(&w).await;
        let (dst, dev) = w.dst.node(&w.blobs).await;
        let id = w.vm.id;
        let m = MigrationId::new_random();
        let target = listening(&dst, w.migrate_in(m)).await;
        src.handle(w.migrate_out(m, target)).await.unwrap();
        until_phase(&src, m, id, "completed").await;
        w.dst.runner.arrive(id, Ok(()));
        until_phase(&dst, m, id, "completed").await;
        let act = CommandKind::MigrateActivate {
            migration: m,
            vm: id,
        };
        assert!(matches!(
            dst.handle(act.clone()).await,
            Ok(ReplyKind::Vm(_))
        ));
        // The destination's agent restarts before the coordinator heard the answer.
        let st = dst.vms.get(id).unwrap().status.clone();
        drop((dst, dev));
        fake::ended(st).await;
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        fake::settle().await;
        assert!(dst.vms.get(id).is_some(), "re-attached as an ordinary VM");
        assert!(
            matches!(dst.handle(act).await, Ok(ReplyKind::Vm(i)) if i.id == id),
            "a repeat after the restart says the VM runs here"
        );
        // And an abort there is refused: the VM runs here.
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(err_kind(dst.handle(abort).await), ReplyErrorKind::Refused);
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_remove_the_destination_and_keep_a_completed_source_paused() {
        let w = World::new();
        let (src, ev) = running_source(&w).await;
        let (dst, dev) = w.dst.node(&w.blobs).await;
        let id = w.vm.id;
        let m = MigrationId::new_random();
        let target = listening(&dst, w.migrate_in(m)).await;
        src.handle(w.migrate_out(m, target)).await.unwrap();
        until_phase(&src, m, id, "completed").await;
        // Both agents stop.
        let st = src.vms.get(id).unwrap().status.clone();
        drop((src, ev, dst, dev));
        fake::ended(st).await;
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        assert!(!w.dst.paths(id).dir.exists(), "the destination is removed");
        assert!(!w.dst.runner.receiving(id), "its QEMU killed");
        assert_eq!(
            err_kind(dst.handle(status(m, id)).await),
            ReplyErrorKind::NotFound
        );
        assert_eq!(
            err_kind(
                dst.handle(CommandKind::MigrateActivate {
                    migration: m,
                    vm: id
                })
                .await
            ),
            ReplyErrorKind::NotFound
        );
        let (src, _ev) = w.src.node(&w.blobs).await;
        fake::settle().await;
        assert!(w.src.runner.paused(id), "still paused");
        assert_eq!(w.src.runner.starts(id), 1, "never started again");
        assert!(matches!(
            phase_of(&src, m, id).await,
            MigrationPhase::Completed { .. }
        ));
        assert_eq!(
            err_kind(src.handle(ensure(&w.vm, 5)).await),
            ReplyErrorKind::Busy
        );
        let abort = CommandKind::MigrateAbort {
            migration: m,
            vm: id,
        };
        assert_eq!(src.handle(abort).await, Ok(ReplyKind::Done));
        assert!(!w.src.runner.paused(id));

        // A migration under way when the agent stops is undone by the next one.
        let m2 = MigrationId::new_random();
        let (dst, _dev) = w.dst.node(&w.blobs).await;
        let target = listening(&dst, w.migrate_in(m2)).await;
        w.src.runner.hold_switchover();
        src.handle(w.migrate_out(m2, target)).await.unwrap();
        until_phase(&src, m2, id, "memory").await;
        let st = src.vms.get(id).unwrap().status.clone();
        drop(src);
        fake::ended(st).await;
        let (src, _ev) = w.src.node(&w.blobs).await;
        fake::settle().await;
        assert_eq!(
            err_kind(src.handle(status(m2, id)).await),
            ReplyErrorKind::NotFound
        );
        assert!(w.src.runner.pid(id).is_some() && !w.src.runner.paused(id));
        assert!(matches!(
            src.handle(ensure(&w.vm, 6)).await,
            Ok(ReplyKind::Vm(_))
        ));
    }
}
