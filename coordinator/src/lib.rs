//! The Zhengyun site coordinator: the site's thin brain.
//!
//! It owns: the site CA and node enrollment ([`daemon`]), desired and observed state in an
//! embedded redb store ([`store`]), node membership driven by heartbeats ([`membership`],
//! [`fleet`]), and the HTTPS JSON API ([`api`]) that the `zy` CLI (the `zy-cli` crate) drives.
//! The API's bodies are the `zy-api` crate's types, shared with every client.
//!
//! It must never: run guests or touch a node's host (that is the agent's job), hold a lock
//! across I/O, trust anything a node says about its own identity beyond its certificate, or
//! log a secret (token secrets are hashed on arrival and never stored).

pub mod api;
pub mod config;
pub mod daemon;
pub mod events;
pub mod fleet;
pub mod https;
pub mod images;
pub mod membership;
pub mod ops;
pub mod placement;
pub mod server;
#[cfg(test)]
mod sim;
pub mod statedir;
pub mod store;
mod sys;
pub mod vms;

pub use server::Coordinator;
