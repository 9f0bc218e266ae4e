//! What the rest of the agent uses of the link: the live connection (when there is one)
//! and blob fetches over streams of their own.
//!
//! The node fetches image blobs through [`BlobSource`]; [`Uplink`] is the real one (tested
//! against a real coordinator in `tests/tests/blobs.rs`), unit tests use an in-memory fake.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use zy_common::blob::{BlobDir, BlobError, BlobHash};
use zy_common::proto::{Message, RefusalCode};
use zy_common::wire::{self, MAX_BODY};

/// The largest blob a node accepts.
pub const MAX_BLOB: u64 = 64 << 30;

/// A connection and the protocol version negotiated on it.
#[derive(Clone, Debug)]
pub struct Conn {
    pub conn: quinn::Connection,
    pub version: u16,
}

/// The link's current connection, as seen by others.
#[derive(Clone, Debug)]
pub struct Uplink {
    rx: watch::Receiver<Option<Conn>>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no connection to the coordinator within {0:?}")]
    NoLink(Duration),
    #[error("the coordinator has no blob {0}")]
    NotFound(BlobHash),
    #[error("fetching blob {hash} failed: {message}")]
    Transfer { hash: BlobHash, message: String },
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// Where image blobs come from.
pub trait BlobSource: Send + Sync + std::fmt::Debug {
    /// Makes sure blob `hash` is in `dir`, whole and verified, fetching it if it is not.
    fn ensure_blob<'a>(
        &'a self,
        hash: BlobHash,
        dir: &'a BlobDir,
    ) -> BoxFuture<'a, Result<(), FetchError>>;
}

impl BlobSource for Uplink {
    fn ensure_blob<'a>(
        &'a self,
        hash: BlobHash,
        dir: &'a BlobDir,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(Uplink::ensure_blob(self, hash, dir))
    }
}

impl Uplink {
    /// A pair: the link publishes, others read.
    pub fn new() -> (watch::Sender<Option<Conn>>, Self) {
        let (tx, rx) = watch::channel(None);
        (tx, Self { rx })
    }

    /// Waits for a connection.
    pub async fn conn(&self, timeout: Duration) -> Result<Conn, FetchError> {
        let mut rx = self.rx.clone();
        let got = tokio::time::timeout(timeout, rx.wait_for(|c| c.is_some())).await;
        match got {
            Ok(Ok(c)) => Ok(c.clone().ok_or(FetchError::NoLink(timeout))?),
            _ => Err(FetchError::NoLink(timeout)),
        }
    }

    /// Makes sure `hash` is in `dir`, fetching it if not.
    pub async fn ensure_blob(&self, hash: BlobHash, dir: &BlobDir) -> Result<(), FetchError> {
        if dir.has(&hash) {
            return Ok(());
        }
        let c = self.conn(Duration::from_secs(60)).await?;
        fetch_blob(&c, hash, dir).await
    }
}

/// Bytes read from the stream per write handed to the blocking pool.
const CHUNK: usize = 1 << 20;

/// A write done off the runtime thread gives back the writer and its buffer.
type WriteBack = Result<(zy_common::blob::BlobWriter, Vec<u8>), BlobError>;

async fn joined(
    hash: BlobHash,
    h: tokio::task::JoinHandle<WriteBack>,
) -> Result<(zy_common::blob::BlobWriter, Vec<u8>), FetchError> {
    Ok(h.await.map_err(|e| FetchError::Transfer {
        hash,
        message: format!("the blob writer failed: {e}"),
    })??)
}

/// Fetches one blob over a new stream into `dir`, verifying it against its hash.
pub async fn fetch_blob(c: &Conn, hash: BlobHash, dir: &BlobDir) -> Result<(), FetchError> {
    let fail = |message: String| FetchError::Transfer { hash, message };
    let (mut send, mut recv) = c.conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
    wire::write_frame(&mut send, c.version, &Message::FetchBlob(hash))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let _ = send.finish();
    let mut buf = Vec::new();
    let head: Message = tokio::time::timeout(
        Duration::from_secs(30),
        wire::read_frame(&mut recv, c.version, MAX_BODY, &mut buf),
    )
    .await
    .map_err(|_| fail("no answer in 30s".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let size = match head {
        Message::BlobHeader { hash: h, size } if h == hash => size,
        Message::Refused(r) if r.code == RefusalCode::NotFound => {
            return Err(FetchError::NotFound(hash))
        }
        other => return Err(fail(format!("unexpected {}", other.kind()))),
    };
    if size > MAX_BLOB {
        return Err(fail(format!(
            "{size} bytes is over the limit of {MAX_BLOB}"
        )));
    }
    // Reads fill one buffer while the blocking pool writes the other: the runtime thread,
    // which also carries load reports and keep-alives, never waits on the disk.
    let mut idle = Some(dir.writer(MAX_BLOB)?);
    let mut writing: Option<tokio::task::JoinHandle<WriteBack>> = None;
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let want = CHUNK.min(left as usize);
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        while filled < want {
            let n = AsyncReadExt::read(&mut recv, &mut buf[filled..want])
                .await
                .map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                return Err(fail(format!(
                    "the stream ended {} bytes short",
                    left - filled as u64
                )));
            }
            filled += n;
        }
        buf.truncate(filled);
        left -= filled as u64;
        let (mut w, free) = match (writing.take(), idle.take()) {
            (Some(h), _) => joined(hash, h).await?,
            (None, Some(w)) => (w, vec![0u8; CHUNK]),
            (None, None) => return Err(fail("the blob writer was lost".into())),
        };
        let data = std::mem::replace(&mut buf, free);
        writing = Some(tokio::task::spawn_blocking(move || {
            w.write(&data)?;
            Ok((w, data))
        }));
    }
    let w = match (writing.take(), idle.take()) {
        (Some(h), _) => joined(hash, h).await?.0,
        (None, Some(w)) => w,
        (None, None) => return Err(fail("the blob writer was lost".into())),
    };
    tokio::task::spawn_blocking(move || w.finish(Some(hash)))
        .await
        .map_err(|e| fail(format!("the blob writer failed: {e}")))??;
    Ok(())
}
