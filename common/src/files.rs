//! Writing state files safely.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes a file atomically: a temporary file created with `mode` (so a key is never
/// readable by others, not even for a moment), fsync, rename over the target.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The name a pair's member is staged under before it replaces the live file:
/// `node.key` -> `node.key.next`.
fn staged(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    path.with_file_name(name)
}

/// Replaces a private key and its certificate so that a crash at any point leaves either
/// the old pair or the new one, never a key with another key's certificate:
///
/// 1. the new key is written (atomically) as `<key>.next`, then the certificate as
///    `<cert>.next`: the staged certificate's presence marks a complete new pair;
/// 2. `<key>.next` is renamed over the key, `<cert>.next` over the certificate, and the
///    directory is synced.
///
/// A crash in step 1 leaves a stray `<key>.next`, a crash in step 2 a staged certificate:
/// [`recover_pair`], called before the pair is read, undoes the one and finishes the other.
pub fn replace_pair(
    key: &Path,
    key_bytes: &[u8],
    cert: &Path,
    cert_bytes: &[u8],
) -> std::io::Result<()> {
    write_atomic(&staged(key), key_bytes, 0o600)?;
    write_atomic(&staged(cert), cert_bytes, 0o644)?;
    finish_pair(key, cert)
}

fn finish_pair(key: &Path, cert: &Path) -> std::io::Result<()> {
    let staged_key = staged(key);
    if staged_key.exists() {
        std::fs::rename(&staged_key, key)?;
    }
    std::fs::rename(staged(cert), cert)?;
    if let Some(dir) = cert.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Brings a key and certificate pair that [`replace_pair`] was writing when the process
/// died to one consistent state. Returns true if it had anything to do.
pub fn recover_pair(key: &Path, cert: &Path) -> std::io::Result<bool> {
    if staged(cert).exists() {
        // The new pair was complete: finish installing it.
        finish_pair(key, cert)?;
        return Ok(true);
    }
    let staged_key = staged(key);
    if staged_key.exists() {
        // Cut short before its certificate was written: the old pair stands.
        std::fs::remove_file(staged_key)?;
        return Ok(true);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("zy-files-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_pair_is_replaced_whole_or_not_at_all_whatever_step_a_crash_cuts() {
        let d = dir();
        let (key, cert) = (d.join("node.key"), d.join("node.crt"));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        write_atomic(&key, b"k1", 0o600).unwrap();
        write_atomic(&cert, b"c1", 0o644).unwrap();
        assert!(!recover_pair(&key, &cert).unwrap());

        // Cut after the staged key: the old pair stands.
        write_atomic(&staged(&key), b"k2", 0o600).unwrap();
        assert!(recover_pair(&key, &cert).unwrap());
        assert_eq!((read(&key), read(&cert)), ("k1".into(), "c1".into()));
        assert!(!staged(&key).exists());

        // Cut after both were staged: the new pair is installed.
        write_atomic(&staged(&key), b"k3", 0o600).unwrap();
        write_atomic(&staged(&cert), b"c3", 0o644).unwrap();
        assert!(recover_pair(&key, &cert).unwrap());
        assert_eq!((read(&key), read(&cert)), ("k3".into(), "c3".into()));

        // Cut after the key was renamed in: the certificate follows.
        write_atomic(&staged(&cert), b"c4", 0o644).unwrap();
        write_atomic(&key, b"k4", 0o600).unwrap();
        assert!(recover_pair(&key, &cert).unwrap());
        assert_eq!((read(&key), read(&cert)), ("k4".into(), "c4".into()));

        replace_pair(&key, b"k5", &cert, b"c5").unwrap();
        assert_eq!((read(&key), read(&cert)), ("k5".into(), "c5".into()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
