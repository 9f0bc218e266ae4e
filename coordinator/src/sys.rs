//! Raw socket options the coordinator sets; nothing here is `unsafe`.

use std::net::UdpSocket;

use nix::sys::socket::{setsockopt, sockopt};
use tracing::debug;

/// Raises a socket's receive and send buffers to `bytes`. As root the kernel's
/// `rmem_max`/`wmem_max` caps are bypassed (`SO_RCVBUFFORCE`); otherwise the request is
/// capped by them. Best effort: a failure only costs throughput under bursts.
pub fn grow_socket_buffers(socket: &UdpSocket, bytes: usize) {
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    }
    let got = nix::sys::socket::getsockopt(socket, sockopt::RcvBuf).unwrap_or(0);
    debug!(
        requested = bytes,
        granted = got,
        "daemon socket receive buffer"
    );
}
