//! When the node renews its certificate: the decisions, without I/O or clocks (the link
//! passes the wall time in and does the sending).
//!
//! ```text
//!            renew_at (a third left, spread per node)     CertRenewed(Ok)
//!   Idle ------------------------------------------> Pending ------------> Idle (new cert)
//!    ^                                                  |  CertRenewed(Err), no answer in
//!    |            retry_at (jittered, sooner as          |  ANSWER_TIMEOUT, session ended
//!    +------------ the end nears) <---- Backoff <-------+
//! ```
//!
//! A new key is made for every request (see `SiteCa::renew_node`), kept in memory until the
//! certificate for it arrives, and written with it as a pair. The session the request went
//! out on is never touched: the new certificate is used from the next connection on.

use zy_common::tls::{renew_at_ms, renewal_retry_ms, CertInfo};

/// How long an answer to a renewal request is waited for.
pub const ANSWER_TIMEOUT_MS: u64 = 30_000;

/// What the link should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing until this wall time (ms).
    WaitUntil(u64),
    /// Make a key and send a request for it (then call [`Renewal::sent`]).
    Request,
}

/// The renewal state of one agent run; it outlives sessions.
#[derive(Debug)]
pub struct Renewal {
    spread: f64,
    pending: Option<Pending>,
    retry_at_ms: Option<u64>,
}

#[derive(Debug)]
struct Pending {
    key_pem: String,
    give_up_at_ms: u64,
}

impl Renewal {
    /// `spread` (0.0 to 1.0, fixed per node) brings the renewal forward by up to a twelfth
    /// of the validity, so nodes enrolled together do not all renew at once.
    pub fn new(spread: f64) -> Self {
        Self {
            spread,
            pending: None,
            retry_at_ms: None,
        }
    }

    /// What to do at `now_ms` for the certificate held now. A request left unanswered past
    /// its timeout counts as failed.
    pub fn step(&mut self, cert: &CertInfo, now_ms: u64, jitter: f64) -> Step {
        if let Some(p) = &self.pending {
            if now_ms < p.give_up_at_ms {
                return Step::WaitUntil(p.give_up_at_ms);
            }
            self.failed(cert, now_ms, jitter);
        }
        let due = self
            .retry_at_ms
            .unwrap_or_else(|| renew_at_ms(cert.not_before_ms, cert.not_after_ms, self.spread));
        if now_ms >= due {
            Step::Request
        } else {
            Step::WaitUntil(due)
        }
    }

    /// A request for the key `key_pem` went out at `now_ms`.
    pub fn sent(&mut self, key_pem: String, now_ms: u64) {
        self.pending = Some(Pending {
            key_pem,
            give_up_at_ms: now_ms + ANSWER_TIMEOUT_MS,
        });
    }

    /// The coordinator issued a certificate: the key it is for, if a request was pending.
    pub fn issued(&mut self) -> Option<String> {
        self.retry_at_ms = None;
        self.pending.take().map(|p| p.key_pem)
    }

    /// The request failed (refused, unanswered, or the certificate could not be stored):
    /// try again after a jittered wait that shrinks as the certificate's end nears.
    pub fn failed(&mut self, cert: &CertInfo, now_ms: u64, jitter: f64) -> u64 {
        self.pending = None;
        let wait = renewal_retry_ms(now_ms, cert.not_after_ms, jitter);
        self.retry_at_ms = Some(now_ms + wait);
        wait
    }

    /// The session ended: an answer to a pending request will never come. The request
    /// is made again on the next session, at once.
    pub fn session_ended(&mut self) {
        if self.pending.take().is_some() {
            self.retry_at_ms = None;
        }
    }
}

/// A node's fixed spread, from its id: the same across restarts, different across nodes.
pub fn spread_of(node: &zy_common::ids::NodeId) -> f64 {
    let b = node.as_bytes();
    f64::from(u16::from_le_bytes([b[0], b[1]])) / f64::from(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before_ms: u64, not_after_ms: u64) -> CertInfo {
        CertInfo {
            subject: "CN=n".into(),
            serial: "01".into(),
            sans: vec![],
            not_before_ms,
            not_after_ms,
            fingerprint: zy_common::tls::CaFingerprint([0; 32]),
        }
    }

    #[test]
    fn renews_at_two_thirds_retries_with_backoff_and_gives_up_on_silence() {
        let day = 86_400_000;
        let c = cert(0, 7 * day);
        let mut r = Renewal::new(0.0);
        let due = 7 * day - 7 * day / 3;
        assert_eq!(r.step(&c, 0, 1.0), Step::WaitUntil(due));
        assert_eq!(r.step(&c, due - 1, 1.0), Step::WaitUntil(due));
        assert_eq!(r.step(&c, due, 1.0), Step::Request);
        r.sent("k1".into(), due);
        // While the request is out: wait for its answer, not a second request.
        assert_eq!(
            r.step(&c, due + 1, 1.0),
            Step::WaitUntil(due + ANSWER_TIMEOUT_MS)
        );
        // No answer in time: failed, retried after a bounded, jittered wait.
        let t = due + ANSWER_TIMEOUT_MS;
        match r.step(&c, t, 1.0) {
            Step::WaitUntil(at) => assert_eq!(at, t + 600_000),
            s => panic!("{s:?}"),
        }
        assert_eq!(r.step(&c, t + 600_000, 1.0), Step::Request);
        r.sent("k2".into(), t + 600_000);
        // Refused: the next try comes sooner as the end nears.
        let late = 7 * day - 40_000;
        let wait = r.failed(&c, late, 1.0);
        assert_eq!(wait, 2_000);
        assert_eq!(r.step(&c, late + 1_999, 1.0), Step::WaitUntil(late + 2_000));
        assert_eq!(r.step(&c, late + 2_000, 1.0), Step::Request);
        r.sent("k3".into(), late + 2_000);
        // Issued: the key of the request, and back to the new certificate's schedule.
        assert_eq!(r.issued().as_deref(), Some("k3"));
        assert_eq!(r.issued(), None);
        let c2 = cert(7 * day, 14 * day);
        assert_eq!(
            r.step(&c2, 7 * day, 1.0),
            Step::WaitUntil(14 * day - 7 * day / 3)
        );
    }

    #[test]
    fn a_session_that_ends_mid_request_asks_again_at_once_and_spread_is_per_node() {
        let c = cert(0, 60_000);
        let mut r = Renewal::new(1.0);
        // Spread: up to a twelfth earlier.
        assert_eq!(r.step(&c, 0, 1.0), Step::WaitUntil(40_000 - 5_000));
        r.sent("k".into(), 35_000);
        r.session_ended();
        assert_eq!(r.step(&c, 36_000, 1.0), Step::Request);
        // A failure survives the session's end: no storm of requests on reconnect.
        r.failed(&c, 36_000, 1.0);
        r.session_ended();
        assert_eq!(r.step(&c, 36_500, 1.0), Step::WaitUntil(37_200));
        let (a, b) = (
            zy_common::ids::NodeId::new_random(),
            zy_common::ids::NodeId::new_random(),
        );
        assert_eq!(spread_of(&a), spread_of(&a));
        assert!((0.0..=1.0).contains(&spread_of(&b)));
    }
}
