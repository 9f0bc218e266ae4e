//! Nodes over the API: list, show (with recent membership history), remove, ping.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use tracing::info;
use zy_api::*;
use zy_common::proto::{close, CommandKind, RefusalCode};
use zy_common::time::{now_millis, rfc3339};

use super::{ApiError, ApiResult, Shared};
use crate::fleet::{Kick, NodeLive, Refused};
use crate::Coordinator;

pub(super) fn view(coord: &Coordinator, n: &NodeLive) -> NodeView {
    NodeView {
        id: n.record.id,
        name: n.record.name.clone(),
        zone: n.record.zone,
        state: n.record.state.as_str().into(),
        state_since: rfc3339(n.record.state_since_ms),
        state_since_ms: n.record.state_since_ms,
        enrolled_at: rfc3339(n.record.enrolled_at_ms),
        last_seen_ms: n.last_report_ms,
        connected: n.session.is_some(),
        remote: n.session.as_ref().map(|s| s.remote.to_string()),
        inventory: n.record.inventory.clone(),
        load: n.load.clone(),
        connected_since_ms: n.connected_since_ms,
        cert: n.record.cert.as_ref().map(|c| NodeCertView {
            serial: c.serial.clone(),
            not_before: rfc3339(c.not_before_ms),
            not_after: rfc3339(c.not_after_ms),
            not_after_ms: c.not_after_ms,
        }),
        admin: n.record.admin.as_str().into(),
        admin_since_ms: n.record.admin_since_ms,
        admin_note: coord.nodeadmin.note_of(n.record.id),
    }
}

pub(super) fn find(coord: &Coordinator, key: &str) -> Result<NodeLive, ApiError> {
    coord.fleet.find(key).ok_or_else(|| {
        ApiError::not_found(format!(
            "no node `{}`; `zy node ls` lists them",
            zy_common::ids::truncate_for_error(key)
        ))
    })
}

pub(super) async fn list_nodes(State(coord): Shared) -> ApiResult<Vec<NodeView>> {
    Ok(Json(
        coord
            .fleet
            .snapshot()
            .iter()
            .map(|n| view(&coord, n))
            .collect(),
    ))
}

pub(super) async fn show_node(
    State(coord): Shared,
    Path(key): Path<String>,
) -> ApiResult<NodeDetail> {
    let n = find(&coord, &key)?;
    let store = coord.store.clone();
    let id = n.record.id;
    let (transitions, admin) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((
            store.transitions(id, 20)?,
            store.admin_transitions(id, 20)?,
        ))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(NodeDetail {
        node: view(&coord, &n),
        admin_transitions: admin
            .into_iter()
            .map(|t| TransitionView {
                from: t.from.as_str().into(),
                to: t.to.as_str().into(),
                at: rfc3339(t.at_ms),
                at_ms: t.at_ms,
                reason: t.reason,
            })
            .collect(),
        transitions: transitions
            .into_iter()
            .map(|t| TransitionView {
                from: t.from.as_str().into(),
                to: t.to.as_str().into(),
                at: rfc3339(t.at_ms),
                at_ms: t.at_ms,
                reason: t.reason,
            })
            .collect(),
    }))
}

pub(super) async fn remove_node(
    State(coord): Shared,
    Path(key): Path<String>,
) -> ApiResult<RemovedNode> {
    let n = find(&coord, &key)?;
    let id = n.record.id;
    // Its VMs would be orphans: they go first (a VM of a node that is away can be deleted).
    let vms = coord.vms.on_node(id);
    if !vms.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "node_has_vms",
            format!(
                "node {} holds {} VM(s): {}; delete them first (zy vm delete NAME works while the node is down)",
                n.record.name,
                vms.len(),
                vms.join(", ")
            ),
        ));
    }
    let store = coord.store.clone();
    let removed = tokio::task::spawn_blocking(move || store.remove_node(id, now_millis()))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("node {id} is already removed")))?;
    let session = coord.fleet.remove(id);
    let was_connected = session.is_some();
    if let Some(s) = session {
        s.kick(Kick {
            close_code: close::REFUSED,
            refusal: Some(Refused {
                code: RefusalCode::NodeRemoved,
                message: format!("node {id} was removed from this coordinator; to bring the server back, enroll it again with a new token (zy-agent join)"),
            }),
            reason: "node removed".into(),
        });
    }
    // Deletions waiting for this node end with it, and its zone's other nodes stop sending
    // its network's traffic to it: the reconciler sees it gone at its next tick.
    coord.vms.wake.notify_one();
    info!(node = %id, name = %removed.name, "node removed");
    Ok(Json(RemovedNode {
        id,
        name: removed.name,
        zone: removed.zone,
        was_connected,
    }))
}

pub(super) async fn ping_node(
    State(coord): Shared,
    Path(key): Path<String>,
) -> ApiResult<PingResult> {
    let n = find(&coord, &key)?;
    let session = coord.fleet.session(n.record.id).ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_connected",
            format!(
                "node {} is not connected (state {})",
                n.record.name, n.record.state
            ),
        )
    })?;
    let t0 = Instant::now();
    match session
        .command(CommandKind::Ping, Duration::from_secs(5))
        .await
    {
        Ok(_) => Ok(Json(PingResult {
            node: n.record.id,
            rtt_us: t0.elapsed().as_micros() as u64,
        })),
        Err(e) => Err(e.into()),
    }
}
