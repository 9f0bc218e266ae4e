//! Live migration of a VM with local disks, QEMU to QEMU: the disks by NBD mirror jobs, the
//! memory and device state by QEMU's migration stream, both under QEMU's own TLS.
//!
//! # Why QEMU's own TLS
//!
//! Both streams use `tls-creds-x509` objects made from certificates that the site CA
//! issued to the two nodes: the destination serves its NBD export (`nbd-server-start
//! tls-creds`) and its incoming stream (`migrate-set-parameters tls-creds`) as a TLS server
//! that demands a client certificate, and accepts only the source node's subject
//! (`authz-simple` objects as `tls-authz`: QEMU 10 has both); the source checks the
//! destination's certificate against the destination node's name (`tls-hostname`). So the
//! bytes go from QEMU to QEMU without a copy through the agent, and nothing of a guest
//! crosses the backbone in clear or reaches a QEMU that is not the expected node's. The
//! alternative, carrying QEMU's unix-socket streams over the agents' own QUIC link (as
//! Incus and Proxmox tunnel theirs), costs two copies per byte in the agents and a
//! multiplexing protocol of our own, for no gain in trust: both ends are then our QEMUs
//! holding the same CA's certificates either way.
//!
//! A migration needs [`zy_common::tls::SiteCa::issue_node_peer`]'s certificates
//! (serverAuth and clientAuth, digitalSignature and keyEncipherment, the same subject and
//! `<node>.node.zhengyun` name), which enrollment and renewal issue since protocol version 4.
//! The client-only kind issued before ([`zy_common::tls::SiteCa::issue_node`]: clientAuth,
//! digitalSignature) cannot serve QEMU's TLS ("usage does not permit key encipherment",
//! QEMU 10.0.2); a node still holding one refuses to be a destination, saying so
//! ([`zy_common::tls::check_serves_tls`]), until its next renewal. QEMU reads them from a
//! directory with fixed file names ([`write_tls_dir`]).
//!
//! # Convergence
//!
//! Postcopy is not used: with TLS on the NBD stream it is not supported (libvirt refuses
//! the combination), and a postcopy that fails half way loses the guest, whose memory is
//! then split between two hosts. So the
//! memory converges by auto-converge (QEMU throttles the guest's vCPUs while it dirties
//! memory faster than it is sent) and by escalating the downtime limit, as Proxmox does:
//! when `remaining` has grown for [`Limits::grow_polls`] polls in a row, the limit doubles,
//! up to [`Limits::max_downtime_ms`]; past the overall time limit the migration is
//! abandoned and the source keeps running. The disks converge because the mirrors are
//! switched to write-blocking (active) mode once READY: every guest write then completes
//! on both sides before the guest sees it.
//!
//! # Disks
//!
//! The destination makes one qcow2 per source disk of exactly its virtual size (a
//! mirror's target must match). A disk whose source is an overlay on a cached base image
//! gets an overlay on the same base on the destination (the base is content-addressed, so
//! the same hash is the same bytes) and the source mirrors with `sync=top`: only the
//! overlay's clusters cross. A standalone disk gets an empty qcow2 and `sync=full`. Both
//! are implemented; the caller says per disk whether the destination has the base
//! ([`TargetDisk::base`]).
//!
//! # Sequence (QMP, as run on QEMU 10.0)
//!
//! ```text
//!   source QEMU (running)                         destination QEMU (-S -incoming defer)
//!                                                 object-add tls-creds-x509 (server, verify-peer)
//!                                                 object-add authz-simple (source's DN)
//!                                                 nbd-server-start {addr, tls-creds, tls-authz}
//!                                                 block-export-add {nbd, diskN, writable}
//!                                                 migrate-set-parameters {tls-creds, tls-authz}
//!                                                 migrate-incoming {tcp:..., exit-on-error: false}
//!   object-add tls-creds-x509 (client)
//!   blockdev-add {nbd, tls-creds, tls-hostname} ──NBD/TLS──▶ export diskN
//!   blockdev-mirror {diskN → nbd, sync top|full, auto-dismiss false}
//!   ... BLOCK_JOB_READY on every disk (polled: query-block-jobs `ready`)
//!   block-job-change {copy-mode: write-blocking} ... `actively-synced`
//!   migrate-set-capabilities {events, auto-converge, pause-before-switchover}
//!   migrate-set-parameters {max-bandwidth, downtime-limit, tls-creds, tls-hostname}
//!   migrate {tcp:...}                       ──RAM/TLS──▶
//!   poll query-migrate: progress; downtime-limit ×2 while `remaining` grows
//!   status pre-switchover (guest paused):
//!     block-job-cancel {force: false} each ... concluded without error (a point-in-time
//!     copy: BLOCK_JOB_COMPLETED), job-dismiss
//!     migrate-continue {pre-switchover}      ──device state──▶
//!   status completed (source: postmigrate): downtime, total-time
//!   blockdev-del the NBD nodes, object-del the creds
//!                                                 query-migrate completed (paused)
//!                                                 block-export-del, nbd-server-stop, cont
//!                                                 query-status running
//! ```
//!
//! The destination's states ([`Incoming`]):
//!
//! ```text
//!   prepare ─▶ Listening ─(mirrors, then the stream)─▶ Arrived (paused) ─activate─▶ Running
//!                 │ failed / cancelled / timed out          │ activate failed     (the caller's)
//!                 ▼                                         ▼
//!              Aborted: its QEMU killed, every file made for it removed
//! ```
//!
//! There is no version negotiation of our own: the two QEMUs negotiate their stream, and
//! the destination runs the source's spec (same machine type and devices); the agents'
//! wire protocol, which carries the plan, is versioned as every message is.
//!
//! On any failure on the source: `migrate_cancel`, a forced `block-job-cancel` of every
//! mirror and `job-dismiss`, `blockdev-del` of every NBD node (Incus PR #4054: leftover
//! nodes break the next attempt), `object-del` of the creds, and `cont` if the guest was left
//! paused (at pre-switchover): the source keeps running as before. On the destination, any
//! failure or a cancel kills its QEMU and removes every file it made ([`Incoming::abort`];
//! dropping an [`Incoming`] does the same, synchronously).
//!
//! Every wait has a time limit ([`Limits`]), and both sides can be cancelled (an
//! [`AtomicBool`] checked at every poll). Progress is reported through a callback. This
//! module is the engine only: the protocol's commands (version 4) drive it through the
//! node (`node::migrate`), the VM's actor runs the source's part on its QEMU, and
//! [`super::migration`] holds each side's state; the coordinator's durable operation
//! drives the nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{info, warn};

use super::console::Consoles;
use super::qmp::{Qmp, QmpError};
use super::runner::{self, Launched, RunError, Supervisor};
use super::spec::{BaseImage, DiskSpec, VmPaths, VmSpec};

/// How often a migration's state is polled.
const POLL: Duration = Duration::from_millis(100);
/// The QOM id of the TLS credentials a migration adds to a QEMU.
const CREDS: &str = "zymig-tls";
/// The QOM id of the destination's authorization of the source's certificate.
const AUTHZ: &str = "zymig-authz";

/// What went wrong migrating a VM.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot make the target disk {path}: {why}")]
    TargetDisk { path: PathBuf, why: String },
    #[error("cannot write the TLS files in {path}")]
    TlsFiles {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the destination has {dest} disks for the source's {source_disks}")]
    DiskCount { dest: usize, source_disks: usize },
    #[error("the plan has {plan} disks to mirror for the VM's {vm}")]
    PlanDisks { plan: usize, vm: usize },
    #[error("disk {disk} is {here} bytes here, but the destination made a target of {there}")]
    DiskSize { disk: usize, here: u64, there: u64 },
    #[error("disk {0} has no base image: it can only be mirrored in full")]
    TopWithoutBase(usize),
    #[error("QEMU reported nothing usable for disk node {0}")]
    DiskInfo(String),
    #[error("the mirror of {job} failed: {why}")]
    Mirror { job: String, why: String },
    #[error("the migration failed ({status}): {why}")]
    Failed { status: String, why: String },
    #[error("the destination is not running after the migration but {0}")]
    NotRunning(String),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: &'static str, after: Duration },
    #[error("cancelled")]
    Cancelled,
}

/// Time and rate limits of one migration.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes per second for the memory stream, and for the mirrors together (each disk
    /// gets its share).
    pub max_bandwidth: u64,
    /// The downtime QEMU aims at first (ms).
    pub downtime_ms: u64,
    /// The downtime limit is never raised above this (ms).
    pub max_downtime_ms: u64,
    /// Polls in a row where `remaining` grew before the downtime limit doubles.
    pub grow_polls: u32,
    /// Until every mirror is READY and actively synced.
    pub mirror_timeout: Duration,
    /// From `migrate` to `completed`.
    pub memory_timeout: Duration,
    /// For a mirror to conclude after its cancel (at switchover, or on failure).
    pub cancel_timeout: Duration,
    /// For the destination: from `migrate-incoming` to `completed`.
    pub incoming_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // 1 GiB/s: a 10 Gbit/s backbone, most of it.
            max_bandwidth: 1 << 30,
            downtime_ms: 100,
            max_downtime_ms: 2000,
            // Five seconds of growth at one poll per 100 ms.
            grow_polls: 50,
            mirror_timeout: Duration::from_secs(3600),
            memory_timeout: Duration::from_secs(1800),
            cancel_timeout: Duration::from_secs(60),
            incoming_timeout: Duration::from_secs(2 * 3600),
        }
    }
}

/// TLS for one side of a migration.
#[derive(Clone, Debug)]
pub struct Tls {
    /// A directory as [`write_tls_dir`] makes it.
    pub dir: PathBuf,
    /// On the source: the name the destination's certificate must carry
    /// (`<node>.node.zhengyun`). On the destination: unused.
    pub peer_hostname: String,
    /// On the destination: the one client certificate subject accepted (the source node's,
    /// as [`peer_dn`] writes it). On the source: unused.
    pub peer_dn: String,
}

/// The subject of a node's certificate as QEMU's `tls-authz` compares it (gnutls's
/// RFC 4514 form of the subject that [`zy_common::tls::SiteCa`] writes).
pub fn peer_dn(node: zy_common::NodeId, zone: zy_common::Zone) -> String {
    format!("O=Zhengyun,OU={},CN={node}", zone.as_str())
}

/// Writes the files QEMU's `tls-creds-x509` reads from `dir`: the site CA, and the node's
/// certificate and key as both server and client (`server-cert.pem`, `client-cert.pem`...).
/// The keys are readable by their owner only.
pub fn write_tls_dir(
    dir: &Path,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), MigrateError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MigrateError::TlsFiles { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    for (name, text, mode) in [
        ("ca-cert.pem", ca_pem, 0o644),
        ("server-cert.pem", cert_pem, 0o644),
        ("client-cert.pem", cert_pem, 0o644),
        ("server-key.pem", key_pem, 0o600),
        ("client-key.pem", key_pem, 0o600),
    ] {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(err(&path))?;
        f.write_all(text.as_bytes()).map_err(err(&path))?;
    }
    Ok(())
}

/// A source disk, as the destination needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceDisk {
    /// The QEMU node the guest's device uses (`diskN`), also the NBD export's name.
    pub node: String,
    /// Bytes, exactly.
    pub virtual_size: u64,
}

/// The source's disks and their virtual sizes, read from its QEMU.
pub async fn source_disks(qmp: &mut Qmp, spec: &VmSpec) -> Result<Vec<SourceDisk>, MigrateError> {
    let nodes = qmp.execute("query-named-block-nodes", None).await?;
    let mut out = Vec::new();
    for i in 0..spec.disks.len() {
        let node = format!("disk{i}");
        let size = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["node-name"] == node.as_str())
            .and_then(|n| n["image"]["virtual-size"].as_u64())
            .ok_or_else(|| MigrateError::DiskInfo(node.clone()))?;
        out.push(SourceDisk {
            node,
            virtual_size: size,
        });
    }
    Ok(out)
}

/// Checks that the source's disks are of the sizes the destination made its targets:
/// a mirror to a target of another size fails late, or worse, copies a truncated disk.
pub async fn check_sizes(qmp: &mut Qmp, spec: &VmSpec, sizes: &[u64]) -> Result<(), MigrateError> {
    if sizes.len() != spec.disks.len() {
        return Err(MigrateError::PlanDisks {
            plan: sizes.len(),
            vm: spec.disks.len(),
        });
    }
    let here = source_disks(qmp, spec).await?;
    for (i, (h, there)) in here.iter().zip(sizes).enumerate() {
        if h.virtual_size != *there {
            return Err(MigrateError::DiskSize {
                disk: i,
                here: h.virtual_size,
                there: *there,
            });
        }
    }
    Ok(())
}

/// Tells the guest's network where it is now, once it runs on the destination: QEMU sends
/// gratuitous ARP/RARP frames from every NIC (`announce-self`, five rounds from 50 ms), so
/// that the bridges' FDBs and the peers' ARP caches learn the new place at once. Best
/// effort: a failure is logged (the guest's own traffic teaches them soon after).
pub async fn announce(qmp: &mut Qmp) {
    let r = qmp
        .execute(
            "announce-self",
            Some(json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})),
        )
        .await;
    if let Err(e) = r {
        warn!(error = %e, "cannot announce the migrated guest on its networks");
    }
}

/// After an agent restart, what is left of a migration in the source's QEMU. One under
/// way (the agent that drove it is gone) is cancelled and undone as a failed one is: the
/// mirrors and NBD nodes of this module's names go, and the guest runs again. One that
/// completed (the guest in `postmigrate`) is left as it is: whether it may run again is
/// for the caller to decide.
pub async fn recover_out(qmp: &mut Qmp, spec: &VmSpec) -> super::runner::Recovered {
    use super::runner::Recovered;
    let vm = spec.id;
    let m = match qmp.execute("query-migrate", None).await {
        Ok(m) => m,
        Err(e) => {
            warn!(%vm, error = %e, "cannot query the VM's migration state after a restart");
            return Recovered::Nothing;
        }
    };
    let status = m["status"].as_str().unwrap_or("").to_string();
    let run_state = qmp.status().await.unwrap_or_default();
    if status == "completed" && run_state != "running" {
        return Recovered::Completed;
    }
    let jobs: Vec<String> = jobs(qmp)
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|j| j["device"].as_str())
        .filter(|d| d.starts_with("zymig-"))
        .map(str::to_string)
        .collect();
    let nbd_nodes: Vec<String> = qmp
        .execute("query-named-block-nodes", None)
        .await
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("zymig-nbd"))
        .map(str::to_string)
        .collect();
    let migrating = matches!(
        status.as_str(),
        "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
    );
    if !migrating && jobs.is_empty() && nbd_nodes.is_empty() && run_state == "running" {
        return Recovered::Nothing;
    }
    info!(%vm, %status, jobs = jobs.len(), "a migration was under way when the agent stopped; undoing it");
    let made = Made {
        creds: true,
        nbd_nodes,
        jobs,
        migrating,
    };
    undo_out(qmp, spec, &made, &Limits::default()).await;
    Recovered::Undone
}

/// One disk to make on the destination.
#[derive(Clone, Debug)]
pub struct TargetDisk {
    /// Where the destination's qcow2 goes (it must not exist).
    pub path: PathBuf,
    /// Its virtual size: exactly the source disk's.
    pub virtual_size: u64,
    /// The destination's copy of the source disk's base image, when it has it: the target
    /// is then an overlay on it and the source mirrors only its top (`sync=top`).
    pub base: Option<BaseImage>,
}

/// What the destination needs to receive a VM.
#[derive(Clone, Debug)]
pub struct IncomingPlan {
    /// The VM's spec as the source runs it (its disks are replaced by [`Self::disks`]).
    pub spec: VmSpec,
    /// The destination's directory for the VM.
    pub paths: VmPaths,
    pub disks: Vec<TargetDisk>,
    /// Where the NBD server listens.
    pub nbd: SocketAddr,
    /// Where the migration stream is received.
    pub stream: SocketAddr,
    pub tls: Tls,
    pub limits: Limits,
}

/// A VM being received: its paused QEMU, and what was made for it.
#[derive(Debug)]
pub struct Incoming {
    launched: Option<Launched>,
    spec: VmSpec,
    made_files: Vec<PathBuf>,
    made_dir: Option<PathBuf>,
    limits: Limits,
}

fn inet(addr: SocketAddr) -> Value {
    json!({"host": addr.ip().to_string(), "port": addr.port().to_string()})
}

fn tcp_uri(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("tcp:{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("tcp:[{}]:{}", a.ip(), a.port()),
    }
}

fn qemu_img_create(disk: &TargetDisk) -> Result<(), MigrateError> {
    let fail = |why: String| MigrateError::TargetDisk {
        path: disk.path.clone(),
        why,
    };
    if disk.path.exists() {
        return Err(fail("it exists already".into()));
    }
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = &disk.base {
        cmd.arg("-F").arg(&b.format).arg("-b").arg(&b.path);
    }
    cmd.arg(&disk.path).arg(disk.virtual_size.to_string());
    let out = cmd.output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

impl Incoming {
    /// Makes the target disks, starts the destination QEMU paused and waiting, opens the
    /// NBD export of every disk and listens for the migration stream. On failure, nothing
    /// it made is left.
    pub async fn prepare(
        qemu: &Path,
        sup: &Supervisor,
        consoles: &Consoles,
        plan: IncomingPlan,
    ) -> Result<Self, MigrateError> {
        if plan.disks.len() != plan.spec.disks.len() {
            return Err(MigrateError::DiskCount {
                dest: plan.disks.len(),
                source_disks: plan.spec.disks.len(),
            });
        }
        let mut spec = plan.spec.clone();
        spec.disks = plan
            .disks
            .iter()
            .map(|t| DiskSpec {
                path: t.path.clone(),
                format: "qcow2".into(),
                base: t.base.clone(),
            })
            .collect();
        let args = spec.incoming_args(&plan.paths).map_err(RunError::from)?;
        let mut me = Self {
            launched: None,
            spec: spec.clone(),
            made_files: Vec::new(),
            made_dir: (!plan.paths.dir.exists()).then(|| plan.paths.dir.clone()),
            limits: plan.limits.clone(),
        };
        match me.start(qemu, sup, consoles, &plan, args).await {
            Ok(()) => Ok(me),
            Err(e) => {
                me.abort().await;
                Err(e)
            }
        }
    }

    async fn start(
        &mut self,
        qemu: &Path,
        sup: &Supervisor,
        consoles: &Consoles,
        plan: &IncomingPlan,
        args: Vec<String>,
    ) -> Result<(), MigrateError> {
        for d in &plan.disks {
            qemu_img_create(d)?;
            self.made_files.push(d.path.clone());
        }
        let l = runner::launch_args(qemu, &self.spec, &plan.paths, sup, consoles, args).await?;
        let q = &mut self.launched.insert(l).qmp;
        let dir = plan.tls.dir.display().to_string();
        q.execute(
            "object-add",
            Some(
                json!({"qom-type": "tls-creds-x509", "id": CREDS, "dir": dir,
                        "endpoint": "server", "verify-peer": true}),
            ),
        )
        .await?;
        q.execute(
            "object-add",
            Some(json!({"qom-type": "authz-simple", "id": AUTHZ, "identity": plan.tls.peer_dn})),
        )
        .await?;
        q.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "inet", "data": inet(plan.nbd)},
                        "tls-creds": CREDS, "tls-authz": AUTHZ})),
        )
        .await?;
        for i in 0..plan.disks.len() {
            let node = format!("disk{i}");
            q.execute(
                "block-export-add",
                Some(
                    json!({"type": "nbd", "id": format!("zymig-{node}"), "node-name": node,
                            "name": node, "writable": true}),
                ),
            )
            .await?;
        }
        q.execute(
            "migrate-set-parameters",
            Some(json!({"tls-creds": CREDS, "tls-authz": AUTHZ})),
        )
        .await?;
        q.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
        )
        .await?;
        // A failed incoming stream leaves QEMU up (reporting `failed`) rather than exiting,
        // so that the agent, not QEMU, cleans up and says why.
        q.execute(
            "migrate-incoming",
            Some(json!({"uri": tcp_uri(plan.stream), "exit-on-error": false})),
        )
        .await?;
        info!(vm = %self.spec.id, nbd = %plan.nbd, stream = %plan.stream, "migration destination ready");
        Ok(())
    }

    /// The destination QEMU's process id.
    pub fn pid(&self) -> Option<i32> {
        self.launched.as_ref().map(|l| l.pid)
    }

    /// The destination QEMU's QMP session.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.launched.as_mut().map(|l| &mut l.qmp)
    }

    /// Waits until the whole VM has arrived (the guest is then paused here). The incoming
    /// stream starts only once the source's disks are mirrored, so this waits for that too.
    pub async fn wait_complete(&mut self, cancel: &AtomicBool) -> Result<(), MigrateError> {
        let limit = self.limits.incoming_timeout;
        let t0 = Instant::now();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(MigrateError::Cancelled);
            }
            let Some(l) = self.launched.as_mut() else {
                return Err(MigrateError::Cancelled);
            };
            if l.proc.has_exited() {
                return Err(MigrateError::Failed {
                    status: "exited".into(),
                    why: "the destination QEMU is gone".into(),
                });
            }
            let m = l.qmp.execute("query-migrate", None).await?;
            match m["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                s @ ("failed" | "cancelled") => {
                    return Err(MigrateError::Failed {
                        status: s.into(),
                        why: m["error-desc"].as_str().unwrap_or("no reason given").into(),
                    })
                }
                _ => {}
            }
            if t0.elapsed() > limit {
                return Err(MigrateError::Timeout {
                    what: "the incoming migration",
                    after: limit,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Once the VM has arrived: closes the NBD exports and server and starts the guest.
    /// Returns the running VM, which the caller now owns (its disks stay).
    pub async fn activate(mut self) -> Result<Launched, MigrateError> {
        let r = self.activate_inner().await;
        match (r, self.launched.take()) {
            (Ok(()), Some(l)) => {
                self.made_files.clear();
                self.made_dir = None;
                Ok(l)
            }
            (Ok(()), None) => Err(MigrateError::Cancelled),
            (Err(e), l) => {
                self.launched = l;
                self.abort().await;
                Err(e)
            }
        }
    }

    async fn activate_inner(&mut self) -> Result<(), MigrateError> {
        let n = self.spec.disks.len();
        let Some(l) = self.launched.as_mut() else {
            return Err(MigrateError::Cancelled);
        };
        for i in 0..n {
            // The source has closed its NBD connections by now: a hard delete only makes
            // sure no straggler holds the export.
            if let Err(e) = l
                .qmp
                .execute(
                    "block-export-del",
                    Some(json!({"id": format!("zymig-disk{i}"), "mode": "hard"})),
                )
                .await
            {
                warn!(vm = %self.spec.id, error = %e, "cannot remove an NBD export");
            }
        }
        l.qmp.execute("nbd-server-stop", None).await?;
        l.qmp.execute("cont", None).await?;
        let status = l.qmp.status().await?;
        if status != "running" {
            return Err(MigrateError::NotRunning(status));
        }
        Ok(())
    }

    /// Kills the destination QEMU and removes every file made for it.
    pub async fn abort(mut self) {
        if let Some(mut l) = self.launched.take() {
            if !l.proc.has_exited() {
                runner::kill_qemu_of(l.pid, self.spec.id);
                let _ = tokio::time::timeout(Duration::from_secs(5), l.proc.exited()).await;
            }
        }
        self.remove_files();
    }

    fn remove_files(&mut self) {
        for f in self.made_files.drain(..) {
            if let Err(e) = std::fs::remove_file(&f) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %f.display(), error = %e, "cannot remove a migration target");
                }
            }
        }
        if let Some(d) = self.made_dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&d) {
                warn!(path = %d.display(), error = %e, "cannot remove a migration's VM directory");
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(l) = self.launched.take() {
            let pid = l.pid;
            runner::kill_qemu_of(pid, self.spec.id);
            // Our child is reaped by tokio once dead; files go only once QEMU can no
            // longer write them.
            drop(l);
            let t0 = Instant::now();
            while runner::pid_alive(pid) && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.remove_files();
    }
}

/// What the source reports while it migrates.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// The NBD targets are attached and the mirrors started.
    MirrorsStarted { disks: usize },
    /// The mirrors' progress, over all disks.
    Mirror { done: u64, total: u64 },
    /// Every mirror is READY and actively synced: the memory stream starts.
    DisksSynced,
    /// The memory stream.
    Memory {
        transferred: u64,
        remaining: u64,
        total: u64,
        /// Bytes per second the guest dirties.
        dirty_rate: u64,
        expected_downtime_ms: u64,
        downtime_limit_ms: u64,
        cpu_throttle_percent: u64,
    },
    /// The guest is paused at switchover; the mirrors are being completed.
    Switchover,
}

/// How a migration went, as the source measured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The guest's pause at switchover, as QEMU measured it (ms).
    pub downtime_ms: u64,
    /// From `migrate` to completion, as QEMU measured it (ms).
    pub memory_ms: u64,
    /// From the first `blockdev-add` to completion (ms).
    pub total_ms: u64,
    pub ram_transferred: u64,
    /// The downtime limit in force at the end (ms).
    pub downtime_limit_ms: u64,
}

/// How a disk is mirrored: what the destination's target holds already decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorSync {
    /// The target is an overlay on the same base: only the source overlay's clusters go.
    Top,
    /// The target is standalone: every byte the guest sees goes.
    Full,
}

impl IncomingPlan {
    /// How the source must mirror each disk to this destination's targets.
    pub fn mirror_syncs(&self) -> Vec<MirrorSync> {
        self.disks
            .iter()
            .map(|d| match d.base {
                Some(_) => MirrorSync::Top,
                None => MirrorSync::Full,
            })
            .collect()
    }
}

/// Where the source sends a VM.
#[derive(Clone, Debug)]
pub struct OutgoingPlan {
    /// Per disk, as the destination made its targets ([`IncomingPlan::mirror_syncs`]).
    pub syncs: Vec<MirrorSync>,
    /// The destination's NBD server.
    pub nbd: SocketAddr,
    /// The destination's migration stream.
    pub stream: SocketAddr,
    pub tls: Tls,
    pub limits: Limits,
}

/// What the source made, so that a failure can undo it.
#[derive(Default)]
struct Made {
    creds: bool,
    nbd_nodes: Vec<String>,
    jobs: Vec<String>,
    migrating: bool,
}

/// Migrates the running VM `spec` (whose QEMU is `qmp`) to the destination of `plan`,
/// which [`Incoming::prepare`] readied. Progress goes to `progress`. On success the
/// source is in `postmigrate` (paused, its disks inactive): the caller stops it once the
/// destination runs, or resumes it (`cont`) if the destination failed to start. On failure
/// the source runs as before and nothing of the attempt is left in its QEMU.
pub async fn migrate_out(
    qmp: &mut Qmp,
    spec: &VmSpec,
    plan: &OutgoingPlan,
    cancel: &AtomicBool,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Outcome, MigrateError> {
    let mut made = Made::default();
    let t0 = Instant::now();
    let r = run_out(qmp, spec, plan, cancel, progress, &mut made, t0).await;
    match r {
        Ok(o) => {
            // The NBD nodes and creds are not needed any more; leaving them would only
            // get in the way of the next migration.
            for n in &made.nbd_nodes {
                if let Err(e) = qmp
                    .execute("blockdev-del", Some(json!({"node-name": n})))
                    .await
                {
                    warn!(vm = %spec.id, node = %n, error = %e, "cannot remove an NBD node after migration");
                }
            }
            let _ = qmp.execute("object-del", Some(json!({"id": CREDS}))).await;
            Ok(o)
        }
        Err(e) => {
            warn!(vm = %spec.id, error = %e, "migration failed; undoing it on the source");
            undo_out(qmp, spec, &made, &plan.limits).await;
            Err(e)
        }
    }
}

fn check(
    cancel: &AtomicBool,
    t0: Instant,
    limit: Duration,
    what: &'static str,
) -> Result<(), MigrateError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(MigrateError::Cancelled);
    }
    if t0.elapsed() > limit {
        return Err(MigrateError::Timeout { what, after: limit });
    }
    Ok(())
}

async fn jobs(qmp: &mut Qmp) -> Result<Vec<Value>, MigrateError> {
    let v = qmp.execute("query-block-jobs", None).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn job<'a>(all: &'a [Value], id: &str) -> Option<&'a Value> {
    all.iter().find(|j| j["device"] == id)
}

async fn run_out(
    qmp: &mut Qmp,
    spec: &VmSpec,
    plan: &OutgoingPlan,
    cancel: &AtomicBool,
    progress: &mut (dyn FnMut(Progress) + Send),
    made: &mut Made,
    t0: Instant,
) -> Result<Outcome, MigrateError> {
    let lim = &plan.limits;
    // Checked before anything is made: `sync=top` to a standalone target would leave the
    // base's part of the disk behind.
    if plan.syncs.len() != spec.disks.len() {
        return Err(MigrateError::PlanDisks {
            plan: plan.syncs.len(),
            vm: spec.disks.len(),
        });
    }
    for (i, (d, s)) in spec.disks.iter().zip(&plan.syncs).enumerate() {
        if *s == MirrorSync::Top && d.base.is_none() {
            return Err(MigrateError::TopWithoutBase(i));
        }
    }
    let dir = plan.tls.dir.display().to_string();
    qmp.execute(
        "object-add",
        Some(
            json!({"qom-type": "tls-creds-x509", "id": CREDS, "dir": dir,
                    "endpoint": "client", "verify-peer": true}),
        ),
    )
    .await?;
    made.creds = true;
    let mirror_speed = lim.max_bandwidth / plan.syncs.len().max(1) as u64;
    for (i, sync) in plan.syncs.iter().enumerate() {
        let node = format!("zymig-nbd{i}");
        let mut server = inet(plan.nbd);
        server["type"] = json!("inet");
        qmp.execute(
            "blockdev-add",
            Some(json!({"driver": "nbd", "node-name": node, "server": server,
                        "export": format!("disk{i}"), "tls-creds": CREDS,
                        "tls-hostname": plan.tls.peer_hostname})),
        )
        .await?;
        made.nbd_nodes.push(node.clone());
        let job_id = format!("zymig-disk{i}");
        let sync = match sync {
            MirrorSync::Top => "top",
            MirrorSync::Full => "full",
        };
        qmp.execute(
            "blockdev-mirror",
            Some(
                json!({"job-id": job_id, "device": format!("disk{i}"), "target": node,
                        "sync": sync, "speed": mirror_speed, "auto-dismiss": false}),
            ),
        )
        .await?;
        made.jobs.push(job_id);
    }
    progress(Progress::MirrorsStarted {
        disks: made.jobs.len(),
    });

    // Every mirror READY, then write-blocking, then actively synced.
    let mut switched = vec![false; made.jobs.len()];
    let tm = Instant::now();
    loop {
        check(cancel, tm, lim.mirror_timeout, "the disks to be mirrored")?;
        let all = jobs(qmp).await?;
        let (mut done, mut total, mut synced) = (0, 0, 0);
        for (k, id) in made.jobs.iter().enumerate() {
            let Some(j) = job(&all, id) else {
                return Err(MigrateError::Mirror {
                    job: id.clone(),
                    why: "the job is gone".into(),
                });
            };
            if let Some(e) = j["error"].as_str() {
                return Err(MigrateError::Mirror {
                    job: id.clone(),
                    why: e.into(),
                });
            }
            if j["status"] == "concluded" || j["status"] == "aborting" {
                return Err(MigrateError::Mirror {
                    job: id.clone(),
                    why: format!("the job ended early ({})", j["status"]),
                });
            }
            done += j["offset"].as_u64().unwrap_or(0);
            total += j["len"].as_u64().unwrap_or(0);
            if j["ready"] == true && !switched[k] {
                qmp.execute(
                    "block-job-change",
                    Some(json!({"id": id, "type": "mirror", "copy-mode": "write-blocking"})),
                )
                .await?;
                switched[k] = true;
            }
            if switched[k] && j["actively-synced"] == true {
                synced += 1;
            }
        }
        progress(Progress::Mirror { done, total });
        if synced == made.jobs.len() {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    progress(Progress::DisksSynced);

    let caps: Vec<Value> = ["events", "auto-converge", "pause-before-switchover"]
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": caps})),
    )
    .await?;
    let mut escalation = Escalation::new(lim);
    qmp.execute(
        "migrate-set-parameters",
        Some(
            json!({"max-bandwidth": lim.max_bandwidth, "downtime-limit": escalation.limit,
                    "tls-creds": CREDS, "tls-hostname": plan.tls.peer_hostname}),
        ),
    )
    .await?;
    qmp.execute("migrate", Some(json!({"uri": tcp_uri(plan.stream)})))
        .await?;
    made.migrating = true;

    let tmem = Instant::now();
    let mut switched_over = false;
    // Once `migrate-continue` is sent the device state is on its way and QEMU decides the
    // outcome: a cancel from then on is too late to be safe, and is not looked at.
    let too_late = AtomicBool::new(false);
    loop {
        check(
            if switched_over { &too_late } else { cancel },
            tmem,
            lim.memory_timeout,
            "the memory to be migrated",
        )?;
        let m = qmp.execute("query-migrate", None).await?;
        let status = m["status"].as_str().unwrap_or("").to_string();
        let ram = &m["ram"];
        match status.as_str() {
            "completed" => {
                return Ok(Outcome {
                    downtime_ms: m["downtime"].as_u64().unwrap_or(0),
                    memory_ms: m["total-time"].as_u64().unwrap_or(0),
                    total_ms: t0.elapsed().as_millis() as u64,
                    ram_transferred: ram["transferred"].as_u64().unwrap_or(0),
                    downtime_limit_ms: escalation.limit,
                });
            }
            "failed" | "cancelled" | "cancelling" => {
                return Err(MigrateError::Failed {
                    status,
                    why: m["error-desc"].as_str().unwrap_or("no reason given").into(),
                });
            }
            "pre-switchover" if !switched_over => {
                progress(Progress::Switchover);
                complete_mirrors(qmp, made, lim).await?;
                qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
                    .await?;
                switched_over = true;
                continue;
            }
            _ => {}
        }
        if ram.is_object() {
            let remaining = ram["remaining"].as_u64().unwrap_or(0);
            progress(Progress::Memory {
                transferred: ram["transferred"].as_u64().unwrap_or(0),
                remaining,
                total: ram["total"].as_u64().unwrap_or(0),
                dirty_rate: ram["dirty-pages-rate"].as_u64().unwrap_or(0)
                    * ram["page-size"].as_u64().unwrap_or(4096),
                expected_downtime_ms: m["expected-downtime"].as_u64().unwrap_or(0),
                downtime_limit_ms: escalation.limit,
                cpu_throttle_percent: m["cpu-throttle-percentage"].as_u64().unwrap_or(0),
            });
            if let Some(limit) = escalation.observe(remaining) {
                info!(vm = %spec.id, downtime_limit = limit, "the guest dirties memory faster than it moves; raising the downtime limit");
                qmp.execute(
                    "migrate-set-parameters",
                    Some(json!({"downtime-limit": limit})),
                )
                .await?;
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When to raise the downtime limit (pure: fed `remaining` at each poll). While the guest
/// dirties memory faster than it goes, `remaining` grows; after [`Limits::grow_polls`]
/// polls of growth in a row the limit doubles, up to [`Limits::max_downtime_ms`], as
/// Proxmox does.
#[derive(Debug)]
struct Escalation {
    limit: u64,
    max: u64,
    polls: u32,
    last: Option<u64>,
    grew: u32,
}

impl Escalation {
    fn new(lim: &Limits) -> Self {
        Self {
            limit: lim.downtime_ms.min(lim.max_downtime_ms),
            max: lim.max_downtime_ms,
            polls: lim.grow_polls.max(1),
            last: None,
            grew: 0,
        }
    }

    /// The new limit, when it is to be raised.
    fn observe(&mut self, remaining: u64) -> Option<u64> {
        match self.last {
            Some(last) if remaining > last => self.grew += 1,
            _ => self.grew = 0,
        }
        self.last = Some(remaining);
        if self.grew < self.polls || self.limit >= self.max {
            return None;
        }
        self.grew = 0;
        self.limit = self.limit.saturating_mul(2).min(self.max);
        Some(self.limit)
    }
}

/// At switchover (the guest paused): every mirror is cancelled without force, which in a
/// READY mirror means "finish": it copies what is left and concludes without error, the
/// target then a point-in-time copy of the source.
async fn complete_mirrors(
    qmp: &mut Qmp,
    made: &mut Made,
    lim: &Limits,
) -> Result<(), MigrateError> {
    for id in &made.jobs {
        qmp.execute(
            "block-job-cancel",
            Some(json!({"device": id, "force": false})),
        )
        .await?;
    }
    let t = Instant::now();
    let mut left: Vec<String> = made.jobs.clone();
    while !left.is_empty() {
        if t.elapsed() > lim.cancel_timeout {
            return Err(MigrateError::Timeout {
                what: "the mirrors to complete at switchover",
                after: lim.cancel_timeout,
            });
        }
        let all = jobs(qmp).await?;
        let mut still = Vec::new();
        for id in left {
            match job(&all, &id) {
                Some(j) if j["status"] == "concluded" => {
                    if let Some(e) = j["error"].as_str() {
                        return Err(MigrateError::Mirror {
                            job: id,
                            why: e.into(),
                        });
                    }
                    qmp.execute("job-dismiss", Some(json!({"id": id}))).await?;
                    made.jobs.retain(|x| *x != id);
                }
                Some(_) => still.push(id),
                None => {
                    return Err(MigrateError::Mirror {
                        job: id,
                        why: "the job vanished at switchover".into(),
                    })
                }
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Undoes a failed attempt on the source, best effort, each step whatever the others did.
async fn undo_out(qmp: &mut Qmp, spec: &VmSpec, made: &Made, lim: &Limits) {
    let vm = spec.id;
    if made.migrating {
        if let Err(e) = qmp.execute("migrate_cancel", None).await {
            warn!(%vm, error = %e, "migrate_cancel failed");
        }
        // Until the migration has left the cancelling state.
        let t = Instant::now();
        while t.elapsed() < lim.cancel_timeout {
            match qmp.execute("query-migrate", None).await {
                Ok(m)
                    if m["status"] == "cancelling"
                        || m["status"] == "active"
                        || m["status"] == "pre-switchover"
                        || m["status"] == "device" => {}
                _ => break,
            }
            tokio::time::sleep(POLL).await;
        }
    }
    for id in &made.jobs {
        match qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": id, "force": true})),
            )
            .await
        {
            Ok(_) => {}
            // Already concluded (failed): dismissed below.
            Err(e) => info!(%vm, job = %id, error = %e, "forced cancel of a mirror"),
        }
    }
    let t = Instant::now();
    let mut left = made.jobs.clone();
    while !left.is_empty() && t.elapsed() < lim.cancel_timeout {
        let all = match jobs(qmp).await {
            Ok(a) => a,
            Err(e) => {
                warn!(%vm, error = %e, "cannot query the block jobs to undo a migration");
                break;
            }
        };
        let mut still = Vec::new();
        for id in left {
            match job(&all, &id) {
                Some(j) if j["status"] == "concluded" => {
                    if let Err(e) = qmp.execute("job-dismiss", Some(json!({"id": id}))).await {
                        warn!(%vm, job = %id, error = %e, "cannot dismiss a mirror");
                    }
                }
                Some(_) => still.push(id),
                None => {}
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }
    if !left.is_empty() {
        warn!(%vm, jobs = ?left, "mirrors still there after a forced cancel");
    }
    for n in &made.nbd_nodes {
        if let Err(e) = qmp
            .execute("blockdev-del", Some(json!({"node-name": n})))
            .await
        {
            warn!(%vm, node = %n, error = %e, "cannot remove an NBD node");
        }
    }
    if made.creds {
        if let Err(e) = qmp.execute("object-del", Some(json!({"id": CREDS}))).await {
            warn!(%vm, error = %e, "cannot remove the migration's TLS credentials");
        }
    }
    // Paused at pre-switchover (or by a cancel that came late): it runs again.
    match qmp.status().await {
        Ok(s) if s == "running" => {}
        Ok(s) => {
            info!(%vm, status = %s, "resuming the source after a failed migration");
            if let Err(e) = qmp.execute("cont", None).await {
                warn!(%vm, error = %e, "cannot resume the source");
            }
        }
        Err(e) => warn!(%vm, error = %e, "cannot read the source's state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(downtime_ms: u64, max_downtime_ms: u64, grow_polls: u32) -> Limits {
        Limits {
            downtime_ms,
            max_downtime_ms,
            grow_polls,
            ..Limits::default()
        }
    }

    #[test]
    fn the_downtime_limit_doubles_only_after_growth_in_a_row_and_stops_at_the_cap() {
        let mut e = Escalation::new(&limits(100, 300, 3));
        // Shrinking or flat: never.
        for r in [1000, 900, 900, 800] {
            assert_eq!(e.observe(r), None);
        }
        // Two polls of growth, one fall: the count starts again.
        assert_eq!(e.observe(850), None);
        assert_eq!(e.observe(860), None);
        assert_eq!(e.observe(10), None);
        assert_eq!(e.observe(20), None);
        assert_eq!(e.observe(30), None);
        assert_eq!(e.observe(40), Some(200));
        // Three more: capped at 300, then never again.
        assert_eq!(e.observe(50), None);
        assert_eq!(e.observe(60), None);
        assert_eq!(e.observe(70), Some(300));
        for r in 80..200 {
            assert_eq!(e.observe(r), None);
        }
    }

    #[test]
    fn addresses_are_given_to_qemu_as_it_reads_them() {
        assert_eq!(
            tcp_uri("127.0.0.1:4444".parse().unwrap()),
            "tcp:127.0.0.1:4444"
        );
        assert_eq!(tcp_uri("[::1]:4444".parse().unwrap()), "tcp:[::1]:4444");
        assert_eq!(
            inet("10.0.0.1:10809".parse().unwrap()),
            json!({"host": "10.0.0.1", "port": "10809"})
        );
    }

    #[test]
    fn the_peer_subject_is_gnutls_form_of_a_node_certificate() {
        let node = zy_common::NodeId::new_random();
        assert_eq!(
            peer_dn(node, zy_common::Zone::Intranet),
            format!("O=Zhengyun,OU=intranet,CN={node}")
        );
    }
}
