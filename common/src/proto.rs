//! The messages of wire protocol version 3.
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

use serde::{Deserialize, Serialize};

use crate::blob::BlobHash;
use crate::guest::SshKey;
use crate::ids::{validate_name, NodeId, VmId, Zone};
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

/// Every message of protocol version 3 (see [`Message::since_version`]). New variants go at
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
            },
            Message::Reply(r) => match &r.result {
                Ok(ReplyKind::Vm(info)) => info.validate(),
                Ok(_) => Ok(()),
                Err(e) => text("reply error", &e.message, MAX_TEXT),
            },
            Message::Event(e) => match &e.kind {
                EventKind::Notice { message } => text("notice", message, MAX_TEXT),
                EventKind::Vm(info) => info.validate(),
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
        prop_oneof![load, event, join, cmd]
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in arb_message()) {
            let bytes = encode(WIRE_MAGIC, 1, &m, MAX_BODY).unwrap();
            let (_, back): (u16, Message) = decode(&bytes, WIRE_MAGIC, MAX_BODY).unwrap();
            prop_assert!(back.validate().is_ok());
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
            for (_, m) in samples() {
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
