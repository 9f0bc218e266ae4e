//! Every VM of the node: creates them, finds them again after an agent restart, and routes
//! requests to their actors.

use std::collections::HashMap;
use std::sync::Mutex;

use tracing::{error, info, warn};
use zy_common::time::now_millis;
use zy_common::VmId;

use super::actor::{self, Ctx, VmHandle};
use super::record::{Desired, VmRecord};
use super::runner;
use super::spec::{SpecError, VmPaths, VmSpec};

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("VM {0} already exists on this node")]
    Exists(VmId),
    #[error("cannot make the VM's directory {path}")]
    Files {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
}

/// The node's VMs.
#[derive(Debug)]
pub struct VmManager {
    ctx: Ctx,
    vms: Mutex<HashMap<VmId, VmHandle>>,
    /// QEMU processes of this data directory that no record names (found at start).
    strays: Vec<Stray>,
}

/// A QEMU started for a VM of this node that the agent has no record of (its record was
/// lost or unreadable): left running, reported, for ops to decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stray {
    pub pid: i32,
    pub id: VmId,
}

/// QEMU processes whose pid file lies under `vms_dir` (so this agent started them) and
/// whose VM is not in `known`.
pub fn find_strays(vms_dir: &std::path::Path, known: &dyn Fn(VmId) -> bool) -> Vec<Stray> {
    let mut out = Vec::new();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for p in procs {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let value = |flag: &[u8]| {
            args.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| String::from_utf8_lossy(w[1]).into_owned())
        };
        let (Some(uuid), Some(pidfile)) = (value(b"-uuid"), value(b"-pidfile")) else {
            continue;
        };
        // Component-wise: `<data>/vms-old/...` is not under `<data>/vms`.
        if !std::path::Path::new(&pidfile).starts_with(vms_dir) || !runner::pid_alive(pid) {
            continue;
        }
        if let Ok(id) = uuid.parse::<VmId>() {
            if !known(id) {
                out.push(Stray { pid, id });
            }
        }
    }
    out
}

impl VmManager {
    /// Finds every VM recorded under the data directory, re-attaches to the QEMU processes
    /// still running, and starts those that should run and do not.
    pub async fn recover(ctx: Ctx) -> Self {
        let mut vms = HashMap::new();
        let dir = ctx.data_dir.join("vms");
        let entries = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for entry in entries {
            let path = VmPaths { dir: entry.path() }.record();
            let rec = match VmRecord::load(&path) {
                Ok(r) => r,
                Err(e) => {
                    // Never delete what cannot be read: ops decide.
                    error!(error = %e, "skipping a VM whose record cannot be read");
                    continue;
                }
            };
            let paths = VmPaths::new(&ctx.data_dir, rec.spec.id);
            let live = match runner::attach(&rec.spec, &paths, &ctx.supervisor).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(vm = %rec.spec.id, error = %e, "found QEMU but could not attach; it will be treated as stopped");
                    None
                }
            };
            if let Some(l) = &live {
                info!(vm = %rec.spec.id, pid = l.pid, "re-attached to a running VM");
            }
            let id = rec.spec.id;
            vms.insert(id, actor::spawn(ctx.clone(), rec, live));
        }
        let strays = find_strays(&dir, &|id| vms.contains_key(&id));
        for s in &strays {
            warn!(vm = %s.id, pid = s.pid, "a QEMU of this node runs a VM it has no record of; left running for ops to decide");
        }
        Self {
            ctx,
            vms: Mutex::new(vms),
            strays,
        }
    }

    /// QEMU processes found at start that no record names.
    pub fn strays(&self) -> &[Stray] {
        &self.strays
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, VmHandle>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new VM and starts its actor (which starts it when `start`).
    pub fn create(
        &self,
        spec: VmSpec,
        ports: Vec<(String, crate::netdev::Segment)>,
        start: bool,
    ) -> Result<VmHandle, CreateError> {
        spec.validate()?;
        let mut vms = self.lock();
        if vms.contains_key(&spec.id) {
            return Err(CreateError::Exists(spec.id));
        }
        let paths = VmPaths::new(&self.ctx.data_dir, spec.id);
        std::fs::create_dir_all(&paths.dir).map_err(|source| CreateError::Files {
            path: paths.dir.display().to_string(),
            source,
        })?;
        let rec = VmRecord {
            spec,
            desired: if start {
                Desired::Running
            } else {
                Desired::Stopped
            },
            created_at_ms: now_millis(),
            ports,
        };
        if let Err(e) = rec.save(&paths) {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(e.into());
        }
        let id = rec.spec.id;
        let handle = actor::spawn(self.ctx.clone(), rec, None);
        vms.insert(id, handle.clone());
        Ok(handle)
    }

    /// A VM's handle.
    pub fn get(&self, id: VmId) -> Option<VmHandle> {
        self.lock().get(&id).cloned()
    }

    /// Every VM's handle.
    pub fn list(&self) -> Vec<VmHandle> {
        self.lock().values().cloned().collect()
    }

    /// The data directory the VMs live under.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.ctx.data_dir
    }

    /// Forgets a deleted VM.
    pub fn forget(&self, id: VmId) {
        self.lock().remove(&id);
    }
}
