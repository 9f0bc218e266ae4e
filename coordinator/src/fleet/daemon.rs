//! The daemon side of the coordinator: accepts agents over QUIC with mutual TLS, enrolls
//! new nodes, and runs one session per connected node.
//!
//! A connection without a client certificate may do exactly one thing: present a bootstrap
//! token and a certificate request ([`handle_join`]). A connection with a certificate from the
//! site CA is a node; its identity comes from the certificate alone ([`handle_node`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn, Instrument};
use zy_common::ids::NodeId;
use zy_common::proto::{
    close, EventKind, JoinAccepted, JoinRequest, Message, Refusal, RefusalCode, Welcome,
};
use zy_common::time::now_millis;
use zy_common::tls::{CaFingerprint, NodeIdentity};
use zy_common::token::BootstrapToken;
use zy_common::wire::{self, StreamError, MAX_BODY, PROTOCOL_VERSIONS};

use crate::fleet::membership::NodeState;
use crate::fleet::{Kick, Session};
use crate::store::{EnrollError, NodeRecord};
use crate::Coordinator;

/// How long a peer has to open its stream and say its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an enrollment waits for a free slot before it is turned away.
const JOIN_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Outgoing messages queued per node before commands are refused as busy.
const SESSION_QUEUE: usize = 64;

/// Accepts connections until the endpoint closes.
pub async fn serve(coord: Arc<Coordinator>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let coord = coord.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %e, "refused a connection during the TLS handshake");
                    return;
                }
            };
            let peer_cert = conn
                .peer_identity()
                .and_then(|any| {
                    any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .and_then(|certs| certs.first().cloned());
            let identity = peer_cert.as_ref().map(|c| NodeIdentity::from_cert(c));
            match identity {
                None => {
                    // Enrollments beyond the limit wait their turn, up to a bound.
                    let slot = tokio::time::timeout(
                        JOIN_QUEUE_TIMEOUT,
                        coord.join_slots.clone().acquire_owned(),
                    )
                    .await;
                    let Ok(Ok(_permit)) = slot else {
                        warn!(%remote, "too many enrollments in flight for too long; dropping one");
                        conn.close(close::REFUSED.into(), b"coordinator busy enrolling; retry");
                        return;
                    };
                    let span = tracing::info_span!("join", %remote);
                    handle_join(&coord, conn).instrument(span).await;
                }
                Some(Err(e)) => {
                    warn!(%remote, error = %e, "refused a certificate that names no node");
                    conn.close(close::REFUSED.into(), b"not a node certificate");
                }
                Some(Ok(who)) => {
                    let span = tracing::info_span!("node", node = %who.node_id, %remote);
                    let cert =
                        Arc::new(peer_cert.unwrap_or_else(|| CertificateDer::from(Vec::new())));
                    handle_node(&coord, conn, who, cert).instrument(span).await;
                }
            }
        });
    }
}

/// Reads the first message of a connection: the peer opens a stream, we answer its
/// preamble, it sends one frame.
async fn first_message(
    conn: &quinn::Connection,
) -> Result<(u16, Message, quinn::SendStream, quinn::RecvStream), String> {
    let fut = async {
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut io = tokio::io::join(recv, send);
        let version = match wire::answer_preamble(&mut io, PROTOCOL_VERSIONS).await {
            Ok(v) => v,
            Err(e @ StreamError::Version(_)) => {
                // Our answer names our versions; let it reach the peer before closing.
                let (_, mut send) = io.into_inner();
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                return Err(e.to_string());
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut buf = Vec::new();
        let msg: Message = wire::read_frame(&mut io, version, MAX_BODY, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        msg.validate().map_err(|e| e.to_string())?;
        let (recv, send) = io.into_inner();
        Ok((version, msg, send, recv))
    };
    tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, fut)
        .await
        .map_err(|_| "no first message in time".to_string())?
}

/// Sends a refusal, lets the peer read it, and closes.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    version: u16,
    code: RefusalCode,
    message: String,
) {
    let msg = Message::Refused(Refusal { code, message });
    if wire::write_frame(send, version, &msg).await.is_ok() && send.finish().is_ok() {
        // The peer closes once it has read the refusal; don't wait long for it.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    conn.close(close::REFUSED.into(), b"refused");
}

async fn handle_join(coord: &Coordinator, conn: quinn::Connection) {
    let (version, msg, mut send, _recv) = match first_message(&conn).await {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "enrollment attempt failed before a request");
            conn.close(close::PROTOCOL.into(), b"protocol error");
            return;
        }
    };
    let Message::JoinRequest(req) = msg else {
        warn!(
            kind = msg.kind(),
            "unauthenticated peer sent something other than a join"
        );
        let text = format!(
            "expected JoinRequest, got {}: a node must enroll first",
            msg.kind()
        );
        refuse(&conn, &mut send, version, RefusalCode::BadRequest, text).await;
        return;
    };
    match enroll(coord, &req).await {
        Ok(accepted) => {
            info!(node = %accepted.node_id, name = %req.name, zone = %accepted.zone, "node enrolled");
            if wire::write_frame(&mut send, version, &Message::JoinAccepted(accepted))
                .await
                .is_ok()
            {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            }
            conn.close(close::SHUTDOWN.into(), b"enrolled");
        }
        Err((code, message)) => {
            warn!(name = %req.name, ?code, reason = %message, "enrollment refused");
            refuse(&conn, &mut send, version, code, message).await;
        }
    }
}

async fn enroll(
    coord: &Coordinator,
    req: &JoinRequest,
) -> Result<JoinAccepted, (RefusalCode, String)> {
    let token: BootstrapToken =
        req.token
            .parse()
            .map_err(|e: zy_common::token::TokenFormatError| {
                (RefusalCode::TokenInvalid, e.to_string())
            })?;
    if token.ca != CaFingerprint::of(coord.ca.cert_der()) {
        return Err((
            RefusalCode::TokenInvalid,
            "this token was made for another coordinator's CA".into(),
        ));
    }
    let store = coord.store.clone();
    let id = token.id;
    let zone = tokio::task::spawn_blocking(move || store.token(id))
        .await
        .map_err(|e| (RefusalCode::Internal, e.to_string()))?
        .map_err(|e| (RefusalCode::Internal, e.to_string()))?
        .map(|t| t.zone)
        .ok_or((
            RefusalCode::TokenInvalid,
            EnrollError::UnknownToken.to_string(),
        ))?;
    let node_id = NodeId::new_random();
    // The peer kind: a client for the QUIC link, and a server for QEMU's TLS when the node
    // is a live migration's destination.
    let cert = coord
        .ca
        .issue_node_peer(
            &req.csr_der,
            node_id,
            zone,
            coord.config.certs.node_validity,
        )
        .map_err(|e| (RefusalCode::BadRequest, e.to_string()))?;
    let now = now_millis();
    let record = NodeRecord {
        id: node_id,
        name: req.name.clone(),
        zone,
        state: NodeState::Enrolled,
        state_since_ms: now,
        enrolled_at_ms: now,
        token: token.id,
        last_seen_ms: 0,
        inventory: None,
        cert: zy_common::tls::CertInfo::parse(&cert)
            .ok()
            .map(|i| crate::store::NodeCert::of(&i)),
        admin: crate::store::Admin::Active,
        admin_since_ms: now,
    };
    let store = coord.store.clone();
    let secret = token.secret.hash();
    let result = tokio::task::spawn_blocking(move || store.enroll(token.id, secret, record, now))
        .await
        .map_err(|e| (RefusalCode::Internal, e.to_string()))?;
    let record = result.map_err(|e| {
        let code = match &e {
            EnrollError::UnknownToken | EnrollError::BadSecret => RefusalCode::TokenInvalid,
            EnrollError::Expired(_) => RefusalCode::TokenExpired,
            EnrollError::Revoked(_) => RefusalCode::TokenRevoked,
            EnrollError::Used { .. } => RefusalCode::TokenUsed,
            EnrollError::NameInUse(_) => RefusalCode::NameInUse,
            EnrollError::Store(_) => RefusalCode::Internal,
        };
        (code, e.to_string())
    })?;
    coord.fleet.insert_enrolled(record, Instant::now());
    Ok(JoinAccepted {
        node_id,
        zone,
        cert_der: cert.to_vec(),
        ca_der: coord.ca.cert_der().to_vec(),
    })
}

async fn handle_node(
    coord: &Arc<Coordinator>,
    conn: quinn::Connection,
    who: NodeIdentity,
    cert: Arc<CertificateDer<'static>>,
) {
    let (version, msg, mut send, recv) = match first_message(&conn).await {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "node connection failed before its hello");
            conn.close(close::PROTOCOL.into(), b"protocol error");
            return;
        }
    };
    if let Err(r) = coord.fleet.admit(who.node_id, who.zone) {
        warn!(code = ?r.code, reason = %r.message, "refused a node");
        refuse(&conn, &mut send, version, r.code, r.message).await;
        return;
    }
    let Message::Hello(hello) = msg else {
        let text = format!("expected Hello, got {}", msg.kind());
        refuse(&conn, &mut send, version, RefusalCode::BadRequest, text).await;
        return;
    };
    if hello.inventory.zone != who.zone {
        let text = format!(
            "the agent is configured for zone {}, but its certificate is for {}",
            hello.inventory.zone, who.zone
        );
        refuse(&conn, &mut send, version, RefusalCode::BadRequest, text).await;
        return;
    }
    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
    let (session, kicked) = Session::new(coord.fleet.next_session_id(), conn.remote_address(), tx);
    let session = session.with_conn(conn.clone(), version);
    let sid = session.id;
    let session_for_close = session.clone();
    let welcome = Message::Welcome(Welcome {
        node_id: who.node_id,
        report_interval_ms: coord.fleet.timings().report_interval.as_millis() as u32,
    });
    if let Err(e) = wire::write_frame(&mut send, version, &welcome).await {
        debug!(error = %e, "node left before its welcome");
        return;
    }
    match coord.fleet.attach(
        who.node_id,
        session.clone(),
        hello.inventory,
        Instant::now(),
        now_millis(),
    ) {
        Ok(Some(old)) => old.kick(Kick {
            close_code: close::REPLACED,
            refusal: None,
            reason: "replaced by a newer connection".into(),
        }),
        Ok(None) => {}
        Err(r) => {
            refuse(&conn, &mut send, version, r.code, r.message).await;
            return;
        }
    }
    match zy_common::tls::CertInfo::parse(&cert) {
        Ok(info) => {
            if let Err(e) = crate::fleet::certs::note_node_cert(coord, who.node_id, &info).await {
                warn!(error = %e, "cannot record the certificate the node connected with");
            }
        }
        Err(e) => warn!(error = %e, "cannot read the certificate the node connected with"),
    }
    info!("node connected");
    tokio::spawn(serve_streams(
        coord.clone(),
        who.node_id,
        conn.clone(),
        version,
    ));
    let end = run_session(
        coord,
        &conn,
        who.node_id,
        &cert,
        session,
        version,
        send,
        recv,
        rx,
        kicked,
    )
    .await;
    coord.fleet.detach(who.node_id, sid);
    // Whoever waits for this node's replies learns now that none will come.
    session_for_close.close();
    match end {
        SessionEnd::Closed(reason) => info!(%reason, "node disconnected"),
        SessionEnd::Protocol(reason) => warn!(%reason, "node broke the protocol; closed"),
        SessionEnd::Kicked(reason) => info!(%reason, "session closed by the coordinator"),
    }
}

/// Serves the streams a node opens besides its control stream: blob fetches.
async fn serve_streams(
    coord: Arc<Coordinator>,
    node: NodeId,
    conn: quinn::Connection,
    version: u16,
) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let coord = coord.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_fetch(&coord, node, send, recv, version).await {
                debug!(error = %e, "blob stream ended with an error");
            }
        });
    }
}

/// Whether `node` may fetch `hash`: only the blobs of images that VMs placed on it boot.
/// Anything else (another zone's image, an image no VM of its uses) it is refused, in the
/// same words as a blob that does not exist, so that it learns nothing of what is stored.
fn may_fetch(coord: &Coordinator, node: NodeId, hash: &zy_common::blob::BlobHash) -> bool {
    coord.vms.with(|t| crate::vms::needs_blob(t, node, hash))
}

async fn serve_fetch(
    coord: &Coordinator,
    node: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    version: u16,
) -> Result<(), String> {
    let mut buf = Vec::new();
    let first: Message = tokio::time::timeout(
        FIRST_MESSAGE_TIMEOUT,
        wire::read_frame(&mut recv, version, MAX_BODY, &mut buf),
    )
    .await
    .map_err(|_| "no request in time".to_string())?
    .map_err(|e| e.to_string())?;
    let Message::FetchBlob(hash) = first else {
        let msg = Message::Refused(Refusal {
            code: RefusalCode::BadRequest,
            message: format!(
                "a stream of its own carries FetchBlob, not {}",
                first.kind()
            ),
        });
        let _ = wire::write_frame(&mut send, version, &msg).await;
        let _ = send.finish();
        return Err("unexpected first message on a stream".into());
    };
    let blobs = &coord.blobs;
    let size = match may_fetch(coord, node, &hash) {
        true => blobs.size(&hash),
        false => {
            warn!(%hash, "refused a blob no VM of this node needs");
            None
        }
    };
    let Some(size) = size else {
        let msg = Message::Refused(Refusal {
            code: RefusalCode::NotFound,
            message: format!("no blob {hash} here"),
        });
        let _ = wire::write_frame(&mut send, version, &msg).await;
        let _ = send.finish();
        return Ok(());
    };
    let mut file = tokio::fs::File::open(blobs.path(&hash))
        .await
        .map_err(|e| e.to_string())?;
    wire::write_frame(&mut send, version, &Message::BlobHeader { hash, size })
        .await
        .map_err(|e| e.to_string())?;
    let sent = tokio::io::copy(&mut (&mut file).take(size), &mut send)
        .await
        .map_err(|e| e.to_string())?;
    if sent != size {
        send.reset(1u32.into()).ok();
        return Err(format!("blob {hash} shrank while being sent"));
    }
    send.finish().map_err(|e| e.to_string())?;
    // Keep the stream until the peer has it all.
    let _ = send.stopped().await;
    Ok(())
}

enum SessionEnd {
    Closed(String),
    Protocol(String),
    Kicked(String),
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    coord: &Arc<Coordinator>,
    conn: &quinn::Connection,
    node: NodeId,
    cert: &Arc<CertificateDer<'static>>,
    session: Session,
    version: u16,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut rx: mpsc::Receiver<Message>,
    mut kicked: watch::Receiver<Option<Kick>>,
) -> SessionEnd {
    // The writer owns the send half; on stop it drains what is queued (a refusal) first.
    // VM reports and events are applied by one task, in the order the node sent them.
    let (vm_tx, mut vm_rx) = mpsc::channel::<VmUpdate>(1024);
    let vm_coord = coord.clone();
    tokio::spawn(async move {
        while let Some(u) = vm_rx.recv().await {
            match u {
                VmUpdate::Report(r) => {
                    crate::vms::reconcile::observe(&vm_coord, node, r.vms, Some(r.generation)).await
                }
                VmUpdate::Event(e) => {
                    crate::vms::reconcile::observe(&vm_coord, node, vec![e], None).await
                }
            }
        }
    });
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => if wire::write_frame(&mut send, version, &m).await.is_err() { break },
                    None => break,
                },
                _ = &mut stop_rx => {
                    while let Ok(m) = rx.try_recv() {
                        if wire::write_frame(&mut send, version, &m).await.is_err() { break }
                    }
                    break;
                }
            }
        }
        let _ = send.finish();
    });
    let mut buf = Vec::new();
    let mut refused = false;
    let (end, code) = loop {
        tokio::select! {
            r = wire::read_frame::<Message, _>(&mut recv, version, MAX_BODY, &mut buf) => {
                let err = match r {
                    Ok(m) => match m.validate() {
                        Ok(()) if m.since_version() > version => format!("{} needs protocol version {}; this session speaks {version}", m.kind(), m.since_version()),
                        Ok(()) => match on_message(coord, node, cert, &session, &vm_tx, m) {
                            Ok(()) => continue,
                            Err(e) => e,
                        },
                        Err(e) => e.to_string(),
                    },
                    Err(StreamError::Closed) => break (SessionEnd::Closed("the node closed its stream".into()), close::SHUTDOWN),
                    Err(StreamError::Io(e)) => break (SessionEnd::Closed(e.to_string()), close::SHUTDOWN),
                    Err(e) => e.to_string(),
                };
                refused = session.tx.try_send(Message::Refused(Refusal {
                    code: RefusalCode::BadRequest,
                    message: format!("protocol error: {err}"),
                })).is_ok();
                break (SessionEnd::Protocol(err), close::PROTOCOL);
            }
            changed = kicked.changed() => {
                if changed.is_err() { continue; }
                let Some(kick) = kicked.borrow_and_update().clone() else { continue };
                if let Some(r) = kick.refusal {
                    refused = session.tx.try_send(Message::Refused(Refusal { code: r.code, message: r.message })).is_ok();
                }
                break (SessionEnd::Kicked(kick.reason), kick.close_code);
            }
        }
    };
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
    if refused {
        // The peer closes once it has read the refusal; don't wait long for it.
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    }
    conn.close(code.into(), b"session over");
    end
}

/// A VM change from a node, applied in order.
enum VmUpdate {
    Report(zy_common::proto::VmReport),
    Event(zy_common::proto::VmInfo),
}

fn on_message(
    coord: &Arc<Coordinator>,
    node: NodeId,
    cert: &Arc<CertificateDer<'static>>,
    session: &Session,
    vm_tx: &mpsc::Sender<VmUpdate>,
    m: Message,
) -> Result<(), String> {
    match m {
        Message::Load(load) => {
            coord
                .fleet
                .report(node, session.id, load, Instant::now(), now_millis());
            Ok(())
        }
        Message::Reply(reply) => {
            session.deliver(reply);
            Ok(())
        }
        Message::VmReport(report) => vm_tx
            .try_send(VmUpdate::Report(report))
            .map_err(|_| "too many VM updates at once".to_string()),
        Message::Event(event) => {
            match event.kind {
                EventKind::Notice { message } => {
                    info!(at_ms = event.at_ms, %message, "node notice")
                }
                EventKind::Vm(vm) => {
                    return vm_tx
                        .try_send(VmUpdate::Event(vm))
                        .map_err(|_| "too many VM updates at once".to_string());
                }

                // Version 4: a migration's progress, for `zy vm migrate` to show.
                EventKind::Migration(m) => {
                    tracing::debug!(migration = %m.migration, vm = %m.vm, phase = m.status.phase.as_str(), "migration progress");
                    coord.migrations.on_event(&m);
                }
            }
            Ok(())
        }
        Message::RenewCert { csr_der } => {
            // Issued for the node this session's certificate names; the session goes on.
            let (coord, cert, tx) = (coord.clone(), cert.clone(), session.tx.clone());
            tokio::spawn(async move {
                let result = crate::fleet::certs::renew_node(&coord, &cert, &csr_der)
                    .await
                    .map(|c| c.to_vec());
                if let Err(e) = &result {
                    warn!(reason = %e, "refused to renew a node's certificate");
                }
                // A full queue loses the answer; the agent asks again.
                let _ = tx.try_send(Message::CertRenewed(result));
            });
            Ok(())
        }
        other => Err(format!("unexpected {} from a node", other.kind())),
    }
}
