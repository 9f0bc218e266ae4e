//! A VM's record on the node (`vms/<id>/vm.rec`): its spec and whether it should run. It is
//! what lets the agent find and re-attach to its QEMU processes after its own restart.
//! Framed like every persistent format: magic `ZV`, version, length, postcard body.
//! Older records are converted when read, here and nowhere else: version 1 (before
//! generations), version 2 (before disks named their base image) and version 3 (before
//! records kept the VM's cloud-init seed).

use std::path::Path;

use serde::{Deserialize, Serialize};
use zy_common::vm::Generation;
use zy_common::wire::{self, FrameError};

use super::spec::{Boot, DiskSpec, NicSpec, VmPaths, VmSpec};

pub use zy_common::vm::Desired;

const MAGIC: [u8; 2] = *b"ZV";
const VERSION: u16 = 4;
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
    /// What the guest of a disk image is told through its cloud-init seed (`seed.img`): a
    /// seed missing at a start is written again from here.
    pub seed: Option<super::seed::Seed>,
}

/// A version 3 record: no seed kept.
#[derive(Deserialize)]
struct VmRecordV3 {
    spec: VmSpec,
    desired: Desired,
    intent: Generation,
    stop_grace_ms: u32,
    created_at_ms: u64,
    ports: Vec<(String, crate::netdev::Segment)>,
}

/// A version 1 record: no generations yet.
#[derive(Deserialize)]
struct VmRecordV1 {
    spec: VmSpecV2,
    desired: Desired,
    created_at_ms: u64,
    ports: Vec<(String, crate::netdev::Segment)>,
}

/// A version 2 record: its disks do not name their base.
#[derive(Deserialize)]
struct VmRecordV2 {
    spec: VmSpecV2,
    desired: Desired,
    intent: Generation,
    stop_grace_ms: u32,
    created_at_ms: u64,
    ports: Vec<(String, crate::netdev::Segment)>,
}

/// The spec of versions 1 and 2.
#[derive(Serialize, Deserialize)]
struct VmSpecV2 {
    id: zy_common::VmId,
    name: String,
    vcpus: u32,
    memory_mib: u64,
    accel: zy_common::proto::Accel,
    boot: Boot,
    disks: Vec<DiskSpecV2>,
    nics: Vec<NicSpec>,
}

#[derive(Serialize, Deserialize)]
struct DiskSpecV2 {
    path: std::path::PathBuf,
    format: String,
}

impl From<VmSpecV2> for VmSpec {
    fn from(s: VmSpecV2) -> Self {
        VmSpec {
            id: s.id,
            name: s.name,
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            accel: s.accel,
            boot: s.boot,
            // QEMU follows such an overlay's header, as it did when it was made.
            disks: s
                .disks
                .into_iter()
                .map(|d| DiskSpec {
                    path: d.path,
                    format: d.format,
                    base: None,
                })
                .collect(),
            nics: s.nics,
        }
    }
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
            // Its seed stays as it was written; only a lost one could not be made again.
            3 => {
                let (_, old) = wire::decode::<VmRecordV3>(&bytes, MAGIC, MAX).map_err(corrupt)?;
                Ok(VmRecord {
                    spec: old.spec,
                    desired: old.desired,
                    intent: old.intent,
                    stop_grace_ms: old.stop_grace_ms,
                    created_at_ms: old.created_at_ms,
                    ports: old.ports,
                    seed: None,
                })
            }
            2 => {
                let (_, old) = wire::decode::<VmRecordV2>(&bytes, MAGIC, MAX).map_err(corrupt)?;
                Ok(VmRecord {
                    spec: old.spec.into(),
                    desired: old.desired,
                    intent: old.intent,
                    stop_grace_ms: old.stop_grace_ms,
                    created_at_ms: old.created_at_ms,
                    ports: old.ports,
                    seed: None,
                })
            }
            1 => {
                let (_, old) = wire::decode::<VmRecordV1>(&bytes, MAGIC, MAX).map_err(corrupt)?;
                Ok(VmRecord {
                    spec: old.spec.into(),
                    desired: old.desired,
                    intent: Generation(0),
                    stop_grace_ms: DEFAULT_STOP_GRACE_MS,
                    created_at_ms: old.created_at_ms,
                    ports: old.ports,
                    seed: None,
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
    use crate::vm::spec::BaseImage;
    use zy_common::proto::Accel;

    fn spec_v2() -> VmSpecV2 {
        VmSpecV2 {
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
            disks: vec![DiskSpecV2 {
                path: "/v/disk0.qcow2".into(),
                format: "qcow2".into(),
            }],
            nics: vec![],
        }
    }

    fn tmp() -> (std::path::PathBuf, VmPaths) {
        let dir = std::env::temp_dir().join(format!("zy-rec-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        (dir.clone(), VmPaths { dir })
    }

    /// Disks with and without a base are read back as written. (A `skip_serializing_if`
    /// on the base once made postcard records of kernel guests with a disk unreadable: the
    /// lab's chaos run found the QEMU of such a VM left running after its agent restarted.)
    #[test]
    fn records_round_trip_with_and_without_a_base() {
        let (dir, paths) = tmp();
        let mut spec: VmSpec = spec_v2().into();
        spec.disks.push(DiskSpec {
            path: "/v/disk1.qcow2".into(),
            format: "qcow2".into(),
            base: Some(BaseImage {
                path: "/img/abc".into(),
                format: "raw".into(),
            }),
        });
        let rec = VmRecord {
            spec,
            desired: Desired::Stopped,
            intent: Generation(7),
            stop_grace_ms: 1000,
            created_at_ms: 9,
            ports: vec![],
            seed: None,
        };
        rec.save(&paths).unwrap();
        assert_eq!(VmRecord::load(&paths.record()).unwrap(), rec);
        // With a seed holding keys, user-data and a resolver.
        let rec = VmRecord {
            seed: Some(crate::vm::seed::Seed {
                id: rec.spec.id,
                hostname: "w1".into(),
                nics: vec![crate::vm::seed::SeedNic {
                    mac: [0x52, 0x54, 0, 1, 2, 3],
                    ip: std::net::Ipv4Addr::new(10, 220, 0, 2),
                    prefix: 16,
                    gateway: Some(std::net::Ipv4Addr::new(10, 220, 0, 1)),
                    mtu: 1450,
                    nameservers: vec![std::net::Ipv4Addr::new(10, 220, 0, 1)],
                    search: vec!["hz.gov".into()],
                }],
                ssh_keys: vec![zy_common::guest::SshKey::parse(
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKwxyYVhVBnDWR4OE6Ix9qctTrkxiKMI3txQaLpbjA/",
                )
                .unwrap()],
                user_data: Some(format!("#cloud-config\n# {}\n", "x".repeat(32 * 1024 - 20))),
            }),
            ..rec
        };
        rec.save(&paths).unwrap();
        assert_eq!(VmRecord::load(&paths.record()).unwrap(), rec);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A version 1 record (before generations) is read with generation 0, so that the
    /// coordinator's first intent is newer; it is written back as the current version.
    #[test]
    fn version_1_records_are_converted_when_read() {
        #[derive(Serialize)]
        struct V1 {
            spec: VmSpecV2,
            desired: Desired,
            created_at_ms: u64,
            ports: Vec<(String, crate::netdev::Segment)>,
        }
        let (dir, paths) = tmp();
        let old = V1 {
            spec: spec_v2(),
            desired: Desired::Running,
            created_at_ms: 5,
            ports: vec![],
        };
        std::fs::write(paths.record(), wire::encode(MAGIC, 1, &old, MAX).unwrap()).unwrap();
        let rec = VmRecord::load(&paths.record()).unwrap();
        assert_eq!(rec.spec.id, old.spec.id);
        assert_eq!(rec.spec.disks[0].path, old.spec.disks[0].path);
        assert_eq!(rec.spec.disks[0].base, None);
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

    /// A version 2 record (its disks name no base) keeps its generation and grace; QEMU
    /// goes on following its overlays' headers.
    #[test]
    fn version_2_records_are_converted_when_read() {
        #[derive(Serialize)]
        struct V2 {
            spec: VmSpecV2,
            desired: Desired,
            intent: Generation,
            stop_grace_ms: u32,
            created_at_ms: u64,
            ports: Vec<(String, crate::netdev::Segment)>,
        }
        let (dir, paths) = tmp();
        let old = V2 {
            spec: spec_v2(),
            desired: Desired::Stopped,
            intent: Generation(4),
            stop_grace_ms: 2000,
            created_at_ms: 5,
            ports: vec![],
        };
        std::fs::write(paths.record(), wire::encode(MAGIC, 2, &old, MAX).unwrap()).unwrap();
        let rec = VmRecord::load(&paths.record()).unwrap();
        assert_eq!(rec.spec.disks.len(), 1);
        assert_eq!(rec.spec.disks[0].base, None);
        assert_eq!(
            (rec.desired, rec.intent, rec.stop_grace_ms),
            (Desired::Stopped, Generation(4), 2000)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A version 3 record (no seed kept) keeps everything else; its VM's seed stays the one
    /// on disk.
    #[test]
    fn version_3_records_are_converted_when_read() {
        #[derive(Serialize)]
        struct V3 {
            spec: VmSpec,
            desired: Desired,
            intent: Generation,
            stop_grace_ms: u32,
            created_at_ms: u64,
            ports: Vec<(String, crate::netdev::Segment)>,
        }
        let (dir, paths) = tmp();
        let old = V3 {
            spec: spec_v2().into(),
            desired: Desired::Running,
            intent: Generation(6),
            stop_grace_ms: 3000,
            created_at_ms: 8,
            ports: vec![],
        };
        std::fs::write(paths.record(), wire::encode(MAGIC, 3, &old, MAX).unwrap()).unwrap();
        let rec = VmRecord::load(&paths.record()).unwrap();
        assert_eq!(rec.spec, old.spec);
        assert_eq!(
            (
                rec.desired,
                rec.intent,
                rec.stop_grace_ms,
                rec.created_at_ms
            ),
            (Desired::Running, Generation(6), 3000, 8)
        );
        assert_eq!(rec.seed, None);
        rec.save(&paths).unwrap();
        let bytes = std::fs::read(paths.record()).unwrap();
        assert_eq!(wire::peek_version(&bytes, MAGIC, MAX), Ok(VERSION));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
