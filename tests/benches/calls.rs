//! The dead-node benchmark: how soon a call the coordinator has pending on a node fails
//! once the node's session ends, end to end through the API. Run as root (the lab builds
//! network namespaces), after building the binaries:
//!
//! ```text
//! cargo bench -p zy-lab --bench calls     # also run by scripts/bench.sh
//! ```
//!
//! A lab site with one enrolled node whose "agent" is the bench itself (a real QUIC
//! connection with the node's certificate, speaking the protocol): `zy node ping n1` sends
//! the node a `Ping`, which the bench reads and never answers; then the session ends, either
//! because the node closes its connection or because it connects again (a restarted agent:
//! the new session replaces the old). The figure is the time from that moment to `zy`'s
//! exit with the coordinator's "node disconnected" answer. No figure is asserted.
//!
//! | variable               | default | meaning                                  |
//! |------------------------|---------|------------------------------------------|
//! | `ZY_BENCH_CALLS_ROUNDS`| 20      | rounds of each kind                      |
//! | `ZY_BENCH_WRITE`       | 1       | 0 to leave docs/PERFORMANCE.md alone     |

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use zy_common::proto::Message;
use zy_common::time::now_millis;
use zy_common::wire;
use zy_lab::bench::{
    dist, docs_wanted, env_overrides, env_u64, DocSection, Machine, Results, SectionHead,
};
use zy_lab::peer::{connect_as_node, endpoint_in};
use zy_lab::site::Site;

const DOCS: DocSection<'static> = DocSection {
    name: "calls",
    after: Some("storm"),
    preamble: "Measured figures of Zhengyun. The sections between the `bench:` markers are written by the benchmarks (`scripts/bench.sh`); the rest of this file is free text.",
    only_var: "ZY_BENCH_CALLS_ROUNDS",
};

#[derive(Clone, Copy, Debug)]
enum End {
    /// The node closes its connection.
    Close,
    /// The node connects again; the new session replaces the one the call is pending on.
    Reconnect,
}

/// One round: a ping left pending, the session ended; ms from the end to zy's answer.
fn round(site: &Site, rt: &tokio::runtime::Runtime, how: End) -> Result<f64> {
    let ep = {
        let _in_runtime = rt.enter();
        endpoint_in(&site.lab, &site.lab.node_ns(1), None, 0)
    };
    let (conn, v, send, mut recv) =
        rt.block_on(connect_as_node(site, &ep, 1, zy_common::Zone::Intranet));
    std::thread::scope(|s| {
        let ping = s.spawn(|| {
            let out = site.zy(&["node", "ping", "n1"]);
            (Instant::now(), out)
        });
        // The call is pending once the node has it.
        let got = rt.block_on(async {
            let mut buf = Vec::new();
            tokio::time::timeout(
                Duration::from_secs(10),
                wire::read_frame::<Message, _>(&mut recv, v, wire::MAX_BODY, &mut buf),
            )
            .await
        });
        match got {
            Ok(Ok(Message::Command(_))) => {}
            other => bail!("expected the ping, got {other:?}"),
        }
        let t0 = Instant::now();
        let replacement = match how {
            End::Close => {
                conn.close(0u32.into(), b"bench");
                None
            }
            End::Reconnect => {
                Some(rt.block_on(connect_as_node(site, &ep, 1, zy_common::Zone::Intranet)))
            }
        };
        let (t1, out) = ping.join().expect("ping thread");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains("disconnected") {
            bail!("the ping did not fail with \"disconnected\": {err}");
        }
        drop((send, replacement));
        conn.close(0u32.into(), b"bench");
        Ok(t1.duration_since(t0).as_secs_f64() * 1000.0)
    })
}

fn main() {
    let rounds = env_u64("ZY_BENCH_CALLS_ROUNDS").unwrap_or(20).max(1) as usize;
    let m = Machine::read();
    let started = now_millis();
    let t0 = Instant::now();
    println!("dead-node calls bench on {}", m.describe());
    let mut res = Results::new(70, 52);
    let r = (|| -> Result<()> {
        let site = Site::new(1)?;
        site.join(1, "intranet")?;
        // Its own thread drives the QUIC endpoint while the bench waits on `zy`.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        for (how, what) in [
            (End::Close, "the node closes its connection"),
            (End::Reconnect, "the node connects again"),
        ] {
            let mut ms = Vec::new();
            for _ in 0..rounds {
                ms.push(round(&site, &rt, how)?);
            }
            println!("[calls] {what}: {ms:?}");
            res.row(
                format!("Pending call fails after {what}"),
                dist(&ms),
                "< 1 s",
            );
        }
        Ok(())
    })();
    if let Err(e) = r {
        eprintln!("[calls] failed: {e:#}");
        res.row(
            "Pending calls on a dead node",
            format!("failed: {e:#}"),
            "—",
        );
    }
    let overrides = env_overrides(|k| k.starts_with("ZY_BENCH_CALLS") || k == "ZY_BENCH_WRITE");
    let head = SectionHead {
        title: "Calls to a node whose session ends",
        bench: "calls",
        machine: &m,
        more_machine: vec![],
        started_ms: started,
        took: t0.elapsed(),
        command: "`cargo bench -p zy-lab --bench calls` as root, after `cargo build --profile dist --bins` (the binaries as deployed: see docs/operations.md) (both run by `scripts/bench.sh`)",
        overrides: &overrides,
        settings: format!("{rounds} rounds of each kind, one at a time."),
    };
    let method = [
        "A lab site (network namespaces, the real `zy-coordinator` and `zy`) with one node enrolled by `zy-agent join`, whose agent is the bench: a QUIC connection from the node's namespace with the node's certificate, through preamble, Hello and Welcome. Each round connects anew, runs `zy node ping n1` on a thread (the coordinator sends the node a `Ping` with its 5 s command timeout), reads the `Ping` off the control stream so that the call is surely pending, and never answers it. Then it ends the session: **closes its connection** (QUIC CONNECTION_CLOSE, as an agent that stops does), or **connects again** (as a restarted agent does; the coordinator replaces the old session). The figure runs from that moment to `zy`'s exit with the coordinator's answer (HTTP 409 `node disconnected`, checked), so it includes the coordinator noticing the end, failing every call pending on the session at once, the HTTP answer and `zy` printing it. An agent that vanishes without a word is noticed at the QUIC idle timeout (5 s), and its pending calls then fail the same way.\n".to_string(),
    ];
    let text = head.text(&res, &method);
    DOCS.publish(
        &text,
        docs_wanted(std::env::var_os("ZY_BENCH_CALLS_ROUNDS").is_none()),
    );
}
