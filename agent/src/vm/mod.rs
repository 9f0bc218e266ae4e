//! Virtual machines: one QEMU process per VM, controlled over QMP.
//!
//! ```text
//!  Pending -> Creating -> Starting -> Running -> Stopping -> Stopped
//!                |           |          |  \                   ^
//!                v           v          v   +-- guest poweroff-+
//!              Failed <-----------------+       (noticed, reported)
//!             (reason)    QEMU crash / exit at start
//! ```
//!
//! - [`spec`]: the typed spec and the QEMU command line built from it (pure).
//! - [`qmp`]: the QMP client.
//! - [`runner`]: starting a QEMU process, its capped console log, stopping it (ACPI
//!   powerdown, then `quit`, then SIGKILL), and re-attaching to it after an agent restart;
//!   the actor sees it only through the [`runner::VmRunner`] trait.
//! - [`record`]: what the node keeps per VM so that it can re-attach.
//! - [`actor`]: one task per VM owning its state; requests through a bounded channel.
//! - [`manager`]: every VM of the node; recovery at agent start.
//! - [`migrate`]: the live migration engine (QEMU to QEMU, disks by NBD mirrors).
//! - [`migration`]: the node's migrations in memory, one per VM, and the rules the
//!   migration commands follow.

pub mod actor;
pub mod console;
pub mod limits;
pub mod manager;
pub mod migrate;
pub mod migration;
pub mod observed;
pub mod qmp;
pub mod record;
pub mod runner;
pub mod seed;
pub mod spec;
pub mod systemd;
