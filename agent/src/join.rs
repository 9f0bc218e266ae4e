//! `zy-agent join`: enrolls this server with a coordinator using a one-time token.
//!
//! The token pins the coordinator's CA by fingerprint, so the very first connection is
//! already authenticated one way; the node's key is generated here and never leaves it.

use std::path::Path;
use std::time::Duration;

use zy_common::proto::{close, JoinRequest, Message, RefusalCode};
use zy_common::tls::{self, CaFingerprint, NodeIdentity};
use zy_common::token::BootstrapToken;
use zy_common::wire::{self, MAX_BODY, PROTOCOL_VERSIONS};

use crate::identity::{IdentityDir, IdentityError, NodeFile};
use crate::net::{self, ConnectError};

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] zy_common::token::TokenFormatError),
    #[error(transparent)]
    Name(#[from] zy_common::ids::IdError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the coordinator refused to enroll this node ({code:?}): {message}")]
    Refused { code: RefusalCode, message: String },
    #[error("enrollment failed on the wire: {0}")]
    Protocol(String),
}

/// What a successful join produced.
#[derive(Debug)]
pub struct Joined {
    pub node: NodeFile,
}

/// Enrolls the node: key, certificate request, token, signed certificate, files.
pub async fn join(
    data_dir: &Path,
    coordinator: &str,
    token: &str,
    name: &str,
) -> Result<Joined, JoinError> {
    let token: BootstrapToken = token.parse()?;
    zy_common::ids::validate_name(name)?;
    let ids = IdentityDir::new(data_dir);
    ids.ensure_not_enrolled()?;

    let (key, csr) = tls::node_request(name)?;
    let target = net::resolve(coordinator).await?;
    let endpoint = net::endpoint(target)?;
    let conn = net::connect(
        &endpoint,
        target,
        tls::join_client_config(token.ca)?,
        Duration::from_secs(10),
    )
    .await?;
    let result = exchange(&conn, &token, csr, name).await;
    conn.close(close::SHUTDOWN.into(), b"done");
    endpoint.wait_idle().await;
    let accepted = result?;

    if CaFingerprint::of(&accepted.ca_der) != token.ca {
        return Err(JoinError::Protocol(
            "the coordinator sent a CA other than the one the token pins".into(),
        ));
    }
    let who = NodeIdentity::from_cert(&accepted.cert_der)?;
    if who.node_id != accepted.node_id || who.zone != accepted.zone {
        return Err(JoinError::Protocol(
            "the certificate does not name the node id and zone the coordinator sent".into(),
        ));
    }
    let node = NodeFile {
        node_id: accepted.node_id,
        name: name.to_string(),
        zone: accepted.zone,
        coordinator: coordinator.to_string(),
    };
    ids.store(
        &node,
        &key.serialize_pem(),
        &accepted.cert_der.clone().into(),
        &accepted.ca_der.clone().into(),
    )?;
    Ok(Joined { node })
}

async fn exchange(
    conn: &quinn::Connection,
    token: &BootstrapToken,
    csr: Vec<u8>,
    name: &str,
) -> Result<zy_common::proto::JoinAccepted, JoinError> {
    let proto = |e: wire::StreamError| {
        JoinError::Protocol(match e {
            wire::StreamError::Io(io) => net::explain_text(&io.to_string()),
            other => other.to_string(),
        })
    };
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| JoinError::Protocol(net::explain(&e)))?;
    let mut io = tokio::io::join(recv, send);
    let version = wire::open_preamble(&mut io, PROTOCOL_VERSIONS)
        .await
        .map_err(proto)?;
    let req = Message::JoinRequest(JoinRequest {
        token: token.to_string(),
        csr_der: csr,
        name: name.to_string(),
        agent_version: zy_common::VERSION.into(),
    });
    wire::write_frame(&mut io, version, &req)
        .await
        .map_err(proto)?;
    let mut buf = Vec::new();
    let answer: Message = tokio::time::timeout(
        Duration::from_secs(15),
        wire::read_frame(&mut io, version, MAX_BODY, &mut buf),
    )
    .await
    .map_err(|_| JoinError::Protocol("no answer from the coordinator within 15s".into()))?
    .map_err(proto)?;
    answer
        .validate()
        .map_err(|e| JoinError::Protocol(e.to_string()))?;
    match answer {
        Message::JoinAccepted(a) => Ok(a),
        Message::Refused(r) => Err(JoinError::Refused {
            code: r.code,
            message: r.message,
        }),
        other => Err(JoinError::Protocol(format!(
            "unexpected {} in answer to a join",
            other.kind()
        ))),
    }
}
