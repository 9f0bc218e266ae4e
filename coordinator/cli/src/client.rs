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

use zy_api::ErrorBody;

const TIMEOUT: Duration = Duration::from_secs(15);

/// A WebSocket to the coordinator (the interactive console).
pub type WebSocket = tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

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
    idempotency_key: Option<String>,
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
            idempotency_key: None,
        }
    }

    /// The same client, sending `key` as the `Idempotency-Key` of its requests: a request
    /// sent again with the same key (after a lost answer) does not do the work twice.
    pub fn with_idempotency_key(&self, key: String) -> Self {
        Self {
            idempotency_key: Some(key),
            ..self.clone()
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
        let (body, json) = match body {
            Some(v) => (Full::new(Bytes::from(v.to_string())), true),
            None => (Full::new(Bytes::new()), false),
        };
        let answer = tokio::time::timeout(TIMEOUT, self.raw(method, path, body, json))
            .await
            .map_err(|_| ClientError::Unreachable {
                addr: self.addr.clone(),
                message: "no answer within 15s".into(),
            })??;
        self.decode(answer)
    }

    /// Uploads a file as a raw body (`PUT`), streaming it, and decodes the JSON answer.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
    ) -> Result<T, ClientError> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| ClientError::Decode(format!("cannot read {}: {e}", file.display())))?;
        let stream = futures_util::stream::unfold(f, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((
                        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(buf))),
                        f,
                    ))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let body = http_body_util::StreamBody::new(stream);
        let answer = self.raw(Method::PUT, path, body, false).await?;
        self.decode(answer)
    }

    /// A GET whose body is streamed to `out` as it arrives (no time limit: a followed
    /// console runs until interrupted).
    pub async fn stream_to(
        &self,
        path: &str,
        out: &mut (impl std::io::Write + ?Sized),
    ) -> Result<(), ClientError> {
        let resp = self
            .send(Method::GET, path, Full::new(Bytes::new()), false)
            .await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Decode(e.to_string()))?
                .to_bytes();
            return self
                .decode::<serde_json::Value>((status, bytes))
                .map(|_| ());
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Decode(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                    // The reader went away (`| head`): done.
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn decode<T: DeserializeOwned>(
        &self,
        (status, bytes): (StatusCode, Bytes),
    ) -> Result<T, ClientError> {
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

    async fn raw<B>(
        &self,
        method: Method,
        path: &str,
        body: B,
        json: bool,
    ) -> Result<(StatusCode, Bytes), ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = self.send(method, path, body, json).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: self.addr.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Opens a WebSocket on `path` (`GET` with an upgrade), over the same verified TLS
    /// and with the same token as every request. An API error comes back as
    /// [`ClientError::Api`], before any upgrade.
    pub async fn websocket(&self, path: &str) -> Result<WebSocket, ClientError> {
        use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
        let key = generate_key();
        let headers = [
            (hyper::header::CONNECTION, "upgrade".to_string()),
            (hyper::header::UPGRADE, "websocket".to_string()),
            (hyper::header::SEC_WEBSOCKET_VERSION, "13".to_string()),
            (hyper::header::SEC_WEBSOCKET_KEY, key.clone()),
        ];
        let resp = tokio::time::timeout(
            TIMEOUT,
            self.send_with(Method::GET, path, Full::new(Bytes::new()), false, &headers),
        )
        .await
        .map_err(|_| ClientError::Unreachable {
            addr: self.addr.clone(),
            message: "no answer within 15s".into(),
        })??;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Decode(e.to_string()))?
                .to_bytes();
            let not_ws = || {
                ClientError::Decode(format!(
                    "the coordinator answered {status} where a WebSocket was asked for"
                ))
            };
            // An error status decodes to the API's error; a success here is no WebSocket.
            return Err(self
                .decode::<serde_json::Value>((status, bytes))
                .err()
                .unwrap_or_else(not_ws));
        }
        let accept = resp
            .headers()
            .get(hyper::header::SEC_WEBSOCKET_ACCEPT)
            .and_then(|v| v.to_str().ok());
        if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(ClientError::Decode(
                "the coordinator's WebSocket answer does not match the request".into(),
            ));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Decode(format!("the WebSocket upgrade failed: {e}")))?;
        Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await)
    }

    async fn send<B>(
        &self,
        method: Method,
        path: &str,
        body: B,
        json: bool,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.send_with(method, path, body, json, &[]).await
    }

    async fn send_with<B>(
        &self,
        method: Method,
        path: &str,
        body: B,
        json: bool,
        headers: &[(hyper::header::HeaderName, String)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
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
            let _ = conn.with_upgrades().await;
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
        if json {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(k) = &self.idempotency_key {
            req = req.header("idempotency-key", k.as_str());
        }
        for (name, value) in headers {
            req = req.header(name, value.as_str());
        }
        let req = req.body(body).map_err(|e| unreachable(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))
    }
}
