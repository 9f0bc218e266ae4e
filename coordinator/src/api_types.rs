//! The JSON bodies of the HTTP API, shared by the server and the `zy` CLI. Described for
//! outsiders by `openapi.json`, which the coordinator serves at `/v1/openapi.json`.

use serde::{Deserialize, Serialize};
use zy_common::ids::{NodeId, Zone};
use zy_common::proto::{Inventory, LoadReport};

/// Every error the API returns: `{"error": {"code": ..., "message": ...}}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A machine-readable code and a sentence for people.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub site: String,
    pub uptime_secs: u64,
}

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
}

/// `GET /v1/nodes/{node}`: a node and its recent membership history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeDetail {
    #[serde(flatten)]
    pub node: NodeView,
    pub transitions: Vec<TransitionView>,
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

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub zone: Zone,
    /// Lifetime in seconds, 60..=2592000 (30 days).
    pub ttl_secs: u64,
}

/// Bounds of a bootstrap token's lifetime.
pub const TOKEN_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=30 * 86_400;

/// A created bootstrap token: the only time its secret is shown.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
    pub zone: Zone,
    pub expires_at: String,
    pub expires_at_ms: u64,
}

/// A bootstrap token in listings (never the secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenView {
    pub id: String,
    pub zone: Zone,
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    pub expires_at_ms: u64,
    pub used_by: Option<NodeId>,
}
