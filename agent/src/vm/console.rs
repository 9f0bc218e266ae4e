//! Serving a VM's console log to the coordinator: its last lines, then (when following)
//! whatever the guest prints, as raw bytes on a QUIC stream, until the reader goes away.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::runner::console_tail;

/// Writes the last `lines` lines, then follows the log if asked. Ends when the writer
/// fails (the reader left), or the VM's directory is gone (the VM was deleted).
pub async fn serve<W: tokio::io::AsyncWrite + Unpin>(
    out: &mut W,
    log: &Path,
    lines: u32,
    follow: bool,
) -> std::io::Result<()> {
    let tail = console_tail(log, lines as usize);
    let mut text = tail.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    out.write_all(text.as_bytes()).await?;
    out.flush().await?;
    if !follow {
        return Ok(());
    }
    let (mut inode, mut pos) = std::fs::metadata(log)
        .map(|m| (m.ino(), m.len()))
        .unwrap_or((0, 0));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(dir) = log.parent() else {
            return Ok(());
        };
        if !dir.exists() {
            return Ok(());
        }
        let Ok(meta) = std::fs::metadata(log) else {
            continue;
        };
        if meta.ino() != inode || meta.len() < pos {
            // Rotated: the new log starts from its beginning.
            inode = meta.ino();
            pos = 0;
        }
        if meta.len() == pos {
            // Probe the reader so that a departed one ends the loop.
            out.flush().await?;
            continue;
        }
        let mut f = tokio::fs::File::open(log).await?;
        f.seek(std::io::SeekFrom::Start(pos)).await?;
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).await?;
            pos += n as u64;
        }
        out.flush().await?;
    }
}
