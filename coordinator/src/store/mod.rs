//! The coordinator's embedded store: desired state and the membership history, in one
//! redb file.
//!
//! Every value is a record frame ([`zy_common::wire`], magic `ZR`): magic, record version,
//! length, postcard body. The file carries a schema version in its `meta` table; a file from
//! a newer build is refused, a file from an older one would be converted once here, at open,
//! and nowhere else.
//!
//! What is durable: nodes (identity, zone, state and when it changed, last inventory),
//! bootstrap and API tokens (hashes only), removed nodes, and every membership transition.
//! What is not: live load and the exact last-seen instant between transitions; both are
//! re-reported within a second of an agent reconnecting.

pub mod statedir;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zy_api::VmDesired;
use zy_common::ids::{NodeId, TokenId, Zone};
use zy_common::proto::Inventory;
use zy_common::token::SecretHash;
use zy_common::wire::{self, FrameError, VersionRange, RECORD_MAGIC};

use crate::fleet::membership::NodeState;

/// The schema this build writes and reads. Older ones are converted at open: schema 1 (VMs
/// without generations, deletions in a table of their own), schema 2 (VMs without SSH
/// keys and user-data, nodes without their certificate's dates, API tokens without expiry,
/// revocation or last use) and schema 3 (VMs without anti-affinity groups or migrations,
/// nodes without an administrative state, operations without a migration's details).
pub const SCHEMA_VERSION: u64 = 4;
/// The record body version this build writes and reads.
const RECORD_VERSION: u16 = 1;
/// Bound on one record.
const MAX_RECORD: u32 = 64 * 1024;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("nodes");
const NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("node_names");
const REMOVED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("removed_nodes");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bootstrap_tokens");
const API_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("api_tokens");
const TRANSITIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("transitions");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const VMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vms");
/// Schema 1 only: read once, by the conversion to schema 2.
const VM_DELETIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("vm_deletions");
const OPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("operations");
/// Changes of nodes' administrative state ([`AdminTransition`]), keyed like `transitions`.
/// A table added beside schema 4's: created empty at open, so an older file has none.
const ADMIN_LOG: TableDefinition<&[u8], &[u8]> = TableDefinition::new("admin_transitions");

/// Finished operations kept for `zy op ls`; older ones are pruned.
pub const FINISHED_OPS_KEPT: usize = 1000;

/// How many transitions are kept per node; older ones are pruned.
pub const TRANSITIONS_KEPT: usize = 200;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("could not open the store at {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("the store was written by a newer coordinator (schema {found}); this build reads schema {SCHEMA_VERSION}")]
    NewerSchema { found: u64 },
    #[error("record {key} in table {table} is corrupt")]
    Corrupt {
        table: &'static str,
        key: String,
        #[source]
        source: FrameError,
    },
    #[error("store transaction failed")]
    Txn(#[from] redb::TransactionError),
    #[error("store table failed")]
    Table(#[from] redb::TableError),
    #[error("store read or write failed")]
    Storage(#[from] redb::StorageError),
    #[error("store commit failed")]
    Commit(#[from] redb::CommitError),
    #[error("could not encode a record")]
    Encode(#[source] FrameError),
    #[error("VM {vm} changed meanwhile (stored revision {found:?}, expected {expected:?})")]
    Conflict {
        vm: zy_common::VmId,
        expected: Option<u64>,
        found: Option<u64>,
        /// The VM as it is stored now, for the writer to retry from.
        current: Option<Box<VmRec>>,
    },
    #[error("operation {op} changed meanwhile")]
    OpConflict {
        op: zy_api::OpId,
        current: Option<Box<crate::ops::OpRec>>,
    },
    /// An error of a transaction that several writers shared (a group commit), given to
    /// each of them: it reads as the error itself.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

/// A node as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub state: NodeState,
    pub state_since_ms: u64,
    pub enrolled_at_ms: u64,
    pub token: TokenId,
    /// Last report as of the last transition or disconnect (not every report).
    pub last_seen_ms: u64,
    pub inventory: Option<Inventory>,
    /// The certificate the node holds, as far as the coordinator knows: the one it last
    /// connected with or the one last issued to it, whichever came last.
    pub cert: Option<NodeCert>,
    /// What ops asked of the node (drain, maintenance, standby); heartbeats never change it.
    pub admin: Admin,
    pub admin_since_ms: u64,
}

/// What ops asked of a node, beside what its heartbeats say ([`NodeState`]).
///
/// ```text
///            drain                  emptied                undrain
///  Active ----------> Draining ---------------> Maintenance --------> Active
///    |  ^   undrain      |                                     
///    |  +----------------+                                       
///    | standby (empty)          wake (power on; Active once it reports)
///    +-----------------> Standby ------------------------------------> Active
/// ```
///
/// Only an Active node takes VMs. A Standby node's silence is expected: it is shown as
/// standby, not down, and the packer may wake it when it needs room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Admin {
    #[default]
    Active,
    /// Its VMs are being moved off, one at a time; it takes none.
    Draining,
    /// Empty and kept so for service; it takes none until undrained.
    Maintenance,
    /// Empty and powered down to save power; woken when room is needed.
    Standby,
}

impl Admin {
    /// The lower-case name used in the CLI and the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Admin::Active => "active",
            Admin::Draining => "draining",
            Admin::Maintenance => "maintenance",
            Admin::Standby => "standby",
        }
    }
}

/// A node certificate's serial and dates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCert {
    /// Lower-case hex.
    pub serial: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl NodeCert {
    /// From a certificate's details.
    pub fn of(info: &zy_common::tls::CertInfo) -> Self {
        Self {
            serial: info.serial.clone(),
            not_before_ms: info.not_before_ms,
            not_after_ms: info.not_after_ms,
        }
    }
}

/// A bootstrap token as stored: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: TokenId,
    pub secret_hash: SecretHash,
    pub zone: Zone,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
    /// The node it enrolled, and when.
    pub used: Option<(NodeId, u64)>,
    /// Which API token created it.
    pub created_by: TokenId,
}

/// What a bootstrap token can still do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    Valid,
    Used,
    Expired,
    Revoked,
}

impl TokenRecord {
    /// The token's status at `now`.
    pub fn status(&self, now_ms: u64) -> TokenStatus {
        if self.revoked_at_ms.is_some() {
            TokenStatus::Revoked
        } else if self.used.is_some() {
            TokenStatus::Used
        } else if now_ms >= self.expires_at_ms {
            TokenStatus::Expired
        } else {
            TokenStatus::Valid
        }
    }
}

/// An API token as stored: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub id: TokenId,
    pub secret_hash: SecretHash,
    /// Unique among the tokens not revoked.
    pub name: String,
    pub created_at_ms: u64,
    /// The token that created it (`None`: made by `zy-coordinator init`).
    pub created_by: Option<TokenId>,
    /// `None`: never expires.
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    /// Last request made with it, to the minute (kept coarse: one write a minute at most).
    pub last_used_ms: Option<u64>,
}

/// What an API token can still do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiTokenStatus {
    Valid,
    Expired,
    Revoked,
}

impl ApiTokenRecord {
    /// The token's status at `now`.
    pub fn status(&self, now_ms: u64) -> ApiTokenStatus {
        if self.revoked_at_ms.is_some() {
            ApiTokenStatus::Revoked
        } else if self.expires_at_ms.is_some_and(|e| now_ms >= e) {
            ApiTokenStatus::Expired
        } else {
            ApiTokenStatus::Valid
        }
    }
}

/// An image as stored: its name, how it boots (by blob hash), and whose it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub kind: zy_common::image::ImageKind,
    pub size_bytes: u64,
    pub created_at_ms: u64,
    /// The zone whose VMs may boot it; `None`: shared by a platform admin with both zones.
    pub zone: Option<Zone>,
}

/// What a VM's node last reported of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub state: zy_common::vm::VmState,
    pub pid: Option<u32>,
    /// The desired generation the node had taken up.
    pub intent: zy_common::vm::Generation,
    /// The node's observed generation: only a newer one replaces this.
    pub generation: zy_common::vm::Generation,
    pub at_ms: u64,
}

/// A VM as stored: what was asked for (with its desired generation), where it was placed,
/// and what its node last said (with the node's observed generation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRec {
    pub id: zy_common::VmId,
    pub name: String,
    pub zone: Zone,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: String,
    pub boot: zy_common::image::ImageKind,
    pub node: Option<NodeId>,
    pub desired: VmDesired,
    /// Bumped by every change of intent.
    pub generation: zy_common::vm::Generation,
    pub observed: Option<Observed>,
    pub mac: [u8; 6],
    pub ip: std::net::Ipv4Addr,
    pub created_at_ms: u64,
    /// Bumped by every write of the row: writes are compare-and-swap on it.
    pub rev: u64,
    /// The SSH public keys its guest lets in.
    pub ssh_keys: Vec<zy_common::guest::SshKey>,
    /// The owner's `#cloud-config` document, as given.
    pub user_data: Option<String>,
    /// Its anti-affinity group: no two VMs of one group share a node.
    pub anti_affinity: Option<String>,
    /// A live migration under way to this node: the VM holds room on both nodes until it
    /// ends, and nothing else may change it meanwhile.
    pub migrating_to: Option<NodeId>,
    /// When it last arrived on a node by migration (consolidation moves a VM at most once
    /// an hour).
    pub moved_at_ms: Option<u64>,
}

impl VmRec {
    /// What the VM asks of its node.
    pub fn size(&self) -> zy_common::resources::VmSize {
        zy_common::resources::VmSize {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
        }
    }
}

/// A write of the VM table, checked against the revision the writer read.
#[derive(Clone, Debug, PartialEq)]
pub enum VmWrite {
    /// Store `rec` (whose `rev` is one more than `expect`, or 1 for a new VM).
    Put {
        rec: Box<VmRec>,
        expect: Option<u64>,
    },
    /// Forget the VM.
    Remove {
        id: zy_common::VmId,
        expect: Option<u64>,
    },
}

mod v3 {
    //! Schema 3 records, read once by the conversion to schema 4: VMs (no anti-affinity,
    //! migration or move time), nodes (no administrative state) and operations (no
    //! migration details).
    use super::*;

    #[derive(Deserialize)]
    pub struct VmRec {
        pub id: zy_common::VmId,
        pub name: String,
        pub zone: Zone,
        pub vcpus: u32,
        pub memory_mib: u64,
        pub disk_gib: u64,
        pub image: String,
        pub boot: zy_common::image::ImageKind,
        pub node: Option<NodeId>,
        pub desired: VmDesired,
        pub generation: zy_common::vm::Generation,
        pub observed: Option<Observed>,
        pub mac: [u8; 6],
        pub ip: std::net::Ipv4Addr,
        pub created_at_ms: u64,
        pub rev: u64,
        pub ssh_keys: Vec<zy_common::guest::SshKey>,
        pub user_data: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct NodeRecord {
        pub id: NodeId,
        pub name: String,
        pub zone: Zone,
        pub state: NodeState,
        pub state_since_ms: u64,
        pub enrolled_at_ms: u64,
        pub token: TokenId,
        pub last_seen_ms: u64,
        pub inventory: Option<Inventory>,
        pub cert: Option<NodeCert>,
    }

    #[derive(Deserialize)]
    pub struct OpRec {
        pub id: zy_api::OpId,
        pub key: Option<String>,
        pub kind: zy_api::OpKind,
        pub vm: zy_common::VmId,
        pub vm_name: String,
        pub steps: Vec<crate::ops::Step>,
        pub current: usize,
        pub state: crate::ops::OpState,
        pub target: zy_common::vm::Generation,
        pub created_at_ms: u64,
        pub updated_at_ms: u64,
        pub rev: u64,
    }
}

mod v2 {
    //! Schema 2 records, read once by the conversion to schema 3: VMs (no SSH keys or
    //! user-data), nodes and API tokens (the same in schema 1).
    use super::*;

    #[derive(Deserialize)]
    pub struct VmRec {
        pub id: zy_common::VmId,
        pub name: String,
        pub zone: Zone,
        pub vcpus: u32,
        pub memory_mib: u64,
        pub disk_gib: u64,
        pub image: String,
        pub boot: zy_common::image::ImageKind,
        pub node: Option<NodeId>,
        pub desired: VmDesired,
        pub generation: zy_common::vm::Generation,
        pub observed: Option<Observed>,
        pub mac: [u8; 6],
        pub ip: std::net::Ipv4Addr,
        pub created_at_ms: u64,
        pub rev: u64,
    }

    #[derive(Deserialize)]
    pub struct NodeRecord {
        pub id: NodeId,
        pub name: String,
        pub zone: Zone,
        pub state: NodeState,
        pub state_since_ms: u64,
        pub enrolled_at_ms: u64,
        pub token: TokenId,
        pub last_seen_ms: u64,
        pub inventory: Option<Inventory>,
    }

    #[derive(Deserialize)]
    pub struct ApiTokenRecord {
        pub id: TokenId,
        pub secret_hash: SecretHash,
        pub name: String,
        pub created_at_ms: u64,
    }
}

mod v1 {
    //! Schema 1 records, read once by the conversion.
    use super::*;

    #[derive(Deserialize)]
    pub enum Desired {
        Running,
        Stopped,
    }

    #[derive(Deserialize)]
    pub struct VmRec {
        pub id: zy_common::VmId,
        pub name: String,
        pub zone: Zone,
        pub vcpus: u32,
        pub memory_mib: u64,
        pub disk_gib: u64,
        pub image: String,
        pub boot: zy_common::image::ImageKind,
        pub node: Option<NodeId>,
        pub desired: Desired,
        pub state: zy_common::vm::VmState,
        pub state_since_ms: u64,
        pub mac: [u8; 6],
        pub ip: std::net::Ipv4Addr,
        pub pid: Option<u32>,
        pub created_at_ms: u64,
    }

    #[derive(Deserialize)]
    pub struct ImageRecord {
        pub name: String,
        pub kind: zy_common::image::ImageKind,
        pub size_bytes: u64,
        pub created_at_ms: u64,
    }

    #[derive(Deserialize)]
    pub struct VmDeletion {
        pub id: zy_common::VmId,
        pub name: String,
        pub node: NodeId,
        pub zone: Zone,
        pub ip: std::net::Ipv4Addr,
        pub at_ms: u64,
    }
}

/// A removed node: its certificate is refused from now on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovedRecord {
    pub id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub removed_at_ms: u64,
}

/// One membership change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub node: NodeId,
    pub from: NodeState,
    pub to: NodeState,
    pub at_ms: u64,
    pub reason: String,
}

/// One change of what ops asked of a node ([`Admin`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminTransition {
    pub node: NodeId,
    pub from: Admin,
    pub to: Admin,
    pub at_ms: u64,
    pub reason: String,
}

/// A node-state update the fleet asks the store to make durable.
#[derive(Clone, Debug)]
pub struct NodeUpdate {
    pub transition: Option<TransitionRecord>,
    pub node: NodeId,
    pub last_seen_ms: u64,
    pub inventory: Option<Inventory>,
}

/// Why an enrollment was refused, as the store sees it.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("this token was not issued by this coordinator")]
    UnknownToken,
    #[error("this token's secret does not match: it is forged or mistyped")]
    BadSecret,
    #[error("this token expired at {0}")]
    Expired(String),
    #[error("this token was revoked at {0}")]
    Revoked(String),
    #[error("this token was already used, by node {node} at {at}: a token enrolls one node; create a new one with `zy token create`")]
    Used { node: NodeId, at: String },
    #[error("a node named `{0}` is already enrolled: pick another name with `--name`, or remove the old node with `zy node remove`")]
    NameInUse(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    wire::encode(RECORD_MAGIC, RECORD_VERSION, v, MAX_RECORD).map_err(StoreError::Encode)
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    let corrupt = |source| StoreError::Corrupt {
        table,
        key: zy_common::token::hex(key),
        source,
    };
    let (version, v) = wire::decode(bytes, RECORD_MAGIC, MAX_RECORD).map_err(corrupt)?;
    if version != RECORD_VERSION {
        return Err(corrupt(FrameError::UnsupportedVersion {
            got: version,
            supported: VersionRange {
                min: RECORD_VERSION,
                max: RECORD_VERSION,
            },
        }));
    }
    Ok(v)
}

/// The store. Cheap to share; redb serialises writers.
#[derive(Debug)]
pub struct Store {
    db: Database,
    transition_seq: AtomicU64,
}

impl Store {
    /// Opens (or creates) the store and checks its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write()?;
        let seq;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema { found: v }),
                // Older schemas are converted here, once, each step in turn.
                Some(1) => {
                    // VMs and images straight to the current schema; nodes and API tokens
                    // were the same in schemas 1 and 2.
                    convert_v1(&txn)?;
                    convert_v2_fleet(&txn)?;
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(2) => {
                    convert_v2_vms(&txn)?;
                    convert_v2_fleet(&txn)?;
                    convert_v3_ops(&txn)?;
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(3) => {
                    convert_v3(&txn)?;
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(_) => {}
            }
            seq = meta.get("transition_seq")?.map(|v| v.value()).unwrap_or(0);
            for t in [NODES, REMOVED, TOKENS, API_TOKENS, TRANSITIONS, ADMIN_LOG] {
                txn.open_table(t)?;
            }
            txn.open_table(NAMES)?;
            txn.open_table(IMAGES)?;
            txn.open_table(VMS)?;
            txn.open_table(OPS)?;
        }
        txn.commit()?;
        Ok(Self {
            db,
            transition_seq: AtomicU64::new(seq),
        })
    }

    /// The schema version in the file.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("schema_version")?.map(|v| v.value()).unwrap_or(0))
    }

    fn scan<T: DeserializeOwned>(
        &self,
        def: TableDefinition<&[u8], &[u8]>,
        name: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(def)?;
        let mut out = Vec::with_capacity(table.len()? as usize);
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(decode(name, k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every enrolled node.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.scan(NODES, "nodes")
    }

    /// Every removed node.
    pub fn removed(&self) -> Result<Vec<RemovedRecord>, StoreError> {
        self.scan(REMOVED, "removed_nodes")
    }

    /// Every bootstrap token.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.scan(TOKENS, "bootstrap_tokens")
    }

    /// Every VM.
    pub fn vms(&self) -> Result<Vec<VmRec>, StoreError> {
        self.scan(VMS, "vms")
    }

    /// Every operation.
    pub fn ops(&self) -> Result<Vec<crate::ops::OpRec>, StoreError> {
        self.scan(OPS, "operations")
    }

    /// Writes VMs and operations in one transaction: all or nothing. Each VM write is
    /// compare-and-swap on the revision its writer read; one mismatch refuses the whole
    /// batch with [`StoreError::Conflict`], carrying the VM as it is now. Finished
    /// operations beyond [`FINISHED_OPS_KEPT`] are pruned, oldest first. (A group of one:
    /// see [`Store::commit_group`].)
    pub fn commit(
        &self,
        vms: &[VmWrite],
        ops: &[crate::ops::OpRec],
    ) -> Result<Vec<zy_api::OpId>, StoreError> {
        let mut group = self.commit_group([(vms, ops)])?;
        match group.outcomes.pop() {
            Some(Err(e)) => Err(e),
            _ => Ok(group.pruned),
        }
    }

    /// Writes several batches in one transaction and one commit (one fsync): group commit.
    /// Each batch is checked, compare-and-swap on every row as [`Store::commit`] does, against
    /// the transaction as the batches before it left it; a batch that fails its check (or
    /// cannot be encoded) is left out whole, and the others are written. An error of the
    /// store itself fails the whole group, and nothing is written. Finished operations are
    /// pruned once, after the last batch.
    pub fn commit_group<'a>(
        &self,
        batches: impl IntoIterator<Item = (&'a [VmWrite], &'a [crate::ops::OpRec])>,
    ) -> Result<Group, StoreError> {
        let txn = self.db.begin_write()?;
        let mut outcomes = Vec::new();
        let pruned;
        {
            let mut vm_table = txn.open_table(VMS)?;
            let mut op_table = txn.open_table(OPS)?;
            for (vms, ops) in batches {
                match check(&vm_table, &op_table, vms, ops)? {
                    Ok(rows) => {
                        for (key, value) in rows.vms {
                            match value {
                                Some(v) => vm_table.insert(key.as_slice(), v.as_slice())?,
                                None => vm_table.remove(key.as_slice())?,
                            };
                        }
                        for (key, value) in rows.ops {
                            op_table.insert(key.as_slice(), value.as_slice())?;
                        }
                        outcomes.push(Ok(()));
                    }
                    Err(refused) => outcomes.push(Err(refused)),
                }
            }
            pruned = prune_ops(&mut op_table)?;
        }
        txn.commit()?;
        Ok(Group { outcomes, pruned })
    }

    /// Every image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IMAGES)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(decode("images", k.value().as_bytes(), v.value())?);
        }
        Ok(out)
    }

    /// One image.
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IMAGES)?;
        table
            .get(name)?
            .map(|v| decode("images", name.as_bytes(), v.value()))
            .transpose()
    }

    /// Adds an image; `false` if the name is taken.
    pub fn insert_image(&self, rec: &ImageRecord) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(IMAGES)?;
            if t.get(rec.name.as_str())?.is_some() {
                return Ok(false);
            }
            t.insert(rec.name.as_str(), encode(rec)?.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Removes an image record; returns it if it existed.
    pub fn remove_image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = txn
            .open_table(IMAGES)?
            .remove(name)?
            .map(|v| decode("images", name.as_bytes(), v.value()))
            .transpose()?;
        txn.commit()?;
        Ok(rec)
    }

    /// One bootstrap token, by id.
    pub fn token(&self, id: TokenId) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOKENS)?;
        table
            .get(id.0.as_slice())?
            .map(|v| decode("bootstrap_tokens", &id.0, v.value()))
            .transpose()
    }

    /// Every API token.
    pub fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.scan(API_TOKENS, "api_tokens")
    }

    /// Stores a new bootstrap token.
    pub fn insert_token(&self, rec: &TokenRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TOKENS)?
            .insert(rec.id.0.as_slice(), encode(rec)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Stores a new API token.
    pub fn insert_api_token(&self, rec: &ApiTokenRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(API_TOKENS)?
            .insert(rec.id.0.as_slice(), encode(rec)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Revokes an API token. Returns the record as it now is, or `None` if unknown.
    pub fn revoke_api_token(
        &self,
        id: TokenId,
        now_ms: u64,
    ) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.update_api_token(id, |rec| {
            rec.revoked_at_ms.get_or_insert(now_ms);
        })
    }

    /// Records when an API token was last used.
    pub fn touch_api_token(
        &self,
        id: TokenId,
        now_ms: u64,
    ) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.update_api_token(id, |rec| {
            rec.last_used_ms = Some(rec.last_used_ms.unwrap_or(0).max(now_ms));
        })
    }

    fn update_api_token(
        &self,
        id: TokenId,
        change: impl FnOnce(&mut ApiTokenRecord),
    ) -> Result<Option<ApiTokenRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(API_TOKENS)?;
            let Some(mut rec) = t
                .get(id.0.as_slice())?
                .map(|v| decode::<ApiTokenRecord>("api_tokens", &id.0, v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            change(&mut rec);
            t.insert(id.0.as_slice(), encode(&rec)?.as_slice())?;
            rec
        };
        txn.commit()?;
        Ok(Some(rec))
    }

    /// Records the certificate a node now holds. `false` if the node is not enrolled (it
    /// was removed meanwhile).
    pub fn set_node_cert(&self, id: NodeId, cert: &NodeCert) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut nodes = txn.open_table(NODES)?;
            let key = id.as_bytes().as_slice();
            let Some(mut rec) = nodes
                .get(key)?
                .map(|v| decode::<NodeRecord>("nodes", key, v.value()))
                .transpose()?
            else {
                return Ok(false);
            };
            rec.cert = Some(cert.clone());
            nodes.insert(key, encode(&rec)?.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// Changes a node's administrative state if it is still `from`, and records the change,
    /// in one transaction. Returns the record as it now is; `None` if the node is not
    /// enrolled; the record unchanged if its state was no longer `from` (another change won).
    pub fn set_admin(
        &self,
        id: NodeId,
        from: Admin,
        to: Admin,
        at_ms: u64,
        reason: &str,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut nodes = txn.open_table(NODES)?;
            let key = id.as_bytes().as_slice();
            let Some(mut rec) = nodes
                .get(key)?
                .map(|v| decode::<NodeRecord>("nodes", key, v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            if rec.admin != from {
                return Ok(Some(rec));
            }
            rec.admin = to;
            rec.admin_since_ms = at_ms;
            nodes.insert(key, encode(&rec)?.as_slice())?;
            let t = AdminTransition {
                node: id,
                from,
                to,
                at_ms,
                reason: reason.to_string(),
            };
            let seq = self.transition_seq.fetch_add(1, Ordering::Relaxed) + 1;
            let mut tkey = Vec::with_capacity(24);
            tkey.extend_from_slice(key);
            tkey.extend_from_slice(&seq.to_be_bytes());
            let mut log = txn.open_table(ADMIN_LOG)?;
            log.insert(tkey.as_slice(), encode(&t)?.as_slice())?;
            prune_transitions(&mut log, id)?;
            txn.open_table(META)?.insert(
                "transition_seq",
                self.transition_seq.load(Ordering::Relaxed),
            )?;
            rec
        };
        txn.commit()?;
        Ok(Some(rec))
    }

    /// The most recent administrative changes of a node, oldest first.
    pub fn admin_transitions(
        &self,
        node: NodeId,
        limit: usize,
    ) -> Result<Vec<AdminTransition>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ADMIN_LOG)?;
        let (lo, hi) = node_range(node);
        let mut out = Vec::new();
        for row in table.range(lo.as_slice()..hi.as_slice())?.rev().take(limit) {
            let (k, v) = row?;
            out.push(decode("admin_transitions", k.value(), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Revokes a bootstrap token. Returns the record as it now is, or `None` if unknown.
    pub fn revoke_token(
        &self,
        id: TokenId,
        now_ms: u64,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let rec = {
            let mut t = txn.open_table(TOKENS)?;
            let Some(mut rec) = t
                .get(id.0.as_slice())?
                .map(|v| decode::<TokenRecord>("bootstrap_tokens", &id.0, v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            if rec.revoked_at_ms.is_none() {
                rec.revoked_at_ms = Some(now_ms);
                t.insert(id.0.as_slice(), encode(&rec)?.as_slice())?;
            }
            rec
        };
        txn.commit()?;
        Ok(Some(rec))
    }

    /// Enrolls a node, atomically: checks and spends the token, claims the name, and
    /// records the node. Nothing is written unless everything passes.
    pub fn enroll(
        &self,
        token: TokenId,
        secret: SecretHash,
        node: NodeRecord,
        now_ms: u64,
    ) -> Result<NodeRecord, EnrollError> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        {
            let mut tokens = txn.open_table(TOKENS).map_err(StoreError::from)?;
            let mut rec: TokenRecord =
                match tokens.get(token.0.as_slice()).map_err(StoreError::from)? {
                    Some(v) => decode("bootstrap_tokens", &token.0, v.value())?,
                    None => return Err(EnrollError::UnknownToken),
                };
            if rec.secret_hash != secret {
                return Err(EnrollError::BadSecret);
            }
            match rec.status(now_ms) {
                TokenStatus::Valid => {}
                TokenStatus::Revoked => {
                    return Err(EnrollError::Revoked(zy_common::time::rfc3339(
                        rec.revoked_at_ms.unwrap_or_default(),
                    )))
                }
                TokenStatus::Used => {
                    let (node, at) = rec.used.unwrap_or((node.id, 0));
                    return Err(EnrollError::Used {
                        node,
                        at: zy_common::time::rfc3339(at),
                    });
                }
                TokenStatus::Expired => {
                    return Err(EnrollError::Expired(zy_common::time::rfc3339(
                        rec.expires_at_ms,
                    )))
                }
            }
            let mut names = txn.open_table(NAMES).map_err(StoreError::from)?;
            if names
                .get(node.name.as_str())
                .map_err(StoreError::from)?
                .is_some()
            {
                return Err(EnrollError::NameInUse(node.name.clone()));
            }
            rec.used = Some((node.id, now_ms));
            tokens
                .insert(token.0.as_slice(), encode(&rec)?.as_slice())
                .map_err(StoreError::from)?;
            names
                .insert(node.name.as_str(), node.id.as_bytes().as_slice())
                .map_err(StoreError::from)?;
            txn.open_table(NODES)
                .map_err(StoreError::from)?
                .insert(node.id.as_bytes().as_slice(), encode(&node)?.as_slice())
                .map_err(StoreError::from)?;
        }
        txn.commit().map_err(StoreError::from)?;
        Ok(node)
    }

    /// Removes a node: frees its name and remembers it as removed so its certificate is
    /// refused. Its transitions are kept as history.
    pub fn remove_node(
        &self,
        id: NodeId,
        now_ms: u64,
    ) -> Result<Option<RemovedRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut nodes = txn.open_table(NODES)?;
            let Some(rec) = nodes
                .remove(id.as_bytes().as_slice())?
                .map(|v| decode::<NodeRecord>("nodes", id.as_bytes(), v.value()))
                .transpose()?
            else {
                return Ok(None);
            };
            txn.open_table(NAMES)?.remove(rec.name.as_str())?;
            let removed = RemovedRecord {
                id,
                name: rec.name,
                zone: rec.zone,
                removed_at_ms: now_ms,
            };
            txn.open_table(REMOVED)?
                .insert(id.as_bytes().as_slice(), encode(&removed)?.as_slice())?;
            removed
        };
        txn.commit()?;
        Ok(Some(removed))
    }

    /// Makes a batch of node updates durable in one transaction. Updates for nodes that
    /// are no longer enrolled are dropped.
    pub fn apply(&self, updates: &[NodeUpdate]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut nodes = txn.open_table(NODES)?;
            let mut transitions = txn.open_table(TRANSITIONS)?;
            for u in updates {
                let key = u.node.as_bytes().as_slice();
                let Some(mut rec) = nodes
                    .get(key)?
                    .map(|v| decode::<NodeRecord>("nodes", key, v.value()))
                    .transpose()?
                else {
                    continue;
                };
                rec.last_seen_ms = rec.last_seen_ms.max(u.last_seen_ms);
                if let Some(inv) = &u.inventory {
                    rec.inventory = Some(inv.clone());
                }
                if let Some(t) = &u.transition {
                    rec.state = t.to;
                    rec.state_since_ms = t.at_ms;
                    let seq = self.transition_seq.fetch_add(1, Ordering::Relaxed) + 1;
                    let mut tkey = Vec::with_capacity(24);
                    tkey.extend_from_slice(key);
                    tkey.extend_from_slice(&seq.to_be_bytes());
                    transitions.insert(tkey.as_slice(), encode(t)?.as_slice())?;
                }
                nodes.insert(key, encode(&rec)?.as_slice())?;
            }
            for u in updates.iter().filter(|u| u.transition.is_some()) {
                prune_transitions(&mut transitions, u.node)?;
            }
            txn.open_table(META)?.insert(
                "transition_seq",
                self.transition_seq.load(Ordering::Relaxed),
            )?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The most recent transitions of a node, oldest first.
    pub fn transitions(
        &self,
        node: NodeId,
        limit: usize,
    ) -> Result<Vec<TransitionRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TRANSITIONS)?;
        let (lo, hi) = node_range(node);
        let mut out = Vec::new();
        for row in table.range(lo.as_slice()..hi.as_slice())?.rev().take(limit) {
            let (k, v) = row?;
            out.push(decode("transitions", k.value(), v.value())?);
        }
        out.reverse();
        Ok(out)
    }
}

/// Converts schema 3 to schema 4: VMs join no anti-affinity group, none is migrating and
/// none has moved; every node is Active (nothing else existed) since its enrollment; no
/// operation was a migration.
fn convert_v3(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut vms = Vec::new();
    {
        let table = txn.open_table(VMS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v3::VmRec = decode("vms", k.value(), v.value())?;
            vms.push(VmRec {
                id: old.id,
                name: old.name,
                zone: old.zone,
                vcpus: old.vcpus,
                memory_mib: old.memory_mib,
                disk_gib: old.disk_gib,
                image: old.image,
                boot: old.boot,
                node: old.node,
                desired: old.desired,
                generation: old.generation,
                observed: old.observed,
                mac: old.mac,
                ip: old.ip,
                created_at_ms: old.created_at_ms,
                rev: old.rev,
                ssh_keys: old.ssh_keys,
                user_data: old.user_data,
                anti_affinity: None,
                migrating_to: None,
                moved_at_ms: None,
            });
        }
    }
    let mut table = txn.open_table(VMS)?;
    for rec in &vms {
        table.insert(rec.id.0.as_bytes().as_slice(), encode(rec)?.as_slice())?;
    }
    drop(table);
    let mut nodes = Vec::new();
    {
        let table = txn.open_table(NODES)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v3::NodeRecord = decode("nodes", k.value(), v.value())?;
            nodes.push(NodeRecord {
                id: old.id,
                name: old.name,
                zone: old.zone,
                state: old.state,
                state_since_ms: old.state_since_ms,
                enrolled_at_ms: old.enrolled_at_ms,
                token: old.token,
                last_seen_ms: old.last_seen_ms,
                inventory: old.inventory,
                cert: old.cert,
                admin: Admin::Active,
                admin_since_ms: old.enrolled_at_ms,
            });
        }
    }
    let mut table = txn.open_table(NODES)?;
    for rec in &nodes {
        table.insert(rec.id.as_bytes().as_slice(), encode(rec)?.as_slice())?;
    }
    drop(table);
    convert_v3_ops(txn)
}

/// Converts schema 3's operations (schemas 1 and 2 had none: the table is empty there).
fn convert_v3_ops(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut ops = Vec::new();
    {
        let table = txn.open_table(OPS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v3::OpRec = decode("operations", k.value(), v.value())?;
            ops.push(crate::ops::OpRec {
                id: old.id,
                key: old.key,
                kind: old.kind,
                vm: old.vm,
                vm_name: old.vm_name,
                steps: old.steps,
                current: old.current,
                state: old.state,
                target: old.target,
                created_at_ms: old.created_at_ms,
                updated_at_ms: old.updated_at_ms,
                rev: old.rev,
                migration: None,
            });
        }
    }
    let mut table = txn.open_table(OPS)?;
    for rec in &ops {
        table.insert(rec.id.0.as_bytes().as_slice(), encode(rec)?.as_slice())?;
    }
    Ok(())
}

/// Converts schema 2's VMs to schema 3: every VM keeps everything and was given no SSH keys
/// and no user-data (it was made before they could be).
fn convert_v2_vms(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut out = Vec::new();
    {
        let table = txn.open_table(VMS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v2::VmRec = decode("vms", k.value(), v.value())?;
            out.push(VmRec {
                id: old.id,
                name: old.name,
                zone: old.zone,
                vcpus: old.vcpus,
                memory_mib: old.memory_mib,
                disk_gib: old.disk_gib,
                image: old.image,
                boot: old.boot,
                node: old.node,
                desired: old.desired,
                generation: old.generation,
                observed: old.observed,
                mac: old.mac,
                ip: old.ip,
                created_at_ms: old.created_at_ms,
                rev: old.rev,
                ssh_keys: Vec::new(),
                user_data: None,
                anti_affinity: None,
                migrating_to: None,
                moved_at_ms: None,
            });
        }
    }
    let mut table = txn.open_table(VMS)?;
    for rec in &out {
        table.insert(rec.id.0.as_bytes().as_slice(), encode(rec)?.as_slice())?;
    }
    Ok(())
}

/// Converts schema 2's (and schema 1's) nodes and API tokens to schema 3: nodes learn their
/// certificate's dates at their next connection (none until then); API tokens, the admin
/// token of `init` among them, keep their name and hash and never expire, as before.
fn convert_v2_fleet(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut nodes = Vec::new();
    {
        let table = txn.open_table(NODES)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v2::NodeRecord = decode("nodes", k.value(), v.value())?;
            nodes.push(NodeRecord {
                id: old.id,
                name: old.name,
                zone: old.zone,
                state: old.state,
                state_since_ms: old.state_since_ms,
                enrolled_at_ms: old.enrolled_at_ms,
                token: old.token,
                last_seen_ms: old.last_seen_ms,
                inventory: old.inventory,
                cert: None,
                admin: Admin::Active,
                admin_since_ms: old.enrolled_at_ms,
            });
        }
    }
    let mut table = txn.open_table(NODES)?;
    for rec in &nodes {
        table.insert(rec.id.as_bytes().as_slice(), encode(rec)?.as_slice())?;
    }
    let mut tokens = Vec::new();
    {
        let table = txn.open_table(API_TOKENS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v2::ApiTokenRecord = decode("api_tokens", k.value(), v.value())?;
            tokens.push(ApiTokenRecord {
                id: old.id,
                secret_hash: old.secret_hash,
                name: old.name,
                created_at_ms: old.created_at_ms,
                created_by: None,
                expires_at_ms: None,
                revoked_at_ms: None,
                last_used_ms: None,
            });
        }
    }
    let mut table = txn.open_table(API_TOKENS)?;
    for rec in &tokens {
        table.insert(rec.id.0.as_slice(), encode(rec)?.as_slice())?;
    }
    Ok(())
}

/// Converts schema 1 to the current schema: every VM gets generation 1 and revision 1, what its node
/// last said becomes an observation of generation 0 (any real report is newer), each pending
/// deletion (a table of its own in schema 1) becomes a tombstone, and every image, which any
/// zone could boot, becomes shared.
fn convert_v1(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    use zy_common::vm::Generation;
    let mut images = Vec::new();
    {
        let table = txn.open_table(IMAGES)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v1::ImageRecord = decode("images", k.value().as_bytes(), v.value())?;
            images.push(ImageRecord {
                name: old.name,
                kind: old.kind,
                size_bytes: old.size_bytes,
                created_at_ms: old.created_at_ms,
                zone: None,
            });
        }
    }
    {
        let mut table = txn.open_table(IMAGES)?;
        for rec in &images {
            table.insert(rec.name.as_str(), encode(rec)?.as_slice())?;
        }
    }
    let mut out = Vec::new();
    {
        let table = txn.open_table(VMS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let old: v1::VmRec = decode("vms", k.value(), v.value())?;
            out.push(VmRec {
                id: old.id,
                name: old.name,
                zone: old.zone,
                vcpus: old.vcpus,
                memory_mib: old.memory_mib,
                disk_gib: old.disk_gib,
                image: old.image,
                boot: old.boot,
                node: old.node,
                desired: match old.desired {
                    v1::Desired::Running => VmDesired::Running,
                    v1::Desired::Stopped => VmDesired::Stopped,
                },
                generation: Generation(1),
                observed: Some(Observed {
                    state: old.state,
                    pid: old.pid,
                    intent: Generation(0),
                    generation: Generation(0),
                    at_ms: old.state_since_ms,
                }),
                mac: old.mac,
                ip: old.ip,
                created_at_ms: old.created_at_ms,
                rev: 1,
                ssh_keys: Vec::new(),
                user_data: None,
                anti_affinity: None,
                migrating_to: None,
                moved_at_ms: None,
            });
        }
    }
    {
        let table = txn.open_table(VM_DELETIONS)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let d: v1::VmDeletion = decode("vm_deletions", k.value(), v.value())?;
            out.push(VmRec {
                id: d.id,
                name: d.name,
                zone: d.zone,
                vcpus: 1,
                memory_mib: 64,
                disk_gib: 0,
                image: String::new(),
                boot: zy_common::image::ImageKind::Kernel {
                    kernel: zy_common::blob::BlobHash([0; 32]),
                    initrd: None,
                    cmdline: String::new(),
                },
                node: Some(d.node),
                desired: VmDesired::Deleted,
                generation: Generation(2),
                observed: None,
                mac: [0x52, 0x54, 0, 0, 0, 0],
                ip: d.ip,
                created_at_ms: d.at_ms,
                rev: 1,
                ssh_keys: Vec::new(),
                user_data: None,
                anti_affinity: None,
                migrating_to: None,
                moved_at_ms: None,
            });
        }
    }
    let mut table = txn.open_table(VMS)?;
    for rec in &out {
        table.insert(rec.id.0.as_bytes().as_slice(), encode(rec)?.as_slice())?;
    }
    txn.delete_table(VM_DELETIONS)?;
    Ok(())
}

/// What one transaction of [`Store::commit_group`] did.
#[derive(Debug)]
pub struct Group {
    /// Each batch's outcome, in the order given: written, or refused (and not written).
    pub outcomes: Vec<Result<(), StoreError>>,
    /// Finished operations pruned.
    pub pruned: Vec<zy_api::OpId>,
}

/// The rows a batch writes, encoded: key and value (`None`: removed).
struct Rows {
    vms: Vec<([u8; 16], Option<Vec<u8>>)>,
    ops: Vec<([u8; 16], Vec<u8>)>,
}

/// Checks a batch against the tables as the transaction holds them now, writing nothing:
/// the outer error is the store's, the inner the batch's own (a conflict, a record that
/// cannot be encoded). A row written twice in one batch is checked the second time against
/// the first write; a conflict carries the row as the store holds it.
fn check(
    vm_table: &redb::Table<&[u8], &[u8]>,
    op_table: &redb::Table<&[u8], &[u8]>,
    vms: &[VmWrite],
    ops: &[crate::ops::OpRec],
) -> Result<Result<Rows, StoreError>, StoreError> {
    let mut rows = Rows {
        vms: Vec::with_capacity(vms.len()),
        ops: Vec::with_capacity(ops.len()),
    };
    // The revision of each row this batch has written so far (`None`: removed).
    let mut written: std::collections::HashMap<zy_common::VmId, Option<u64>> =
        std::collections::HashMap::new();
    for w in vms {
        let (id, expect) = match w {
            VmWrite::Put { rec, expect } => (rec.id, *expect),
            VmWrite::Remove { id, expect } => (*id, *expect),
        };
        let key = *id.0.as_bytes();
        // What the store holds (this batch writes nothing before it is checked whole).
        let current: Option<VmRec> = vm_table
            .get(key.as_slice())?
            .map(|v| decode("vms", &key, v.value()))
            .transpose()?;
        let found = match written.get(&id) {
            Some(rev) => *rev,
            None => current.as_ref().map(|c| c.rev),
        };
        if found != expect {
            return Ok(Err(StoreError::Conflict {
                vm: id,
                expected: expect,
                found,
                current: current.map(Box::new),
            }));
        }
        match w {
            VmWrite::Put { rec, .. } => {
                let value = match encode(rec) {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e)),
                };
                written.insert(id, Some(rec.rev));
                rows.vms.push((key, Some(value)));
            }
            VmWrite::Remove { .. } => {
                written.insert(id, None);
                rows.vms.push((key, None));
            }
        }
    }
    let mut op_revs: std::collections::HashMap<zy_api::OpId, u64> =
        std::collections::HashMap::new();
    for op in ops {
        let key = *op.id.0.as_bytes();
        let (found, current) = match op_revs.get(&op.id) {
            Some(rev) => (*rev, None),
            None => {
                let current: Option<crate::ops::OpRec> = op_table
                    .get(key.as_slice())?
                    .map(|v| decode("operations", &key, v.value()))
                    .transpose()?;
                (current.as_ref().map_or(0, |c| c.rev), current)
            }
        };
        if found + 1 != op.rev {
            return Ok(Err(StoreError::OpConflict {
                op: op.id,
                current: current.map(Box::new),
            }));
        }
        let value = match encode(op) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        op_revs.insert(op.id, op.rev);
        rows.ops.push((key, value));
    }
    Ok(Ok(rows))
}

fn prune_ops(table: &mut redb::Table<&[u8], &[u8]>) -> Result<Vec<zy_api::OpId>, StoreError> {
    if (table.len()? as usize) <= FINISHED_OPS_KEPT {
        return Ok(Vec::new());
    }
    let mut finished = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let op: crate::ops::OpRec = decode("operations", k.value(), v.value())?;
        if !op.is_running() {
            finished.push((op.updated_at_ms, op.id));
        }
    }
    if finished.len() <= FINISHED_OPS_KEPT {
        return Ok(Vec::new());
    }
    finished.sort();
    let drop: Vec<zy_api::OpId> = finished[..finished.len() - FINISHED_OPS_KEPT]
        .iter()
        .map(|(_, id)| *id)
        .collect();
    for id in &drop {
        table.remove(id.0.as_bytes().as_slice())?;
    }
    Ok(drop)
}

fn node_range(node: NodeId) -> (Vec<u8>, Vec<u8>) {
    let mut lo = node.as_bytes().to_vec();
    lo.extend_from_slice(&[0u8; 8]);
    let mut hi = node.as_bytes().to_vec();
    hi.extend_from_slice(&[0xffu8; 8]);
    (lo, hi)
}

fn prune_transitions(
    table: &mut redb::Table<&[u8], &[u8]>,
    node: NodeId,
) -> Result<(), StoreError> {
    let (lo, hi) = node_range(node);
    let stale: Vec<Vec<u8>> = table
        .range(lo.as_slice()..hi.as_slice())?
        .rev()
        .skip(TRANSITIONS_KEPT)
        .map(|r| r.map(|(k, _)| k.value().to_vec()))
        .collect::<Result<_, _>>()?;
    for k in stale {
        table.remove(k.as_slice())?;
    }
    Ok(())
}

impl Store {
    /// Takes the store's one writer and holds it until the transaction is dropped (tests
    /// use it to make writers queue).
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> redb::WriteTransaction {
        self.db.begin_write().expect("a write transaction")
    }
}

/// A VM record for tests: running at generation 1, placed on a node, never observed.
#[cfg(test)]
pub(crate) fn test_vm(name: &str) -> VmRec {
    VmRec {
        id: zy_common::VmId::new_random(),
        name: name.into(),
        zone: Zone::Intranet,
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 0,
        image: "guest".into(),
        boot: zy_common::image::ImageKind::Kernel {
            kernel: zy_common::blob::BlobHash([1; 32]),
            initrd: None,
            cmdline: String::new(),
        },
        node: Some(NodeId::new_random()),
        desired: VmDesired::Running,
        generation: zy_common::vm::Generation(1),
        observed: None,
        mac: [0x52, 0x54, 0, 0, 0, 1],
        ip: std::net::Ipv4Addr::new(10, 220, 0, 3),
        created_at_ms: 1,
        rev: 1,
        ssh_keys: Vec::new(),
        user_data: None,
        anti_affinity: None,
        migrating_to: None,
        moved_at_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zy_common::token::Secret;

    fn tmp() -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "zy-store-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("zy.redb")).unwrap();
        (dir, store)
    }

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            id: NodeId::new_random(),
            name: name.into(),
            zone: Zone::Intranet,
            state: NodeState::Enrolled,
            state_since_ms: 1,
            enrolled_at_ms: 1,
            token: TokenId([0; 8]),
            last_seen_ms: 0,
            inventory: None,
            cert: None,
            admin: Admin::Active,
            admin_since_ms: 1,
        }
    }

    fn token(zone: Zone, secret: Secret, expires: u64) -> TokenRecord {
        TokenRecord {
            id: TokenId::new_random(),
            secret_hash: secret.hash(),
            zone,
            created_at_ms: 0,
            expires_at_ms: expires,
            revoked_at_ms: None,
            used: None,
            created_by: TokenId([1; 8]),
        }
    }

    #[test]
    fn enrollment_spends_the_token_once_and_checks_everything() {
        let (dir, s) = tmp();
        let secret = Secret::new_random();
        let t = token(Zone::Intranet, secret, 1_000);
        s.insert_token(&t).unwrap();

        assert!(matches!(
            s.enroll(t.id, Secret::new_random().hash(), node("a"), 10),
            Err(EnrollError::BadSecret)
        ));
        assert!(matches!(
            s.enroll(TokenId::new_random(), secret.hash(), node("a"), 10),
            Err(EnrollError::UnknownToken)
        ));
        assert!(matches!(
            s.enroll(t.id, secret.hash(), node("a"), 1_000),
            Err(EnrollError::Expired(_))
        ));
        let n = s.enroll(t.id, secret.hash(), node("a"), 10).unwrap();
        assert!(matches!(
            s.enroll(t.id, secret.hash(), node("b"), 11),
            Err(EnrollError::Used { node, .. }) if node == n.id
        ));
        // A second token cannot take a name in use, and a failed enrollment spends nothing.
        let secret2 = Secret::new_random();
        let t2 = token(Zone::Intranet, secret2, 1_000);
        s.insert_token(&t2).unwrap();
        assert!(matches!(
            s.enroll(t2.id, secret2.hash(), node("a"), 12),
            Err(EnrollError::NameInUse(_))
        ));
        assert_eq!(
            s.tokens()
                .unwrap()
                .iter()
                .find(|x| x.id == t2.id)
                .unwrap()
                .status(12),
            TokenStatus::Valid
        );
        s.revoke_token(t2.id, 13).unwrap().unwrap();
        assert!(matches!(
            s.enroll(t2.id, secret2.hash(), node("c"), 14),
            Err(EnrollError::Revoked(_))
        ));
        assert_eq!(s.nodes().unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn admin_changes_are_compare_and_swap_recorded_and_survive_reopen() {
        let (dir, s) = tmp();
        let secret = Secret::new_random();
        let t = token(Zone::Extranet, secret, u64::MAX);
        s.insert_token(&t).unwrap();
        let n = s.enroll(t.id, secret.hash(), node("x"), 1).unwrap();
        assert_eq!(n.admin, Admin::Active);
        let r = s
            .set_admin(n.id, Admin::Active, Admin::Draining, 5, "drain asked")
            .unwrap()
            .unwrap();
        assert_eq!((r.admin, r.admin_since_ms), (Admin::Draining, 5));
        // A writer that read a stale state changes nothing and records nothing.
        let r = s
            .set_admin(n.id, Admin::Active, Admin::Standby, 6, "stale")
            .unwrap()
            .unwrap();
        assert_eq!(r.admin, Admin::Draining);
        s.set_admin(n.id, Admin::Draining, Admin::Maintenance, 7, "drained")
            .unwrap();
        // Heartbeats do not touch it.
        s.apply(&[NodeUpdate {
            node: n.id,
            last_seen_ms: 8,
            inventory: None,
            transition: None,
        }])
        .unwrap();
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.nodes().unwrap()[0].admin, Admin::Maintenance);
        let log: Vec<(Admin, Admin, String)> = s
            .admin_transitions(n.id, 10)
            .unwrap()
            .into_iter()
            .map(|t| (t.from, t.to, t.reason))
            .collect();
        assert_eq!(
            log,
            [
                (Admin::Active, Admin::Draining, "drain asked".to_string()),
                (Admin::Draining, Admin::Maintenance, "drained".to_string())
            ]
        );
        assert_eq!(
            s.set_admin(NodeId::new_random(), Admin::Active, Admin::Draining, 9, "x")
                .unwrap(),
            None
        );
    }

    #[test]
    fn transitions_are_recorded_pruned_and_survive_reopen() {
        let (dir, s) = tmp();
        let secret = Secret::new_random();
        let t = token(Zone::Extranet, secret, u64::MAX);
        s.insert_token(&t).unwrap();
        let n = s.enroll(t.id, secret.hash(), node("x"), 1).unwrap();
        let mut state = NodeState::Enrolled;
        for i in 0..(TRANSITIONS_KEPT + 10) {
            let to = if state == NodeState::Ready {
                NodeState::Suspect
            } else {
                NodeState::Ready
            };
            s.apply(&[NodeUpdate {
                node: n.id,
                last_seen_ms: i as u64,
                inventory: None,
                transition: Some(TransitionRecord {
                    node: n.id,
                    from: state,
                    to,
                    at_ms: i as u64,
                    reason: "test".into(),
                }),
            }])
            .unwrap();
            state = to;
        }
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        let ts = s.transitions(n.id, usize::MAX).unwrap();
        assert_eq!(ts.len(), TRANSITIONS_KEPT);
        assert_eq!(ts.last().unwrap().to, state);
        assert_eq!(s.nodes().unwrap()[0].state, state);
        let removed = s.remove_node(n.id, 99).unwrap().unwrap();
        assert_eq!(removed.name, "x");
        assert!(s.nodes().unwrap().is_empty());
        assert_eq!(s.removed().unwrap().len(), 1);
        // Updates for a removed node are dropped, not resurrected.
        s.apply(&[NodeUpdate {
            node: n.id,
            last_seen_ms: 100,
            inventory: None,
            transition: None,
        }])
        .unwrap();
        assert!(s.nodes().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn newer_schema_and_corrupt_records_are_refused() {
        let (dir, s) = tmp();
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", SCHEMA_VERSION + 1)
                .unwrap();
            txn.open_table(NODES)
                .unwrap()
                .insert([1u8; 16].as_slice(), b"garbage".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(s.nodes(), Err(StoreError::Corrupt { .. })));
        drop(s);
        let err = Store::open(&dir.join("zy.redb")).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn vm_writes_are_compare_and_swap_and_all_or_nothing() {
        let (dir, s) = tmp();
        let a = test_vm("a");
        let b = test_vm("b");
        s.commit(
            &[
                VmWrite::Put {
                    rec: Box::new(a.clone()),
                    expect: None,
                },
                VmWrite::Put {
                    rec: Box::new(b.clone()),
                    expect: None,
                },
            ],
            &[],
        )
        .unwrap();
        // A second create of the same VM is a conflict.
        let err = s
            .commit(
                &[VmWrite::Put {
                    rec: Box::new(a.clone()),
                    expect: None,
                }],
                &[],
            )
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { found: Some(1), .. }),
            "{err}"
        );
        // A stale writer loses, and takes nothing else with it.
        let mut a2 = a.clone();
        a2.rev = 2;
        a2.desired = VmDesired::Stopped;
        let mut b2 = b.clone();
        b2.rev = 2;
        let err = s
            .commit(
                &[
                    VmWrite::Put {
                        rec: Box::new(b2.clone()),
                        expect: Some(1),
                    },
                    VmWrite::Put {
                        rec: Box::new(a2.clone()),
                        expect: Some(7),
                    },
                ],
                &[],
            )
            .unwrap_err();
        let StoreError::Conflict { current, .. } = err else {
            panic!()
        };
        assert_eq!(current.unwrap().rev, 1);
        assert!(s.vms().unwrap().iter().all(|v| v.rev == 1));
        s.commit(
            &[
                VmWrite::Put {
                    rec: Box::new(a2.clone()),
                    expect: Some(1),
                },
                VmWrite::Remove {
                    id: b.id,
                    expect: Some(1),
                },
            ],
            &[],
        )
        .unwrap();
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.vms().unwrap(), vec![a2]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_group_checks_each_batch_against_the_ones_before_it_and_leaves_out_only_the_refused() {
        let (dir, s) = tmp();
        let (a, b) = (test_vm("a"), test_vm("b"));
        let put = |rec: &VmRec, expect| VmWrite::Put {
            rec: Box::new(rec.clone()),
            expect,
        };
        let (mut a2, mut a2_again, mut b2) = (a.clone(), a.clone(), b.clone());
        a2.rev = 2;
        a2.vcpus = 2;
        a2_again.rev = 2;
        a2_again.vcpus = 3;
        b2.rev = 2;
        let mut a3 = a2.clone();
        a3.rev = 3;
        let first = [put(&a, None), put(&b, None)];
        let stale = [put(&a2_again, Some(1))];
        let group = s
            .commit_group([
                (&first[..], &[][..]),
                (&[put(&a2, Some(1))][..], &[][..]),
                // Planned from the same revision as the batch before: refused, alone.
                (&stale[..], &[][..]),
                (&[put(&b2, Some(1))][..], &[][..]),
                // Planned from what the group wrote before it: written.
                (&[put(&a3, Some(2))][..], &[][..]),
            ])
            .unwrap();
        let refused: Vec<usize> = (0..group.outcomes.len())
            .filter(|i| group.outcomes[*i].is_err())
            .collect();
        assert_eq!(refused, vec![2]);
        let Err(StoreError::Conflict {
            found: Some(2),
            current: Some(current),
            ..
        }) = &group.outcomes[2]
        else {
            panic!("{:?}", group.outcomes[2])
        };
        assert_eq!(**current, a2);
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        let mut vms = s.vms().unwrap();
        vms.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(vms, vec![a3, b2]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn schema_1_vms_deletions_and_images_are_converted_once_at_open() {
        #[derive(Serialize)]
        enum D1 {
            Running,
        }
        #[derive(Serialize)]
        struct V1 {
            id: zy_common::VmId,
            name: String,
            zone: Zone,
            vcpus: u32,
            memory_mib: u64,
            disk_gib: u64,
            image: String,
            boot: zy_common::image::ImageKind,
            node: Option<NodeId>,
            desired: D1,
            state: zy_common::vm::VmState,
            state_since_ms: u64,
            mac: [u8; 6],
            ip: std::net::Ipv4Addr,
            pid: Option<u32>,
            created_at_ms: u64,
        }
        #[derive(Serialize)]
        struct Del1 {
            id: zy_common::VmId,
            name: String,
            node: NodeId,
            zone: Zone,
            ip: std::net::Ipv4Addr,
            at_ms: u64,
        }
        let (dir, s) = tmp();
        let (live, gone) = (zy_common::VmId::new_random(), zy_common::VmId::new_random());
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 1)
                .unwrap();
            let old = V1 {
                id: live,
                name: "w1".into(),
                zone: Zone::Intranet,
                vcpus: 2,
                memory_mib: 256,
                disk_gib: 0,
                image: "guest".into(),
                boot: zy_common::image::ImageKind::Kernel {
                    kernel: zy_common::blob::BlobHash([1; 32]),
                    initrd: None,
                    cmdline: String::new(),
                },
                node: Some(NodeId::new_random()),
                desired: D1::Running,
                state: zy_common::vm::VmState::Running,
                state_since_ms: 5,
                mac: [0x52, 0x54, 0, 0, 0, 1],
                ip: std::net::Ipv4Addr::new(10, 220, 0, 2),
                pid: Some(9),
                created_at_ms: 1,
            };
            txn.open_table(VMS)
                .unwrap()
                .insert(
                    live.0.as_bytes().as_slice(),
                    encode(&old).unwrap().as_slice(),
                )
                .unwrap();
            let d = Del1 {
                id: gone,
                name: "w2".into(),
                node: NodeId::new_random(),
                zone: Zone::Intranet,
                ip: std::net::Ipv4Addr::new(10, 220, 0, 3),
                at_ms: 7,
            };
            txn.open_table(VM_DELETIONS)
                .unwrap()
                .insert(gone.0.as_bytes().as_slice(), encode(&d).unwrap().as_slice())
                .unwrap();
            #[derive(Serialize)]
            struct Img1 {
                name: String,
                kind: zy_common::image::ImageKind,
                size_bytes: u64,
                created_at_ms: u64,
            }
            let img = Img1 {
                name: "guest".into(),
                kind: zy_common::image::ImageKind::Kernel {
                    kernel: zy_common::blob::BlobHash([1; 32]),
                    initrd: None,
                    cmdline: String::new(),
                },
                size_bytes: 10,
                created_at_ms: 1,
            };
            txn.open_table(IMAGES)
                .unwrap()
                .insert("guest", encode(&img).unwrap().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let mut vms = s.vms().unwrap();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].id, live);
        assert_eq!(vms[0].desired, VmDesired::Running);
        assert_eq!(vms[0].observed.as_ref().unwrap().pid, Some(9));
        assert_eq!(vms[1].id, gone);
        assert_eq!(vms[1].desired, VmDesired::Deleted);
        // Images any zone could boot stay so: shared.
        let img = s.image("guest").unwrap().unwrap();
        assert_eq!((img.size_bytes, img.zone), (10, None));
        drop(s);
        // Opening again changes nothing.
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.vms().unwrap().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn schema_2_vms_are_converted_once_at_open_with_no_keys_or_user_data() {
        #[derive(Serialize)]
        struct V2 {
            id: zy_common::VmId,
            name: String,
            zone: Zone,
            vcpus: u32,
            memory_mib: u64,
            disk_gib: u64,
            image: String,
            boot: zy_common::image::ImageKind,
            node: Option<NodeId>,
            desired: VmDesired,
            generation: zy_common::vm::Generation,
            observed: Option<Observed>,
            mac: [u8; 6],
            ip: std::net::Ipv4Addr,
            created_at_ms: u64,
            rev: u64,
        }
        let (dir, s) = tmp();
        let want = VmRec {
            desired: VmDesired::Stopped,
            generation: zy_common::vm::Generation(4),
            rev: 7,
            ..test_vm("w1")
        };
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 2)
                .unwrap();
            let w = want.clone();
            let old = V2 {
                id: w.id,
                name: w.name,
                zone: w.zone,
                vcpus: w.vcpus,
                memory_mib: w.memory_mib,
                disk_gib: w.disk_gib,
                image: w.image,
                boot: w.boot,
                node: w.node,
                desired: w.desired,
                generation: w.generation,
                observed: w.observed,
                mac: w.mac,
                ip: w.ip,
                created_at_ms: w.created_at_ms,
                rev: w.rev,
            };
            txn.open_table(VMS)
                .unwrap()
                .insert(
                    want.id.0.as_bytes().as_slice(),
                    encode(&old).unwrap().as_slice(),
                )
                .unwrap();
            txn.commit().unwrap();
        }
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.vms().unwrap(), vec![want.clone()]);
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.vms().unwrap(), vec![want]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Fixed records of every kind schema 4 changed (VMs, nodes, operations) and of API
    /// tokens (schema 3).
    fn golden_records() -> Vec<(&'static str, Vec<u8>)> {
        let vm = VmRec {
            id: zy_common::VmId(uuid::Uuid::from_u128(7)),
            node: Some(NodeId(uuid::Uuid::from_u128(9))),
            observed: Some(Observed {
                state: zy_common::vm::VmState::Running,
                pid: Some(42),
                intent: zy_common::vm::Generation(1),
                generation: zy_common::vm::Generation(1 << 20),
                at_ms: 1_700_000_000_000,
            }),
            ssh_keys: vec![zy_common::guest::SshKey::parse(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKwxyYVhVBnDWR4OE6Ix9qctTrkxiKMI3txQaLpbjA/ ops@hz-a",
            )
            .unwrap()],
            user_data: Some("#cloud-config\npackages: [nginx]\n".into()),
            anti_affinity: Some("portal".into()),
            migrating_to: Some(NodeId(uuid::Uuid::from_u128(10))),
            moved_at_ms: Some(1_700_000_100_000),
            ..test_vm("w1")
        };
        let token = ApiTokenRecord {
            id: TokenId([1, 2, 3, 4, 5, 6, 7, 8]),
            secret_hash: SecretHash([9; 32]),
            name: "ci".into(),
            created_at_ms: 1_700_000_000_000,
            created_by: Some(TokenId([8; 8])),
            expires_at_ms: Some(1_700_086_400_000),
            revoked_at_ms: None,
            last_used_ms: Some(1_700_000_060_000),
        };
        let node = NodeRecord {
            id: NodeId(uuid::Uuid::from_u128(
                0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
            )),
            name: "n1".into(),
            zone: Zone::Extranet,
            state: NodeState::Ready,
            state_since_ms: 5,
            enrolled_at_ms: 1,
            token: TokenId([7; 8]),
            last_seen_ms: 6,
            inventory: None,
            cert: Some(NodeCert {
                serial: "0a0b".into(),
                not_before_ms: 1_000,
                not_after_ms: 605_000,
            }),
            admin: Admin::Draining,
            admin_since_ms: 7,
        };
        let mut op = crate::ops::OpRec::new(
            zy_api::OpKind::Migrate,
            &vm,
            zy_common::vm::Generation(1),
            Some("k1".into()),
            1_700_000_000_000,
        );
        op.id = zy_api::OpId(uuid::Uuid::from_u128(11));
        op.migration = Some(crate::ops::MigrationRec {
            from: NodeId(uuid::Uuid::from_u128(9)),
            to: NodeId(uuid::Uuid::from_u128(10)),
            cause: crate::ops::MoveCause::Drain,
            downtime_ms: Some(66),
            total_ms: Some(1_700),
            aborting: None,
            activation_sent_ms: Some(1_700_000_002_000),
        });
        vec![
            ("vm", encode(&vm).unwrap()),
            ("api_token", encode(&token).unwrap()),
            ("node", encode(&node).unwrap()),
            ("op", encode(&op).unwrap()),
        ]
    }

    /// The checked-in encodings of this schema's records: a change to their layout fails
    /// here, and needs a new schema with a conversion, not an edit of the file. Regenerate
    /// only then: `ZY_BLESS=1 cargo test -p zy-coordinator golden`.
    #[test]
    fn golden_record_encodings_of_schema_4() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/store_v4.txt");
        let recs = golden_records();
        let got: String = recs
            .iter()
            .map(|(name, b)| format!("{name} {}\n", zy_common::token::hex(b)))
            .collect();
        if std::env::var_os("ZY_BLESS").is_some() {
            std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).expect("golden file is checked in");
        assert_eq!(
            got, want,
            "record encoding of schema {SCHEMA_VERSION} changed"
        );
        let back: VmRec = decode("vms", b"k", &recs[0].1).unwrap();
        assert_eq!(back.anti_affinity.as_deref(), Some("portal"));
    }

    /// Hex lines `name bytes` of a checked-in golden file.
    fn golden_file(name: &str) -> Vec<(String, Vec<u8>)> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        std::fs::read_to_string(path)
            .expect("golden file is checked in")
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                let bytes = (0..v.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&v[i..i + 2], 16).unwrap())
                    .collect();
                (k.to_string(), bytes)
            })
            .collect()
    }

    /// A file of schema 3, made of the very bytes schema 3 wrote (its golden files), is
    /// converted once at open: every VM keeps everything and joins no group, every node is
    /// Active, and the file says schema 4 from then on.
    #[test]
    fn schema_3_records_as_written_are_converted_once_at_open() {
        let (dir, s) = tmp();
        let mut recs = golden_file("store_schema3.txt");
        recs.extend(golden_file("store_v3.txt"));
        let vm_id = zy_common::VmId(uuid::Uuid::from_u128(7));
        let node_id = NodeId(uuid::Uuid::from_u128(
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        ));
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 3)
                .unwrap();
            for (kind, bytes) in &recs {
                match kind.as_str() {
                    "vm" => {
                        txn.open_table(VMS)
                            .unwrap()
                            .insert(vm_id.0.as_bytes().as_slice(), bytes.as_slice())
                            .unwrap();
                    }
                    "node" => {
                        txn.open_table(NODES)
                            .unwrap()
                            .insert(node_id.as_bytes().as_slice(), bytes.as_slice())
                            .unwrap();
                    }
                    _ => {}
                }
            }
            txn.commit().unwrap();
        }
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let vms = s.vms().unwrap();
        assert_eq!(vms.len(), 1);
        let v = &vms[0];
        assert_eq!(v.id, vm_id);
        assert_eq!(
            v.user_data.as_deref(),
            Some("#cloud-config\npackages: [nginx]\n")
        );
        assert_eq!(v.ssh_keys.len(), 1);
        assert_eq!(
            (v.anti_affinity.as_ref(), v.migrating_to, v.moved_at_ms),
            (None, None, None)
        );
        let nodes = s.nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, "n1");
        assert_eq!(nodes[0].admin, Admin::Active);
        assert_eq!(nodes[0].admin_since_ms, nodes[0].enrolled_at_ms);
        assert!(nodes[0].cert.is_some());
        drop(s);
        // Opened again: nothing converted twice.
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        assert_eq!(s.vms().unwrap(), vms);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn schema_2_nodes_and_api_tokens_are_converted_once_and_the_admin_token_still_works() {
        #[derive(Serialize)]
        struct Node2 {
            id: NodeId,
            name: String,
            zone: Zone,
            state: NodeState,
            state_since_ms: u64,
            enrolled_at_ms: u64,
            token: TokenId,
            last_seen_ms: u64,
            inventory: Option<Inventory>,
        }
        #[derive(Serialize)]
        struct Token2 {
            id: TokenId,
            secret_hash: SecretHash,
            name: String,
            created_at_ms: u64,
        }
        let (dir, s) = tmp();
        let secret = Secret::new_random();
        let (nid, tid) = (NodeId::new_random(), TokenId::new_random());
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 2)
                .unwrap();
            let n = Node2 {
                id: nid,
                name: "n1".into(),
                zone: Zone::Intranet,
                state: NodeState::Ready,
                state_since_ms: 3,
                enrolled_at_ms: 1,
                token: TokenId([2; 8]),
                last_seen_ms: 4,
                inventory: None,
            };
            txn.open_table(NODES)
                .unwrap()
                .insert(nid.as_bytes().as_slice(), encode(&n).unwrap().as_slice())
                .unwrap();
            let t = Token2 {
                id: tid,
                secret_hash: secret.hash(),
                name: "admin".into(),
                created_at_ms: 1,
            };
            txn.open_table(API_TOKENS)
                .unwrap()
                .insert(tid.0.as_slice(), encode(&t).unwrap().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        drop(s);
        for _ in 0..2 {
            let s = Store::open(&dir.join("zy.redb")).unwrap();
            assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
            let nodes = s.nodes().unwrap();
            assert_eq!(
                (nodes[0].id, nodes[0].state, nodes[0].cert.clone()),
                (nid, NodeState::Ready, None)
            );
            let tokens = s.api_tokens().unwrap();
            assert_eq!(tokens.len(), 1);
            assert_eq!(tokens[0].name, "admin");
            assert_eq!(tokens[0].secret_hash, secret.hash());
            assert_eq!(tokens[0].status(u64::MAX - 1), ApiTokenStatus::Valid);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn api_tokens_expire_are_revoked_and_remember_their_last_use() {
        let (dir, s) = tmp();
        let t = ApiTokenRecord {
            id: TokenId::new_random(),
            secret_hash: Secret::new_random().hash(),
            name: "ci".into(),
            created_at_ms: 10,
            created_by: None,
            expires_at_ms: Some(100),
            revoked_at_ms: None,
            last_used_ms: None,
        };
        s.insert_api_token(&t).unwrap();
        assert_eq!(t.status(99), ApiTokenStatus::Valid);
        assert_eq!(t.status(100), ApiTokenStatus::Expired);
        let touched = s.touch_api_token(t.id, 50).unwrap().unwrap();
        assert_eq!(touched.last_used_ms, Some(50));
        // A late writer never moves it back.
        assert_eq!(
            s.touch_api_token(t.id, 40).unwrap().unwrap().last_used_ms,
            Some(50)
        );
        let r = s.revoke_api_token(t.id, 60).unwrap().unwrap();
        assert_eq!(r.status(61), ApiTokenStatus::Revoked);
        // Revoking again keeps the first time.
        assert_eq!(
            s.revoke_api_token(t.id, 70).unwrap().unwrap().revoked_at_ms,
            Some(60)
        );
        assert!(s
            .revoke_api_token(TokenId::new_random(), 1)
            .unwrap()
            .is_none());
        drop(s);
        let s = Store::open(&dir.join("zy.redb")).unwrap();
        let back = s.api_tokens().unwrap();
        assert_eq!(
            (back[0].revoked_at_ms, back[0].last_used_ms),
            (Some(60), Some(50))
        );
        // A node's certificate is recorded, and not for a node that is not enrolled.
        let cert = NodeCert {
            serial: "01".into(),
            not_before_ms: 1,
            not_after_ms: 2,
        };
        assert!(!s.set_node_cert(NodeId::new_random(), &cert).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
