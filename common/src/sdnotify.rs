//! The systemd notify protocol (`Type=notify`, `WatchdogSec=`), without a dependency:
//! one datagram to `$NOTIFY_SOCKET`. Outside systemd every call is a no-op. Also the
//! signals that stop a daemon.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends a state string such as `READY=1` or `WATCHDOG=1`. Errors are ignored by design:
/// failing to talk to systemd must never stop a daemon.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    if bytes.first() == Some(&b'@') {
        // An abstract socket: Linux-only addressing.
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..]) {
            let _ = sock.send_to_addr(state.as_bytes(), &addr);
        }
    } else {
        let _ = sock.send_to(state.as_bytes(), &path);
    }
}

/// Half the watchdog period systemd asked for, if it asked.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// Pings the systemd watchdog at half the period systemd asked for, if it asked.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval()?;
    Some(tokio::spawn(async move {
        loop {
            notify("WATCHDOG=1");
            tokio::time::sleep(every).await;
        }
    }))
}

/// Resolves at the first SIGTERM or SIGINT: how both daemons learn to stop.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
