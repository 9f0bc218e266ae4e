//! The lab: a small data centre on one machine.
//!
//! Each [`Lab`] is one run: a backbone namespace holding a bridge, a coordinator namespace
//! and N node namespaces, each joined to the bridge by a veth pair, with the real
//! `zy-coordinator`, `zy-agent` and `zy` binaries started inside them.
//!
//! ```text
//!   zy-<run>-coord (10.77.0.1)   zy-<run>-n1 (10.77.0.11)   zy-<run>-n2 (10.77.0.12) ...
//!          | eth0                       | eth0                      | eth0
//!   +------+----------------------------+---------------------------+------+
//!   |  zy-<run>-bb: bridge br0                                             |
//!   +----------------------------------------------------------------------+
//! ```
//!
//! Every link lives inside a namespace of the run, so names never collide across runs and
//! deleting the namespaces removes every link. A run is removed on drop (also when a test
//! panics), and any run whose owning process died (a killed test) is reaped by the next
//! [`Lab::new`] or by `reap_stale`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where runs keep their files: `<tmp>/zy-lab/<run>/`.
pub fn lab_root() -> PathBuf {
    std::env::temp_dir().join("zy-lab")
}

/// The directory holding the project's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ZY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test binary>  or  target/<profile>/<bench binary>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a project binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --bins)",
        p.display()
    );
    p
}

/// Runs a command, failing with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub use zy_agent::vm::runner::pid_alive;

/// Start time of a process (clock ticks since boot), to tell a reused pid from the owner.
fn pid_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

fn netns_list() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn kill_netns_pids(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn delete_netns(ns: &str) {
    kill_netns_pids(ns);
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Serialises reaping and building runs within one test process (tests run on threads).
static LAB_LOCK: Mutex<()> = Mutex::new(());

/// Removes every run whose owner process is gone: its processes, namespaces and files.
/// Returns the runs reaped.
pub fn reap_stale() -> Vec<String> {
    let _guard = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    reap_stale_locked()
}

fn reap_stale_locked() -> Vec<String> {
    let root = lab_root();
    let mut reaped = Vec::new();
    let owner_alive = |run: &str| -> bool {
        let dir = root.join(run);
        let Ok(text) = std::fs::read_to_string(dir.join("owner")) else {
            // A run another process is creating right now has its directory a moment
            // before its owner file: leave young ones alone.
            let young = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(60));
            return young;
        };
        let mut it = text.split_whitespace();
        let (Some(pid), Some(start)) = (
            it.next().and_then(|p| p.parse::<i32>().ok()),
            it.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            return false;
        };
        pid_alive(pid) && pid_start_time(pid) == Some(start)
    };
    let mut runs: Vec<String> = netns_list()
        .iter()
        .filter_map(|ns| ns.strip_prefix("zy-"))
        .filter_map(|rest| rest.split('-').next())
        .map(str::to_string)
        .collect();
    if let Ok(entries) = std::fs::read_dir(&root) {
        runs.extend(
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    runs.sort();
    runs.dedup();
    for run in runs {
        if owner_alive(&run) {
            continue;
        }
        for ns in netns_list() {
            if ns.starts_with(&format!("zy-{run}-")) {
                delete_netns(&ns);
            }
        }
        slowdisk::release_run(&run, &root.join(&run));
        let _ = std::fs::remove_dir_all(root.join(&run));
        reaped.push(run);
    }
    reaped
}

/// A process the lab started.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

/// One lab run.
#[derive(Debug)]
pub struct Lab {
    pub run: String,
    pub dir: PathBuf,
    pub n_nodes: usize,
    procs: Mutex<Vec<Proc>>,
    namespaces: Vec<String>,
}

/// The backbone subnet; every run has its own backbone, so every run can use it.
pub const COORD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The coordinator's daemon (QUIC) and API ports in the lab.
pub const DAEMON_PORT: u16 = 7400;
pub const API_PORT: u16 = 7443;

impl Lab {
    /// Builds a run with `n` node namespaces. Reaps dead runs first.
    pub fn new(n: usize) -> Result<Lab> {
        if !is_root() {
            bail!("the lab needs root (network namespaces): run the test command as root");
        }
        let _guard = LAB_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        reap_stale_locked();
        let run = loop {
            let r = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
            if !lab_root().join(&r).exists() {
                break r;
            }
        };
        let dir = lab_root().join(&run);
        std::fs::create_dir_all(dir.join("logs"))?;
        let me = std::process::id() as i32;
        // Atomically: a reaper must never read half an owner file.
        zy_common::files::write_atomic(
            &dir.join("owner"),
            format!("{me} {}\n", pid_start_time(me).unwrap_or(0)).as_bytes(),
            0o644,
        )?;
        let mut lab = Lab {
            run,
            dir,
            n_nodes: n,
            procs: Mutex::new(Vec::new()),
            namespaces: Vec::new(),
        };
        lab.build_network()?;
        Ok(lab)
    }

    /// Namespace of the backbone bridge.
    pub fn bb_ns(&self) -> String {
        format!("zy-{}-bb", self.run)
    }
    /// Namespace of the coordinator.
    pub fn coord_ns(&self) -> String {
        format!("zy-{}-coord", self.run)
    }
    /// Namespace of node `i` (1-based).
    pub fn node_ns(&self, i: usize) -> String {
        format!("zy-{}-n{i}", self.run)
    }
    /// Backbone address of node `i` (1-based).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 10 + i as u8)
    }
    /// The coordinator's daemon address as agents use it.
    pub fn daemon_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(COORD_IP), DAEMON_PORT)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        sh("ip", &["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build_network(&mut self) -> Result<()> {
        let bb = self.bb_ns();
        self.add_ns(&bb)?;
        sh("ip", &["-n", &bb, "link", "add", "br0", "type", "bridge"])?;
        sh("ip", &["-n", &bb, "link", "set", "br0", "up"])?;
        let mut hosts = vec![(self.coord_ns(), "coord".to_string(), COORD_IP)];
        for i in 1..=self.n_nodes {
            hosts.push((self.node_ns(i), format!("n{i}"), self.node_ip(i)));
        }
        for (ns, port, ip) in hosts {
            self.add_ns(&ns)?;
            sh(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                    "netns", &bb,
                ],
            )?;
            sh("ip", &["-n", &bb, "link", "set", &port, "master", "br0"])?;
            sh("ip", &["-n", &bb, "link", "set", &port, "up"])?;
            sh(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Starts a binary inside a namespace; its output goes to `<run>/logs/<name>.log`.
    pub fn spawn(&self, ns: &str, name: &str, program: &Path, args: &[&str]) -> Result<i32> {
        self.spawn_env(ns, name, program, args, &[])
    }

    /// Like [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env(
        &self,
        ns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<i32> {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id() as i32;
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Proc {
                name: name.to_string(),
                child,
                log,
            });
        Ok(pid)
    }

    /// Runs a binary in a namespace to completion.
    pub fn exec(&self, ns: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec")
    }

    /// Sends a signal to a started process and, for SIGKILL/SIGTERM, reaps it.
    pub fn signal(
        &self,
        name: &str,
        sig: nix::sys::signal::Signal,
    ) -> Option<std::process::ExitStatus> {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        let idx = procs.iter().rposition(|p| p.name == name)?;
        let pid = procs[idx].pid();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        if matches!(
            sig,
            nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGTERM
        ) {
            let mut p = procs.remove(idx);
            drop(procs);
            return wait_timeout(&mut p.child, Duration::from_secs(15));
        }
        None
    }

    /// Waits for a started process to exit by itself.
    pub fn wait_exit(&self, name: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
                let idx = procs.iter().rposition(|p| p.name == name)?;
                if let Ok(Some(st)) = procs[idx].child.try_wait() {
                    procs.remove(idx);
                    return Some(st);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a started process is still running.
    pub fn is_running(&self, name: &str) -> bool {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs
            .iter_mut()
            .rev()
            .find(|p| p.name == name)
            .map(|p| matches!(p.child.try_wait(), Ok(None)))
            .unwrap_or(false)
    }

    /// The pid of a started process.
    pub fn pid(&self, name: &str) -> Option<i32> {
        let procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs.iter().rev().find(|p| p.name == name).map(Proc::pid)
    }

    /// The log of a started process so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// Binds a UDP socket inside a namespace (from a thread that joins it), for test
    /// clients and rogue servers that speak QUIC from this process.
    pub fn udp_socket_in(&self, ns: &str, addr: SocketAddr) -> Result<std::net::UdpSocket> {
        let path = PathBuf::from("/var/run/netns").join(ns);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<std::net::UdpSocket> {
                let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let sock = std::net::UdpSocket::bind(addr)?;
                sock.set_nonblocking(true)?;
                Ok(sock)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("setns thread panicked"))?
        })
    }

    /// Opens a TCP connection from inside a namespace.
    pub fn tcp_connect_in(&self, ns: &str, addr: SocketAddr) -> Result<std::net::TcpStream> {
        let path = PathBuf::from("/var/run/netns").join(ns);
        std::thread::scope(|s| {
            s.spawn(|| -> Result<std::net::TcpStream> {
                let f = File::open(&path)?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(std::net::TcpStream::connect_timeout(
                    &addr,
                    Duration::from_secs(5),
                )?)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("setns thread panicked"))?
        })
    }

    /// Runs `f` on a thread inside a namespace, with a tokio runtime of its own (so that
    /// sockets, netlink included, are opened in that namespace).
    pub fn run_in<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/var/run/netns").join(ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).expect("open the namespace");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    fn print_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(f) = File::open(e.path()) else {
                continue;
            };
            let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
            eprintln!("----- {} (last 40 lines) -----", e.path().display());
            for l in lines.iter().skip(lines.len().saturating_sub(40)) {
                eprintln!("{l}");
            }
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        for p in procs.iter_mut() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        procs.clear();
        drop(procs);
        for ns in self.namespaces.iter().rev() {
            delete_netns(ns);
        }
        slowdisk::release_run(&self.run, &self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub mod bench;
pub mod nspawn;
pub mod peer;
pub mod pty;
pub mod site;
pub mod slowdisk;
