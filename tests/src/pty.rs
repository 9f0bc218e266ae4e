//! A program run on a pseudo-terminal, as an operator at a terminal runs it: its stdin,
//! stdout and stderr are the pty's slave side; the test types on the master side and reads
//! what the program prints there. The test keeps the slave open too, so that it can read
//! the terminal's modes (raw while a console is attached, as they were once it exits).
//!
//! The program is killed and reaped on drop, a panicking test included.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::termios::{self, LocalFlags, Termios};

/// One program on its own pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    name: String,
    child: Child,
    master: File,
    slave: OwnedFd,
    seen: Arc<Mutex<Vec<u8>>>,
}

/// A terminal's modes, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Modes {
    pub input: u64,
    pub output: u64,
    pub control: u64,
    pub local: u64,
}

impl Modes {
    fn of(t: &Termios) -> Self {
        Self {
            input: t.input_flags.bits() as u64,
            output: t.output_flags.bits() as u64,
            control: t.control_flags.bits() as u64,
            local: t.local_flags.bits() as u64,
        }
    }

    /// Whether the terminal is raw: no echo, no line editing, no signals from keys.
    pub fn raw(&self) -> bool {
        let l = LocalFlags::from_bits_truncate(self.local as _);
        !l.intersects(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG)
    }
}

impl Pty {
    /// Runs `program args` in network namespace `ns` with `env`, on a new pty.
    pub fn spawn(
        name: &str,
        ns: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Pty> {
        let pty = nix::pty::openpty(None, None).context("openpty")?;
        let io = |fd: &OwnedFd| -> Result<Stdio> { Ok(Stdio::from(fd.try_clone()?)) };
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .env("TERM", "xterm")
            .stdin(io(&pty.slave)?)
            .stdout(io(&pty.slave)?)
            .stderr(io(&pty.slave)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let master = File::from(pty.master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut reader, buf) = (master.try_clone()?, seen.clone());
        // Ends when the test drops the slave (a read then fails with EIO).
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                buf.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]);
            }
        });
        Ok(Pty {
            name: name.to_string(),
            child,
            master,
            slave: pty.slave,
            seen,
        })
    }

    /// Types `bytes` on the terminal.
    pub fn type_(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes)?;
        Ok(self.master.flush()?)
    }

    /// Everything the program printed so far, lossily as text.
    pub fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Waits until the program has printed `want`.
    pub fn wait_for(&self, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.seen().contains(want) {
            if Instant::now() > deadline {
                bail!(
                    "{} printed no {want:?} within {timeout:?}; it printed:\n{}",
                    self.name,
                    self.seen()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The terminal's modes now.
    pub fn modes(&self) -> Result<Modes> {
        Ok(Modes::of(&termios::tcgetattr(&self.slave)?))
    }

    /// Waits until the program exits.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}; it printed:\n{}",
                    self.name,
                    self.seen()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
