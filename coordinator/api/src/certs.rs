//! Certificates: the site CA, the coordinator's server certificate, and API tokens.

use serde::{Deserialize, Serialize};

/// A certificate as ops need to see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CertView {
    pub subject: String,
    /// Lower-case hex.
    pub serial: String,
    /// BLAKE3 of the DER (what bootstrap tokens pin, for the CA).
    pub fingerprint: String,
    /// DNS names and IP addresses it is valid for.
    pub sans: Vec<String>,
    pub not_before: String,
    pub not_after: String,
    pub not_after_ms: u64,
    /// Whole days until `not_after` (negative once expired).
    pub days_left: i64,
}

/// `GET /v1/ca`: the site's trust: its CA, the certificate the coordinator serves now, and
/// how long the certificates it issues last.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaView {
    pub ca: CertView,
    pub server: CertView,
    /// When the server certificate will be renewed (RFC 3339).
    pub server_renews_at: String,
    pub node_validity_secs: u64,
    pub server_validity_secs: u64,
}

/// A node's certificate in node listings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeCertView {
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub not_after_ms: u64,
}

/// `POST /v1/apitokens`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateApiToken {
    /// 1 to 63 of `a-z 0-9 -`, unique among the tokens not revoked.
    pub name: String,
    /// Lifetime in seconds (60 s to 10 years); none: it lasts until revoked.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// Bounds of an API token's lifetime, when it has one.
pub const API_TOKEN_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=3650 * 86_400;

/// A created API token: the only time its secret is shown.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CreatedApiToken {
    pub id: String,
    pub name: String,
    /// The whole bearer token, `zya1-...`.
    pub token: String,
    pub expires_at: Option<String>,
}

/// An API token in listings (never the secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ApiTokenView {
    pub id: String,
    pub name: String,
    /// `valid`, `expired` or `revoked`.
    pub status: String,
    pub created_at: String,
    /// The id of the token that created it (none: `zy-coordinator init`).
    pub created_by: Option<String>,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// Last use, to the minute.
    pub last_used_at: Option<String>,
    /// Whether it is the token of the request that asked.
    pub current: bool,
}
