//! Nodes: the site's servers, their membership and their history.

use serde::{Deserialize, Serialize};
use zy_common::ids::{NodeId, Zone};
use zy_common::proto::{Inventory, LoadReport};

/// A node as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub state: String,
    /// When the node entered its state (RFC 3339) and the same in ms since the epoch.
    pub state_since: String,
    pub state_since_ms: u64,
    pub enrolled_at: String,
    /// Last report (ms since the epoch; 0 if never).
    pub last_seen_ms: u64,
    pub connected: bool,
    pub remote: Option<String>,
    pub inventory: Option<Inventory>,
    pub load: Option<LoadReport>,
    /// When its current connection was made (ms since the epoch), if it is connected: a
    /// link that dropped and came back shows a later time.
    #[serde(default)]
    pub connected_since_ms: Option<u64>,
    /// The certificate the node holds, as the coordinator last knew it.
    #[serde(default)]
    pub cert: Option<crate::NodeCertView>,
    /// What ops asked of it: active, draining, maintenance or standby. A standby node's
    /// silence is expected (its `state` stays as it was when it went down).
    #[serde(default = "active")]
    pub admin: String,
    /// Since when (ms since the epoch; 0: since enrollment).
    #[serde(default)]
    pub admin_since_ms: u64,
    /// What holds its drain back, or what its power driver last said, if anything.
    #[serde(default)]
    pub admin_note: Option<String>,
}

fn active() -> String {
    "active".into()
}

/// `GET /v1/nodes/{node}`: a node and its recent membership history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: NodeView,
    pub transitions: Vec<TransitionView>,
    /// Its recent changes of administrative state (drain, maintenance, standby, wake).
    #[serde(default)]
    pub admin_transitions: Vec<TransitionView>,
}

/// One membership change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TransitionView {
    pub from: String,
    pub to: String,
    pub at: String,
    pub at_ms: u64,
    pub reason: String,
}

/// `POST /v1/nodes/{node}/ping`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PingResult {
    pub node: NodeId,
    pub rtt_us: u64,
}

/// `DELETE /v1/nodes/{node}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RemovedNode {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub was_connected: bool,
}
