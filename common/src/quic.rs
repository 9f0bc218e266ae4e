//! QUIC transport settings that both daemons share, and the timing rules that tie them to
//! heartbeats.
//!
//! The ordering that must always hold (checked by [`Timings::validate`]):
//!
//! ```text
//! report interval  <  suspect after  <  QUIC idle timeout  <  down after
//! ```
//!
//! A silent node turns Suspect after a couple of missed reports; its dead connection is then
//! torn down by QUIC before the node is declared Down, so a node that comes back always finds
//! a fresh connection rather than a half-dead one.

#[cfg(feature = "quic")]
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Heartbeat and transport timing, set on the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// How often agents report load (and so heartbeat).
    #[serde(with = "duration_text")]
    pub report_interval: Duration,
    /// Silence after which a node is Suspect.
    #[serde(with = "duration_text")]
    pub suspect_after: Duration,
    /// QUIC idle timeout: a connection silent this long is dropped.
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    /// Silence after which a node is Down.
    #[serde(with = "duration_text")]
    pub down_after: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            report_interval: Duration::from_secs(1),
            suspect_after: Duration::from_millis(2500),
            idle_timeout: Duration::from_secs(5),
            down_after: Duration::from_secs(8),
        }
    }
}

/// A timing setting that breaks the ordering rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("timings must satisfy report_interval < suspect_after < idle_timeout < down_after, and report_interval within 100ms..=60s; got {0:?}")]
pub struct TimingError(pub Timings);

impl Timings {
    /// Checks the ordering rule.
    pub fn validate(&self) -> Result<(), TimingError> {
        let ok = self.report_interval >= Duration::from_millis(100)
            && self.report_interval <= Duration::from_secs(60)
            && self.report_interval < self.suspect_after
            && self.suspect_after < self.idle_timeout
            && self.idle_timeout < self.down_after;
        if ok {
            Ok(())
        } else {
            Err(TimingError(*self))
        }
    }
}

/// Transport config shared by both ends. Windows are small: control traffic is a few
/// hundred bytes a second, and a coordinator holds thousands of connections.
#[cfg(feature = "quic")]
pub fn transport(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // The conversion fails only for timeouts beyond 2^62 microseconds.
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(5_000)));
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(idle_timeout / 3));
    t.max_concurrent_bidi_streams(8u32.into());
    t.max_concurrent_uni_streams(8u32.into());
    t.stream_receive_window(quinn::VarInt::from_u32(256 * 1024));
    t.receive_window(quinn::VarInt::from_u32(1024 * 1024));
    t.send_window(1024 * 1024);
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// Durations in config files as human text ("1s", "2500ms").
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a duration as human text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a duration from human text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_hold_the_ordering_and_reach_the_figures() {
        let t = Timings::default();
        t.validate().unwrap();
        // A dead node is Suspect within 3 s and Down within 10 s.
        assert!(t.suspect_after <= Duration::from_secs(3));
        assert!(t.down_after <= Duration::from_secs(10));
        let bad = Timings {
            idle_timeout: Duration::from_secs(20),
            ..t
        };
        assert!(bad.validate().is_err());
    }
}
