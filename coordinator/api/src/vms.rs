//! VMs: what is asked for and what is shown.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use zy_common::{NodeId, VmId, Zone};

use crate::OpId;

/// `POST /v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub zone: Zone,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disk_gib: u64,
    pub image: String,
    #[serde(default = "yes")]
    pub start: bool,
    /// OpenSSH public key lines the guest lets in (a disk image's cloud-init applies them
    /// to its default user).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// A `#cloud-config` document for the guest's cloud-init, passed on as given.
    #[serde(default)]
    pub user_data: Option<String>,
    /// An anti-affinity group: no two VMs of the group share a node (so that one server's
    /// loss takes at most one of a redundant pair).
    #[serde(default)]
    pub anti_affinity: Option<String>,
}

fn yes() -> bool {
    true
}

/// A VM as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmView {
    pub id: VmId,
    pub name: String,
    pub zone: Zone,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: String,
    pub node: Option<String>,
    pub node_id: Option<NodeId>,
    pub desired: VmDesired,
    /// The desired generation (bumped by each change of intent).
    pub generation: u64,
    /// The desired generation the node has taken up, and the node's observed generation.
    pub node_intent: Option<u64>,
    pub observed_generation: Option<u64>,
    pub state: String,
    pub reason: Option<String>,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub pid: Option<u32>,
    pub state_since: String,
    pub created_at: String,
    /// The operation under way on this VM, if any.
    pub operation: Option<OpId>,
    /// The SSH public keys it was given.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// The size of the user-data it was given (the document itself is not shown: it may
    /// hold secrets).
    #[serde(default)]
    pub user_data_bytes: Option<u64>,
    /// Its anti-affinity group.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// The node it is being migrated to, while a migration runs.
    #[serde(default)]
    pub migrating_to: Option<String>,
}

/// What the site wants of a VM. The coordinator's store keeps it too, in its VM records:
/// renaming or reordering the variants changes that format as well as the JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmDesired {
    Running,
    Stopped,
    /// A tombstone: deleted at the site, kept until its node confirms it removed the VM.
    Deleted,
}

/// A notice on an interactive console's WebSocket (`GET /v1/vms/{vm}/console?interactive=true`),
/// sent as a text message; the terminal's bytes travel as binary messages both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ConsoleEvent {
    /// First, when this session took the console over from another writer.
    TookOver,
    /// This many chunks of output were lost: the reader fell behind.
    Skipped { chunks: u64 },
    /// Last: another session took the console over (`force=true`).
    TakenOver,
    /// Last: the console closed (the VM stopped or was deleted).
    Closed,
    /// Last: the link to the VM's node was lost.
    NodeLost,
}

#[cfg(test)]
mod console_tests {
    use super::ConsoleEvent;

    #[test]
    fn console_events_are_tagged_json() {
        let cases = [
            (ConsoleEvent::TookOver, r#"{"event":"took_over"}"#),
            (
                ConsoleEvent::Skipped { chunks: 2 },
                r#"{"event":"skipped","chunks":2}"#,
            ),
            (ConsoleEvent::TakenOver, r#"{"event":"taken_over"}"#),
            (ConsoleEvent::Closed, r#"{"event":"closed"}"#),
            (ConsoleEvent::NodeLost, r#"{"event":"node_lost"}"#),
        ];
        for (e, json) in cases {
            assert_eq!(serde_json::to_string(&e).unwrap(), json);
            assert_eq!(serde_json::from_str::<ConsoleEvent>(json).unwrap(), e);
        }
    }
}
