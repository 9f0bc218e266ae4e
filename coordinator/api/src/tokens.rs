//! Bootstrap tokens: how a server joins the site.

use serde::{Deserialize, Serialize};
use zy_common::ids::{NodeId, Zone};

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
    /// The name of the node it enrolled, while that node is enrolled.
    #[serde(default)]
    pub used_by_name: Option<String>,
}
