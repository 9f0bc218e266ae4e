//! Consolidation plans: `GET /v1/plan/consolidate` (a plan, shown) and
//! `POST /v1/plan/consolidate` (a plan, carried out one migration at a time).

use serde::{Deserialize, Serialize};

/// What a consolidation plan may do; absent fields take the site's `[consolidation]`
/// settings. The query of the GET and the body of the POST.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsolidateRequest {
    /// Most migrations (1 to 1000).
    #[serde(default)]
    pub max_moves: Option<u32>,
    /// The least share of a node each move must win back (0.0 to 1.0).
    #[serde(default)]
    pub min_gain: Option<f64>,
}

/// One step of a plan.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlanStep {
    /// `move` or `standby`.
    pub kind: String,
    /// The VM a move takes (name), absent for a standby.
    pub vm: Option<String>,
    /// A move's source, or the node that stands by.
    pub from: String,
    /// A move's destination.
    pub to: Option<String>,
    /// The step in words.
    pub text: String,
}

/// A plan, and the run applying one, if any.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConsolidationView {
    /// The steps, in order; each keeps every rule on the state the ones before it left.
    pub steps: Vec<PlanStep>,
    /// The whole plan in words: the steps, then every goal considered and what became of it.
    pub text: String,
    /// The run carrying out a plan (the last one), if any since the coordinator started.
    pub run: Option<ConsolidationRun>,
}

/// A consolidation being carried out, or the last one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConsolidationRun {
    pub started_at_ms: u64,
    /// Still going.
    pub running: bool,
    /// The steps done so far, in words.
    pub done: Vec<String>,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}
