//! The site's live event stream: every membership change and every VM state change, as it
//! happens, to any number of `zy events` readers. Readers that fall behind lose the oldest
//! events (and are told how many), never slowing the coordinator.

use std::sync::Arc;

use axum::extract::State;
use tokio::sync::broadcast;
use zy_api::SiteEvent;

use crate::Coordinator;

/// Events kept for slow readers before they start losing them.
const BACKLOG: usize = 1024;

/// The broadcaster.
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<SiteEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Events {
    /// Publishes an event (dropped if nobody listens).
    pub fn publish(&self, kind: &str, id: String, name: String, state: String, detail: String) {
        let at_ms = zy_common::time::now_millis();
        let _ = self.tx.send(SiteEvent {
            at: zy_common::time::rfc3339(at_ms),
            at_ms,
            kind: kind.into(),
            id,
            name,
            state,
            detail,
        });
    }
}

/// `GET /v1/events`: newline-delimited JSON, one event a line, until the reader leaves.
pub async fn stream(State(coord): State<Arc<Coordinator>>) -> axum::response::Response {
    let rx = coord.events.tx.subscribe();
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = match rx.recv().await {
            Ok(ev) => serde_json::to_string(&ev).unwrap_or_default(),
            Err(broadcast::error::RecvError::Lagged(n)) => serde_json::json!({
                "kind": "lagged", "detail": format!("{n} events were dropped: this reader fell behind")
            })
            .to_string(),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((
            Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(line + "\n")),
            rx,
        ))
    });
    axum::response::Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(s))
        .unwrap_or_default()
}
