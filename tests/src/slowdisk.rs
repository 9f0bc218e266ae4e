//! A slow disk for a lab node: an ext4 file system (no journal) on a loop device, mounted
//! `sync,nobarrier` so that every write is issued by the writing process itself and waits
//! for the device (but not for a flush of the machine's real disk), with the
//! writes of chosen processes throttled by the blkio controller of cgroup v1
//! (`blkio.throttle.write_bps_device`, which limits I/O its processes issue; buffered
//! writeback would escape it, hence `sync`).
//!
//! Everything it makes belongs to its lab run (the backing file is in the run's directory,
//! the cgroup is named `zy-<run>-slow`), so the run's drop, or the reaper of dead runs,
//! removes it with [`release_run`] even when a test died.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::sh;

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A throttled file system mounted at one directory.
#[derive(Debug)]
pub struct SlowDisk {
    pub mount: PathBuf,
    pub device: String,
    cgroup: PathBuf,
    backing: PathBuf,
}

fn cgroup_of(run: &str) -> PathBuf {
    Path::new(BLKIO).join(format!("zy-{run}-slow"))
}

impl SlowDisk {
    /// Makes a `size_gib` file system at `mount` (created if missing) in run `run`'s
    /// directory `run_dir`, its writes limited to `write_bps` bytes per second for the
    /// processes later [`add`](Self::add)ed.
    pub fn new(
        run: &str,
        run_dir: &Path,
        mount: &Path,
        size_gib: u64,
        write_bps: u64,
    ) -> Result<Self> {
        if !Path::new(BLKIO)
            .join("blkio.throttle.write_bps_device")
            .exists()
        {
            bail!("a slow disk needs the cgroup v1 blkio controller at {BLKIO}");
        }
        let backing = run_dir.join("slow-disk.img");
        let f = std::fs::File::create(&backing)?;
        f.set_len(size_gib << 30)?;
        drop(f);
        let out = sh("losetup", &["--find", "--show", &backing.to_string_lossy()])?;
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let cgroup = cgroup_of(run);
        let disk = SlowDisk {
            mount: mount.to_path_buf(),
            device: device.clone(),
            cgroup: cgroup.clone(),
            backing,
        };
        // From here on, drop undoes whatever was made.
        // No journal: with `sync`, a journal commit per write would make the device, not the
        // limit, set the pace.
        sh(
            "mkfs.ext4",
            &["-q", "-F", "-O", "^has_journal", "-E", "nodiscard", &device],
        )?;
        std::fs::create_dir_all(mount)?;
        sh(
            "mount",
            &["-o", "sync,nobarrier", &device, &mount.to_string_lossy()],
        )?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&device)?);
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot make {}", cgroup.display()))?;
        std::fs::write(
            cgroup.join("blkio.throttle.write_bps_device"),
            format!("{major}:{minor} {write_bps}"),
        )
        .context("cannot set the write limit")?;
        Ok(disk)
    }

    /// Puts process `pid` (all its threads, and what it starts later) under the limit.
    pub fn add(&self, pid: i32) -> Result<()> {
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move {pid} into {}", self.cgroup.display()))
    }

    /// Bytes written to the device by throttled processes so far.
    pub fn written(&self) -> u64 {
        let text = std::fs::read_to_string(self.cgroup.join("blkio.throttle.io_service_bytes"))
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (_, op, n) = (it.next()?, it.next()?, it.next()?);
                (op == "Write").then(|| n.parse::<u64>().ok()).flatten()
            })
            .sum()
    }
}

/// Writes a sparse image of `size` bytes at `path`: a 1 MiB pattern at its start and at its
/// end, a hole between (big to fetch, cheap to make).
pub fn write_sparse_image(path: &Path, size: u64) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    f.write_all(&chunk)?;
    f.seek(SeekFrom::Start(size.saturating_sub(chunk.len() as u64)))?;
    f.write_all(&chunk)?;
    Ok(())
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        release(
            &self.cgroup,
            std::iter::once(self.mount.clone()),
            std::slice::from_ref(&self.backing),
        );
    }
}

/// Removes whatever slow disks run `run` (with directory `run_dir`) left: its cgroup
/// (its processes go back to the root group), mounts under its directory, loop devices
/// backed by its files.
pub fn release_run(run: &str, run_dir: &Path) {
    let mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(PathBuf::from))
        .filter(|m| m.starts_with(run_dir))
        .collect();
    let backing = vec![run_dir.join("slow-disk.img")];
    release(&cgroup_of(run), mounts.into_iter(), &backing);
}

fn release(cgroup: &Path, mounts: impl Iterator<Item = PathBuf>, backing: &[PathBuf]) {
    if cgroup.exists() {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(cgroup);
    }
    for m in mounts {
        // Lazily: a process of the run may still hold a file there; the device goes when
        // the last one does.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&m)
            .output();
    }
    for b in backing {
        if let Ok(out) = std::process::Command::new("losetup")
            .arg("-j")
            .arg(b)
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = std::process::Command::new("losetup")
                        .args(["-d", dev])
                        .output();
                }
            }
        }
        let _ = std::fs::remove_file(b);
    }
}
