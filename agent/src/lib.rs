//! The Zhengyun node agent: one per physical server.
//!
//! It owns the node: its identity ([`identity`], written by [`join`]), what the node is and
//! does ([`host`]: inventory and load from procfs), and its link to the coordinator
//! ([`link`]: QUIC with mutual TLS, reports every second, reconnects with backoff).
//!
//! It must never: depend on the coordinator being reachable to keep the node's work running,
//! trust a coordinator that is not signed by the pinned site CA, let its private key leave
//! the node, or shell out where a Linux API exists.

pub mod config;
#[cfg(test)]
mod fake;
pub mod host;
pub mod identity;
pub mod join;
pub mod link;
pub mod net;
pub mod netdev;
pub mod node;
pub mod renew;
mod sys;
pub mod uplink;
pub mod vm;

/// The exit code of an agent the coordinator permanently refused (sysexits EX_CONFIG):
/// systemd's `RestartPreventExitStatus=78` keeps it from restarting in a loop.
pub const EXIT_REFUSED: u8 = 78;
