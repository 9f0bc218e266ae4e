//! The HTTP JSON API: what `zy` and any other client drive the site with.
//!
//! Every route but `/v1/health` and `/v1/openapi.json` needs `Authorization: Bearer <API
//! token>`. Paths are versioned (`/v1`) and leave room for a tenant scope
//! (`/v1/tenants/{tenant}/...`) beside the site-wide ones used by ops.
//! Errors are always `{"error": {"code", "message"}}` with a fitting status.

pub mod events;
pub mod https;
mod nodes;
mod tokens;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::warn;
use zy_api::*;
use zy_common::token::ApiToken;

use crate::fleet::CommandError;
use crate::store::StoreError;
use crate::Coordinator;

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

    /// The code for programs (`contended`, `not_found`, ...).
    pub fn code(&self) -> &'static str {
        self.code
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
        .route("/v1/nodes", get(nodes::list_nodes))
        .route(
            "/v1/nodes/{node}",
            get(nodes::show_node).delete(nodes::remove_node),
        )
        .route("/v1/nodes/{node}/ping", post(nodes::ping_node))
        .route(
            "/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(tokens::revoke_token),
        )
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
        .route("/v1/vms/{vm}/console", get(crate::vms::console::console))
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
