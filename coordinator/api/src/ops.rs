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
