//! The HTTP JSON API: what `zy` and any other client drive the site with.
//!
//! Every route but `/v1/health` and `/v1/openapi.json` needs `Authorization: Bearer <API
//! token>`. Paths are versioned (`/v1`) and leave room for a tenant scope
//! (`/v1/tenants/{tenant}/...`) beside the site-wide ones used by ops.
//! Errors are always `{"error": {"code", "message"}}` with a fitting status.

mod apitokens;
pub mod events;
pub mod https;
mod nodes;
pub mod refusals;
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
use zy_common::time::now_millis;
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
    ("post", "/v1/nodes/{node}/drain"),
    ("post", "/v1/nodes/{node}/undrain"),
    ("post", "/v1/nodes/{node}/standby"),
    ("post", "/v1/nodes/{node}/wake"),
    ("get", "/v1/plan/consolidate"),
    ("post", "/v1/plan/consolidate"),
    ("get", "/v1/tokens"),
    ("post", "/v1/tokens"),
    ("delete", "/v1/tokens/{id}"),
    ("get", "/v1/apitokens"),
    ("post", "/v1/apitokens"),
    ("delete", "/v1/apitokens/{token}"),
    ("get", "/v1/ca"),
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
    ("post", "/v1/vms/{vm}/migrate"),
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

/// A node as the API shows it, with its administrative note.
pub fn node_view(coord: &Coordinator, n: &crate::fleet::NodeLive) -> NodeView {
    nodes::view(coord, n)
}
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
        .route("/v1/nodes/{node}/drain", post(crate::nodeadmin::drain_node))
        .route(
            "/v1/nodes/{node}/undrain",
            post(crate::nodeadmin::undrain_node),
        )
        .route(
            "/v1/nodes/{node}/standby",
            post(crate::nodeadmin::standby_node),
        )
        .route("/v1/nodes/{node}/wake", post(crate::nodeadmin::wake_node))
        .route(
            "/v1/plan/consolidate",
            get(crate::nodeadmin::consolidate::show).post(crate::nodeadmin::consolidate::apply),
        )
        .route(
            "/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(tokens::revoke_token),
        )
        .route(
            "/v1/apitokens",
            get(apitokens::list).post(apitokens::create),
        )
        .route(
            "/v1/apitokens/{token}",
            axum::routing::delete(apitokens::revoke),
        )
        .route("/v1/ca", get(apitokens::show_ca))
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
        .route("/v1/vms/{vm}/migrate", post(crate::vms::migrate::migrate))
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
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::map_response(json_errors))
        .with_state(coord)
}

/// Largest request body the API takes, but for blobs (`PUT /v1/blobs`, streamed).
pub const BODY_LIMIT: usize = 64 * 1024;

/// The code for programs of an HTTP error status that axum or hyper answered without us.
fn status_code_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Every error leaves in the API's JSON form, also those that extractors (a body over
/// the limit, a path that does not parse) answer in plain text on their own.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the request body is over the API's limit of {} KiB (image data goes to PUT /v1/blobs)",
            BODY_LIMIT / 1024
        )
    } else {
        let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("the request failed")
                .to_string()
        } else {
            zy_common::ids::truncate_for_error(&text)
        }
    };
    let mut out = ApiError::new(status, status_code_name(status), message).into_response();
    // Headers the answer needs beyond its body (WWW-Authenticate, Allow, Retry-After).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

async fn authenticate(
    State(coord): Shared,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Result<Response, Unauthorized> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Unauthorized::missing("no API token"))?;
    let presented = bearer(value)
        .ok_or_else(|| Unauthorized::missing("the Authorization header is not a bearer token"))?;
    let token: ApiToken = presented
        .parse()
        .map_err(|_| Unauthorized::invalid("that is not an API token"))?;
    let now = now_millis();
    let known = coord
        .api_tokens
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&token.id)
        .cloned();
    let rec = match known {
        Some(rec) if rec.secret_hash == token.secret.hash() => rec,
        _ => {
            if let Some(suppressed) = coord.refusals.note(token.id.to_string(), now) {
                warn!(token = %token.id, suppressed, "API request with an unknown or wrong token");
            }
            return Err(Unauthorized::invalid("the API token is not valid here"));
        }
    };
    match rec.status(now) {
        crate::store::ApiTokenStatus::Valid => {}
        crate::store::ApiTokenStatus::Expired => {
            if let Some(suppressed) = coord.refusals.note(token.id.to_string(), now) {
                warn!(token = %token.id, name = %rec.name, suppressed, "API request with an expired token");
            }
            return Err(Unauthorized::with(
                "token_expired",
                format!(
                    "the API token `{}` expired at {}; ask for a new one (zy apitoken create)",
                    rec.name,
                    zy_common::time::rfc3339(rec.expires_at_ms.unwrap_or_default())
                ),
            ));
        }
        crate::store::ApiTokenStatus::Revoked => {
            if let Some(suppressed) = coord.refusals.note(token.id.to_string(), now) {
                warn!(token = %token.id, name = %rec.name, suppressed, "API request with a revoked token");
            }
            return Err(Unauthorized::with(
                "token_revoked",
                format!(
                    "the API token `{}` was revoked at {}; ask for a new one (zy apitoken create)",
                    rec.name,
                    zy_common::time::rfc3339(rec.revoked_at_ms.unwrap_or_default())
                ),
            ));
        }
    }
    if rec
        .last_used_ms
        .is_none_or(|t| now.saturating_sub(t) >= LAST_USED_RESOLUTION_MS)
    {
        touch(&coord, token.id, now);
    }
    req.extensions_mut().insert(token.id);
    Ok(next.run(req).await)
}

/// How coarse an API token's last use is kept: one store write per token per minute at most.
const LAST_USED_RESOLUTION_MS: u64 = 60_000;

/// Records a token's use, in memory at once and in the store in the background.
fn touch(coord: &Arc<Coordinator>, id: zy_common::ids::TokenId, now: u64) {
    if let Some(t) = coord
        .api_tokens
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&id)
    {
        t.last_used_ms = Some(now);
    }
    let store = coord.store.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.touch_api_token(id, now) {
            warn!(token = %id, error = %zy_common::error::chain(&e), "cannot record an API token's last use");
        }
    });
}

/// The credentials of an `Authorization` value whose scheme is `Bearer`, matched without
/// regard to case as RFC 9110 wants of auth schemes.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A 401 as RFC 6750 has it: with `WWW-Authenticate: Bearer`, and `error="invalid_token"`
/// when a token was presented but is not good.
#[derive(Debug)]
struct Unauthorized {
    code: &'static str,
    message: String,
    invalid: bool,
}

impl Unauthorized {
    const HOW: &'static str =
        "pass `Authorization: Bearer <API token>` (zy reads it from zy.toml, --token or ZY_TOKEN)";

    fn missing(why: &'static str) -> Self {
        Self {
            code: "unauthorized",
            message: format!("{why}: {}", Self::HOW),
            invalid: false,
        }
    }
    fn invalid(why: &'static str) -> Self {
        Self {
            code: "unauthorized",
            message: format!("{why}: {}", Self::HOW),
            invalid: true,
        }
    }
    /// A token that was good once (expired, revoked), with its own code and message.
    fn with(code: &'static str, message: String) -> Self {
        Self {
            code,
            message,
            invalid: true,
        }
    }
}

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        let challenge = if self.invalid {
            r#"Bearer realm="zhengyun", error="invalid_token""#
        } else {
            r#"Bearer realm="zhengyun""#
        };
        let mut res =
            ApiError::new(StatusCode::UNAUTHORIZED, self.code, self.message).into_response();
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(challenge),
        );
        res
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

    fn schema(doc: &serde_json::Value, name: &str) -> serde_json::Value {
        doc["components"]["schemas"][name].clone()
    }

    /// What the document says a request may hold is what the server accepts: the bounds are
    /// the code's own constants.
    #[test]
    fn the_documents_bounds_are_the_servers() {
        use zy_common::resources::{MAX_DISK_GIB, MEMORY_MIB, VCPUS};
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let vm = schema(&doc, "CreateVm");
        let p = &vm["properties"];
        assert_eq!(p["vcpus"]["minimum"], *VCPUS.start());
        assert_eq!(p["vcpus"]["maximum"], *VCPUS.end());
        assert_eq!(p["memory_mib"]["minimum"], *MEMORY_MIB.start());
        assert_eq!(p["memory_mib"]["maximum"], *MEMORY_MIB.end());
        assert_eq!(p["disk_gib"]["maximum"], MAX_DISK_GIB);
        let t = schema(&doc, "CreateToken");
        assert_eq!(
            t["properties"]["ttl_secs"]["minimum"],
            *TOKEN_TTL_SECS.start()
        );
        assert_eq!(
            t["properties"]["ttl_secs"]["maximum"],
            *TOKEN_TTL_SECS.end()
        );
        // Every integer says its width, and its lower bound unless it says it may be
        // negative.
        fn integers(x: &serde_json::Value, at: &str, bad: &mut Vec<String>) {
            match x {
                serde_json::Value::Object(m) => {
                    let signed = m
                        .get("description")
                        .and_then(|d| d.as_str())
                        .is_some_and(|d| d.contains("negative"));
                    if m.get("type") == Some(&serde_json::json!("integer"))
                        && (m.get("format").is_none() || (m.get("minimum").is_none() && !signed))
                    {
                        bad.push(at.to_string());
                    }
                    for (k, v) in m {
                        integers(v, &format!("{at}/{k}"), bad);
                    }
                }
                serde_json::Value::Array(a) => {
                    for (i, v) in a.iter().enumerate() {
                        integers(v, &format!("{at}/{i}"), bad);
                    }
                }
                _ => {}
            }
        }
        let mut bad = Vec::new();
        integers(&doc, "", &mut bad);
        assert!(
            bad.is_empty(),
            "integers without format or minimum: {bad:?}"
        );
        // Every operation that takes a body says it may be too large, every one behind a
        // token says 401, and every one has the error form for the rest.
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (m, o) in ops.as_object().unwrap() {
                let Some(r) = o.get("responses") else {
                    continue;
                };
                assert!(r.get("default").is_some(), "{m} {path}: no default error");
                if o.get("requestBody").is_some() {
                    assert!(r.get("413").is_some(), "{m} {path}: no 413");
                }
                if !["/v1/health", "/v1/openapi.json"].contains(&path.as_str()) {
                    assert!(r.get("401").is_some(), "{m} {path}: no 401");
                }
            }
        }
    }

    proptest::proptest! {
        /// A name the document's pattern and lengths allow is one the server takes, and the
        /// other way round.
        #[test]
        fn the_documents_name_pattern_is_the_servers(name in "[a-z0-9A-Z_. -]{0,70}") {
            let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
            let s = schema(&doc, "Name");
            let re = regex_lite::Regex::new(s["pattern"].as_str().unwrap()).unwrap();
            let len = name.chars().count() as u64;
            let by_doc = re.is_match(&name)
                && len >= s["minLength"].as_u64().unwrap()
                && len <= s["maxLength"].as_u64().unwrap();
            let by_server = zy_common::ids::validate_name_of("VM", &name).is_ok();
            proptest::prop_assert_eq!(by_doc, by_server, "{:?}", name);
        }

        #[test]
        fn names_the_document_allows_are_taken(name in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            proptest::prop_assert!(zy_common::ids::validate_name_of("VM", &name).is_ok(), "{:?}", name);
        }
    }

    #[test]
    fn bearer_is_matched_in_any_case_and_needs_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
