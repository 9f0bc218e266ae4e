//! The VM benchmark: how long a VM takes to start through the whole stack (API, coordinator,
//! node, QEMU, guest), and what the agent costs with many VMs on its node. Run as root (the
//! lab builds network namespaces), after building the binaries of the `dist` profile:
//!
//! ```text
//! scripts/bench.sh        # cargo build --profile dist --bins && ZY_BIN_DIR=target/dist ... cargo bench -p zy-lab --bench vms
//! ZY_BENCH_ONLY_VMS=1 scripts/bench.sh   # this bench alone
//! ```
//!
//! Figures (none is asserted; nothing fails on slowness):
//!
//! 1. One VM at a time: a lab site with two nodes of the intranet zone, the test guest
//!    (`images/make-test-guest.sh`) imported with `zy image import`, and N VMs created one
//!    after another through `POST /v1/vms`, each deleted once its guest printed `ZY-READY`.
//!    Per VM: request to QEMU running, to the guest's readiness marker, and the split between
//!    our own overhead and QEMU's own start-up (a bare QEMU with the same command line,
//!    spawned by the bench) and the guest's boot.
//! 2. N VMs at once across the two nodes: created back to back, time until all run and all
//!    printed `ZY-READY`.
//! 3. The agent with N VMs on its node (a one-node site): VmRSS and CPU.
//! 4. A node fetching a big image onto a slow disk (a one-node site whose data directory is
//!    on a throttled loop device): how late its load reports get, and whether it stays Ready.
//!
//! The figures are printed and written into `docs/PERFORMANCE.md` between the markers
//! `<!-- bench:vms:begin -->` and `<!-- bench:vms:end -->` (added after the spine section when
//! missing; nothing else in the file is touched).
//!
//! Environment (all optional):
//!
//! | variable                  | default      | meaning                                          |
//! |---------------------------|--------------|--------------------------------------------------|
//! | `ZY_BENCH_VMS`            | 20           | VMs one after another (figure 1), and the default of the next two |
//! | `ZY_BENCH_VMS_BURST`      | above        | VMs at once across two nodes (figure 2)          |
//! | `ZY_BENCH_VMS_NODE`       | above        | VMs on the one node of figure 3                  |
//! | `ZY_BENCH_VMS_MEMORY`     | 128          | MiB of memory per VM                             |
//! | `ZY_BENCH_VMS_WINDOW`     | 30           | agent CPU window with the VMs running, seconds   |
//! | `ZY_BENCH_VMS_SETTLE`     | 5            | pause before the idle and the loaded measurement |
//! | `ZY_BENCH_VMS_QEMU_REF`   | ZY_BENCH_VMS | bare QEMU starts for the reference (one before each VM of figure 1) |
//! | `ZY_BENCH_VMS_PAUSE_MS`   | 1000         | pause between `ZY-READY` and a VM's deletion     |
//! | `ZY_BENCH_VMS_TIMEOUT`    | 240          | seconds a VM (or a batch) may take to boot       |
//! | `ZY_BENCH_VMS_SLOW_GIB`   | 4            | GiB of the image fetched onto the slow disk (figure 4) |
//! | `ZY_BENCH_VMS_SLOW_MIBPS` | 64           | the slow disk's write limit, MiB/s               |
//! | `ZY_BENCH_VMS_ONLY`       | all          | comma list of `seq`, `burst`, `agent`, `slowdisk` |
//! | `ZY_BENCH_WRITE`          | 1 unless ZY_BENCH_VMS_ONLY | 0 to leave docs/PERFORMANCE.md alone |

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use zy_api::{Accepted, CreateVm, VmView};
use zy_cli::client::Client;
use zy_common::time::now_millis;
use zy_common::{VmId, Zone};
use zy_lab::bench::{
    self, admin_client, clk_tck, dist, env_u64, fmt_ms, log_time, method, mib, quantile, span,
    stat_fields, status_kib, CpuSample, CpuUse, DocSection, Machine, Mem, Results, SectionHead,
};
use zy_lab::site::Site;
use zy_lab::{bin_dir, pid_alive, API_PORT, COORD_IP};

/// Where the figures go in docs/PERFORMANCE.md: after the spine section when missing.
const DOCS: DocSection<'static> = DocSection {
    name: "vms",
    after: Some("spine"),
    preamble: "Measured figures of Zhengyun. The sections between the `bench:` markers are written by the benchmarks (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_VMS_ONLY",
};

/// What one QEMU costs beyond its guest's memory, for the free-memory check.
const QEMU_OVERHEAD_MIB: u64 = 96;
/// Memory left to everything else when deciding how many VMs fit.
const HOST_RESERVE_MIB: u64 = 1024;

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Debug, Clone)]
struct Settings {
    seq: usize,
    burst: usize,
    node_vms: usize,
    memory_mib: u64,
    window_secs: u64,
    settle_secs: u64,
    qemu_refs: usize,
    /// Pause between a VM's `ZY-READY` and its deletion.
    pause: Duration,
    timeout: Duration,
    slow_gib: u64,
    slow_mibps: u64,
    only: Option<Vec<String>>,
    write_docs: bool,
    /// The variables of this bench that were set, for the record.
    overrides: Vec<String>,
}

impl Settings {
    fn from_env() -> Self {
        let seq = env_u64("ZY_BENCH_VMS").unwrap_or(20).max(1) as usize;
        let only = bench::env_list(DOCS.only_var);
        Self {
            seq,
            burst: env_u64("ZY_BENCH_VMS_BURST").map_or(seq, |v| v.max(1) as usize),
            node_vms: env_u64("ZY_BENCH_VMS_NODE").map_or(seq, |v| v.max(1) as usize),
            memory_mib: env_u64("ZY_BENCH_VMS_MEMORY").unwrap_or(128).max(64),
            window_secs: env_u64("ZY_BENCH_VMS_WINDOW").unwrap_or(30).max(1),
            settle_secs: env_u64("ZY_BENCH_VMS_SETTLE").unwrap_or(5),
            qemu_refs: env_u64("ZY_BENCH_VMS_QEMU_REF").map_or(seq, |v| v as usize),
            pause: Duration::from_millis(env_u64("ZY_BENCH_VMS_PAUSE_MS").unwrap_or(1000)),
            timeout: Duration::from_secs(env_u64("ZY_BENCH_VMS_TIMEOUT").unwrap_or(240).max(10)),
            slow_gib: env_u64("ZY_BENCH_VMS_SLOW_GIB").unwrap_or(4).clamp(1, 32),
            slow_mibps: env_u64("ZY_BENCH_VMS_SLOW_MIBPS").unwrap_or(64).max(1),
            write_docs: bench::docs_wanted(only.is_none()),
            only,
            overrides: bench::env_overrides(|k| {
                k.starts_with("ZY_BENCH_VMS") || k == "ZY_BENCH_WRITE"
            }),
        }
    }

    fn runs(&self, section: &str) -> bool {
        bench::selected(self.only.as_deref(), section)
    }
}

/// The first line of `qemu-system-x86_64 --version`.
fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "QEMU not found".into())
}

// ---------------------------------------------------------------------------------------------
// Clocks, /proc and logs

/// Wall-clock time in µs since the Unix epoch.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn clock_us(clock: nix::libc::clockid_t) -> i64 {
    let mut ts = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which lives on this frame.
    let rc = unsafe { nix::libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000
}

/// Wall clock minus CLOCK_BOOTTIME (the clock of a process's start time in /proc), in µs.
fn boot_offset_us() -> i64 {
    let a = clock_us(nix::libc::CLOCK_REALTIME);
    let b = clock_us(nix::libc::CLOCK_BOOTTIME);
    let c = clock_us(nix::libc::CLOCK_REALTIME);
    (a + c) / 2 - b
}

/// When a process was forked, as wall-clock µs, to one clock tick (field 22, starttime).
fn proc_start_us(pid: u32, boot_offset: i64) -> Option<u64> {
    let ticks: u64 = stat_fields(&pid.to_string()).ok()?.get(19)?.parse().ok()?;
    let since_boot = (ticks as f64 / clk_tck() * 1e6) as i64;
    u64::try_from(since_boot + boot_offset).ok()
}

fn mem_available_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    status_kib(&text, "MemAvailable:").unwrap_or(0)
}

fn open_fds(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A file's modification time, in wall-clock µs.
fn mtime_us(path: &Path) -> Option<u64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_micros() as u64)
}

// ---------------------------------------------------------------------------------------------
// One VM's timeline

/// Everything measured about one VM, as wall-clock µs.
#[derive(Debug, Clone, Default)]
struct VmRun {
    name: String,
    id: String,
    /// Node index (1-based).
    node: usize,
    pid: Option<u32>,
    /// Just before `POST /v1/vms` (a fresh TLS connection, as the CLI makes).
    req: u64,
    /// Its 202 answer.
    resp: u64,
    /// Coordinator log: `VM placed`.
    placed: Option<u64>,
    /// Agent log: the VM's actor is `starting` (just before it spawns QEMU).
    starting: Option<u64>,
    /// QEMU's fork, from /proc/<pid>/stat (one clock tick of resolution).
    forked: Option<u64>,
    /// QEMU's pid file (written early in QEMU's start-up): its mtime.
    pidfile: Option<u64>,
    /// Agent log: `running` (QMP answered `running`, network plugged).
    running_agent: Option<u64>,
    /// Coordinator log: the node's `running` report recorded (visible in the API from then).
    running_coord: Option<u64>,
    /// The bench saw `ZY-READY <name>` in the console log.
    ready: Option<u64>,
    /// `DELETE /v1/vms/{id}` round trip.
    delete_ms: Option<f64>,
}

impl VmRun {
    fn dir(&self, site: &Site) -> PathBuf {
        site.agent_dir(self.node).join("vms").join(&self.id)
    }

    fn console_ready(&self, site: &Site) -> bool {
        let want = format!("ZY-READY {}", self.name);
        std::fs::read(self.dir(site).join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).contains(&want))
            .unwrap_or(false)
    }
}

/// Fills in what the coordinator's and the agents' logs say about each VM.
fn fill_from_logs(site: &Site, runs: &mut [VmRun]) {
    let coord = site.lab.log("coordinator");
    let agents: Vec<String> = (1..=site.lab.n_nodes)
        .map(|i| site.lab.log(&format!("agent-n{i}")))
        .collect();
    for r in runs {
        let vm = format!("vm={}", r.id);
        r.placed = log_time(&coord, &["VM placed", &vm]);
        r.running_coord = log_time(&coord, &["VM state reported", &vm, "state=running"]);
        if let Some(a) = agents.get(r.node.wrapping_sub(1)) {
            r.starting = log_time(a, &["VM state", &vm, "state=starting"]);
            r.running_agent = log_time(a, &["VM state", &vm, "state=running"]);
        }
    }
}

fn collect(runs: &[VmRun], f: impl Fn(&VmRun) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(f).collect()
}

/// One of the times of a [`VmRun`].
type At = fn(&VmRun) -> Option<u64>;

/// Rows of distributions (see [`dist`]) without a target, in order.
fn dist_rows<'a>(res: &mut Results, rows: impl IntoIterator<Item = (&'a str, Vec<f64>)>) {
    for (figure, v) in rows {
        res.row(figure, dist(&v), "—");
    }
}

// ---------------------------------------------------------------------------------------------
// The API

/// An API client with the admin token and CA that `zy-coordinator init` wrote; it must be
/// used from a thread inside the coordinator's namespace.
fn api_client(site: &Site) -> Result<Client> {
    Ok(admin_client(&site.state, &format!("{COORD_IP}:{API_PORT}"))?.0)
}

async fn api_create(api: &Client, name: &str, memory_mib: u64) -> Result<VmView> {
    let body = serde_json::to_value(CreateVm {
        name: name.to_string(),
        zone: Zone::Intranet,
        vcpus: 1,
        memory_mib,
        disk_gib: 0,
        image: "guest".into(),
        start: true,
        ssh_keys: vec![],
        user_data: None,
        anti_affinity: None,
    })?;
    let a: Accepted = api
        .call(method("POST"), "/v1/vms", Some(body))
        .await
        .with_context(|| format!("create {name}"))?;
    a.vm.ok_or_else(|| anyhow!("create {name} answered without its VM"))
}

async fn api_list(api: &Client) -> Result<Vec<VmView>> {
    Ok(api.call(method("GET"), "/v1/vms", None).await?)
}

/// Deletes a VM and follows its operation until the node has removed it.
async fn api_delete(api: &Client, key: &str) -> Result<VmView> {
    let a: Accepted = api
        .call(method("DELETE"), &format!("/v1/vms/{key}"), None)
        .await
        .with_context(|| format!("delete {key}"))?;
    let mut op = a.operation;
    while op.state == "running" {
        tokio::time::sleep(Duration::from_millis(20)).await;
        op = api
            .call(method("GET"), &format!("/v1/ops/{}", op.id), None)
            .await
            .with_context(|| format!("follow the delete of {key}"))?;
    }
    if op.state != "succeeded" {
        return Err(anyhow!("delete of {key} failed: {:?}", op.reason));
    }
    a.vm.ok_or_else(|| anyhow!("delete of {key} answered without its VM"))
}

fn node_index(v: &VmView) -> Result<usize> {
    v.node
        .as_deref()
        .and_then(|n| n.strip_prefix('n'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("{} was placed on no lab node ({:?})", v.name, v.node))
}

/// How long a batch may go without one more VM printing `ZY-READY` before the rest count
/// as stuck.
const STALL: Duration = Duration::from_secs(60);

/// VMs started together, and what is known of those that never printed `ZY-READY`.
#[derive(Debug, Default)]
struct Batch {
    runs: Vec<VmRun>,
    /// One line per stuck VM: its state, process, console and log.
    stuck: Vec<String>,
}

impl Batch {
    /// The batch, or an error naming the stuck VMs.
    fn complete(self) -> Result<Vec<VmRun>> {
        if self.stuck.is_empty() {
            Ok(self.runs)
        } else {
            bail!(
                "{} of {} VMs printed no ZY-READY: {}",
                self.stuck.len(),
                self.runs.len(),
                self.stuck.join(" || ")
            )
        }
    }
}

/// Printable text, at most `max` characters from its end.
fn tail_text(bytes: &[u8], max: usize) -> String {
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let skip = text.chars().count().saturating_sub(max);
    text.chars().skip(skip).collect()
}

/// What is known of a VM that never printed `ZY-READY`.
fn diagnose(site: &Site, r: &VmRun, v: Option<&VmView>) -> String {
    let dir = r.dir(site);
    let console = std::fs::read(dir.join("console.log")).unwrap_or_default();
    let stderr = std::fs::read(dir.join("qemu.stderr")).unwrap_or_default();
    let vm = format!("vm={}", r.id);
    let agent: Vec<String> = site
        .lab
        .log(&format!("agent-n{}", r.node))
        .lines()
        .filter(|l| l.contains(&vm))
        .map(|l| tail_text(l.as_bytes(), 200))
        .collect();
    let pid = v.and_then(|v| v.pid);
    format!(
        "{} on n{}: state {}{}, pid {:?} ({}), console.log {} bytes ending `{}`, qemu.stderr `{}`, agent log: {}",
        r.name,
        r.node,
        v.map_or("unlisted", |v| v.state.as_str()),
        v.and_then(|v| v.reason.as_deref())
            .map(|x| format!(" ({x})"))
            .unwrap_or_default(),
        pid,
        if pid.is_some_and(|p| pid_alive(p as i32)) {
            "alive"
        } else {
            "not running"
        },
        console.len(),
        tail_text(&console, 300),
        tail_text(&stderr, 300),
        agent.join(" / ")
    )
}

/// Creates the VMs back to back, then waits until each printed `ZY-READY` on its console
/// (checked every `poll`); the API is asked every 500 ms only, for failures, so as not to
/// load the coordinator while it works. Stops waiting at the timeout, or when no VM got
/// ready for [`STALL`] while some did; the rest are then described in `stuck`. Fills in
/// pids, fork times and pid files while the VMs run, and the log times.
async fn start_vms(
    site: &Site,
    api: &Client,
    s: &Settings,
    names: &[String],
    boot_offset: i64,
) -> Result<Batch> {
    let poll = Duration::from_millis(if names.len() <= 2 { 10 } else { 25 });
    let mut runs = Vec::with_capacity(names.len());
    for name in names {
        let req = now_us();
        let v = api_create(api, name, s.memory_mib).await?;
        let resp = now_us();
        runs.push(VmRun {
            name: name.clone(),
            id: v.id.to_string(),
            node: node_index(&v)?,
            req,
            resp,
            ..VmRun::default()
        });
    }
    let deadline = Instant::now() + s.timeout;
    let mut next_api = Instant::now() + Duration::from_millis(500);
    let mut progress = Instant::now();
    let mut given_up = false;
    loop {
        let mut waiting = 0;
        for r in runs.iter_mut().filter(|r| r.ready.is_none()) {
            if r.console_ready(site) {
                r.ready = Some(now_us());
                progress = Instant::now();
            } else {
                waiting += 1;
            }
        }
        if waiting == 0 {
            break;
        }
        if Instant::now() >= next_api {
            next_api += Duration::from_millis(500);
            for v in api_list(api).await? {
                if v.state == "failed" && runs.iter().any(|r| r.id == v.id.to_string()) {
                    bail!("{} failed: {}", v.name, v.reason.unwrap_or_default());
                }
            }
        }
        let stalled = waiting < runs.len() && progress.elapsed() > STALL;
        if Instant::now() > deadline || stalled {
            eprintln!(
                "[vms] giving up on {waiting} of {} VMs ({})",
                runs.len(),
                if stalled {
                    format!("none got ready in the last {STALL:?}")
                } else {
                    format!("timeout of {:?}", s.timeout)
                }
            );
            given_up = true;
            break;
        }
        tokio::time::sleep(poll).await;
    }
    let views = api_list(api).await?;
    let mut stuck = Vec::new();
    for r in &mut runs {
        let v = views.iter().find(|v| v.id.to_string() == r.id);
        if r.ready.is_none() {
            let d = diagnose(site, r, v);
            eprintln!("[vms] stuck: {d}");
            stuck.push(d);
        } else if v.is_none_or(|v| v.state != "running") {
            bail!(
                "{} printed ZY-READY but is `{}`",
                r.name,
                v.map_or("unlisted", |v| v.state.as_str())
            );
        }
        r.pid = v.and_then(|v| v.pid);
        if let Some(pid) = r.pid {
            r.forked = proc_start_us(pid, boot_offset);
        }
        r.pidfile = mtime_us(&r.dir(site).join("qemu.pid"));
    }
    debug_assert_eq!(given_up, !stuck.is_empty());
    fill_from_logs(site, &mut runs);
    Ok(Batch { runs, stuck })
}

/// After `pause`, deletes the VMs, all at once, and waits until their QEMU processes are
/// gone. Returns the wall time of the deletes.
///
/// The pause is there because the test guest prints `ZY-READY` right after starting busybox
/// `acpid`, which daemonizes before it opens the power button's input device: a delete
/// (ACPI power-off first) right after `ZY-READY` can be missed by the guest and then waits
/// the agent's whole 10 s grace before QEMU is told to quit.
async fn delete_vms(api: &Client, runs: &mut [VmRun], pause: Duration) -> Result<Duration> {
    tokio::time::sleep(pause).await;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, r) in runs.iter().enumerate() {
        let (api, id) = (api.clone(), r.id.clone());
        set.spawn(async move {
            let t = Instant::now();
            let res = api_delete(&api, &id).await;
            (i, res.map(|_| t.elapsed()))
        });
    }
    let mut failed = Vec::new();
    while let Some(j) = set.join_next().await {
        let (i, res) = j?;
        match res {
            Ok(d) => runs[i].delete_ms = Some(d.as_secs_f64() * 1000.0),
            Err(e) => failed.push(format!("{}: {e:#}", runs[i].name)),
        }
    }
    let took = t0.elapsed();
    if !failed.is_empty() {
        bail!("deletes failed: {}", failed.join("; "));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while runs
        .iter()
        .filter_map(|r| r.pid)
        .any(|p| pid_alive(p as i32))
    {
        if Instant::now() > deadline {
            bail!("QEMU processes outlived their VMs' deletion");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(took)
}

/// Delete a batch and record it; a failure is a note, not the end of the bench.
async fn delete_batch(
    api: &Client,
    runs: &mut [VmRun],
    pause: Duration,
    what: &str,
    res: &mut Results,
) {
    match delete_vms(api, runs, pause).await {
        Ok(d) => println!(
            "[{what}] deleted {} VMs in {:.2} s",
            runs.len(),
            d.as_secs_f64()
        ),
        Err(e) => res.note(format!("{what}: deleting the VMs failed: {e:#}")),
    }
}

/// How many VMs of `memory_mib` fit in the memory available now.
fn fit_in_memory(want: usize, memory_mib: u64, what: &str, res: &mut Results) -> usize {
    let avail = mem_available_kib() / 1024;
    let per = memory_mib + QEMU_OVERHEAD_MIB;
    let fit = (avail.saturating_sub(HOST_RESERVE_MIB) / per) as usize;
    println!(
        "[{what}] {avail} MiB available; {want} VMs need about {} MiB",
        want as u64 * per
    );
    if fit < want {
        res.note(format!(
            "{what}: only {fit} VMs of {memory_mib} MiB fit in the {avail} MiB available (counting {QEMU_OVERHEAD_MIB} MiB per QEMU and keeping {HOST_RESERVE_MIB} MiB), not {want}; ran {}",
            fit.max(1)
        ));
        return fit.max(1);
    }
    want
}

// ---------------------------------------------------------------------------------------------
// A bare QEMU, for QEMU's own start-up

#[derive(Debug, Default)]
struct QemuRef {
    /// `Command::spawn` returned.
    spawn_ms: Vec<f64>,
    /// QEMU wrote its pid file (mtime minus the spawn time).
    pidfile_ms: Vec<f64>,
    /// QMP greeting, capabilities negotiated, `query-status` answered `running`.
    running_ms: Vec<f64>,
}

impl QemuRef {
    fn push(&mut self, (spawn, pidfile, running): (f64, f64, f64)) {
        self.spawn_ms.push(spawn);
        self.pidfile_ms.push(pidfile);
        self.running_ms.push(running);
    }
}

/// The command line the agent gave a running VM, to start the same QEMU bare.
#[derive(Debug, Clone)]
struct QemuTemplate {
    program: String,
    args: Vec<String>,
    /// The VM's directory, as it appears in the arguments.
    vm_dir: String,
    node: usize,
}

impl QemuTemplate {
    /// Reads a running VM's command line from /proc.
    fn of(site: &Site, vm: &VmRun) -> Result<Self> {
        let pid = vm.pid.ok_or_else(|| anyhow!("no pid for {}", vm.name))?;
        let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let mut args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.is_empty() {
            bail!("empty QEMU command line");
        }
        let program = args.remove(0);
        let vm_dir = vm.dir(site).to_string_lossy().into_owned();
        if !args.iter().any(|a| a.contains(&vm_dir)) {
            bail!("the QEMU command line does not name the VM's directory: {args:?}");
        }
        Ok(Self {
            program,
            args,
            vm_dir,
            node: vm.node,
        })
    }

    /// Starts QEMU with the template's arguments (its own directory, uuid and tap name swapped
    /// for fresh ones) inside the same node namespace, and times it from spawn to QMP
    /// `running`; it is killed at once. Returns the ms to spawn, pid file and QMP `running`.
    fn run(&self, site: &Site, i: usize) -> Result<(f64, f64, f64)> {
        let dir = site.lab.dir.join(format!("qemu-ref-{i}"));
        std::fs::create_dir_all(&dir)?;
        let d = dir.to_string_lossy().into_owned();
        let mut a = Vec::with_capacity(self.args.len());
        let mut it = self.args.iter();
        while let Some(x) = it.next() {
            if x == "-uuid" {
                it.next();
                a.push(x.clone());
                a.push(VmId::new_random().to_string());
                continue;
            }
            let mut x = x.replace(&self.vm_dir, &d);
            if let Some(p) = x.find("ifname=") {
                let start = p + "ifname=".len();
                let end = x[start..].find(',').map_or(x.len(), |e| start + e);
                x.replace_range(start..end, &format!("zyref{i}"));
            }
            a.push(x);
        }
        let r = site.lab.run_in(&site.lab.node_ns(self.node), || {
            bare_qemu(&self.program, &a, &dir)
        });
        let _ = std::fs::remove_dir_all(&dir);
        let r = r?;
        println!(
            "[seq] bare QEMU {i}: spawn {:.1} ms, pid file {:.1} ms, QMP running {:.1} ms",
            r.0, r.1, r.2
        );
        Ok(r)
    }
}

fn bare_qemu(program: &str, args: &[String], dir: &Path) -> Result<(f64, f64, f64)> {
    let stderr_path = dir.join("qemu.stderr");
    let stderr = std::fs::File::create(&stderr_path)?;
    let t0_us = now_us();
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .context("cannot start QEMU")?;
    let spawned = t0.elapsed().as_secs_f64() * 1000.0;
    let result = qmp_running(&mut child, &dir.join("qmp.sock"), t0, &stderr_path);
    let _ = child.kill();
    let _ = child.wait();
    let running = result?;
    let pidfile = mtime_us(&dir.join("qemu.pid"))
        .map(|m| (m as f64 - t0_us as f64) / 1000.0)
        .unwrap_or(f64::NAN);
    Ok((spawned, pidfile, running))
}

/// Connects to QMP as soon as it accepts (trying every millisecond), negotiates, and asks
/// for the status; returns the ms since `t0` when it answered `running`.
fn qmp_running(
    child: &mut std::process::Child,
    sock: &Path,
    t0: Instant,
    stderr: &Path,
) -> Result<f64> {
    let deadline = t0 + Duration::from_secs(15);
    let stream = loop {
        if let Some(st) = child.try_wait()? {
            bail!(
                "QEMU exited ({st}): {}",
                std::fs::read_to_string(stderr).unwrap_or_default().trim()
            );
        }
        if let Ok(s) = UnixStream::connect(sock) {
            break s;
        }
        if Instant::now() > deadline {
            bail!("QEMU opened no QMP socket within 15 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut rd = BufReader::new(stream);
    let mut greeting = String::new();
    rd.read_line(&mut greeting)?;
    if !greeting.contains("QMP") {
        bail!("no QMP greeting: {greeting}");
    }
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    qmp_return(&mut rd)?;
    w.write_all(b"{\"execute\":\"query-status\"}\n")?;
    let status = qmp_return(&mut rd)?;
    let at = t0.elapsed().as_secs_f64() * 1000.0;
    if status["status"] != "running" {
        bail!("QEMU is {status} after start");
    }
    Ok(at)
}

fn qmp_return(rd: &mut impl BufRead) -> Result<serde_json::Value> {
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            bail!("QMP error: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab

/// Builds the test guest if `images/out` lacks it.
fn ensure_guest() -> Result<()> {
    let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images");
    let dir = images.join("out");
    let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.gz"));
    if !k.exists() || !i.exists() {
        println!(
            "[guest] {} is missing: running images/make-test-guest.sh",
            k.display()
        );
        let st = Command::new("bash")
            .arg(images.join("make-test-guest.sh"))
            .status()
            .context("cannot run images/make-test-guest.sh")?;
        if !st.success() || !k.exists() {
            bail!("images/make-test-guest.sh failed ({st}); build the test guest first");
        }
    }
    Ok(())
}

/// A site with `n` intranet nodes, their agents Ready, and the test guest imported as `guest`;
/// `accel` is set to the accelerator the nodes reported, if it is not known yet.
fn site_with_guest(n: usize, accel: &mut Option<String>) -> Result<Site> {
    ensure_guest()?;
    let site = Site::with_agents(&vec!["intranet"; n])?;
    // no_timer_check, as the tests and the quick start boot it: with 20 TCG guests on two
    // cores, the kernel's early IO-APIC timer check can time out and panic the guest before
    // any driver (pvpanic included) is loaded, leaving it "running" for ever.
    site.import_guest("guest", "console=ttyS0 quiet no_timer_check")?;
    if accel.is_none() {
        *accel = site
            .nodes()?
            .into_iter()
            .find_map(|n| n.inventory.map(|i| format!("{:?}", i.accel)));
    }
    Ok(site)
}

/// Kills QEMU processes whose command line names a run's directory (there should be none
/// once its site is dropped) and says so.
fn kill_leftover_qemu(dir: &Path, what: &str, res: &mut Results) {
    let pattern = dir.to_string_lossy().into_owned();
    let Ok(out) = Command::new("pgrep").arg("-f").arg(&pattern).output() else {
        res.note(format!(
            "{what}: pgrep is missing, leftover QEMU processes not checked"
        ));
        return;
    };
    let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p: &i32| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim_start().starts_with("qemu"))
        })
        .collect();
    if pids.is_empty() {
        println!("[{what}] no QEMU process of {pattern} left");
        return;
    }
    for p in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    res.note(format!(
        "{what}: {} QEMU process(es) of the run outlived the lab and were killed: {pids:?}",
        pids.len()
    ));
}

/// Builds a site of `n` nodes with the guest (see [`site_with_guest`]), runs `f` with a
/// runtime and an API client on a thread inside the coordinator's namespace, then drops the
/// site and kills any QEMU process left of it (named `what` in the notes).
fn with_site(
    n: usize,
    what: &str,
    res: &mut Results,
    accel: &mut Option<String>,
    f: impl FnOnce(&tokio::runtime::Runtime, &Site, &Client, &mut Results) -> Result<()> + Send,
) -> Result<()> {
    let site = site_with_guest(n, accel)?;
    let dir = site.lab.dir.clone();
    let r = site.lab.run_in(&site.lab.coord_ns(), || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = api_client(&site)?;
        f(&rt, &site, &api, res)
    });
    drop(site);
    kill_leftover_qemu(&dir, what, res);
    r
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Figures 1 and 2: two nodes

async fn two_nodes(
    site: &Site,
    api: &Client,
    s: &Settings,
    res: &mut Results,
    boot_offset: i64,
) -> Result<()> {
    // Warm-up: one VM per node (placement puts the second on the emptier node) so that each
    // node has the image in its cache; its QEMU command line serves the bare-QEMU reference.
    println!("[warm-up] one VM per node");
    let mut warm = start_vms(site, api, s, &names("warm", 2), boot_offset)
        .await?
        .complete()?;
    let template = match QemuTemplate::of(site, &warm[0]) {
        Ok(t) => Some(t),
        Err(e) => {
            res.note(format!("no bare QEMU reference: {e:#}"));
            None
        }
    };
    delete_batch(api, &mut warm, s.pause, "warm-up", res).await;

    if s.runs("seq") {
        if let Err(e) = sequential(site, api, s, res, boot_offset, template.as_ref()).await {
            eprintln!("[seq] failed: {e:#}");
            res.row("VMs one after another", format!("failed: {e:#}"), "—");
        }
    }
    if s.runs("burst") {
        if let Err(e) = burst_two_nodes(site, api, s, res, boot_offset).await {
            eprintln!("[burst] failed: {e:#}");
            res.row(
                format!("{} VMs at once across two nodes", s.burst),
                format!("failed: {e:#}"),
                "—",
            );
        }
    }
    Ok(())
}

async fn sequential(
    site: &Site,
    api: &Client,
    s: &Settings,
    res: &mut Results,
    boot_offset: i64,
    template: Option<&QemuTemplate>,
) -> Result<()> {
    let n = s.seq;
    println!("[seq] {n} VMs, one after another, each deleted once ready, each after a bare QEMU");
    let mut runs: Vec<VmRun> = Vec::with_capacity(n);
    let mut qref = QemuRef::default();
    let mut ref_failed = None;
    for (i, name) in names("seq", n).into_iter().enumerate() {
        // A bare QEMU just before each VM, so that both see the same machine.
        if let (Some(t), true) = (template, i < s.qemu_refs) {
            match t.run(site, i) {
                Ok(r) => qref.push(r),
                Err(e) => ref_failed = Some(format!("{e:#}")),
            }
        }
        let mut one = start_vms(site, api, s, std::slice::from_ref(&name), boot_offset)
            .await?
            .complete()?;
        delete_vms(api, &mut one, s.pause).await?;
        let r = one.remove(0);
        println!(
            "[seq] {name} on n{}: 202 after {}, running after {} (agent) / {} (coordinator), ZY-READY after {}, deleted in {}",
            r.node,
            fmt_ms((r.resp - r.req) as f64 / 1000.0),
            fmt_ms(span(Some(r.req), r.running_agent).unwrap_or(f64::NAN)),
            fmt_ms(span(Some(r.req), r.running_coord).unwrap_or(f64::NAN)),
            fmt_ms(span(Some(r.req), r.ready).unwrap_or(f64::NAN)),
            fmt_ms(r.delete_ms.unwrap_or(f64::NAN)),
        );
        runs.push(r);
    }
    let on = |i: usize| runs.iter().filter(|r| r.node == i).count();
    let req = |f: At| collect(&runs, |r| span(Some(r.req), f(r)));
    if let Some(e) = ref_failed {
        res.note(format!("a bare QEMU reference run failed: {e}"));
    }
    let to_running = req(|r| r.running_agent);
    let qemu_own = quantile(&qref.running_ms, 0.5);
    let overhead: Vec<f64> = to_running.iter().map(|t| t - qemu_own).collect();
    let m = s.memory_mib;
    let one_at_a_time = format!("One at a time ({n} VMs, {m} MiB, 1 vCPU; n1: {}, n2: {}): API answer to `POST /v1/vms` (202)", on(1), on(2));
    dist_rows(
        res,
        [
            (
                one_at_a_time.as_str(),
                collect(&runs, |r| Some((r.resp - r.req) as f64 / 1000.0)),
            ),
            (
                "Request → QEMU running (agent's `running`: QMP said `running`, network plugged)",
                to_running,
            ),
            (
                "Request → `running` recorded by the coordinator (shown by the API)",
                req(|r| r.running_coord),
            ),
            (
                "Request → `ZY-READY` on the guest's console",
                req(|r| r.ready),
            ),
        ],
    );
    res.row(
        "**Our own overhead**: request → agent's `running`, minus bare QEMU's spawn → QMP `running` (p50 of the reference)",
        if qref.running_ms.is_empty() {
            "n/a (no QEMU reference)".to_string()
        } else {
            dist(&overhead)
        },
        "≤ 100 ms p50",
    );
    let ref_rest: Vec<f64> = qref
        .running_ms
        .iter()
        .zip(&qref.pidfile_ms)
        .map(|(r, p)| r - p)
        .collect();
    let between = |a: At, b: At| collect(&runs, |r| span(a(r), b(r)));
    dist_rows(
        res,
        [
            ("· request → VM placed (coordinator log)", req(|r| r.placed)),
            (
                "· placed → agent's `starting` (command to the node, image check, VM record, actor)",
                between(|r| r.placed, |r| r.starting),
            ),
            (
                "· request → agent's `starting` (all of the control plane, before QEMU is spawned)",
                req(|r| r.starting),
            ),
            (
                "· agent's `starting` → QEMU's pid file written (spawn, QEMU's exec and early init)",
                between(|r| r.starting, |r| r.pidfile),
            ),
            (
                "· bare QEMU reference, same: spawn → pid file",
                qref.pidfile_ms.clone(),
            ),
            (
                "· QEMU's pid file → agent's `running` (QEMU init, QMP handshake and status, network plug)",
                between(|r| r.pidfile, |r| r.running_agent),
            ),
            (
                "· bare QEMU reference, same: pid file → QMP `running`",
                ref_rest,
            ),
            (
                "· bare QEMU reference, whole: spawn → QMP `running`",
                qref.running_ms.clone(),
            ),
            (
                "· agent's `running` → coordinator records it",
                between(|r| r.running_agent, |r| r.running_coord),
            ),
            (
                "Guest boot: agent's `running` → `ZY-READY` (TCG)",
                between(|r| r.running_agent, |r| r.ready),
            ),
            (
                "`DELETE /v1/vms/{vm}` to its operation's end (ACPI power-off skipped, files removed, the node's confirmation recorded)",
                collect(&runs, |r| r.delete_ms),
            ),
        ],
    );
    res.note(format!(
        "one at a time: request → QEMU forked (/proc/<pid>/stat field 22, whose 10 ms ticks round down, so this can read up to 10 ms early) {}; agent's `starting` → QEMU forked, same caveat, {}; bare QEMU's `Command::spawn` returned after {}",
        dist(&req(|r| r.forked)),
        dist(&collect(&runs, |r| span(r.starting, r.forked))),
        dist(&qref.spawn_ms)
    ));
    let slow_deletes = runs
        .iter()
        .filter(|r| r.delete_ms.is_some_and(|d| d > 5000.0))
        .count();
    if slow_deletes > 0 {
        res.note(format!(
            "one at a time: {slow_deletes} of {n} deletes took over 5 s: the guest missed the ACPI power button and the agent waited its 10 s grace before telling QEMU to quit"
        ));
    }
    Ok(())
}

async fn burst_two_nodes(
    site: &Site,
    api: &Client,
    s: &Settings,
    res: &mut Results,
    boot_offset: i64,
) -> Result<()> {
    let n = fit_in_memory(s.burst, s.memory_mib, "burst", res);
    println!("[burst] {n} VMs at once across two nodes");
    let a = CpuSample::take("self")?;
    let mut batch = start_vms(site, api, s, &names("burst", n), boot_offset).await?;
    let b = CpuSample::take("self")?;
    let busy = CpuUse::between(&a, &b);
    burst_rows(
        &batch,
        &format!("{n} VMs at once, two nodes"),
        site,
        busy,
        res,
    );
    delete_batch(api, &mut batch.runs, s.pause, "burst", res).await;
    Ok(())
}

/// The rows of a batch started at once.
fn burst_rows(batch: &Batch, label: &str, site: &Site, busy: CpuUse, res: &mut Results) {
    let runs = &batch.runs;
    let first = runs.iter().map(|r| r.req).min().unwrap_or(0);
    let last_req = runs.iter().map(|r| r.resp).max().unwrap_or(0);
    let all = |f: At| -> String {
        let v: Vec<u64> = runs.iter().filter_map(f).collect();
        match v.iter().max() {
            Some(last) if v.len() == runs.len() => fmt_ms((last - first) as f64 / 1000.0),
            Some(last) => format!(
                "never: only {} of {} (the {}th after {}; see the notes)",
                v.len(),
                runs.len(),
                v.len(),
                fmt_ms((last - first) as f64 / 1000.0)
            ),
            None => "n/a".into(),
        }
    };
    let per_node: Vec<String> = (1..=site.lab.n_nodes)
        .map(|i| format!("n{i}: {}", runs.iter().filter(|r| r.node == i).count()))
        .collect();
    let qemu_rss: u64 = runs
        .iter()
        .filter_map(|r| r.pid)
        .filter_map(|p| Mem::read(&p.to_string()).ok())
        .map(|m| m.rss)
        .sum();
    let firsts: [(&str, At); 3] = [
        ("all running (agent logs)", |r| r.running_agent),
        ("all `running` in the API (coordinator log)", |r| {
            r.running_coord
        }),
        ("all printed `ZY-READY`", |r| r.ready),
    ];
    for (what, at) in firsts {
        res.row(format!("{label}: first request → {what}"), all(at), "—");
    }
    let per_vm: [(&str, At); 3] = [
        ("agent's `starting`", |r| r.starting),
        ("QEMU running (agent)", |r| r.running_agent),
        ("`ZY-READY`", |r| r.ready),
    ];
    for (what, at) in per_vm {
        res.row(
            format!("{label}, per VM: request → {what}"),
            dist(&collect(runs, |r| span(Some(r.req), at(r)))),
            "—",
        );
    }
    for d in &batch.stuck {
        res.note(format!("{label}: never printed `ZY-READY`: {d}"));
    }
    res.note(format!(
        "{label}: placement {}; the {} requests were sent back to back in {}; the whole machine was busy {:.0} % of one core (of {} % for all CPUs) from the first request to the last `ZY-READY` (or to giving up on the rest); the QEMU processes' VmRSS summed to {} ({} per VM) at that point",
        per_node.join(", "),
        runs.len(),
        fmt_ms((last_req - first) as f64 / 1000.0),
        busy.machine_pct,
        100 * std::thread::available_parallelism().map_or(1, |p| p.get()),
        mib(qemu_rss),
        mib(qemu_rss / runs.len().max(1) as u64),
    ));
}

// ---------------------------------------------------------------------------------------------
// Figure 3: the agent with N VMs

async fn one_node(
    site: &Site,
    api: &Client,
    s: &Settings,
    res: &mut Results,
    pid: i32,
    boot_offset: i64,
) -> Result<()> {
    let p = pid.to_string();
    tokio::time::sleep(Duration::from_secs(s.settle_secs)).await;
    let idle = Mem::read(&p)?;
    let idle_fds = open_fds(&p);
    println!("[agent] idle: VmRSS {}", mib(idle.rss));
    let mut warm = start_vms(site, api, s, &names("warm", 1), boot_offset)
        .await?
        .complete()?;
    delete_batch(api, &mut warm, s.pause, "agent warm-up", res).await;

    let n = fit_in_memory(s.node_vms, s.memory_mib, "agent", res);
    println!("[agent] {n} VMs at once on one node");
    let a = CpuSample::take(&p)?;
    let ma = CpuSample::take("self")?;
    let mut batch = start_vms(site, api, s, &names("vm", n), boot_offset).await?;
    let b = CpuSample::take(&p)?;
    let mb = CpuSample::take("self")?;
    let starting = CpuUse::between(&a, &b);
    burst_rows(
        &batch,
        &format!("{n} VMs at once, one node"),
        site,
        CpuUse::between(&ma, &mb),
        res,
    );

    println!(
        "[agent] {n} VMs running; settle {} s, then a {} s window on pid {pid}",
        s.settle_secs, s.window_secs
    );
    tokio::time::sleep(Duration::from_secs(s.settle_secs)).await;
    let a = CpuSample::take(&p)?;
    tokio::time::sleep(Duration::from_secs(s.window_secs)).await;
    let b = CpuSample::take(&p)?;
    let mem = Mem::read(&p)?;
    let fds = open_fds(&p);
    let running = api_list(api)
        .await?
        .iter()
        .filter(|v| v.state == "running")
        .count();
    let window = CpuUse::between(&a, &b);
    res.row(
        "Agent RSS before any VM (VmRSS)",
        format!(
            "{} (anon {}, file {})",
            mib(idle.rss),
            mib(idle.anon),
            mib(idle.file)
        ),
        "—",
    );
    res.row(
        format!("Agent RSS with {n} VMs running (VmRSS)"),
        format!(
            "{} (anon {}, file {})",
            mib(mem.rss),
            mib(mem.anon),
            mib(mem.file)
        ),
        "≤ 25 MiB",
    );
    res.row(
        format!("Agent peak RSS, through starting {n} VMs (VmHWM)"),
        mib(mem.hwm),
        "—",
    );
    res.row(
        format!("Agent CPU while starting {n} VMs (first request → last `ZY-READY`)"),
        format!(
            "{:.0} ms CPU in {:.1} s ({:.2} % of one core; scheduler run time {:.2} %)",
            starting.cpu_s * 1000.0,
            starting.wall_s,
            starting.pct,
            starting.sched_pct
        ),
        "—",
    );
    res.row(
        format!(
            "Agent CPU with {n} VMs running ({} s window)",
            s.window_secs
        ),
        format!(
            "{:.3} % of one core ({:.0} ms CPU; scheduler run time {:.3} %)",
            window.pct,
            window.cpu_s * 1000.0,
            window.sched_pct
        ),
        "—",
    );
    res.note(format!(
        "agent with {n} VMs: {running} reported running by the API at the end of the window; {} thread(s) (idle: {}); {fds} open file descriptors (idle: {idle_fds}); the whole machine was busy {:.0} % of one core during the window (the guests{})",
        mem.threads,
        idle.threads,
        window.machine_pct,
        if batch.stuck.is_empty() {
            String::new()
        } else {
            format!(
                ", {} of them stuck as noted above: a panicked guest keeps its TCG vCPU spinning",
                batch.stuck.len()
            )
        }
    ));
    delete_batch(api, &mut batch.runs, Duration::ZERO, "agent", res).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output

// ---------------------------------------------------------------------------------------------
// Figure 4: a big image onto a slow disk

fn slow_disk(s: &Settings, res: &mut Results) -> Result<()> {
    let size = s.slow_gib << 30;
    let (site, disk) = Site::with_slow_node("intranet", s.slow_gib * 2 + 2, s.slow_mibps << 20)?;
    let dir = site.lab.dir.clone();
    let r = (|| -> Result<()> {
        let image = site.lab.dir.join("big.raw");
        zy_lab::slowdisk::write_sparse_image(&image, size)?;
        let t_import = Instant::now();
        let path = image.to_string_lossy().into_owned();
        site.zy_ok(&[
            "image", "import", &path, "--format", "raw", "--name", "big", "--zone", "intranet",
        ]);
        let import = t_import.elapsed();
        std::fs::remove_file(&image)?;
        let written0 = disk.written();
        let disk_gib = (s.slow_gib + 1).to_string();
        site.zy_ok(&[
            "vm",
            "create",
            "--name",
            "big-1",
            "--zone",
            "intranet",
            "--memory",
            "128",
            "--disk",
            &disk_gib,
            "--image",
            "big",
            "--no-wait",
        ]);
        let t0 = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        let (mut samples, mut not_ready) = (0usize, Vec::new());
        let deadline = t0 + s.timeout.max(Duration::from_secs(60)) * 4;
        loop {
            if let Some(n) = site.nodes()?.into_iter().find(|n| n.name == "n1") {
                samples += 1;
                seen.insert(n.last_seen_ms);
                if n.state != "ready" {
                    not_ready.push(format!("{} at {:?}", n.state, t0.elapsed()));
                }
            }
            if samples % 10 == 0 {
                let v: serde_json::Value = site.zy_json(&["vm", "show", "big-1"])?;
                if v["state"] == "failed" {
                    bail!("the VM failed: {}", v["reason"]);
                }
                if v["state"] == "running" {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the fetch did not end within {:?}", deadline - t0);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = t0.elapsed();
        let written = disk.written() - written0;
        // The first value may predate the fetch; gaps are between reports seen during it.
        let times: Vec<u64> = seen.into_iter().filter(|&t| t > 0).collect();
        let gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
        let late: Vec<f64> = gaps.iter().map(|g| (g - 1000.0).max(0.0)).collect();
        let what = format!(
            "{} GiB image onto a {} MiB/s disk",
            s.slow_gib, s.slow_mibps
        );
        res.row(
            format!("{what}: fetch (VM created → running)"),
            format!(
                "{} ({:.0} MiB/s written, {} MiB in all)",
                fmt_ms(took.as_secs_f64() * 1000.0),
                written as f64 / (1 << 20) as f64 / took.as_secs_f64(),
                written >> 20
            ),
            "—",
        );
        res.row(
            format!("{what}: report gaps"),
            format!(
                "p50 {} / p99 {} / max {} (n = {})",
                fmt_ms(quantile(&gaps, 0.5)),
                fmt_ms(quantile(&gaps, 0.99)),
                fmt_ms(gaps.iter().copied().fold(0.0, f64::max)),
                gaps.len()
            ),
            "interval 1 s",
        );
        res.row(
            format!("{what}: report lateness (gap − 1 s)"),
            format!(
                "p99 {} / max {}",
                fmt_ms(quantile(&late, 0.99)),
                fmt_ms(late.iter().copied().fold(0.0, f64::max))
            ),
            "< 1 s p99",
        );
        res.row(
            format!("{what}: node state samples not Ready"),
            format!("{} of {samples}", not_ready.len()),
            "0",
        );
        if !not_ready.is_empty() {
            res.note(format!(
                "slow disk: node not Ready: {}",
                not_ready.join(", ")
            ));
        }
        res.note(format!(
            "slow disk: the image import (upload, hashing, the coordinator's copy on the normal disk) took {}",
            fmt_ms(import.as_secs_f64() * 1000.0)
        ));
        Ok(())
    })();
    drop((site, disk));
    kill_leftover_qemu(&dir, "slow-disk site", res);
    r
}

fn section_text(
    s: &Settings,
    m: &Machine,
    qemu: &str,
    accel: Option<&str>,
    res: &Results,
    started: u64,
    took: Duration,
) -> String {
    let head = SectionHead {
        title: "VM benchmark",
        bench: "vms",
        machine: m,
        more_machine: vec![(
            "Hypervisor",
            format!(
                "{qemu}, accelerator {} (as the nodes reported it; no usable KVM means TCG, so guests boot far slower than they would under KVM)",
                accel.unwrap_or("unknown")
            ),
        )],
        started_ms: started,
        took,
        command: "`cargo bench -p zy-lab --bench vms` as root, after `cargo build --profile dist --bins` (the binaries as deployed: see docs/operations.md) (both run by `scripts/bench.sh`; `ZY_BENCH_ONLY_VMS=1 scripts/bench.sh` runs this bench alone)",
        overrides: &s.overrides,
        settings: format!(
            "{} VMs one after another, {} at once across two nodes, {} on one node for the agent; {} MiB and 1 vCPU each, the test guest (`images/make-test-guest.sh`: a Debian kernel and a busybox initramfs, `console=ttyS0 quiet no_timer_check`); {} bare QEMU starts; agent window {} s after {} s of settling.",
            s.seq, s.burst, s.node_vms, s.memory_mib, s.qemu_refs.min(s.seq), s.window_secs, s.settle_secs
        ),
    };
    let method = [
        "No figure is asserted and nothing fails on slowness. p50 and p95 interpolate linearly between the closest ranks. Every VM goes through the real path: a lab site (network namespaces, the real `zy-coordinator`, `zy-agent` and `zy` binaries of the `dist` profile), nodes enrolled in the intranet zone with `zy-agent join`, the test guest imported with `zy image import --kernel images/out/vmlinuz --initrd images/out/initramfs.gz --cmdline \"console=ttyS0 quiet no_timer_check\" --name guest` (`no_timer_check`: with many TCG guests on two cores the kernel's early timer check can time out and panic a guest before any driver, pvpanic included, is loaded), and VMs created with `POST /v1/vms` (the `zy` CLI's HTTPS client, a fresh TLS connection per request as the CLI makes, from a thread of the bench inside the coordinator's namespace). `POST /v1/vms` answers 202 once the VM is placed; the coordinator then hands it to the node, whose agent checks the image in its cache, writes the VM's record, spawns QEMU, waits for QMP to answer `query-status` with `running`, joins the tap to the zone's bridge and VXLAN, and reports `running`. A VM is ready when the bench sees `ZY-READY <name>` (printed by the guest's init) in the console log the agent keeps (`<agent dir>/vms/<id>/console.log`), polled every 10 ms (25 ms for batches); the API is only asked every 500 ms, to notice failures, so as not to load the coordinator while it works.\n"
        .to_string(),
        format!(
            "Timestamps, all wall clock on the same machine: the bench's own around each request; the coordinator's log lines `VM placed` and `VM state reported … state=running` and the agent's `VM state … state=starting` / `state=running` (µs timestamps; the agent logs `starting` just before it prepares and spawns QEMU, and `running` once QMP said `running` and the network is plugged); QEMU's fork time from `/proc/<pid>/stat` (field 22, in clock ticks of 1/{} s since boot, turned into wall time through CLOCK_BOOTTIME; too coarse for the table, so only in a note); the modification time of QEMU's pid file, which QEMU writes early in its start-up (file times have the kernel's coarse clock, about one scheduler tick). The API's `state_since` has one-second resolution, and the agent's own measure of spawn → QMP `running` (`Launched.startup`) is not reported anywhere, so neither is used.\n",
            clk_tck()
        ),
        format!(
            "1. **One at a time.** A site with two nodes. Warm-up first (not counted): one VM per node, so that both nodes hold the image in their cache, then deleted. The bare QEMU reference takes the command line the agent gave a warm-up VM (from `/proc/<pid>/cmdline`), swaps in a fresh directory, uuid and tap name, and runs it from a thread of the bench in the same node namespace, once just before each VM: the time from spawn to the pid file, and to QMP answering `query-status` with `running` (connecting every 1 ms; QEMU is killed at once). That is QEMU's own start-up; **our own overhead** is each VM's request → agent's `running` minus the reference's p50. The VMs are created one after another, each deleted (`DELETE /v1/vms/{{vm}}`, timed) {} ms after it printed `ZY-READY`, so each starts on an otherwise idle site (the pause: the test guest starts busybox `acpid` just before it prints the marker, and `acpid` opens the power button's input device only after it daemonizes, so a delete at once, which tries an ACPI power-off first, can be missed by the guest and wait the agent's whole 10 s grace); both nodes being empty, placement (most free memory, then name) puts every one on n1, and each is the only VM of its zone there, so its start includes making the zone's bridge and VXLAN device (removed again on delete). Guest boot is the agent's `running` → `ZY-READY`, under TCG.",
            s.pause.as_millis()
        ),
        format!(
            "2. **At once.** On the same site, after the free-memory check (MemAvailable against the VMs' memory plus {QEMU_OVERHEAD_MIB} MiB per QEMU, keeping {HOST_RESERVE_MIB} MiB), the VMs are created back to back (each request waits for the previous 202), spread by placement over both nodes; the figures run from the first request to the last VM's `running` (agent and coordinator logs) and to the last `ZY-READY`. A batch stops waiting after {}, or once no VM got ready for {} s while some did; a VM that never printed the marker is then left out of the per-VM figures and described in the notes (state, process, console tail, QEMU's stderr, its agent log lines). Machine CPU is the busy ticks of `/proc/stat` over that time. The VMs are then deleted, all at once.",
            fmt_ms(s.timeout.as_secs_f64() * 1000.0),
            STALL.as_secs()
        ),
        "3. **The agent with N VMs.** A site with one node, so that all VMs land on it. After settling, the agent's VmRSS with no VM; a warm-up VM (image into the cache) is started and deleted; then N VMs are started at once as in 2 (its rows), the agent's CPU (utime + stime from `/proc/<pid>/stat`, and the scheduler's run time from `/proc/<pid>/task/*/schedstat`) is taken over the start, and, after settling, over the window with all N running; VmRSS (RssAnon and RssFile, the latter mostly the mapped binary) and VmHWM are read from `/proc/<pid>/status` at the end of the window."
        .to_string(),
        format!(
            "4. **A big image onto a slow disk.** A site with one node whose whole data directory (identity, image cache, VM directories) is an ext4 file system (no journal) on a loop device, mounted `sync,nobarrier` so that every write is issued by the writer and waits for the device, the agent's writes limited to {} MiB/s by cgroup v1 `blkio.throttle.write_bps_device` (`tests/src/slowdisk.rs`). A {} GiB raw image (a pattern at both ends, a hole between) is imported, then a VM is created from it, which makes the node fetch the whole image. Meanwhile the bench asks `GET /v1/nodes` every 100 ms: each new `last_seen_ms` is the coordinator's receive time of one load report (the agent reports every second), so the gaps between them are exact to the millisecond; **lateness** is a gap minus the 1 s interval. Every sample's node state is counted. The fetch ends when the VM runs (its boot, a disk of zeros, is not waited for); throughput is the bytes the throttled cgroup wrote over that time.",
            s.slow_mibps, s.slow_gib
        ),
        "\nEach lab site is dropped at the end (its processes killed, namespaces and files removed), after which the bench looks for QEMU processes whose command line names the run's directory (`pgrep -f`) and kills any it finds; a note above says so if it had to."
        .to_string(),
    ];
    head.text(res, &method)
}

fn main() {
    let s = Settings::from_env();
    let m = Machine::read();
    let qemu = qemu_version();
    let started = now_millis();
    let t0 = Instant::now();
    let boot_offset = boot_offset_us();
    println!("VM benchmark on {}; {qemu}", m.describe());
    println!("binaries from {}", bin_dir().display());
    println!("settings: {s:?}");
    let mut res = Results::new(66, 52);
    // The accelerator the nodes reported (TCG here without usable KVM).
    let mut accel = None;

    if s.runs("seq") || s.runs("burst") {
        println!("[lab] building a site with two intranet nodes");
        let r = with_site(
            2,
            "two-node site",
            &mut res,
            &mut accel,
            |rt, site, api, res| rt.block_on(two_nodes(site, api, &s, res, boot_offset)),
        );
        if let Err(e) = r {
            eprintln!("[two nodes] failed: {e:#}");
            res.row(
                "Two-node figures (one at a time, at once)",
                format!("failed: {e:#}"),
                "—",
            );
        }
    }
    if s.runs("agent") {
        println!("[agent] building a site with one node");
        let r = with_site(
            1,
            "one-node site",
            &mut res,
            &mut accel,
            |rt, site, api, res| {
                let pid = site
                    .lab
                    .pid("agent-n1")
                    .ok_or_else(|| anyhow!("no agent pid"))?;
                bench::expect_comm(pid, "zy-agent")?;
                rt.block_on(one_node(site, api, &s, res, pid, boot_offset))
            },
        );
        if let Err(e) = r {
            eprintln!("[agent] failed: {e:#}");
            res.row(
                format!("Agent with {} VMs", s.node_vms),
                format!("failed: {e:#}"),
                "—",
            );
        }
    }

    if s.runs("slowdisk") {
        println!(
            "[slowdisk] a {} GiB image onto a disk of {} MiB/s",
            s.slow_gib, s.slow_mibps
        );
        if let Err(e) = slow_disk(&s, &mut res) {
            eprintln!("[slowdisk] failed: {e:#}");
            res.row(
                format!("{} GiB image fetched onto a slow disk", s.slow_gib),
                format!("failed: {e:#}"),
                "—",
            );
        }
    }

    let text = section_text(&s, &m, &qemu, accel.as_deref(), &res, started, t0.elapsed());
    DOCS.publish(&text, s.write_docs);
}
