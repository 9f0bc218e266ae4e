//! The agent's link to its coordinator: one QUIC connection with mutual TLS, kept up for
//! as long as the agent runs.
//!
//! ```text
//!   +------------+  connected   +---------+  error / idle timeout  +---------+
//!   | Connecting | -----------> | Session | ---------------------> | Backoff |
//!   +------------+              +---------+                        +---------+
//!         ^                          | Refused (permanent)              |
//!         |                          v                                  |
//!         |                     exit (78)                               |
//!         +-------------------------------------------------------------+
//! ```
//!
//! The node keeps working while the coordinator is away: nothing on the node depends on the
//! link being up. The node's certificate is renewed over the session ([`crate::renew`]) and
//! taken into use at the next connection; one that has expired ends the agent (exit 78):
//! the coordinator would refuse it, and only a new enrollment helps. Reconnection waits grow exponentially with full jitter, so a thousand
//! agents that lost the same coordinator do not all come back in the same millisecond.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zy_common::task::AbortOnDrop;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use zy_common::proto::{
    close, CommandKind, Event, EventKind, Hello, Message, RefusalCode, Reply, ReplyKind,
};
use zy_common::time::now_millis;
use zy_common::wire::{self, StreamError, MAX_BODY, PROTOCOL_VERSIONS};

use crate::config::AgentConfig;
use crate::host::{self, LoadSampler};
use crate::identity::Identity;
use crate::net;
use crate::node::Node;
use crate::renew::{Renewal, Step};
use crate::uplink::Conn;
use crate::vm::actor::VmEvent;

/// A session that ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the coordinator refused this node ({code:?}): {message}")]
    Refused { code: RefusalCode, message: String },
    #[error(transparent)]
    Connect(#[from] net::ConnectError),
    #[error("the connection to the coordinator was lost: {0}")]
    Lost(String),
    #[error("the coordinator broke the protocol: {0}")]
    Protocol(String),
    #[error("cannot read this host: {0}")]
    Host(#[from] host::HostError),
    #[error("this node's certificate (serial {serial}) expired at {at}: the coordinator will not take it, so the node cannot reconnect. Re-enroll it: `zy node remove {name}` on the coordinator, delete {dir} here, then `zy-agent join` with a new token")]
    Expired {
        serial: String,
        at: String,
        name: String,
        dir: String,
    },
}

impl LinkError {
    /// True when retrying cannot help and the agent should stop.
    pub fn is_permanent(&self) -> bool {
        matches!(self, LinkError::Refused { code, .. } if code.is_permanent())
            || matches!(self, LinkError::Expired { .. })
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The cap of the next wait (before jitter).
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next wait: uniformly random in [cap/2, cap].
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let lo = cap / 2;
        lo + cap.saturating_sub(lo).mul_f64(rng.random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Keeps the link up until a permanent refusal. Never returns otherwise.
pub async fn run(
    config: &AgentConfig,
    identity: &Arc<Identity>,
    node: Arc<Node>,
    published: watch::Sender<Option<Conn>>,
    mut events: mpsc::Receiver<VmEvent>,
) -> LinkError {
    let addr = config
        .coordinator
        .clone()
        .unwrap_or_else(|| identity.node.coordinator.clone());
    let mut backoff = Backoff::new(Duration::from_millis(200), config.max_backoff);
    let mut sampler = LoadSampler::new(&config.data_dir);
    let mut endpoint: Option<(SocketAddr, quinn::Endpoint)> = None;
    let mut renewal = Renewal::new(crate::renew::spread_of(&identity.node.node_id));
    loop {
        let started = Instant::now();
        let result: Result<Never, LinkError> = async {
            let creds = identity.creds();
            if now_millis() >= creds.info.not_after_ms {
                return Err(LinkError::Expired {
                    serial: creds.info.serial.clone(),
                    at: zy_common::time::rfc3339(creds.info.not_after_ms),
                    name: identity.node.name.clone(),
                    dir: identity.dir().display().to_string(),
                });
            }
            let target = net::resolve(&addr).await?;
            let ep = match &endpoint {
                Some((t, ep)) if *t == target => ep.clone(),
                _ => {
                    let ep = net::endpoint(target)?;
                    endpoint = Some((target, ep.clone()));
                    ep
                }
            };
            session_inner(
                config,
                identity,
                &ep,
                target,
                &mut sampler,
                &node,
                &published,
                &mut events,
                &mut renewal,
            )
            .await
        }
        .await;
        renewal.session_ended();
        let result = match result {
            Ok(never) => match never {},
            Err(e) => e,
        };
        if result.is_permanent() {
            error!(error = %result, "giving up: the coordinator will not take this node");
            return result;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let delay = backoff.next_delay(&mut rand::rng());
        warn!(error = %result, retry_in_ms = delay.as_millis() as u64, "no link to the coordinator; the node keeps running");
        tokio::time::sleep(delay).await;
    }
}

/// Uninhabited: a session only ever ends with an error.
#[derive(Debug)]
pub enum Never {}

#[allow(clippy::too_many_arguments)]
async fn session_inner(
    config: &AgentConfig,
    identity: &Arc<Identity>,
    endpoint: &quinn::Endpoint,
    target: SocketAddr,
    sampler: &mut LoadSampler,
    node: &Arc<Node>,
    published: &watch::Sender<Option<Conn>>,
    events: &mut mpsc::Receiver<VmEvent>,
    renewal: &mut Renewal,
) -> Result<Never, LinkError> {
    // The key and certificate current now: a renewal during this session is used by the next.
    let creds = identity.creds();
    let tls = zy_common::tls::daemon_client_config(
        &identity.ca,
        creds.chain.clone(),
        creds.key.clone_key(),
    )
    .map_err(|e| LinkError::Protocol(e.to_string()))?;
    let conn = net::connect(endpoint, target, tls, config.idle_timeout).await?;
    let result = drive(
        config, identity, &conn, sampler, node, published, events, renewal,
    )
    .await;
    published.send_replace(None);
    let code = match &result {
        Err(LinkError::Refused { .. }) => close::REFUSED,
        Err(LinkError::Protocol(_)) => close::PROTOCOL,
        _ => close::SHUTDOWN,
    };
    conn.close(code.into(), b"agent closing");
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    config: &AgentConfig,
    identity: &Arc<Identity>,
    conn: &quinn::Connection,
    sampler: &mut LoadSampler,
    node: &Arc<Node>,
    published: &watch::Sender<Option<Conn>>,
    events: &mut mpsc::Receiver<VmEvent>,
    renewal: &mut Renewal,
) -> Result<Never, LinkError> {
    let lost = |e: quinn::ConnectionError| LinkError::Lost(net::explain(&e));
    let stream = |e: StreamError| match e {
        StreamError::Frame(f) => LinkError::Protocol(f.to_string()),
        StreamError::Version(v) => LinkError::Protocol(v.to_string()),
        StreamError::Io(io) => LinkError::Lost(net::explain_text(&io.to_string())),
        StreamError::Closed => LinkError::Lost("the coordinator closed the stream".into()),
    };
    let (send, recv) = conn.open_bi().await.map_err(lost)?;
    let mut io = tokio::io::join(recv, send);
    let version = wire::open_preamble(&mut io, PROTOCOL_VERSIONS)
        .await
        .map_err(stream)?;
    let inventory = host::inventory(&config.data_dir, identity.node.zone, config.accel)?;
    wire::write_frame(&mut io, version, &Message::Hello(Hello { inventory }))
        .await
        .map_err(stream)?;
    let mut buf = Vec::new();
    let first: Message = tokio::time::timeout(
        Duration::from_secs(10),
        wire::read_frame(&mut io, version, MAX_BODY, &mut buf),
    )
    .await
    .map_err(|_| LinkError::Lost("no welcome within 10s".into()))?
    .map_err(stream)?;
    first
        .validate()
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    let mut interval = match first {
        Message::Welcome(w) if w.node_id == identity.node.node_id => {
            Duration::from_millis(w.report_interval_ms.into())
        }
        Message::Welcome(w) => {
            return Err(LinkError::Protocol(format!(
                "welcomed as node {}, but this is node {}",
                w.node_id, identity.node.node_id
            )))
        }
        Message::Refused(r) => {
            return Err(LinkError::Refused {
                code: r.code,
                message: r.message,
            })
        }
        other => {
            return Err(LinkError::Protocol(format!(
                "expected Welcome, got {}",
                other.kind()
            )))
        }
    };
    info!(node = %identity.node.node_id, interval_ms = interval.as_millis() as u64, "connected to the coordinator");
    let (mut recv, mut send) = io.into_inner();
    // The full picture first; changes from before it are stale.
    while events.try_recv().is_ok() {}
    wire::write_frame(&mut send, version, &Message::VmReport(node.report()))
        .await
        .map_err(stream)?;
    // And what the node runs but does not know.
    for s in node
        .vms
        .strays()
        .iter()
        .filter(|s| crate::vm::runner::is_qemu_of(s.pid, s.id))
    {
        let message = format!(
            "QEMU pid {} runs VM {} that this node has no record of; it was left running",
            s.pid, s.id
        );
        let notice = Message::Event(Event {
            at_ms: now_millis(),
            kind: EventKind::Notice { message },
        });
        wire::write_frame(&mut send, version, &notice)
            .await
            .map_err(stream)?;
    }
    published.send_replace(Some(Conn {
        conn: conn.clone(),
        version,
    }));
    // Where this node is on the underlay, as the route to the coordinator says: a
    // migration's destination listens there when the VM's NICs do not say.
    if let Some(ip) = conn
        .local_ip()
        .or_else(|| route_source(conn.remote_address()))
    {
        node.set_underlay(ip);
    }
    // Migration progress: this session's alone (one session at a time holds it). A
    // version 3 coordinator never started a migration, and is sent none of it.
    let mut migration_events = node.migration_events.lock().await;
    let migrations = version >= zy_common::proto::MIGRATION_SINCE;
    // Streams the coordinator opens: console readers.
    let streams = tokio::spawn(serve_streams(conn.clone(), version, node.clone()));
    let _streams = AbortOnDrop(streams);
    // Replies of VM commands, which run as tasks of their own.
    let (reply_tx, mut reply_rx) = mpsc::channel::<Reply>(64);

    // The reader runs on its own so that a half-read frame is never abandoned by select!.
    let (in_tx, mut in_rx) = mpsc::channel::<Result<Message, LinkError>>(16);
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            let r = wire::read_frame::<Message, _>(&mut recv, version, MAX_BODY, &mut buf)
                .await
                .map_err(stream)
                .and_then(|m| {
                    m.validate()
                        .map(|()| m)
                        .map_err(|e| LinkError::Protocol(e.to_string()))
                });
            let stop = r.is_err();
            if in_tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);

    // Commands run as tasks of this session: when it ends they end with it, so that no
    // command of an ended session is carried out after the next session's report (what
    // they had started, an actor carries on; the coordinator sends again what it still
    // wants).
    let mut handlers = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let renews = version >= zy_common::proto::RENEWAL_SINCE;
    if !renews {
        warn!(version, "the coordinator speaks a protocol without certificate renewal; upgrade it before this node's certificate expires");
    }
    loop {
        // The next renewal step, looked at again at least every minute (the wall clock can
        // jump; tokio's cannot see it).
        let renew_in = match renews {
            true => match renewal.step(&identity.creds().info, now_millis(), jitter()) {
                Step::Request => Duration::ZERO,
                Step::WaitUntil(at) => Duration::from_millis(at.saturating_sub(now_millis())),
            },
            false => Duration::from_secs(3600),
        }
        .min(Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(renew_in), if renews => {
                if renewal.step(&identity.creds().info, now_millis(), jitter()) == Step::Request {
                    let (key, csr) = zy_common::tls::node_request(&identity.node.name)
                        .map_err(|e| LinkError::Protocol(format!("cannot make a new key: {e}")))?;
                    info!(serial = %identity.creds().info.serial, not_after = %zy_common::time::rfc3339(identity.creds().info.not_after_ms), "asking the coordinator to renew this node's certificate");
                    wire::write_frame(&mut send, version, &Message::RenewCert { csr_der: csr }).await.map_err(stream)?;
                    renewal.sent(key.serialize_pem(), now_millis());
                }
            }
            _ = ticker.tick() => {
                let load = sampler.sample()?;
                wire::write_frame(&mut send, version, &Message::Load(load)).await.map_err(stream)?;
            }
            msg = in_rx.recv() => {
                let msg = msg.ok_or_else(|| LinkError::Lost("reader stopped".into()))??;
                match msg {
                    Message::Command(c) => {
                        let result = match c.kind {
                            CommandKind::Ping => Ok(ReplyKind::Pong),
                            CommandKind::SetReportInterval { ms } => {
                                interval = Duration::from_millis(ms.into());
                                ticker = tokio::time::interval(interval);
                                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                                Ok(ReplyKind::Done)
                            }
                            vm_command => {
                                let node = node.clone();
                                let tx = reply_tx.clone();
                                let id = c.id;
                                handlers.spawn(async move {
                                    let result = node.handle(vm_command).await;
                                    let _ = tx.send(Reply { id, result }).await;
                                });
                                continue;
                            }
                        };
                        debug!(id = c.id, "command handled");
                        let reply = Message::Reply(Reply { id: c.id, result });
                        wire::write_frame(&mut send, version, &reply).await.map_err(stream)?;
                    }
                    Message::Refused(r) => {
                        return Err(LinkError::Refused { code: r.code, message: r.message });
                    }
                    Message::CertRenewed(result) if renews => {
                        on_renewed(identity, renewal, result).await;
                    }
                    other => {
                        return Err(LinkError::Protocol(format!("unexpected {} from the coordinator", other.kind())));
                    }
                }
            }
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            Some(reply) = reply_rx.recv() => {
                wire::write_frame(&mut send, version, &Message::Reply(reply)).await.map_err(stream)?;
            }
            Some(ev) = events.recv() => {
                let msg = Message::Event(Event { at_ms: ev.status.since_ms, kind: EventKind::Vm(ev.info()) });
                wire::write_frame(&mut send, version, &msg).await.map_err(stream)?;
            }
            Some(ev) = migration_events.recv() => {
                if migrations {
                    let msg = Message::Event(Event { at_ms: now_millis(), kind: EventKind::Migration(ev) });
                    wire::write_frame(&mut send, version, &msg).await.map_err(stream)?;
                }
            }
            e = conn.closed() => return Err(lost(e)),
        }
    }
}

/// The source address the kernel would use to reach `to`.
fn route_source(to: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let any: std::net::SocketAddr = match to {
        std::net::SocketAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
        std::net::SocketAddr::V6(_) => "[::]:0".parse().ok()?,
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(to).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// A uniform jitter factor in [0.5, 1.0].
fn jitter() -> f64 {
    0.5 + rand::rng().random::<f64>() / 2.0
}

/// The coordinator answered a renewal request: store the new pair, or schedule a retry.
async fn on_renewed(
    identity: &Arc<Identity>,
    renewal: &mut Renewal,
    result: Result<Vec<u8>, zy_common::proto::ReplyError>,
) {
    let old = identity.creds().info.clone();
    let cert = match result {
        Ok(cert) => cert,
        Err(e) => {
            let wait = renewal.failed(&old, now_millis(), jitter());
            warn!(reason = %e, retry_in_ms = wait, not_after = %zy_common::time::rfc3339(old.not_after_ms), "the coordinator refused to renew this node's certificate");
            return;
        }
    };
    let Some(key_pem) = renewal.issued() else {
        warn!("a certificate came that no pending request asked for; ignored");
        return;
    };
    let id = identity.clone();
    let stored = tokio::task::spawn_blocking(move || id.install(&key_pem, cert.into()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| zy_common::error::chain(&e)));
    match stored {
        Ok(new) => info!(
            old_serial = %old.serial,
            serial = %new.serial,
            not_after = %zy_common::time::rfc3339(new.not_after_ms),
            "certificate renewed; the next connection uses it"
        ),
        Err(e) => {
            let wait = renewal.failed(&old, now_millis(), jitter());
            error!(error = %e, retry_in_ms = wait, "cannot store the renewed certificate; the old one stays in use");
        }
    }
}

/// Serves streams the coordinator opens (consoles) until the connection ends.
async fn serve_streams(conn: quinn::Connection, version: u16, node: Arc<Node>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let node = node.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let first = tokio::time::timeout(
                Duration::from_secs(10),
                wire::read_frame::<Message, _>(&mut recv, version, MAX_BODY, &mut buf),
            )
            .await;
            let first = match first {
                // A message newer than the session's version is refused like garbage.
                Ok(Ok(m)) if m.since_version() <= version && m.validate().is_ok() => m,
                _ => {
                    let _ = send.reset(1u32.into());
                    return;
                }
            };
            match first {
                Message::Console { id, lines, follow } => {
                    if node.vms.get(id).is_none() {
                        let _ = send.reset(2u32.into());
                        return;
                    }
                    let log = crate::vm::spec::VmPaths::new(node.vms.data_dir(), id).console_log();
                    let _ = crate::vm::console::serve(&mut send, &log, lines, follow).await;
                }
                Message::ConsoleAttach { id, mode } => {
                    // A VM this node does not have has no console here either.
                    let hub = node.vms.get(id).and_then(|_| node.consoles.get(id));
                    let r = crate::vm::console::session(recv, &mut send, version, hub, mode).await;
                    match r {
                        Ok(()) => debug!(vm = %id, "console session ended"),
                        Err(e) => {
                            debug!(vm = %id, error = %zy_common::error::chain(&e), "console session failed")
                        }
                    }
                }
                _ => {
                    let _ = send.reset(1u32.into());
                    return;
                }
            }
            let _ = send.finish();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut caps = Vec::new();
        for _ in 0..12 {
            let cap = b.cap();
            let d = b.next_delay(&mut rng);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} not within [{:?}, {cap:?}]",
                cap / 2
            );
            caps.push(cap);
        }
        assert_eq!(caps[0], Duration::from_millis(200));
        assert_eq!(caps[1], Duration::from_millis(400));
        assert_eq!(*caps.last().unwrap(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.cap(), Duration::from_millis(200));
    }
}
