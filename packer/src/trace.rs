//! The trace format of `zy-coordinator pack` (issue 9, item 2) and its output, so that
//! anyone can judge the packer on their own traces.
//!
//! ```text
//! {"meta": {...free-form...},
//!  "policy": {"cpu_overcommit": 4.0, "n_plus_one": true},
//!  "horizon": null | 400.0,
//!  "nodes": [{"id", "zone", "rack", "vcpus", "memory_mib", "disk_gib", "model"}],
//!  "requests": [{"id", "zone", "vcpus", "memory_mib", "disk_gib",
//!                "anti_affinity": null | "group", "arrive": 0, "depart": null | 152.3}]}
//! ```
//!
//! Parsing is pure (from a `&str`) and strict: any field not listed here is refused, except
//! inside `meta` (free-form) and a node's `model` (informational, never read). After serde,
//! [`Trace::parse`] validates everything and names the field and the id of what is wrong.
//!
//! Policy: `cpu_overcommit` (default 4.0) and `n_plus_one` (default true) as the issue
//! writes them; `memory_overcommit` and `disk_overcommit` (default 1.0) may be given too.
//! Each ratio goes through [`Overcommit::from_ratios`] (0.1 to 16).
//!
//! Units: `vcpus` may be fractional (the Azure packing trace gives demands as fractions of a
//! machine): it becomes milli-vCPUs, `vcpus * 1000` rounded to the nearest integer; a
//! request must ask for at least one milli-vCPU after rounding. `memory_mib` and `disk_gib`
//! are whole numbers (a fraction is refused rather than silently rounded). A request asks
//! for more than zero vCPUs and memory, and zero or more disk; a node has more than zero of
//! each of vCPUs and memory. Bounds (per node or request): at most [`MAX_VCPUS`] vCPUs,
//! [`MAX_MEMORY_MIB`] MiB, [`MAX_DISK_GIB`] GiB; times are finite and at most [`MAX_TIME`].
//!
//! Times: a **static** trace has every `arrive` 0 and every `depart` null; any other trace
//! is **online**. `depart` must be later than `arrive`. `horizon` (online only matters) is
//! null (then the last arrival or departure) or a finite number above 0, no earlier than the
//! last arrival.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::{NodeSpec, NodeState, Overcommit, Policy, Request, Res, Spread, CPU, DISK, MEM};

/// The most vCPUs one node or request may have.
pub const MAX_VCPUS: f64 = 1_048_576.0;
/// The most memory one node or request may have: 1 PiB.
pub const MAX_MEMORY_MIB: f64 = 1_073_741_824.0;
/// The most disk one node or request may have: 1 EiB.
pub const MAX_DISK_GIB: f64 = 1_073_741_824.0;
/// The latest time a trace may name (about 31 years of seconds).
pub const MAX_TIME: f64 = 1e9;
/// The longest id or name.
pub const MAX_ID_LEN: usize = 256;

/// The trace as written (serde's view; [`Trace::parse`] validates it into a [`Trace`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TraceFile {
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub meta: serde_json::Value,
    #[serde(default)]
    pub policy: PolicyFile,
    #[serde(default)]
    pub horizon: Option<f64>,
    pub nodes: Vec<NodeFile>,
    pub requests: Vec<RequestFile>,
}

/// `policy` as written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default = "four")]
    pub cpu_overcommit: f64,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub memory_overcommit: f64,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub disk_overcommit: f64,
    #[serde(default = "yes")]
    pub n_plus_one: bool,
}

fn four() -> f64 {
    4.0
}
fn one() -> f64 {
    1.0
}
fn is_one(v: &f64) -> bool {
    *v == 1.0
}
fn yes() -> bool {
    true
}

impl Default for PolicyFile {
    fn default() -> Self {
        PolicyFile {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            disk_overcommit: 1.0,
            n_plus_one: true,
        }
    }
}

/// A node as written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub id: String,
    pub zone: String,
    #[serde(default)]
    pub rack: Option<String>,
    pub vcpus: f64,
    pub memory_mib: f64,
    pub disk_gib: f64,
    /// Informational: any JSON value, never read.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub model: serde_json::Value,
}

/// A request as written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestFile {
    pub id: String,
    pub zone: String,
    pub vcpus: f64,
    pub memory_mib: f64,
    pub disk_gib: f64,
    #[serde(default)]
    pub anti_affinity: Option<String>,
    pub arrive: f64,
    #[serde(default)]
    pub depart: Option<f64>,
}

/// A node of a validated trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceNode {
    pub id: String,
    pub zone: String,
    pub rack: Option<String>,
    /// Raw capacity (before overcommit): milli-vCPUs, MiB, GiB.
    pub capacity: Res,
    pub model: serde_json::Value,
}

/// A request of a validated trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRequest {
    pub id: String,
    pub zone: String,
    /// milli-vCPUs, MiB, GiB.
    pub demand: Res,
    pub anti_affinity: Option<String>,
    pub arrive: f64,
    pub depart: Option<f64>,
}

/// A validated trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub meta: serde_json::Value,
    pub policy: Policy,
    /// As written (`None`: null).
    pub horizon: Option<f64>,
    pub nodes: Vec<TraceNode>,
    pub requests: Vec<TraceRequest>,
}

/// What is wrong with a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("the trace is not JSON of the trace format")]
    Json(#[source] serde_json::Error),
    #[error("{what} `{id}`: {field} {problem}")]
    Field {
        what: &'static str,
        id: String,
        field: &'static str,
        problem: String,
    },
    #[error("{what} {index}: id {problem}")]
    Id {
        what: &'static str,
        index: usize,
        problem: &'static str,
    },
    #[error("two {what}s have the id `{id}`")]
    Duplicate { what: &'static str, id: String },
    #[error("request `{request}`: no node is in its zone `{zone}`")]
    UnknownZone { request: String, zone: String },
    #[error("horizon {0}")]
    Horizon(String),
    #[error("policy: bad overcommit")]
    Policy(#[source] crate::Error),
}

impl Trace {
    /// Parses and validates a trace.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let file: TraceFile = serde_json::from_str(text).map_err(TraceError::Json)?;
        Trace::validate(file)
    }

    /// Validates a trace as serde read it.
    pub fn validate(file: TraceFile) -> Result<Trace, TraceError> {
        let p = &file.policy;
        let overcommit =
            Overcommit::from_ratios([p.cpu_overcommit, p.memory_overcommit, p.disk_overcommit])
                .map_err(TraceError::Policy)?;
        let policy = Policy {
            overcommit,
            n_plus_one: p.n_plus_one,
        };
        let mut ids = HashSet::new();
        let mut zones = HashSet::new();
        let mut nodes = Vec::with_capacity(file.nodes.len());
        for (i, n) in file.nodes.into_iter().enumerate() {
            check_id("node", i, &n.id)?;
            let field = |field, problem: String| TraceError::Field {
                what: "node",
                id: n.id.clone(),
                field,
                problem,
            };
            if n.zone.is_empty() || n.zone.len() > MAX_ID_LEN {
                return Err(field("zone", "must be a name of 1 to 256 bytes".into()));
            }
            if let Some(r) = &n.rack {
                if r.is_empty() || r.len() > MAX_ID_LEN {
                    return Err(field(
                        "rack",
                        "must be null or a name of 1 to 256 bytes".into(),
                    ));
                }
            }
            let cpu = vcpus_milli(n.vcpus, true).map_err(|p| field("vcpus", p))?;
            let mem =
                whole(n.memory_mib, MAX_MEMORY_MIB, true).map_err(|p| field("memory_mib", p))?;
            let disk = whole(n.disk_gib, MAX_DISK_GIB, false).map_err(|p| field("disk_gib", p))?;
            if !ids.insert(n.id.clone()) {
                return Err(TraceError::Duplicate {
                    what: "node",
                    id: n.id,
                });
            }
            zones.insert(n.zone.clone());
            nodes.push(TraceNode {
                id: n.id,
                zone: n.zone,
                rack: n.rack,
                capacity: Res::new(cpu, mem, disk),
                model: n.model,
            });
        }
        let mut rids = HashSet::new();
        let mut requests = Vec::with_capacity(file.requests.len());
        let mut last_arrival = 0.0f64;
        for (i, r) in file.requests.into_iter().enumerate() {
            check_id("request", i, &r.id)?;
            let field = |field, problem: String| TraceError::Field {
                what: "request",
                id: r.id.clone(),
                field,
                problem,
            };
            let cpu = vcpus_milli(r.vcpus, true).map_err(|p| field("vcpus", p))?;
            let mem =
                whole(r.memory_mib, MAX_MEMORY_MIB, true).map_err(|p| field("memory_mib", p))?;
            let disk = whole(r.disk_gib, MAX_DISK_GIB, false).map_err(|p| field("disk_gib", p))?;
            if let Some(g) = &r.anti_affinity {
                if g.is_empty() || g.len() > MAX_ID_LEN {
                    return Err(field(
                        "anti_affinity",
                        "must be null or a group name of 1 to 256 bytes".into(),
                    ));
                }
            }
            if !r.arrive.is_finite() || r.arrive < 0.0 || r.arrive > MAX_TIME {
                return Err(field(
                    "arrive",
                    format!("must be a time from 0 to {MAX_TIME}, not {}", r.arrive),
                ));
            }
            if let Some(d) = r.depart {
                if !d.is_finite() || d > MAX_TIME {
                    return Err(field(
                        "depart",
                        format!("must be null or a time up to {MAX_TIME}, not {d}"),
                    ));
                }
                if d <= r.arrive {
                    return Err(field(
                        "depart",
                        format!("{d} is not after its arrive {}", r.arrive),
                    ));
                }
            }
            if !zones.contains(&r.zone) {
                return Err(TraceError::UnknownZone {
                    request: r.id,
                    zone: r.zone,
                });
            }
            if !rids.insert(r.id.clone()) {
                return Err(TraceError::Duplicate {
                    what: "request",
                    id: r.id,
                });
            }
            last_arrival = last_arrival.max(r.arrive);
            requests.push(TraceRequest {
                id: r.id,
                zone: r.zone,
                demand: Res::new(cpu, mem, disk),
                anti_affinity: r.anti_affinity,
                arrive: r.arrive,
                depart: r.depart,
            });
        }
        if let Some(h) = file.horizon {
            if !h.is_finite() || h <= 0.0 || h > MAX_TIME {
                return Err(TraceError::Horizon(format!(
                    "must be null or a time above 0 and up to {MAX_TIME}, not {h}"
                )));
            }
            if h < last_arrival {
                return Err(TraceError::Horizon(format!(
                    "{h} is before the last arrival ({last_arrival})"
                )));
            }
        }
        Ok(Trace {
            meta: file.meta,
            policy,
            horizon: file.horizon,
            nodes,
            requests,
        })
    }

    /// Whether every request arrives at 0 and never departs (the packer may reorder it).
    pub fn is_static(&self) -> bool {
        self.requests
            .iter()
            .all(|r| r.arrive == 0.0 && r.depart.is_none())
    }

    /// The end of the time the online metrics average over: the horizon, or else the last
    /// arrival or departure.
    pub fn end(&self) -> f64 {
        self.horizon.unwrap_or_else(|| {
            self.requests
                .iter()
                .map(|r| r.depart.unwrap_or(r.arrive))
                .fold(0.0, f64::max)
        })
    }

    /// The node as the packer takes it (Ready; the policy's overcommit).
    pub fn node_spec(&self, i: usize) -> NodeSpec {
        let n = &self.nodes[i];
        NodeSpec {
            name: n.id.clone(),
            zone: n.zone.clone(),
            rack: n.rack.clone(),
            capacity: n.capacity,
            state: NodeState::Ready,
            overcommit: None,
        }
    }

    /// The request as the packer takes it (host spread, priority 0).
    pub fn request(&self, i: usize) -> Request {
        let r = &self.requests[i];
        Request {
            zone: r.zone.clone(),
            demand: r.demand,
            group: r.anti_affinity.clone(),
            spread: Spread::Host,
            priority: 0,
        }
    }

    /// Back to the written form (for the generator's dumps).
    pub fn to_file(&self) -> TraceFile {
        let o = self.policy.overcommit.0;
        TraceFile {
            meta: self.meta.clone(),
            policy: PolicyFile {
                cpu_overcommit: f64::from(o[CPU]) / 1000.0,
                memory_overcommit: f64::from(o[MEM]) / 1000.0,
                disk_overcommit: f64::from(o[DISK]) / 1000.0,
                n_plus_one: self.policy.n_plus_one,
            },
            horizon: self.horizon,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeFile {
                    id: n.id.clone(),
                    zone: n.zone.clone(),
                    rack: n.rack.clone(),
                    vcpus: n.capacity.cpu_milli() as f64 / 1000.0,
                    memory_mib: n.capacity.mem_mib() as f64,
                    disk_gib: n.capacity.disk_gib() as f64,
                    model: n.model.clone(),
                })
                .collect(),
            requests: self
                .requests
                .iter()
                .map(|r| RequestFile {
                    id: r.id.clone(),
                    zone: r.zone.clone(),
                    vcpus: r.demand.cpu_milli() as f64 / 1000.0,
                    memory_mib: r.demand.mem_mib() as f64,
                    disk_gib: r.demand.disk_gib() as f64,
                    anti_affinity: r.anti_affinity.clone(),
                    arrive: r.arrive,
                    depart: r.depart,
                })
                .collect(),
        }
    }

    /// The trace as JSON, in the form [`Trace::parse`] reads.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.to_file()).expect("a trace serialises")
    }
}

fn check_id(what: &'static str, index: usize, id: &str) -> Result<(), TraceError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(TraceError::Id {
            what,
            index,
            problem: "must be 1 to 256 bytes",
        });
    }
    if id.chars().any(char::is_control) {
        return Err(TraceError::Id {
            what,
            index,
            problem: "must not hold control characters",
        });
    }
    Ok(())
}

fn vcpus_milli(v: f64, positive: bool) -> Result<u64, String> {
    if !v.is_finite() || !(0.0..=MAX_VCPUS).contains(&v) {
        return Err(format!("must be a number from 0 to {MAX_VCPUS}, not {v}"));
    }
    let m = (v * 1000.0).round();
    if positive && m < 1.0 {
        return Err(format!("must be at least 0.001 (one milli-vCPU), not {v}"));
    }
    Ok(m as u64)
}

fn whole(v: f64, max: f64, positive: bool) -> Result<u64, String> {
    if !v.is_finite() || !(0.0..=max).contains(&v) {
        return Err(format!("must be a whole number from 0 to {max}, not {v}"));
    }
    if v.fract() != 0.0 {
        return Err(format!("must be a whole number, not {v}"));
    }
    if positive && v == 0.0 {
        return Err("must be more than 0".into());
    }
    Ok(v as u64)
}

/// One placement of `PLACEMENTS.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlacementOut {
    pub request: String,
    pub node: String,
}

/// `meta` of `PLACEMENTS.json`: the issue's three fields and a few more.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlacementsMeta {
    pub packer: String,
    pub decision_us_mean: f64,
    pub decision_us_p99: f64,
    pub decision_us_p50: f64,
    /// `static` or `online`.
    pub mode: String,
    /// Whether the packer decided a static trace in another order than the trace's
    /// (`placements` is in the order decided).
    pub reordered: bool,
}

/// `PLACEMENTS.json`: every request exactly once, in `placements` or in `rejected`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Placements {
    pub placements: Vec<PlacementOut>,
    pub rejected: Vec<String>,
    pub meta: PlacementsMeta,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "meta": {"anything": [1, 2, {"x": null}]},
            "policy": {"cpu_overcommit": 4.0, "n_plus_one": true},
            "horizon": null,
            "nodes": [
                {"id": "n1", "zone": "intranet", "rack": "r1", "vcpus": 32, "memory_mib": 262144, "disk_gib": 4000, "model": "R740"},
                {"id": "n2", "zone": "intranet", "rack": null, "vcpus": 32, "memory_mib": 262144, "disk_gib": 4000, "model": {"free": "form"}}
            ],
            "requests": [
                {"id": "a", "zone": "intranet", "vcpus": 0.5, "memory_mib": 1024, "disk_gib": 0, "anti_affinity": null, "arrive": 0, "depart": null},
                {"id": "b", "zone": "intranet", "vcpus": 1.2345, "memory_mib": 2048, "disk_gib": 20, "anti_affinity": "g", "arrive": 0, "depart": null}
            ]
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Trace, TraceError> {
        Trace::parse(&v.to_string())
    }

    fn err(v: &serde_json::Value) -> String {
        match parse(v) {
            Ok(_) => panic!("accepted {v}"),
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    s.push_str(": ");
                    s.push_str(&c.to_string());
                    src = c.source();
                }
                s
            }
        }
    }

    #[test]
    fn a_good_trace_parses_in_the_packers_units() {
        let t = parse(&base()).unwrap();
        assert!(t.is_static());
        assert_eq!(t.nodes[0].capacity, Res::new(32_000, 262_144, 4000));
        assert_eq!(t.requests[0].demand, Res::new(500, 1024, 0));
        // 1.2345 vCPUs round to the nearest milli-vCPU.
        assert_eq!(t.requests[1].demand.cpu_milli(), 1235);
        assert_eq!(t.policy.overcommit, Overcommit([4000, 1000, 1000]));
        assert_eq!(t.requests[1].anti_affinity.as_deref(), Some("g"));
        // And back: the written form parses to the same trace.
        assert_eq!(Trace::parse(&t.to_json()).unwrap(), t);
    }

    #[test]
    fn defaults_and_online_traces() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("policy");
        v.as_object_mut().unwrap().remove("meta");
        v["requests"][1]["arrive"] = 5.0.into();
        v["requests"][1]["depart"] = 7.5.into();
        let t = parse(&v).unwrap();
        assert_eq!(t.policy, Policy::default());
        assert!(!t.is_static());
        assert_eq!(t.end(), 7.5);
    }

    #[test]
    fn every_kind_of_bad_input_names_its_field_and_id() {
        type Edit = fn(&mut serde_json::Value);
        let cases: Vec<(Edit, &str)> = vec![
            (|v| v["extra"] = 1.into(), "unknown field `extra`"),
            (|v| v["nodes"][0]["cpu"] = 1.into(), "unknown field `cpu`"),
            (
                |v| v["requests"][0]["prio"] = 1.into(),
                "unknown field `prio`",
            ),
            (|v| v["policy"]["mem"] = 1.into(), "unknown field `mem`"),
            (
                |v| v["nodes"][1]["id"] = "n1".into(),
                "two nodes have the id `n1`",
            ),
            (
                |v| v["requests"][1]["id"] = "a".into(),
                "two requests have the id `a`",
            ),
            (
                |v| v["requests"][0]["zone"] = "extranet".into(),
                "request `a`: no node is in its zone `extranet`",
            ),
            (
                |v| v["requests"][0]["vcpus"] = (-1.0).into(),
                "request `a`: vcpus must be a number",
            ),
            (
                |v| v["requests"][0]["vcpus"] = 0.0.into(),
                "request `a`: vcpus must be at least 0.001",
            ),
            (
                |v| v["requests"][0]["vcpus"] = 0.0004.into(),
                "request `a`: vcpus must be at least 0.001",
            ),
            (
                |v| v["nodes"][0]["vcpus"] = 1e300.into(),
                "node `n1`: vcpus must be a number from 0 to",
            ),
            (
                |v| v["requests"][1]["memory_mib"] = 0.into(),
                "request `b`: memory_mib must be more than 0",
            ),
            (
                |v| v["requests"][1]["memory_mib"] = 1.5.into(),
                "request `b`: memory_mib must be a whole number, not 1.5",
            ),
            (
                |v| v["nodes"][1]["memory_mib"] = 1e20.into(),
                "node `n2`: memory_mib must be a whole number from 0",
            ),
            (
                |v| v["requests"][1]["disk_gib"] = (-3).into(),
                "request `b`: disk_gib must be a whole number",
            ),
            (
                |v| v["requests"][0]["arrive"] = (-1).into(),
                "request `a`: arrive must be a time from 0",
            ),
            (
                |v| {
                    v["requests"][0]["arrive"] = 5.into();
                    v["requests"][0]["depart"] = 4.into();
                },
                "request `a`: depart 4 is not after its arrive 5",
            ),
            (
                |v| {
                    v["requests"][0]["arrive"] = 5.into();
                    v["requests"][0]["depart"] = 5.into();
                },
                "request `a`: depart 5 is not after its arrive 5",
            ),
            (
                |v| v["horizon"] = 0.into(),
                "horizon must be null or a time above 0",
            ),
            (
                |v| v["horizon"] = (-2.5).into(),
                "horizon must be null or a time above 0",
            ),
            (
                |v| {
                    v["requests"][0]["arrive"] = 50.into();
                    v["horizon"] = 10.into();
                },
                "horizon 10 is before the last arrival (50)",
            ),
            (
                |v| v["policy"]["cpu_overcommit"] = 0.into(),
                "vCPU overcommit must be a number from 0.1 to 16, not 0",
            ),
            (
                |v| v["policy"]["cpu_overcommit"] = 100.into(),
                "vCPU overcommit must be a number from 0.1 to 16, not 100",
            ),
            (
                |v| v["policy"]["memory_overcommit"] = (-1).into(),
                "memory overcommit must be",
            ),
            (
                |v| v["nodes"][0]["id"] = "".into(),
                "node 0: id must be 1 to 256 bytes",
            ),
            (
                |v| v["requests"][1]["id"] = "x\ny".into(),
                "request 1: id must not hold control characters",
            ),
            (
                |v| v["requests"][1]["anti_affinity"] = "".into(),
                "request `b`: anti_affinity must be null",
            ),
            (
                |v| v["nodes"][0]["zone"] = "".into(),
                "node `n1`: zone must be a name",
            ),
            (
                |v| v["nodes"][0]["vcpus"] = "many".into(),
                "not JSON of the trace format",
            ),
            (
                |v| {
                    v.as_object_mut().unwrap().remove("nodes");
                },
                "missing field `nodes`",
            ),
        ];
        for (edit, want) in cases {
            let mut v = base();
            edit(&mut v);
            let e = err(&v);
            assert!(e.contains(want), "{e:?} does not say {want:?}");
        }
        assert!(Trace::parse("{").is_err());
        assert!(Trace::parse("").is_err());
        assert!(Trace::parse("[]").is_err());
    }
}
