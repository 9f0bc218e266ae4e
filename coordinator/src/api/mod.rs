//! The HTTP JSON API: what `zy` and any other client drive the site with.
//!
//! Every route but `/v1/health` and `/v1/openapi.json` needs `Authorization: Bearer <API
//! token>`. Paths are versioned (`/v1`) and leave room for a tenant scope
//! (`/v1/tenants/{tenant}/...`) beside the site-wide ones used by ops.
//! Errors are always `{"error": {"code", "message"}}` with a fitting status.

pub mod events;
pub mod https;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::{info, warn};
use zy_common::ids::TokenId;
use zy_common::proto::{close, CommandKind, RefusalCode};
use zy_common::time::{now_millis, rfc3339};
use zy_common::token::{ApiToken, BootstrapToken, Secret};

use crate::fleet::{CommandError, Kick, NodeLive, Refused};
use crate::store::{StoreError, TokenRecord};
use crate::Coordinator;
use zy_api::*;

/// The OpenAPI document, served as-is.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route, as (method, path) in the OpenAPI document's spelling. A test checks
/// that the router and the document agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/health"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{node}"),
    ("delete", "/v1/nodes/{node}"),
    ("post", "/v1/nodes/{node}/ping"),
    ("get", "/v1/tokens"),
    ("post", "/v1/tokens"),
    ("delete", "/v1/tokens/{id}"),
    ("put", "/v1/blobs"),
    ("get", "/v1/images"),
    ("post", "/v1/images"),
    ("get", "/v1/images/{name}"),
    ("delete", "/v1/images/{name}"),
    ("get", "/v1/vms"),
    ("post", "/v1/vms"),
    ("get", "/v1/vms/{vm}"),
    ("delete", "/v1/vms/{vm}"),
    ("post", "/v1/vms/{vm}/start"),
    ("post", "/v1/vms/{vm}/stop"),
    ("post", "/v1/vms/{vm}/restart"),
    ("get", "/v1/vms/{vm}/console"),
    ("get", "/v1/ops"),
    ("get", "/v1/ops/{id}"),
    ("get", "/v1/events"),
];

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// The sentence for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        warn!(error = %e, "API request failed inside the coordinator");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the coordinator failed: {e}"),
        )
    }
}

/// How a command to a node failed, as the API answers it: the node said no (409), has no
/// such thing (404), tried and failed (502), is busy (503), or did not answer (504).
impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        use zy_common::proto::ReplyErrorKind;
        match e {
            CommandError::Rejected(r) => match r.kind {
                ReplyErrorKind::Refused => {
                    Self::new(StatusCode::CONFLICT, "node_refused", r.message)
                }
                ReplyErrorKind::NotFound => {
                    Self::new(StatusCode::NOT_FOUND, "not_on_node", r.message)
                }
                ReplyErrorKind::Failed => {
                    Self::new(StatusCode::BAD_GATEWAY, "node_failed", r.message)
                }
                ReplyErrorKind::Busy => {
                    Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", r.message)
                }
            },
            CommandError::Busy => Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string()),
            CommandError::Disconnected | CommandError::Timeout => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "node_unreachable",
                e.to_string(),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // With its cause: "store commit failed" alone tells ops nothing.
        Self::internal(zy_common::error::chain(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;
type Shared = State<Arc<Coordinator>>;

/// The API's router.
pub fn router(coord: Arc<Coordinator>) -> Router {
    let authed = Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", get(show_node).delete(remove_node))
        .route("/v1/nodes/{node}/ping", post(ping_node))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/v1/blobs",
            axum::routing::put(crate::vms::images::put_blob).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/images",
            get(crate::vms::images::list_images).post(crate::vms::images::create_image),
        )
        .route("/v1/vms", get(crate::vms::list).post(crate::vms::create))
        .route(
            "/v1/vms/{vm}",
            get(crate::vms::show).delete(crate::vms::delete),
        )
        .route("/v1/vms/{vm}/start", post(crate::vms::start))
        .route("/v1/vms/{vm}/stop", post(crate::vms::stop))
        .route("/v1/vms/{vm}/restart", post(crate::vms::restart))
        .route("/v1/vms/{vm}/console", get(crate::vms::console))
        .route("/v1/ops", get(crate::vms::list_ops))
        .route("/v1/ops/{id}", get(crate::vms::show_op))
        .route("/v1/events", get(crate::api::events::stream))
        .route(
            "/v1/images/{name}",
            get(crate::vms::images::show_image).delete(crate::vms::images::delete_image),
        )
        .layer(middleware::from_fn_with_state(coord.clone(), authenticate));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .merge(authed)
        .fallback(|| async { ApiError::not_found("no such API path; see /v1/openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take that method; see /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(coord)
}

async fn authenticate(
    State(coord): Shared,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let unauthorized = |why: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{why}: pass `Authorization: Bearer <API token>` (zy reads it from zy.toml, --token or ZY_TOKEN)"),
        )
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("no API token"))?;
    let presented = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthorized("the Authorization header is not a bearer token"))?;
    let token: ApiToken = presented
        .parse()
        .map_err(|_| unauthorized("that is not an API token"))?;
    let known = coord
        .api_tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&token.id)
        .map(|r| r.secret_hash);
    match known {
        Some(hash) if hash == token.secret.hash() => {
            req.extensions_mut().insert(token.id);
            Ok(next.run(req).await)
        }
        _ => {
            warn!(token = %token.id, "API request with an unknown or wrong token");
            Err(unauthorized("the API token is not valid here"))
        }
    }
}

async fn health(State(coord): Shared) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: zy_common::VERSION.into(),
        site: coord.config.site.clone(),
        uptime_secs: coord.started.elapsed().as_secs(),
    })
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

fn view(n: &NodeLive) -> NodeView {
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
    }
}

fn find(coord: &Coordinator, key: &str) -> Result<NodeLive, ApiError> {
    coord.fleet.find(key).ok_or_else(|| {
        ApiError::not_found(format!(
            "no node `{}`; `zy node ls` lists them",
            zy_common::ids::truncate_for_error(key)
        ))
    })
}

async fn list_nodes(State(coord): Shared) -> ApiResult<Vec<NodeView>> {
    Ok(Json(coord.fleet.snapshot().iter().map(view).collect()))
}

async fn show_node(State(coord): Shared, Path(key): Path<String>) -> ApiResult<NodeDetail> {
    let n = find(&coord, &key)?;
    let store = coord.store.clone();
    let id = n.record.id;
    let transitions = tokio::task::spawn_blocking(move || store.transitions(id, 20))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(NodeDetail {
        node: view(&n),
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

async fn remove_node(State(coord): Shared, Path(key): Path<String>) -> ApiResult<RemovedNode> {
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

async fn ping_node(State(coord): Shared, Path(key): Path<String>) -> ApiResult<PingResult> {
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

fn token_view(t: &TokenRecord, now: u64) -> TokenView {
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
    }
}

async fn list_tokens(State(coord): Shared) -> ApiResult<Vec<TokenView>> {
    let store = coord.store.clone();
    let mut tokens = tokio::task::spawn_blocking(move || store.tokens())
        .await
        .map_err(ApiError::internal)??;
    tokens.sort_by_key(|t| t.created_at_ms);
    let now = now_millis();
    Ok(Json(tokens.iter().map(|t| token_view(t, now)).collect()))
}

async fn create_token(
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

async fn revoke_token(State(coord): Shared, Path(id): Path<String>) -> ApiResult<TokenView> {
    let id: TokenId = id
        .parse()
        .map_err(|e: zy_common::ids::IdError| ApiError::bad_request(e.to_string()))?;
    let store = coord.store.clone();
    let rec = tokio::task::spawn_blocking(move || store.revoke_token(id, now_millis()))
        .await
        .map_err(ApiError::internal)??
        .ok_or_else(|| ApiError::not_found(format!("no token {id}; `zy token ls` lists them")))?;
    info!(token = %id, "bootstrap token revoked");
    Ok(Json(token_view(&rec, now_millis())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The served OpenAPI document describes exactly the routes the router has.
    #[test]
    fn openapi_matches_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    documented.push((method.clone(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(documented, routes);
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
