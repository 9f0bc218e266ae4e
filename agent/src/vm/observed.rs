//! The node's observed generation: the number every observation of a VM carries, so that the
//! coordinator can apply only what is newer than what it holds.
//!
//! It must increase across every VM of the node and across agent restarts, yet the agent
//! must not write a file per observation. So the agent reserves a block of numbers at a
//! time: the file holds the ceiling of the reserved block, written (atomically, fsync'd)
//! before any number of the block is used; a restarted agent starts above the old ceiling.
//! A crash wastes at most the rest of one block.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zy_common::vm::Generation;

/// Numbers reserved per write of the ceiling file.
pub const BLOCK: u64 = 1 << 20;

/// Why the generation file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ObservedError {
    #[error("cannot read or write the observed generation file {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the observed generation file {path} is corrupt (not a number)")]
    Corrupt { path: String },
}

/// Hands out increasing observed generations.
#[derive(Debug)]
pub struct ObservedClock {
    path: PathBuf,
    inner: Mutex<Block>,
}

#[derive(Debug)]
struct Block {
    next: u64,
    ceiling: u64,
}

impl ObservedClock {
    /// Opens the clock kept in `path`, reserving a first block above whatever was reserved
    /// before.
    pub fn open(path: &Path) -> Result<Self, ObservedError> {
        let io = |source| ObservedError::Io {
            path: path.display().to_string(),
            source,
        };
        let old = match std::fs::read_to_string(path) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| ObservedError::Corrupt {
                    path: path.display().to_string(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(e)),
        };
        let ceiling = old.saturating_add(BLOCK);
        write_ceiling(path, ceiling).map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            inner: Mutex::new(Block {
                next: old.saturating_add(1),
                ceiling,
            }),
        })
    }

    /// The next generation. Reserves a new block (one small synchronous write) once every
    /// [`BLOCK`] observations; if that write fails the numbers still increase, and the
    /// failure is logged.
    pub fn next(&self) -> Generation {
        let mut b = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if b.next >= b.ceiling {
            let ceiling = b.ceiling.saturating_add(BLOCK);
            if let Err(e) = write_ceiling(&self.path, ceiling) {
                tracing::error!(error = %e, path = %self.path.display(), "cannot reserve observed generations; a restart could reuse numbers");
            }
            b.ceiling = ceiling;
        }
        let g = b.next;
        b.next = b.next.saturating_add(1);
        Generation(g)
    }
}

fn write_ceiling(path: &Path, ceiling: u64) -> std::io::Result<()> {
    zy_common::files::write_atomic(path, format!("{ceiling}\n").as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_increase_across_blocks_and_restarts() {
        let dir = std::env::temp_dir().join(format!("zy-observed-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("observed-generation");
        let c = ObservedClock::open(&path).unwrap();
        let mut last = Generation(0);
        for _ in 0..10 {
            let g = c.next();
            assert!(g > last);
            last = g;
        }
        // Cross a block boundary.
        c.inner.lock().unwrap().next = BLOCK - 1;
        for _ in 0..3 {
            let g = c.next();
            assert!(g > last);
            last = g;
        }
        drop(c);
        // A restart (or a crash: nothing more is written) starts above all of them.
        let c = ObservedClock::open(&path).unwrap();
        assert!(c.next() > last);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            ObservedClock::open(&path),
            Err(ObservedError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
