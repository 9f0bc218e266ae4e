//! `zy vm console`: a VM's serial console.
//!
//! - On a terminal (stdin and stdout), interactive: stdin in raw mode, keystrokes to the
//!   guest, its output back as it is (escape sequences work), Ctrl-] detaches. One session
//!   types at a time: a second is refused, `--force` takes over (the first is told and exits
//!   with [`ExitCode::TakenOver`]).
//! - `--read-only`: the live console, watched, never typed on (any number at once).
//! - `--lines N` / `--follow`, or when not on a terminal: the console's log, its last lines
//!   and, following, what is appended.
//!
//! Output that does not go to a terminal session (the log's lines, anything to a pipe or a
//! file) has its terminal control sequences removed ([`crate::term::Stripper`]).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use zy_api::ConsoleEvent;

use crate::client::{Client, WebSocket};
use crate::term::{RawMode, StripWriter, Stripper, DETACH};
use crate::{CliError, ExitCode};

/// How `zy vm console` was asked to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleArgs {
    pub follow: bool,
    pub lines: Option<u32>,
    pub read_only: bool,
    pub force: bool,
}

/// Which way the console is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// The log: last lines, then (following) what is appended; `raw` keeps control
    /// sequences (a followed log on a terminal).
    Log { lines: u32, follow: bool, raw: bool },
    /// Live, watched only.
    Watch,
    /// Live, typed on; `force` takes the console over.
    Type { force: bool },
}

/// Chooses from the flags and whether stdin and stdout are terminals.
fn choose(a: &ConsoleArgs, tty_in: bool, tty_out: bool) -> Result<Way, CliError> {
    let usage = |m: &str| CliError {
        code: ExitCode::Usage,
        message: m.to_string(),
    };
    if a.read_only {
        return Ok(Way::Watch);
    }
    if a.follow || a.lines.is_some() || !(tty_in && tty_out) {
        if a.force {
            return Err(usage(
                "--force takes over the interactive console, which needs a terminal \
                 (stdin and stdout) and neither --follow nor --lines",
            ));
        }
        return Ok(Way::Log {
            lines: a.lines.unwrap_or(100),
            follow: a.follow,
            raw: a.follow && tty_out,
        });
    }
    Ok(Way::Type { force: a.force })
}

/// Runs `zy vm console` for the VM `vm` (already checked as a path segment).
pub async fn run(c: &Client, vm: &str, a: &ConsoleArgs) -> Result<(), CliError> {
    let stdout_tty = std::io::stdout().is_terminal();
    match choose(a, std::io::stdin().is_terminal(), stdout_tty)? {
        Way::Log { lines, follow, raw } => {
            let path = format!("/v1/vms/{vm}/console?lines={lines}&follow={follow}");
            let out = std::io::stdout().lock();
            if raw {
                let mut out = out;
                c.stream_to(&path, &mut out).await?;
            } else {
                let mut out = StripWriter::new(out);
                c.stream_to(&path, &mut out).await?;
            }
            Ok(())
        }
        Way::Watch => {
            let ws = c
                .websocket(&format!(
                    "/v1/vms/{vm}/console?interactive=true&read_only=true"
                ))
                .await?;
            if stdout_tty {
                eprintln!("watching the console of {vm} (read-only; Ctrl-C to stop)");
            }
            let end = session(ws, None, !stdout_tty).await;
            finish(vm, end)
        }
        Way::Type { force } => {
            let q = if force { "&force=true" } else { "" };
            let ws = c
                .websocket(&format!("/v1/vms/{vm}/console?interactive=true{q}"))
                .await?;
            let raw = RawMode::enable().map_err(|e| CliError {
                code: ExitCode::Failure,
                message: format!("cannot put the terminal in raw mode: {e}"),
            })?;
            eprint!("connected to {vm} (Ctrl-] to detach)\r\n");
            let end = session(ws, Some(stdin_chunks()), false).await;
            // The terminal as it was before anything more is said.
            drop(raw);
            finish(vm, end)
        }
    }
}

/// How a live session ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Detached,
    TakenOver,
    Closed,
    NodeLost,
    /// The coordinator's side went without a word.
    Dropped(String),
    Signal(&'static str),
}

fn finish(vm: &str, end: End) -> Result<(), CliError> {
    let fail = |code, message: String| Err(CliError { code, message });
    match end {
        End::Detached => {
            eprintln!("\ndetached from {vm}");
            Ok(())
        }
        End::TakenOver => fail(
            ExitCode::TakenOver,
            format!(
                "\nthe console of {vm} was taken over by another session (zy vm console --force)"
            ),
        ),
        End::Closed => fail(
            ExitCode::Failure,
            format!("\nthe console of {vm} closed: the VM stopped or was deleted"),
        ),
        End::NodeLost => fail(
            ExitCode::Unreachable,
            format!("\nthe link to the node of {vm} was lost"),
        ),
        End::Dropped(why) => fail(
            ExitCode::Unreachable,
            format!("\nthe coordinator ended the console of {vm}: {why}"),
        ),
        End::Signal(name) => fail(ExitCode::Failure, format!("\ninterrupted ({name})")),
    }
}

/// Reads stdin on a thread of its own (a blocking read of a terminal cannot be abandoned
/// by a task, and a thread does not hold up the process's exit).
fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Relays a live session between the terminal and the WebSocket until it ends.
async fn session(
    mut ws: WebSocket,
    mut input: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    strip: bool,
) -> End {
    let typing = input.is_some();
    let mut stripper = strip.then(Stripper::default);
    let mut out = std::io::stdout();
    let mut text = Vec::new();
    let (Ok(mut term), Ok(mut hup), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        return End::Dropped("cannot watch for signals".into());
    };
    let end = loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let shown = match &mut stripper {
                        Some(s) => {
                            text.clear();
                            s.feed(&bytes, &mut text);
                            &text[..]
                        }
                        None => &bytes[..],
                    };
                    if out.write_all(shown).and_then(|()| out.flush()).is_err() {
                        // Whoever read our output went away.
                        break End::Detached;
                    }
                }
                Some(Ok(WsMessage::Text(t))) => match serde_json::from_str::<ConsoleEvent>(&t) {
                    Ok(ConsoleEvent::TookOver) => {
                        eprint!("[zy: took the console over from another session]\r\n");
                    }
                    Ok(ConsoleEvent::Skipped { chunks }) => {
                        eprint!("\r\n[zy: {chunks} chunks of output lost: the terminal fell behind]\r\n");
                    }
                    Ok(ConsoleEvent::TakenOver) => break End::TakenOver,
                    Ok(ConsoleEvent::Closed) => break End::Closed,
                    Ok(ConsoleEvent::NodeLost) => break End::NodeLost,
                    // A notice of a newer coordinator: nothing to do.
                    Err(_) => {}
                },
                Some(Ok(WsMessage::Close(frame))) => {
                    break End::Dropped(frame.map(|f| f.reason.to_string()).unwrap_or_else(|| "closed".into()))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break End::Dropped(e.to_string()),
                None => break End::Dropped("closed".into()),
            },
            bytes = async { input.as_mut()?.recv().await }, if input.is_some() => {
                let Some(bytes) = bytes else {
                    // The terminal is gone.
                    break End::Detached;
                };
                let (typed, detach) = match bytes.iter().position(|b| *b == DETACH) {
                    Some(i) => (&bytes[..i], true),
                    None => (&bytes[..], false),
                };
                if !typed.is_empty() && ws.send(WsMessage::Binary(typed.to_vec().into())).await.is_err() {
                    break End::Dropped("the console could not be written to".into());
                }
                if detach {
                    break End::Detached;
                }
            }
            _ = term.recv() => break End::Signal("SIGTERM"),
            _ = hup.recv() => break End::Signal("SIGHUP"),
            // Ctrl-C is how a watcher stops (a typing session's Ctrl-C is the guest's).
            _ = int.recv() => break if typing { End::Signal("SIGINT") } else { End::Detached },
            _ = quit.recv() => break End::Signal("SIGQUIT"),
        }
    };
    if matches!(end, End::Detached | End::Signal(_)) {
        // Say goodbye, so that the writer's slot is free at once; not for long.
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(follow: bool, lines: Option<u32>, read_only: bool, force: bool) -> ConsoleArgs {
        ConsoleArgs {
            follow,
            lines,
            read_only,
            force,
        }
    }

    #[test]
    fn the_way_follows_the_flags_and_the_terminal() {
        let log = |lines, follow, raw| Way::Log { lines, follow, raw };
        let plain = args(false, None, false, false);
        assert_eq!(
            choose(&plain, true, true).unwrap(),
            Way::Type { force: false }
        );
        assert_eq!(
            choose(&args(false, None, false, true), true, true).unwrap(),
            Way::Type { force: true }
        );
        // Not on a terminal: the log, stripped.
        assert_eq!(choose(&plain, false, true).unwrap(), log(100, false, false));
        assert_eq!(choose(&plain, true, false).unwrap(), log(100, false, false));
        // The log's lines are always stripped; a followed log to a terminal is not.
        assert_eq!(
            choose(&args(false, Some(5), false, false), true, true).unwrap(),
            log(5, false, false)
        );
        assert_eq!(
            choose(&args(true, None, false, false), true, true).unwrap(),
            log(100, true, true)
        );
        assert_eq!(
            choose(&args(true, None, false, false), true, false).unwrap(),
            log(100, true, false)
        );
        assert_eq!(
            choose(&args(false, None, true, false), false, false).unwrap(),
            Way::Watch
        );
        // --force needs the interactive console.
        assert!(choose(&args(false, None, false, true), false, true).is_err());
        assert!(choose(&args(true, None, false, true), true, true).is_err());
    }

    #[test]
    fn detach_is_ctrl_right_bracket() {
        assert_eq!(DETACH, b']' & 0x1f);
        assert!(crate::term::strip(&[DETACH]).is_empty());
    }
}
