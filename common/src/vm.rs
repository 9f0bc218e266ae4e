//! The VM lifecycle as both sides name it.
//!
//! ```text
//!  Pending -> Creating -> Starting -> Running -> Stopping -> Stopped
//!     |          |           |          |                     ^
//!     +----------+-----------+----------+--> Failed(reason)   |
//!                                       +--- guest poweroff --+
//! ```

use serde::{Deserialize, Serialize};

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

impl VmState {
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
