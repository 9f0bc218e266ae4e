//! Reaching the coordinator over QUIC: address resolution, a client endpoint, and errors
//! explained in terms an operator can act on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use zy_common::tls::{PIN_MISMATCH, SERVER_NAME};

/// Why a connection to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve coordinator address `{addr}`: {message}")]
    Resolve { addr: String, message: String },
    #[error("cannot open a UDP socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
}

/// Resolves `host:port`.
pub async fn resolve(addr: &str) -> Result<SocketAddr, ConnectError> {
    let err = |message: String| ConnectError::Resolve {
        addr: addr.to_string(),
        message,
    };
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(format!("{e} (expected host:port, e.g. 10.0.0.1:7400)")))?;
    it.next().ok_or_else(|| err("no address".into()))
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn endpoint(target: SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
    let bind: SocketAddr = if target.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| ConnectError::Socket(std::io::ErrorKind::InvalidInput.into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| ConnectError::Socket(std::io::ErrorKind::InvalidInput.into()))?
    };
    quinn::Endpoint::client(bind).map_err(ConnectError::Socket)
}

/// Connects with a TLS config and the shared transport settings.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    target: SocketAddr,
    tls: rustls::ClientConfig,
    idle_timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| {
        ConnectError::Connect {
            addr: target,
            message: e.to_string(),
        }
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(zy_common::quic::transport(idle_timeout));
    let connecting = endpoint
        .connect_with(cfg, target, SERVER_NAME)
        .map_err(|e| ConnectError::Connect {
            addr: target,
            message: e.to_string(),
        })?;
    // The handshake is bounded by the idle timeout; add a hard cap anyway.
    match tokio::time::timeout(idle_timeout + Duration::from_secs(1), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(ConnectError::Connect {
            addr: target,
            message: explain(&e),
        }),
        Err(_) => Err(ConnectError::Connect {
            addr: target,
            message: "no answer (is the coordinator running and the UDP port open?)".into(),
        }),
    }
}

/// Turns a QUIC/TLS failure into a sentence that says what to check.
pub fn explain(e: &quinn::ConnectionError) -> String {
    if matches!(e, quinn::ConnectionError::TimedOut) {
        return "timed out (is the coordinator running and the UDP port open?)".into();
    }
    explain_text(&e.to_string())
}

/// The same, for an error already rendered as text (stream errors carry the connection's).
pub fn explain_text(raw: &str) -> String {
    if raw.contains(PIN_MISMATCH) {
        return format!("{PIN_MISMATCH}: the token was made by another coordinator, or something is impersonating it ({raw})");
    }
    if raw.contains("CertificateExpired") || raw.contains("certificate expired") {
        return format!("the coordinator refused this node's certificate: it has expired, so the node cannot reconnect; re-enroll it (zy node remove, delete the identity directory, zy-agent join with a new token) ({raw})");
    }
    let cert_problem = ["UnknownIssuer", "BadSignature", "certificate", "UnknownCA"]
        .iter()
        .any(|k| raw.contains(k));
    if cert_problem && raw.contains("aborted by peer") {
        return format!("the coordinator refused this node's certificate: it was not issued by this site's CA; enroll the node with a token of this coordinator ({raw})");
    }
    if cert_problem {
        return format!("the coordinator's certificate is not from this node's site CA: is this the right coordinator? ({raw})");
    }
    raw.to_string()
}
