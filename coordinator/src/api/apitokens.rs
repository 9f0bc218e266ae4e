//! API tokens over the API: several, each named, with an optional expiry, revocable. The
//! secret is shown once, at creation; the coordinator keeps only its hash. The tokens live
//! in the store and, for the check every request makes, in `Coordinator::api_tokens`; both
//! change together, under that map's lock.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use tracing::info;
use zy_api::*;
use zy_common::ids::TokenId;
use zy_common::time::{now_millis, rfc3339};
use zy_common::token::{ApiToken, Secret};

use super::{ApiError, ApiResult, Shared};
use crate::store::{ApiTokenRecord, ApiTokenStatus};
use crate::Coordinator;

pub(super) fn view(t: &ApiTokenRecord, now: u64, caller: TokenId) -> ApiTokenView {
    ApiTokenView {
        id: t.id.to_string(),
        name: t.name.clone(),
        status: match t.status(now) {
            ApiTokenStatus::Valid => "valid",
            ApiTokenStatus::Expired => "expired",
            ApiTokenStatus::Revoked => "revoked",
        }
        .into(),
        created_at: rfc3339(t.created_at_ms),
        created_by: t.created_by.map(|c| c.to_string()),
        expires_at: t.expires_at_ms.map(rfc3339),
        revoked_at: t.revoked_at_ms.map(rfc3339),
        last_used_at: t.last_used_ms.map(rfc3339),
        current: t.id == caller,
    }
}

pub(super) async fn list(
    State(coord): Shared,
    axum::Extension(caller): axum::Extension<TokenId>,
) -> ApiResult<Vec<ApiTokenView>> {
    let now = now_millis();
    let mut tokens: Vec<ApiTokenRecord> = coord
        .api_tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    tokens.sort_by(|a, b| (a.created_at_ms, &a.name).cmp(&(b.created_at_ms, &b.name)));
    Ok(Json(tokens.iter().map(|t| view(t, now, caller)).collect()))
}

pub(super) async fn create(
    State(coord): Shared,
    axum::Extension(caller): axum::Extension<TokenId>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedApiToken>), ApiError> {
    let req: CreateApiToken = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad API token request: {e}")))?;
    zy_common::ids::validate_name(&req.name)
        .map_err(|e| ApiError::bad_request(format!("token name: {e}")))?;
    if let Some(s) = req.expires_in_secs {
        if !API_TOKEN_TTL_SECS.contains(&s) {
            return Err(ApiError::bad_request(format!(
                "expires_in_secs {s} is outside {}..={} (1 minute to 10 years)",
                API_TOKEN_TTL_SECS.start(),
                API_TOKEN_TTL_SECS.end()
            )));
        }
    }
    let now = now_millis();
    let token = ApiToken {
        id: TokenId::new_random(),
        secret: Secret::new_random(),
    };
    let rec = ApiTokenRecord {
        id: token.id,
        secret_hash: token.secret.hash(),
        name: req.name.clone(),
        created_at_ms: now,
        created_by: Some(caller),
        expires_at_ms: req.expires_in_secs.map(|s| now + s * 1000),
        revoked_at_ms: None,
        last_used_ms: None,
    };
    let r = rec.clone();
    with_tokens(&coord, move |coord, tokens| {
        if tokens
            .values()
            .any(|t| t.name == r.name && t.revoked_at_ms.is_none())
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "name_in_use",
                format!(
                    "an API token named `{}` exists; revoke it first or pick another name",
                    r.name
                ),
            ));
        }
        coord.store.insert_api_token(&r)?;
        tokens.insert(r.id, r);
        Ok(())
    })
    .await?;
    info!(token = %token.id, name = %rec.name, by = %caller, expires_at_ms = ?rec.expires_at_ms, "API token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiToken {
            id: token.id.to_string(),
            name: rec.name,
            token: token.to_string(),
            expires_at: rec.expires_at_ms.map(rfc3339),
        }),
    ))
}

pub(super) async fn revoke(
    State(coord): Shared,
    axum::Extension(caller): axum::Extension<TokenId>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<ApiTokenView> {
    let mut force = false;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("force", v)) => {
                force = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("force must be true or false"))?
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{}`: revoking takes force",
                    zy_common::ids::truncate_for_error(pair)
                )))
            }
        }
    }
    let now = now_millis();
    let rec = with_tokens(&coord, move |coord, tokens| {
        let by_id = key.parse::<TokenId>().ok();
        let found = tokens
            .values()
            .find(|t| Some(t.id) == by_id)
            .or_else(|| {
                tokens
                    .values()
                    .find(|t| t.name == key && t.revoked_at_ms.is_none())
            })
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no API token `{}`; `zy apitoken ls` lists them",
                    zy_common::ids::truncate_for_error(&key)
                ))
            })?;
        if found.revoked_at_ms.is_some() {
            return Ok(found);
        }
        let others_valid = tokens
            .values()
            .filter(|t| t.id != found.id && t.status(now) == ApiTokenStatus::Valid)
            .count();
        if others_valid == 0 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "last_token",
                format!(
                    "`{}` is the last valid API token: revoking it would lock everyone out; create another first",
                    found.name
                ),
            ));
        }
        if found.id == caller && !force {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "own_token",
                format!(
                    "`{}` is the token this request is made with; revoke it with --force (force=true) if you mean it",
                    found.name
                ),
            ));
        }
        let rec = coord
            .store
            .revoke_api_token(found.id, now)?
            .ok_or_else(|| ApiError::internal("the token vanished from the store"))?;
        tokens.insert(rec.id, rec.clone());
        Ok(rec)
    })
    .await?;
    info!(token = %rec.id, name = %rec.name, by = %caller, "API token revoked");
    Ok(Json(view(&rec, now, caller)))
}

/// Runs `f` on the token map under its write lock, on the blocking pool (it writes the
/// store): checks and writes of token administration are serialised, so two requests cannot
/// both take a name or both revoke the second-to-last token.
async fn with_tokens<T: Send + 'static>(
    coord: &Arc<Coordinator>,
    f: impl FnOnce(
            &Coordinator,
            &mut std::collections::HashMap<TokenId, ApiTokenRecord>,
        ) -> Result<T, ApiError>
        + Send
        + 'static,
) -> Result<T, ApiError> {
    let coord = coord.clone();
    tokio::task::spawn_blocking(move || {
        let mut tokens = coord.api_tokens.write().unwrap_or_else(|p| p.into_inner());
        f(&coord, &mut tokens)
    })
    .await
    .map_err(ApiError::internal)?
}

/// `GET /v1/ca`.
pub(super) async fn show_ca(State(coord): Shared) -> ApiResult<CaView> {
    let now = now_millis();
    let view = |der: &[u8]| -> Result<CertView, ApiError> {
        let i = zy_common::tls::CertInfo::parse(der).map_err(ApiError::internal)?;
        Ok(CertView {
            subject: i.subject.clone(),
            serial: i.serial.clone(),
            fingerprint: i.fingerprint.to_string(),
            sans: i.sans.clone(),
            not_before: rfc3339(i.not_before_ms),
            not_after: rfc3339(i.not_after_ms),
            not_after_ms: i.not_after_ms,
            days_left: (i.not_after_ms as i64 - now as i64).div_euclid(86_400_000),
        })
    };
    let server_der = coord.server_cert.leaf();
    let server = zy_common::tls::CertInfo::parse(&server_der).map_err(ApiError::internal)?;
    Ok(Json(CaView {
        ca: view(coord.ca.cert_der())?,
        server: view(&server_der)?,
        server_renews_at: rfc3339(zy_common::tls::renew_at_ms(
            server.not_before_ms,
            server.not_after_ms,
            0.0,
        )),
        node_validity_secs: coord.config.certs.node_validity.as_secs(),
        server_validity_secs: coord.config.certs.server_validity.as_secs(),
    }))
}
