//! The VM lifecycle as both sides name it.
//!
//! ```text
//!  Pending -> Creating -> Starting -> Running -> Stopping -> Stopped
//!     |          |           |          |                     ^
//!     +----------+-----------+----------+--> Failed(reason)   |
//!                                       +--- guest poweroff --+
//! ```

use serde::{Deserialize, Serialize};

/// A generation of a record that two sides write. Each side bumps only its own: the
/// coordinator the *desired* generation of a VM (each change of intent), the agent the
/// *observed* generation (each state it reports). A receiver applies only what is newer than
/// what it holds, so a repeated, late or reordered message is a no-op.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation after this one.
    pub fn next(self) -> Self {
        Generation(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// What the coordinator wants of a VM that exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

impl Desired {
    /// The lower-case name used in listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

/// Where a VM stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Asked for; not placed or not yet taken up by its node.
    Pending,
    /// Its disks and network ports are being made.
    Creating,
    /// QEMU is starting.
    Starting,
    /// QEMU reports `running`.
    Running,
    /// A stop is under way (ACPI powerdown, then quit, then kill).
    Stopping,
    /// Not running, by request or by the guest's own poweroff.
    Stopped,
    /// Could not be made or started, or QEMU died: why, with the console's last lines.
    Failed(String),
}

/// The longest failure reason carried (the wire allows this much).
pub const MAX_REASON: usize = 4 * crate::proto::MAX_TEXT;

impl VmState {
    /// A failure, its reason made fit to travel and to print: control characters (a
    /// guest's console is full of escape sequences) become spaces, and an over-long reason
    /// keeps its end (the console's last lines), cut at a character boundary.
    pub fn failed(reason: impl Into<String>) -> Self {
        VmState::Failed(crate::proto::fit_text(&reason.into(), MAX_REASON))
    }

    /// The lower-case name used in listings.
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Creating => "creating",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::Failed(r) => write!(f, "failed: {r}"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_failure_reason_is_fit_to_send(s in ".{0,6000}", pad in 0usize..6000) {
            let reason = format!("{}{s}", "\u{1b}[0m\u{e9}".repeat(pad / 8));
            let VmState::Failed(r) = VmState::failed(reason.clone()) else { unreachable!() };
            prop_assert!(r.len() <= MAX_REASON);
            prop_assert!(!r.chars().any(|c| c.is_control() && c != '\n'));
            if reason.len() <= MAX_REASON && !reason.chars().any(char::is_control) {
                prop_assert_eq!(r, reason);
            }
        }
    }

    #[test]
    fn a_long_reason_keeps_its_start_and_its_end() {
        let long = format!("QEMU died: {} last line", "x".repeat(10_000));
        let VmState::Failed(r) = VmState::failed(long) else {
            unreachable!()
        };
        assert!(r.starts_with("QEMU died") && r.ends_with("last line") && r.contains(" ... "));
    }
}
