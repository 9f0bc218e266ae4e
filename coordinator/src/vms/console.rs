//! `GET /v1/vms/{vm}/console`: a VM's serial console, relayed from its node.
//!
//! Two ways, one path:
//!
//! - the log (`lines`, `follow`): its last lines, then what the guest prints, as
//!   `text/plain` (protocol `Console` on a stream to the node);
//! - interactive (`interactive=true`, a WebSocket upgrade): the guest's output as binary
//!   messages, keystrokes back as binary messages, notices as JSON text messages
//!   ([`ConsoleEvent`]) (protocol version 3's `ConsoleAttach` on a stream to the node).
//!
//! ```text
//!  client                coordinator                         agent
//!    | GET ...interactive=true -> |                               |
//!    |                            | ConsoleAttach {id, mode} ---> |
//!    |                            | <------ Attached | Ended(why) |
//!    | <- 101 (or 409 busy, ...)  |                               |
//!    | <--- binary output ------- | <---------------- Output ...  |
//!    | ---- binary input -------> | Input ... ------------------> |
//!    | <- {"event":"taken_over"}, close | <--- Ended(TakenOver)   |
//! ```
//!
//! Refusals (another writer holds the console, the VM is not running, the node is not
//! connected or too old) are told before the upgrade, as ordinary JSON errors, so every
//! client sees them the same way.

use std::sync::Arc;
use std::time::Duration;
use zy_common::task::AbortOnDrop;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::StatusCode;
use tracing::info;
use zy_api::ConsoleEvent;
use zy_common::ids::TokenId;
use zy_common::proto::{ConsoleEnd, ConsoleFrame, ConsoleMode, Message, MAX_CONSOLE_CHUNK};
use zy_common::wire::{self, MAX_BODY};

use crate::api::ApiError;
use crate::Coordinator;

/// The first protocol version with an interactive console.
const INTERACTIVE_SINCE: u16 = 3;

/// What the query asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    Log { lines: u32, follow: bool },
    Interactive(ConsoleMode),
}

fn parse_query(query: &str) -> Result<Ask, ApiError> {
    let (mut lines, mut follow) = (None, None);
    let (mut interactive, mut force, mut read_only) = (false, false, false);
    let boolean = |name: &str, v: &str| {
        v.parse::<bool>()
            .map_err(|_| ApiError::bad_request(format!("{name} must be true or false")))
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("lines", v)) => {
                lines = Some(v.parse().ok().filter(|n| *n <= 100_000).ok_or_else(|| {
                    ApiError::bad_request("lines must be a number within 0..=100000")
                })?)
            }
            Some(("follow", v)) => follow = Some(boolean("follow", v)?),
            Some(("interactive", v)) => interactive = boolean("interactive", v)?,
            Some(("force", v)) => force = boolean("force", v)?,
            Some(("read_only", v)) => read_only = boolean("read_only", v)?,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter `{}`: the console takes lines and follow, or \
                     interactive with force or read_only",
                    zy_common::ids::truncate_for_error(pair)
                )))
            }
        }
    }
    if !interactive {
        if force || read_only {
            return Err(ApiError::bad_request(
                "force and read_only are for the interactive console (interactive=true)",
            ));
        }
        return Ok(Ask::Log {
            lines: lines.unwrap_or(100),
            follow: follow.unwrap_or(false),
        });
    }
    if lines.is_some() || follow.is_some() {
        return Err(ApiError::bad_request(
            "lines and follow are for the console's log, not the interactive console",
        ));
    }
    match (force, read_only) {
        (true, true) => Err(ApiError::bad_request(
            "force takes over the writer; read_only never writes: choose one",
        )),
        (true, false) => Ok(Ask::Interactive(ConsoleMode::TakeOver)),
        (false, true) => Ok(Ask::Interactive(ConsoleMode::ReadOnly)),
        (false, false) => Ok(Ask::Interactive(ConsoleMode::Write)),
    }
}

fn unreachable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "node_unreachable",
        e.to_string(),
    )
}

/// `GET /v1/vms/{vm}/console?lines=N&follow=true`, or `?interactive=true[&force=true |
/// &read_only=true]` as a WebSocket.
pub async fn console(
    State(coord): State<Arc<Coordinator>>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Result<axum::response::Response, ApiError> {
    let ask = parse_query(query.as_deref().unwrap_or(""))?;
    // Who types on a console is worth a line in the log.
    let caller = req.extensions().get::<TokenId>().copied();
    // An interactive console must be a WebSocket: said before the node is bothered.
    let upgrade = match ask {
        Ask::Log { .. } => None,
        Ask::Interactive(_) => {
            let (mut parts, _) = req.into_parts();
            Some(
                WebSocketUpgrade::from_request_parts(&mut parts, &coord)
                    .await
                    .map_err(|e| {
                        ApiError::bad_request(format!(
                            "the interactive console is a WebSocket ({}): `zy vm console` \
                             speaks it",
                            e.body_text()
                        ))
                    })?,
            )
        }
    };
    let v = coord.vms.find(&key)?;
    let session = v
        .node
        .and_then(|n| coord.fleet.session(n))
        .filter(|s| s.conn.is_some())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_connected",
                "the VM's node is not connected",
            )
        })?;
    let (conn, version) = (session.conn.clone(), session.version);
    let conn = conn.ok_or_else(|| ApiError::internal("a connected session without a link"))?;
    match (ask, upgrade) {
        (Ask::Log { lines, follow }, _) => log(conn, version, v.id, lines, follow).await,
        (Ask::Interactive(mode), Some(upgrade)) => {
            if version < INTERACTIVE_SINCE {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "node_too_old",
                    format!(
                        "the VM's node speaks protocol version {version}, which has no \
                         interactive console: upgrade its agent (`zy vm console --follow` \
                         works meanwhile)"
                    ),
                ));
            }
            interactive(conn, version, &v.name, v.id, mode, upgrade, caller).await
        }
        (Ask::Interactive(_), None) => Err(ApiError::internal("no upgrade for a WebSocket")),
    }
}

/// The log: last lines, then (following) what is appended, as plain text.
async fn log(
    conn: quinn::Connection,
    version: u16,
    id: zy_common::VmId,
    lines: u32,
    follow: bool,
) -> Result<axum::response::Response, ApiError> {
    let (mut send, recv) = conn.open_bi().await.map_err(unreachable)?;
    wire::write_frame(&mut send, version, &Message::Console { id, lines, follow })
        .await
        .map_err(unreachable)?;
    let _ = send.finish();
    let stream = futures_util::stream::unfold(recv, |mut recv| async move {
        let mut buf = vec![0u8; 16 * 1024];
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), recv))
            }
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), recv)),
        }
    });
    axum::response::Response::builder()
        .header(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )
        .body(axum::body::Body::from_stream(stream))
        .map_err(ApiError::internal)
}

/// Attaches at the node, then upgrades to the WebSocket and relays until either side ends.
async fn interactive(
    conn: quinn::Connection,
    version: u16,
    name: &str,
    id: zy_common::VmId,
    mode: ConsoleMode,
    upgrade: WebSocketUpgrade,
    caller: Option<TokenId>,
) -> Result<axum::response::Response, ApiError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(unreachable)?;
    wire::write_frame(&mut send, version, &Message::ConsoleAttach { id, mode })
        .await
        .map_err(unreachable)?;
    let mut buf = Vec::new();
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        wire::read_frame::<ConsoleFrame, _>(&mut recv, version, MAX_BODY, &mut buf),
    )
    .await
    .map_err(|_| unreachable("the node did not answer within 10s"))?
    .map_err(unreachable)?;
    let took_over = match first {
        ConsoleFrame::Attached { took_over } => took_over,
        ConsoleFrame::Ended(ConsoleEnd::Busy) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "console_busy",
                format!(
                    "another session is typing on the console of VM {name}: \
                     `zy vm console {name} --force` takes it over, `--read-only` watches"
                ),
            ))
        }
        ConsoleFrame::Ended(_) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_running",
                format!("VM {name} is not running on its node: its console is closed"),
            ))
        }
        other => {
            return Err(unreachable(format!(
                "the node answered a console attach with {other:?}"
            )))
        }
    };
    let name = name.to_string();
    let token = caller.map(|t| t.to_string()).unwrap_or_default();
    info!(vm = %name, %token, ?mode, took_over, "interactive console attached");
    Ok(upgrade.on_upgrade(move |ws| async move {
        relay(ws, send, recv, version, took_over).await;
        info!(vm = %name, %token, "interactive console ended");
    }))
}

/// Relays one attached session between the WebSocket and the node's stream.
async fn relay(
    mut ws: WebSocket,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    version: u16,
    took_over: bool,
) {
    let notice = |e: ConsoleEvent| {
        WsMessage::Text(
            serde_json::to_string(&e)
                .unwrap_or_else(|_| "{}".into())
                .into(),
        )
    };
    if took_over && ws.send(notice(ConsoleEvent::TookOver)).await.is_err() {
        return;
    }
    // The node's frames are read on their own so that a half-read frame is never
    // abandoned by select!.
    let (tx, mut from_node) = tokio::sync::mpsc::channel::<Option<ConsoleFrame>>(16);
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            let f = wire::read_frame::<ConsoleFrame, _>(&mut recv, version, MAX_BODY, &mut buf)
                .await
                .ok()
                .filter(|f| f.validate().is_ok());
            let end = f.is_none();
            if tx.send(f).await.is_err() || end {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let last = loop {
        tokio::select! {
            f = from_node.recv() => match f.flatten() {
                Some(ConsoleFrame::Output(bytes)) => {
                    if ws.send(WsMessage::Binary(bytes.into())).await.is_err() {
                        break None;
                    }
                }
                Some(ConsoleFrame::Skipped(chunks)) => {
                    if ws.send(notice(ConsoleEvent::Skipped { chunks })).await.is_err() {
                        break None;
                    }
                }
                Some(ConsoleFrame::Ended(ConsoleEnd::TakenOver)) => break Some(ConsoleEvent::TakenOver),
                Some(ConsoleFrame::Ended(_)) => break Some(ConsoleEvent::Closed),
                // A frame only the coordinator sends, or a broken or lost stream.
                Some(_) | None => break Some(ConsoleEvent::NodeLost),
            },
            m = ws.recv() => match m {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let mut failed = false;
                    for chunk in bytes.chunks(MAX_CONSOLE_CHUNK) {
                        let f = ConsoleFrame::Input(chunk.to_vec());
                        if wire::write_frame(&mut send, version, &f).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed {
                        break Some(ConsoleEvent::NodeLost);
                    }
                }
                // Pings are answered by the WebSocket itself; text is not input.
                Some(Ok(WsMessage::Text(_) | WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                // The client left.
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break None,
            },
        }
    };
    let _ = send.finish();
    if let Some(event) = last {
        let _ = ws.send(notice(event)).await;
        let _ = ws
            .send(WsMessage::Close(Some(CloseFrame {
                code: 1000,
                reason: "console ended".into(),
            })))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_chooses_the_log_or_an_interactive_mode() {
        assert_eq!(
            parse_query("").unwrap(),
            Ask::Log {
                lines: 100,
                follow: false
            }
        );
        assert_eq!(
            parse_query("lines=5&follow=true").unwrap(),
            Ask::Log {
                lines: 5,
                follow: true
            }
        );
        assert_eq!(
            parse_query("interactive=true").unwrap(),
            Ask::Interactive(ConsoleMode::Write)
        );
        assert_eq!(
            parse_query("interactive=true&force=true").unwrap(),
            Ask::Interactive(ConsoleMode::TakeOver)
        );
        assert_eq!(
            parse_query("interactive=true&read_only=true").unwrap(),
            Ask::Interactive(ConsoleMode::ReadOnly)
        );
        for bad in [
            "interactive=true&force=true&read_only=true",
            "interactive=true&lines=3",
            "force=true",
            "lines=100001",
            "interactive=yes",
            "shell=1",
        ] {
            assert!(parse_query(bad).is_err(), "{bad}");
        }
    }
}
