//! `zy-coordinator pack`: the real binary on small generated traces (static and online),
//! and its errors.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use zy_packer::gen::{self, Mix};
use zy_packer::trace::{Placements, Trace};

/// A directory of its own, removed when dropped (even when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("zy-pack-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pack(trace: &Path, out: &Path, packer: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zy-coordinator"));
    c.arg("pack")
        .arg("--trace")
        .arg(trace)
        .arg("--out")
        .arg(out);
    if let Some(p) = packer {
        c.arg("--packer").arg(p);
    }
    c.output().unwrap()
}

#[test]
fn a_generated_trace_round_trips_with_every_request_once() {
    let dir = TempDir::new("roundtrip");
    for (online, packer) in [
        (false, None),
        (true, Some("nomad-sampled")),
        (false, Some("k8s-most")),
    ] {
        let trace = gen::generate(Mix::Government, 20, online, 7);
        let tpath = dir.0.join("trace.json");
        let opath = dir.0.join("placements.json");
        std::fs::write(&tpath, trace.to_json()).unwrap();
        // What the binary reads is what was generated (times to within float printing).
        let read = Trace::parse(&std::fs::read_to_string(&tpath).unwrap()).unwrap();
        assert!(read.nodes == trace.nodes, "the nodes changed on the way");
        assert_eq!(read.requests.len(), trace.requests.len());
        for (a, b) in read.requests.iter().zip(&trace.requests) {
            assert!(a.id == b.id && a.demand == b.demand && a.anti_affinity == b.anti_affinity);
            assert!((a.arrive - b.arrive).abs() < 1e-9);
            assert_eq!(a.depart.is_some(), b.depart.is_some());
        }
        let o = pack(&tpath, &opath, packer);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out: Placements =
            serde_json::from_str(&std::fs::read_to_string(&opath).unwrap()).unwrap();
        assert_eq!(out.meta.packer, packer.unwrap_or("zhengyun"));
        assert_eq!(out.meta.mode, if online { "online" } else { "static" });
        let nodes: HashSet<&str> = trace.nodes.iter().map(|n| n.id.as_str()).collect();
        let mut seen = HashSet::new();
        for p in &out.placements {
            assert!(nodes.contains(p.node.as_str()), "unknown node {}", p.node);
            assert!(seen.insert(p.request.clone()), "{} twice", p.request);
        }
        for r in &out.rejected {
            assert!(seen.insert(r.clone()), "{r} twice");
        }
        let all: HashSet<String> = trace.requests.iter().map(|r| r.id.clone()).collect();
        assert_eq!(seen, all, "every request exactly once");
        assert!(!out.placements.is_empty());
    }
}

#[test]
fn bad_traces_and_packers_exit_non_zero_with_the_reason() {
    let dir = TempDir::new("bad");
    let tpath = dir.0.join("trace.json");
    let opath = dir.0.join("placements.json");
    let cases = [
        (
            r#"{"nodes": [], "requests": [], "x": 1}"#,
            None,
            "unknown field `x`",
        ),
        (
            r#"{"nodes": [{"id": "n", "zone": "z", "vcpus": 4, "memory_mib": 10, "disk_gib": 1}],
               "requests": [{"id": "r", "zone": "z", "vcpus": 1, "memory_mib": -5, "disk_gib": 1, "arrive": 0}]}"#,
            None,
            "request `r`: memory_mib must be a whole number",
        ),
        ("not json", None, "not JSON of the trace format"),
        (
            r#"{"nodes": [], "requests": []}"#,
            Some("best"),
            "no packer `best`",
        ),
    ];
    for (text, packer, want) in cases {
        std::fs::write(&tpath, text).unwrap();
        let o = pack(&tpath, &opath, packer);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text} was accepted");
        assert!(err.contains(want), "{err:?} does not say {want:?}");
        assert!(!opath.exists(), "nothing is written for a bad trace");
    }
    let o = pack(&dir.0.join("missing.json"), &opath, None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read the trace"));
}
