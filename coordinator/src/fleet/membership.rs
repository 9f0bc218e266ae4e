//! Node membership: a state machine driven by heartbeats (load reports).
//!
//! ```text
//!              Hello                 silence > suspect_after
//!  Enrolled ----------> Ready ------------------------------> Suspect
//!                        ^  ^                                   |   |
//!                        |  +---------- report -----------------+   | silence > down_after
//!                        |                                          v
//!                        +----------------- report --------------- Down
//! ```
//!
//! This module does no I/O and reads no clock: callers pass the silence they measured.
//! What ops ask of a node (drain, maintenance, standby) is a separate state that heartbeats
//! never change ([`crate::store::Admin`], [`crate::nodeadmin`]); a standby node is not ticked.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use zy_common::quic::Timings;

/// Where a node stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Enrolled but never connected.
    Enrolled,
    /// Reporting on time.
    Ready,
    /// Missed reports; may be back any moment. Nothing is placed on it.
    Suspect,
    /// Silent past the grace; treated as lost.
    Down,
}

impl NodeState {
    /// The lower-case name used in the CLI and the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeState::Enrolled => "enrolled",
            NodeState::Ready => "ready",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
        }
    }

    /// The state after a report arrives, if it changes.
    pub fn on_report(self) -> Option<NodeState> {
        match self {
            NodeState::Ready => None,
            NodeState::Enrolled | NodeState::Suspect | NodeState::Down => Some(NodeState::Ready),
        }
    }

    /// The state after `silence` without a report, if it changes.
    pub fn on_silence(self, silence: Duration, t: &Timings) -> Option<NodeState> {
        match self {
            NodeState::Enrolled | NodeState::Down => None,
            NodeState::Ready if silence >= t.down_after => Some(NodeState::Down),
            NodeState::Ready if silence >= t.suspect_after => Some(NodeState::Suspect),
            NodeState::Ready => None,
            NodeState::Suspect if silence >= t.down_after => Some(NodeState::Down),
            NodeState::Suspect => None,
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn silence_walks_ready_to_suspect_to_down() {
        let t = Timings::default();
        let s = NodeState::Ready;
        assert_eq!(s.on_silence(Duration::from_millis(900), &t), None);
        let s = s.on_silence(t.suspect_after, &t).unwrap();
        assert_eq!(s, NodeState::Suspect);
        assert_eq!(s.on_silence(t.suspect_after, &t), None);
        let s = s.on_silence(t.down_after, &t).unwrap();
        assert_eq!(s, NodeState::Down);
        assert_eq!(s.on_report(), Some(NodeState::Ready));
        assert_eq!(NodeState::Enrolled.on_silence(Duration::MAX, &t), None);
    }

    proptest! {
        /// Whatever the sequence of reports and silences, a report always leaves the node
        /// Ready, and silence never makes a node more alive.
        #[test]
        fn reports_revive_and_silence_only_degrades(steps in proptest::collection::vec(proptest::option::of(0u64..20_000), 1..50)) {
            let t = Timings::default();
            let rank = |s: NodeState| match s { NodeState::Ready => 0, NodeState::Suspect => 1, NodeState::Down => 2, NodeState::Enrolled => 3 };
            let mut s = NodeState::Enrolled;
            for step in steps {
                match step {
                    None => { s = s.on_report().unwrap_or(s); prop_assert_eq!(s, NodeState::Ready); }
                    Some(ms) => {
                        if let Some(next) = s.on_silence(Duration::from_millis(ms), &t) {
                            prop_assert!(rank(next) > rank(s));
                            s = next;
                        }
                    }
                }
            }
        }
    }
}
