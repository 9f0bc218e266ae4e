//! The Zhengyun site coordinator: the site's thin brain.
//!
//! It owns the site, in one folder per subsystem:
//! - [`api`]: the HTTPS JSON API that the `zy` CLI (the `zy-cli` crate) drives: the router,
//!   token checks, node and token handlers, the TLS listener ([`api::https`]), the live event
//!   stream ([`api::events`]) and `openapi.json`. The bodies are the `zy-api` crate's types,
//!   shared with every client.
//! - [`fleet`]: every node's live state and session, the daemon's QUIC side with the site CA
//!   and enrollment ([`fleet::daemon`]), and membership driven by heartbeats
//!   ([`fleet::membership`]).
//! - [`store`]: desired and observed state in an embedded redb file, and the state directory
//!   it lives in ([`store::statedir`]).
//! - [`vms`]: VMs asked for through the API, their placement ([`vms::placement`]), the images
//!   they boot ([`vms::images`]) and the reconciler that brings nodes to what was asked.
//! - [`ops`]: durable operations, the steps every change of a VM goes through.
//! - [`nodeadmin`]: what ops ask of nodes (drain, maintenance, standby, wake), the power
//!   driver, the drain driver and consolidation.
//!
//! [`server`] wires them together; [`config`] is the daemon's configuration.
//!
//! It must never: run guests or touch a node's host (that is the agent's job), hold a lock
//! across I/O, trust anything a node says about its own identity beyond its certificate, or
//! log a secret (token secrets are hashed on arrival and never stored).

pub mod api;
pub mod config;
pub mod fleet;
pub mod nodeadmin;
pub mod ops;
pub mod server;
#[cfg(test)]
mod sim;
pub mod store;
mod sys;
pub mod vms;

pub use server::Coordinator;
