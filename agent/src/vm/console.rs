//! A VM's serial console: the one task that holds QEMU's console socket, and the sessions
//! that read it.
//!
//! ```text
//!   QEMU console.sock <--> pump task --(append)--> console.log (capped, rotated)
//!                            |   ^
//!               broadcast    |   |  bounded input channel
//!                            v   |
//!          sessions: any number of readers; at most one writer (the slot)
//! ```
//!
//! The pump is started with QEMU (and again when a restarted agent re-attaches to it) and
//! ends when QEMU closes the socket; its [`Hub`] is in [`Consoles`] meanwhile. Two ways
//! of reading:
//!
//! - [`serve`]: the log's last lines, then (when following) what is appended to it, as raw
//!   bytes on a QUIC stream (protocol `Console`);
//! - [`session`]: attached live (protocol version 3's `ConsoleAttach`): output as it comes,
//!   and, for the VM's one writer, input into the guest's serial port. A second writer is
//!   refused (`Busy`) unless it takes over, and then the first is told (`TakenOver`) and
//!   its session ends. The slot's rules are [`claim`], a pure function.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zy_common::task::AbortOnDrop;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, warn};
use zy_common::proto::{ConsoleEnd, ConsoleFrame, ConsoleMode, MAX_CONSOLE_CHUNK};
use zy_common::wire::{self, MAX_BODY};
use zy_common::VmId;

use super::runner::{append_capped, console_tail, CONSOLE_CAP};

/// Output chunks a live reader may fall behind by before it loses some.
const OUTPUT_BACKLOG: usize = 256;
/// Input chunks waiting for the guest's serial port.
const INPUT_BACKLOG: usize = 64;

/// The consoles open on this node, by VM. Cheap to clone; every clone is the same table.
#[derive(Clone, Debug, Default)]
pub struct Consoles(Arc<Mutex<HashMap<VmId, Arc<Hub>>>>);

/// One VM's open console.
#[derive(Debug)]
pub struct Hub {
    output: broadcast::Sender<Arc<[u8]>>,
    input: mpsc::Sender<Vec<u8>>,
    /// The session holding the writer slot, if any.
    writer: watch::Sender<Option<u64>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Consoles {
    /// Starts the pump of a VM's console: connects to QEMU's socket (which QEMU may not
    /// have opened yet), copies what the guest prints into the capped log and to live
    /// readers, and input from the writer into the socket, until QEMU closes it.
    pub fn open(&self, id: VmId, sock: PathBuf, log: PathBuf) {
        let consoles = self.clone();
        tokio::spawn(async move {
            let mut stream = None;
            for _ in 0..200 {
                if let Ok(s) = UnixStream::connect(&sock).await {
                    stream = Some(s);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let Some(stream) = stream else {
                warn!(vm = %id, sock = %sock.display(), "no console socket");
                return;
            };
            let (hub, input) = Hub::new();
            let hub = Arc::new(hub);
            consoles.lock().insert(id, hub.clone());
            pump(stream, &log, &hub, input).await;
            let mut table = consoles.lock();
            if table.get(&id).is_some_and(|h| Arc::ptr_eq(h, &hub)) {
                table.remove(&id);
            }
            // Dropping the hub's senders ends every session with `Closed`.
        });
    }

    /// The VM's open console, if QEMU runs and the pump holds its socket.
    pub fn get(&self, id: VmId) -> Option<Arc<Hub>> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Arc<Hub>>> {
        // The table holds no invariant a panicking holder could break half-way.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Copies between QEMU's console socket, the log, live readers and the writer's input.
async fn pump(stream: UnixStream, log: &Path, hub: &Hub, mut input: mpsc::Receiver<Vec<u8>>) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0u8; MAX_CONSOLE_CHUNK];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // No live reader is not an error.
                let _ = hub.output.send(Arc::from(&buf[..n]));
                // Off the runtime thread: a slow disk must not hold up the node's reports.
                let (l, chunk) = (log.to_path_buf(), buf[..n].to_vec());
                match tokio::task::spawn_blocking(move || append_capped(&l, &chunk, CONSOLE_CAP)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(error = %e, "console log write failed"),
                    Err(e) => debug!(error = %e, "console log writer failed"),
                }
            }
            Some(bytes) = input.recv() => {
                if let Err(e) = wr.write_all(&bytes).await {
                    debug!(error = %e, "console input write failed");
                    return;
                }
            }
        }
    }
}

/// What a claim of the writer slot came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The session reads only; the slot is untouched.
    Reader,
    /// The slot was free and is the session's now.
    Writer,
    /// The slot was another session's and is this one's now; that one must end.
    TookOver(u64),
    /// The slot is another session's, and this one did not ask to take it.
    Busy(u64),
}

/// The writer slot's rules: `holder` is who holds it, `mode` how session `me` attaches.
pub fn claim(holder: Option<u64>, mode: ConsoleMode) -> Claim {
    match (mode, holder) {
        (ConsoleMode::ReadOnly, _) => Claim::Reader,
        (_, None) => Claim::Writer,
        (ConsoleMode::TakeOver, Some(h)) => Claim::TookOver(h),
        (ConsoleMode::Write, Some(h)) => Claim::Busy(h),
    }
}

impl Hub {
    fn new() -> (Self, mpsc::Receiver<Vec<u8>>) {
        let (input, rx) = mpsc::channel(INPUT_BACKLOG);
        let hub = Self {
            output: broadcast::channel(OUTPUT_BACKLOG).0,
            input,
            writer: watch::channel(None).0,
            next_session: Default::default(),
        };
        (hub, rx)
    }

    /// Takes (or not) the writer slot for a new session: its number and the claim.
    fn attach(&self, mode: ConsoleMode) -> (u64, Claim) {
        let me = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut outcome = Claim::Reader;
        self.writer.send_if_modified(|holder| {
            outcome = claim(*holder, mode);
            match outcome {
                Claim::Writer | Claim::TookOver(_) => {
                    *holder = Some(me);
                    true
                }
                Claim::Reader | Claim::Busy(_) => false,
            }
        });
        (me, outcome)
    }

    /// Gives the slot back if `me` still holds it.
    fn release(&self, me: u64) {
        self.writer.send_if_modified(|holder| {
            if *holder == Some(me) {
                *holder = None;
                true
            } else {
                false
            }
        });
    }
}

/// Why a live session ended, for the agent's log.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the console stream failed")]
    Stream(#[from] wire::StreamError),
    #[error("the coordinator sent a bad console frame")]
    Frame(#[from] zy_common::wire::FrameError),
}

/// Serves one live session on a stream the coordinator opened with `ConsoleAttach`, until
/// either side ends it: the coordinator's side closes, the writer slot is taken over, or
/// the console closes (`hub` gone: the VM is not running here).
pub async fn session<R, W>(
    recv: R,
    send: &mut W,
    version: u16,
    hub: Option<Arc<Hub>>,
    mode: ConsoleMode,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let Some(hub) = hub else {
        return end(send, version, ConsoleEnd::NotRunning).await;
    };
    // Subscribed before anything is said, so that no output is missed.
    let mut output = hub.output.subscribe();
    let mut writer = hub.writer.subscribe();
    let (me, claimed) = hub.attach(mode);
    let writes = match claimed {
        Claim::Busy(_) => return end(send, version, ConsoleEnd::Busy).await,
        Claim::Reader => false,
        Claim::Writer | Claim::TookOver(_) => true,
    };
    // The session holds no strong reference to the hub: when the pump ends, the output
    // channel closes and every session learns it.
    let _release = Release(Arc::downgrade(&hub), me);
    let input = hub.input.clone();
    drop(hub);
    let took_over = matches!(claimed, Claim::TookOver(_));
    wire::write_frame(send, version, &ConsoleFrame::Attached { took_over }).await?;
    send.flush().await.map_err(wire::StreamError::Io)?;

    // The reader runs on its own so that a half-read frame is never abandoned by select!.
    let (in_tx, mut in_rx) = mpsc::channel::<Result<ConsoleFrame, SessionError>>(4);
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        let mut buf = Vec::new();
        loop {
            let r = wire::read_frame::<ConsoleFrame, _>(&mut recv, version, MAX_BODY, &mut buf)
                .await
                .map_err(SessionError::from)
                .and_then(|f| f.validate().map(|()| f).map_err(SessionError::from));
            let stop = r.is_err();
            if in_tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let _reader = AbortOnDrop(reader);

    loop {
        tokio::select! {
            out = output.recv() => {
                let frame = match out {
                    Ok(bytes) => ConsoleFrame::Output(bytes.to_vec()),
                    Err(broadcast::error::RecvError::Lagged(n)) => ConsoleFrame::Skipped(n),
                    Err(broadcast::error::RecvError::Closed) => {
                        return end(send, version, ConsoleEnd::Closed).await;
                    }
                };
                wire::write_frame(send, version, &frame).await?;
                send.flush().await.map_err(wire::StreamError::Io)?;
            }
            changed = writer.changed(), if writes => {
                if changed.is_err() {
                    return end(send, version, ConsoleEnd::Closed).await;
                }
                if *writer.borrow_and_update() != Some(me) {
                    return end(send, version, ConsoleEnd::TakenOver).await;
                }
            }
            frame = in_rx.recv() => {
                match frame {
                    // The coordinator's side went: the client left.
                    None | Some(Err(SessionError::Stream(wire::StreamError::Closed))) => return Ok(()),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(ConsoleFrame::Input(bytes))) if writes => {
                        // A writer displaced meanwhile types no more.
                        if *writer.borrow() != Some(me) {
                            return end(send, version, ConsoleEnd::TakenOver).await;
                        }
                        if input.send(bytes).await.is_err() {
                            return end(send, version, ConsoleEnd::Closed).await;
                        }
                    }
                    // A reader's input, or a frame only the agent sends: ignored.
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

async fn end<W: AsyncWrite + Unpin>(
    send: &mut W,
    version: u16,
    why: ConsoleEnd,
) -> Result<(), SessionError> {
    wire::write_frame(send, version, &ConsoleFrame::Ended(why)).await?;
    send.flush().await.map_err(wire::StreamError::Io)?;
    Ok(())
}

/// Gives the writer slot back when a session ends, however it ends.
struct Release(std::sync::Weak<Hub>, u64);

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(hub) = self.0.upgrade() {
            hub.release(self.1);
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    #[test]
    fn the_writer_slot_has_one_holder() {
        use ConsoleMode::*;
        assert_eq!(claim(None, ReadOnly), Claim::Reader);
        assert_eq!(claim(Some(3), ReadOnly), Claim::Reader);
        assert_eq!(claim(None, Write), Claim::Writer);
        assert_eq!(claim(None, TakeOver), Claim::Writer);
        assert_eq!(claim(Some(3), Write), Claim::Busy(3));
        assert_eq!(claim(Some(3), TakeOver), Claim::TookOver(3));
    }

    /// A hub whose "QEMU" is the other end of a socket pair: what the test writes there
    /// is output, what sessions type arrives there.
    async fn hub() -> (Consoles, VmId, UnixStream, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let sock = dir.0.join("console.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let consoles = Consoles::default();
        let id = VmId::new_random();
        consoles.open(id, sock, dir.0.join("console.log"));
        let (qemu, _) = listener.accept().await.unwrap();
        while consoles.get(id).is_none() {
            tokio::task::yield_now().await;
        }
        (consoles, id, qemu, dir)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let d = std::env::temp_dir().join(format!("zy-console-{}", rand::random::<u64>()));
                std::fs::create_dir_all(&d).unwrap();
                Self(d)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// A session on an in-memory stream: the coordinator's two ends.
    struct Client {
        to_agent: DuplexStream,
        from_agent: DuplexStream,
        buf: Vec<u8>,
        task: tokio::task::JoinHandle<Result<(), SessionError>>,
    }

    const V: u16 = 3;

    fn attach(consoles: &Consoles, id: VmId, mode: ConsoleMode) -> Client {
        let (to_agent, agent_recv) = duplex(1 << 20);
        let (mut agent_send, from_agent) = duplex(1 << 20);
        let hub = consoles.get(id);
        let task =
            tokio::spawn(async move { session(agent_recv, &mut agent_send, V, hub, mode).await });
        Client {
            to_agent,
            from_agent,
            buf: Vec::new(),
            task,
        }
    }

    impl Client {
        async fn next(&mut self) -> ConsoleFrame {
            let f = tokio::time::timeout(
                Duration::from_secs(5),
                wire::read_frame(&mut self.from_agent, V, MAX_BODY, &mut self.buf),
            )
            .await
            .expect("a frame within 5s")
            .unwrap();
            f
        }

        async fn output_until(&mut self, want: &str) -> String {
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains(want) {
                match self.next().await {
                    ConsoleFrame::Output(b) => seen.extend(b),
                    other => panic!("{other:?} while waiting for {want:?}"),
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        }

        async fn type_(&mut self, bytes: &[u8]) {
            wire::write_frame(&mut self.to_agent, V, &ConsoleFrame::Input(bytes.to_vec()))
                .await
                .unwrap();
        }
    }

    /// What the guest's serial port receives, up to and with `want`.
    async fn read_some(qemu: &mut UnixStream, want: &[u8]) -> Vec<u8> {
        let mut got: Vec<u8> = Vec::new();
        let mut buf = [0u8; 256];
        while !got.windows(want.len()).any(|w| w == want) {
            let n = tokio::time::timeout(Duration::from_secs(5), qemu.read(&mut buf))
                .await
                .expect("input within 5s")
                .unwrap();
            assert!(n > 0, "the console socket closed");
            got.extend(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn one_writer_types_readers_watch_and_a_takeover_ends_the_first() {
        let (consoles, id, mut qemu, dir) = hub().await;
        let mut w1 = attach(&consoles, id, ConsoleMode::Write);
        assert_eq!(w1.next().await, ConsoleFrame::Attached { took_over: false });
        let mut r = attach(&consoles, id, ConsoleMode::ReadOnly);
        assert_eq!(r.next().await, ConsoleFrame::Attached { took_over: false });

        // Output reaches every live reader, and the log.
        qemu.write_all(b"\x1b[1mlogin:\x1b[0m ").await.unwrap();
        w1.output_until("login:").await;
        r.output_until("login:").await;
        // The writer's keystrokes reach the guest; a reader's never do.
        r.type_(b"READER").await;
        w1.type_(b"root\r").await;
        assert_eq!(read_some(&mut qemu, b"root\r").await, b"root\r");

        // A second writer is refused, and the first keeps the slot.
        let mut w2 = attach(&consoles, id, ConsoleMode::Write);
        assert_eq!(w2.next().await, ConsoleFrame::Ended(ConsoleEnd::Busy));
        w2.task.await.unwrap().unwrap();
        w1.type_(b"still-me").await;
        read_some(&mut qemu, b"still-me").await;

        // A take-over displaces it, and it is told.
        let mut w3 = attach(&consoles, id, ConsoleMode::TakeOver);
        assert_eq!(w3.next().await, ConsoleFrame::Attached { took_over: true });
        assert_eq!(w1.next().await, ConsoleFrame::Ended(ConsoleEnd::TakenOver));
        w1.task.await.unwrap().unwrap();
        w3.type_(b"new-one").await;
        read_some(&mut qemu, b"new-one").await;

        // A writer that leaves frees the slot.
        drop(w3.to_agent);
        w3.task.await.unwrap().unwrap();
        let mut w4 = attach(&consoles, id, ConsoleMode::Write);
        assert_eq!(w4.next().await, ConsoleFrame::Attached { took_over: false });

        // QEMU closing the console ends every session, and the hub is gone.
        drop(qemu);
        assert_eq!(r.output_until_end().await, ConsoleEnd::Closed);
        assert_eq!(w4.output_until_end().await, ConsoleEnd::Closed);
        while consoles.get(id).is_some() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let log = std::fs::read(dir.0.join("console.log")).unwrap();
        assert_eq!(log, b"\x1b[1mlogin:\x1b[0m ");
        let mut late = attach(&consoles, id, ConsoleMode::ReadOnly);
        assert_eq!(
            late.next().await,
            ConsoleFrame::Ended(ConsoleEnd::NotRunning)
        );
    }

    impl Client {
        async fn output_until_end(&mut self) -> ConsoleEnd {
            loop {
                match self.next().await {
                    ConsoleFrame::Ended(e) => return e,
                    ConsoleFrame::Output(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_bad_frame_from_the_coordinator_ends_the_session_with_an_error() {
        let (consoles, id, _qemu, _dir) = hub().await;
        let mut w = attach(&consoles, id, ConsoleMode::Write);
        assert_eq!(w.next().await, ConsoleFrame::Attached { took_over: false });
        w.to_agent
            .write_all(b"ZY\0\x03\0\0\0\x02\x7f\x7f")
            .await
            .unwrap();
        assert!(matches!(
            w.task.await.unwrap(),
            Err(SessionError::Stream(_))
        ));
        // Its slot is free again.
        let mut w2 = attach(&consoles, id, ConsoleMode::Write);
        assert_eq!(w2.next().await, ConsoleFrame::Attached { took_over: false });
    }
}
