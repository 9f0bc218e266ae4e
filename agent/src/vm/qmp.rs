//! A QMP (QEMU Machine Protocol) client: JSON lines over the VM's unix socket.
//!
//! On connect QEMU sends a greeting; the client answers `qmp_capabilities`; from then on
//! each `execute` gets exactly one `return` or `error`, and asynchronous `event`s may arrive
//! in between (they are kept, in order, for the caller to take).

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest line QEMU may send us; a longer one is a broken peer.
const MAX_LINE: usize = 1 << 20;

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP socket")]
    Closed,
    #[error("QEMU sent something that is not QMP: {0}")]
    Protocol(String),
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QEMU did not answer `{0}` in time")]
    Timeout(String),
}

/// An open QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    events: VecDeque<Value>,
    line: String,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            line: String::new(),
        };
        let greeting = tokio::time::timeout(Duration::from_secs(10), qmp.read())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut self.line)
            .await?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !self.line.ends_with('\n') {
            return Err(QmpError::Protocol("line too long".into()));
        }
        serde_json::from_str(&self.line).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// Runs a command and returns its `return` value. Events that arrive meanwhile are kept.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        let answer = async {
            loop {
                let v = self.read().await?;
                if v.get("event").is_some() {
                    self.events.push_back(v);
                    continue;
                }
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class: e["class"].as_str().unwrap_or("?").to_string(),
                        desc: e["desc"].as_str().unwrap_or("?").to_string(),
                    });
                }
                return Err(QmpError::Protocol(format!("unexpected {v}")));
            }
        };
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?
    }

    /// The run state QEMU reports (`running`, `paused`, `shutdown`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {v}")))
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits for the next event (or the socket closing).
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let v = self.read().await?;
            if v.get("event").is_some() {
                return Ok(v);
            }
        }
    }
}
