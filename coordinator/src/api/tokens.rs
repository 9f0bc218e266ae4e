//! Bootstrap tokens over the API: made, listed and revoked by ops; each enrolls one node.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use tracing::info;
use zy_api::*;
use zy_common::ids::TokenId;
use zy_common::time::{now_millis, rfc3339};
use zy_common::token::{BootstrapToken, Secret};

use super::{ApiError, ApiResult, Shared};
use crate::store::TokenRecord;
use crate::Coordinator;

pub(super) fn token_view(coord: &Coordinator, t: &TokenRecord, now: u64) -> TokenView {
    TokenView {
        id: t.id.to_string(),
        zone: t.zone,
        status: serde_json::to_value(t.status(now))
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        created_at: rfc3339(t.created_at_ms),
        expires_at: rfc3339(t.expires_at_ms),
        expires_at_ms: t.expires_at_ms,
        used_by: t.used.map(|(n, _)| n),
        used_by_name: t.used.and_then(|(n, _)| coord.fleet.name_of(n)),
    }
}

pub(super) async fn list_tokens(State(coord): Shared) -> ApiResult<Vec<TokenView>> {
    let store = coord.store.clone();
    let mut tokens = tokio::task::spawn_blocking(move || store.tokens())
        .await
        .map_err(ApiError::internal)??;
    tokens.sort_by_key(|t| t.created_at_ms);
    let now = now_millis();
    Ok(Json(
        tokens.iter().map(|t| token_view(&coord, t, now)).collect(),
    ))
}

pub(super) async fn create_token(
    State(coord): Shared,
    axum::Extension(caller): axum::Extension<TokenId>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let req: CreateToken = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad token request: {e}")))?;
    if !TOKEN_TTL_SECS.contains(&req.ttl_secs) {
        return Err(ApiError::bad_request(format!(
            "ttl_secs {} is outside {}..={} (1 minute to 30 days)",
            req.ttl_secs,
            TOKEN_TTL_SECS.start(),
            TOKEN_TTL_SECS.end()
        )));
    }
    let now = now_millis();
    let token = BootstrapToken {
        id: TokenId::new_random(),
        secret: Secret::new_random(),
        ca: coord.ca.fingerprint(),
    };
    let rec = TokenRecord {
        id: token.id,
        secret_hash: token.secret.hash(),
        zone: req.zone,
        created_at_ms: now,
        expires_at_ms: now + req.ttl_secs * 1000,
        revoked_at_ms: None,
        used: None,
        created_by: caller,
    };
    let store = coord.store.clone();
    let r = rec.clone();
    tokio::task::spawn_blocking(move || store.insert_token(&r))
        .await
        .map_err(ApiError::internal)??;
    info!(token = %token.id, zone = %req.zone, ttl_secs = req.ttl_secs, "bootstrap token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: token.id.to_string(),
            token: token.to_string(),
            zone: req.zone,
            expires_at: rfc3339(rec.expires_at_ms),
            expires_at_ms: rec.expires_at_ms,
        }),
    ))
}

pub(super) async fn revoke_token(
    State(coord): Shared,
    Path(id): Path<String>,
) -> ApiResult<TokenView> {
    let id: TokenId = id
        .parse()
        .map_err(|e: zy_common::ids::IdError| ApiError::bad_request(e.to_string()))?;
    let store = coord.store.clone();
    let rec = tokio::task::spawn_blocking(move || store.revoke_token(id, now_millis()))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("no token {id}; `zy token ls` lists them")))?;
    info!(token = %id, "bootstrap token revoked");
    Ok(Json(token_view(&coord, &rec, now_millis())))
}
