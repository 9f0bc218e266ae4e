//! Bounded logging of repeated refusals: a client that keeps sending the same bad token
//! must not write a log line per request (10,000 bad requests were 10,000 lines).
//!
//! Per key (the presented token's id), the first refusal is logged, then at most one line
//! per [`PERIOD_MS`] carrying how many were left out since. Keys are bounded: past
//! [`MAX_KEYS`] distinct ones (a client inventing token ids), all further keys share one
//! entry, so memory stays bounded and such a flood is still logged, at the same rate.
//! Pure: the caller passes the time.

use std::collections::HashMap;
use std::sync::Mutex;

/// At most one line per key in this long.
pub const PERIOD_MS: u64 = 60_000;
/// Distinct keys remembered before they share one entry.
pub const MAX_KEYS: usize = 1024;
/// The key every key past [`MAX_KEYS`] shares.
const OVERFLOW: &str = "*";

#[derive(Debug, Default)]
struct Entry {
    logged_at_ms: u64,
    suppressed: u64,
}

/// The refusals seen, by key.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<HashMap<String, Entry>>);

impl Refusals {
    /// Notes a refusal for `key` at `now_ms`. Returns `Some(n)` when it is to be logged,
    /// `n` being the refusals of that key left out since its last line; `None` otherwise.
    pub fn note(&self, key: String, now_ms: u64) -> Option<u64> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_KEYS {
            // Forget entries whose period is over before sharing one.
            m.retain(|_, e| now_ms.saturating_sub(e.logged_at_ms) < PERIOD_MS);
        }
        let key = if m.len() >= MAX_KEYS && !m.contains_key(&key) {
            OVERFLOW.to_string()
        } else {
            key
        };
        match m.get_mut(&key) {
            None => {
                m.insert(
                    key,
                    Entry {
                        logged_at_ms: now_ms,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
            Some(e) if now_ms.saturating_sub(e.logged_at_ms) >= PERIOD_MS => {
                let n = e.suppressed;
                *e = Entry {
                    logged_at_ms: now_ms,
                    suppressed: 0,
                };
                Some(n)
            }
            Some(e) => {
                e.suppressed += 1;
                None
            }
        }
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_refusals_of_one_token_make_a_line_a_minute() {
        let r = Refusals::default();
        let mut lines = Vec::new();
        // 10,000 refusals over 150 s.
        for i in 0..10_000u64 {
            let now = i * 15;
            if let Some(n) = r.note("abc".into(), now) {
                lines.push((now, n));
            }
        }
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0], (0, 0));
        assert_eq!(lines[1].0, 60_000);
        // Every refusal is either logged or counted in the next line.
        let counted: u64 = lines.iter().map(|(_, n)| n + 1).sum::<u64>();
        let after_last = 10_000 - (lines[2].0 / 15) - 1;
        assert_eq!(counted + after_last, 10_000);
    }

    #[test]
    fn distinct_keys_are_each_logged_but_memory_stays_bounded() {
        let r = Refusals::default();
        let mut lines = 0;
        for i in 0..(MAX_KEYS as u64 * 10) {
            if r.note(format!("k{i}"), 1).is_some() {
                lines += 1;
            }
        }
        assert!(r.len() <= MAX_KEYS + 1);
        // The first MAX_KEYS keys get a line each, the flood after them one line.
        assert_eq!(lines, MAX_KEYS + 1);
        // Once their period is over, old keys make room again.
        assert_eq!(r.note("late".into(), 1 + PERIOD_MS), Some(0));
        assert!(r.len() <= 2);
    }
}
