//! The packing benchmark (issue 9, item 3): Zhengyun's packer against the baselines of
//! `zy_packer::baselines` (first-fit and best-fit decreasing, Nomad's ScoreFitBinPack over all
//! nodes and sampled, Kubernetes LeastAllocated and MostAllocated), every one on identical
//! generated traces (`zy_packer::gen`) and under the same hard rules, judged by the
//! independent checker of `zy_packer::metrics`. It prints its tables and writes them into
//! `docs/PERFORMANCE.md` between `<!-- bench:packing:begin -->` and `:end -->`. No figure is
//! asserted.
//!
//! ```text
//! cargo bench -p zy-packer --bench packing      # also run by scripts/bench.sh
//! ```
//!
//! Time: the generators and the checker take seconds; the replays are the packers' own
//! decisions, all under N+1. Zhengyun decides in tens of microseconds at 1,000 nodes; the
//! baselines, whose choices fill the nodes that N+1 evacuations rely on, re-simulate many
//! evacuations per decision and take milliseconds (a 1,000-node replay of one of them takes
//! up to a few minutes on a two-core machine, a 10,000-node one much longer), hence
//! `ZY_BENCH_PACK_BIG`. Select parts with `ZY_BENCH_PACK_NODES`, `_MIXES`, `_PACKERS`; the
//! section of `docs/PERFORMANCE.md` is rewritten after every packer, marked unfinished until
//! the run ends, and keeps the tables of the fleet sizes, mixes and modes a run does not measure (each table
//! says when it was measured), so sizes can be run one at a time.
//!
//! | variable                  | default           | meaning                                     |
//! |---------------------------|-------------------|---------------------------------------------|
//! | `ZY_BENCH_PACK_NODES`     | 100,1000,10000    | fleet sizes                                 |
//! | `ZY_BENCH_PACK_MIXES`     | all               | government, azure, adversarial              |
//! | `ZY_BENCH_PACK_MODES`     | static,online     |                                             |
//! | `ZY_BENCH_PACK_PACKERS`   | all               | names of `zy_packer::baselines::NAMES`      |
//! | `ZY_BENCH_PACK_BIG`       | 10000             | from this size on, only the government mix and the packers of `ZY_BENCH_PACK_BIG_PACKERS` run (time) |
//! | `ZY_BENCH_PACK_BIG_PACKERS` | zhengyun,bfd,nomad-sampled,k8s-most | |
//! | `ZY_BENCH_PACK_SEED`      | 1                 | the generators' seed                        |
//! | `ZY_BENCH_PACK_DUMP`      | unset             | a directory: write every generated trace there as JSON (`zy-coordinator pack --trace` reads them) |
//! | `ZY_BENCH_WRITE`          | 1 unless a selection is set | 0 to leave docs/PERFORMANCE.md alone |

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use zy_packer::baselines::{self, NAMES};
use zy_packer::gen::{self, Mix};
use zy_packer::metrics::{self, Report, STRANDED_FULL};
use zy_packer::replay;
use zy_packer::trace::Trace;

/// The CPU time of this thread, in ns: what a decision costs the packer, without the
/// time slices of other processes that a shared machine's wall clock would count.
fn thread_cpu_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

const VARS: [&str; 8] = [
    "ZY_BENCH_PACK_NODES",
    "ZY_BENCH_PACK_MIXES",
    "ZY_BENCH_PACK_MODES",
    "ZY_BENCH_PACK_PACKERS",
    "ZY_BENCH_PACK_BIG",
    "ZY_BENCH_PACK_BIG_PACKERS",
    "ZY_BENCH_PACK_SEED",
    "ZY_BENCH_PACK_DUMP",
];

struct Run {
    /// When it ran (RFC 3339).
    date: String,
    nodes: usize,
    mix: Mix,
    online: bool,
    requests: usize,
    reports: Vec<Report>,
    gen_s: f64,
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    format!(
        "{model}, {cpus} logical CPUs, {:.1} GiB RAM, Linux {kernel}",
        kib as f64 / 1024.0 / 1024.0
    )
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn table(run: &Run) -> String {
    let mut t = String::new();
    let best_gap = run
        .reports
        .iter()
        .filter(|r| r.packer != "zhengyun")
        .map(|r| r.gap_pct())
        .fold(f64::INFINITY, f64::min);
    let _ = writeln!(
        t,
        "#### {} nodes, {} mix, {} ({} requests{})\n",
        run.nodes,
        run.mix.name(),
        if run.online { "online" } else { "static" },
        run.requests,
        if best_gap.is_finite() {
            format!("; best baseline {:.1} % over the bound", best_gap)
        } else {
            String::new()
        }
    );
    let _ = writeln!(t, "Measured {}.\n", run.date);
    let _ = writeln!(
        t,
        "| packer | hosts | lower bound | over bound | stranded vCPU | stranded memory | rejected | rules broken | N+1 after departures | decision p50 | p99 |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &run.reports {
        let v = r.violations;
        let broken = if v.total() == 0 {
            "0".to_string()
        } else {
            format!(
                "{} (zone {}, capacity {}, anti-affinity {}, N+1 {}, accounting {})",
                v.total(),
                v.zone,
                v.capacity,
                v.anti_affinity,
                v.n_plus_one,
                v.accounting
            )
        };
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.1} | {:+.1} % | {:.2} % | {:.2} % | {} | {} | {} | {:.0} µs | {:.0} µs |",
            r.packer,
            r.hosts,
            r.bound,
            r.gap_pct(),
            r.stranded_cpu_pct,
            r.stranded_mem_pct,
            r.rejected,
            broken,
            r.n_plus_one_after_departure,
            r.decision_us_p50,
            r.decision_us_p99
        );
    }
    let _ = writeln!(t);
    t
}

const BEGIN: &str = "<!-- bench:packing:begin -->";
const END: &str = "<!-- bench:packing:end -->";

fn performance_md() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("PERFORMANCE.md")
}

/// The file's text with the section replaced between its markers, or added at the end.
fn splice(old: &str, text: &str) -> String {
    let block = format!("{BEGIN}\n{text}{END}");
    if let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) {
        if e > b {
            return format!("{}{block}{}", &old[..b], &old[e + END.len()..]);
        }
    }
    let sep = if old.ends_with('\n') { "\n" } else { "\n\n" };
    format!("{old}{sep}{block}\n")
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t_all = Instant::now();
    let sizes: Vec<usize> = env_list("ZY_BENCH_PACK_NODES")
        .map(|v| v.iter().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000, 10_000]);
    let mixes: Vec<Mix> = env_list("ZY_BENCH_PACK_MIXES")
        .map(|v| v.iter().filter_map(|s| Mix::from_name(s)).collect())
        .unwrap_or_else(|| Mix::ALL.to_vec());
    let modes: Vec<bool> = env_list("ZY_BENCH_PACK_MODES")
        .map(|v| {
            v.iter()
                .filter_map(|s| match s.as_str() {
                    "static" => Some(false),
                    "online" => Some(true),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_else(|| vec![false, true]);
    let packers: Vec<String> = env_list("ZY_BENCH_PACK_PACKERS")
        .unwrap_or_else(|| NAMES.iter().map(|s| s.to_string()).collect());
    let big = env_u64("ZY_BENCH_PACK_BIG").unwrap_or(10_000) as usize;
    let big_packers: Vec<String> = env_list("ZY_BENCH_PACK_BIG_PACKERS").unwrap_or_else(|| {
        ["zhengyun", "bfd", "nomad-sampled", "k8s-most"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let seed = env_u64("ZY_BENCH_PACK_SEED").unwrap_or(1);
    let dump = std::env::var("ZY_BENCH_PACK_DUMP").ok().map(PathBuf::from);
    for p in packers.iter().chain(&big_packers) {
        if baselines::by_name(p).is_none() {
            eprintln!("packing: no packer `{p}` (known: {})", NAMES.join(", "));
            std::process::exit(2);
        }
    }
    let selection = VARS[..4].iter().any(|v| std::env::var(v).is_ok());
    let write = match std::env::var("ZY_BENCH_WRITE").ok().as_deref() {
        Some("0") => false,
        Some(_) => true,
        None => !selection,
    };

    let mut clock = thread_cpu_ns;
    let mut runs = Vec::new();
    for &n in &sizes {
        for &online in &modes {
            for &mix in &mixes {
                if n >= big && mix != Mix::Government {
                    continue;
                }
                let tg = Instant::now();
                let trace: Trace = gen::generate(mix, n, online, seed);
                let gen_s = tg.elapsed().as_secs_f64();
                if let Some(dir) = &dump {
                    let path = dir.join(format!(
                        "{}-{}-{}.json",
                        mix.name(),
                        if online { "online" } else { "static" },
                        n
                    ));
                    if let Err(e) = std::fs::create_dir_all(dir)
                        .and_then(|()| std::fs::write(&path, trace.to_json()))
                    {
                        eprintln!("packing: cannot write {}: {e}", path.display());
                        std::process::exit(1);
                    }
                    eprintln!("wrote {}", path.display());
                }
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut run = Run {
                    date: rfc3339(now),
                    nodes: trace.nodes.len(),
                    mix,
                    online,
                    requests: trace.requests.len(),
                    reports: Vec::new(),
                    gen_s,
                };
                let names = if n >= big { &big_packers } else { &packers };
                for name in names {
                    let packer = baselines::by_name(name).expect("checked above");
                    let tr = Instant::now();
                    let rep = match replay::replay(&trace, &packer, &mut clock) {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("packing: replay failed: {e}");
                            std::process::exit(1);
                        }
                    };
                    let replay_s = tr.elapsed().as_secs_f64();
                    let tc = Instant::now();
                    let report = metrics::evaluate(&trace, &rep);
                    eprintln!(
                        "  {n:>5} {:<11} {:<6} {:<13} hosts {:>8.1} bound {:>8.1} ({:+5.1} %) rejected {:>5} broken {} p99 {:.0} µs  [replay {:.1} s, check {:.1} s]",
                        mix.name(),
                        if online { "online" } else { "static" },
                        name,
                        report.hosts,
                        report.bound,
                        report.gap_pct(),
                        report.rejected,
                        report.violations.total(),
                        report.decision_us_p99,
                        replay_s,
                        tc.elapsed().as_secs_f64()
                    );
                    run.reports.push(report);
                    if write {
                        // As it goes: a long run leaves what it measured so far.
                        let mut so_far: Vec<&Run> = runs.iter().collect();
                        so_far.push(&run);
                        let text = section(&so_far, &sizes, &mixes, &modes, &big_packers, big, seed, started, &t_all, Some("the bench writes this section as it goes, and this run had not ended when it was written: the tables below are the runs it had finished (a table may lack its last packers)"));
                        write_docs(&text);
                    }
                }
                print!("{}", table(&run));
                runs.push(run);
            }
        }
    }

    let all: Vec<&Run> = runs.iter().collect();
    let text = section(
        &all,
        &sizes,
        &mixes,
        &modes,
        &big_packers,
        big,
        seed,
        started,
        &t_all,
        None,
    );
    println!("\n{text}");
    if write {
        write_docs(&text);
        println!("wrote {}", performance_md().display());
    } else {
        println!(
            "docs/PERFORMANCE.md left alone (a ZY_BENCH_PACK_* selection, or ZY_BENCH_WRITE=0)"
        );
    }
}

/// The section of docs/PERFORMANCE.md for the runs so far (`unfinished` says what is still
/// to come when the bench writes it as it goes).
#[allow(clippy::too_many_arguments)]
fn section(
    runs: &[&Run],
    sizes: &[usize],
    mixes: &[Mix],
    modes: &[bool],
    big_packers: &[String],
    big: usize,
    seed: u64,
    started: u64,
    t_all: &Instant,
    unfinished: Option<&str>,
) -> String {
    let overrides: Vec<String> = VARS
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|x| format!("{v}={x}")))
        .collect();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "## Packing: Zhengyun against Nomad and Kubernetes scoring\n"
    );
    let _ = writeln!(
        text,
        "Written by the benchmark itself; edit the bench (`packer/benches/packing.rs`), not this section.\n"
    );
    let _ = writeln!(text, "- **Machine:** {}", machine());
    let _ = writeln!(
        text,
        "- **Date:** {} (the run took {:.0} s)",
        rfc3339(started),
        t_all.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        text,
        "- **Command:** `cargo bench -p zy-packer --bench packing` (run by `scripts/bench.sh`){}",
        if overrides.is_empty() {
            String::new()
        } else {
            format!(", with `{}`", overrides.join(" "))
        }
    );
    let _ = writeln!(
        text,
        "- **Settings:** fleets of {} nodes; mixes {}; seed {seed}; from {big} nodes on only the government mix with {}.\n",
        sizes
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        mixes.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        big_packers.join(", ")
    );
    // This run's tables, and those of other fleet sizes kept from the file (each dated),
    // by fleet size.
    let mut tables: Vec<(usize, String)> = kept_tables(sizes, mixes, modes);
    let kept = !tables.is_empty();
    for run in runs {
        tables.push((run.nodes, table(run)));
    }
    tables.sort_by_key(|t| t.0);
    if kept {
        let _ = writeln!(
            text,
            "Tables of fleet sizes this run did not measure are kept from earlier runs of the bench (each says when it was measured).\n"
        );
    }
    for (_, t) in tables {
        text.push_str(&t);
    }
    if let Some(left) = unfinished {
        let _ = writeln!(text, "**Unfinished:** {left}\n");
    }
    let _ = writeln!(text, "### Method\n");
    for p in method(runs) {
        let _ = writeln!(text, "{p}\n");
    }
    text
}

/// The tables of the section now in docs/PERFORMANCE.md that this run does not measure
/// (another fleet size, mix or mode): (nodes, the table's text).
fn kept_tables(sizes: &[usize], mixes: &[Mix], modes: &[bool]) -> Vec<(usize, String)> {
    let old = std::fs::read_to_string(performance_md()).unwrap_or_default();
    let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) else {
        return Vec::new();
    };
    if e <= b {
        return Vec::new();
    }
    let body = &old[b..e];
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    let mut measured: Vec<bool> = Vec::new();
    for line in body.lines() {
        let end = line.starts_with("### ") || line.starts_with("**Unfinished");
        if line.starts_with("#### ") || end {
            out.extend(cur.take());
            if end {
                continue;
            }
            // "#### 1000 nodes, azure mix, static (..."
            let words: Vec<&str> = line[5..].split_whitespace().collect();
            let n = words
                .first()
                .and_then(|w| w.replace(',', "").parse::<usize>().ok());
            let mix = words.get(2).and_then(|w| Mix::from_name(w));
            let online = words.get(4).map(|w| w.trim_end_matches(',') == "online");
            cur = n.map(|n| (n, String::new()));
            if let Some(n) = n {
                measured.push(
                    sizes.contains(&n)
                        && mix.is_none_or(|m| mixes.contains(&m))
                        && online.is_none_or(|o| modes.contains(&o)),
                );
            }
        }
        if let Some((_, t)) = cur.as_mut() {
            t.push_str(line);
            t.push('\n');
        }
    }
    out.extend(cur);
    out.into_iter()
        .zip(measured)
        .filter(|(_, m)| !m)
        .map(|(t, _)| t)
        .collect()
}

fn write_docs(text: &str) {
    let path = performance_md();
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Performance\n".into());
    if let Err(e) = std::fs::write(&path, splice(&old, text)) {
        eprintln!("could not write docs/PERFORMANCE.md: {e}");
    }
}

fn method(runs: &[&Run]) -> Vec<String> {
    let gen_s: f64 = runs.iter().map(|r| r.gen_s).sum();
    vec![
        format!(
            "**Traces** (`packer/src/gen.rs`, seeded, identical for every packer): the government mix (catalogue sizes 1 vCPU/1 GiB to 16 vCPU/64 GiB, small ones commonest, a third of services as anti-affinity pairs, three node models of 24/40/64 cores and 192/384/768 GiB, zones of 60 % and 40 % of the nodes, CPU overcommit 4); the Azure-style mix (demands as shares of one 40-core 320 GiB machine from 1/64 to 1/2, memory share ½, 1 or 2 times the CPU share, fractional vCPUs, no overcommit); the adversarial mix (CPU-heavy 16-32 vCPU with 4-8 GiB and memory-heavy 2-4 vCPU with 32-64 GiB VMs in alternating blocks, 32-core 256 GiB nodes, overcommit 4). Static traces are feasible by construction: each is the set of VMs of a *witness packing* (`gen::generate_with_witness`): every node of a zone filled with draws of its mix until {} draws in a row no longer fit under {:.0} % of its capacity after overcommit in every resource (the binding resource ends near {:.0} %; adversarial nodes get both shapes), a pair's second member on the next node, a tenth of each zone's nodes (2 to {}) filled only to {:.0} % as the room N+1 evacuations of large VMs need, and the whole checked against every hard rule with N+1 recomputed by its definition (a node that fails drops its largest service until none fails). So the fleet holds every static request with every rule kept: a rejection in a static table is a request the fleet could hold. The requests are the witness's VMs shuffled (adversarial: alternating blocks of one shape, half the zone's node count each); the lower bound of that demand is below the witness's host count because it ignores shapes, N+1 and the spare nodes. Online traces start from such a population at time 0 with exponential lifetimes of mean {} and add arrivals at the rate that keeps it, up to the horizon {} (a pair arrives and leaves together; adversarial arrivals alternate shapes every {} time units; arrivals are drawn, not witnessed). Generating them took {gen_s:.1} s in all.",
            gen::MISSES,
            gen::FILL * 100.0,
            gen::FILL * 100.0,
            gen::MAX_SPARES,
            gen::SPARE_FILL * 100.0,
            gen::LIFETIME,
            gen::HORIZON,
            gen::BLOCK_TIME
        ),
        "**Packers** (`packer/src/baselines.rs`, formulas cited there): every one runs through `Cluster::place_with`, so zone, state, capacity after overcommit, anti-affinity and N+1 (on) are the same hard rules for all; only the choice among the nodes that pass differs. zhengyun: its own score (best fit against stranding in vCPU, memory and disk from the zone's mix; among scores within 0.05 of the best, the node fewest remembered N+1 evacuations rely on), static traces **reordered** by `static_order` (larger first, shapes interleaved) and scored with the batch's own mix. ffd/bfd: first fit and vector best fit (least room left, the sum of the shares left), static traces sorted by decreasing size (the sum of shares of a mean node), online plain first/best fit. nomad: `ScoreFitBinPack` (20 − 10^freeCpu − 10^freeRam) over every node; nomad-sampled: the same over the first max(2, ⌈log2 n⌉) nodes of a seeded random order that pass every rule, as Nomad's limit iterator. k8s-least/k8s-most: `NodeResourcesFit` LeastAllocated/MostAllocated with CPU and memory weight 1 in Kubernetes' integer arithmetic, over every node (Kubernetes' percentageOfNodesToScore sampling is not modelled), ties to the earlier node where Kubernetes draws at random. Nomad and Kubernetes decide static traces in the trace's order.".to_string(),
        format!(
            "**Figures** (`packer/src/metrics.rs`, from the trace and the replay's log alone, not from the packer's state). Lower bound per zone: per resource the fewest nodes whose capacities, biggest first, add up to the zone's demand, the largest over the resources, summed over zones (it ignores anti-affinity, N+1 and shapes, so 0 % is out of reach: with N+1 on, a zone needs room for its largest node's VMs on the others). Hosts: nodes holding a VM, at the end (static) or averaged over time from 0 to the horizon against the bound of the demand present at each moment, averaged the same way (online). Stranded: on each used node with vCPU or memory at least {:.0} % used, the room left in the other, as a share of the fleet's capacity in it (online: mean of 200 points). Rules broken: every placement is rechecked by its own code (zone, capacity after overcommit, anti-affinity), every request must be decided exactly once, and N+1 is recomputed from scratch by the issue's definition at the end (static) and at 10 points plus the end (online); N+1 failures found at a point right after a departure are shown apart (first fit is not monotone: a departure can break an evacuation that no placement rule could have protected). Decision: the CPU time of the deciding thread during one `place_with` call, placed or refused (`CLOCK_THREAD_CPUTIME_ID`; the machine is shared with other builds, and its wall clock would count their time slices).",
            STRANDED_FULL * 100.0
        ),
    ]
}
