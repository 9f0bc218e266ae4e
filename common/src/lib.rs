//! What the Zhengyun agent and coordinator share.
//!
//! This crate owns the vocabulary of the system: typed ids and zones ([`ids`]), the wire
//! protocol spoken between daemons ([`wire`] for frames, [`proto`] for messages), the TLS
//! identities that make every connection mutual ([`tls`]), the one-time bootstrap tokens that
//! enroll nodes ([`token`]), the QUIC transport settings both sides must agree on ([`quic`])
//! and what a VM's owner hands its guest, SSH keys and user-data ([`guest`]).
//!
//! What only the daemons need sits behind features, on by default: `pki` (making and
//! reading certificates), `quic` (the link's transport settings) and `logging`. A client of
//! the HTTPS API, like `zy`, turns them off and so needs neither rcgen nor quinn.
//!
//! It must never do host I/O of its own beyond what a codec needs: no sockets are opened and no
//! clocks are read in the protocol logic; callers drive it. That keeps every codec testable in
//! memory and fuzzable.

pub mod blob;
pub mod error;
pub mod files;
pub mod guest;
pub mod ids;
pub mod image;
#[cfg(feature = "logging")]
pub mod logging;
pub mod proto;
pub mod quic;
pub mod resources;
pub mod sdnotify;
pub mod task;
pub mod time;
pub mod tls;
pub mod token;
pub mod vm;
pub mod wire;

pub use ids::{MigrationId, NodeId, TokenId, VmId, Zone};

/// The version of this build, reported by agents in their inventory.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
