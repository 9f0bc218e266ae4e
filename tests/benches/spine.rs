//! The spine benchmark: what the agent and the coordinator cost, and how fast a dead node is
//! noticed. Run as root (the lab builds network namespaces), after building the binaries:
//!
//! ```text
//! scripts/bench.sh        # cargo build --profile dist --bins && ZY_BIN_DIR=target/dist cargo bench -p zy-lab --bench spine
//! ```
//!
//! Figures (none is asserted; nothing fails on slowness):
//!
//! 1. Agent RSS and CPU while idle at one report a second: a lab site with one node, the real
//!    `zy-agent` in its namespace, measured from `/proc/<pid>` over a window.
//! 2. Coordinator CPU and memory with 1,000 and 10,000 simulated agents: a real
//!    `zy-coordinator` on loopback, and in this process N agents that enroll with the real join
//!    protocol (token from the HTTP API, JoinRequest over QUIC) and then hold mutual-TLS QUIC
//!    sessions: Hello, Welcome, a LoadReport every second, Reply to every Command.
//! 3. Time from a node's death (SIGKILL of its agent) to Suspect and to Down, seen through the
//!    API, over several rounds.
//!
//! The figures are printed and written into `docs/PERFORMANCE.md` between the markers
//! `<!-- bench:spine:begin -->` and `<!-- bench:spine:end -->`.
//!
//! Environment (all optional):
//!
//! | variable                  | default      | meaning                                          |
//! |---------------------------|--------------|--------------------------------------------------|
//! | `ZY_BENCH_SECS`           | 60           | agent idle window, seconds                       |
//! | `ZY_BENCH_COORD_SECS`     | min(30, above) | coordinator window per N, seconds              |
//! | `ZY_BENCH_WARMUP_SECS`    | 5            | warm-up before each window                       |
//! | `ZY_BENCH_AGENTS`         | 1000,10000   | simulated fleet sizes                            |
//! | `ZY_BENCH_DEATH_ROUNDS`   | 5            | kill rounds for figure 3                         |
//! | `ZY_BENCH_JOIN_PARALLEL`  | 32           | enrollments in flight                            |
//! | `ZY_BENCH_ONLY`           | all          | comma list of `agent`, `death`, `coord`          |
//! | `ZY_BENCH_WRITE`          | 1 unless ZY_BENCH_ONLY | 0 to leave docs/PERFORMANCE.md alone  |

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, watch, Semaphore};
use zy_api::{CreatedToken, NodeView, PingResult};
use zy_cli::client::Client;
use zy_common::ids::{NodeId, Zone};
use zy_common::proto::{
    Accel, Command as Cmd, CommandKind, Hello, Inventory, JoinRequest, LoadReport, Message, Reply,
    ReplyKind,
};
use zy_common::time::now_millis;
use zy_common::tls::{self, CaFingerprint, SERVER_NAME};
use zy_common::wire::{self, MAX_BODY, PROTOCOL_VERSIONS};
use zy_lab::bench::{
    self, admin_client, env_u64, method, mib, min_median_max, CpuSample, CpuUse, DocSection,
    Machine, Mem, Results, SectionHead, MIB,
};
use zy_lab::site::Site;
use zy_lab::{bin, bin_dir};

/// Where the figures go in docs/PERFORMANCE.md.
const DOCS: DocSection<'static> = DocSection {
    name: "spine",
    after: None,
    preamble: "Measured figures of Zhengyun. The section between the markers below is written by the spine benchmark (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_ONLY",
};

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Debug, Clone)]
struct Settings {
    agent_secs: u64,
    coord_secs: u64,
    warmup_secs: u64,
    fleets: Vec<usize>,
    death_rounds: usize,
    join_parallel: usize,
    only: Option<Vec<String>>,
    write_docs: bool,
    /// The ZY_BENCH_* variables that were set, for the record.
    overrides: Vec<String>,
}

impl Settings {
    fn from_env() -> Self {
        let agent_secs = env_u64("ZY_BENCH_SECS").unwrap_or(60).max(1);
        let coord_secs = env_u64("ZY_BENCH_COORD_SECS")
            .unwrap_or(agent_secs.min(30))
            .max(1);
        let fleets = std::env::var("ZY_BENCH_AGENTS")
            .ok()
            .map(|v| {
                v.split(',')
                    .filter_map(|x| x.trim().parse().ok())
                    .filter(|n| *n > 0)
                    .collect()
            })
            .unwrap_or_else(|| vec![1000, 10_000]);
        let only = bench::env_list(DOCS.only_var);
        Self {
            agent_secs,
            coord_secs,
            warmup_secs: env_u64("ZY_BENCH_WARMUP_SECS").unwrap_or(5),
            fleets,
            death_rounds: env_u64("ZY_BENCH_DEATH_ROUNDS").unwrap_or(5).max(1) as usize,
            join_parallel: env_u64("ZY_BENCH_JOIN_PARALLEL").unwrap_or(32).max(1) as usize,
            write_docs: bench::docs_wanted(only.is_none()),
            only,
            overrides: bench::env_overrides(|k| k.starts_with("ZY_BENCH_")),
        }
    }

    fn runs(&self, section: &str) -> bool {
        bench::selected(self.only.as_deref(), section)
    }
}

// ---------------------------------------------------------------------------------------------
// UDP drops, from /proc (the rest is in zy_lab::bench)

/// The machine-wide count of UDP datagrams dropped because a socket's receive buffer was
/// full (`RcvbufErrors` in /proc/net/snmp).
fn udp_rcvbuf_errors() -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        return 0;
    };
    head.split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Datagrams dropped by the UDP socket bound to 127.0.0.1:`port` (the `drops` column of
/// /proc/net/udp), if there is one.
fn udp_socket_drops(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let local = format!("0100007F:{port:04X}");
    text.lines()
        .skip(1)
        .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Figures 1 and 3: the lab

fn lab_figures(s: &Settings, res: &mut Results) -> Result<()> {
    println!("[lab] building a site with one node");
    let site = Site::new(1)?;
    site.join(1, "intranet")?;
    let pid = site.start_agent(1, &[])?;
    site.wait_reporting("n1", 0, Duration::from_secs(30))?;
    bench::expect_comm(pid, "zy-agent")?;
    if s.runs("agent") {
        agent_idle(s, &site, pid, res)?;
    }
    if s.runs("death") {
        death_rounds(s, &site, res)?;
    }
    Ok(())
}

fn agent_idle(s: &Settings, site: &Site, pid: i32, res: &mut Results) -> Result<()> {
    let p = pid.to_string();
    println!(
        "[agent] warm-up {} s, then a {} s window on pid {pid}",
        s.warmup_secs, s.agent_secs
    );
    std::thread::sleep(Duration::from_secs(s.warmup_secs));
    let seq_before = node_seq(site, "n1")?;
    let a = CpuSample::take(&p)?;
    std::thread::sleep(Duration::from_secs(s.agent_secs));
    let b = CpuSample::take(&p)?;
    let mem = Mem::read(&p)?;
    let seq_after = node_seq(site, "n1")?;
    let CpuUse {
        cpu_s,
        pct,
        sched_pct,
        machine_pct,
        ..
    } = CpuUse::between(&a, &b);
    res.row(
        "Agent RSS, idle, 1 report/s (VmRSS)",
        format!(
            "{} (anon {}, file {})",
            mib(mem.rss),
            mib(mem.anon),
            mib(mem.file)
        ),
        "≤ 15 MiB",
    );
    res.row("Agent peak RSS (VmHWM)", mib(mem.hwm), "—");
    res.row(
        format!("Agent CPU, idle, 1 report/s ({} s window)", s.agent_secs),
        format!(
            "{pct:.3} % of one core ({:.0} ms CPU; scheduler run time {sched_pct:.3} %)",
            cpu_s * 1000.0
        ),
        "≤ 0.2 %",
    );
    res.note(format!(
        "agent: {} thread(s); {} load reports reached the coordinator during the {} s window; the whole machine (tick-sampled, from /proc/stat) was busy about {:.1} % of one core meanwhile",
        mem.threads,
        seq_after.saturating_sub(seq_before),
        s.agent_secs,
        machine_pct
    ));
    Ok(())
}

fn node_seq(site: &Site, name: &str) -> Result<u64> {
    site.nodes()?
        .into_iter()
        .find(|n| n.name == name)
        .and_then(|n| n.load.map(|l| l.seq))
        .ok_or_else(|| anyhow!("{name} has no load report"))
}

fn death_rounds(s: &Settings, site: &Site, res: &mut Results) -> Result<()> {
    let mut suspect = Vec::new();
    let mut down = Vec::new();
    let mut rec_suspect = Vec::new();
    let mut rec_down = Vec::new();
    for round in 1..=s.death_rounds {
        site.wait_reporting("n1", 0, Duration::from_secs(30))?;
        // Kill at a random phase of the report cycle.
        std::thread::sleep(Duration::from_millis(1000 + rand::random::<u64>() % 1000));
        let kill_ms = now_millis();
        let t0 = Instant::now();
        site.lab.signal("agent-n1", Signal::SIGKILL);
        let (mut ts, mut td) = (None, None);
        let deadline = t0 + Duration::from_secs(30);
        let mut next = t0;
        while td.is_none() && Instant::now() < deadline {
            next += Duration::from_millis(50);
            if let Some(n) = site.nodes()?.into_iter().find(|n| n.name == "n1") {
                let at = t0.elapsed();
                match n.state.as_str() {
                    "suspect" if ts.is_none() => ts = Some(at),
                    "down" => {
                        ts.get_or_insert(at);
                        td = Some(at);
                    }
                    _ => {}
                }
            }
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let (Some(ts), Some(td)) = (ts, td) else {
            bail!("round {round}: n1 did not go suspect and down within 30 s");
        };
        site.start_agent(1, &[])?;
        site.wait_state("n1", "ready", Duration::from_secs(30))?;
        let detail = site.node("n1")?;
        let recorded = |to: &str| {
            detail
                .transitions
                .iter()
                .find(|t| t.to == to && t.at_ms >= kill_ms)
                .map(|t| (t.at_ms - kill_ms) as f64 / 1000.0)
        };
        let (rs, rd) = (recorded("suspect"), recorded("down"));
        println!(
            "[death] round {round}: suspect after {:.2} s, down after {:.2} s (recorded {:.2} s / {:.2} s)",
            ts.as_secs_f64(),
            td.as_secs_f64(),
            rs.unwrap_or(f64::NAN),
            rd.unwrap_or(f64::NAN)
        );
        suspect.push(ts.as_secs_f64());
        down.push(td.as_secs_f64());
        rec_suspect.extend(rs);
        rec_down.extend(rd);
    }
    let fmt = |v: &[f64]| {
        let (lo, med, hi) = min_median_max(v);
        format!("min {lo:.2} s / median {med:.2} s / max {hi:.2} s")
    };
    let n = s.death_rounds;
    res.row(
        format!("Death to Suspect, seen via the API ({n} rounds)"),
        fmt(&suspect),
        "≤ 3 s",
    );
    res.row(
        format!("Death to Down, seen via the API ({n} rounds)"),
        fmt(&down),
        "≤ 10 s",
    );
    res.row(
        "Death to Suspect, as recorded in the node's history",
        fmt(&rec_suspect),
        "≤ 3 s",
    );
    res.row(
        "Death to Down, as recorded in the node's history",
        fmt(&rec_down),
        "≤ 10 s",
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figure 2: a real coordinator and N simulated agents

/// A `zy-coordinator` child on loopback with its own state directory; killed and removed on
/// drop, whatever happened.
#[derive(Debug)]
struct CoordProc {
    child: Option<Child>,
    dir: PathBuf,
    state: PathBuf,
    log: PathBuf,
    daemon: SocketAddr,
    api: SocketAddr,
}

fn free_port_udp() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_port_tcp() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Removes bench directories whose process is gone (a bench killed before its drops ran).
fn reap_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("zy-bench-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl CoordProc {
    /// Initialises a fresh state directory and starts the coordinator (from the calling
    /// thread, which must outlive it: the child dies with that thread).
    fn start(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "zy-bench-{}-{tag}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        let state = dir.join("coordinator");
        let log = dir.join("coordinator.log");
        let daemon: SocketAddr = format!("127.0.0.1:{}", free_port_udp()?).parse()?;
        let api: SocketAddr = format!("127.0.0.1:{}", free_port_tcp()?).parse()?;
        let mut me = Self {
            child: None,
            dir,
            state,
            log,
            daemon,
            api,
        };
        let out = Command::new(bin("zy-coordinator"))
            .args(["init", "--state-dir"])
            .arg(&me.state)
            .args([
                "--site",
                "bench",
                "--daemon-listen",
                &daemon.to_string(),
                "--api-listen",
                &api.to_string(),
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "zy-coordinator init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let logf = std::fs::File::create(&me.log)?;
        let mut cmd = Command::new(bin("zy-coordinator"));
        cmd.args(["run", "--state-dir"])
            .arg(&me.state)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // async-signal-safe system call (prctl); it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        me.child = Some(cmd.spawn().context("cannot start zy-coordinator")?);
        Ok(me)
    }

    fn pid(&self) -> String {
        self.child
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// An API client with the admin token `init` wrote.
    fn client(&self) -> Result<(Client, CertificateDer<'static>)> {
        admin_client(&self.state, &self.api.to_string())
    }
}

impl Drop for CoordProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What enrollment produced for one simulated node.
#[derive(Debug)]
struct Enrolled {
    index: usize,
    name: String,
    node_id: NodeId,
    zone: Zone,
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
}

#[derive(Debug, Default)]
struct EnrollTally {
    token_us: AtomicU64,
    join_us: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug)]
struct EnrollFigures {
    total: Duration,
    first_k: Option<(usize, Duration)>,
    last_k: Option<(usize, Duration)>,
    mean_token_ms: f64,
    mean_join_ms: f64,
    retries: u64,
}

fn zone_of(i: usize) -> Zone {
    if i % 2 == 0 {
        Zone::Intranet
    } else {
        Zone::Extranet
    }
}

fn transport_client(tls: rustls::ClientConfig, idle: Duration) -> Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| anyhow!("QUIC refused the TLS config: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(zy_common::quic::transport(idle));
    Ok(cfg)
}

async fn read_message(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
    version: u16,
) -> Result<Message> {
    let mut buf = Vec::new();
    let m: Message = tokio::time::timeout(
        Duration::from_secs(30),
        wire::read_frame(io, version, MAX_BODY, &mut buf),
    )
    .await
    .map_err(|_| anyhow!("no answer within 30 s"))??;
    m.validate()?;
    Ok(m)
}

/// One enrollment, as `zy token create` and `zy-agent join` do it.
async fn enroll_one(
    i: usize,
    api: &Client,
    ep: &quinn::Endpoint,
    join_cfg: &quinn::ClientConfig,
    daemon: SocketAddr,
    tally: &EnrollTally,
) -> Result<Enrolled> {
    let zone = zone_of(i);
    let t0 = Instant::now();
    let created: CreatedToken = api
        .call(
            method("POST"),
            "/v1/tokens",
            Some(serde_json::json!({"zone": zone, "ttl_secs": 3600})),
        )
        .await?;
    let t1 = Instant::now();
    let name = format!("sim-{i:05}");
    let (key, csr) = tls::node_request(&name)?;
    let mut attempt = 0;
    let accepted = loop {
        attempt += 1;
        let r = async {
            let conn = ep
                .connect_with(join_cfg.clone(), daemon, SERVER_NAME)?
                .await?;
            let result = async {
                let (send, recv) = conn.open_bi().await?;
                let mut io = tokio::io::join(recv, send);
                let v = wire::open_preamble(&mut io, PROTOCOL_VERSIONS).await?;
                let req = Message::JoinRequest(JoinRequest {
                    token: created.token.clone(),
                    csr_der: csr.clone(),
                    name: name.clone(),
                    agent_version: zy_common::VERSION.into(),
                });
                wire::write_frame(&mut io, v, &req).await?;
                read_message(&mut io, v).await
            }
            .await;
            conn.close(0u32.into(), b"done");
            result
        }
        .await;
        match r {
            Ok(Message::JoinAccepted(a)) => break a,
            Ok(Message::Refused(r)) => bail!("{name}: join refused ({:?}): {}", r.code, r.message),
            Ok(other) => bail!("{name}: unexpected {} in answer to a join", other.kind()),
            Err(e) if attempt < 3 => {
                tally.retries.fetch_add(1, Ordering::Relaxed);
                eprintln!("[enroll] {name}: attempt {attempt} failed ({e:#}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context(format!("{name}: join failed 3 times"))),
        }
    };
    let t2 = Instant::now();
    tally
        .token_us
        .fetch_add((t1 - t0).as_micros() as u64, Ordering::Relaxed);
    tally
        .join_us
        .fetch_add((t2 - t1).as_micros() as u64, Ordering::Relaxed);
    if accepted.zone != zone {
        bail!("{name}: enrolled in {} instead of {zone}", accepted.zone);
    }
    Ok(Enrolled {
        index: i,
        name,
        node_id: accepted.node_id,
        zone,
        key_der: key.serialize_der(),
        cert_der: accepted.cert_der,
    })
}

async fn enroll_all(
    n: usize,
    parallel: usize,
    api: &Client,
    ca: &CertificateDer<'static>,
    daemon: SocketAddr,
) -> Result<(Vec<Enrolled>, EnrollFigures)> {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let join_cfg = transport_client(
        tls::join_client_config(CaFingerprint::of(ca))?,
        Duration::from_secs(10),
    )?;
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(EnrollTally::default());
    let done: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..parallel.min(n) {
        let (ep, join_cfg, next, tally, done, api) = (
            ep.clone(),
            join_cfg.clone(),
            next.clone(),
            tally.clone(),
            done.clone(),
            api.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(mine);
                }
                let e = enroll_one(i, &api, &ep, &join_cfg, daemon, &tally).await;
                match e {
                    Ok(e) => {
                        let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                        d.push(Instant::now());
                        let count = d.len();
                        drop(d);
                        if count % 1000 == 0 || count == n {
                            println!(
                                "[enroll] {count}/{n} after {:.1} s",
                                t0.elapsed().as_secs_f64()
                            );
                        }
                        mine.push(e);
                    }
                    Err(e) => {
                        // Stop the others too.
                        next.store(n, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    let mut first_err = None;
    for w in workers {
        match w.await {
            Ok(Ok(v)) => all.extend(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow!("enrollment worker panicked: {e}"));
            }
        }
    }
    let total = t0.elapsed();
    ep.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
    if let Some(e) = first_err {
        return Err(e);
    }
    all.sort_by_key(|e| e.index);
    let times = done.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let k = 1000.min(n / 2);
    let (first_k, last_k) = if k > 0 && n >= 2 * k {
        (
            Some((k, times[k - 1] - t0)),
            Some((k, times[n - 1] - times[n - 1 - k])),
        )
    } else {
        (None, None)
    };
    let figures = EnrollFigures {
        total,
        first_k,
        last_k,
        mean_token_ms: tally.token_us.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0,
        mean_join_ms: tally.join_us.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0,
        retries: tally.retries.load(Ordering::Relaxed),
    };
    Ok((all, figures))
}

#[derive(Debug, Default)]
struct SimStats {
    welcomed: AtomicU64,
    connect_failed: AtomicU64,
    connect_retries: AtomicU64,
    reports: AtomicU64,
    replies: AtomicU64,
    lost: AtomicU64,
    /// Network peer updates the coordinator sent (SyncPeers), over all agents.
    peer_updates: AtomicU64,
}

/// What every simulated agent shares.
#[derive(Debug)]
struct SimShared {
    daemon: SocketAddr,
    base: tokio::time::Instant,
    n: usize,
    gate: Arc<Semaphore>,
    stats: SimStats,
}

fn sim_inventory(e: &Enrolled) -> Inventory {
    Inventory {
        hostname: e.name.clone(),
        cpu_model: "AMD EPYC 7763 64-Core Processor".into(),
        cpus: 128,
        memory_bytes: 512 << 30,
        disk_total_bytes: 8 << 40,
        disk_free_bytes: 6 << 40,
        kvm_usable: true,
        accel: Accel::Kvm,
        zone: e.zone,
        agent_version: zy_common::VERSION.into(),
        kernel: "6.1.0-28-amd64".into(),
    }
}

fn sim_load(i: usize, seq: u64) -> LoadReport {
    let wobble = ((i as u64).wrapping_mul(31).wrapping_add(seq * 17) % 400) as f32 / 10.0;
    LoadReport {
        seq,
        cpu_percent: 20.0 + wobble,
        mem_used_bytes: (200 << 30) + seq * 4096,
        mem_available_bytes: 300 << 30,
        load1: 30.0 + wobble / 10.0,
        load5: 29.0,
        load15: 28.0,
        net_rx_bytes: seq * 12_500_000,
        net_tx_bytes: seq * 9_000_000,
        disk_free_bytes: 6 << 40,
    }
}

/// One simulated agent: connects with its node certificate, says Hello, reports every
/// report interval at its own phase of the second, answers commands, until `stop`.
async fn sim_agent(
    e: Enrolled,
    ca: CertificateDer<'static>,
    ep: quinn::Endpoint,
    sh: Arc<SimShared>,
    mut stop: watch::Receiver<bool>,
) {
    let r = async {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(e.key_der.clone()));
        let chain = vec![CertificateDer::from(e.cert_der.clone())];
        let cfg = transport_client(
            tls::daemon_client_config(&ca, chain, key)?,
            zy_common::quic::Timings::default().idle_timeout,
        )?;
        let permit = sh.gate.clone().acquire_owned().await?;
        let mut attempt = 0;
        let (conn, version, io, welcome) = loop {
            attempt += 1;
            let r = async {
                let conn = ep
                    .connect_with(cfg.clone(), sh.daemon, SERVER_NAME)?
                    .await?;
                let (send, recv) = conn.open_bi().await?;
                let mut io = tokio::io::join(recv, send);
                let v = wire::open_preamble(&mut io, PROTOCOL_VERSIONS).await?;
                let hello = Message::Hello(Hello {
                    inventory: sim_inventory(&e),
                });
                wire::write_frame(&mut io, v, &hello).await?;
                let m = read_message(&mut io, v).await?;
                Ok::<_, anyhow::Error>((conn, v, io, m))
            }
            .await;
            match r {
                Ok(x) => break x,
                Err(err) if attempt < 3 => {
                    sh.stats.connect_retries.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "[sim] {}: connect attempt {attempt} failed: {err:#}",
                        e.name
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => return Err(err),
            }
        };
        let interval = match welcome {
            Message::Welcome(w) if w.node_id == e.node_id => {
                Duration::from_millis(w.report_interval_ms.into())
            }
            other => bail!("{}: expected Welcome, got {other:?}", e.name),
        };
        drop(permit);
        sh.stats.welcomed.fetch_add(1, Ordering::Relaxed);
        Ok::<_, anyhow::Error>((conn, version, io, interval))
    }
    .await;
    let (conn, version, io, interval) = match r {
        Ok(x) => x,
        Err(err) => {
            eprintln!("[sim] {}: gave up connecting: {err:#}", e.name);
            sh.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let (mut recv, mut send) = io.into_inner();
    // The reader owns the receive half so that no frame is ever half-read by a select!.
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Result<Cmd, String>>(8);
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            let m = wire::read_frame::<Message, _>(&mut recv, version, MAX_BODY, &mut buf).await;
            let item = match m {
                Ok(Message::Command(c)) => Ok(c),
                Ok(Message::Refused(r)) => Err(format!("refused: {}", r.message)),
                Ok(other) => Err(format!("unexpected {}", other.kind())),
                Err(err) => Err(err.to_string()),
            };
            let stop = item.is_err();
            if cmd_tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    // Stagger: agent i reports at i/N of each interval after the common base.
    let phase = interval.mul_f64(e.index as f64 / sh.n as f64);
    let now = tokio::time::Instant::now();
    let mut first = sh.base + phase;
    if first < now {
        let behind = now.duration_since(first).as_nanos();
        let steps = behind / interval.as_nanos().max(1) + 1;
        first += interval * steps as u32;
    }
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let lost = loop {
        tokio::select! {
            _ = ticker.tick() => {
                seq += 1;
                if let Err(err) = wire::write_frame(&mut send, version, &Message::Load(sim_load(e.index, seq))).await {
                    break Some(err.to_string());
                }
                sh.stats.reports.fetch_add(1, Ordering::Relaxed);
            }
            m = cmd_rx.recv() => match m {
                Some(Ok(c)) => {
                    let result = match c.kind {
                        CommandKind::Ping => Ok(ReplyKind::Pong),
                        CommandKind::SetReportInterval { ms } => {
                            ticker = tokio::time::interval(Duration::from_millis(ms.into()));
                            Ok(ReplyKind::Done)
                        }
                        // As a real agent with no VM of that network: nothing to update.
                        CommandKind::SyncPeers { .. } => {
                            sh.stats.peer_updates.fetch_add(1, Ordering::Relaxed);
                            Ok(ReplyKind::Done)
                        }
                        // Simulated agents run no VMs.
                        _ => Err(zy_common::proto::ReplyError::new(
                            zy_common::proto::ReplyErrorKind::Refused,
                            "this simulated node runs no VMs",
                        )),
                    };
                    let reply = Message::Reply(Reply { id: c.id, result });
                    if let Err(err) = wire::write_frame(&mut send, version, &reply).await {
                        break Some(err.to_string());
                    }
                    sh.stats.replies.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(err)) => break Some(err),
                None => break Some("reader stopped".into()),
            },
            _ = stop.changed() => break None,
        }
    };
    if let Some(why) = lost {
        sh.stats.lost.fetch_add(1, Ordering::Relaxed);
        eprintln!("[sim] {}: session lost: {why}", e.name);
    }
    reader.abort();
    conn.close(0u32.into(), b"bench over");
}

/// Nodes Ready and connected, per `GET /v1/nodes`, with how long the listing took and its
/// size as JSON.
async fn count_ready(api: &Client) -> Result<(usize, Duration, usize)> {
    let t0 = Instant::now();
    let nodes: Vec<NodeView> = api.call(method("GET"), "/v1/nodes", None).await?;
    let took = t0.elapsed();
    let ready = nodes
        .iter()
        .filter(|n| n.state == "ready" && n.connected)
        .count();
    let bytes = serde_json::to_vec(&nodes).map(|v| v.len()).unwrap_or(0);
    Ok((ready, took, bytes))
}

/// Everything measured for one fleet size.
#[derive(Debug)]
struct FleetFigures {
    enroll: EnrollFigures,
    mem_enrolled: Mem,
    connect: Duration,
    ready_before: usize,
    window: Duration,
    coord_cpu_s: f64,
    coord_pct: f64,
    bench_cpu_s: f64,
    bench_pct: f64,
    mem_connected: Mem,
    reports_per_s: f64,
    ready_after: usize,
    lost: u64,
    peer_updates: u64,
    connect_failed: u64,
    ping_ms: Vec<f64>,
    pings_failed: usize,
    list_took: Duration,
    list_bytes: usize,
    connect_retries: u64,
    udp_drops_connect: u64,
    udp_drops_window: u64,
    sock_drops_connect: u64,
    sock_drops_window: u64,
    machine_pct: f64,
}

fn coordinator_figures(
    s: &Settings,
    n: usize,
    rt: &tokio::runtime::Runtime,
    res: &mut Results,
) -> Result<()> {
    println!("[coord] N = {n}: fresh coordinator on loopback");
    let coord = CoordProc::start(&format!("n{n}"))?;
    let out = rt.block_on(fleet_run(s, n, &coord));
    let f = match out {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "[coord] coordinator log (last 20 lines):\n{}",
                coord.log_tail()
            );
            return Err(e);
        }
    };
    drop(coord);
    let label = if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    };
    let e = &f.enroll;
    let mut v = format!(
        "{:.0} nodes/s ({n} in {:.1} s",
        n as f64 / e.total.as_secs_f64(),
        e.total.as_secs_f64()
    );
    if let (Some((k, a)), Some((_, b))) = (e.first_k, e.last_k) {
        let _ = write!(
            v,
            "; first {k}: {:.0}/s, last {k}: {:.0}/s",
            k as f64 / a.as_secs_f64(),
            k as f64 / b.as_secs_f64()
        );
    }
    v.push(')');
    res.row(
        format!(
            "Enrollment rate, {label} agents, {} in parallel",
            s.join_parallel
        ),
        v,
        "—",
    );
    res.row(
        format!("Connect {label} agents until all are Ready"),
        format!(
            "{:.1} s ({} of {n} ready)",
            f.connect.as_secs_f64(),
            f.ready_before
        ),
        "—",
    );
    res.row(
        format!("Coordinator CPU, {label} agents reporting 1/s"),
        format!(
            "{:.1} % of one core ({:.1} s CPU in {:.0} s)",
            f.coord_pct,
            f.coord_cpu_s,
            f.window.as_secs_f64()
        ),
        if n >= 10_000 {
            "≤ 100 % (one core)"
        } else {
            "—"
        },
    );
    res.row(
        format!("Bench process CPU (the {label} simulated agents), same window"),
        format!(
            "{:.1} % of one core ({:.1} s CPU)",
            f.bench_pct, f.bench_cpu_s
        ),
        "—",
    );
    let added = f.mem_connected.rss.saturating_sub(f.mem_enrolled.rss);
    res.row(
        format!("Coordinator RSS, {label} agents connected"),
        format!(
            "{} (VmHWM {}; {} before they connected, +{:.1} KiB per agent)",
            mib(f.mem_connected.rss),
            mib(f.mem_connected.hwm),
            mib(f.mem_enrolled.rss),
            added as f64 / n as f64
        ),
        "—",
    );
    res.row(
        format!("Load reports sent, {label} agents"),
        format!(
            "{:.0}/s (expected {n}/s); {} of {n} still Ready after the window",
            f.reports_per_s, f.ready_after
        ),
        "—",
    );
    if !f.ping_ms.is_empty() {
        let (lo, med, hi) = min_median_max(&f.ping_ms);
        res.row(
            format!("Command round trip (API ping), {label} agents connected"),
            format!(
                "min {lo:.1} / median {med:.1} / max {hi:.1} ms over {} pings",
                f.ping_ms.len()
            ),
            "—",
        );
    }
    res.row(
        format!("Network peer updates sent while {label} agents connected and reported"),
        format!(
            "{} in all, {:.2} per agent",
            f.peer_updates,
            f.peer_updates as f64 / n.max(1) as f64
        ),
        "none to nodes without VMs; O(nodes) for those with VMs, not O(nodes²)",
    );
    res.row(
        format!("API `GET /v1/nodes` (`zy node ls`), {label} nodes"),
        format!(
            "{:.0} ms for {:.1} MiB of JSON",
            f.list_took.as_secs_f64() * 1000.0,
            f.list_bytes as f64 / MIB
        ),
        "—",
    );
    res.note(format!(
        "N = {n}: mean token creation {:.1} ms and mean join {:.1} ms per node (with {} in flight), {} join retries; {} connection retries, {} agents failed to connect, {} sessions lost, {} pings failed; UDP datagrams dropped on full receive buffers: {} while connecting ({} of them by the coordinator's socket), {} in the window ({} by the coordinator's); coordinator threads at the end: {}; the whole machine (tick-sampled, from /proc/stat) was busy about {:.0} % of one core in the window, so about {:.0} % went to other processes",
        e.mean_token_ms,
        e.mean_join_ms,
        s.join_parallel,
        e.retries,
        f.connect_retries,
        f.connect_failed,
        f.lost,
        f.pings_failed,
        f.udp_drops_connect,
        f.sock_drops_connect,
        f.udp_drops_window,
        f.sock_drops_window,
        f.mem_connected.threads,
        f.machine_pct,
        (f.machine_pct - f.coord_pct - f.bench_pct).max(0.0)
    ));
    Ok(())
}

async fn fleet_run(s: &Settings, n: usize, coord: &CoordProc) -> Result<FleetFigures> {
    let (api, ca) = coord.client()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h: Result<zy_api::Health, _> = api.call(method("GET"), "/v1/health", None).await;
        if h.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the coordinator's API did not answer within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = coord.pid();

    println!(
        "[coord] enrolling {n} agents, {} in parallel",
        s.join_parallel
    );
    let (enrolled, enroll) = enroll_all(n, s.join_parallel, &api, &ca, coord.daemon).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mem_enrolled = Mem::read(&pid)?;

    println!("[coord] connecting {n} simulated agents");
    let n_eps = n.div_ceil(1000);
    let mut eps = Vec::with_capacity(n_eps);
    for _ in 0..n_eps {
        eps.push(quinn::Endpoint::client("127.0.0.1:0".parse()?)?);
    }
    let sh = Arc::new(SimShared {
        daemon: coord.daemon,
        base: tokio::time::Instant::now(),
        n,
        gate: Arc::new(Semaphore::new(64)),
        stats: SimStats::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let names: Vec<String> = enrolled.iter().map(|e| e.name.clone()).collect();
    let udp0 = udp_rcvbuf_errors();
    let port = coord.daemon.port();
    let sock0 = udp_socket_drops(port).unwrap_or(0);
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for e in enrolled {
        let ep = eps[e.index / 1000].clone();
        tasks.push(tokio::spawn(sim_agent(
            e,
            ca.clone(),
            ep,
            sh.clone(),
            stop_rx.clone(),
        )));
    }
    let ready_deadline = t0 + Duration::from_secs(60 + n as u64 / 50);
    let mut last_print = Instant::now();
    let ready_before = loop {
        tokio::time::sleep(Duration::from_millis(if n > 2000 { 2000 } else { 500 })).await;
        let welcomed = sh.stats.welcomed.load(Ordering::Relaxed) as usize;
        let failed = sh.stats.connect_failed.load(Ordering::Relaxed) as usize;
        if welcomed + failed < n && Instant::now() < ready_deadline {
            if last_print.elapsed() > Duration::from_secs(5) {
                println!(
                    "[coord] {welcomed}/{n} welcomed after {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                last_print = Instant::now();
            }
            continue;
        }
        let (ready, _, _) = count_ready(&api).await?;
        if ready + failed >= n || Instant::now() >= ready_deadline {
            break ready;
        }
    };
    let connect = t0.elapsed();
    let udp_drops_connect = udp_rcvbuf_errors().saturating_sub(udp0);
    let sock_drops_connect = udp_socket_drops(port).unwrap_or(0).saturating_sub(sock0);
    println!(
        "[coord] {ready_before}/{n} ready after {:.1} s; warm-up {} s, window {} s",
        connect.as_secs_f64(),
        s.warmup_secs,
        s.coord_secs
    );
    tokio::time::sleep(Duration::from_secs(s.warmup_secs)).await;

    let r0 = sh.stats.reports.load(Ordering::Relaxed);
    let udp1 = udp_rcvbuf_errors();
    let sock1 = udp_socket_drops(port).unwrap_or(0);
    let c0 = CpuSample::take(&pid)?;
    let b0 = CpuSample::take("self")?;
    tokio::time::sleep(Duration::from_secs(s.coord_secs)).await;
    let c1 = CpuSample::take(&pid)?;
    let b1 = CpuSample::take("self")?;
    let r1 = sh.stats.reports.load(Ordering::Relaxed);
    let udp_drops_window = udp_rcvbuf_errors().saturating_sub(udp1);
    let sock_drops_window = udp_socket_drops(port).unwrap_or(0).saturating_sub(sock1);
    let mem_connected = Mem::read(&pid)?;
    let coord_cpu = CpuUse::between(&c0, &c1);
    let bench_cpu = CpuUse::between(&b0, &b1);
    let window = c1.at.duration_since(c0.at);
    let reports_per_s = (r1 - r0) as f64 / window.as_secs_f64();
    let (ready_after, list_took, list_bytes) = count_ready(&api).await?;

    // The command path, after the window so as not to disturb it.
    let mut ping_ms = Vec::new();
    let mut pings_failed = 0;
    for k in 0..20usize {
        let name = &names[(k * 7919) % names.len()];
        let r: Result<PingResult, _> = api
            .call(method("POST"), &format!("/v1/nodes/{name}/ping"), None)
            .await;
        match r {
            Ok(p) => ping_ms.push(p.rtt_us as f64 / 1000.0),
            Err(e) => {
                pings_failed += 1;
                eprintln!("[coord] ping {name} failed: {e}");
            }
        }
    }

    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    for ep in &eps {
        ep.close(0u32.into(), b"bench over");
    }
    for ep in &eps {
        let _ = tokio::time::timeout(Duration::from_secs(3), ep.wait_idle()).await;
    }
    Ok(FleetFigures {
        enroll,
        mem_enrolled,
        connect,
        ready_before,
        window,
        coord_cpu_s: coord_cpu.cpu_s,
        coord_pct: coord_cpu.pct,
        bench_cpu_s: bench_cpu.cpu_s,
        bench_pct: bench_cpu.pct,
        mem_connected,
        reports_per_s,
        ready_after,
        lost: sh.stats.lost.load(Ordering::Relaxed),
        peer_updates: sh.stats.peer_updates.load(Ordering::Relaxed),
        connect_failed: sh.stats.connect_failed.load(Ordering::Relaxed),
        ping_ms,
        pings_failed,
        list_took,
        list_bytes,
        connect_retries: sh.stats.connect_retries.load(Ordering::Relaxed),
        udp_drops_connect,
        udp_drops_window,
        sock_drops_connect,
        sock_drops_window,
        machine_pct: coord_cpu.machine_pct,
    })
}

// ---------------------------------------------------------------------------------------------
// Output

fn section_text(s: &Settings, m: &Machine, res: &Results, started: u64, took: Duration) -> String {
    let head = SectionHead {
        title: "Spine benchmark",
        bench: "spine",
        machine: m,
        more_machine: Vec::new(),
        started_ms: started,
        took,
        command: "`scripts/bench.sh`, which runs `cargo build --profile dist --bins` (the binaries as deployed: see docs/operations.md) and then `cargo bench -p zy-lab --bench spine` (as root)",
        overrides: &s.overrides,
        settings: format!(
            "agent window {} s, coordinator window {} s, {} s warm-up before each, {} death rounds, fleets of {}, enrollments {} in parallel; default timings (report every 1 s, Suspect after 2.5 s, QUIC idle timeout 5 s, Down after 8 s).",
            s.agent_secs,
            s.coord_secs,
            s.warmup_secs,
            s.death_rounds,
            s.fleets
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" and "),
            s.join_parallel
        ),
    };
    let method = [
        format!(
            "No figure is asserted and nothing fails on slowness; CPU is utime + stime from `/proc/<pid>/stat` (in clock ticks of 1/{} s, so all threads of the process, including exited ones) over a wall-clock window, as a percentage of one core; memory is from `/proc/<pid>/status`.\n",
            bench::clk_tck()
        ),
        "1. **Agent, idle.** A lab site (network namespaces, real `zy-coordinator` and `zy-agent` binaries of the `dist` profile) with one node: the node is enrolled with `zy-agent join`, `zy-agent run` is started in its namespace and waited for until its load reports arrive. After the warm-up, the agent process (the pid started by `ip netns exec`, which execs it) is measured over the agent window: CPU as above (and, for its finer resolution, the scheduler's run time summed over `/proc/<pid>/task/*/schedstat`), VmRSS (split into RssAnon and RssFile, the latter being mostly the mapped binary) and VmHWM at the end of the window. The agent reports once a second, its default.".to_string(),
        "2. **Coordinator with N simulated agents.** For each N, a fresh state directory (`zy-coordinator init`) and a real `zy-coordinator run` on loopback (127.0.0.1, free ports, `RUST_LOG=warn`). Enrollment is the real protocol: a bootstrap token from `POST /v1/tokens` (the `zy` CLI's HTTPS client and the admin token of `zy.toml`), a fresh key and certificate request, and a `JoinRequest` over QUIC to the daemon port, pinned to the CA by the token's fingerprint, with the stated number in flight; the rate is N over the wall time of the whole phase, and the first/last 1000 show whether it slows as the store grows. Then every simulated agent (a task in the bench process, on quinn client endpoints of 1000 connections each) opens a mutual-TLS QUIC connection with its node certificate, exchanges preambles, sends `Hello` with a plausible inventory for its zone, reads `Welcome`, and from then on sends a `LoadReport` every report interval, agent i at i/N of the interval so that reports are spread over the second, and answers every `Command` with a `Reply` (Ping with Pong). Ready is counted with `GET /v1/nodes` (state `ready` and connected). After the warm-up, the coordinator process is measured over the coordinator window (CPU, then VmRSS and VmHWM at its end); the bench process, which runs the N simulated agents on the same two cores, is measured over the same window from `/proc/self/stat`. The per-agent memory is the VmRSS growth from \"all enrolled, none connected\" to \"all connected\". After the window the Ready count is taken again with one timed `GET /v1/nodes` (the size is that of the decoded list re-encoded as JSON), and 20 nodes are pinged through `POST /v1/nodes/{node}/ping` (a `Command` to the simulated agent and its `Reply`).".to_string(),
        "3. **Death to Suspect and Down.** On the same lab site as figure 1, in each round the agent is killed with SIGKILL at a random phase of its report cycle, and `zy node ls --json` (run in the coordinator's namespace) is polled every 50 ms; the figure is the time from the kill to the first listing that shows `suspect`, and then `down`. The agent is then restarted and waited for until Ready. The second pair of rows takes the same times from the node's membership history (`at_ms` of the Suspect and Down transitions minus the wall-clock time of the kill), which excludes the polling delay. The coordinator counts silence from the node's last report, which came 0 to 1 s (one report interval) before the kill, so these times can be up to one interval shorter than the thresholds (Suspect after 2.5 s, Down after 8 s of silence), and up to one 250 ms tick of the membership monitor longer.".to_string(),
    ];
    head.text(res, &method)
}

fn main() {
    let s = Settings::from_env();
    let m = Machine::read();
    let started = now_millis();
    let t0 = Instant::now();
    println!("spine benchmark on {}", m.describe());
    println!("binaries from {}", bin_dir().display());
    println!("settings: {s:?}");
    reap_stale_dirs();
    let mut res = Results::new(58, 44);

    if s.runs("agent") || s.runs("death") {
        if let Err(e) = lab_figures(&s, &mut res) {
            eprintln!("[lab] failed: {e:#}");
            res.row(
                "Lab figures (agent idle, death)",
                format!("failed: {e}"),
                "—",
            );
        }
    }

    if s.runs("coord") {
        match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                for &n in &s.fleets {
                    if let Err(e) = coordinator_figures(&s, n, &rt, &mut res) {
                        eprintln!("[coord] N = {n} failed: {e:#}");
                        res.row(
                            format!("Coordinator with {n} simulated agents"),
                            format!("failed: {e}"),
                            "—",
                        );
                    }
                }
                rt.shutdown_timeout(Duration::from_secs(5));
            }
            Err(e) => eprintln!("cannot start a runtime: {e}"),
        }
    }

    let text = section_text(&s, &m, &res, started, t0.elapsed());
    DOCS.publish(&text, s.write_docs);
}
