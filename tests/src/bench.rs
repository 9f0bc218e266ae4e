//! What the benchmarks (`tests/benches/*.rs`) share: settings from the environment, the
//! machine, the figures table, measurements from /proc, statistics, an API client, and the
//! section of `docs/PERFORMANCE.md` each bench writes between its `<!-- bench:<name>:* -->`
//! markers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::CertificateDer;
use zy_cli::client::Client;
use zy_common::time::rfc3339;
use zy_common::tls;

/// Bytes in a MiB.
pub const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// Settings

/// An environment variable as a number, if it is set and one.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// An environment variable as a comma list (empty items dropped), if it is set.
pub fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// Whether to write `docs/PERFORMANCE.md`: as `ZY_BENCH_WRITE` says (`0` for no), and by
/// default only when the whole bench runs.
pub fn docs_wanted(whole_bench: bool) -> bool {
    match std::env::var("ZY_BENCH_WRITE").ok().as_deref() {
        Some("0") => false,
        Some(_) => true,
        None => whole_bench,
    }
}

/// The environment variables `ours` accepts that are set, as sorted `NAME=value`, for the
/// record.
pub fn env_overrides(ours: impl Fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = std::env::vars()
        .filter(|(k, _)| ours(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    v.sort();
    v
}

/// Whether `section` runs, given the list of those asked for (all when there is none).
pub fn selected(only: Option<&[String]>, section: &str) -> bool {
    only.is_none_or(|o| o.iter().any(|s| s == section))
}

// ---------------------------------------------------------------------------------------------
// The machine and the figures

/// The machine, as /proc describes it.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The first `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// How many `processor` entries /proc/cpuinfo has.
    pub logical_cpus: usize,
    /// `MemTotal` of /proc/meminfo.
    pub mem_total_kib: u64,
    /// The kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads the machine from /proc (`unknown` or zero for what it cannot read).
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let logical_cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_kib = status_kib(&meminfo, "MemTotal:").unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        Self {
            cpu_model,
            logical_cpus,
            mem_total_kib,
            kernel,
        }
    }

    /// One line: CPU, logical CPUs, memory and kernel.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} logical CPUs, {:.1} GiB RAM, Linux {}",
            self.cpu_model,
            self.logical_cpus,
            self.mem_total_kib as f64 / 1024.0 / 1024.0,
            self.kernel
        )
    }
}

/// One line of the figures table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What is measured.
    pub figure: String,
    /// What was measured.
    pub value: String,
    /// The target, or `—`.
    pub target: String,
}

/// The figures of a run and its notes, each printed as it comes.
#[derive(Debug)]
pub struct Results {
    /// The table, in order.
    pub rows: Vec<Row>,
    /// Notes below the table.
    pub notes: Vec<String>,
    /// Columns of figure and value when printed.
    widths: (usize, usize),
}

impl Results {
    /// No figures yet; rows print with the figure and the value padded to these widths.
    pub fn new(figure_width: usize, value_width: usize) -> Self {
        Self {
            rows: Vec::new(),
            notes: Vec::new(),
            widths: (figure_width, value_width),
        }
    }

    /// Records (and prints) a row of the table.
    pub fn row(&mut self, figure: impl Into<String>, value: impl Into<String>, target: &str) {
        let r = Row {
            figure: figure.into(),
            value: value.into(),
            target: target.to_string(),
        };
        let (fw, vw) = self.widths;
        println!("  {:<fw$} {:<vw$} {}", r.figure, r.value, r.target);
        self.rows.push(r);
    }

    /// Records (and prints) a note.
    pub fn note(&mut self, text: impl Into<String>) {
        let t = text.into();
        println!("  note: {t}");
        self.notes.push(t);
    }
}

// ---------------------------------------------------------------------------------------------
// The section of docs/PERFORMANCE.md

/// The head of a bench's section of `docs/PERFORMANCE.md`: its title and the bullets that
/// say where the figures come from.
#[derive(Debug)]
pub struct SectionHead<'a> {
    /// `## <title>`.
    pub title: &'a str,
    /// The bench's name: its source is `tests/benches/<bench>.rs`.
    pub bench: &'a str,
    /// The machine it ran on.
    pub machine: &'a Machine,
    /// More bullets about the machine, `(label, text)`, after the machine's.
    pub more_machine: Vec<(&'a str, String)>,
    /// When the run started, in ms since the epoch.
    pub started_ms: u64,
    /// How long the run took.
    pub took: Duration,
    /// How the bench is run; the variables that were set follow it.
    pub command: &'a str,
    /// The variables that were set, `NAME=value`.
    pub overrides: &'a [String],
    /// The settings, one sentence or more.
    pub settings: String,
}

impl SectionHead<'_> {
    /// The whole section: `## title`, where it comes from, the bullets (machine, date,
    /// command, settings), the figures table and the notes, then `### Method` and its
    /// paragraphs, each followed by a line break.
    pub fn text(&self, res: &Results, method: &[String]) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "## {}\n", self.title);
        let _ = writeln!(
            t,
            "Written by the benchmark itself; edit the bench (`tests/benches/{}.rs`), not this section.\n",
            self.bench
        );
        let _ = writeln!(t, "- **Machine:** {}", self.machine.describe());
        for (label, text) in &self.more_machine {
            let _ = writeln!(t, "- **{label}:** {text}");
        }
        let _ = writeln!(
            t,
            "- **Date:** {} (the run took {:.0} s)",
            rfc3339(self.started_ms),
            self.took.as_secs_f64()
        );
        let _ = writeln!(
            t,
            "- **Command:** {}{}",
            self.command,
            if self.overrides.is_empty() {
                String::new()
            } else {
                format!(", with `{}`", self.overrides.join(" "))
            }
        );
        let _ = writeln!(t, "- **Settings:** {}\n", self.settings);
        let _ = writeln!(t, "| Figure | Measured | Target |");
        let _ = writeln!(t, "|---|---|---|");
        for r in &res.rows {
            let _ = writeln!(
                t,
                "| {} | {} | {} |",
                r.figure.replace('|', "\\|"),
                r.value.replace('|', "\\|"),
                r.target
            );
        }
        let _ = writeln!(t);
        if !res.notes.is_empty() {
            let _ = writeln!(t, "Notes from this run:\n");
            for n in &res.notes {
                let _ = writeln!(t, "- {n}");
            }
            let _ = writeln!(t);
        }
        let _ = writeln!(t, "### Method\n");
        for p in method {
            let _ = writeln!(t, "{p}");
        }
        t
    }
}

/// Where a bench's section lives in `docs/PERFORMANCE.md`.
#[derive(Debug, Clone, Copy)]
pub struct DocSection<'a> {
    /// The bench's name in the markers: `<!-- bench:<name>:begin -->` … `:end -->`.
    pub name: &'a str,
    /// A missing section goes right after the section of this bench when there is one, else
    /// at the end of the file.
    pub after: Option<&'a str>,
    /// The paragraph under `# Performance` when the file does not exist yet.
    pub preamble: &'a str,
    /// The variable that runs part of the bench (and so leaves the file alone by default).
    pub only_var: &'a str,
}

/// The path of `docs/PERFORMANCE.md`.
pub fn performance_md() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("PERFORMANCE.md")
}

fn marker(name: &str, which: &str) -> String {
    format!("<!-- bench:{name}:{which} -->")
}

impl DocSection<'_> {
    /// The file's text with the section set to `text`: replaced between its markers, or
    /// added where [`DocSection::after`] says; a new file when there is none.
    pub fn splice(&self, old: Option<&str>, text: &str) -> String {
        let (begin, end) = (marker(self.name, "begin"), marker(self.name, "end"));
        let block = format!("{begin}\n{text}{end}");
        let Some(old) = old else {
            return format!("# Performance\n\n{}\n\n{block}\n", self.preamble);
        };
        if let (Some(b), Some(e)) = (old.find(&begin), old.find(&end)) {
            if e > b {
                return format!("{}{block}{}", &old[..b], &old[e + end.len()..]);
            }
        }
        let after = self.after.map(|a| marker(a, "end"));
        if let Some((e, m)) = after.and_then(|m| Some((old.find(&m)?, m))) {
            let at = e + m.len();
            return format!("{}\n\n{block}{}", &old[..at], &old[at..]);
        }
        let sep = if old.ends_with('\n') { "\n" } else { "\n\n" };
        format!("{old}{sep}{block}\n")
    }

    /// Writes the section into `docs/PERFORMANCE.md`; returns the file's path.
    pub fn write(&self, text: &str) -> Result<PathBuf> {
        let path = performance_md();
        let old = std::fs::read_to_string(&path).ok();
        let new = self.splice(old.as_deref(), text);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, new)?;
        Ok(path)
    }

    /// Prints the section and, when `write`, writes it, saying what became of the file.
    pub fn publish(&self, text: &str, write: bool) {
        println!("\n{text}");
        if write {
            match self.write(text) {
                Ok(p) => println!("wrote {}", p.canonicalize().unwrap_or(p).display()),
                Err(e) => eprintln!("could not write docs/PERFORMANCE.md: {e:#}"),
            }
        } else {
            println!(
                "docs/PERFORMANCE.md left alone ({} or ZY_BENCH_WRITE=0)",
                self.only_var
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc measurements

/// Clock ticks per second (`CLK_TCK`; 100 when unknown).
pub fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|v| *v > 0)
        .unwrap_or(100) as f64
}

/// The fields of `/proc/<pid>/stat` after the command name: the first is field 3 of proc(5).
pub fn stat_fields(pid: &str) -> Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?
        .1;
    Ok(after.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of a process (all its threads, live and exited), in clock ticks.
pub fn cpu_ticks(pid: &str) -> Result<u64> {
    let f = stat_fields(pid)?;
    // Field 14 (utime) and 15 (stime) of proc(5).
    let utime: u64 = f.get(11).ok_or_else(|| anyhow!("no utime"))?.parse()?;
    let stime: u64 = f.get(12).ok_or_else(|| anyhow!("no stime"))?.parse()?;
    Ok(utime + stime)
}

/// Busy clock ticks of the whole machine, all CPUs (everything in the `cpu` line of
/// /proc/stat but idle and iowait).
pub fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    v.iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| *x)
        .sum()
}

/// Time on CPU of every live thread of a process, in ns, from the scheduler's own accounting
/// (`/proc/<pid>/task/*/schedstat`): finer than clock ticks, but blind to exited threads.
pub fn sched_ns(pid: &str) -> Result<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = std::fs::read_to_string(t?.path().join("schedstat")).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// A process's CPU counters, and the machine's, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// [`cpu_ticks`] of the process.
    pub ticks: u64,
    /// [`sched_ns`] of the process (0 when unreadable).
    pub sched: u64,
    /// [`machine_busy_ticks`].
    pub machine: u64,
    /// When the sample was taken.
    pub at: Instant,
}

impl CpuSample {
    /// Samples process `pid` (a number, or `self`).
    pub fn take(pid: &str) -> Result<Self> {
        Ok(Self {
            ticks: cpu_ticks(pid)?,
            sched: sched_ns(pid).unwrap_or(0),
            machine: machine_busy_ticks(),
            at: Instant::now(),
        })
    }
}

/// CPU used between two samples.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// Wall-clock seconds between the samples.
    pub wall_s: f64,
    /// Seconds of CPU of the process (utime + stime).
    pub cpu_s: f64,
    /// The same as a percentage of one core.
    pub pct: f64,
    /// The scheduler's run time of the process, as a percentage of one core.
    pub sched_pct: f64,
    /// The whole machine's busy time, as a percentage of one core.
    pub machine_pct: f64,
}

impl CpuUse {
    /// What was used from `a` to `b`.
    pub fn between(a: &CpuSample, b: &CpuSample) -> Self {
        let wall_s = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let cpu_s = b.ticks.saturating_sub(a.ticks) as f64 / clk_tck();
        Self {
            wall_s,
            cpu_s,
            pct: cpu_s / wall_s * 100.0,
            sched_pct: b.sched.saturating_sub(a.sched) as f64 / 1e9 / wall_s * 100.0,
            machine_pct: b.machine.saturating_sub(a.machine) as f64 / clk_tck() / wall_s * 100.0,
        }
    }
}

/// Fails unless process `pid` runs the program `name` (its `/proc/<pid>/comm`).
pub fn expect_comm(pid: i32, name: &str) -> Result<()> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != name {
        bail!("pid {pid} is `{}`, not {name}", comm.trim());
    }
    Ok(())
}

/// The number after `key` in a `key: value kB` listing (/proc/<pid>/status, /proc/meminfo).
pub fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Memory of a process from /proc/<pid>/status, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM, the peak RSS.
    pub hwm: u64,
    /// RssAnon.
    pub anon: u64,
    /// RssFile (mostly mapped binaries).
    pub file: u64,
    /// Threads (a count, not KiB).
    pub threads: u64,
}

impl Mem {
    /// Reads process `pid` (a number, or `self`).
    pub fn read(pid: &str) -> Result<Self> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        Ok(Self {
            rss: status_kib(&s, "VmRSS:").unwrap_or(0),
            hwm: status_kib(&s, "VmHWM:").unwrap_or(0),
            anon: status_kib(&s, "RssAnon:").unwrap_or(0),
            file: status_kib(&s, "RssFile:").unwrap_or(0),
            threads: status_kib(&s, "Threads:").unwrap_or(0),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

/// KiB as `12.3 MiB`.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 * 1024.0 / MIB)
}

/// Minimum, median (the mean of the middle two for an even count) and maximum; NaN for no
/// values.
pub fn min_median_max(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (s[0], median, s[s.len() - 1])
}

/// The q-quantile (0..=1) of the finite values by linear interpolation between the closest
/// ranks; NaN for none.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

// ---------------------------------------------------------------------------------------------
// The API

/// Lets `Client::call` take its method without the benches naming the HTTP types.
pub fn method<M: std::str::FromStr>(m: &str) -> M
where
    M::Err: std::fmt::Debug,
{
    m.parse().expect("a valid HTTP method")
}

/// An API client for `api` (`host:port`) with the admin token and the CA that
/// `zy-coordinator init` wrote into the state directory `state`; also returns the CA.
pub fn admin_client(state: &Path, api: &str) -> Result<(Client, CertificateDer<'static>)> {
    let cfg = std::fs::read_to_string(state.join("zy.toml"))?;
    let token = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("token = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .ok_or_else(|| anyhow!("no admin token in zy.toml"))?;
    let pem = std::fs::read_to_string(state.join("ca.crt"))?;
    let ca = tls::certs_from_pem("CA certificate", &pem)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("empty ca.crt"))?;
    let tls_cfg = tls::https_client_config(&ca)?;
    Ok((Client::new(api, Some(token), tls_cfg), ca))
}

// ---------------------------------------------------------------------------------------------
// Log timestamps

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The UTC timestamp that starts a log line of the agent or the coordinator
/// (`2026-11-29T12:07:46.123456Z  INFO ...`), in µs since the epoch.
pub fn log_ts_us(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    let mut digits: String = frac.chars().take(6).collect();
    while digits.len() < 6 {
        digits.push('0');
    }
    let us: i64 = digits.parse().ok()?;
    let secs = days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60 + s;
    u64::try_from(secs * 1_000_000 + us).ok()
}

/// The time of the first line of `log` that contains every one of `needles`.
pub fn log_time(log: &str, needles: &[&str]) -> Option<u64> {
    log.lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(log_ts_us)
}

// ---------------------------------------------------------------------------------------------
// Statistics

pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        "n/a".into()
    } else if ms.abs() >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms.abs() >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms.abs() >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// `p50 / p95 / max (n)` of a set of milliseconds.
pub fn dist(v: &[f64]) -> String {
    if v.is_empty() {
        return "n/a (no samples: log lines not found?)".into();
    }
    format!(
        "p50 {} / p95 {} / max {} (n = {})",
        fmt_ms(quantile(v, 0.5)),
        fmt_ms(quantile(v, 0.95)),
        fmt_ms(quantile(v, 1.0)),
        v.len()
    )
}

/// Milliseconds from `a` to `b` (wall-clock µs), when both are known.
pub fn span(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    Some((b? as i64 - a? as i64) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPINE: DocSection<'static> = section("spine", None);
    const VMS: DocSection<'static> = section("vms", Some("spine"));

    const fn section(name: &'static str, after: Option<&'static str>) -> DocSection<'static> {
        DocSection {
            name,
            after,
            preamble: "Preamble.",
            only_var: "ZY_BENCH_ONLY",
        }
    }

    /// Markers with a body, as the file holds them.
    fn block(name: &str, body: &str) -> String {
        format!("<!-- bench:{name}:begin -->\n{body}<!-- bench:{name}:end -->")
    }

    #[test]
    fn a_section_is_replaced_or_added_where_it_belongs() {
        let (spine_old, spine_new, vms) = (
            block("spine", "old\n"),
            block("spine", "s\n"),
            block("vms", "v\n"),
        );
        let cases = [
            // Replaced between its markers, the rest left alone.
            (
                SPINE,
                Some(format!("# P\n\nfree\n{spine_old}\ntail\n")),
                "s\n",
                format!("# P\n\nfree\n{spine_new}\ntail\n"),
            ),
            // Missing: right after its neighbour's section...
            (
                VMS,
                Some(format!("# P\n{spine_new}\nmore\n")),
                "v\n",
                format!("# P\n{spine_new}\n\n{vms}\nmore\n"),
            ),
            // ... or at the end.
            (VMS, Some("# P".into()), "v\n", format!("# P\n\n{vms}\n")),
            (
                SPINE,
                Some("# P\n".into()),
                "s\n",
                format!("# P\n\n{spine_new}\n"),
            ),
            // No file yet.
            (
                SPINE,
                None,
                "s\n",
                format!("# Performance\n\nPreamble.\n\n{spine_new}\n"),
            ),
        ];
        for (section, old, text, want) in cases {
            assert_eq!(section.splice(old.as_deref(), text), want, "{old:?}");
        }
    }

    #[test]
    fn statistics() {
        assert_eq!(min_median_max(&[3.0, 1.0, 2.0, 4.0]), (1.0, 2.5, 4.0));
        assert!(min_median_max(&[]).1.is_nan());
        assert_eq!(quantile(&[1.0, 2.0, 3.0, f64::NAN], 0.5), 2.0);
        assert_eq!(quantile(&[0.0, 10.0], 0.95), 9.5);
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(mib(1536), "1.5 MiB");
    }
}
