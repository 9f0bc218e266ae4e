//! The reconnect-storm benchmark: how many peer updates the coordinator sends when every node
//! of a big site reconnects at once, all of them hosting VMs. It drives the reconciler's very
//! planning code (`zy_coordinator::vms::reconcile::plan_peers`, which the coordinator's
//! reconciler calls every tick) on a virtual clock, so a site of thousands of nodes with VMs
//! runs in a second on one machine; QUIC, the wire and the agents are measured by the spine
//! bench. No figure is asserted.
//!
//! ```text
//! cargo bench -p zy-lab --bench storm     # also run by scripts/bench.sh
//! ```
//!
//! | variable               | default   | meaning                                             |
//! |------------------------|-----------|-----------------------------------------------------|
//! | `ZY_BENCH_STORM_NODES` | 1000      | nodes, half in each zone, each hosting VMs           |
//! | `ZY_BENCH_STORM_VMS`   | 10        | VMs per node (they make every node a member of its zone's network) |
//! | `ZY_BENCH_WRITE`       | 1         | 0 to leave docs/PERFORMANCE.md alone                |

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zy_common::time::now_millis;
use zy_common::{NodeId, Zone};
use zy_coordinator::vms::reconcile::{
    peers_answered, plan_peers, PeerNode, PeerUpdate, State, PEERS_MAX_DELAY, PEERS_SETTLE, TICK,
};
use zy_lab::bench::{
    docs_wanted, env_overrides, env_u64, DocSection, Machine, Results, SectionHead,
};

const DOCS: DocSection<'static> = DocSection {
    name: "storm",
    after: Some("spine"),
    preamble: "Measured figures of Zhengyun. The sections between the `bench:` markers are written by the benchmarks (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_STORM_NODES",
};

/// How a run went.
#[derive(Debug, Default)]
struct Storm {
    /// Peer updates planned (each is one `SyncPeers` command to one node).
    updates: u64,
    /// Updates one per node per membership change would have sent: every reconnect told to
    /// every connected member of its zone.
    naive: u64,
    /// Virtual time from the first reconnect until no update was in flight or due.
    settled: Duration,
    /// Wall time the planning took, in all.
    planning: Duration,
    ticks: u64,
}

struct Site {
    nodes: Vec<PeerNode>,
    hosting: HashSet<NodeId>,
}

fn site(n: usize) -> Site {
    let nodes: Vec<PeerNode> = (0..n)
        .map(|i| PeerNode {
            id: NodeId(uuid::Uuid::from_u128(i as u128 + 1)),
            zone: if i % 2 == 0 {
                Zone::Intranet
            } else {
                Zone::Extranet
            },
            ip: Ipv4Addr::from(0x0a40_0000u32 + i as u32),
            session: 1,
        })
        .collect();
    let hosting = nodes.iter().map(|n| n.id).collect();
    Site { nodes, hosting }
}

/// Runs the reconciler's peer planning, one tick every [`TICK`], while node `i` comes back
/// (with a new session) at `back[i]` after the storm's start; every update is answered at
/// the next tick. `state` is what the reconciler kept (fresh after a coordinator restart).
fn run(site: &Site, state: &mut State, back: &[Duration], epoch0: u64) -> Storm {
    let t0 = Instant::now();
    let mut st = Storm::default();
    let before = state.peer_updates;
    let mut inflight: Vec<PeerUpdate> = Vec::new();
    let last_back = back.iter().max().copied().unwrap_or_default();
    let mut quiet_since: Option<Duration> = None;
    let mut at = Duration::ZERO;
    let mut counted = vec![false; site.nodes.len()];
    loop {
        let now = t0 + at;
        for u in inflight.drain(..) {
            peers_answered(state, u, true, now);
        }
        // Who is connected now, and on which session.
        let mut connected = Vec::with_capacity(site.nodes.len());
        let mut epoch = epoch0;
        for (i, n) in site.nodes.iter().enumerate() {
            if back[i] <= at {
                connected.push(PeerNode {
                    session: n.session + 1,
                    ..*n
                });
                epoch += 1;
                if !counted[i] {
                    counted[i] = true;
                    // A per-change update would tell every connected member of its zone.
                    st.naive += site
                        .nodes
                        .iter()
                        .enumerate()
                        .filter(|(j, m)| m.zone == n.zone && back[*j] <= back[i])
                        .count() as u64;
                }
            }
        }
        let p0 = Instant::now();
        let planned = plan_peers(state, epoch, &site.hosting, &connected, now);
        st.planning += p0.elapsed();
        st.ticks += 1;
        if planned.is_empty() && at >= last_back {
            let q = *quiet_since.get_or_insert(at);
            // Quiet for longer than any delay the planner may still hold an update for.
            if at - q > PEERS_MAX_DELAY * 2 {
                st.settled = q;
                break;
            }
        } else {
            quiet_since = None;
        }
        inflight = planned;
        at += TICK;
    }
    st.updates = state.peer_updates - before;
    st
}

/// A settled site whose node `k` alone comes back on a new session.
fn run_one(site: &Site, state: &mut State, k: usize) -> Storm {
    let t0 = Instant::now() + TICK * 400;
    let before = state.peer_updates;
    let mut connected: Vec<PeerNode> = site.nodes.clone();
    connected[k].session += 1;
    for i in 0..100u32 {
        let now = t0 + TICK * i;
        for u in plan_peers(state, 2, &site.hosting, &connected, now) {
            peers_answered(state, u, true, now);
        }
    }
    Storm {
        updates: state.peer_updates - before,
        ..Storm::default()
    }
}

/// A settled site: every node connected on session 1 and told its peers.
fn settled(site: &Site) -> State {
    let mut state = State::default();
    let connected: Vec<PeerNode> = site.nodes.clone();
    let t0 = Instant::now();
    for k in 0..200u32 {
        let now = t0 + TICK * k;
        let planned = plan_peers(&mut state, 1, &site.hosting, &connected, now);
        for u in planned {
            peers_answered(&mut state, u, true, now);
        }
    }
    state
}

fn main() {
    let n = env_u64("ZY_BENCH_STORM_NODES").unwrap_or(1000).max(2) as usize;
    let vms = env_u64("ZY_BENCH_STORM_VMS").unwrap_or(10).max(1);
    let m = Machine::read();
    let started = now_millis();
    let t0 = Instant::now();
    println!("reconnect-storm bench on {}", m.describe());
    let site = site(n);
    let mut res = Results::new(78, 52);
    let mut rng = StdRng::seed_from_u64(1);
    for (what, spread, restart) in [
        (
            "coordinator restart, all back within 2 s",
            Duration::from_secs(2),
            true,
        ),
        (
            "coordinator restart, all back within 15 s",
            Duration::from_secs(15),
            true,
        ),
        (
            "every agent reconnects within 2 s",
            Duration::from_secs(2),
            false,
        ),
        (
            "every agent reconnects within 15 s",
            Duration::from_secs(15),
            false,
        ),
    ] {
        let back: Vec<Duration> = (0..n)
            .map(|_| Duration::from_millis(rng.random_range(0..=spread.as_millis() as u64)))
            .collect();
        // After a restart the reconciler starts from nothing; an agent's reconnect finds it
        // holding what each node was told.
        let mut state = if restart {
            State::default()
        } else {
            settled(&site)
        };
        let s = run(&site, &mut state, &back, 1_000);
        println!("[storm] {what}: {s:?}");
        res.row(
            format!("{n} nodes × {vms} VMs, {what}: peer updates"),
            format!(
                "{} ({:.2} per node; one per change would send {})",
                s.updates,
                s.updates as f64 / n as f64,
                s.naive
            ),
            "O(nodes)",
        );
        res.row(
            format!("{n} nodes × {vms} VMs, {what}: settled after"),
            format!(
                "{:.2} s virtual ({} ticks planned in {:.1} ms of CPU)",
                s.settled.as_secs_f64(),
                s.ticks,
                s.planning.as_secs_f64() * 1000.0
            ),
            "—",
        );
    }
    // One agent restarts (its node quicker back than the site notices it gone): only its
    // session changes, and its zone is told again (which also repairs drifted members).
    {
        let mut state = settled(&site);
        let s = run_one(&site, &mut state, 0);
        println!("[storm] one agent reconnects: {s:?}");
        res.row(
            format!("{n} nodes × {vms} VMs, one agent reconnects: peer updates"),
            format!(
                "{} (its zone has {} nodes: each is told again once)",
                s.updates,
                n.div_ceil(2)
            ),
            "—",
        );
    }
    let overrides = env_overrides(|k| k.starts_with("ZY_BENCH_STORM") || k == "ZY_BENCH_WRITE");
    let head = SectionHead {
        title: "Reconnect storm: peer updates",
        bench: "storm",
        machine: &m,
        more_machine: vec![],
        started_ms: started,
        took: t0.elapsed(),
        command: "`cargo bench -p zy-lab --bench storm` (run by `scripts/bench.sh`)",
        overrides: &overrides,
        settings: format!(
            "{n} nodes, half in each zone, every one hosting {vms} VMs (so every one is a member of its zone's network); reconnect times drawn uniformly over the spread (seed 1)."
        ),
    };
    let method = [
        format!(
            "The reconciler's peer planning (`plan_peers` in `coordinator/src/vms/reconcile.rs`, the function the coordinator's reconciler calls every tick with the fleet's connected nodes) runs on a virtual clock, one tick every {} ms. At the storm's start every node is away; node i comes back with a new session at its drawn time. Each planned update is one `SyncPeers` command to one node, answered (taken) at the next tick. A coordinator restart starts the planner from nothing (it keeps no state on disk: the first settled membership goes to everyone); an agents' reconnect finds it holding what each node was last told on its old session (a new session is told again: its agent may have restarted). A zone's update waits until its membership is unchanged for {} ms, but no longer than {} s while it keeps changing. Settled: no update planned or in flight, with every node back, for twice the longest delay. **One per change** is what telling every connected member of the zone at each reconnect would send (the coordinator did that on every report before issue 7): the sum over reconnects of the zone's connected members, O(nodes²).\n",
            TICK.as_millis(),
            PEERS_SETTLE.as_millis(),
            PEERS_MAX_DELAY.as_secs()
        ),
        "The VMs matter only in that they make their nodes members of their zone's network (`hosting`); how many per node changes nothing in the count. The real QUIC path with many agents is the spine bench's (its simulated agents host no VMs, so it sees no peer updates).\n".to_string(),
    ];
    let text = head.text(&res, &method);
    DOCS.publish(&text, docs_wanted(true));
}
