//! The site's live event stream (`GET /v1/events`): one JSON object a line.

use serde::{Deserialize, Serialize};

/// One event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SiteEvent {
    pub at: String,
    pub at_ms: u64,
    /// `node` or `vm`.
    pub kind: String,
    pub id: String,
    pub name: String,
    pub state: String,
    pub detail: String,
}
