//! A VM's record on the node (`vms/<id>/vm.rec`): its spec and whether it should run. It is
//! what lets the agent find and re-attach to its QEMU processes after its own restart.
//! Framed like every persistent format: magic `ZV`, version, length, postcard body.
//! Version 1 records (before generations) are converted when read, here and nowhere else.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zy_common::vm::Generation;
use zy_common::wire::{self, FrameError};

use super::spec::{VmPaths, VmSpec};

pub use zy_common::vm::Desired;

const MAGIC: [u8; 2] = *b"ZV";
const VERSION: u16 = 2;
const MAX: u32 = 64 * 1024;

/// What the node keeps about a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: Desired,
    /// The coordinator's desired generation this node has taken up: intents of this
    /// generation or older are no-ops.
    pub intent: Generation,
    /// How long a stop waits for the guest before QEMU is told to quit.
    pub stop_grace_ms: u32,
    pub created_at_ms: u64,
    /// The network each NIC's tap joins, by tap name.
    pub ports: Vec<(String, crate::netdev::Segment)>,
}

/// A version 1 record: no generations yet.
#[derive(Deserialize)]
struct VmRecordV1 {
    spec: VmSpec,
    desired: Desired,
    created_at_ms: u64,
    ports: Vec<(String, crate::netdev::Segment)>,
}

/// The stop grace given to VMs whose record predates it.
pub const DEFAULT_STOP_GRACE_MS: u32 = 30_000;

/// A record that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read or write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt")]
    Corrupt {
        path: String,
        #[source]
        source: FrameError,
    },
}

impl VmRecord {
    /// Writes the record atomically.
    pub fn save(&self, paths: &VmPaths) -> Result<(), RecordError> {
        let path = paths.record();
        let bytes =
            wire::encode(MAGIC, VERSION, self, MAX).map_err(|source| RecordError::Corrupt {
                path: path.display().to_string(),
                source,
            })?;
        zy_common::files::write_atomic(&path, &bytes, 0o600).map_err(|source| RecordError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a record.
    pub fn load(path: &Path) -> Result<Self, RecordError> {
        let bytes = std::fs::read(path).map_err(|source| RecordError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let corrupt = |source| RecordError::Corrupt {
            path: path.display().to_string(),
            source,
        };
        match wire::peek_version(&bytes, MAGIC, MAX).map_err(corrupt)? {
            VERSION => Ok(wire::decode::<VmRecord>(&bytes, MAGIC, MAX)
                .map_err(corrupt)?
                .1),
            1 => {
                let (_, old) = wire::decode::<VmRecordV1>(&bytes, MAGIC, MAX).map_err(corrupt)?;
                Ok(VmRecord {
                    spec: old.spec,
                    desired: old.desired,
                    intent: Generation(0),
                    stop_grace_ms: DEFAULT_STOP_GRACE_MS,
                    created_at_ms: old.created_at_ms,
                    ports: old.ports,
                })
            }
            got => Err(corrupt(FrameError::UnsupportedVersion {
                got,
                supported: wire::VersionRange {
                    min: 1,
                    max: VERSION,
                },
            })),
        }
    }
}
