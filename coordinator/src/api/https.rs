//! Serves the HTTP API over TLS: a TCP accept loop, a bounded handshake, and hyper's
//! HTTP/1.1 connection driver around the axum router.
//!
//! No client can starve the others: the accept loop never waits (a connection beyond the
//! limits is closed at once instead of sitting in the kernel's backlog ahead of everyone
//! else), each source address may hold only so many connections, and a TLS handshake must
//! finish within a few seconds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Most API connections open at once; more are closed at once.
const MAX_CONNECTIONS: usize = 512;
/// Most connections one source address may hold (a NAT of many ops consoles fits).
const MAX_PER_SOURCE: usize = 64;
/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections held per source address.
#[derive(Debug, Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One connection's hold on its source's count; released on drop.
#[derive(Debug)]
struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts and serves API connections until the task is aborted.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, router: axum::Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Arc::new(Sources::default());
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(source) = sources.take(remote.ip()) else {
            debug!(%remote, "API connection refused: its source holds {MAX_PER_SOURCE} already");
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%remote, "API connection refused: {MAX_CONNECTIONS} are open");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _held = (permit, source);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%remote, error = %e, "API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "API TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service)
                // Interactive consoles are WebSockets.
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%remote, error = %e, "API connection ended with an error");
            }
        });
    }
}
