//! Operations: every change of a VM is one, followed at `GET /v1/ops/{id}`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zy_common::VmId;

use crate::VmView;

/// An operation's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(pub Uuid);

impl OpId {
    /// A new id, chosen by the coordinator when it records an operation.
    pub fn new_random() -> Self {
        OpId(Uuid::new_v4())
    }
}

impl std::fmt::Display for OpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for OpId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(OpId)
    }
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Create,
    Start,
    Stop,
    Restart,
    Delete,
    /// A live migration to another node.
    Migrate,
}

impl OpKind {
    /// Its name, as in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Start => "start",
            OpKind::Stop => "stop",
            OpKind::Restart => "restart",
            OpKind::Delete => "delete",
            OpKind::Migrate => "migrate",
        }
    }
}

/// An operation as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OpView {
    pub id: OpId,
    pub kind: OpKind,
    pub vm: VmId,
    pub vm_name: String,
    /// running, succeeded or failed.
    pub state: String,
    pub reason: Option<String>,
    pub steps: Vec<StepView>,
    /// The index of the step under way.
    pub current_step: usize,
    pub created_at: String,
    pub updated_at: String,
    /// A migration's nodes, figures and progress (migrate operations only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationView>,
}

/// A live migration as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationView {
    /// The nodes it goes from and to (names).
    pub from: String,
    pub to: String,
    /// Why it moves: asked, drain or consolidate.
    pub cause: String,
    /// The guest's pause at the switch-over and the whole copy, once measured (ms).
    pub downtime_ms: Option<u64>,
    pub total_ms: Option<u64>,
    /// Set while it is being abandoned (the source keeps the VM).
    pub aborting: Option<String>,
    /// The latest progress the source reported, while it runs.
    pub progress: Option<MigrationProgress>,
}

/// A migration's progress, as its source last reported it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MigrationProgress {
    /// preparing, mirroring, memory, switchover, completed, failed, cancelled.
    pub phase: String,
    pub disk_done: u64,
    pub disk_total: u64,
    pub memory_transferred: u64,
    pub memory_remaining: u64,
    pub memory_total: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: u64,
    pub expected_downtime_ms: u64,
    pub cpu_throttle_percent: u8,
}

/// `POST /v1/vms/{vm}/migrate`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateVm {
    /// The node to move to (name or id); absent: the packer's choice.
    #[serde(default)]
    pub to: Option<String>,
}

/// One step of an operation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepView {
    pub name: String,
    pub done_at: Option<String>,
}

/// The answer to a request that changes a VM: the operation that carries it out (follow it
/// at `GET /v1/ops/{id}`), and the VM as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Accepted {
    pub operation: OpView,
    /// Absent only when a repeated request finds its VM gone (a delete that has finished).
    pub vm: Option<VmView>,
}
