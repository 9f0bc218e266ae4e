//! The live view of every node: membership state, inventory, load, and the session that
//! connects it. Owned in memory, made durable through [`crate::store::Store::apply`] in
//! batches by the membership monitor.
//!
//! Locking: one mutex, held only for map updates, never across an await or I/O.

pub mod certs;
pub mod daemon;
pub mod membership;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use zy_common::ids::{NodeId, Zone};
use zy_common::proto::{
    CommandKind, Inventory, LoadReport, Message, RefusalCode, Reply, ReplyError, ReplyKind,
};
use zy_common::quic::Timings;

use crate::fleet::membership::NodeState;
use crate::store::{NodeRecord, NodeUpdate, RemovedRecord, TransitionRecord};

/// One live connection of a node.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    pub remote: SocketAddr,
    /// Outgoing messages; bounded, so a stuck node cannot eat memory.
    pub tx: mpsc::Sender<Message>,
    kick: Arc<watch::Sender<Option<Kick>>>,
    /// The QUIC connection, to open streams to the node (absent in tests without QUIC).
    pub conn: Option<quinn::Connection>,
    /// The protocol version negotiated on the control stream; the streams use it too.
    pub version: u16,
    pending: Arc<Mutex<Pending>>,
    next_command: Arc<AtomicU64>,
}

/// Commands waiting for replies; closed once the session ends, so that every waiter fails
/// at once instead of waiting out its timeout.
#[derive(Debug, Default)]
struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    closed: bool,
}

/// Why a session is being closed from outside its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kick {
    pub close_code: u32,
    pub refusal: Option<Refused>,
    pub reason: String,
}

impl Session {
    /// A session with its outgoing queue; the receiver tells the session's task when
    /// someone else (a removal, a newer connection) wants it closed.
    pub fn new(
        id: u64,
        remote: SocketAddr,
        tx: mpsc::Sender<Message>,
    ) -> (Self, watch::Receiver<Option<Kick>>) {
        let (kick, kicked) = watch::channel(None);
        let s = Self {
            id,
            remote,
            tx,
            kick: Arc::new(kick),
            conn: None,
            version: zy_common::wire::PROTOCOL_VERSIONS.max,
            pending: Arc::default(),
            next_command: Arc::new(AtomicU64::new(1)),
        };
        (s, kicked)
    }

    /// The same session, with its QUIC connection and the version spoken on it.
    pub fn with_conn(mut self, conn: quinn::Connection, version: u16) -> Self {
        self.conn = Some(conn);
        self.version = version;
        self
    }

    /// Asks the session's task to close the connection.
    pub fn kick(&self, kick: Kick) {
        let _ = self.kick.send(Some(kick));
    }

    /// Sends a command and waits for its reply. Refuses at once ("busy") if the node's
    /// queue is full rather than waiting behind it.
    pub async fn command(
        &self,
        kind: CommandKind,
        timeout: Duration,
    ) -> Result<ReplyKind, CommandError> {
        let id = self.next_command.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            if p.closed {
                return Err(CommandError::Disconnected);
            }
            p.waiting.insert(id, tx);
        }
        let msg = Message::Command(zy_common::proto::Command { id, kind });
        if let Err(e) = self.tx.try_send(msg) {
            lock(&self.pending).waiting.remove(&id);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => CommandError::Busy,
                mpsc::error::TrySendError::Closed(_) => CommandError::Disconnected,
            });
        }
        let reply = tokio::time::timeout(timeout, rx).await;
        lock(&self.pending).waiting.remove(&id);
        match reply {
            Ok(Ok(r)) => r.result.map_err(CommandError::Rejected),
            Ok(Err(_)) => Err(CommandError::Disconnected),
            Err(_) => Err(CommandError::Timeout),
        }
    }

    /// Routes a reply to the command waiting for it; unknown ids are ignored.
    pub fn deliver(&self, reply: Reply) {
        if let Some(tx) = lock(&self.pending).waiting.remove(&reply.id) {
            let _ = tx.send(reply);
        }
    }

    /// The session ended: every command waiting for a reply fails now with
    /// [`CommandError::Disconnected`], and new ones fail at once.
    pub fn close(&self) {
        let mut p = lock(&self.pending);
        p.closed = true;
        p.waiting.clear();
    }
}

/// Why a command to a node did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("the node disconnected before it answered")]
    Disconnected,
    #[error("the node's command queue is full; try again")]
    Busy,
    #[error("the node did not answer in time")]
    Timeout,
    #[error("the node did not do it: {0}")]
    Rejected(ReplyError),
}

/// A node as the fleet holds it.
#[derive(Debug, Clone)]
pub struct NodeLive {
    pub record: NodeRecord,
    pub load: Option<LoadReport>,
    /// Monotonic time of the last sign of life (report or hello).
    pub last_report: Instant,
    /// Wall time of the same, for display.
    pub last_report_ms: u64,
    pub session: Option<Session>,
    pub connected_since_ms: Option<u64>,
}

impl NodeLive {
    /// A node not connected yet, whose silence counts from `now`.
    fn fresh(record: NodeRecord, now: Instant) -> Self {
        Self {
            last_report_ms: record.last_seen_ms,
            record,
            load: None,
            last_report: now,
            session: None,
            connected_since_ms: None,
        }
    }
}

/// Why a node's connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<NodeId, NodeLive>,
    removed: HashSet<NodeId>,
    pending: Vec<NodeUpdate>,
}

/// Every node of the site.
#[derive(Debug)]
pub struct Fleet {
    inner: Mutex<Inner>,
    timings: Timings,
    next_session: AtomicU64,
    /// Bumped whenever a session is attached or detached or a node removed, so that work
    /// that depends only on who is connected (peer updates) can skip a fleet that did not
    /// change.
    epoch: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fleet {
    /// The fleet as the store last knew it. Every node gets a full grace period from
    /// `now` before silence counts against it: the coordinator was away, not the nodes.
    pub fn new(
        records: Vec<NodeRecord>,
        removed: Vec<RemovedRecord>,
        timings: Timings,
        now: Instant,
    ) -> Self {
        let nodes = records
            .into_iter()
            .map(|record| (record.id, NodeLive::fresh(record, now)))
            .collect();
        Self {
            inner: Mutex::new(Inner {
                nodes,
                removed: removed.into_iter().map(|r| r.id).collect(),
                pending: Vec::new(),
            }),
            timings,
            next_session: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
        }
    }

    /// The timings in force.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a certificate holder may connect.
    pub fn admit(&self, id: NodeId, zone: Zone) -> Result<(), Refused> {
        let inner = lock(&self.inner);
        if inner.removed.contains(&id) {
            return Err(Refused {
                code: RefusalCode::NodeRemoved,
                message: format!("node {id} was removed from this coordinator; to bring the server back, enroll it again with a new token (zy-agent join)"),
            });
        }
        match inner.nodes.get(&id) {
            None => Err(Refused {
                code: RefusalCode::UnknownNode,
                message: format!("node {id} is not enrolled here"),
            }),
            Some(n) if n.record.zone != zone => Err(Refused {
                code: RefusalCode::BadRequest,
                message: format!(
                    "node {id} is enrolled in zone {}, not {zone}",
                    n.record.zone
                ),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Records a new enrollment.
    pub fn insert_enrolled(&self, record: NodeRecord, now: Instant) {
        lock(&self.inner)
            .nodes
            .insert(record.id, NodeLive::fresh(record, now));
    }

    /// A node said Hello: attach its session, take its inventory, mark it alive.
    /// Returns the session it replaces, for the caller to close.
    pub fn attach(
        &self,
        id: NodeId,
        session: Session,
        inventory: Inventory,
        now: Instant,
        now_ms: u64,
    ) -> Result<Option<Session>, Refused> {
        let mut inner = lock(&self.inner);
        let Inner { nodes, pending, .. } = &mut *inner;
        let Some(node) = nodes.get_mut(&id) else {
            return Err(Refused {
                code: RefusalCode::NodeRemoved,
                message: format!("node {id} was removed"),
            });
        };
        let old = node.session.replace(session);
        self.epoch.fetch_add(1, Ordering::Relaxed);
        node.connected_since_ms = Some(now_ms);
        node.record.inventory = Some(inventory.clone());
        node.last_report = now;
        node.last_report_ms = now_ms;
        let transition = revive(node, now_ms, "connected");
        pending.push(NodeUpdate {
            node: id,
            last_seen_ms: now_ms,
            inventory: Some(inventory),
            transition,
        });
        Ok(old)
    }

    /// A load report arrived on `session`.
    pub fn report(&self, id: NodeId, session: u64, load: LoadReport, now: Instant, now_ms: u64) {
        let mut inner = lock(&self.inner);
        let Inner { nodes, pending, .. } = &mut *inner;
        let Some(node) = nodes.get_mut(&id) else {
            return;
        };
        if node.session.as_ref().map(|s| s.id) != Some(session) {
            return;
        }
        node.load = Some(load);
        node.last_report = now;
        node.last_report_ms = now_ms;
        if let Some(t) = revive(node, now_ms, "reporting again") {
            pending.push(NodeUpdate {
                node: id,
                last_seen_ms: now_ms,
                inventory: None,
                transition: Some(t),
            });
        }
    }

    /// A session ended. Silence, not the disconnect, drives membership: a node whose link
    /// flapped is back before anyone notices.
    pub fn detach(&self, id: NodeId, session: u64) {
        let mut inner = lock(&self.inner);
        let Inner { nodes, pending, .. } = &mut *inner;
        if let Some(node) = nodes.get_mut(&id) {
            if node.session.as_ref().map(|s| s.id) == Some(session) {
                node.session = None;
                self.epoch.fetch_add(1, Ordering::Relaxed);
                node.connected_since_ms = None;
                pending.push(NodeUpdate {
                    node: id,
                    last_seen_ms: node.last_report_ms,
                    inventory: None,
                    transition: None,
                });
            }
        }
    }

    /// Applies silence to every node and returns the updates to make durable (including
    /// those queued by reports since the last tick).
    pub fn tick(&self, now: Instant, now_ms: u64) -> Vec<NodeUpdate> {
        let mut inner = lock(&self.inner);
        let Inner { nodes, pending, .. } = &mut *inner;
        for node in nodes.values_mut() {
            // A node on standby was powered down on purpose: its silence is expected, and
            // raises no Suspect or Down (it counts again from its wake).
            if node.record.admin == crate::store::Admin::Standby {
                continue;
            }
            let silence = now.saturating_duration_since(node.last_report);
            if let Some(to) = node.record.state.on_silence(silence, &self.timings) {
                let t = TransitionRecord {
                    node: node.record.id,
                    from: node.record.state,
                    to,
                    at_ms: now_ms,
                    reason: format!("no report for {:.1}s", silence.as_secs_f32()),
                };
                node.record.state = to;
                node.record.state_since_ms = now_ms;
                pending.push(NodeUpdate {
                    node: node.record.id,
                    last_seen_ms: node.last_report_ms,
                    inventory: None,
                    transition: Some(t),
                });
            }
        }
        std::mem::take(pending)
    }

    /// Forgets a node and refuses it from now on. Returns its session to close.
    pub fn remove(&self, id: NodeId) -> Option<Session> {
        let mut inner = lock(&self.inner);
        self.epoch.fetch_add(1, Ordering::Relaxed);
        inner.removed.insert(id);
        inner.pending.retain(|u| u.node != id);
        inner.nodes.remove(&id).and_then(|n| n.session)
    }

    /// A copy of every node, sorted by name.
    pub fn snapshot(&self) -> Vec<NodeLive> {
        let inner = lock(&self.inner);
        let mut v: Vec<NodeLive> = inner.nodes.values().cloned().collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    /// One node, by id or by name.
    pub fn find(&self, key: &str) -> Option<NodeLive> {
        let inner = lock(&self.inner);
        if let Ok(id) = key.parse::<NodeId>() {
            return inner.nodes.get(&id).cloned();
        }
        inner.nodes.values().find(|n| n.record.name == key).cloned()
    }

    /// Notes the certificate a node holds now (connected with, or just issued). Returns
    /// false if it was known already or the node is not enrolled: nothing to make durable.
    pub fn note_cert(&self, id: NodeId, cert: &crate::store::NodeCert) -> bool {
        let mut inner = lock(&self.inner);
        match inner.nodes.get_mut(&id) {
            Some(n) if n.record.cert.as_ref() != Some(cert) => {
                n.record.cert = Some(cert.clone());
                true
            }
            _ => false,
        }
    }

    /// Takes up a change of what ops asked of a node, made durable by the caller. A node
    /// leaving Standby gets a full grace period from `now` before its silence counts: it
    /// is booting.
    pub fn set_admin(&self, id: NodeId, admin: crate::store::Admin, since_ms: u64, now: Instant) {
        let mut inner = lock(&self.inner);
        if let Some(n) = inner.nodes.get_mut(&id) {
            if n.record.admin == crate::store::Admin::Standby
                && admin != crate::store::Admin::Standby
            {
                n.last_report = now;
            }
            n.record.admin = admin;
            n.record.admin_since_ms = since_ms;
        }
    }

    /// Changes whenever who is connected changes.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// The connected nodes among `ids`, with their zone and session: the cost is that of
    /// `ids`, not of the fleet (a site of 10,000 nodes is asked this every reconciler tick).
    pub fn connected_among<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a NodeId>,
    ) -> Vec<(NodeId, Zone, Session)> {
        let inner = lock(&self.inner);
        ids.into_iter()
            .filter_map(|id| {
                let n = inner.nodes.get(id)?;
                Some((*id, n.record.zone, n.session.clone()?))
            })
            .collect()
    }

    /// The name of an enrolled node.
    pub fn name_of(&self, id: NodeId) -> Option<String> {
        lock(&self.inner)
            .nodes
            .get(&id)
            .map(|n| n.record.name.clone())
    }

    /// The ids of every enrolled node.
    pub fn enrolled(&self) -> HashSet<NodeId> {
        lock(&self.inner).nodes.keys().copied().collect()
    }

    /// The enrolled nodes among `ids`.
    pub fn enrolled_among(&self, ids: impl IntoIterator<Item = NodeId>) -> HashSet<NodeId> {
        let inner = lock(&self.inner);
        ids.into_iter()
            .filter(|id| inner.nodes.contains_key(id))
            .collect()
    }

    /// The session of a node, to send it commands.
    pub fn session(&self, id: NodeId) -> Option<Session> {
        lock(&self.inner)
            .nodes
            .get(&id)
            .and_then(|n| n.session.clone())
    }

    /// Counts of nodes per state.
    pub fn counts(&self) -> HashMap<NodeState, usize> {
        let mut out = HashMap::new();
        for n in lock(&self.inner).nodes.values() {
            *out.entry(n.record.state).or_default() += 1;
        }
        out
    }
}

fn revive(node: &mut NodeLive, now_ms: u64, reason: &str) -> Option<TransitionRecord> {
    let to = node.record.state.on_report()?;
    let t = TransitionRecord {
        node: node.record.id,
        from: node.record.state,
        to,
        at_ms: now_ms,
        reason: reason.to_string(),
    };
    node.record.state = to;
    node.record.state_since_ms = now_ms;
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zy_common::ids::TokenId;
    use zy_common::proto::Accel;

    fn record(name: &str, zone: Zone) -> NodeRecord {
        NodeRecord {
            id: NodeId::new_random(),
            name: name.into(),
            zone,
            state: NodeState::Enrolled,
            state_since_ms: 0,
            enrolled_at_ms: 0,
            token: TokenId([0; 8]),
            last_seen_ms: 0,
            inventory: None,
            cert: None,
            admin: crate::store::Admin::Active,
            admin_since_ms: 0,
        }
    }

    fn inventory(zone: Zone) -> Inventory {
        Inventory {
            hostname: "h".into(),
            cpu_model: "c".into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            disk_total_bytes: 10,
            disk_free_bytes: 5,
            kvm_usable: false,
            accel: Accel::Tcg,
            zone,
            agent_version: "0".into(),
            kernel: "k".into(),
        }
    }

    fn session(
        fleet: &Fleet,
    ) -> (
        Session,
        mpsc::Receiver<Message>,
        watch::Receiver<Option<Kick>>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let (s, k) = Session::new(fleet.next_session_id(), "127.0.0.1:1".parse().unwrap(), tx);
        (s, rx, k)
    }

    fn load(seq: u64) -> LoadReport {
        LoadReport {
            seq,
            cpu_percent: 1.0,
            mem_used_bytes: 1,
            mem_available_bytes: 1,
            load1: 0.0,
            load5: 0.0,
            load15: 0.0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            disk_free_bytes: 0,
        }
    }

    #[test]
    fn heartbeats_drive_membership_with_a_fake_clock() {
        let t0 = Instant::now();
        let r = record("n1", Zone::Intranet);
        let id = r.id;
        let fleet = Fleet::new(vec![r], vec![], Timings::default(), t0);
        assert!(fleet.admit(id, Zone::Extranet).is_err());
        fleet.admit(id, Zone::Intranet).unwrap();
        let (s, _rx, _k) = session(&fleet);
        let sid = s.id;
        assert!(fleet
            .attach(id, s, inventory(Zone::Intranet), t0, 0)
            .unwrap()
            .is_none());
        let ups = fleet.tick(t0, 0);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].transition.as_ref().unwrap().to, NodeState::Ready);

        let t = Timings::default();
        assert!(fleet.tick(t0 + t.suspect_after / 2, 1).is_empty());
        let ups = fleet.tick(t0 + t.suspect_after, 2);
        assert_eq!(ups[0].transition.as_ref().unwrap().to, NodeState::Suspect);
        let ups = fleet.tick(t0 + t.down_after, 3);
        assert_eq!(ups[0].transition.as_ref().unwrap().to, NodeState::Down);
        // A report on a stale session id is ignored; on the live one it revives.
        fleet.report(id, sid + 100, load(1), t0 + t.down_after, 4);
        assert!(fleet.tick(t0 + t.down_after, 4).is_empty());
        fleet.report(id, sid, load(2), t0 + t.down_after, 5);
        let ups = fleet.tick(t0 + t.down_after, 5);
        assert_eq!(ups[0].transition.as_ref().unwrap().to, NodeState::Ready);
        assert_eq!(fleet.find("n1").unwrap().load.unwrap().seq, 2);
    }

    #[test]
    fn a_standby_nodes_silence_raises_nothing_and_counts_again_from_its_wake() {
        let t0 = Instant::now();
        let r = record("n1", Zone::Intranet);
        let id = r.id;
        let fleet = Fleet::new(vec![r], vec![], Timings::default(), t0);
        let (s, _rx, _k) = session(&fleet);
        fleet
            .attach(id, s, inventory(Zone::Intranet), t0, 0)
            .unwrap();
        fleet.tick(t0, 0);
        fleet.set_admin(id, crate::store::Admin::Standby, 1, t0);
        let t = Timings::default();
        let late = t0 + t.down_after * 10;
        assert!(fleet.tick(late, 2).is_empty(), "no Suspect, no Down");
        assert_eq!(fleet.find("n1").unwrap().record.state, NodeState::Ready);
        // Woken: a full grace from the wake, then silence counts as usual.
        fleet.set_admin(id, crate::store::Admin::Active, 3, late);
        assert!(fleet.tick(late + t.suspect_after / 2, 4).is_empty());
        let ups = fleet.tick(late + t.down_after, 5);
        assert_eq!(ups[0].transition.as_ref().unwrap().to, NodeState::Down);
    }

    #[test]
    fn a_newer_session_replaces_and_removal_refuses() {
        let t0 = Instant::now();
        let r = record("n1", Zone::Extranet);
        let id = r.id;
        let fleet = Fleet::new(vec![r], vec![], Timings::default(), t0);
        let (a, _rxa, _ka) = session(&fleet);
        let (b, _rxb, _kb) = session(&fleet);
        let aid = a.id;
        fleet
            .attach(id, a, inventory(Zone::Extranet), t0, 0)
            .unwrap();
        let old = fleet
            .attach(id, b, inventory(Zone::Extranet), t0, 0)
            .unwrap()
            .unwrap();
        assert_eq!(old.id, aid);
        fleet.detach(id, aid);
        assert!(
            fleet.session(id).is_some(),
            "detaching the old session keeps the new one"
        );
        assert!(fleet.remove(id).is_some());
        let err = fleet.admit(id, Zone::Extranet).unwrap_err();
        assert_eq!(err.code, RefusalCode::NodeRemoved);
    }

    #[tokio::test]
    async fn commands_are_answered_or_refused_when_busy() {
        let fleet = Fleet::new(vec![], vec![], Timings::default(), Instant::now());
        let (s, mut rx, _k) = session(&fleet);
        let s2 = s.clone();
        let answer = tokio::spawn(async move {
            let Some(Message::Command(c)) = rx.recv().await else {
                panic!("no command")
            };
            s2.deliver(Reply {
                id: c.id,
                result: Ok(ReplyKind::Pong),
            });
            rx
        });
        let r = s
            .command(CommandKind::Ping, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r, ReplyKind::Pong);
        let _rx = answer.await.unwrap();
        for _ in 0..4 {
            let _ = s.tx.try_send(Message::Command(zy_common::proto::Command {
                id: 0,
                kind: CommandKind::Ping,
            }));
        }
        assert!(matches!(
            s.command(CommandKind::Ping, Duration::from_secs(1)).await,
            Err(CommandError::Busy)
        ));
    }

    /// Review finding 2: a call to a node whose session ended waited out its whole timeout.
    #[tokio::test]
    async fn pending_calls_fail_as_soon_as_the_session_ends() {
        let fleet = Fleet::new(vec![], vec![], Timings::default(), Instant::now());
        let (s, _rx, _k) = session(&fleet);
        let s2 = s.clone();
        let t0 = tokio::time::Instant::now();
        let waiting = tokio::spawn(async move {
            s2.command(CommandKind::Ping, Duration::from_secs(600))
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.close();
        let r = waiting.await.unwrap();
        assert!(matches!(r, Err(CommandError::Disconnected)), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        // And a new call after the end fails at once.
        assert!(matches!(
            s.command(CommandKind::Ping, Duration::from_secs(600)).await,
            Err(CommandError::Disconnected)
        ));
    }
}
