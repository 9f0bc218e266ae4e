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
//! - [`runner`]: starting a QEMU process, its capped console log, and stopping it
//!   (ACPI powerdown, then `quit`, then SIGKILL).

pub mod qmp;
pub mod runner;
pub mod spec;
