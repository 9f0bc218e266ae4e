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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::spec::Boot;
    use zy_common::proto::Accel;

    fn spec() -> VmSpec {
        VmSpec {
            id: zy_common::VmId::new_random(),
            name: "w1".into(),
            vcpus: 1,
            memory_mib: 128,
            accel: Accel::Tcg,
            boot: Boot::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            disks: vec![],
            nics: vec![],
        }
    }

    /// A version 1 record (before generations) is read as version 2 with generation 0, so
    /// that the coordinator's first intent is newer; it is written back as version 2.
    #[test]
    fn version_1_records_are_converted_when_read() {
        #[derive(Serialize)]
        struct V1 {
            spec: VmSpec,
            desired: Desired,
            created_at_ms: u64,
            ports: Vec<(String, crate::netdev::Segment)>,
        }
        let dir = std::env::temp_dir().join(format!("zy-rec-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = VmPaths { dir: dir.clone() };
        let old = V1 {
            spec: spec(),
            desired: Desired::Running,
            created_at_ms: 5,
            ports: vec![],
        };
        std::fs::write(paths.record(), wire::encode(MAGIC, 1, &old, MAX).unwrap()).unwrap();
        let rec = VmRecord::load(&paths.record()).unwrap();
        assert_eq!(rec.spec, old.spec);
        assert_eq!(rec.desired, Desired::Running);
        assert_eq!(rec.intent, Generation(0));
        assert_eq!(rec.stop_grace_ms, DEFAULT_STOP_GRACE_MS);
        rec.save(&paths).unwrap();
        let bytes = std::fs::read(paths.record()).unwrap();
        assert_eq!(wire::peek_version(&bytes, MAGIC, MAX), Ok(VERSION));
        assert_eq!(VmRecord::load(&paths.record()).unwrap(), rec);
        std::fs::write(paths.record(), wire::encode(MAGIC, 9, &old, MAX).unwrap()).unwrap();
        assert!(matches!(
            VmRecord::load(&paths.record()),
            Err(RecordError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
