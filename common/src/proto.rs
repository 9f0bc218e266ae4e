//! The messages of wire protocol versions 3 and 4.
//!
//! One connection per agent; on it one bidirectional *control stream* that the agent opens.
//! After the [`crate::wire::Preamble`] exchange:
//!
//! ```text
//!  enrollment (no client certificate yet)      enrolled node (mutual TLS)
//!  agent              coordinator              agent              coordinator
//!    | JoinRequest ------> |                     | Hello ------------> |
//!    | <---- JoinAccepted  |                     | <----------- Welcome|
//!    |   (or Refused)      |                     | Load/Event/Reply -> |   (every second)
//!                                                | <-------- Command   |
//!                                                | <-------- Refused   |   (then close)
//!                                                | RenewCert --------> |   (version 3: when
//!                                                | <------ CertRenewed |    a third is left)
//! ```
//!
//! Certificate renewal (version 3 and later) rides the control stream of a live session:
//! the agent sends a request for a key it has just made, the coordinator issues a
//! certificate for the node the session's own certificate names (never for what the request
//! claims) and answers; the session and everything on it carry on untouched, and the agent
//! presents the new certificate from its next connection on.
//!
//! VMs travel as *intents*, level-triggered and generation-numbered: [`CommandKind::EnsureVm`]
//! says "this VM, in this state, as of desired generation g" and [`CommandKind::DeleteVm`]
//! "no such VM, as of g". The agent takes an intent only if g is newer than the one it holds
//! and answers at once with what it has ([`ReplyKind::Vm`]); the work that follows (fetching
//! an image, booting) is reported by [`EventKind::Vm`], each observation numbered by the
//! agent's own, node-wide increasing generation. Sending an intent twice is harmless, so the
//! coordinator simply sends it again until the node has taken it up.
//!
//! Every message is checked by [`Message::validate`] after decoding: the codec guarantees
//! shape, validation guarantees sense (finite numbers, bounded strings, sane ranges).
//!
//! Version 3 adds the interactive console ([`Message::ConsoleAttach`], then
//! [`ConsoleFrame`]s both ways on the stream it opens); every message of version 2 keeps
//! its layout, so a version 3 build speaks both and sends a version 2 peer nothing new.
//!
//! ```text
//!  coordinator                          agent
//!    | ConsoleAttach {id, mode} ----------> |   (first frame of a stream it opens)
//!    | <------------ Attached {took_over}   |   or Ended(Busy | NotRunning), then the end
//!    | <------------ Output(bytes) ...      |   what the guest prints, live
//!    | Input(bytes) ... ------------------> |   keystrokes (writers only)
//!    | <------------ Ended(TakenOver|Closed)|   then the stream ends
//! ```
//!
//! Version 4 adds live migration of a VM between two nodes: six commands
//! ([`CommandKind::MigrateIn`] ... [`CommandKind::MigrateAbort`]), two replies
//! ([`ReplyKind::MigrateListening`], [`ReplyKind::Migration`]) and one event
//! ([`EventKind::Migration`]), each a new variant at the end of its enum, so every message
//! of version 3 keeps its layout and a version 4 build speaks both (it sends a version 3
//! peer nothing of version 4: [`Message::since_version`]). The coordinator drives both
//! nodes; the nodes' QEMUs talk to each other directly under TLS (the agent's
//! `vm::migrate` module says why and how):
//!
//! ```text
//!  source agent                coordinator                destination agent
//!    |                            | MigrateIn {m, vm, g, source} --> |  QEMU -incoming, NBD export
//!    |                            | <---- MigrateListening(target)   |  (a repeat: the same target)
//!    | <-- MigrateOut {m, target} |                                  |
//!    | Done ------------------->  |                                  |
//!    | Event Migration(...) ----> |   (at least once a second and at every phase change)
//!    |   mirroring, memory, switchover                               |
//!    | Event Migration(Completed{downtime, total}) --> |             |  source paused for good
//!    |                            | MigrateActivate {m} ------------> |  cont, announce-self
//!    |                            | <----------------- Vm(VmInfo)    |  now an ordinary VM here
//!    |                            |  (moves the VM's record to the destination)
//!    | <-- MigrateFinish {m}      |                                  |
//!    | Done (source QEMU, disks, files gone; the VM forgotten)       |
//!
//!  any time before Finish: MigrateAbort {m} to the destination first, then to the source
//!  (which resumes the guest, even after Completed). MigrateStatus {m} to either side.
//! ```

use serde::{Deserialize, Serialize};

use crate::blob::BlobHash;
use crate::guest::SshKey;
use crate::ids::{validate_name, MigrationId, NodeId, VmId, Zone};
use crate::image::ImageKind;
use crate::vm::{Desired, Generation, VmState};
use crate::wire::FrameError;

/// Longest free-text string carried in a message (reasons, notices, CPU models).
pub const MAX_TEXT: usize = 1024;
/// Longest DER blob (certificates, certificate requests).
pub const MAX_DER: usize = 16 * 1024;

/// The first protocol version with [`Message::RenewCert`] and [`Message::CertRenewed`].
pub const RENEWAL_SINCE: u16 = 3;
/// The first protocol version with [`Message::ConsoleAttach`] and its [`ConsoleFrame`]s.
pub const CONSOLE_SINCE: u16 = 3;
/// The first protocol version with live migration: the `Migrate*` commands,
/// [`ReplyKind::MigrateListening`], [`ReplyKind::Migration`] and [`EventKind::Migration`].
pub const MIGRATION_SINCE: u16 = 4;

/// Every message of protocol versions 3 and 4 (see [`Message::since_version`]). New variants go at
/// the end: postcard numbers variants by position, so the encodings of the older ones never
/// change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    JoinRequest(JoinRequest),
    JoinAccepted(JoinAccepted),
    Hello(Hello),
    Welcome(Welcome),
    Load(LoadReport),
    Command(Command),
    Reply(Reply),
    Event(Event),
    Refused(Refusal),
    /// Agent → coordinator, first frame of a stream of its own: send me this blob.
    FetchBlob(BlobHash),
    /// Coordinator → agent on a fetch stream: the blob follows, `size` raw bytes, then the
    /// stream ends. (Or a `Refused` with `NotFound`.)
    BlobHeader {
        hash: BlobHash,
        size: u64,
    },
    /// Agent → coordinator after Welcome: every VM the node has.
    VmReport(VmReport),
    /// Coordinator → agent, first frame of a stream the coordinator opens: send this VM's
    /// console, its last `lines` lines and then, if `follow`, what it prints as it prints it.
    /// The agent answers with raw console bytes (or a `Refused`) until either side stops.
    Console {
        id: VmId,
        lines: u32,
        follow: bool,
    },
    /// Agent → coordinator on the control stream (version 3): a certificate, please, for the
    /// key of this PKCS#10 request; the node stays the one the session's certificate names.
    RenewCert {
        csr_der: Vec<u8>,
    },
    /// Coordinator → agent (version 3): the answer to [`Message::RenewCert`], the new node
    /// certificate (DER) or why not.
    CertRenewed(Result<Vec<u8>, ReplyError>),
    /// Version 3. Coordinator → agent, first frame of a stream the coordinator opens: attach
    /// to this VM's live console. The agent answers with [`ConsoleFrame`]s, starting with
    /// [`ConsoleFrame::Attached`] or [`ConsoleFrame::Ended`]; the coordinator sends
    /// [`ConsoleFrame::Input`] (taken only from the VM's one writer).
    ConsoleAttach {
        id: VmId,
        mode: ConsoleMode,
    },
}

/// Most bytes of console output or input in one [`ConsoleFrame`].
pub const MAX_CONSOLE_CHUNK: usize = 16 * 1024;

/// How an interactive console session attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// Watch only; any number of these at once.
    ReadOnly,
    /// Type too, if no one else holds the VM's writer slot.
    Write,
    /// Type too, taking the writer slot from whoever holds it (who is told).
    TakeOver,
}

impl ConsoleMode {
    /// Whether the session sends input.
    pub fn writes(self) -> bool {
        !matches!(self, ConsoleMode::ReadOnly)
    }
}

/// The frames of an interactive console stream after [`Message::ConsoleAttach`] (version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleFrame {
    /// Agent → coordinator, first: attached; `took_over` when another writer was displaced.
    Attached { took_over: bool },
    /// Agent → coordinator: bytes the guest printed, as they are.
    Output(Vec<u8>),
    /// Coordinator → agent: bytes typed, for the guest's serial port.
    Input(Vec<u8>),
    /// Agent → coordinator: this many chunks of output were lost (the reader was too slow).
    Skipped(u64),
    /// Agent → coordinator, last: why the session ends (or was refused).
    Ended(ConsoleEnd),
}

/// Why an interactive console session ended, or was never attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleEnd {
    /// Refused: another session holds the writer slot (attach with take-over to displace it).
    Busy,
    /// Refused: the VM's console is not open here (the VM is not running on this node).
    NotRunning,
    /// Another session took the writer slot.
    TakenOver,
    /// The console closed: the VM stopped or was deleted.
    Closed,
}

impl ConsoleFrame {
    /// Checks what the codec cannot: chunk sizes.
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            ConsoleFrame::Output(b) | ConsoleFrame::Input(b) if b.len() > MAX_CONSOLE_CHUNK => {
                invalid(format!(
                    "a console chunk of {} bytes is over {MAX_CONSOLE_CHUNK}",
                    b.len()
                ))
            }
            _ => Ok(()),
        }
    }
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::JoinRequest(_) => "JoinRequest",
            Message::JoinAccepted(_) => "JoinAccepted",
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Load(_) => "Load",
            Message::Command(_) => "Command",
            Message::Reply(_) => "Reply",
            Message::Event(_) => "Event",
            Message::Refused(_) => "Refused",
            Message::FetchBlob(_) => "FetchBlob",
            Message::BlobHeader { .. } => "BlobHeader",
            Message::VmReport(_) => "VmReport",
            Message::Console { .. } => "Console",
            Message::RenewCert { .. } => "RenewCert",
            Message::CertRenewed(_) => "CertRenewed",
            Message::ConsoleAttach { .. } => "ConsoleAttach",
        }
    }

    /// The first protocol version that has this message: a peer that negotiated an older
    /// one must never be sent it, and refuses it if it comes.
    pub fn since_version(&self) -> u16 {
        match self {
            Message::RenewCert { .. } | Message::CertRenewed(_) => RENEWAL_SINCE,
            Message::ConsoleAttach { .. } => CONSOLE_SINCE,
            Message::Command(c) => c.kind.since_version(),
            Message::Reply(Reply { result: Ok(k), .. }) => k.since_version(),
            Message::Event(e) => e.kind.since_version(),
            _ => 3,
        }
    }

    /// Checks what the codec cannot: bounds and sense.
    pub fn validate(&self) -> Result<(), FrameError> {
        match self {
            Message::JoinRequest(j) => {
                text("token", &j.token, 256)?;
                blob("csr", &j.csr_der)?;
                validate_name(&j.name).map_err(|e| FrameError::Invalid(e.to_string()))?;
                text("agent_version", &j.agent_version, 64)
            }
            Message::JoinAccepted(j) => {
                blob("cert", &j.cert_der)?;
                blob("ca", &j.ca_der)
            }
            Message::Hello(h) => h.inventory.validate(),
            Message::Welcome(w) => {
                if !(100..=60_000).contains(&w.report_interval_ms) {
                    return invalid(format!(
                        "report interval {} ms is outside 100..=60000",
                        w.report_interval_ms
                    ));
                }
                Ok(())
            }
            Message::Load(l) => l.validate(),
            Message::Command(c) => match &c.kind {
                CommandKind::Ping => Ok(()),
                CommandKind::SetReportInterval { ms } if (100..=60_000).contains(ms) => Ok(()),
                CommandKind::SetReportInterval { ms } => {
                    invalid(format!("report interval {ms} ms is outside 100..=60000"))
                }
                CommandKind::EnsureVm(i) if i.stop_grace_ms > 600_000 => {
                    invalid("stop grace over 10 minutes".into())
                }
                CommandKind::EnsureVm(i) => i.vm.validate(),
                CommandKind::DeleteVm { .. } => Ok(()),
                CommandKind::SyncPeers { vni, peers }
                    if *vni > 0 && *vni <= 0x00ff_ffff && peers.len() <= 4096 =>
                {
                    Ok(())
                }
                CommandKind::SyncPeers { .. } => {
                    invalid("a network with an impossible VNI or peer list".into())
                }
                CommandKind::MigrateIn(m) => m.vm.validate(),
                CommandKind::MigrateOut(m) => m.validate(),
                CommandKind::MigrateStatus { .. }
                | CommandKind::MigrateActivate { .. }
                | CommandKind::MigrateFinish { .. }
                | CommandKind::MigrateAbort { .. } => Ok(()),
            },
            Message::Reply(r) => match &r.result {
                Ok(ReplyKind::Vm(info)) => info.validate(),
                Ok(ReplyKind::MigrateListening(t)) => t.validate(),
                Ok(ReplyKind::Migration(s)) => s.validate(),
                Ok(_) => Ok(()),
                Err(e) => text("reply error", &e.message, MAX_TEXT),
            },
            Message::Event(e) => match &e.kind {
                EventKind::Notice { message } => text("notice", message, MAX_TEXT),
                EventKind::Vm(info) => info.validate(),
                EventKind::Migration(m) => m.status.validate(),
            },
            Message::Refused(r) => text("refusal", &r.message, MAX_TEXT),
            Message::FetchBlob(_) | Message::BlobHeader { .. } => Ok(()),
            Message::Console { lines, .. } if *lines <= 100_000 => Ok(()),
            Message::Console { .. } => invalid("more than 100000 console lines".into()),
            Message::RenewCert { csr_der } => blob("csr", csr_der),
            Message::CertRenewed(Ok(cert)) => blob("cert", cert),
            Message::CertRenewed(Err(e)) => text("renewal error", &e.message, MAX_TEXT),
            Message::ConsoleAttach { .. } => Ok(()),
            Message::VmReport(VmReport { vms, .. }) => {
                if vms.len() > 10_000 {
                    return invalid(format!("{} VMs on one node is not plausible", vms.len()));
                }
                vms.iter().try_for_each(VmInfo::validate)
            }
        }
    }
}

/// Text made fit to travel in a frame and to print: control characters (a guest's console
/// is full of escape sequences) become spaces, and text over `max` bytes keeps its start and
/// its end (where a console's last lines are), cut at character boundaries.
pub fn fit_text(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect();
    if clean.len() <= max {
        return clean;
    }
    const GAP: &str = " ... ";
    let mut head_end = (max / 5).min(800);
    while !clean.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut cut = clean.len() - (max - head_end - GAP.len());
    while !clean.is_char_boundary(cut) {
        cut += 1;
    }
    format!("{}{GAP}{}", &clean[..head_end], &clean[cut..])
}

fn invalid<T>(msg: String) -> Result<T, FrameError> {
    Err(FrameError::Invalid(msg))
}

fn text(what: &str, s: &str, max: usize) -> Result<(), FrameError> {
    if s.len() > max {
        return invalid(format!("{what} is {} bytes, over {max}", s.len()));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return invalid(format!("{what} holds control characters"));
    }
    Ok(())
}

fn blob(what: &str, b: &[u8]) -> Result<(), FrameError> {
    if b.is_empty() || b.len() > MAX_DER {
        return invalid(format!(
            "{what} is {} bytes, not within 1..={MAX_DER}",
            b.len()
        ));
    }
    Ok(())
}

impl WireVm {
    fn validate(&self) -> Result<(), FrameError> {
        crate::ids::validate_name_of("VM", &self.name)
            .map_err(|e| FrameError::Invalid(e.to_string()))?;
        crate::resources::VmSize {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
        }
        .check()
        .map_err(|e| FrameError::Invalid(e.to_string()))?;
        if self.nics.len() > 8 {
            return invalid("more than 8 NICs".into());
        }
        for n in &self.nics {
            if n.vni == 0 || n.vni > 0x00ff_ffff || n.prefix > 30 || n.peers.len() > 4096 {
                return invalid("a NIC with an impossible network".into());
            }
            if n.nameservers.len() > crate::guest::MAX_NAMESERVERS
                || n.search.len() > crate::guest::MAX_SEARCH
            {
                return invalid("a NIC with too many name servers or search domains".into());
            }
            for d in &n.search {
                crate::guest::check_domain(d)
                    .map_err(|e| FrameError::Invalid(format!("search domain: {e}")))?;
            }
        }
        // Keys and user-data are checked again as they arrive: they end up in the guest.
        for k in &self.ssh_keys {
            crate::guest::SshKey::parse(k.as_str())
                .map_err(|e| FrameError::Invalid(format!("SSH key: {e}")))?;
        }
        crate::guest::check_ssh_keys(&self.ssh_keys)
            .map_err(|e| FrameError::Invalid(format!("SSH keys: {e}")))?;
        if let Some(u) = &self.user_data {
            crate::guest::check_user_data(u)
                .map_err(|e| FrameError::Invalid(format!("user-data {e}")))?;
        }
        if let ImageKind::Kernel { cmdline, .. } = &self.image {
            text("cmdline", cmdline, 2048)?;
        }
        Ok(())
    }
}

impl VmInfo {
    fn validate(&self) -> Result<(), FrameError> {
        validate_name(&self.name).map_err(|e| FrameError::Invalid(e.to_string()))?;
        if let VmState::Failed(r) = &self.state {
            text("failure reason", r, 4 * MAX_TEXT)?;
        }
        Ok(())
    }
}

/// Sent by an agent that is not enrolled yet, on a connection without a client certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The whole bootstrap token as the operator pasted it.
    pub token: String,
    /// A PKCS#10 certificate request for the key the agent just generated.
    pub csr_der: Vec<u8>,
    /// The node's name as ops will see it.
    pub name: String,
    pub agent_version: String,
}

/// The coordinator's answer to a good [`JoinRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinAccepted {
    pub node_id: NodeId,
    pub zone: Zone,
    /// The node certificate, naming the node id and zone.
    pub cert_der: Vec<u8>,
    /// The site CA certificate (the one whose fingerprint the token pinned).
    pub ca_der: Vec<u8>,
}

/// The first message of an enrolled agent on each connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub inventory: Inventory,
}

/// What a node is and has. Sent on every connect; it can change across restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    pub cpu_model: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Size and free space of the agent's data directory's file system.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    /// Whether `/dev/kvm` works *and* the CPU shows hardware virtualisation.
    pub kvm_usable: bool,
    /// The accelerator VMs will use on this node (config may force TCG).
    pub accel: Accel,
    pub zone: Zone,
    pub agent_version: String,
    pub kernel: String,
}

impl Inventory {
    fn validate(&self) -> Result<(), FrameError> {
        text("hostname", &self.hostname, 255)?;
        text("cpu_model", &self.cpu_model, 256)?;
        text("agent_version", &self.agent_version, 64)?;
        text("kernel", &self.kernel, 256)?;
        if self.cpus == 0 || self.cpus > 65_536 {
            return invalid(format!("cpu count {} is not plausible", self.cpus));
        }
        if self.memory_bytes == 0 {
            return invalid("memory size is zero".into());
        }
        if self.disk_free_bytes > self.disk_total_bytes {
            return invalid("disk free space exceeds its size".into());
        }
        if self.accel == Accel::Kvm && !self.kvm_usable {
            return invalid("accelerator KVM claimed where KVM is not usable".into());
        }
        Ok(())
    }
}

/// How a node runs guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: slow, but runs anywhere.
    Tcg,
}

impl Accel {
    /// The name used in config and listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The coordinator's answer to [`Hello`]: the node is known and welcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub node_id: NodeId,
    /// How often the coordinator wants load reports.
    pub report_interval_ms: u32,
}

/// Live load, sent every report interval. Counters are cumulative since boot, so a lost
/// report loses nothing and rates can be derived from any two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Increases by one per report within one agent run.
    pub seq: u64,
    /// Busy CPU over the last interval, 0..=100 percent of the whole node.
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    pub mem_available_bytes: u64,
    pub load1: f32,
    pub load5: f32,
    pub load15: f32,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub disk_free_bytes: u64,
}

impl LoadReport {
    fn validate(&self) -> Result<(), FrameError> {
        if !(self.cpu_percent.is_finite() && (0.0..=100.0).contains(&self.cpu_percent)) {
            return invalid(format!(
                "cpu percent {} is outside 0..=100",
                self.cpu_percent
            ));
        }
        for (name, v) in [
            ("load1", self.load1),
            ("load5", self.load5),
            ("load15", self.load15),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return invalid(format!("{name} {v} is not a finite non-negative number"));
            }
        }
        Ok(())
    }
}

/// A request from the coordinator to an agent; answered by a [`Reply`] with the same id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: u64,
    pub kind: CommandKind,
}

/// What a command asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandKind {
    /// Answer at once: measures the round trip.
    Ping,
    /// Report load at another interval from now on.
    SetReportInterval { ms: u32 },
    /// Have this VM, in this state: made (image fetched, disk and ports made) if the node
    /// lacks it, started or stopped if not as desired. Ignored when the node already holds
    /// this generation or a newer one.
    EnsureVm(Box<VmIntent>),
    /// Have no such VM: stop it if it runs and remove everything of it from the node.
    /// Done at once when the node has no such VM.
    DeleteVm { id: VmId, generation: Generation },
    /// The nodes of a network changed: its segment on this node (if any) now floods to
    /// exactly these peers.
    SyncPeers {
        vni: u32,
        peers: Vec<std::net::Ipv4Addr>,
    },
    /// Version 4, to the destination of a migration: get ready to receive this VM from
    /// `source` (a paused QEMU waiting for the memory stream, empty target disks exported
    /// over NBD) and answer where ([`ReplyKind::MigrateListening`]). A repeat of a migration
    /// id this node is receiving answers the same target.
    MigrateIn(Box<MigrateIn>),
    /// Version 4, to the source: migrate this running VM to the target the destination
    /// answered. [`ReplyKind::Done`] once started (also for a repeat of one under way or
    /// ended); `Refused` when the VM does not run here or an endpoint's certificate cannot
    /// serve TLS, `Busy` while another migration of it runs. Progress follows as
    /// [`EventKind::Migration`].
    MigrateOut(Box<MigrateOut>),
    /// Version 4, to either side: where this migration stands ([`ReplyKind::Migration`]);
    /// `NotFound` when this node knows nothing of it (never started, or its agent restarted
    /// before the end).
    MigrateStatus { migration: MigrationId, vm: VmId },
    /// Version 4, to the destination once the source reported
    /// [`MigrationPhase::Completed`]: resume the guest here and make it an ordinary VM of
    /// this node, desired running at [`MigrateIn::generation`]. Answers [`ReplyKind::Vm`];
    /// a repeat answers the same. `NotFound` if the node knows nothing of it.
    MigrateActivate { migration: MigrationId, vm: VmId },
    /// Version 4, to the source once the VM's record has moved to the destination: remove
    /// the paused source VM and everything of it, and forget it (later intents for it are
    /// refused as for a deleted VM). `Done`, also when nothing is left.
    MigrateFinish { migration: MigrationId, vm: VmId },
    /// Version 4, to either side: the destination kills its QEMU and removes what it made;
    /// the source cancels what is under way and makes sure the guest runs as before (even
    /// after `Completed`: the coordinator sends this to the source only once the
    /// destination confirmed its own abort). `Done`, also when nothing is known of it.
    MigrateAbort { migration: MigrationId, vm: VmId },
}

impl CommandKind {
    /// The first protocol version that has this command.
    pub fn since_version(&self) -> u16 {
        match self {
            CommandKind::MigrateIn(_)
            | CommandKind::MigrateOut(_)
            | CommandKind::MigrateStatus { .. }
            | CommandKind::MigrateActivate { .. }
            | CommandKind::MigrateFinish { .. }
            | CommandKind::MigrateAbort { .. } => MIGRATION_SINCE,
            _ => 3,
        }
    }
}

/// Version 4: what the destination of a migration is told ([`CommandKind::MigrateIn`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateIn {
    pub migration: MigrationId,
    /// The VM as the destination is to run it: its NICs' `local` is the destination's
    /// underlay address.
    pub vm: WireVm,
    /// The VM's desired generation: once activated, the destination records the VM as
    /// desired running at it.
    pub generation: Generation,
    /// The node the VM comes from: the only client certificate the destination's NBD
    /// export and migration stream accept.
    pub source: NodeId,
}

/// Version 4: what the source of a migration is told ([`CommandKind::MigrateOut`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateOut {
    pub migration: MigrationId,
    pub vm: VmId,
    /// The destination node: its certificate must name it.
    pub dest: NodeId,
    /// The destination's answer to [`CommandKind::MigrateIn`], relayed as it came.
    pub target: MigrateTarget,
    /// The cap on the memory stream, and on the disk mirrors together (MiB/s).
    pub max_bandwidth_mib_s: u32,
    /// The longest pause of the guest at switchover the source may accept (ms).
    pub max_downtime_ms: u32,
}

/// Most disks a migration carries.
pub const MAX_MIGRATION_DISKS: usize = 16;
/// The longest bandwidth cap a migration may be given (MiB/s): 1 TiB/s.
pub const MAX_MIGRATION_MIB_S: u32 = 1 << 20;
/// The longest downtime a migration may be allowed (ms).
pub const MAX_MIGRATION_DOWNTIME_MS: u32 = 60_000;
/// Largest virtual size of one migrated disk: 64 TiB.
pub const MAX_MIGRATION_DISK_BYTES: u64 = 64 << 40;
/// Longest time a migration figure may name (ms): a week.
pub const MAX_MIGRATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Highest rate a migration figure may name (bytes/s): 1 TiB/s.
pub const MAX_MIGRATION_RATE: u64 = 1 << 40;
/// Largest byte count a migration figure may name: 1 PiB.
pub const MAX_MIGRATION_BYTES: u64 = 1 << 50;

impl MigrateOut {
    fn validate(&self) -> Result<(), FrameError> {
        if !(1..=MAX_MIGRATION_MIB_S).contains(&self.max_bandwidth_mib_s) {
            return invalid(format!(
                "a migration bandwidth of {} MiB/s is outside 1..={MAX_MIGRATION_MIB_S}",
                self.max_bandwidth_mib_s
            ));
        }
        if !(1..=MAX_MIGRATION_DOWNTIME_MS).contains(&self.max_downtime_ms) {
            return invalid(format!(
                "a migration downtime of {} ms is outside 1..={MAX_MIGRATION_DOWNTIME_MS}",
                self.max_downtime_ms
            ));
        }
        self.target.validate()
    }
}

/// Version 4: where and how the source sends a VM, as the destination decided it. The
/// coordinator relays it from [`ReplyKind::MigrateListening`] to [`MigrateOut::target`]
/// without looking inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateTarget {
    /// The destination QEMU's NBD server (TLS), serving one export per disk.
    pub nbd: std::net::SocketAddr,
    /// The destination QEMU's incoming migration stream (TLS).
    pub stream: std::net::SocketAddr,
    /// One per disk of the VM, in the VM's order.
    pub disks: Vec<MigrateDisk>,
}

/// Version 4: one disk's target on the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateDisk {
    /// The NBD export's name.
    pub export: String,
    /// The target's virtual size in bytes: the source refuses to mirror a disk of another.
    pub virtual_size: u64,
    /// What the source mirrors, as the target was made.
    pub sync: MirrorSync,
}

/// Version 4: how a disk is mirrored, decided by what the destination's target holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorSync {
    /// The target is an overlay on the same base image: only the source's overlay goes.
    Top,
    /// The target is standalone: every byte the guest sees goes.
    Full,
}

fn endpoint(what: &str, a: &std::net::SocketAddr) -> Result<(), FrameError> {
    let ip = a.ip();
    if a.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return invalid(format!("{what} {a} is not an address one can connect to"));
    }
    if let std::net::IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return invalid(format!("{what} {a} is a broadcast address"));
        }
    }
    Ok(())
}

impl MigrateTarget {
    fn validate(&self) -> Result<(), FrameError> {
        endpoint("the NBD server", &self.nbd)?;
        endpoint("the migration stream", &self.stream)?;
        if self.nbd == self.stream {
            return invalid("the NBD server and the migration stream share one port".into());
        }
        if self.disks.len() > MAX_MIGRATION_DISKS {
            return invalid(format!(
                "{} disks to migrate, over {MAX_MIGRATION_DISKS}",
                self.disks.len()
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            let ok = !d.export.is_empty()
                && d.export.len() <= 32
                && d.export
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return invalid(format!(
                    "disk {i}'s export name is not 1 to 32 of a-z, 0-9 and `-`"
                ));
            }
            if self.disks[..i].iter().any(|o| o.export == d.export) {
                return invalid(format!("disk {i}'s export name is used twice"));
            }
            if !(1..=MAX_MIGRATION_DISK_BYTES).contains(&d.virtual_size) {
                return invalid(format!(
                    "disk {i}'s size {} is outside 1..={MAX_MIGRATION_DISK_BYTES}",
                    d.virtual_size
                ));
            }
        }
        Ok(())
    }
}

/// Version 4: a migration's progress, as the source reports it ([`EventKind::Migration`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEvent {
    pub migration: MigrationId,
    pub vm: VmId,
    pub status: MigrationStatus,
}

/// Version 4: where a migration stands, with its figures so far (zero where not known yet
/// or not known on this side: the destination knows only its phase).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub phase: MigrationPhase,
    /// Bytes of the disks mirrored so far, and in all (every disk).
    pub disk_done: u64,
    pub disk_total: u64,
    /// The memory stream: bytes sent (pages sent again count again), left to send, and the
    /// guest's memory.
    pub memory_transferred: u64,
    pub memory_remaining: u64,
    pub memory_total: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: u64,
    /// The pause QEMU expects at switchover at the current rate (ms).
    pub expected_downtime_ms: u64,
    /// How much auto-converge throttles the guest's vCPUs (percent).
    pub cpu_throttle_percent: u8,
}

/// Version 4: a migration's phases.
///
/// ```text
///  source:      Preparing -> Mirroring -> Memory -> Switchover -> Completed -> Finished
///  destination: Preparing (listening, until the whole VM arrived) -> Completed (paused) -> Active
///  either, before Finished / Active:  -> Failed(reason) | Cancelled (after MigrateAbort)
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationPhase {
    /// Source: attaching to the destination's disks. Destination: listening.
    Preparing,
    /// Source: the disks are being mirrored.
    Mirroring,
    /// Source: the memory stream runs (the disks are in sync and kept so).
    Memory,
    /// Source: the guest is paused, the mirrors are completing, the device state goes.
    Switchover,
    /// The whole VM is on the destination, paused on both sides. The figures are the
    /// source's (zero on the destination): the guest's pause and the whole migration (ms).
    Completed { downtime_ms: u64, total_ms: u64 },
    /// It failed: the source runs as before, the destination has cleaned up.
    Failed { reason: String },
    /// Ended by [`CommandKind::MigrateAbort`] (or by the agent's restart, on the source).
    Cancelled,
    /// Destination: activated; the VM runs here.
    Active,
    /// Source: finished; the VM is gone from this node.
    Finished,
}

impl MigrationPhase {
    /// True once nothing more happens to the migration on this side without a command.
    pub fn is_end(&self) -> bool {
        !matches!(
            self,
            MigrationPhase::Preparing
                | MigrationPhase::Mirroring
                | MigrationPhase::Memory
                | MigrationPhase::Switchover
        )
    }

    /// A short name for logs and listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            MigrationPhase::Preparing => "preparing",
            MigrationPhase::Mirroring => "mirroring",
            MigrationPhase::Memory => "memory",
            MigrationPhase::Switchover => "switchover",
            MigrationPhase::Completed { .. } => "completed",
            MigrationPhase::Failed { .. } => "failed",
            MigrationPhase::Cancelled => "cancelled",
            MigrationPhase::Active => "active",
            MigrationPhase::Finished => "finished",
        }
    }
}

impl MigrationStatus {
    /// A status in `phase` with every figure zero.
    pub fn new(phase: MigrationPhase) -> Self {
        Self {
            phase,
            disk_done: 0,
            disk_total: 0,
            memory_transferred: 0,
            memory_remaining: 0,
            memory_total: 0,
            dirty_rate: 0,
            expected_downtime_ms: 0,
            cpu_throttle_percent: 0,
        }
    }

    /// This status with every figure brought within what [`Message::validate`] accepts
    /// (QEMU's own figures can be momentarily odd: an offset past a length that grew).
    pub fn clamped(mut self) -> Self {
        self.disk_total = self.disk_total.min(MAX_MIGRATION_BYTES);
        self.disk_done = self.disk_done.min(self.disk_total);
        self.memory_total = self.memory_total.min(MAX_MIGRATION_BYTES);
        self.memory_remaining = self.memory_remaining.min(self.memory_total);
        self.memory_transferred = self.memory_transferred.min(MAX_MIGRATION_BYTES);
        self.dirty_rate = self.dirty_rate.min(MAX_MIGRATION_RATE);
        self.expected_downtime_ms = self.expected_downtime_ms.min(MAX_MIGRATION_MS);
        self.cpu_throttle_percent = self.cpu_throttle_percent.min(100);
        if let MigrationPhase::Completed {
            downtime_ms,
            total_ms,
        } = &mut self.phase
        {
            *downtime_ms = (*downtime_ms).min(MAX_MIGRATION_MS);
            *total_ms = (*total_ms).min(MAX_MIGRATION_MS);
        }
        if let MigrationPhase::Failed { reason } = &mut self.phase {
            *reason = fit_text(reason, MAX_TEXT);
        }
        self
    }

    fn validate(&self) -> Result<(), FrameError> {
        let bytes = [
            ("disk total", self.disk_total),
            ("memory total", self.memory_total),
            ("memory transferred", self.memory_transferred),
        ];
        for (what, v) in bytes {
            if v > MAX_MIGRATION_BYTES {
                return invalid(format!(
                    "migration {what} {v} is over {MAX_MIGRATION_BYTES}"
                ));
            }
        }
        if self.disk_done > self.disk_total {
            return invalid("more disk mirrored than there is".into());
        }
        if self.memory_remaining > self.memory_total {
            return invalid("more memory left to send than the guest has".into());
        }
        if self.dirty_rate > MAX_MIGRATION_RATE {
            return invalid(format!("a dirty rate of {} B/s", self.dirty_rate));
        }
        if self.cpu_throttle_percent > 100 {
            return invalid(format!("a throttle of {} %", self.cpu_throttle_percent));
        }
        let mut times = vec![("expected downtime", self.expected_downtime_ms)];
        match &self.phase {
            MigrationPhase::Completed {
                downtime_ms,
                total_ms,
            } => {
                times.push(("downtime", *downtime_ms));
                times.push(("total time", *total_ms));
            }
            MigrationPhase::Failed { reason } => text("migration failure", reason, MAX_TEXT)?,
            _ => {}
        }
        for (what, v) in times {
            if v > MAX_MIGRATION_MS {
                return invalid(format!("a migration {what} of {v} ms"));
            }
        }
        Ok(())
    }
}

/// A VM and what the coordinator wants of it, as of one desired generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmIntent {
    pub vm: WireVm,
    pub desired: Desired,
    pub generation: Generation,
    /// How long a stop waits for the guest after its ACPI power button before QEMU quits.
    pub stop_grace_ms: u32,
}

/// A VM as the coordinator hands it to a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireVm {
    pub id: VmId,
    pub name: String,
    pub zone: Zone,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Size of the VM's own disk; 0 for none (a kernel image needs no disk).
    pub disk_gib: u64,
    pub image: ImageKind,
    pub nics: Vec<WireNic>,
    /// OpenSSH public keys the guest is to let in (a disk image's seed carries them).
    pub ssh_keys: Vec<SshKey>,
    /// The owner's `#cloud-config` document, written into the seed as it was given.
    pub user_data: Option<String>,
}

/// One NIC of a VM and the network it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireNic {
    pub vni: u32,
    /// This node's underlay address, as the coordinator sees it (the VXLAN source).
    pub local: std::net::Ipv4Addr,
    pub mac: [u8; 6],
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The zone's name servers and DNS search domains, for the guest's resolver.
    pub nameservers: Vec<std::net::Ipv4Addr>,
    pub search: Vec<String>,
    /// The underlay addresses of the other nodes of this network.
    pub peers: Vec<std::net::Ipv4Addr>,
}

/// A node's whole picture, as of one observed generation: every VM it has. A VM it does not
/// list it did not have at that generation; an observation of it newer than that came
/// later and stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    pub generation: Generation,
    pub vms: Vec<VmInfo>,
}

/// A VM as a node reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: VmId,
    pub name: String,
    pub state: VmState,
    pub pid: Option<u32>,
    /// The desired generation the node has taken up.
    pub intent: Generation,
    /// This observation's number: increases with every observation the node makes, across
    /// all its VMs and its own restarts.
    pub generation: Generation,
}

/// An agent's answer to a [`Command`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: Result<ReplyKind, ReplyError>,
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReplyKind {
    Pong,
    Done,
    /// The VM as the node now has it (the answer to an intent).
    Vm(VmInfo),
    /// Version 4: the destination's answer to [`CommandKind::MigrateIn`].
    MigrateListening(MigrateTarget),
    /// Version 4: the answer to [`CommandKind::MigrateStatus`].
    Migration(MigrationStatus),
}

impl ReplyKind {
    /// The first protocol version that has this reply.
    pub fn since_version(&self) -> u16 {
        match self {
            ReplyKind::MigrateListening(_) | ReplyKind::Migration(_) => MIGRATION_SINCE,
            _ => 3,
        }
    }
}

/// Why a node did not do what a command asked, typed so that the coordinator can tell
/// "later" from "never".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ReplyError {
    pub kind: ReplyErrorKind,
    pub message: String,
}

/// The kinds of [`ReplyError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyErrorKind {
    /// The node (or the VM's actor) is busy with earlier work: send it again later.
    Busy,
    /// The thing the command names is not on this node.
    NotFound,
    /// The command can never succeed as asked (a bad spec, a conflict with what is there).
    Refused,
    /// It was tried and failed (a host error); trying again may succeed.
    Failed,
}

impl ReplyError {
    /// A reply error whose message is made fit to travel.
    pub fn new(kind: ReplyErrorKind, message: impl AsRef<str>) -> Self {
        Self {
            kind,
            message: fit_text(message.as_ref(), MAX_TEXT),
        }
    }
}

/// Something that happened on a node, as it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When, in the agent's clock (ms since the epoch).
    pub at_ms: u64,
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// A free-text notice worth showing ops.
    Notice { message: String },
    /// A VM changed state.
    Vm(VmInfo),
    /// Version 4: a migration's progress, from its source.
    Migration(MigrationEvent),
}

impl EventKind {
    /// The first protocol version that has this event.
    pub fn since_version(&self) -> u16 {
        match self {
            EventKind::Migration(_) => MIGRATION_SINCE,
            _ => 3,
        }
    }
}

/// A refusal, sent just before the sender closes the connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

/// Why something was refused. The agent treats some as permanent (it stops retrying).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    TokenInvalid,
    TokenExpired,
    TokenUsed,
    TokenRevoked,
    NodeRemoved,
    UnknownNode,
    NameInUse,
    BadRequest,
    Internal,
    /// The thing asked for does not exist here.
    NotFound,
}

impl RefusalCode {
    /// True when retrying the same thing can never succeed.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, RefusalCode::Internal)
    }
}

/// Application close codes on QUIC connections.
pub mod close {
    /// Orderly shutdown of either side.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the protocol (bad frame, unexpected message).
    pub const PROTOCOL: u32 = 1;
    /// The peer was refused (a [`super::Refusal`] was sent first).
    pub const REFUSED: u32 = 2;
    /// A newer connection of the same node replaced this one.
    pub const REPLACED: u32 = 3;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, encode, HEADER_LEN, MAX_BODY, WIRE_MAGIC};
    use proptest::prelude::*;
    use uuid::Uuid;

    fn node() -> NodeId {
        NodeId(Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef))
    }

    /// One of each message, with fixed contents: the golden set.
    fn samples() -> Vec<(&'static str, Message)> {
        vec![
            (
                "join_request",
                Message::JoinRequest(JoinRequest {
                    token: "zyj1-0011223344556677-secret".into(),
                    csr_der: vec![0x30, 0x82, 0x01],
                    name: "rack1-n01".into(),
                    agent_version: "0.1.0".into(),
                }),
            ),
            (
                "join_accepted",
                Message::JoinAccepted(JoinAccepted {
                    node_id: node(),
                    zone: Zone::Intranet,
                    cert_der: vec![1, 2, 3],
                    ca_der: vec![4, 5],
                }),
            ),
            (
                "hello",
                Message::Hello(Hello {
                    inventory: Inventory {
                        hostname: "n1".into(),
                        cpu_model: "Xeon".into(),
                        cpus: 64,
                        memory_bytes: 256 << 30,
                        disk_total_bytes: 4 << 40,
                        disk_free_bytes: 3 << 40,
                        kvm_usable: true,
                        accel: Accel::Kvm,
                        zone: Zone::Extranet,
                        agent_version: "0.1.0".into(),
                        kernel: "6.1.0".into(),
                    },
                }),
            ),
            (
                "welcome",
                Message::Welcome(Welcome {
                    node_id: node(),
                    report_interval_ms: 1000,
                }),
            ),
            (
                "load",
                Message::Load(LoadReport {
                    seq: 7,
                    cpu_percent: 12.5,
                    mem_used_bytes: 1 << 30,
                    mem_available_bytes: 3 << 30,
                    load1: 0.5,
                    load5: 0.25,
                    load15: 0.125,
                    net_rx_bytes: 1000,
                    net_tx_bytes: 2000,
                    disk_free_bytes: 1 << 40,
                }),
            ),
            (
                "command_ping",
                Message::Command(Command {
                    id: 1,
                    kind: CommandKind::Ping,
                }),
            ),
            (
                "command_interval",
                Message::Command(Command {
                    id: 2,
                    kind: CommandKind::SetReportInterval { ms: 500 },
                }),
            ),
            (
                "reply",
                Message::Reply(Reply {
                    id: 1,
                    result: Ok(ReplyKind::Pong),
                }),
            ),
            (
                "reply_err",
                Message::Reply(Reply {
                    id: 2,
                    result: Err(ReplyError::new(ReplyErrorKind::Busy, "no")),
                }),
            ),
            (
                "reply_vm",
                Message::Reply(Reply {
                    id: 3,
                    result: Ok(ReplyKind::Vm(VmInfo {
                        id: VmId(Uuid::from_u128(7)),
                        name: "w1".into(),
                        state: VmState::Running,
                        pid: Some(42),
                        intent: Generation(3),
                        generation: Generation(1 << 20),
                    })),
                }),
            ),
            (
                "command_delete",
                Message::Command(Command {
                    id: 4,
                    kind: CommandKind::DeleteVm {
                        id: VmId(Uuid::from_u128(7)),
                        generation: Generation(4),
                    },
                }),
            ),
            (
                "event",
                Message::Event(Event {
                    at_ms: 1_700_000_000_000,
                    kind: EventKind::Notice {
                        message: "hi".into(),
                    },
                }),
            ),
            (
                "refused",
                Message::Refused(Refusal {
                    code: RefusalCode::NodeRemoved,
                    message: "gone".into(),
                }),
            ),
            (
                "command_ensure_vm",
                Message::Command(Command {
                    id: 5,
                    kind: CommandKind::EnsureVm(Box::new(VmIntent {
                        vm: WireVm {
                            id: VmId(Uuid::from_u128(7)),
                            name: "w1".into(),
                            zone: Zone::Intranet,
                            vcpus: 2,
                            memory_mib: 512,
                            disk_gib: 10,
                            image: ImageKind::Kernel {
                                kernel: BlobHash([1; 32]),
                                initrd: None,
                                cmdline: "console=ttyS0".into(),
                            },
                            nics: vec![WireNic {
                                vni: 20,
                                local: std::net::Ipv4Addr::new(10, 77, 0, 11),
                                mac: [0x52, 0x54, 0, 1, 2, 3],
                                ip: std::net::Ipv4Addr::new(10, 220, 0, 2),
                                prefix: 16,
                                gateway: Some(std::net::Ipv4Addr::new(10, 220, 0, 1)),
                                nameservers: vec![std::net::Ipv4Addr::new(10, 220, 0, 1)],
                                search: vec!["hz.gov".into()],
                                peers: vec![std::net::Ipv4Addr::new(10, 77, 0, 12)],
                            }],
                            ssh_keys: vec![SshKey::parse(crate::guest::tests::ED25519).unwrap()],
                            user_data: Some("#cloud-config\npackages: [nginx]\n".into()),
                        },
                        desired: Desired::Running,
                        generation: Generation(3),
                        stop_grace_ms: 30_000,
                    })),
                }),
            ),
            ("fetch_blob", Message::FetchBlob(BlobHash([7; 32]))),
            (
                "blob_header",
                Message::BlobHeader {
                    hash: BlobHash([7; 32]),
                    size: 1 << 20,
                },
            ),
        ]
    }

    /// The console and renewal messages, with fixed contents.
    fn samples_v3() -> Vec<(&'static str, Message)> {
        vec![
            (
                "console_attach",
                Message::ConsoleAttach {
                    id: VmId(Uuid::from_u128(7)),
                    mode: ConsoleMode::TakeOver,
                },
            ),
            (
                "console",
                Message::Console {
                    id: VmId(Uuid::from_u128(7)),
                    lines: 100,
                    follow: true,
                },
            ),
            (
                "renew_cert",
                Message::RenewCert {
                    csr_der: vec![0x30, 0x82, 0x02],
                },
            ),
            (
                "cert_renewed",
                Message::CertRenewed(Ok(vec![0x30, 0x82, 0x03])),
            ),
            (
                "cert_refused",
                Message::CertRenewed(Err(ReplyError::new(
                    ReplyErrorKind::Refused,
                    "node removed",
                ))),
            ),
        ]
    }

    fn target() -> MigrateTarget {
        MigrateTarget {
            nbd: "10.77.0.12:49152".parse().unwrap(),
            stream: "10.77.0.12:49153".parse().unwrap(),
            disks: vec![
                MigrateDisk {
                    export: "disk0".into(),
                    virtual_size: 10 << 30,
                    sync: MirrorSync::Top,
                },
                MigrateDisk {
                    export: "disk1".into(),
                    virtual_size: 1 << 20,
                    sync: MirrorSync::Full,
                },
            ],
        }
    }

    fn mig() -> MigrationId {
        MigrationId(Uuid::from_u128(0x4d16))
    }

    fn ensured_vm() -> WireVm {
        match samples()
            .into_iter()
            .find(|(n, _)| *n == "command_ensure_vm")
            .unwrap()
            .1
        {
            Message::Command(Command {
                kind: CommandKind::EnsureVm(i),
                ..
            }) => i.vm,
            _ => unreachable!(),
        }
    }

    fn progress() -> MigrationStatus {
        MigrationStatus {
            phase: MigrationPhase::Memory,
            disk_done: 10 << 30,
            disk_total: 10 << 30,
            memory_transferred: 300 << 20,
            memory_remaining: 12 << 20,
            memory_total: 512 << 20,
            dirty_rate: 3 << 20,
            expected_downtime_ms: 40,
            cpu_throttle_percent: 20,
        }
    }

    /// The migration messages of version 4, with fixed contents.
    fn samples_v4() -> Vec<(&'static str, Message)> {
        let vm = VmId(Uuid::from_u128(7));
        let cmd = |id, kind| Message::Command(Command { id, kind });
        let reply = |id, r| Message::Reply(Reply { id, result: Ok(r) });
        vec![
            (
                "migrate_in",
                cmd(
                    10,
                    CommandKind::MigrateIn(Box::new(MigrateIn {
                        migration: mig(),
                        vm: ensured_vm(),
                        generation: Generation(5),
                        source: node(),
                    })),
                ),
            ),
            (
                "migrate_listening",
                reply(10, ReplyKind::MigrateListening(target())),
            ),
            (
                "migrate_out",
                cmd(
                    11,
                    CommandKind::MigrateOut(Box::new(MigrateOut {
                        migration: mig(),
                        vm,
                        dest: NodeId(Uuid::from_u128(0xde57)),
                        target: target(),
                        max_bandwidth_mib_s: 1024,
                        max_downtime_ms: 2000,
                    })),
                ),
            ),
            (
                "migrate_status",
                cmd(
                    12,
                    CommandKind::MigrateStatus {
                        migration: mig(),
                        vm,
                    },
                ),
            ),
            (
                "migrate_activate",
                cmd(
                    13,
                    CommandKind::MigrateActivate {
                        migration: mig(),
                        vm,
                    },
                ),
            ),
            (
                "migrate_finish",
                cmd(
                    14,
                    CommandKind::MigrateFinish {
                        migration: mig(),
                        vm,
                    },
                ),
            ),
            (
                "migrate_abort",
                cmd(
                    15,
                    CommandKind::MigrateAbort {
                        migration: mig(),
                        vm,
                    },
                ),
            ),
            (
                "migration_status",
                reply(12, ReplyKind::Migration(progress())),
            ),
            (
                "migration_event",
                Message::Event(Event {
                    at_ms: 1_700_000_000_000,
                    kind: EventKind::Migration(MigrationEvent {
                        migration: mig(),
                        vm,
                        status: progress(),
                    }),
                }),
            ),
            (
                "migration_completed",
                Message::Event(Event {
                    at_ms: 1_700_000_000_001,
                    kind: EventKind::Migration(MigrationEvent {
                        migration: mig(),
                        vm,
                        status: MigrationStatus {
                            phase: MigrationPhase::Completed {
                                downtime_ms: 180,
                                total_ms: 42_000,
                            },
                            ..progress()
                        },
                    }),
                }),
            ),
            (
                "migration_failed",
                reply(
                    16,
                    ReplyKind::Migration(MigrationStatus::new(MigrationPhase::Failed {
                        reason: "the destination QEMU is gone".into(),
                    })),
                ),
            ),
        ]
    }

    /// One of each console frame, with fixed contents.
    fn console_frames() -> Vec<(&'static str, ConsoleFrame)> {
        vec![
            ("frame_attached", ConsoleFrame::Attached { took_over: true }),
            (
                "frame_output",
                ConsoleFrame::Output(b"\x1b[1mhi\r\n".to_vec()),
            ),
            ("frame_input", ConsoleFrame::Input(b"ls\r".to_vec())),
            ("frame_skipped", ConsoleFrame::Skipped(3)),
            ("frame_busy", ConsoleFrame::Ended(ConsoleEnd::Busy)),
            (
                "frame_not_running",
                ConsoleFrame::Ended(ConsoleEnd::NotRunning),
            ),
            (
                "frame_taken_over",
                ConsoleFrame::Ended(ConsoleEnd::TakenOver),
            ),
            ("frame_closed", ConsoleFrame::Ended(ConsoleEnd::Closed)),
        ]
    }

    fn golden(path: &str, version: u16, got: &[(&str, Vec<u8>)]) {
        let got: String = got
            .iter()
            .map(|(name, bytes)| format!("{name} {}\n", hex(bytes)))
            .collect();
        if std::env::var_os("ZY_BLESS").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).expect("golden file is checked in");
        assert_eq!(got, want, "wire encoding of protocol v{version} changed");
    }

    /// Version 3's checked-in encodings: every message, with the console frames. A change
    /// to any message's layout fails here: that is a protocol change and needs a new
    /// protocol version, not an edit of this file.
    /// Regenerate only for a new version: `ZY_BLESS=1 cargo test -p zy-common golden`.
    #[test]
    fn golden_encodings_v3() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/proto_v3.txt");
        let mut got: Vec<(&str, Vec<u8>)> = samples()
            .into_iter()
            .chain(samples_v3())
            .map(|(name, m)| {
                m.validate().unwrap();
                (name, encode(WIRE_MAGIC, 3, &m, MAX_BODY).unwrap())
            })
            .collect();
        got.extend(console_frames().into_iter().map(|(name, f)| {
            f.validate().unwrap();
            (name, encode(WIRE_MAGIC, 3, &f, MAX_BODY).unwrap())
        }));
        golden(path, 3, &got);
        for (_, m) in samples().into_iter().chain(samples_v3()) {
            assert!(m.since_version() <= 3, "{} is of a later version", m.kind());
        }
    }

    /// Version 4's checked-in encodings: the migration messages. The version 3 file above
    /// is untouched by version 4: every older message keeps its layout.
    /// Regenerate only for a new version: `ZY_BLESS=1 cargo test -p zy-common golden`.
    #[test]
    fn golden_encodings_v4() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/proto_v4.txt");
        let got: Vec<(&str, Vec<u8>)> = samples_v4()
            .into_iter()
            .map(|(name, m)| {
                m.validate().unwrap();
                assert_eq!(m.since_version(), MIGRATION_SINCE, "{name}");
                (name, encode(WIRE_MAGIC, 4, &m, MAX_BODY).unwrap())
            })
            .collect();
        golden(path, 4, &got);
        // What version 3 has stays version 3 on a version 4 session.
        for (_, m) in samples().into_iter().chain(samples_v3()) {
            let bytes = encode(WIRE_MAGIC, 4, &m, MAX_BODY).unwrap();
            let (v, back): (u16, Message) = decode(&bytes, WIRE_MAGIC, MAX_BODY).unwrap();
            assert_eq!((v, back), (4, m));
        }
        assert_eq!(crate::wire::PROTOCOL_VERSIONS.min, 3);
        assert_eq!(crate::wire::PROTOCOL_VERSIONS.max, MIGRATION_SINCE);
    }

    /// A version 3 reader (the v3 layouts) sees a version 4 message as an unknown variant:
    /// an error, never a wrong message.
    #[test]
    fn migration_messages_are_unknown_variants_to_version_3() {
        for (name, m) in samples_v4() {
            let bytes = encode(WIRE_MAGIC, 4, &m, MAX_BODY).unwrap();
            let body = &bytes[HEADER_LEN..];
            // The outer variant is a v3 one (Command, Reply or Event); what follows its id
            // (Command's, Reply's) or time (Event's) starts with a variant index of v4.
            let outer = body[0];
            assert!([5, 6, 7].contains(&outer), "{name}");
            // Version 3 had 5 commands, 3 replies and 2 events: a new one numbers past them.
            let (inner, v3_count) = match m {
                Message::Command(c) => (command_index(&c.kind), 5),
                Message::Reply(Reply { result: Ok(k), .. }) => (reply_index(&k), 3),
                Message::Event(e) => (event_index(&e.kind), 2),
                _ => unreachable!(),
            };
            assert!(inner >= v3_count, "{name}: variant {inner}");
        }
    }

    fn command_index(k: &CommandKind) -> u32 {
        match k {
            CommandKind::Ping => 0,
            CommandKind::SetReportInterval { .. } => 1,
            CommandKind::EnsureVm(_) => 2,
            CommandKind::DeleteVm { .. } => 3,
            CommandKind::SyncPeers { .. } => 4,
            CommandKind::MigrateIn(_) => 5,
            CommandKind::MigrateOut(_) => 6,
            CommandKind::MigrateStatus { .. } => 7,
            CommandKind::MigrateActivate { .. } => 8,
            CommandKind::MigrateFinish { .. } => 9,
            CommandKind::MigrateAbort { .. } => 10,
        }
    }

    fn reply_index(k: &ReplyKind) -> u32 {
        match k {
            ReplyKind::Pong => 0,
            ReplyKind::Done => 1,
            ReplyKind::Vm(_) => 2,
            ReplyKind::MigrateListening(_) => 3,
            ReplyKind::Migration(_) => 4,
        }
    }

    fn event_index(k: &EventKind) -> u32 {
        match k {
            EventKind::Notice { .. } => 0,
            EventKind::Vm(_) => 1,
            EventKind::Migration(_) => 2,
        }
    }

    #[test]
    fn migration_validation_rejects_nonsense() {
        let out = |f: &dyn Fn(&mut MigrateOut)| {
            let mut o = MigrateOut {
                migration: mig(),
                vm: VmId(Uuid::from_u128(7)),
                dest: node(),
                target: target(),
                max_bandwidth_mib_s: 100,
                max_downtime_ms: 300,
            };
            f(&mut o);
            Message::Command(Command {
                id: 1,
                kind: CommandKind::MigrateOut(Box::new(o)),
            })
            .validate()
        };
        assert!(out(&|_| {}).is_ok());
        assert!(out(&|o| o.max_bandwidth_mib_s = 0).is_err());
        assert!(out(&|o| o.max_bandwidth_mib_s = MAX_MIGRATION_MIB_S + 1).is_err());
        assert!(out(&|o| o.max_downtime_ms = 0).is_err());
        assert!(out(&|o| o.max_downtime_ms = MAX_MIGRATION_DOWNTIME_MS + 1).is_err());
        assert!(out(&|o| o.target.nbd = "0.0.0.0:10809".parse().unwrap()).is_err());
        assert!(out(&|o| o.target.stream = "10.0.0.1:0".parse().unwrap()).is_err());
        assert!(out(&|o| o.target.stream = "224.0.0.1:4444".parse().unwrap()).is_err());
        assert!(out(&|o| o.target.stream = "255.255.255.255:4444".parse().unwrap()).is_err());
        assert!(out(&|o| o.target.stream = o.target.nbd).is_err());
        assert!(out(&|o| o.target.stream = "[fd00::2]:4444".parse().unwrap()).is_ok());
        assert!(out(&|o| o.target.disks[1].export = "disk0".into()).is_err());
        assert!(out(&|o| o.target.disks[0].export = "Disk,0".into()).is_err());
        assert!(out(&|o| o.target.disks[0].export = String::new()).is_err());
        assert!(out(&|o| o.target.disks[0].export = "d".repeat(33)).is_err());
        assert!(out(&|o| o.target.disks[0].virtual_size = 0).is_err());
        assert!(out(&|o| o.target.disks[0].virtual_size = MAX_MIGRATION_DISK_BYTES + 1).is_err());
        assert!(out(&|o| {
            let d = o.target.disks[0].clone();
            o.target.disks = (0..=MAX_MIGRATION_DISKS)
                .map(|i| MigrateDisk {
                    export: format!("disk{i}"),
                    ..d.clone()
                })
                .collect();
        })
        .is_err());
        assert!(out(&|o| o.target.disks.clear()).is_ok());

        // The VM handed to the destination is checked as an intent's is.
        let mut vm = ensured_vm();
        vm.user_data = Some("#!/bin/sh\n".into());
        let m = Message::Command(Command {
            id: 1,
            kind: CommandKind::MigrateIn(Box::new(MigrateIn {
                migration: mig(),
                vm,
                generation: Generation(1),
                source: node(),
            })),
        });
        assert!(m.validate().is_err());

        let status = |f: &dyn Fn(&mut MigrationStatus)| {
            let mut s = progress();
            f(&mut s);
            let event = Message::Event(Event {
                at_ms: 0,
                kind: EventKind::Migration(MigrationEvent {
                    migration: mig(),
                    vm: VmId(Uuid::from_u128(7)),
                    status: s.clone(),
                }),
            })
            .validate();
            let reply = Message::Reply(Reply {
                id: 0,
                result: Ok(ReplyKind::Migration(s.clone())),
            })
            .validate();
            assert_eq!(event.is_ok(), reply.is_ok());
            // Whatever it was, its clamped form passes.
            Message::Reply(Reply {
                id: 0,
                result: Ok(ReplyKind::Migration(s.clamped())),
            })
            .validate()
            .unwrap();
            event
        };
        assert!(status(&|_| {}).is_ok());
        assert!(status(&|s| s.disk_done = s.disk_total + 1).is_err());
        assert!(status(&|s| s.memory_remaining = s.memory_total + 1).is_err());
        assert!(status(&|s| s.memory_total = u64::MAX).is_err());
        assert!(status(&|s| s.memory_transferred = MAX_MIGRATION_BYTES + 1).is_err());
        assert!(status(&|s| s.dirty_rate = u64::MAX).is_err());
        assert!(status(&|s| s.cpu_throttle_percent = 101).is_err());
        assert!(status(&|s| s.expected_downtime_ms = u64::MAX).is_err());
        assert!(status(&|s| s.phase = MigrationPhase::Completed {
            downtime_ms: u64::MAX,
            total_ms: 1
        })
        .is_err());
        assert!(status(&|s| s.phase = MigrationPhase::Completed {
            downtime_ms: 1,
            total_ms: MAX_MIGRATION_MS + 1
        })
        .is_err());
        assert!(status(&|s| s.phase = MigrationPhase::Failed {
            reason: "x".repeat(MAX_TEXT + 1)
        })
        .is_err());
        assert!(status(&|s| s.phase = MigrationPhase::Failed {
            reason: "bad\u{1b}[1m".into()
        })
        .is_err());
        assert!(status(&|s| s.phase = MigrationPhase::Failed {
            reason: "the mirror of zymig-disk0 failed: Input/output error".into()
        })
        .is_ok());
    }

    #[test]
    fn migration_ids_print_and_parse_as_uuids() {
        let m = MigrationId::new_random();
        assert_eq!(m.to_string().parse::<MigrationId>(), Ok(m));
        assert!("not-a-uuid".parse::<MigrationId>().is_err());
    }

    #[test]
    fn only_migration_messages_need_version_4() {
        for (name, m) in samples().into_iter().chain(samples_v3()) {
            assert!(m.since_version() <= 3, "{name}");
        }
        for (name, m) in samples_v4() {
            assert_eq!(m.since_version(), 4, "{name}");
        }
        // An error reply is as old as replies.
        let e = Message::Reply(Reply {
            id: 1,
            result: Err(ReplyError::new(
                ReplyErrorKind::NotFound,
                "no such migration",
            )),
        });
        assert_eq!(e.since_version(), 3);
    }

    #[test]
    fn console_frames_are_bounded_and_bad_bytes_refused() {
        let big = ConsoleFrame::Output(vec![b'x'; MAX_CONSOLE_CHUNK + 1]);
        assert!(big.validate().is_err());
        assert!(ConsoleFrame::Input(vec![b'x'; MAX_CONSOLE_CHUNK])
            .validate()
            .is_ok());
        // An unknown variant, a truncated body and trailing bytes are errors, not panics.
        let mut bytes = encode(WIRE_MAGIC, 3, &ConsoleFrame::Skipped(1), MAX_BODY).unwrap();
        bytes[HEADER_LEN] = 0x7f;
        assert!(decode::<ConsoleFrame>(&bytes, WIRE_MAGIC, MAX_BODY).is_err());
        let bytes = encode(
            WIRE_MAGIC,
            3,
            &ConsoleFrame::Input(b"abc".to_vec()),
            MAX_BODY,
        )
        .unwrap();
        assert!(decode::<ConsoleFrame>(&bytes[..bytes.len() - 1], WIRE_MAGIC, MAX_BODY).is_err());
        let mut long = bytes.clone();
        long.push(0);
        long[7] += 1;
        assert!(matches!(
            decode::<ConsoleFrame>(&long, WIRE_MAGIC, MAX_BODY),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn validation_rejects_nonsense() {
        let mut bad = samples();
        if let Message::Load(l) = &mut bad[4].1 {
            l.cpu_percent = f32::NAN;
        }
        assert!(bad[4].1.validate().is_err());
        let m = Message::Refused(Refusal {
            code: RefusalCode::Internal,
            message: "x".repeat(MAX_TEXT + 1),
        });
        assert!(m.validate().is_err());
        let m = Message::Command(Command {
            id: 0,
            kind: CommandKind::SetReportInterval { ms: 0 },
        });
        assert!(m.validate().is_err());
        // What reaches a guest is checked again as it arrives.
        let ensure = |f: &dyn Fn(&mut WireVm)| {
            let mut m = samples()
                .into_iter()
                .find(|(n, _)| *n == "command_ensure_vm")
                .unwrap()
                .1;
            if let Message::Command(Command {
                kind: CommandKind::EnsureVm(i),
                ..
            }) = &mut m
            {
                f(&mut i.vm);
            }
            m.validate()
        };
        assert!(ensure(&|_| {}).is_ok());
        let err = ensure(&|v| v.user_data = Some("#!/bin/sh\n".into())).unwrap_err();
        assert!(err.to_string().contains("user-data"), "{err}");
        let err = ensure(&|v| {
            v.ssh_keys = vec![SshKey::parse(crate::guest::tests::ED25519).unwrap(); 33]
        })
        .unwrap_err();
        assert!(err.to_string().contains("33 keys"), "{err}");
        let err = ensure(&|v| v.nics[0].search = vec!["not a domain".into()]).unwrap_err();
        assert!(err.to_string().contains("search domain"), "{err}");
        assert!(
            ensure(&|v| v.nics[0].nameservers = vec![std::net::Ipv4Addr::LOCALHOST; 4]).is_err()
        );
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let load = (
            any::<u64>(),
            0.0f32..=100.0,
            any::<u64>(),
            any::<u64>(),
            0.0f32..1e6,
        )
            .prop_map(|(seq, cpu, used, rx, l)| {
                Message::Load(LoadReport {
                    seq,
                    cpu_percent: cpu,
                    mem_used_bytes: used,
                    mem_available_bytes: used / 2,
                    load1: l,
                    load5: l,
                    load15: l,
                    net_rx_bytes: rx,
                    net_tx_bytes: rx / 3,
                    disk_free_bytes: used,
                })
            });
        let event = (any::<u64>(), "[a-z ]{0,200}").prop_map(|(at, m)| {
            Message::Event(Event {
                at_ms: at,
                kind: EventKind::Notice { message: m },
            })
        });
        let join = (
            "[a-z0-9-]{1,200}",
            proptest::collection::vec(any::<u8>(), 1..2000),
        )
            .prop_map(|(t, csr)| {
                Message::JoinRequest(JoinRequest {
                    token: t,
                    csr_der: csr,
                    name: "n1".into(),
                    agent_version: "0.1.0".into(),
                })
            });
        let cmd = (any::<u64>(), 100u32..=60_000).prop_map(|(id, ms)| {
            Message::Command(Command {
                id,
                kind: CommandKind::SetReportInterval { ms },
            })
        });
        let sync = prop_oneof![Just(MirrorSync::Top), Just(MirrorSync::Full)];
        let disk = ("[a-z0-9-]{1,32}", 1u64..=MAX_MIGRATION_DISK_BYTES, sync).prop_map(
            |(export, virtual_size, sync)| MigrateDisk {
                export,
                virtual_size,
                sync,
            },
        );
        let target = (
            any::<[u8; 4]>(),
            1u16..,
            1u16..,
            proptest::collection::vec(disk, 0..=MAX_MIGRATION_DISKS),
        )
            .prop_filter_map("a valid target", |(ip, p1, p2, disks)| {
                let ip = std::net::Ipv4Addr::from(ip);
                let t = MigrateTarget {
                    nbd: (ip, p1).into(),
                    stream: (ip, p2).into(),
                    disks,
                };
                t.validate().is_ok().then_some(t)
            });
        let out = (
            any::<u128>(),
            target,
            1u32..=MAX_MIGRATION_MIB_S,
            1u32..=MAX_MIGRATION_DOWNTIME_MS,
        )
            .prop_map(|(u, target, bw, dt)| {
                Message::Command(Command {
                    id: 9,
                    kind: CommandKind::MigrateOut(Box::new(MigrateOut {
                        migration: MigrationId(Uuid::from_u128(u)),
                        vm: VmId(Uuid::from_u128(u ^ 1)),
                        dest: NodeId(Uuid::from_u128(u ^ 2)),
                        target,
                        max_bandwidth_mib_s: bw,
                        max_downtime_ms: dt,
                    })),
                })
            });
        let phase = prop_oneof![
            Just(MigrationPhase::Preparing),
            Just(MigrationPhase::Mirroring),
            Just(MigrationPhase::Memory),
            Just(MigrationPhase::Switchover),
            (0..=MAX_MIGRATION_MS, 0..=MAX_MIGRATION_MS).prop_map(|(d, t)| {
                MigrationPhase::Completed {
                    downtime_ms: d,
                    total_ms: t,
                }
            }),
            "[a-z :]{0,300}".prop_map(|reason| MigrationPhase::Failed { reason }),
            Just(MigrationPhase::Cancelled),
            Just(MigrationPhase::Active),
            Just(MigrationPhase::Finished),
        ];
        let status = (phase, any::<[u64; 7]>(), any::<u8>()).prop_map(|(phase, n, t)| {
            Message::Event(Event {
                at_ms: n[0],
                kind: EventKind::Migration(MigrationEvent {
                    migration: MigrationId(Uuid::from_u128(n[1].into())),
                    vm: VmId(Uuid::from_u128(n[2].into())),
                    status: MigrationStatus {
                        phase,
                        disk_done: n[3],
                        disk_total: n[4],
                        memory_transferred: n[5],
                        memory_remaining: n[6],
                        memory_total: n[1],
                        dirty_rate: n[2],
                        expected_downtime_ms: n[0],
                        cpu_throttle_percent: t,
                    }
                    .clamped(),
                }),
            })
        });
        prop_oneof![load, event, join, cmd, out, status]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in arb_message()) {
            let bytes = encode(WIRE_MAGIC, 1, &m, MAX_BODY).unwrap();
            let (_, back): (u16, Message) = decode(&bytes, WIRE_MAGIC, MAX_BODY).unwrap();
            prop_assert!(back.validate().is_ok(), "{:?}", back.validate());
            prop_assert_eq!(back, m);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok((_, m)) = decode::<Message>(&bytes, WIRE_MAGIC, MAX_BODY) {
                let _ = m.validate();
            }
            if let Ok((_, f)) = decode::<ConsoleFrame>(&bytes, WIRE_MAGIC, MAX_BODY) {
                let _ = f.validate();
            }
        }

        #[test]
        fn console_frames_round_trip(data in proptest::collection::vec(any::<u8>(), 0..MAX_CONSOLE_CHUNK), input in any::<bool>()) {
            let f = if input { ConsoleFrame::Input(data) } else { ConsoleFrame::Output(data) };
            let bytes = encode(WIRE_MAGIC, 3, &f, MAX_BODY).unwrap();
            let (_, back): (u16, ConsoleFrame) = decode(&bytes, WIRE_MAGIC, MAX_BODY).unwrap();
            prop_assert!(back.validate().is_ok());
            prop_assert_eq!(back, f);
        }

        #[test]
        fn mutated_frames_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            for (_, m) in samples().into_iter().chain(samples_v4()) {
                let mut bytes = encode(WIRE_MAGIC, 1, &m, MAX_BODY).unwrap();
                let i = idx.index(bytes.len());
                bytes[i] = byte;
                let c = cut.index(bytes.len() + 1);
                if let Ok((_, m)) = decode::<Message>(&bytes[..c], WIRE_MAGIC, MAX_BODY) {
                    let _ = m.validate();
                }
            }
        }
    }
}
