//! The site's certificates after enrollment: node certificates renewed over their link, the
//! coordinator's own server certificate renewed and swapped into its listeners, and
//! warnings before any certificate ends.
//!
//! ```text
//!  node certificate   issued ---- 2/3 ----> agent renews (RenewCert) --> new cert, same link
//!                                             |  refused / no link: retried, jittered
//!                                             v
//!                                  1/6 left: warning event --> expired: re-enroll the node
//!  server certificate issued ---- 2/3 ----> coordinator renews, writes the pair, swaps it
//!  site CA            ten years; warned of a year (or a sixth) before its end
//! ```
//!
//! Renewal decisions are the pure functions of [`zy_common::tls`] (`renew_at_ms`,
//! `warn_at_ms`, `renewal_retry_ms`); this module feeds them the wall clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tracing::{error, info, warn};
use zy_common::ids::NodeId;
use zy_common::proto::{ReplyError, ReplyErrorKind};
use zy_common::time::{now_millis, rfc3339};
use zy_common::tls::{self, CertInfo};

use crate::store::NodeCert;
use crate::Coordinator;

/// How often certificates are looked at, at most: a clock that jumps, or a node enrolled or
/// renewed meanwhile, is noticed within this (or a twelfth of a node certificate's validity,
/// if less: within the sixth before its end that warnings leave).
const CHECK_AT_LEAST_EVERY: Duration = Duration::from_secs(3600);
/// How often the same certificate is warned of, at most.
const WARN_AT_MOST_EVERY: Duration = Duration::from_secs(24 * 3600);
/// The site CA is warned of when this much of it is left (or a sixth, if less).
const CA_WARN_BEFORE_MS: u64 = 365 * 86_400_000;

/// Renews the certificate of the node whose session was authenticated with `current`, for
/// the key of `csr_der`. Refused for a node that was removed (or is not enrolled, or not in
/// the zone its certificate says): it could reconnect with the new certificate only to be
/// refused.
pub async fn renew_node(
    coord: &Coordinator,
    current: &[u8],
    csr_der: &[u8],
) -> Result<CertificateDer<'static>, ReplyError> {
    let who = tls::NodeIdentity::from_cert(current)
        .map_err(|e| ReplyError::new(ReplyErrorKind::Refused, e.to_string()))?;
    coord
        .fleet
        .admit(who.node_id, who.zone)
        .map_err(|r| ReplyError::new(ReplyErrorKind::Refused, r.message))?;
    let (_, cert) = coord
        .ca
        .renew_node(csr_der, current, coord.config.certs.node_validity)
        .map_err(|e| ReplyError::new(ReplyErrorKind::Refused, zy_common::error::chain(&e)))?;
    let info = CertInfo::parse(&cert)
        .map_err(|e| ReplyError::new(ReplyErrorKind::Failed, e.to_string()))?;
    note_node_cert(coord, who.node_id, &info)
        .await
        .map_err(|e| ReplyError::new(ReplyErrorKind::Failed, e))?;
    let name = coord
        .fleet
        .find(&who.node_id.to_string())
        .map(|n| n.record.name)
        .unwrap_or_default();
    info!(node = %who.node_id, %name, serial = %info.serial, not_after = %rfc3339(info.not_after_ms), "node certificate renewed");
    coord.events.publish(
        "cert",
        who.node_id.to_string(),
        name,
        "renewed".into(),
        format!(
            "node certificate renewed: serial {}, valid until {}",
            info.serial,
            rfc3339(info.not_after_ms)
        ),
    );
    Ok(cert)
}

/// Records the certificate a node holds now (in the fleet, and durably if it changed).
pub async fn note_node_cert(
    coord: &Coordinator,
    node: NodeId,
    info: &CertInfo,
) -> Result<(), String> {
    let cert = NodeCert::of(info);
    if !coord.fleet.note_cert(node, &cert) {
        return Ok(());
    }
    let store = coord.store.clone();
    match tokio::task::spawn_blocking(move || store.set_node_cert(node, &cert)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "cannot record the node's certificate: {}",
            zy_common::error::chain(&e)
        )),
        Err(e) => Err(format!("cannot record the node's certificate: {e}")),
    }
}

/// Why the server certificate wants renewing now, if it does.
fn server_renewal_reason(info: &CertInfo, advertised: Option<&str>, now_ms: u64) -> Option<String> {
    if info.validity_ms() > tls::SERVER_VALIDITY_MAX.as_millis() as u64 {
        return Some(format!(
            "it lasts {} days, more than the {} days clients accept",
            info.validity_ms() / 86_400_000,
            tls::SERVER_VALIDITY_MAX.as_secs() / 86_400
        ));
    }
    if let Some(host) = advertised {
        if !info.sans.iter().any(|s| s == host) {
            return Some(format!("it does not name the advertised address {host}"));
        }
    }
    let at = tls::renew_at_ms(info.not_before_ms, info.not_after_ms, 0.0);
    (now_ms >= at).then(|| {
        format!(
            "a third of it is left (it ends {})",
            rfc3339(info.not_after_ms)
        )
    })
}

/// Issues a new server certificate for the same names (and the advertised address), writes
/// it to the state directory as a pair and serves it from the next handshake on.
async fn renew_server(
    coord: &Coordinator,
    info: &CertInfo,
    advertised: Option<String>,
) -> Result<CertInfo, String> {
    let mut names = info.sans.clone();
    names.extend(advertised);
    let pair = coord
        .ca
        .issue_server(&names, coord.config.certs.server_validity)
        .map_err(|e| zy_common::error::chain(&e))?;
    let chain = tls::certs_from_pem("server certificate", &pair.cert_pem)
        .map_err(|e| zy_common::error::chain(&e))?;
    let key =
        tls::key_from_pem("server key", &pair.key_pem).map_err(|e| zy_common::error::chain(&e))?;
    let new = CertInfo::parse(&chain[0]).map_err(|e| e.to_string())?;
    let state = coord.state.clone();
    tokio::task::spawn_blocking(move || state.store_server(&pair))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| zy_common::error::chain(&e))?;
    coord
        .server_cert
        .replace(chain, key)
        .map_err(|e| zy_common::error::chain(&e))?;
    Ok(new)
}

/// Keeps the server certificate renewed and warns of every certificate near its end.
pub async fn run(coord: Arc<Coordinator>) {
    let warned = Mutex::new(HashMap::<String, Instant>::new());
    let mut server_retry_at_ms = 0;
    let every = CHECK_AT_LEAST_EVERY
        .min(coord.config.certs.node_validity / 12)
        .max(Duration::from_secs(1));
    loop {
        let now = now_millis();
        let current = CertInfo::parse(&coord.server_cert.leaf());
        let advertised = coord.state.advertised_host();
        let mut next_ms = now + every.as_millis() as u64;
        match current {
            Ok(info) => {
                let reason = server_renewal_reason(&info, advertised.as_deref(), now);
                match reason {
                    Some(why) if now >= server_retry_at_ms => {
                        match renew_server(&coord, &info, advertised.clone()).await {
                            Ok(new) => {
                                info!(serial = %new.serial, not_after = %rfc3339(new.not_after_ms), %why, "server certificate renewed");
                                coord.events.publish(
                                    "cert",
                                    "server".into(),
                                    tls::SERVER_NAME.into(),
                                    "renewed".into(),
                                    format!("server certificate renewed ({why}): serial {}, valid until {}", new.serial, rfc3339(new.not_after_ms)),
                                );
                                next_ms = next_ms.min(tls::renew_at_ms(
                                    new.not_before_ms,
                                    new.not_after_ms,
                                    0.0,
                                ));
                            }
                            Err(e) => {
                                let wait = tls::renewal_retry_ms(
                                    now,
                                    info.not_after_ms,
                                    0.5 + rand::random::<f64>() / 2.0,
                                );
                                server_retry_at_ms = now + wait;
                                error!(error = %e, retry_in_ms = wait, "cannot renew the server certificate");
                                next_ms = next_ms.min(server_retry_at_ms);
                            }
                        }
                    }
                    Some(_) => next_ms = next_ms.min(server_retry_at_ms),
                    None => {
                        next_ms = next_ms.min(tls::renew_at_ms(
                            info.not_before_ms,
                            info.not_after_ms,
                            0.0,
                        ))
                    }
                }
            }
            Err(e) => error!(error = %e, "cannot read the server certificate being served"),
        }
        let soonest = check_expiries(&coord, &warned, now);
        next_ms = next_ms.min(soonest);
        let wait = Duration::from_millis(next_ms.saturating_sub(now_millis()).max(1000));
        tokio::time::sleep(wait.min(every)).await;
    }
}

/// One certificate to watch.
struct Watched {
    key: String,
    kind: &'static str,
    id: String,
    name: String,
    not_before_ms: u64,
    not_after_ms: u64,
    warn_at_ms: u64,
    what: String,
    expired_means: &'static str,
}

/// Warns (log and event stream) of every certificate past its warning point, at most once
/// per period each; returns the wall time of the next warning point or end ahead.
fn check_expiries(
    coord: &Coordinator,
    warned: &Mutex<HashMap<String, Instant>>,
    now_ms: u64,
) -> u64 {
    let mut all = Vec::new();
    if let Ok(ca) = CertInfo::parse(coord.ca.cert_der()) {
        let before = CA_WARN_BEFORE_MS.min(ca.validity_ms() / 6);
        all.push(Watched {
            key: "ca".into(),
            kind: "ca",
            id: "ca".into(),
            name: ca.subject.clone(),
            not_before_ms: ca.not_before_ms,
            not_after_ms: ca.not_after_ms,
            warn_at_ms: ca.not_after_ms.saturating_sub(before),
            what: "the site CA".into(),
            expired_means: "no certificate of this site verifies any more: make a new CA and re-enroll every node",
        });
    }
    if let Ok(s) = CertInfo::parse(&coord.server_cert.leaf()) {
        all.push(Watched {
            key: "server".into(),
            kind: "server",
            id: "server".into(),
            name: tls::SERVER_NAME.into(),
            not_before_ms: s.not_before_ms,
            not_after_ms: s.not_after_ms,
            warn_at_ms: tls::warn_at_ms(s.not_before_ms, s.not_after_ms),
            what: "the coordinator's server certificate".into(),
            expired_means: "agents and zy refuse the coordinator: see the coordinator's log for why renewal fails",
        });
    }
    for n in coord.fleet.snapshot() {
        let Some(c) = &n.record.cert else { continue };
        all.push(Watched {
            key: format!("node {} {}", n.record.id, c.serial),
            kind: "node",
            id: n.record.id.to_string(),
            name: n.record.name.clone(),
            not_before_ms: c.not_before_ms,
            not_after_ms: c.not_after_ms,
            warn_at_ms: tls::warn_at_ms(c.not_before_ms, c.not_after_ms),
            what: format!("node {}'s certificate", n.record.name),
            expired_means: "the node cannot reconnect and must be re-enrolled (zy node remove, then zy-agent join with a new token)",
        });
    }
    let mut warned = warned.lock().unwrap_or_else(|p| p.into_inner());
    let mut next = u64::MAX;
    for w in all {
        if now_ms < w.warn_at_ms {
            next = next.min(w.warn_at_ms);
            continue;
        }
        if now_ms < w.not_after_ms {
            // Its end is the next thing to tell.
            next = next.min(w.not_after_ms);
        }
        let period = WARN_AT_MOST_EVERY.min(Duration::from_millis(
            (w.not_after_ms.saturating_sub(w.not_before_ms) / 6).max(1000),
        ));
        let expired = now_ms >= w.not_after_ms;
        // "Expiring" and "expired" are told apart: the end is told even right after a warning.
        let key = format!("{} {expired}", w.key);
        if warned.get(&key).is_some_and(|at| at.elapsed() < period) {
            continue;
        }
        warned.insert(key, Instant::now());
        let (state, detail) = if expired {
            (
                "expired",
                format!(
                    "{} expired at {}: {}",
                    w.what,
                    rfc3339(w.not_after_ms),
                    w.expired_means
                ),
            )
        } else {
            let left = w.not_after_ms - now_ms;
            (
                "expiring",
                format!(
                    "{} expires at {} (in {}) and has not been renewed; if it expires, {}",
                    w.what,
                    rfc3339(w.not_after_ms),
                    humantime::format_duration(Duration::from_secs(left / 1000)),
                    w.expired_means
                ),
            )
        };
        warn!(kind = w.kind, id = %w.id, name = %w.name, not_after = %rfc3339(w.not_after_ms), "{detail}");
        coord
            .events
            .publish("cert", w.id, w.name, state.into(), detail);
    }
    // Forget warnings of certificates no longer watched (renewed nodes' old serials).
    warned.retain(|_, at| at.elapsed() < WARN_AT_MOST_EVERY);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(not_before_ms: u64, not_after_ms: u64, sans: &[&str]) -> CertInfo {
        CertInfo {
            subject: "CN=coordinator.zhengyun".into(),
            serial: "01".into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
            not_before_ms,
            not_after_ms,
            fingerprint: tls::CaFingerprint([0; 32]),
        }
    }

    #[test]
    fn the_server_certificate_is_renewed_when_too_long_misnamed_or_due() {
        let day = 86_400_000u64;
        let t0 = 1_000 * day;
        // The old 825 days and an hour: at once.
        let old = info(
            t0 - 3_600_000,
            t0 + 825 * day,
            &["coordinator.zhengyun", "10.0.0.1"],
        );
        assert!(server_renewal_reason(&old, Some("10.0.0.1"), t0)
            .unwrap()
            .contains("825"));
        let good = info(t0, t0 + 397 * day, &["coordinator.zhengyun", "10.0.0.1"]);
        assert_eq!(
            server_renewal_reason(&good, Some("10.0.0.1"), t0 + day),
            None
        );
        assert_eq!(server_renewal_reason(&good, None, t0 + day), None);
        // The advertised address missing: at once.
        assert!(server_renewal_reason(&good, Some("10.0.0.2"), t0)
            .unwrap()
            .contains("10.0.0.2"));
        // A third left: due.
        assert!(server_renewal_reason(&good, Some("10.0.0.1"), t0 + 265 * day).is_some());
        assert!(server_renewal_reason(&good, Some("10.0.0.1"), t0 + 264 * day).is_none());
    }
}
