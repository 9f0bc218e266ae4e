//! In-memory fakes of the host parts the agent's VM logic uses, for unit tests: a VM
//! runner whose "QEMU processes" outlive the agent like real ones, the node's networks, and
//! a blob source. Each is a whole, small implementation of its trait that tests drive and
//! look into (omicron's `fakes/`), not a per-test mock. The real implementations are
//! tested for real in `agent/tests/vm.rs` and the lab (`tests/tests/`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use zy_common::blob::{BlobDir, BlobHash};
use zy_common::{VmId, Zone};

use crate::netdev::{NetdevError, Networks, Segment};
use crate::uplink::{BlobSource, FetchError};
use crate::vm::migrate::{IncomingPlan, MigrateError, Outcome, OutgoingPlan, Progress};
use crate::vm::runner::{Exit, IncomingVm, Recovered, RunError, RunningVm, StopHow, VmRunner};
use crate::vm::spec::{VmPaths, VmSpec};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM runner without QEMU. A started VM "runs" until a test ends it ([`FakeRunner::exit`])
/// or the actor stops it; like QEMU it outlives the agent, so a new manager on the same
/// runner finds it again.
#[derive(Clone, Debug, Default)]
pub struct FakeRunner {
    state: Arc<Mutex<RunnerState>>,
}

#[derive(Debug, Default)]
struct RunnerState {
    last_pid: i32,
    running: HashMap<VmId, Proc>,
    /// Starts that will fail, and why.
    refuse: HashMap<VmId, String>,
    starts: HashMap<VmId, usize>,
    /// Every stop asked for, with its grace.
    stops: Vec<(VmId, Duration)>,
    cleanups: Vec<VmId>,
    /// Guests paused by a completed migration.
    paused: BTreeSet<VmId>,
    /// Migrations out under way (a restarted agent finds them so).
    migrating: BTreeSet<VmId>,
    /// The next migration out of the VM fails with this.
    fail_out: HashMap<VmId, String>,
    /// Migrations out wait here before their switchover while it is false.
    switchover: Option<watch::Sender<bool>>,
    /// Destinations: how the stream will end (`None`: not yet).
    arrivals: HashMap<VmId, watch::Sender<Option<Result<(), String>>>>,
    /// Destinations whose QEMU runs (paused, receiving), with their files.
    incoming: HashMap<VmId, Vec<PathBuf>>,
    announced: Vec<VmId>,
    resumed: Vec<VmId>,
}

/// One fake QEMU process.
#[derive(Clone, Debug)]
struct Proc {
    pid: i32,
    /// Set once it is gone: how the process ended and what the guest did.
    gone: watch::Sender<Option<(Option<String>, Ending)>>,
}

/// What a fake QEMU's QMP events say when it goes on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest powered off.
    Poweroff,
    /// The guest's kernel panicked.
    Panic,
    /// Nothing: QEMU just went.
    Crash,
}

impl FakeRunner {
    /// The pid of `id`'s running QEMU.
    pub fn pid(&self, id: VmId) -> Option<i32> {
        lock(&self.state).running.get(&id).map(|p| p.pid)
    }

    /// How many times `id` was started.
    pub fn starts(&self, id: VmId) -> usize {
        lock(&self.state).starts.get(&id).copied().unwrap_or(0)
    }

    /// The stops asked for `id`, with their grace.
    pub fn stops(&self, id: VmId) -> Vec<Duration> {
        let s = lock(&self.state);
        s.stops
            .iter()
            .filter(|(v, _)| *v == id)
            .map(|(_, g)| *g)
            .collect()
    }

    /// How many times the supervisor's leftovers of `id` were cleaned up.
    pub fn cleanups(&self, id: VmId) -> usize {
        lock(&self.state)
            .cleanups
            .iter()
            .filter(|v| **v == id)
            .count()
    }

    /// The next start of `id` fails with QEMU exiting at once, saying `why`.
    pub fn refuse_start(&self, id: VmId, why: &str) {
        lock(&self.state).refuse.insert(id, why.to_string());
    }

    /// `id`'s QEMU goes away on its own: `status` is how the process ended, `ending` what
    /// its QMP events said.
    pub fn exit(&self, id: VmId, status: Option<&str>, ending: Ending) {
        let p = lock(&self.state).running.remove(&id);
        let p = p.unwrap_or_else(|| panic!("VM {id} does not run"));
        p.gone
            .send_replace(Some((status.map(str::to_string), ending)));
    }

    /// Whether `id`'s guest is paused by a completed migration.
    pub fn paused(&self, id: VmId) -> bool {
        lock(&self.state).paused.contains(&id)
    }

    /// How many times `id`'s guest was resumed after a completed migration.
    pub fn resumes(&self, id: VmId) -> usize {
        lock(&self.state)
            .resumed
            .iter()
            .filter(|v| **v == id)
            .count()
    }

    /// Whether `id` was announced on its networks after an activation.
    pub fn announced(&self, id: VmId) -> bool {
        lock(&self.state).announced.contains(&id)
    }

    /// Whether a destination QEMU of `id` runs here (receiving, not activated).
    pub fn receiving(&self, id: VmId) -> bool {
        lock(&self.state).incoming.contains_key(&id)
    }

    /// The next migration of `id` out fails, saying `why`.
    pub fn fail_migration(&self, id: VmId, why: &str) {
        lock(&self.state).fail_out.insert(id, why.to_string());
    }

    /// Migrations out stop before their switchover until [`FakeRunner::release_switchover`].
    pub fn hold_switchover(&self) {
        lock(&self.state).switchover = Some(watch::channel(false).0);
    }

    /// Lets held migrations switch over.
    pub fn release_switchover(&self) {
        if let Some(s) = &lock(&self.state).switchover {
            s.send_replace(true);
        }
    }

    /// The stream to the destination `id` ends: the whole VM arrived (`Ok`) or not.
    pub fn arrive(&self, id: VmId, how: Result<(), &str>) {
        let tx = lock(&self.state)
            .arrivals
            .entry(id)
            .or_insert_with(|| watch::channel(None).0)
            .clone();
        tx.send_replace(Some(how.map_err(str::to_string)));
    }

    fn handle(&self, id: VmId, p: &Proc) -> Box<dyn RunningVm> {
        Box::new(FakeRunning {
            id,
            pid: p.pid,
            gone: p.gone.subscribe(),
            runner: self.clone(),
        })
    }
}

impl VmRunner for FakeRunner {
    fn start<'a>(
        &'a self,
        spec: &'a VmSpec,
        _paths: &'a VmPaths,
    ) -> BoxFuture<'a, Result<Box<dyn RunningVm>, RunError>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            *s.starts.entry(spec.id).or_default() += 1;
            if let Some(why) = s.refuse.remove(&spec.id) {
                return Err(RunError::EarlyExit {
                    status: "exit status: 1".into(),
                    stderr: why,
                });
            }
            assert!(
                !s.running.contains_key(&spec.id),
                "VM {} started while its QEMU runs",
                spec.id
            );
            s.last_pid += 1;
            let p = Proc {
                pid: 1000 + s.last_pid,
                gone: watch::channel(None).0,
            };
            s.running.insert(spec.id, p.clone());
            drop(s);
            Ok(self.handle(spec.id, &p))
        })
    }

    fn find<'a>(
        &'a self,
        spec: &'a VmSpec,
        _paths: &'a VmPaths,
    ) -> BoxFuture<'a, Result<Option<Box<dyn RunningVm>>, RunError>> {
        Box::pin(async move {
            let p = lock(&self.state).running.get(&spec.id).cloned();
            Ok(p.map(|p| self.handle(spec.id, &p)))
        })
    }

    fn cleanup(&self, id: VmId) -> BoxFuture<'_, ()> {
        lock(&self.state).cleanups.push(id);
        Box::pin(async {})
    }

    fn incoming(
        &self,
        plan: IncomingPlan,
    ) -> BoxFuture<'_, Result<Box<dyn IncomingVm>, MigrateError>> {
        Box::pin(async move {
            let id = plan.spec.id;
            let mut files = Vec::new();
            for d in &plan.disks {
                std::fs::write(&d.path, b"").map_err(|e| MigrateError::TargetDisk {
                    path: d.path.clone(),
                    why: e.to_string(),
                })?;
                files.push(d.path.clone());
            }
            let mut s = lock(&self.state);
            assert!(!s.incoming.contains_key(&id), "two destinations of {id}");
            s.incoming.insert(id, files);
            s.last_pid += 1;
            let pid = 1000 + s.last_pid;
            let rx = s
                .arrivals
                .entry(id)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe();
            Ok(Box::new(FakeIncoming {
                id,
                pid,
                arrival: rx,
                runner: self.clone(),
            }) as Box<dyn IncomingVm>)
        })
    }

    fn kill_incoming<'a>(&'a self, id: VmId, _paths: &'a VmPaths) -> BoxFuture<'a, ()> {
        lock(&self.state).incoming.remove(&id);
        Box::pin(async {})
    }
}

/// A fake destination QEMU.
#[derive(Debug)]
struct FakeIncoming {
    id: VmId,
    pid: i32,
    arrival: watch::Receiver<Option<Result<(), String>>>,
    runner: FakeRunner,
}

impl IncomingVm for FakeIncoming {
    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn wait_complete<'a>(
        &'a mut self,
        cancel: &'a std::sync::atomic::AtomicBool,
    ) -> BoxFuture<'a, Result<(), MigrateError>> {
        Box::pin(async move {
            loop {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(MigrateError::Cancelled);
                }
                if let Some(how) = self.arrival.borrow().clone() {
                    return how.map_err(|why| MigrateError::Failed {
                        status: "failed".into(),
                        why,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn activate(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn RunningVm>, MigrateError>> {
        Box::pin(async move {
            let mut s = lock(&self.runner.state);
            s.incoming.remove(&self.id);
            s.announced.push(self.id);
            *s.starts.entry(self.id).or_default() += 1;
            let p = Proc {
                pid: self.pid,
                gone: watch::channel(None).0,
            };
            s.running.insert(self.id, p.clone());
            drop(s);
            Ok(self.runner.handle(self.id, &p))
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let files = lock(&self.runner.state).incoming.remove(&self.id);
            for f in files.into_iter().flatten() {
                let _ = std::fs::remove_file(f);
            }
        })
    }
}

#[derive(Debug)]
struct FakeRunning {
    id: VmId,
    pid: i32,
    gone: watch::Receiver<Option<(Option<String>, Ending)>>,
    runner: FakeRunner,
}

impl RunningVm for FakeRunning {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn startup(&self) -> Duration {
        Duration::from_millis(10)
    }

    fn exited(&mut self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let status = match self.gone.wait_for(|g| g.is_some()).await {
                Ok(g) => Some(g.as_ref().and_then(|(status, _)| status.clone())),
                Err(_) => None,
            };
            match status {
                Some(s) => s,
                // The runner is gone with the test: never ends.
                None => std::future::pending().await,
            }
        })
    }

    fn ended(self: Box<Self>, status: Option<String>) -> BoxFuture<'static, Exit> {
        let ending = self.gone.borrow().as_ref().map(|(_, e)| *e);
        let exit = match ending {
            Some(Ending::Poweroff) => Exit::GuestPoweroff,
            Some(Ending::Panic) => Exit::GuestPanic(status),
            Some(Ending::Crash) | None => Exit::Died(status),
        };
        Box::pin(async move { exit })
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, StopHow> {
        Box::pin(async move {
            let mut s = lock(&self.runner.state);
            s.stops.push((self.id, grace));
            // The same process, not one started since.
            match s.running.get(&self.id) {
                Some(p) if p.pid == self.pid => {}
                _ => return StopHow::AlreadyGone,
            }
            if let Some(p) = s.running.remove(&self.id) {
                p.gone.send_replace(Some((None, Ending::Poweroff)));
            }
            s.paused.remove(&self.id);
            StopHow::Graceful
        })
    }

    fn migrate_out<'a>(
        &'a mut self,
        spec: &'a VmSpec,
        plan: &'a OutgoingPlan,
        sizes: &'a [u64],
        cancel: &'a std::sync::atomic::AtomicBool,
        progress: &'a mut (dyn FnMut(Progress) + Send),
    ) -> BoxFuture<'a, Result<Outcome, MigrateError>> {
        Box::pin(async move {
            use std::sync::atomic::Ordering;
            if sizes.len() != spec.disks.len() || plan.syncs.len() != spec.disks.len() {
                return Err(MigrateError::PlanDisks {
                    plan: sizes.len(),
                    vm: spec.disks.len(),
                });
            }
            let (fail, gate) = {
                let mut s = lock(&self.runner.state);
                s.migrating.insert(self.id);
                (
                    s.fail_out.remove(&self.id),
                    s.switchover.as_ref().map(|g| g.subscribe()),
                )
            };
            let undo = |runner: &FakeRunner, id| {
                lock(&runner.state).migrating.remove(&id);
            };
            progress(Progress::MirrorsStarted { disks: sizes.len() });
            progress(Progress::Mirror {
                done: 0,
                total: sizes.iter().sum(),
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            progress(Progress::DisksSynced);
            progress(Progress::Memory {
                transferred: 1 << 20,
                remaining: 1 << 20,
                total: 2 << 20,
                dirty_rate: 4096,
                expected_downtime_ms: 20,
                downtime_limit_ms: 100,
                cpu_throttle_percent: 0,
            });
            if let Some(mut g) = gate {
                loop {
                    if cancel.load(Ordering::Relaxed) {
                        undo(&self.runner, self.id);
                        return Err(MigrateError::Cancelled);
                    }
                    if *g.borrow_and_update() {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(100), g.changed()).await;
                }
            }
            if cancel.load(Ordering::Relaxed) {
                undo(&self.runner, self.id);
                return Err(MigrateError::Cancelled);
            }
            if let Some(why) = fail {
                undo(&self.runner, self.id);
                return Err(MigrateError::Failed {
                    status: "failed".into(),
                    why,
                });
            }
            progress(Progress::Switchover);
            let mut s = lock(&self.runner.state);
            s.migrating.remove(&self.id);
            s.paused.insert(self.id);
            Ok(Outcome {
                downtime_ms: 42,
                memory_ms: 500,
                total_ms: 800,
                ram_transferred: 1 << 20,
                downtime_limit_ms: 100,
            })
        })
    }

    fn resume(&mut self) -> BoxFuture<'_, Result<(), MigrateError>> {
        Box::pin(async move {
            let mut s = lock(&self.runner.state);
            s.paused.remove(&self.id);
            s.resumed.push(self.id);
            Ok(())
        })
    }

    fn recover_migration<'a>(&'a mut self, _spec: &'a VmSpec) -> BoxFuture<'a, Recovered> {
        Box::pin(async move {
            let mut s = lock(&self.runner.state);
            if s.migrating.remove(&self.id) {
                Recovered::Undone
            } else if s.paused.contains(&self.id) {
                Recovered::Completed
            } else {
                Recovered::Nothing
            }
        })
    }
}

/// The node's networks in memory: segments with their zone and peers, and which port is
/// on which segment. A segment can be made unjoinable, as when QEMU made no tap.
#[derive(Debug, Default)]
pub struct FakeNetworks {
    state: Mutex<NetState>,
}

#[derive(Debug, Default)]
struct NetState {
    segments: BTreeMap<u32, (Zone, BTreeSet<Ipv4Addr>)>,
    ports: BTreeMap<String, u32>,
    broken: BTreeSet<u32>,
}

impl FakeNetworks {
    /// Joining segment `vni` fails from now on.
    pub fn break_segment(&self, vni: u32) {
        lock(&self.state).broken.insert(vni);
    }

    /// The segments on the node.
    pub fn segments(&self) -> Vec<u32> {
        lock(&self.state).segments.keys().copied().collect()
    }

    /// The segment a port is on.
    pub fn port(&self, name: &str) -> Option<u32> {
        lock(&self.state).ports.get(name).copied()
    }

    /// A segment's flood list.
    pub fn peers(&self, vni: u32) -> Option<BTreeSet<Ipv4Addr>> {
        lock(&self.state).segments.get(&vni).map(|(_, p)| p.clone())
    }
}

impl Networks for FakeNetworks {
    fn join<'a>(
        &'a self,
        ports: &'a [(String, Segment)],
    ) -> BoxFuture<'a, Result<(), NetdevError>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            for (tap, seg) in ports {
                match s.segments.get(&seg.vni) {
                    Some((zone, _)) if *zone != seg.zone => {
                        return Err(NetdevError::ZoneClash {
                            vni: seg.vni,
                            found: format!("zy:{zone}:{}", seg.vni),
                            wanted: seg.zone,
                        })
                    }
                    Some(_) => {}
                    None => {
                        s.segments.insert(seg.vni, (seg.zone, seg.peers.clone()));
                    }
                }
                if s.broken.contains(&seg.vni) {
                    return Err(NetdevError::Missing(tap.clone()));
                }
                s.ports.insert(tap.clone(), seg.vni);
            }
            Ok(())
        })
    }

    fn leave<'a>(&'a self, ports: &'a [(String, Segment)]) -> BoxFuture<'a, Vec<NetdevError>> {
        Box::pin(async move {
            let mut s = lock(&self.state);
            // The taps went with QEMU.
            for (tap, _) in ports {
                s.ports.remove(tap);
            }
            for (_, seg) in ports {
                if !s.ports.values().any(|v| *v == seg.vni) {
                    s.segments.remove(&seg.vni);
                }
            }
            Vec::new()
        })
    }

    fn sync_peers<'a>(
        &'a self,
        vni: u32,
        peers: &'a BTreeSet<Ipv4Addr>,
    ) -> BoxFuture<'a, Result<(), NetdevError>> {
        Box::pin(async move {
            if let Some((_, p)) = lock(&self.state).segments.get_mut(&vni) {
                *p = peers.clone();
            }
            Ok(())
        })
    }
}

/// A coordinator's blob store in memory. Fetches can be held at a gate, to catch the node
/// mid-fetch.
#[derive(Debug)]
pub struct FakeBlobs {
    blobs: Mutex<HashMap<BlobHash, Vec<u8>>>,
    open: watch::Sender<bool>,
    started: watch::Sender<usize>,
}

impl Default for FakeBlobs {
    fn default() -> Self {
        Self {
            blobs: Mutex::default(),
            open: watch::channel(true).0,
            started: watch::channel(0).0,
        }
    }
}

impl FakeBlobs {
    /// Stores a blob; its hash.
    pub fn add(&self, bytes: &[u8]) -> BlobHash {
        let h = BlobHash::of(bytes);
        lock(&self.blobs).insert(h, bytes.to_vec());
        h
    }

    /// Fetches wait until [`FakeBlobs::release`].
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Lets held fetches go on.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    /// Waits until `n` fetches have started (held ones included).
    pub async fn started(&self, n: usize) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|s| *s >= n).await;
    }

    /// How many fetches have started.
    pub fn fetches(&self) -> usize {
        *self.started.borrow()
    }
}

impl BlobSource for FakeBlobs {
    fn ensure_blob<'a>(
        &'a self,
        hash: BlobHash,
        dir: &'a BlobDir,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            if dir.has(&hash) {
                return Ok(());
            }
            self.started.send_modify(|n| *n += 1);
            let mut open = self.open.subscribe();
            let _ = open.wait_for(|o| *o).await;
            let bytes = lock(&self.blobs).get(&hash).cloned();
            let bytes = bytes.ok_or(FetchError::NotFound(hash))?;
            let (got, _) = dir.put(&mut bytes.as_slice(), u64::MAX)?;
            assert_eq!(got, hash);
            Ok(())
        })
    }
}

/// A test's directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zy-{what}-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits for a watched value, failing the test if it never comes: under tokio's paused
/// clock the timeout fires as soon as nothing else can happen, so a bug fails at once
/// instead of hanging.
pub async fn until<T: Clone + std::fmt::Debug>(
    rx: &mut watch::Receiver<T>,
    what: &str,
    f: impl FnMut(&T) -> bool,
) -> T {
    let got = match tokio::time::timeout(Duration::from_secs(3600), rx.wait_for(f)).await {
        Ok(Ok(v)) => Ok(v.clone()),
        Ok(Err(_)) => Err("gone before"),
        Err(_) => Err("never"),
    };
    got.unwrap_or_else(|why| panic!("{why} {what}; last: {:?}", *rx.borrow()))
}

/// Lets every task run until all wait: under tokio's paused clock time moves only when
/// nothing else can run, so after this every request sent before has been handled.
pub async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An actor context on fakes, under `dir`; its events.
pub fn ctx(
    dir: &std::path::Path,
    runner: &FakeRunner,
    networks: Option<Arc<FakeNetworks>>,
) -> (
    crate::vm::actor::Ctx,
    tokio::sync::mpsc::Receiver<crate::vm::actor::VmEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let clock = crate::vm::observed::ObservedClock::open(&dir.join("observed-generation"));
    let ctx = crate::vm::actor::Ctx {
        data_dir: dir.to_path_buf(),
        events: tx,
        networks: networks.map(|n| n as Arc<dyn Networks>),
        runner: Arc::new(runner.clone()),
        clock: Arc::new(clock.unwrap()),
        migrations: Arc::new(crate::vm::migration::Migrations::new().0),
    };
    (ctx, rx)
}

/// A small VM booting a kernel (which the fake runner never reads).
pub fn spec(name: &str) -> VmSpec {
    VmSpec {
        id: VmId::new_random(),
        name: name.into(),
        vcpus: 1,
        memory_mib: 128,
        accel: zy_common::proto::Accel::Tcg,
        boot: crate::vm::spec::Boot::Kernel {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        },
        disks: vec![],
        nics: vec![],
    }
}

/// A port of a VM on segment `vni` of the intranet.
pub fn port(tap: &str, vni: u32) -> (String, Segment) {
    (
        tap.to_string(),
        Segment {
            vni,
            zone: Zone::Intranet,
            local: Ipv4Addr::new(10, 0, 0, 1),
            peers: [Ipv4Addr::new(10, 0, 0, 2)].into(),
            underlay_mtu: crate::netdev::UNDERLAY_MTU,
        },
    )
}

/// Waits until an actor has ended (every handle of it dropped, as when the agent stops).
pub async fn ended(mut status: watch::Receiver<crate::vm::actor::VmStatus>) {
    let gone = async { while status.changed().await.is_ok() {} };
    tokio::time::timeout(Duration::from_secs(3600), gone)
        .await
        .expect("the actor never ended");
}

/// Enrolls a node in `data_dir` as `zy-agent join` does: an identity for `node` of `ca`,
/// with the certificate kind a migration endpoint needs (`peer`) or the client-only kind
/// of enrollments before protocol version 4.
pub fn enroll(
    data_dir: &std::path::Path,
    ca: &zy_common::tls::SiteCa,
    node: zy_common::NodeId,
    peer: bool,
) {
    let (key, csr) = zy_common::tls::node_request("n").unwrap();
    let v = Duration::from_secs(3600);
    let cert = if peer {
        ca.issue_node_peer(&csr, node, Zone::Intranet, v)
    } else {
        ca.issue_node(&csr, node, Zone::Intranet, v)
    }
    .unwrap();
    crate::identity::IdentityDir::new(data_dir)
        .store(
            &crate::identity::NodeFile {
                node_id: node,
                name: "n".into(),
                zone: Zone::Intranet,
                coordinator: "127.0.0.1:1".into(),
            },
            &key.serialize_pem(),
            &cert,
            ca.cert_der(),
        )
        .unwrap();
}
