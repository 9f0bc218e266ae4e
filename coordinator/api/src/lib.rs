//! The wire types of the coordinator's HTTPS JSON API: the bodies the coordinator sends and
//! takes, shared by its handlers and by every client (the `zy` CLI, the lab tests). One
//! definition for both sides, so they cannot drift apart. Described for outsiders by the
//! coordinator's `openapi.json` (served at `/v1/openapi.json`), which a coordinator test
//! keeps in step with the router.
//!
//! It owns serde types and the pure rules a body must follow, nothing else. It must never
//! depend on the coordinator's store, fleet or HTTP server, nor do I/O: a client that links
//! it gets types, not a daemon.

use serde::{Deserialize, Serialize};

mod certs;
mod events;
mod images;
mod nodes;
mod ops;
mod plan;
mod tokens;
mod vms;

pub use certs::*;
pub use events::*;
pub use images::*;
pub use nodes::*;
pub use ops::*;
pub use plan::*;
pub use tokens::*;
pub use vms::*;

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
