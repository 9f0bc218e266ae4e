//! Each node's CPU load as consolidation reads it: an exponential average of the agents'
//! reports (the fraction of the node's CPUs busy) over a window, kept in memory only (a
//! restarted coordinator has it again within a window). Pure: the caller passes the time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zy_common::NodeId;

/// One node's average.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Avg {
    /// The report last taken in (reports are numbered by their agent).
    seq: u64,
    at: Instant,
    busy: f64,
}

/// Every node's average.
#[derive(Debug)]
pub struct LoadAverages {
    window: Duration,
    inner: Mutex<HashMap<NodeId, Avg>>,
}

impl Default for LoadAverages {
    fn default() -> Self {
        Self::new(Duration::from_secs(300))
    }
}

impl LoadAverages {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            inner: Mutex::default(),
        }
    }

    /// Takes in a report (`cpu_percent` of the node's CPUs, report number `seq`) seen at
    /// `now`; a report already taken in is ignored. The first report of a node is its
    /// average; each later one weighs `1 - exp(-dt / window)`.
    pub fn observe(&self, node: NodeId, seq: u64, cpu_percent: f32, now: Instant) {
        let busy = (f64::from(cpu_percent) / 100.0).clamp(0.0, 1.0);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.get_mut(&node) {
            Some(a) if a.seq == seq => {}
            Some(a) => {
                let dt = now.saturating_duration_since(a.at).as_secs_f64();
                let w = 1.0 - (-dt / self.window.as_secs_f64().max(1.0)).exp();
                a.busy += (busy - a.busy) * w;
                a.seq = seq;
                a.at = now;
            }
            None => {
                g.insert(node, Avg { seq, at: now, busy });
            }
        }
    }

    /// The node's average busy fraction, if it ever reported.
    pub fn busy(&self, node: NodeId) -> Option<f64> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .map(|a| a.busy)
    }

    /// Forgets nodes that are not in `keep`.
    pub fn retain(&self, keep: impl Fn(&NodeId) -> bool) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_follows_reports_over_its_window_and_ignores_repeats() {
        let l = LoadAverages::new(Duration::from_secs(300));
        let n = NodeId::new_random();
        let t0 = Instant::now();
        assert_eq!(l.busy(n), None);
        l.observe(n, 1, 10.0, t0);
        assert!((l.busy(n).unwrap() - 0.10).abs() < 1e-9);
        // The same report again changes nothing.
        l.observe(n, 1, 90.0, t0 + Duration::from_secs(300));
        assert!((l.busy(n).unwrap() - 0.10).abs() < 1e-9);
        // One window at 90 %: about 63 % of the way there.
        l.observe(n, 2, 90.0, t0 + Duration::from_secs(300));
        let b = l.busy(n).unwrap();
        assert!(
            (b - (0.10 + 0.80 * (1.0 - (-1.0f64).exp()))).abs() < 1e-9,
            "{b}"
        );
        // A brief spike a second later barely moves it.
        l.observe(n, 3, 100.0, t0 + Duration::from_secs(301));
        assert!(l.busy(n).unwrap() - b < 0.01);
        // Out of range reports are clamped.
        let m = NodeId::new_random();
        l.observe(m, 1, 250.0, t0);
        assert_eq!(l.busy(m), Some(1.0));
        l.retain(|k| *k == n);
        assert_eq!(l.busy(m), None);
    }
}
