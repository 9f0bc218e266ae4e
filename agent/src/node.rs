//! The node's side of VM commands: turns a VM as the coordinator describes it into a VM on
//! this node (image blobs fetched and verified, disk made, network joined) and routes
//! start/stop/delete to the VM's actor.
//!
//! The live migration commands (protocol version 4) are carried out in `node::migrate`: a VM
//! received from another node, or sent to one.
//!
//! The host is reached through [`Host`]: the VM runner, the networks and the blob source
//! are traits, real here ([`Node::start`]) and in-memory fakes in unit tests
//! ([`Node::with_host`]).

mod migrate;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use zy_common::blob::BlobDir;
use zy_common::image::ImageKind;
use zy_common::proto::{
    Accel, CommandKind, ReplyError, ReplyErrorKind, ReplyKind, VmInfo, VmIntent, WireVm,
};
use zy_common::vm::Generation;
use zy_common::VmId;

use crate::netdev::{Networks, Segment};
use crate::uplink::{BlobSource, Uplink};
use crate::vm::actor::{Ctx, Request, VmEvent};
use crate::vm::console::Consoles;
use crate::vm::manager::{find_strays, Begin, Prepared, VmManager, PREPARING_MARKER};
use crate::vm::observed::{ObservedClock, ObservedError};
use crate::vm::runner::{QemuRunner, VmRunner};
use crate::vm::seed::{Seed, SeedNic, SEED_FILE};
use crate::vm::spec::{BaseImage, Boot, DiskSpec, NicSpec, VmPaths, VmSpec};

/// Everything VM commands need.
#[derive(Debug)]
pub struct Node {
    pub vms: VmManager,
    networks: Option<Arc<dyn Networks>>,
    blobs: Arc<dyn BlobSource>,
    pub cache: BlobDir,
    pub accel: Accel,
    /// The VMs' open consoles.
    pub consoles: Consoles,
    /// Migration progress for the coordinator (the link takes it, one session at a time).
    pub migration_events: tokio::sync::Mutex<mpsc::Receiver<zy_common::proto::MigrationEvent>>,
    /// This node's underlay address as the link last saw it: where a migration's
    /// destination listens when the VM's NICs do not say.
    pub underlay: std::sync::Mutex<Option<std::net::IpAddr>>,
    /// The time limits of migrations (the coordinator sets the rates per migration).
    pub migration_limits: std::sync::Mutex<crate::vm::migrate::Limits>,
}

/// What the node's VM side uses of the host.
#[derive(Clone, Debug)]
pub struct Host {
    /// Runs the VMs.
    pub runner: Arc<dyn VmRunner>,
    /// The node's networks; none where netlink cannot be had (VMs then get no networks).
    pub networks: Option<Arc<dyn Networks>>,
    /// Where image blobs come from.
    pub blobs: Arc<dyn BlobSource>,
    /// Where the runner opens the VMs' consoles (none are opened by a fake runner).
    pub consoles: Consoles,
}

/// Why the node's VM side could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open the image cache")]
    Cache(#[from] zy_common::blob::BlobError),
    #[error("cannot open the observed generation")]
    Observed(#[from] ObservedError),
}

fn refused(message: impl AsRef<str>) -> ReplyError {
    ReplyError::new(ReplyErrorKind::Refused, message)
}

fn failed(message: impl AsRef<str>) -> ReplyError {
    ReplyError::new(ReplyErrorKind::Failed, message)
}

/// Finds who will run QEMU on this host, as the config asks.
pub async fn supervisor(
    choice: crate::config::SupervisorChoice,
) -> Result<crate::vm::runner::Supervisor, crate::vm::systemd::SystemdError> {
    use crate::config::SupervisorChoice;
    use crate::vm::runner::Supervisor;
    use crate::vm::systemd::{self, Systemd};
    let direct = || {
        Supervisor::Direct(crate::vm::limits::Cgroups::detect(std::path::Path::new(
            "/sys/fs/cgroup",
        )))
    };
    match choice {
        SupervisorChoice::Direct => Ok(direct()),
        SupervisorChoice::Systemd => Ok(Supervisor::Systemd(Systemd::connect().await?)),
        SupervisorChoice::Auto if !systemd::booted() => Ok(direct()),
        // An agent in a network namespace of its own (the lab, the quick start) keeps its
        // QEMUs beside it.
        SupervisorChoice::Auto if !systemd::netns_is_pid1s() => {
            tracing::info!(
                "the agent runs in its own network namespace: it supervises QEMU itself"
            );
            Ok(direct())
        }
        SupervisorChoice::Auto => match Systemd::connect().await {
            Ok(sd) => Ok(Supervisor::Systemd(sd)),
            Err(e) => {
                warn!(error = %e, "systemd runs but cannot be reached; the agent supervises QEMU itself");
                Ok(direct())
            }
        },
    }
}

impl Node {
    /// Recovers the node's VMs and returns the node and the stream of VM state changes.
    pub async fn start(
        ctx_qemu: std::path::PathBuf,
        data_dir: &std::path::Path,
        accel: Accel,
        supervisor: crate::vm::runner::Supervisor,
        uplink: Uplink,
    ) -> Result<(Arc<Self>, mpsc::Receiver<VmEvent>), NodeError> {
        let networks = match crate::netdev::Netdev::new() {
            Ok(n) => Some(Arc::new(n) as Arc<dyn Networks>),
            Err(e) => {
                warn!(error = %e, "no netlink: VMs will have no networks");
                None
            }
        };
        let consoles = Consoles::default();
        let host = Host {
            runner: Arc::new(QemuRunner {
                qemu: ctx_qemu,
                supervisor,
                consoles: consoles.clone(),
            }),
            networks,
            blobs: Arc::new(uplink),
            consoles,
        };
        Self::with_host(host, data_dir, accel).await
    }

    /// Recovers the node's VMs on the given host parts.
    pub async fn with_host(
        host: Host,
        data_dir: &std::path::Path,
        accel: Accel,
    ) -> Result<(Arc<Self>, mpsc::Receiver<VmEvent>), NodeError> {
        let (tx, rx) = mpsc::channel(256);
        let clock = Arc::new(ObservedClock::open(&data_dir.join("observed-generation"))?);
        let (migrations, migration_events) = crate::vm::migration::Migrations::new();
        let ctx = Ctx {
            data_dir: data_dir.to_path_buf(),
            events: tx,
            networks: host.networks.clone(),
            runner: host.runner,
            clock,
            migrations: Arc::new(migrations),
        };
        let cache = BlobDir::open(&data_dir.join("images"))?;
        let vms = VmManager::recover(ctx).await;
        Ok((
            Arc::new(Self {
                vms,
                networks: host.networks,
                blobs: host.blobs,
                cache,
                accel,
                consoles: host.consoles,
                migration_events: tokio::sync::Mutex::new(migration_events),
                underlay: std::sync::Mutex::new(None),
                migration_limits: std::sync::Mutex::new(crate::vm::migrate::Limits::default()),
            }),
            rx,
        ))
    }

    /// Every VM and its state, for the coordinator on (re)connect.
    pub fn report(&self) -> zy_common::proto::VmReport {
        self.vms.report()
    }

    /// Carries out a command. VM intents answer at once with what the node has; the work
    /// they start is reported as it happens.
    pub async fn handle(self: &Arc<Self>, kind: CommandKind) -> Result<ReplyKind, ReplyError> {
        match kind {
            CommandKind::EnsureVm(intent) => self.ensure(*intent).map(ReplyKind::Vm),
            CommandKind::DeleteVm { id, generation } => {
                self.delete(id, generation).await.map(|()| ReplyKind::Done)
            }
            CommandKind::SyncPeers { vni, peers } => {
                let Some(n) = &self.networks else {
                    return Ok(ReplyKind::Done);
                };
                n.sync_peers(vni, &peers.into_iter().collect())
                    .await
                    .map_err(|e| failed(zy_common::error::chain(&e)))?;
                Ok(ReplyKind::Done)
            }
            CommandKind::Ping => Ok(ReplyKind::Pong),
            CommandKind::SetReportInterval { .. } => Ok(ReplyKind::Done),
            CommandKind::MigrateIn(m) => self.migrate_in(*m).await.map(ReplyKind::MigrateListening),
            CommandKind::MigrateOut(m) => self.migrate_out(*m).await.map(|()| ReplyKind::Done),
            CommandKind::MigrateStatus { migration, vm } => {
                self.migrate_status(migration, vm).map(ReplyKind::Migration)
            }
            CommandKind::MigrateActivate { migration, vm } => self
                .migrate_activate(migration, vm)
                .await
                .map(ReplyKind::Vm),
            CommandKind::MigrateFinish { migration, vm } => self
                .migrate_finish(migration, vm)
                .await
                .map(|()| ReplyKind::Done),
            CommandKind::MigrateAbort { migration, vm } => self
                .migrate_abort(migration, vm)
                .await
                .map(|()| ReplyKind::Done),
        }
    }

    /// Takes an intent: to the VM's actor if it exists, else into its one preparation.
    fn ensure(self: &Arc<Self>, i: VmIntent) -> Result<VmInfo, ReplyError> {
        let id = i.vm.id;
        self.not_migrating(id)?;
        match self
            .vms
            .begin(id, &i.vm.name, i.desired, i.generation, i.stop_grace_ms)
        {
            Begin::Actor(h) => {
                h.send(Request::Intent {
                    desired: i.desired,
                    generation: i.generation,
                    stop_grace_ms: i.stop_grace_ms,
                })
                .map_err(|e| ReplyError::new(ReplyErrorKind::Busy, e.to_string()))?;
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
            Begin::Joined(info) => Ok(info),
            Begin::Deleted => Err(refused(format!(
                "VM {id} was deleted on this node; an intent for it is late news"
            ))),
            Begin::Claimed(info) => {
                let node = self.clone();
                tokio::spawn(async move {
                    let paths = VmPaths::new(node.vms.data_dir(), id);
                    let (made, own_dir) = match make_dir(&paths).await {
                        Ok(()) => (node.prepare(&i.vm, &paths).await, true),
                        Err(e) => (Err(e), false),
                    };
                    if let Err(e) = node.vms.finish(id, made, own_dir).await {
                        warn!(vm = %id, error = %e, "the VM could not be made");
                    } else {
                        info!(vm = %id, "VM made");
                    }
                });
                Ok(info)
            }
        }
    }

    /// Removes a VM: its actor stops it and removes its files, or its preparation is
    /// cancelled and cleans up. A VM that is not here is deleted already.
    async fn delete(&self, id: VmId, generation: Generation) -> Result<(), ReplyError> {
        // The coordinator aborts a migration first when a delete supersedes it.
        self.not_migrating(id)?;
        if let Some(h) = self.vms.get(id) {
            let held = h.status.borrow().intent;
            if held > generation {
                return Err(refused(format!(
                    "VM {id} holds intent {held}, newer than this deletion's {generation}"
                )));
            }
            // Marked first: a hand-over of this VM arriving late must not start it again.
            self.vms.mark_deleted(id);
            if h.ended() {
                // An earlier delete finished without its caller (its session ended).
                self.vms.forget(id);
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            h.send(Request::Delete(tx))
                .map_err(|e| ReplyError::new(ReplyErrorKind::Busy, e.to_string()))?;
            let done = rx.await;
            // Gone either way once the actor has ended.
            if done.is_ok() || h.ended() {
                self.vms.forget(id);
            }
            done.map_err(|_| failed("the VM's actor stopped"))?
                .map_err(failed)?;
            return Ok(());
        }
        // Marked first: a hand-over of this VM arriving late must not start it again.
        self.vms.mark_deleted(id);
        if let Some(mut done) = self.vms.cancel(id) {
            let _ = done.wait_for(|d| *d).await;
        }
        self.delete_stray(id).await
    }

    /// A VM this agent has no record of (its record was lost or unreadable) may still run
    /// from its directory: deleted at the site, its QEMU and its files go too, or they would
    /// be left with nobody to remove them (the chaos run found such a QEMU).
    async fn delete_stray(&self, id: VmId) -> Result<(), ReplyError> {
        let paths = VmPaths::new(self.vms.data_dir(), id);
        let vms_dir = paths.dir.parent().map(std::path::Path::to_path_buf);
        let strays = match vms_dir {
            Some(d) => blocking(move || Ok(find_strays(&d, &|v| v != id))).await,
            None => Ok(Vec::new()),
        }
        .map_err(failed)?;
        let mut segments = Vec::new();
        for s in strays {
            warn!(vm = %id, pid = s.pid, "deleting a VM this node has no record of: killing its QEMU");
            // Its networks, read off its taps while they exist: released once it is gone.
            segments.extend(stray_segments(s.pid));
            crate::vm::runner::kill_qemu_of(s.pid, id);
            for _ in 0..200 {
                if !crate::vm::runner::pid_alive(s.pid) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        }
        self.vms.cleanup_supervisor(id).await;
        // A tap goes with the last descriptor of it, which may outlive the process by a
        // moment: a segment still used by it would not be released.
        for _ in 0..200 {
            let left = segments
                .iter()
                .any(|(tap, _)| std::path::Path::new("/sys/class/net").join(tap).exists());
            if !left {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if let (Some(n), false) = (&self.networks, segments.is_empty()) {
            for e in n.leave(&segments).await {
                warn!(vm = %id, error = %e, "cannot release a network of a VM this node has no record of");
            }
        }
        if tokio::fs::try_exists(&paths.dir).await.unwrap_or(false) {
            info!(vm = %id, dir = %paths.dir.display(), "removing the directory of a VM this node has no record of");
            crate::vm::actor::remove_vm_dir(paths.dir)
                .await
                .map_err(failed)?;
        }
        Ok(())
    }

    async fn prepare(&self, vm: &WireVm, paths: &VmPaths) -> Result<Prepared, String> {
        for blob in vm.image.blobs() {
            self.blobs
                .ensure_blob(blob, &self.cache)
                .await
                .map_err(|e| format!("cannot get the image: {e}"))?;
        }
        let mut disks = Vec::new();
        let mut written_seed = None;
        let boot = match &vm.image {
            ImageKind::Disk { blob, format, .. } => {
                // Inspected again here, before QEMU or qemu-img open it: the node trusts
                // no header, not even one its coordinator accepted.
                let (base, declared) = (self.cache.path(blob), *format);
                blocking(move || {
                    use std::io::Read;
                    let mut head = Vec::new();
                    let f = std::fs::File::open(&base)
                        .map_err(|e| format!("cannot read the image {}: {e}", base.display()))?;
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    f.take(zy_common::image::INSPECT_BYTES as u64)
                        .read_to_end(&mut head)
                        .map_err(|e| format!("cannot read the image {}: {e}", base.display()))?;
                    zy_common::image::inspect(&head, len, declared)
                        .map(|_| ())
                        .map_err(|e| format!("the image is refused: {e}"))
                })
                .await?;
                let disk = paths.dir.join("disk0.qcow2");
                let size = (vm.disk_gib > 0).then(|| format!("{}G", vm.disk_gib));
                let (base, fmt, d) = (self.cache.path(blob), format.as_str(), disk.clone());
                blocking(move || qemu_img_overlay(&base, fmt, &d, size.as_deref())).await?;
                disks.push(DiskSpec {
                    path: disk,
                    format: "qcow2".into(),
                    base: Some(BaseImage {
                        path: self.cache.path(blob),
                        format: format.as_str().to_string(),
                    }),
                });
                // A real image learns its name and addresses from cloud-init's NoCloud seed.
                let seed = Seed {
                    id: vm.id,
                    hostname: vm.name.clone(),
                    nics: vm
                        .nics
                        .iter()
                        .map(|n| SeedNic {
                            mac: n.mac,
                            ip: n.ip,
                            prefix: n.prefix,
                            gateway: n.gateway,
                            mtu: crate::netdev::OVERLAY_MTU,
                            nameservers: n.nameservers.clone(),
                            search: n.search.clone(),
                        })
                        .collect(),
                    ssh_keys: vm.ssh_keys.clone(),
                    user_data: vm.user_data.clone(),
                };
                written_seed = Some(seed.clone());
                let path = paths.dir.join(SEED_FILE);
                let p = path.clone();
                blocking(move || {
                    seed.write(&p)
                        .map_err(|e| format!("cannot write the cloud-init seed: {e}"))
                })
                .await?;
                disks.push(DiskSpec {
                    path,
                    format: "raw".into(),
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
                    let disk = paths.dir.join("disk0.qcow2");
                    let (d, gib) = (disk.clone(), vm.disk_gib);
                    blocking(move || qemu_img_empty(&d, gib)).await?;
                    disks.push(DiskSpec {
                        path: disk,
                        format: "qcow2".into(),
                        base: None,
                    });
                }
                let line = kernel_cmdline(cmdline, vm);
                Boot::Kernel {
                    kernel: self.cache.path(kernel),
                    initrd: initrd.map(|i| self.cache.path(&i)),
                    cmdline: line,
                }
            }
        };
        let (nics, ports) = nics_of(vm);
        let spec = VmSpec {
            id: vm.id,
            name: vm.name.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            accel: self.accel,
            boot,
            disks,
            nics,
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok(Prepared {
            spec,
            ports,
            seed: written_seed,
        })
    }
}

/// The kernel command line of a VM booting a kernel: the image's, and what the test guest
/// reads of its name and first NIC.
fn kernel_cmdline(cmdline: &str, vm: &WireVm) -> String {
    let mut line = format!("{cmdline} zy.name={}", vm.name);
    if let Some(n) = vm.nics.first() {
        line.push_str(&format!(
            " zy.ip={}/{} zy.mtu={}",
            n.ip,
            n.prefix,
            crate::netdev::OVERLAY_MTU
        ));
        if let Some(gw) = n.gateway {
            line.push_str(&format!(" zy.gw={gw}"));
        }
        if !n.nameservers.is_empty() {
            let dns: Vec<String> = n.nameservers.iter().map(|a| a.to_string()).collect();
            line.push_str(&format!(" zy.dns={}", dns.join(",")));
        }
        if !n.search.is_empty() {
            line.push_str(&format!(" zy.search={}", n.search.join(",")));
        }
    }
    line.trim().to_string()
}

/// A VM's NICs (taps named after the VM) and the networks their taps join.
fn nics_of(vm: &WireVm) -> (Vec<NicSpec>, Vec<(String, Segment)>) {
    let short: String = vm
        .id
        .to_string()
        .chars()
        .filter(|c| *c != '-')
        .take(8)
        .collect();
    let mut nics = Vec::new();
    let mut ports = Vec::new();
    for (i, n) in vm.nics.iter().enumerate() {
        let tap = format!("zyt{short}{i}");
        nics.push(NicSpec {
            tap: tap.clone(),
            mac: n.mac,
        });
        ports.push((
            tap,
            Segment {
                vni: n.vni,
                zone: vm.zone,
                local: n.local,
                peers: n.peers.iter().copied().collect(),
                underlay_mtu: crate::netdev::UNDERLAY_MTU,
            },
        ));
    }
    (nics, ports)
}

/// The networks a running QEMU's taps are on, from its command line (`ifname=`) and each
/// tap's bridge (`zybr<vni>`): enough to release them (only the VNI names a segment's
/// devices).
fn stray_segments(pid: i32) -> Vec<(String, Segment)> {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for arg in cmdline.split(|b| *b == 0) {
        let arg = String::from_utf8_lossy(arg);
        let Some(tap) = arg
            .split(',')
            .find_map(|kv| kv.strip_prefix("ifname="))
            .filter(|t| t.starts_with("zyt") && !t.contains('/'))
        else {
            continue;
        };
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).ok();
        let vni = master
            .as_ref()
            .and_then(|m| m.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("zybr"))
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(vni) = vni {
            out.push((
                tap.to_string(),
                Segment {
                    vni,
                    zone: zy_common::Zone::Intranet,
                    local: std::net::Ipv4Addr::UNSPECIFIED,
                    peers: Default::default(),
                    underlay_mtu: crate::netdev::UNDERLAY_MTU,
                },
            ));
        }
    }
    out
}

/// Makes a preparation's own directory, marked as such. One that exists was made by someone
/// else (a VM of the same id that this agent has no record of) and is left alone.
async fn make_dir(paths: &VmPaths) -> Result<(), String> {
    let dir = paths.dir.clone();
    blocking(move || {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
        }
        std::fs::create_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} exists but holds no VM this agent knows; it is left for ops to look at",
                    dir.display()
                )
            } else {
                format!("cannot make {}: {e}", dir.display())
            }
        })?;
        std::fs::write(dir.join(PREPARING_MARKER), b"")
            .map_err(|e| format!("cannot mark {}: {e}", dir.display()))
    })
    .await
}

/// Runs file work (qemu-img, writing a seed) off the agent's single runtime thread, which
/// also serves the link, every VM's actor and the watchdog.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("disk preparation failed: {e}"))?
}

fn qemu_img(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A qcow2 overlay on a base image (grown to `size` if given).
fn qemu_img_overlay(
    base: &std::path::Path,
    format: &str,
    disk: &std::path::Path,
    size: Option<&str>,
) -> Result<(), String> {
    let base = base.to_string_lossy();
    let disk = disk.to_string_lossy();
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", format, &disk,
    ];
    if let Some(s) = size {
        args.push(s);
    }
    qemu_img(&args)
}

/// A fresh, empty qcow2 disk.
fn qemu_img_empty(disk: &std::path::Path, gib: u64) -> Result<(), String> {
    let disk = disk.to_string_lossy();
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, &format!("{gib}G")])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;
    use zy_common::blob::BlobHash;
    use zy_common::image::ImageKind;
    use zy_common::proto::{
        Accel, CommandKind, ReplyErrorKind, ReplyKind, VmIntent, WireNic, WireVm,
    };
    use zy_common::vm::{Desired, Generation, VmState};
    use zy_common::VmId;

    use super::{Host, Node};
    use crate::fake::{self, FakeBlobs, FakeNetworks, FakeRunner, TempDir};
    use crate::vm::actor::VmEvent;
    use crate::vm::manager::PREPARING_MARKER;
    use crate::vm::record::VmRecord;
    use crate::vm::spec::VmPaths;

    struct Fakes {
        tmp: TempDir,
        runner: FakeRunner,
        nets: Arc<FakeNetworks>,
        blobs: Arc<FakeBlobs>,
    }

    impl Fakes {
        fn new() -> Self {
            Self {
                tmp: TempDir::new("node"),
                runner: FakeRunner::default(),
                nets: Arc::default(),
                blobs: Arc::default(),
            }
        }

        async fn node(&self) -> (Arc<Node>, mpsc::Receiver<VmEvent>) {
            let host = Host {
                runner: Arc::new(self.runner.clone()),
                networks: Some(self.nets.clone()),
                blobs: self.blobs.clone(),
                consoles: Default::default(),
            };
            Node::with_host(host, &self.tmp.0, Accel::Tcg)
                .await
                .unwrap()
        }

        fn paths(&self, id: VmId) -> VmPaths {
            VmPaths::new(&self.tmp.0, id)
        }
    }

    fn vm(kernel: BlobHash) -> WireVm {
        WireVm {
            id: VmId::new_random(),
            name: "w1".into(),
            zone: zy_common::Zone::Intranet,
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            image: ImageKind::Kernel {
                kernel,
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            nics: vec![WireNic {
                vni: 5,
                local: "10.0.0.1".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 1],
                ip: "192.168.5.2".parse().unwrap(),
                prefix: 24,
                gateway: None,
                nameservers: vec![],
                search: vec![],
                peers: vec!["10.0.0.2".parse().unwrap()],
            }],
            ssh_keys: vec![],
            user_data: None,
        }
    }

    fn ensure(vm: &WireVm, desired: Desired, g: u64) -> CommandKind {
        CommandKind::EnsureVm(Box::new(VmIntent {
            vm: vm.clone(),
            desired,
            generation: Generation(g),
            stop_grace_ms: 1000,
        }))
    }

    /// Takes events until one of `id` is in state `name`; every event seen.
    async fn until_event(
        events: &mut mpsc::Receiver<VmEvent>,
        id: VmId,
        name: &str,
    ) -> Vec<VmEvent> {
        let mut seen = Vec::new();
        loop {
            let e = tokio::time::timeout(std::time::Duration::from_secs(3600), events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {name} event for {id}; seen {seen:#?}"))
                .expect("the node is gone");
            let hit = e.id == id && e.status.state.name() == name;
            seen.push(e);
            if hit {
                return seen;
            }
        }
    }

    /// A reconnect hands the same VM over again while its image is still being fetched:
    /// the second hand-over joins the first (no second fetch, nothing removed) and a newer
    /// intent arriving meanwhile is the one the VM is made with.
    #[tokio::test(start_paused = true)]
    async fn a_second_hand_over_while_the_image_is_fetched_joins_the_first() {
        let f = Fakes::new();
        let (node, mut events) = f.node().await;
        let vm = vm(f.blobs.add(b"a kernel"));
        let paths = f.paths(vm.id);
        f.blobs.hold();
        let a = node.handle(ensure(&vm, Desired::Stopped, 1)).await;
        assert!(
            matches!(&a, Ok(ReplyKind::Vm(i)) if i.state == VmState::Creating),
            "{a:?}"
        );
        f.blobs.started(1).await;
        let b = node.handle(ensure(&vm, Desired::Stopped, 1)).await;
        assert!(
            matches!(&b, Ok(ReplyKind::Vm(i)) if i.state == VmState::Creating),
            "{b:?}"
        );
        let c = node.handle(ensure(&vm, Desired::Running, 2)).await;
        assert!(
            matches!(&c, Ok(ReplyKind::Vm(i)) if i.intent == Generation(2)),
            "{c:?}"
        );
        fake::settle().await;
        assert_eq!(f.blobs.fetches(), 1, "one preparation");
        assert!(
            paths.dir.join(PREPARING_MARKER).exists(),
            "still the first's"
        );

        f.blobs.release();
        let seen = until_event(&mut events, vm.id, "running").await;
        assert!(
            seen.iter().all(|e| e.status.state.name() != "failed"),
            "{seen:#?}"
        );
        let rec = VmRecord::load(&paths.record()).unwrap();
        assert_eq!((rec.desired, rec.intent), (Desired::Running, Generation(2)));
        assert!(!paths.dir.join(PREPARING_MARKER).exists());
        assert_eq!(f.runner.starts(vm.id), 1);
        assert_eq!(
            f.nets.port(&rec.ports[0].0),
            Some(5),
            "it joined its network"
        );
    }

    /// A delete during the preparation cancels it: the delete answers once the directory
    /// is gone, nothing is started, and a late hand-over makes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_delete_during_preparation_cancels_it() {
        let f = Fakes::new();
        let (node, _events) = f.node().await;
        let vm = vm(f.blobs.add(b"a kernel"));
        let paths = f.paths(vm.id);
        f.blobs.hold();
        node.handle(ensure(&vm, Desired::Running, 1)).await.unwrap();
        f.blobs.started(1).await;
        assert!(paths.dir.exists());
        let id = vm.id;
        let n = node.clone();
        let delete = tokio::spawn(async move {
            n.handle(CommandKind::DeleteVm {
                id,
                generation: Generation(1),
            })
            .await
        });
        fake::settle().await;
        assert!(!delete.is_finished(), "it waits for the preparation to end");

        f.blobs.release();
        let done = delete.await.unwrap();
        assert!(matches!(done, Ok(ReplyKind::Done)), "{done:?}");
        assert!(!paths.dir.exists());
        fake::settle().await;
        assert!(node.vms.get(id).is_none());
        assert!(node.report().vms.is_empty());
        assert_eq!(f.runner.starts(id), 0);
        let late = node.handle(ensure(&vm, Desired::Running, 1)).await;
        assert!(
            matches!(&late, Err(e) if e.kind == ReplyErrorKind::Refused),
            "{late:?}"
        );
        assert!(!paths.dir.exists());
    }

    /// An image that cannot be fetched fails the VM and leaves no half-made directory;
    /// the same intent again does not retry, a newer one does.
    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_leaves_no_half_made_directory() {
        let f = Fakes::new();
        let (node, mut events) = f.node().await;
        let vm = vm(BlobHash::of(b"a kernel"));
        let paths = f.paths(vm.id);
        node.handle(ensure(&vm, Desired::Running, 1)).await.unwrap();
        let seen = until_event(&mut events, vm.id, "failed").await;
        let reason = seen.last().unwrap().status.state.to_string();
        assert!(reason.contains("cannot get the image"), "{reason}");
        assert!(!paths.dir.exists(), "no half-made directory");
        let r = node.report();
        assert_eq!(r.vms.len(), 1);
        assert_eq!(r.vms[0].state.name(), "failed");

        node.handle(ensure(&vm, Desired::Running, 1)).await.unwrap();
        fake::settle().await;
        assert_eq!(f.blobs.fetches(), 1, "the same intent is not a retry");

        f.blobs.add(b"a kernel");
        node.handle(ensure(&vm, Desired::Running, 2)).await.unwrap();
        until_event(&mut events, vm.id, "running").await;
        assert!(paths.record().exists());
    }

    /// Peer updates reach a segment the node has, and skip one it does not.
    #[tokio::test(start_paused = true)]
    async fn peer_updates_reach_the_segment() {
        let f = Fakes::new();
        let (node, mut events) = f.node().await;
        let vm = vm(f.blobs.add(b"a kernel"));
        node.handle(ensure(&vm, Desired::Running, 1)).await.unwrap();
        until_event(&mut events, vm.id, "running").await;
        let peers = vec!["10.0.0.3".parse().unwrap(), "10.0.0.4".parse().unwrap()];
        for vni in [5, 6] {
            let r = node
                .handle(CommandKind::SyncPeers {
                    vni,
                    peers: peers.clone(),
                })
                .await;
            assert!(matches!(r, Ok(ReplyKind::Done)), "{r:?}");
        }
        assert_eq!(f.nets.peers(5), Some(peers.into_iter().collect()));
        assert_eq!(f.nets.peers(6), None);
    }
}
