//! The HTTPS client the `zy` CLI uses: one request per connection, TLS verified against the
//! site CA under the coordinator's fixed name, bearer token in every request.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;

use crate::api_types::ErrorBody;

const TIMEOUT: Duration = Duration::from_secs(15);

/// Why a request failed. Each variant maps to its own CLI exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator at {addr}: {message} (is zy-coordinator running, and is the address right?)")]
    Unreachable { addr: String, message: String },
    #[error(
        "the coordinator at {addr} failed TLS verification: {message} (is `ca` the site's ca.crt?)"
    )]
    Tls { addr: String, message: String },
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("the coordinator's answer could not be read: {0}")]
    Decode(String),
}

/// A client of one coordinator.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    token: Option<String>,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    /// `addr` is `host:port` (an `https://` prefix is accepted).
    pub fn new(addr: &str, token: Option<String>, tls: rustls::ClientConfig) -> Self {
        let addr = addr
            .trim()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        Self {
            addr,
            token,
            tls: Arc::new(tls),
        }
    }

    /// The address requests go to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a request and decodes a JSON answer; API errors come back as
    /// [`ClientError::Api`] with the server's message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = tokio::time::timeout(TIMEOUT, self.raw(method, path, body))
            .await
            .map_err(|_| ClientError::Unreachable {
                addr: self.addr.clone(),
                message: "no answer within 15s".into(),
            })??;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
        } else {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.error.code, e.error.message),
                Err(_) => (
                    "http".to_string(),
                    format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                    ),
                ),
            };
            Err(ClientError::Api {
                status,
                code,
                message,
            })
        }
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let unreachable = |message: String| ClientError::Unreachable {
            addr: self.addr.clone(),
            message,
        };
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from(zy_common::tls::SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls {
                addr: self.addr.clone(),
                message: e.to_string(),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, zy_common::tls::SERVER_NAME)
            .header(
                hyper::header::USER_AGENT,
                concat!("zy/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }
}
