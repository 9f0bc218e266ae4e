//! A VM's record on the node (`vms/<id>/vm.rec`): its spec and whether it should run. It is
//! what lets the agent find and re-attach to its QEMU processes after its own restart.
//! Framed like every persistent format: magic `ZV`, version, length, postcard body.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zy_common::wire::{self, FrameError};

use super::spec::{VmPaths, VmSpec};

const MAGIC: [u8; 2] = *b"ZV";
const VERSION: u16 = 1;
const MAX: u32 = 64 * 1024;

/// Whether a VM should run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Desired {
    Running,
    Stopped,
}

/// What the node keeps about a VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: Desired,
    pub created_at_ms: u64,
    /// The network each NIC's tap joins, by tap name.
    pub ports: Vec<(String, crate::netdev::Segment)>,
}

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
        let (version, rec) = wire::decode(&bytes, MAGIC, MAX).map_err(corrupt)?;
        if version != VERSION {
            return Err(corrupt(FrameError::UnsupportedVersion {
                got: version,
                supported: wire::VersionRange {
                    min: VERSION,
                    max: VERSION,
                },
            }));
        }
        Ok(rec)
    }
}
