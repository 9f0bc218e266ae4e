//! Content addressing: blobs (image files now, disk chunks later) are named by the BLAKE3
//! hash of their bytes, so a copy can always be verified against its name, and the same
//! content is stored and sent once.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The BLAKE3 hash of a blob's bytes: its name. Hex in JSON, 32 raw bytes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(pub [u8; 32]);

impl Serialize for BlobHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for BlobHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Self)
        }
    }
}

impl BlobHash {
    /// The hash of some bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

/// A string that is not a blob hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a blob hash (expected 64 hex digits)")]
pub struct BadHash(pub String);

impl FromStr for BlobHash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::token::hex_decode::<32>(s)
            .map(Self)
            .ok_or_else(|| BadHash(crate::ids::truncate_for_error(s)))
    }
}

/// What went wrong storing a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store I/O failed at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the blob is {got} bytes, over the limit of {max}")]
    TooLarge { got: u64, max: u64 },
    #[error("the content hashes to {got}, not {want}: corrupt or tampered with")]
    Mismatch { want: BlobHash, got: BlobHash },
}

/// A directory of blobs named by hash: `<dir>/<hex>`. Writes go to a temporary file that is
/// renamed into place only once the hash is known (and, when expected, checked), so a
/// half-written or corrupt blob is never visible under a name.
#[derive(Clone, Debug)]
pub struct BlobDir {
    dir: PathBuf,
}

impl BlobDir {
    /// A blob directory (created if missing).
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Where a blob lives.
    pub fn path(&self, h: &BlobHash) -> PathBuf {
        self.dir.join(h.to_string())
    }

    /// Whether a blob is present.
    pub fn has(&self, h: &BlobHash) -> bool {
        self.path(h).exists()
    }

    /// Size of a present blob.
    pub fn size(&self, h: &BlobHash) -> Option<u64> {
        std::fs::metadata(self.path(h)).ok().map(|m| m.len())
    }

    /// A writer for a new blob.
    pub fn writer(&self, max: u64) -> Result<BlobWriter, BlobError> {
        let tmp = self.dir.join(format!(
            ".incoming-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = std::fs::File::create(&tmp).map_err(|source| BlobError::Io {
            path: tmp.clone(),
            source,
        })?;
        Ok(BlobWriter {
            dir: self.clone(),
            tmp,
            file: Some(file),
            hasher: blake3::Hasher::new(),
            len: 0,
            max,
        })
    }

    /// Stores a blob read from `r`.
    pub fn put(&self, r: &mut impl Read, max: u64) -> Result<(BlobHash, u64), BlobError> {
        let mut w = self.writer(max)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).map_err(|source| BlobError::Io {
                path: w.tmp.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.finish(None)
    }

    /// Removes what nothing needs and is older than `grace`: blobs whose hash `keep` refuses
    /// (uploaded but never named by an image, or left by a deleted one) and unfinished
    /// uploads a crash left behind. Returns what was removed. The grace period lets an
    /// upload be followed by the image that names it.
    pub fn collect(
        &self,
        keep: &dyn Fn(&BlobHash) -> bool,
        grace: std::time::Duration,
    ) -> Result<Vec<PathBuf>, BlobError> {
        let io = |source| BlobError::Io {
            path: self.dir.clone(),
            source,
        };
        let now = std::time::SystemTime::now();
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let wanted = match name.parse::<BlobHash>() {
                Ok(h) => keep(&h),
                Err(_) => !name.starts_with(".incoming-"),
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|m| now.duration_since(m).unwrap_or_default() >= grace)
                .unwrap_or(false);
            if !wanted && old {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed.push(entry.path()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(BlobError::Io {
                            path: entry.path(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes a blob; absent is fine.
    pub fn remove(&self, h: &BlobHash) -> Result<(), BlobError> {
        match std::fs::remove_file(self.path(h)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BlobError::Io {
                path: self.path(h),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// A blob being written. Dropped unfinished, it leaves nothing behind.
#[derive(Debug)]
pub struct BlobWriter {
    dir: BlobDir,
    tmp: PathBuf,
    file: Option<std::fs::File>,
    hasher: blake3::Hasher,
    len: u64,
    max: u64,
}

impl BlobWriter {
    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.len += bytes.len() as u64;
        if self.len > self.max {
            return Err(BlobError::TooLarge {
                got: self.len,
                max: self.max,
            });
        }
        self.hasher.update(bytes);
        let tmp = self.tmp.clone();
        self.file
            .as_mut()
            .map(|f| f.write_all(bytes))
            .unwrap_or(Ok(()))
            .map_err(|source| BlobError::Io { path: tmp, source })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Syncs, checks the hash against `expect` if given, and renames into place.
    pub fn finish(mut self, expect: Option<BlobHash>) -> Result<(BlobHash, u64), BlobError> {
        let got = BlobHash(*self.hasher.finalize().as_bytes());
        if let Some(want) = expect {
            if want != got {
                return Err(BlobError::Mismatch { want, got });
            }
        }
        let file = self.file.take();
        if let Some(f) = file {
            f.sync_all().map_err(|source| BlobError::Io {
                path: self.tmp.clone(),
                source,
            })?;
        }
        let dest = self.dir.path(&got);
        std::fs::rename(&self.tmp, &dest).map_err(|source| BlobError::Io {
            path: dest.clone(),
            source,
        })?;
        Ok((got, self.len))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_named_by_content_and_checked() {
        let dir = std::env::temp_dir().join(format!("zy-blob-{}", rand::random::<u64>()));
        let b = BlobDir::open(&dir).unwrap();
        let (h, n) = b.put(&mut &b"hello"[..], 100).unwrap();
        assert_eq!((h, n), (BlobHash::of(b"hello"), 5));
        assert_eq!(std::fs::read(b.path(&h)).unwrap(), b"hello");
        assert_eq!(h.to_string().parse::<BlobHash>().unwrap(), h);
        assert!(matches!(
            b.put(&mut &[0u8; 200][..], 100),
            Err(BlobError::TooLarge { .. })
        ));
        let mut w = b.writer(100).unwrap();
        w.write(b"other").unwrap();
        assert!(matches!(w.finish(Some(h)), Err(BlobError::Mismatch { .. })));
        // Nothing but the one good blob is left.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unneeded_blobs_and_abandoned_uploads_are_collected_after_their_grace() {
        let dir = std::env::temp_dir().join(format!("zy-gc-{}", rand::random::<u64>()));
        let d = BlobDir::open(&dir).unwrap();
        let (kept, _) = d.put(&mut &b"kept"[..], 100).unwrap();
        let (orphan, _) = d.put(&mut &b"orphan"[..], 100).unwrap();
        let w = d.writer(100).unwrap();
        std::mem::forget(w);
        std::fs::write(dir.join("README"), b"not ours").unwrap();
        let keep = |h: &BlobHash| *h == kept;
        // Within the grace period nothing goes.
        assert!(d
            .collect(&keep, std::time::Duration::from_secs(3600))
            .unwrap()
            .is_empty());
        let removed = d.collect(&keep, std::time::Duration::ZERO).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(d.has(&kept) && !d.has(&orphan));
        assert!(
            dir.join("README").exists(),
            "files that are not blobs are left"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
