//! Wall-clock timestamps as they appear on the wire and in the store.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Stored and sent as a plain `u64`.
pub type UnixMillis = u64;

/// Now, in milliseconds since the epoch (0 if the clock is before 1970).
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An RFC 3339 rendering of a timestamp, to the second, in UTC.
pub fn rfc3339(ms: UnixMillis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// "3s ago", "2h ago" style rendering of the time since `ms`, for listings.
pub fn ago(ms: UnixMillis, now: UnixMillis) -> String {
    if ms == 0 {
        return "never".to_string();
    }
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(ago(1_000, 6_000), "5s ago");
        assert_eq!(ago(0, 6_000), "never");
        assert_eq!(ago(1, 3_600_001), "1h ago");
    }
}
