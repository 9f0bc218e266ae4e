//! The `zy` ops CLI: a client of the coordinator's HTTP API.
//!
//! Where it finds the coordinator, in order: flags (`--coordinator`, `--token`, `--ca`),
//! environment (`ZY_COORDINATOR`, `ZY_TOKEN`, `ZY_CA`), then a config file: `--config`,
//! `$ZY_CONFIG`, `~/.config/zhengyun/zy.toml`, `/etc/zhengyun/zy.toml`,
//! `/var/lib/zhengyun/coordinator/zy.toml` (the one `zy-coordinator init` writes).
//!
//! Exit codes scripts can rely on: see [`ExitCode`].
//!
//! It needs only the API's types (`zy-api`), the shared vocabulary (`zy-common` without its
//! daemon features) and an HTTPS client ([`client`]): never the coordinator's store, fleet
//! or server, so it builds small and runs anywhere an operator sits.

pub mod client;
pub mod console;
pub mod term;
mod trust;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use zy_api::*;
use zy_common::ids::Zone;
use zy_common::time::{ago, now_millis};

use crate::client::{Client, ClientError};

/// Exit codes of `zy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Ok = 0,
    /// Anything not listed below.
    Failure = 1,
    /// Bad arguments or a request the API refused as malformed (HTTP 400).
    Usage = 2,
    /// The node or token does not exist (HTTP 404).
    NotFound = 3,
    /// The API token is missing or wrong (HTTP 401).
    Unauthorized = 4,
    /// The coordinator could not be reached or failed TLS verification.
    Unreachable = 5,
    /// The request conflicts with the current state: node not connected, busy (409/503/504).
    Conflict = 6,
    /// No usable CLI configuration (coordinator address, token or CA unknown).
    Config = 7,
    /// The interactive console was taken over by another session (`zy vm console --force`).
    TakenOver = 8,
}

/// The Zhengyun ops CLI.
#[derive(Debug, Parser)]
#[command(
    name = "zy",
    version,
    about = "Drive a Zhengyun site: its nodes and their enrollment tokens, VMs, images, operations and events",
    long_about = "Drive a Zhengyun site through its coordinator's HTTPS API: the nodes (servers) of the pool and the tokens that enroll them, VMs and the images they boot from, the durable operations that change VMs, and the site's live events.\n\nThe coordinator, API token and CA come from the global options, the environment (ZY_COORDINATOR, ZY_TOKEN, ZY_CA) or a zy.toml (--config, $ZY_CONFIG, ~/.config/zhengyun/zy.toml, /etc/zhengyun/zy.toml, /var/lib/zhengyun/coordinator/zy.toml). Exit codes: 0 ok, 1 failure, 2 bad arguments or request, 3 not found, 4 unauthorized, 5 coordinator unreachable, 6 conflict with the current state, 7 no usable configuration."
)]
pub struct Cli {
    /// A zy.toml with `coordinator`, `token` and `ca`.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ZY_CONFIG"
    )]
    pub config: Option<PathBuf>,
    /// The coordinator's API address, host:port.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ZY_COORDINATOR"
    )]
    pub coordinator: Option<String>,
    /// The API token (zya1-...).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ZY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// The site CA certificate (ca.crt) to verify the coordinator with.
    #[arg(long, global = true, help_heading = "Global options", env = "ZY_CA")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Nodes: the servers of the pool.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Bootstrap tokens that enroll new nodes.
    #[command(subcommand)]
    Token(TokenCmd),
    /// API tokens: the bearer tokens `zy` and other clients drive the API with.
    #[command(subcommand)]
    Apitoken(trust::ApiTokenCmd),
    /// The site's certificates.
    #[command(subcommand)]
    Ca(trust::CaCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Images VMs boot from.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Operations: the durable record of every change of a VM, with its steps.
    #[command(subcommand)]
    Op(OpCmd),
    /// Plans for the pool: consolidation.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Follow the site's events (node membership, VM states) live, until interrupted.
    Events(JsonFlag),
    /// Is the coordinator up, and which version is it?
    Status(JsonFlag),
}

#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// Show (or with --apply carry out) a bounded plan that relieves hot nodes and empties
    /// the least used ones onto the others, putting them on standby: live migrations that
    /// keep every rule (N+1 included) at every step, no VM moved twice within an hour, the
    /// zone's spare nodes kept awake. Defaults from the coordinator's [consolidation].
    Consolidate {
        /// Most migrations (1 to 1000).
        #[arg(long, value_name = "N")]
        max_moves: Option<u32>,
        /// The least share of a node each move must win back (0.0 to 1.0).
        #[arg(long, value_name = "G")]
        min_gain: Option<f64>,
        /// Carry the plan out, one migration at a time, printing each step as it is done.
        #[arg(long)]
        apply: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OpCmd {
    /// List operations, newest first.
    Ls(JsonFlag),
    /// One operation with its steps.
    Show {
        /// The operation id (printed by the command that started it).
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// How a command that changes a VM waits for its operation.
#[derive(Debug, Args)]
pub struct WaitFlags {
    /// Return as soon as the operation is recorded, printing its id, instead of following
    /// it to its end.
    #[arg(long)]
    pub no_wait: bool,
    /// Print JSON (the operation as it ended, or as recorded with --no-wait).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Create a VM: it is placed on a node of its zone and started.
    Create {
        /// The VM's name: 1 to 63 of a-z, 0-9 and `-`, unique among the site's VMs.
        #[arg(long)]
        name: String,
        /// extranet or intranet.
        #[arg(long)]
        zone: Zone,
        /// Virtual CPUs (1 to 64).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory in MiB (64 to 1048576).
        #[arg(long, default_value_t = 512)]
        memory: u64,
        /// Size of the VM's disk in GiB (0: none, or the image's size).
        #[arg(long, default_value_t = 0)]
        disk: u64,
        /// The image to boot (`zy image ls`).
        #[arg(long)]
        image: String,
        /// Create it stopped.
        #[arg(long)]
        stopped: bool,
        /// An OpenSSH public key file (`~/.ssh/id_ed25519.pub`; one key per line) whose keys
        /// the guest lets in; repeatable. Disk images only: cloud-init applies them.
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_keys: Vec<PathBuf>,
        /// A `#cloud-config` file for the guest's cloud-init (at most 32 KiB), passed on as
        /// it is; Zhengyun's keys, name and network come with it. Disk images only.
        #[arg(long, value_name = "FILE")]
        user_data: Option<PathBuf>,
        /// An anti-affinity group (a name as for VMs): no two VMs of the group share a node,
        /// so one server's loss takes at most one of a redundant pair.
        #[arg(long, value_name = "GROUP")]
        anti_affinity: Option<String>,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// List VMs.
    Ls(JsonFlag),
    /// One VM in detail.
    Show {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Start a stopped VM.
    Start {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// Stop a VM (ACPI powerdown, then quit, then kill).
    Stop {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// Move a running VM to another node while it runs (live migration: its disks and
    /// memory are copied under TLS, then it pauses briefly and resumes there). Shows the
    /// progress, and at the end the measured pause.
    Migrate {
        /// VM name or id.
        vm: String,
        /// The node to move it to (name or id); without it the packer chooses, by the same
        /// rules as for a new VM (zone, room, anti-affinity, N+1).
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// Stop and start a VM.
    Restart {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// A VM's serial console. On a terminal: interactive (keystrokes go to the guest,
    /// Ctrl-] detaches; one session types at a time). Otherwise, or with --lines or
    /// --follow: its log, control sequences removed.
    Console {
        /// VM name or id.
        vm: String,
        /// Show the console's log and keep printing what the guest prints, until interrupted.
        #[arg(short, long, conflicts_with = "read_only")]
        follow: bool,
        /// Show the last N lines of the console's log (100 when not on a terminal).
        #[arg(long, value_name = "N", conflicts_with = "read_only")]
        lines: Option<u32>,
        /// Watch the live console without typing on it (any number may watch).
        #[arg(long, conflicts_with = "force")]
        read_only: bool,
        /// Take the interactive console over from the session typing on it (it is told,
        /// and ends).
        #[arg(long)]
        force: bool,
    },
    /// Delete a VM and everything of it on its node (at once if the node is connected, when
    /// it returns otherwise).
    Delete {
        /// VM name or id.
        vm: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Upload an image: a disk image (FILE), or a kernel with --kernel.
    Import {
        /// A disk image (qcow2 or raw).
        file: Option<PathBuf>,
        /// The disk image's format, qcow2 or raw (default: from its extension, .qcow2 or
        /// .raw/.img). The image is inspected and refused if it is not what is declared.
        #[arg(long, value_parser = ["qcow2", "raw"])]
        format: Option<String>,
        /// The image's name.
        #[arg(long)]
        name: String,
        /// A kernel to boot directly (instead of a disk image).
        #[arg(long, conflicts_with = "file")]
        kernel: Option<PathBuf>,
        /// The initramfs that goes with --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// The base kernel command line that goes with --kernel.
        #[arg(long, requires = "kernel")]
        cmdline: Option<String>,
        /// The zone whose VMs may boot it (extranet or intranet)...
        #[arg(long, required_unless_present = "shared", conflicts_with = "shared")]
        zone: Option<Zone>,
        /// ...or: shared with both zones (a platform image).
        #[arg(long)]
        shared: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List images.
    Ls(JsonFlag),
    /// One image in detail: its blobs, format and size, and the VMs that boot from it.
    Show {
        /// The image's name.
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Delete an image (refused while VMs boot from it).
    Rm {
        /// The image's name.
        name: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List every node: zone, state, capacity, live load, last seen.
    Ls(JsonFlag),
    /// One node in detail, with its membership history.
    Show {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove a node: its certificate is refused from now on.
    Remove {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Measure the command round trip to a node's agent.
    Ping {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Empty a node for service: it takes no VM from now on, its running VMs move off by
    /// live migration one at a time, then it is in maintenance. Follows the drain, printing
    /// each move, until then.
    Drain {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// Put a draining or maintained node back in service (a migration under way finishes).
    Undrain {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Power an empty node down through the coordinator's power driver ([power]); it is
    /// woken when its room is needed.
    Standby {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Power a standby node up through the power driver; it takes VMs once it reports.
    Wake {
        /// Node name or id.
        node: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a one-time token that enrolls one node of a zone.
    Create {
        /// extranet or intranet.
        #[arg(long)]
        zone: Zone,
        /// How long the token stays valid (1m to 30d), e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List tokens and whether they can still be used.
    Ls(JsonFlag),
    /// Revoke a token so it can enroll nothing.
    Revoke {
        /// The token id (the 16 hex digits after zyj1-).
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 30m, 1h or 7d)"))?;
    let secs = d.as_secs();
    if !TOKEN_TTL_SECS.contains(&secs) {
        return Err("a token lives between 1m and 30d".into());
    }
    Ok(d)
}

/// The CLI's config file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    pub coordinator: Option<String>,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: ExitCode,
    pub message: String,
}

impl CliError {
    fn config(message: impl Into<String>) -> Self {
        Self {
            code: ExitCode::Config,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Unreachable { .. } | ClientError::Tls { .. } => ExitCode::Unreachable,
            ClientError::Decode(_) => ExitCode::Failure,
            ClientError::Api { status, .. } => match *status {
                StatusCode::BAD_REQUEST => ExitCode::Usage,
                StatusCode::NOT_FOUND => ExitCode::NotFound,
                StatusCode::UNAUTHORIZED => ExitCode::Unauthorized,
                StatusCode::CONFLICT
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => ExitCode::Conflict,
                _ => ExitCode::Failure,
            },
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

fn default_config_paths() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        v.push(PathBuf::from(x).join("zhengyun/zy.toml"));
    } else if let Some(home) = std::env::var_os("HOME") {
        v.push(PathBuf::from(home).join(".config/zhengyun/zy.toml"));
    }
    v.push(PathBuf::from("/etc/zhengyun/zy.toml"));
    v.push(PathBuf::from("/var/lib/zhengyun/coordinator/zy.toml"));
    v
}

fn load_config(path: &Path) -> Result<CliConfig, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::config(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| CliError::config(format!("{} is invalid: {e}", path.display())))
}

/// Builds a client from flags, environment and config file.
pub fn client(cli: &Cli) -> Result<Client, CliError> {
    let file = match &cli.config {
        Some(p) => load_config(p)?,
        None => match default_config_paths().into_iter().find(|p| p.exists()) {
            Some(p) => load_config(&p)?,
            None => CliConfig::default(),
        },
    };
    let addr = cli.coordinator.clone().or(file.coordinator).ok_or_else(|| {
        CliError::config("no coordinator address: pass --coordinator host:port, set ZY_COORDINATOR, or point ZY_CONFIG at the zy.toml that `zy-coordinator init` wrote")
    })?;
    let token = cli.token.clone().or(file.token);
    let ca_path = cli.ca.clone().or(file.ca).ok_or_else(|| {
        CliError::config("no CA certificate: pass --ca <state dir>/ca.crt or set ZY_CA")
    })?;
    let pem = std::fs::read_to_string(&ca_path).map_err(|e| {
        CliError::config(format!(
            "cannot read CA certificate {}: {e}",
            ca_path.display()
        ))
    })?;
    let ca = zy_common::tls::certs_from_pem("CA certificate", &pem)
        .map_err(|e| CliError::config(format!("{}: {e}", ca_path.display())))?;
    let tls =
        zy_common::tls::https_client_config(&ca[0]).map_err(|e| CliError::config(e.to_string()))?;
    Ok(Client::new(&addr, token, tls))
}

/// Runs one CLI invocation, printing to stdout; returns the exit code.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let c = client(&cli)?;
    match cli.command {
        Command::Status(j) => {
            let h: Health = c.call(Method::GET, "/v1/health", None).await?;
            print(j.json, &h, || {
                format!(
                    "coordinator {} at {}: {} (version {}, up {})\n",
                    h.site,
                    c.addr(),
                    h.status,
                    h.version,
                    humantime::format_duration(Duration::from_secs(h.uptime_secs))
                )
            })
        }
        Command::Events(j) => {
            let mut out = std::io::stdout().lock();
            if j.json {
                c.stream_to("/v1/events", &mut out).await?;
            } else {
                let mut w = EventPrinter {
                    out,
                    buf: Vec::new(),
                };
                c.stream_to("/v1/events", &mut w).await?;
            }
            Ok(())
        }
        Command::Node(NodeCmd::Ls(j)) => {
            let nodes: Vec<NodeView> = c.call(Method::GET, "/v1/nodes", None).await?;
            print(j.json, &nodes, || node_table(&nodes, now_millis()))
        }
        Command::Node(NodeCmd::Show { node, json }) => {
            let d: NodeDetail = c
                .call(
                    Method::GET,
                    &format!("/v1/nodes/{}", path_segment(&node)?),
                    None,
                )
                .await?;
            print(json.json, &d, || node_detail(&d, now_millis()))
        }
        Command::Node(NodeCmd::Remove { node, json }) => {
            let r: RemovedNode = c
                .call(
                    Method::DELETE,
                    &format!("/v1/nodes/{}", path_segment(&node)?),
                    None,
                )
                .await?;
            print(json.json, &r, || {
                format!(
                    "removed node {} ({}, {}){}; its certificate is refused from now on\n",
                    r.name,
                    r.id,
                    r.zone,
                    if r.was_connected {
                        ", disconnected it"
                    } else {
                        ""
                    }
                )
            })
        }
        Command::Node(NodeCmd::Ping { node, json }) => {
            let p: PingResult = c
                .call(
                    Method::POST,
                    &format!("/v1/nodes/{}/ping", path_segment(&node)?),
                    None,
                )
                .await?;
            print(json.json, &p, || {
                format!("{node}: round trip {:.2} ms\n", p.rtt_us as f64 / 1000.0)
            })
        }
        Command::Node(NodeCmd::Drain { node, wait }) => {
            let n: NodeView = c
                .call(
                    Method::POST,
                    &format!("/v1/nodes/{}/drain", path_segment(&node)?),
                    None,
                )
                .await?;
            if wait.no_wait || wait.json {
                return print(wait.json, &n, || {
                    format!(
                        "node {} is {}; follow it with `zy node show {}`\n",
                        n.name, n.admin, n.name
                    )
                });
            }
            follow_drain(&c, n).await
        }
        Command::Node(NodeCmd::Undrain { node, json }) => {
            admin_action(
                &c,
                "undrain",
                &node,
                json.json,
                "in service: it takes VMs again",
            )
            .await
        }
        Command::Node(NodeCmd::Standby { node, json }) => {
            admin_action(&c, "standby", &node, json.json, "powered down: on standby").await
        }
        Command::Node(NodeCmd::Wake { node, json }) => {
            admin_action(
                &c,
                "wake",
                &node,
                json.json,
                "powered up: it takes VMs once it reports",
            )
            .await
        }
        Command::Plan(PlanCmd::Consolidate {
            max_moves,
            min_gain,
            apply,
            json,
        }) => consolidate(&c, max_moves, min_gain, apply, json).await,
        Command::Token(TokenCmd::Create { zone, ttl, json }) => {
            let body = serde_json::json!({"zone": zone, "ttl_secs": ttl.as_secs()});
            let t: CreatedToken = c.call(Method::POST, "/v1/tokens", Some(body)).await?;
            print(json.json, &t, || {
                format!(
                    "{}\n\nEnrolls one {} node until {}. On the new server run:\n  zy-agent join <coordinator host>:7400 {}\n",
                    t.token, t.zone, t.expires_at, t.token
                )
            })
        }
        Command::Image(ImageCmd::Import {
            file,
            format,
            name,
            kernel,
            initrd,
            cmdline,
            zone,
            shared,
            json,
        }) => {
            let mut body = match (file, kernel) {
                (Some(f), None) => {
                    let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
                    let format = match (format.as_deref(), ext) {
                        (Some(f), _) => f.to_string(),
                        (None, "qcow2") => "qcow2".into(),
                        (None, "raw" | "img") => "raw".into(),
                        (None, _) => {
                            return Err(CliError {
                                code: ExitCode::Usage,
                                message: format!(
                                    "say what {} is with --format qcow2 or --format raw",
                                    f.display()
                                ),
                            })
                        }
                    };
                    let b: BlobView = c.upload("/v1/blobs", &f).await?;
                    serde_json::json!({"name": name, "disk": b.hash, "format": format})
                }
                (None, Some(k)) => {
                    let kb: BlobView = c.upload("/v1/blobs", &k).await?;
                    let ib = match initrd {
                        Some(i) => Some(c.upload::<BlobView>("/v1/blobs", &i).await?.hash),
                        None => None,
                    };
                    serde_json::json!({"name": name, "kernel": kb.hash, "initrd": ib, "cmdline": cmdline})
                }
                _ => {
                    return Err(CliError {
                        code: ExitCode::Usage,
                        message:
                            "give a disk image FILE, or --kernel (with --initrd and --cmdline)"
                                .into(),
                    })
                }
            };
            body["zone"] = serde_json::json!(zone);
            body["shared"] = serde_json::json!(shared);
            let img: ImageView = c.call(Method::POST, "/v1/images", Some(body)).await?;
            print(json.json, &img, || {
                format!(
                    "imported image {} ({})\n",
                    img.name,
                    human_bytes(img.size_bytes)
                )
            })
        }
        Command::Vm(VmCmd::Create {
            name,
            zone,
            vcpus,
            memory,
            disk,
            image,
            stopped,
            ssh_keys,
            user_data,
            anti_affinity,
            wait,
        }) => {
            let keys = read_key_files(&ssh_keys)?;
            let user_data = match user_data {
                Some(p) => Some(read_text_file(&p, "user-data")?),
                None => None,
            };
            let body = serde_json::json!({"name": name, "zone": zone, "vcpus": vcpus,
                "memory_mib": memory, "disk_gib": disk, "image": image, "start": !stopped,
                "ssh_keys": keys, "user_data": user_data, "anti_affinity": anti_affinity});
            let a = mutate(&c, Method::POST, "/v1/vms".into(), Some(body)).await?;
            if let (false, Some(vm)) = (wait.json, &a.vm) {
                println!(
                    "VM {} ({}) placed on {} with address {}",
                    vm.name,
                    vm.id,
                    vm.node.as_deref().unwrap_or("-"),
                    vm.ip
                );
            }
            follow(&c, a, &wait).await
        }
        Command::Vm(VmCmd::Migrate { vm, to, wait }) => {
            let body = serde_json::json!({ "to": to });
            let a = mutate(
                &c,
                Method::POST,
                format!("/v1/vms/{}/migrate", path_segment(&vm)?),
                Some(body),
            )
            .await?;
            if let (false, Some(m)) = (wait.json, &a.operation.migration) {
                println!(
                    "migrating VM {} from {} to {}",
                    a.operation.vm_name, m.from, m.to
                );
            }
            follow(&c, a, &wait).await
        }
        Command::Vm(VmCmd::Ls(j)) => {
            let vms: Vec<VmView> = c.call(Method::GET, "/v1/vms", None).await?;
            print(j.json, &vms, || vm_table(&vms))
        }
        Command::Vm(VmCmd::Show { vm, json }) => {
            let v: VmView = c
                .call(
                    Method::GET,
                    &format!("/v1/vms/{}", path_segment(&vm)?),
                    None,
                )
                .await?;
            print(json.json, &v, || vm_detail(&v))
        }
        Command::Vm(VmCmd::Start { vm, wait }) => vm_action(&c, "start", &vm, &wait).await,
        Command::Vm(VmCmd::Stop { vm, wait }) => vm_action(&c, "stop", &vm, &wait).await,
        Command::Vm(VmCmd::Restart { vm, wait }) => vm_action(&c, "restart", &vm, &wait).await,
        Command::Op(OpCmd::Ls(j)) => {
            let ops: Vec<OpView> = c.call(Method::GET, "/v1/ops", None).await?;
            print(j.json, &ops, || op_table(&ops))
        }
        Command::Op(OpCmd::Show { id, json }) => {
            let op: OpView = c
                .call(
                    Method::GET,
                    &format!("/v1/ops/{}", path_segment(&id)?),
                    None,
                )
                .await?;
            print(json.json, &op, || op_detail(&op))
        }
        Command::Vm(VmCmd::Console {
            vm,
            follow,
            lines,
            read_only,
            force,
        }) => {
            let a = console::ConsoleArgs {
                follow,
                lines,
                read_only,
                force,
            };
            console::run(&c, path_segment(&vm)?, &a).await
        }
        Command::Vm(VmCmd::Delete { vm, wait }) => {
            let path = format!("/v1/vms/{}", path_segment(&vm)?);
            let a = mutate(&c, Method::DELETE, path, None).await?;
            follow(&c, a, &wait).await
        }
        Command::Image(ImageCmd::Ls(j)) => {
            let images: Vec<ImageView> = c.call(Method::GET, "/v1/images", None).await?;
            print(j.json, &images, || image_table(&images))
        }
        Command::Image(ImageCmd::Show { name, json }) => {
            let img: ImageView = c
                .call(
                    Method::GET,
                    &format!("/v1/images/{}", path_segment(&name)?),
                    None,
                )
                .await?;
            print(json.json, &img, || image_detail(&img))
        }
        Command::Image(ImageCmd::Rm { name, json }) => {
            let img: ImageView = c
                .call(
                    Method::DELETE,
                    &format!("/v1/images/{}", path_segment(&name)?),
                    None,
                )
                .await?;
            print(json.json, &img, || format!("deleted image {}\n", img.name))
        }
        Command::Apitoken(cmd) => trust::apitoken(&c, cmd).await,
        Command::Ca(cmd) => trust::ca(&c, cmd).await,
        Command::Token(TokenCmd::Ls(j)) => {
            let ts: Vec<TokenView> = c.call(Method::GET, "/v1/tokens", None).await?;
            print(j.json, &ts, || token_table(&ts))
        }
        Command::Token(TokenCmd::Revoke { id, json }) => {
            let t: TokenView = c
                .call(
                    Method::DELETE,
                    &format!("/v1/tokens/{}", path_segment(&id)?),
                    None,
                )
                .await?;
            print(json.json, &t, || {
                format!("token {} is {}\n", t.id, t.status)
            })
        }
    }
}

/// Turns NDJSON events into lines for people.
struct EventPrinter<W: std::io::Write> {
    out: W,
    buf: Vec<u8>,
}

impl<W: std::io::Write> std::io::Write for EventPrinter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let text = match serde_json::from_slice::<SiteEvent>(&line) {
                Ok(e) => format!(
                    "{}  {:<4}  {:<16} {:<9} {}\n",
                    e.at, e.kind, e.name, e.state, e.detail
                ),
                Err(_) => String::from_utf8_lossy(&line).into_owned(),
            };
            self.out.write_all(text.as_bytes())?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Rejects path segments that would change the request's path.
fn path_segment(s: &str) -> Result<&str, CliError> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(CliError {
            code: ExitCode::Usage,
            message: format!(
                "`{}` is not a node name, node id or token id",
                zy_common::ids::truncate_for_error(s)
            ),
        });
    }
    Ok(s)
}

fn print<T: Serialize>(json: bool, v: &T, table: impl FnOnce() -> String) -> Result<(), CliError> {
    use std::io::Write;
    let text = if json {
        let mut s = serde_json::to_string_pretty(v).map_err(|e| CliError {
            code: ExitCode::Failure,
            message: e.to_string(),
        })?;
        s.push('\n');
        s
    } else {
        table()
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (zy node ls | head) is not an error worth a message.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    Ok(())
}

/// Bytes in human units (base 1024), e.g. `15.6G`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// Renders rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

async fn admin_action(
    c: &Client,
    action: &str,
    node: &str,
    json: bool,
    done: &str,
) -> Result<(), CliError> {
    let n: NodeView = c
        .call(
            Method::POST,
            &format!("/v1/nodes/{}/{action}", path_segment(node)?),
            None,
        )
        .await?;
    print(json, &n, || {
        format!("node {}: {done} ({})\n", n.name, n.admin)
    })
}

/// Follows a drain until its node is in maintenance: each migration off it as it starts
/// and ends, and what holds it back.
async fn follow_drain(c: &Client, n: NodeView) -> Result<(), CliError> {
    println!("node {} is {}", n.name, n.admin);
    let mut seen: std::collections::HashMap<String, String> = Default::default();
    let mut note = None;
    let mut errors = 0;
    // Drains of this node that ended before this one are not shown.
    let before: Vec<OpView> = c.call(Method::GET, "/v1/ops", None).await?;
    for o in before.iter().filter(|o| o.state != "running") {
        seen.insert(o.id.to_string(), o.state.clone());
    }
    loop {
        let node = match c
            .call::<NodeView>(Method::GET, &format!("/v1/nodes/{}", n.id), None)
            .await
        {
            Ok(v) => v,
            Err(ClientError::Unreachable { .. }) if errors < 40 => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        errors = 0;
        let ops: Vec<OpView> = c.call(Method::GET, "/v1/ops", None).await?;
        for o in &ops {
            let Some(m) = &o.migration else { continue };
            if m.cause != "drain" || m.from != n.name {
                continue;
            }
            let key = o.id.to_string();
            if seen.get(&key) == Some(&o.state) {
                continue;
            }
            match o.state.as_str() {
                "running" => println!("  moving VM {} to {}", o.vm_name, m.to),
                "succeeded" => println!(
                    "  moved VM {} to {} (paused {} ms)",
                    o.vm_name,
                    m.to,
                    m.downtime_ms.map(|d| d.to_string()).unwrap_or("?".into())
                ),
                _ => println!(
                    "  moving VM {} to {} failed: {}",
                    o.vm_name,
                    m.to,
                    o.reason.as_deref().unwrap_or("no reason given")
                ),
            }
            seen.insert(key, o.state.clone());
        }
        if node.admin_note != note {
            if let Some(t) = &node.admin_note {
                println!("  {t}");
            }
            note = node.admin_note.clone();
        }
        match node.admin.as_str() {
            "maintenance" => {
                println!("node {} is drained: in maintenance", node.name);
                return Ok(());
            }
            "draining" => {}
            other => {
                return Err(CliError {
                    code: ExitCode::Conflict,
                    message: format!(
                        "node {} is {other} now: the drain was called off",
                        node.name
                    ),
                })
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn consolidate(
    c: &Client,
    max_moves: Option<u32>,
    min_gain: Option<f64>,
    apply: bool,
    json: bool,
) -> Result<(), CliError> {
    if !apply {
        let mut q = Vec::new();
        if let Some(m) = max_moves {
            q.push(format!("max_moves={m}"));
        }
        if let Some(g) = min_gain {
            q.push(format!("min_gain={g}"));
        }
        let path = if q.is_empty() {
            "/v1/plan/consolidate".to_string()
        } else {
            format!("/v1/plan/consolidate?{}", q.join("&"))
        };
        let v: ConsolidationView = c.call(Method::GET, &path, None).await?;
        return print(json, &v, || v.text.clone());
    }
    let body = serde_json::json!({ "max_moves": max_moves, "min_gain": min_gain });
    let v: ConsolidationView = c
        .call(Method::POST, "/v1/plan/consolidate", Some(body))
        .await?;
    if !json {
        print!("{}", v.text);
        println!("carrying it out:");
    }
    let mut shown = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now: ConsolidationView = c.call(Method::GET, "/v1/plan/consolidate", None).await?;
        let Some(run) = now.run else {
            return Err(CliError {
                code: ExitCode::Failure,
                message: "the coordinator forgot the consolidation (it restarted?)".into(),
            });
        };
        if !json {
            for d in run.done.iter().skip(shown) {
                println!("  done: {d}");
            }
        }
        shown = run.done.len();
        if run.running {
            continue;
        }
        if json {
            print(true, &run, String::new)?;
        }
        return match run.error {
            None => {
                if !json {
                    println!("consolidation finished: {shown} step(s) done");
                }
                Ok(())
            }
            Some(e) => Err(CliError {
                code: ExitCode::Failure,
                message: format!("consolidation stopped after {shown} step(s): {e}"),
            }),
        };
    }
}

/// A node's state as ops read it: what they asked of it first (a standby node is silent on
/// purpose, not down), then its heartbeats.
fn node_state(n: &NodeView) -> String {
    match n.admin.as_str() {
        "active" => n.state.clone(),
        "standby" => "standby".into(),
        a => format!("{a} ({})", n.state),
    }
}

fn node_table(nodes: &[NodeView], now: u64) -> String {
    if nodes.is_empty() {
        return "no nodes enrolled yet: create a token with `zy token create --zone <zone>` and run `zy-agent join` on the server\n".into();
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let inv = n.inventory.as_ref();
            vec![
                n.name.clone(),
                n.zone.to_string(),
                node_state(n),
                inv.map(|i| i.cpus.to_string()).unwrap_or("-".into()),
                inv.map(|i| human_bytes(i.memory_bytes))
                    .unwrap_or("-".into()),
                inv.map(|i| human_bytes(i.disk_free_bytes))
                    .unwrap_or("-".into()),
                inv.map(|i| i.accel.as_str().to_string())
                    .unwrap_or("-".into()),
                n.load
                    .as_ref()
                    .map(|l| format!("{:.1}%", l.cpu_percent))
                    .unwrap_or("-".into()),
                n.load
                    .as_ref()
                    .map(|l| human_bytes(l.mem_used_bytes))
                    .unwrap_or("-".into()),
                n.load
                    .as_ref()
                    .map(|l| format!("{:.2}", l.load1))
                    .unwrap_or("-".into()),
                ago(n.last_seen_ms, now),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ZONE",
            "STATE",
            "CPUS",
            "MEMORY",
            "DISK-FREE",
            "ACCEL",
            "CPU",
            "MEM-USED",
            "LOAD1",
            "LAST-SEEN",
        ],
        &rows,
    )
}

fn node_detail(d: &NodeDetail, now: u64) -> String {
    let n = &d.node;
    let mut s = format!(
        "name:        {}\nid:          {}\nzone:        {}\nstate:       {} since {}\nenrolled:    {}\nlast seen:   {}\nconnected:   {}\n",
        n.name,
        n.id,
        n.zone,
        n.state,
        n.state_since,
        n.enrolled_at,
        ago(n.last_seen_ms, now),
        n.remote.as_deref().map(|r| format!("yes, from {r}")).unwrap_or("no".into()),
    );
    s.push_str(&format!(
        "admin:       {}{}\n",
        n.admin,
        if n.admin_since_ms > 0 {
            format!(" since {}", zy_common::time::rfc3339(n.admin_since_ms))
        } else {
            String::new()
        }
    ));
    if let Some(t) = &n.admin_note {
        s.push_str(&format!("note:        {t}\n"));
    }
    if let Some(c) = &n.cert {
        s.push_str(&format!(
            "certificate: serial {}, valid until {} ({} days left)\n",
            c.serial,
            c.not_after,
            (c.not_after_ms as i64 - now as i64).div_euclid(86_400_000)
        ));
    }
    if let Some(i) = &n.inventory {
        s.push_str(&format!(
            "hostname:    {}\ncpu:         {} x {}\nmemory:      {}\ndisk:        {} free of {}\naccelerator: {} (kvm usable: {})\nagent:       {}\nkernel:      {}\n",
            i.hostname,
            i.cpus,
            i.cpu_model,
            human_bytes(i.memory_bytes),
            human_bytes(i.disk_free_bytes),
            human_bytes(i.disk_total_bytes),
            i.accel.as_str(),
            i.kvm_usable,
            i.agent_version,
            i.kernel
        ));
    }
    if let Some(l) = &n.load {
        s.push_str(&format!(
            "load:        cpu {:.1}%, memory {} used / {} available, load {:.2} {:.2} {:.2}\nnetwork:     {} received, {} sent\n",
            l.cpu_percent,
            human_bytes(l.mem_used_bytes),
            human_bytes(l.mem_available_bytes),
            l.load1,
            l.load5,
            l.load15,
            human_bytes(l.net_rx_bytes),
            human_bytes(l.net_tx_bytes)
        ));
    }
    if !d.transitions.is_empty() {
        s.push_str("\nmembership history:\n");
        let rows: Vec<Vec<String>> = d
            .transitions
            .iter()
            .map(|t| {
                vec![
                    t.at.clone(),
                    format!("{} -> {}", t.from, t.to),
                    t.reason.clone(),
                ]
            })
            .collect();
        s.push_str(&table(&["AT", "CHANGE", "REASON"], &rows));
    }
    if !d.admin_transitions.is_empty() {
        s.push_str("\nadministration history:\n");
        let rows: Vec<Vec<String>> = d
            .admin_transitions
            .iter()
            .map(|t| {
                vec![
                    t.at.clone(),
                    format!("{} -> {}", t.from, t.to),
                    t.reason.clone(),
                ]
            })
            .collect();
        s.push_str(&table(&["AT", "CHANGE", "REASON"], &rows));
    }
    s
}

async fn vm_action(c: &Client, action: &str, vm: &str, wait: &WaitFlags) -> Result<(), CliError> {
    let path = format!("/v1/vms/{}/{action}", path_segment(vm)?);
    let a = mutate(c, Method::POST, path, None).await?;
    follow(c, a, wait).await
}

/// Sends a request that starts an operation, with an idempotency key of its own: if the
/// answer is lost on the way, sending it again returns the same operation, never a second.
async fn mutate(
    c: &Client,
    method: Method,
    path: String,
    body: Option<serde_json::Value>,
) -> Result<Accepted, CliError> {
    let key: [u8; 16] = rand::random();
    let c = c.with_idempotency_key(zy_common::token::hex(&key));
    let mut tries = 0;
    loop {
        match c.call(method.clone(), &path, body.clone()).await {
            Err(ClientError::Unreachable { .. }) if tries < 2 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return Ok(r?),
        }
    }
}

/// Follows an operation to its end, printing each step as it is done, unless --no-wait.
/// The work goes on at the coordinator whatever happens here (an interrupted `zy` changes
/// nothing): this only watches.
/// One line of a migration's progress.
fn progress_line(p: &zy_api::MigrationProgress) -> String {
    let mut parts = Vec::new();
    if p.disk_total > 0 {
        parts.push(format!(
            "disks {}/{}",
            human_bytes(p.disk_done),
            human_bytes(p.disk_total)
        ));
    }
    if p.memory_total > 0 {
        parts.push(format!(
            "memory sent {} ({} left of {}), dirtied {}/s, expected pause {} ms",
            human_bytes(p.memory_transferred),
            human_bytes(p.memory_remaining),
            human_bytes(p.memory_total),
            human_bytes(p.dirty_rate),
            p.expected_downtime_ms
        ));
        if p.cpu_throttle_percent > 0 {
            parts.push(format!("guest slowed {}%", p.cpu_throttle_percent));
        }
    }
    if parts.is_empty() {
        p.phase.clone()
    } else {
        format!("{}: {}", p.phase, parts.join(", "))
    }
}

#[cfg(test)]
mod progress_tests {
    #[test]
    fn a_progress_line_shows_what_is_known() {
        let mut p = zy_api::MigrationProgress {
            phase: "memory".into(),
            disk_done: 0,
            disk_total: 0,
            memory_transferred: 0,
            memory_remaining: 0,
            memory_total: 0,
            dirty_rate: 0,
            expected_downtime_ms: 0,
            cpu_throttle_percent: 0,
        };
        assert_eq!(super::progress_line(&p), "memory");
        p.memory_total = 256 << 20;
        p.memory_transferred = 64 << 20;
        let line = super::progress_line(&p);
        assert!(line.starts_with("memory: memory sent"), "{line}");
        p.disk_total = 1 << 30;
        let line = super::progress_line(&p);
        assert!(line.starts_with("memory: disks "), "{line}");
        assert!(line.contains(", memory sent"), "{line}");
    }
}

async fn follow(c: &Client, a: Accepted, wait: &WaitFlags) -> Result<(), CliError> {
    let mut op = a.operation;
    if wait.no_wait {
        return print(wait.json, &op, || {
            format!(
                "operation {} ({} of VM {}) recorded; follow it with `zy op show {}`\n",
                op.id,
                op.kind.as_str(),
                op.vm_name,
                op.id
            )
        });
    }
    let mut shown = 0;
    let mut errors = 0;
    let mut last_progress = None;
    loop {
        if !wait.json {
            for s in op
                .steps
                .iter()
                .skip(shown)
                .take_while(|s| s.done_at.is_some())
            {
                println!("  done: {}", s.name);
                shown += 1;
            }
            if let Some(p) = op.migration.as_ref().and_then(|m| m.progress.as_ref()) {
                let line = progress_line(p);
                if last_progress.as_ref() != Some(&line) {
                    println!("  {line}");
                    last_progress = Some(line);
                }
            }
        }
        if op.state != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        match c
            .call::<OpView>(Method::GET, &format!("/v1/ops/{}", op.id), None)
            .await
        {
            Ok(o) => {
                op = o;
                errors = 0;
            }
            // The coordinator restarting: the operation goes on; keep watching a while.
            Err(ClientError::Unreachable { .. }) if errors < 40 => errors += 1,
            Err(e) => return Err(e.into()),
        }
    }
    if wait.json {
        print(true, &op, String::new)?;
    }
    match op.state.as_str() {
        "succeeded" => {
            if !wait.json {
                println!("{} of VM {} succeeded", op.kind.as_str(), op.vm_name);
                if let Some(m) = &op.migration {
                    println!(
                        "  now on {}; the guest was paused {} ms (whole migration {} ms)",
                        m.to,
                        m.downtime_ms.map(|d| d.to_string()).unwrap_or("?".into()),
                        m.total_ms.map(|d| d.to_string()).unwrap_or("?".into())
                    );
                }
            }
            Ok(())
        }
        _ => Err(CliError {
            code: ExitCode::Failure,
            message: format!(
                "{} of VM {} failed: {} (operation {})",
                op.kind.as_str(),
                op.vm_name,
                op.reason.as_deref().unwrap_or("no reason given"),
                op.id
            ),
        }),
    }
}

fn op_table(ops: &[OpView]) -> String {
    if ops.is_empty() {
        return "no operations yet\n".into();
    }
    let rows: Vec<Vec<String>> = ops
        .iter()
        .map(|o| {
            vec![
                o.id.to_string(),
                o.kind.as_str().to_string(),
                o.vm_name.clone(),
                o.state.clone(),
                o.steps
                    .get(o.current_step)
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| "-".into()),
                o.created_at.clone(),
            ]
        })
        .collect();
    table(&["ID", "KIND", "VM", "STATE", "STEP", "CREATED"], &rows)
}

fn op_detail(o: &OpView) -> String {
    let mut s = format!(
        "operation: {}\nkind:      {}\nvm:        {} ({})\nstate:     {}\ncreated:   {}\nupdated:   {}\n",
        o.id,
        o.kind.as_str(),
        o.vm_name,
        o.vm,
        o.state,
        o.created_at,
        o.updated_at
    );
    if let Some(r) = &o.reason {
        s.push_str(&format!("reason:    {r}\n"));
    }
    s.push_str("steps:\n");
    for (i, st) in o.steps.iter().enumerate() {
        let mark = match (&st.done_at, i == o.current_step && o.state == "running") {
            (Some(at), _) => format!("done {at}"),
            (None, true) => "under way".into(),
            (None, false) => "-".into(),
        };
        s.push_str(&format!("  {}. {:<22} {mark}\n", i + 1, st.name));
    }
    s
}

fn vm_table(vms: &[VmView]) -> String {
    if vms.is_empty() {
        return "no VMs: `zy vm create --name N --zone Z --image I` makes one\n".into();
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.zone.to_string(),
                v.state.clone(),
                v.node.clone().unwrap_or("-".into()),
                v.ip.to_string(),
                v.vcpus.to_string(),
                format!("{}M", v.memory_mib),
                v.image.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ZONE", "STATE", "NODE", "ADDRESS", "VCPUS", "MEMORY", "IMAGE",
        ],
        &rows,
    )
}

/// A text file the user named, read whole (bounded: these go into a request).
fn read_text_file(path: &Path, what: &str) -> Result<String, CliError> {
    let usage = |message: String| CliError {
        code: ExitCode::Usage,
        message,
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| usage(format!("cannot read {what} file {}: {e}", path.display())))?;
    if meta.len() > 1024 * 1024 {
        return Err(usage(format!(
            "{what} file {} is {} bytes: that is not a {what} file",
            path.display(),
            meta.len()
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| usage(format!("cannot read {what} file {}: {e}", path.display())))?;
    String::from_utf8(bytes)
        .map_err(|_| usage(format!("{what} file {} is not UTF-8 text", path.display())))
}

/// The keys of public key files: every line but blank ones and `#` comments, as
/// `authorized_keys` files have them. The coordinator checks each.
fn read_key_files(paths: &[PathBuf]) -> Result<Vec<String>, CliError> {
    let mut keys = Vec::new();
    for p in paths {
        let text = read_text_file(p, "SSH public key")?;
        if text.contains("PRIVATE KEY") {
            return Err(CliError {
                code: ExitCode::Usage,
                message: format!(
                    "{} is a private key: give the public one (`{}.pub`)",
                    p.display(),
                    p.display()
                ),
            });
        }
        let before = keys.len();
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if keys.len() == before {
            return Err(CliError {
                code: ExitCode::Usage,
                message: format!("SSH public key file {} holds no key", p.display()),
            });
        }
    }
    Ok(keys)
}

fn vm_detail(v: &VmView) -> String {
    let mut s = format!(
        "name:      {}\nid:        {}\nzone:      {}\nstate:     {} since {} (wanted: {:?}, generation {}, node has {})\nnode:      {}\naddress:   {} (mac {})\nsize:      {} vCPU, {} MiB, {} GiB disk\nimage:     {}\nqemu pid:  {}\ncreated:   {}\n",
        v.name,
        v.id,
        v.zone,
        v.state,
        v.state_since,
        v.desired,
        v.generation,
        v.node_intent.map(|g| g.to_string()).unwrap_or("-".into()),
        v.node.as_deref().unwrap_or("-"),
        v.ip,
        v.mac,
        v.vcpus,
        v.memory_mib,
        v.disk_gib,
        v.image,
        v.pid.map(|p| p.to_string()).unwrap_or("-".into()),
        v.created_at
    );
    if let Some(r) = &v.reason {
        s.push_str(&format!("reason:    {r}\n"));
    }
    if let Some(op) = &v.operation {
        s.push_str(&format!("operation: {op} under way\n"));
    }
    for k in &v.ssh_keys {
        s.push_str(&format!("ssh key:   {k}\n"));
    }
    if let Some(n) = v.user_data_bytes {
        s.push_str(&format!("user-data: {n} bytes\n"));
    }
    if let Some(g) = &v.anti_affinity {
        s.push_str(&format!("anti-affinity: {g}\n"));
    }
    if let Some(to) = &v.migrating_to {
        s.push_str(&format!("migrating to: {to}\n"));
    }
    s
}

fn image_table(images: &[ImageView]) -> String {
    use zy_common::image::ImageKind;
    if images.is_empty() {
        return "no images: `zy image import FILE --name N --zone Z` uploads one\n".into();
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            let (kind, detail) = match &i.kind {
                ImageKind::Disk {
                    format,
                    virtual_size,
                    ..
                } => (
                    "disk",
                    format!(
                        "{}, {} virtual",
                        format.as_str(),
                        human_bytes(*virtual_size)
                    ),
                ),
                ImageKind::Kernel { initrd, .. } => (
                    "kernel",
                    if initrd.is_some() {
                        "with initramfs".to_string()
                    } else {
                        String::new()
                    },
                ),
            };
            vec![
                i.name.clone(),
                kind.into(),
                i.zone
                    .map(|z| z.to_string())
                    .unwrap_or_else(|| "shared".into()),
                human_bytes(i.size_bytes),
                detail,
                i.created_at.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "KIND", "ZONE", "SIZE", "DETAIL", "CREATED"],
        &rows,
    )
}

fn image_detail(i: &ImageView) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("name", i.name.clone()),
        (
            "zone",
            i.zone
                .map(|z| z.to_string())
                .unwrap_or_else(|| "shared (both zones)".into()),
        ),
        ("size", human_bytes(i.size_bytes)),
        ("created", i.created_at.clone()),
    ];
    match &i.kind {
        zy_common::image::ImageKind::Disk {
            blob,
            format,
            virtual_size,
        } => {
            rows.push(("kind", format!("disk ({})", format.as_str())));
            rows.push(("virtual size", human_bytes(*virtual_size)));
            rows.push(("blob", blob.to_string()));
        }
        zy_common::image::ImageKind::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            rows.push(("kind", "kernel".into()));
            rows.push(("kernel", kernel.to_string()));
            rows.push((
                "initrd",
                initrd.map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
            ));
            rows.push(("cmdline", cmdline.clone()));
        }
    }
    rows.push((
        "used by",
        if i.used_by.is_empty() {
            "no VM".into()
        } else {
            format!("{} VM(s): {}", i.used_by.len(), i.used_by.join(", "))
        },
    ));
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<13} {v}\n", format!("{k}:")));
    }
    out
}

fn token_table(ts: &[TokenView]) -> String {
    if ts.is_empty() {
        return "no tokens: `zy token create --zone <zone>` makes one\n".into();
    }
    let rows: Vec<Vec<String>> = ts
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.zone.to_string(),
                t.status.clone(),
                t.expires_at.clone(),
                match (&t.used_by_name, t.used_by) {
                    (Some(name), _) => name.clone(),
                    // Enrolled a node since removed: its id is all that is left.
                    (None, Some(id)) => id.to_string(),
                    (None, None) => "-".into(),
                },
            ]
        })
        .collect();
    table(&["ID", "ZONE", "STATUS", "EXPIRES", "USED-BY"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command says what it is, and the global options are
    /// listed apart from a command's own.
    #[test]
    fn every_argument_has_help_and_globals_are_apart() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && cmd.get_name() != "help" {
                missing.push(format!("{path}: the command has no description"));
            }
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if ["help", "version"].contains(&id) {
                    continue;
                }
                if a.get_help().is_none() {
                    missing.push(format!("{path} {id}: no help"));
                }
                if a.is_global_set() && a.get_help_heading() != Some("Global options") {
                    missing.push(format!("{path} {id}: a global option outside its heading"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "zy", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
        let help = cmd
            .find_subcommand_mut("vm")
            .and_then(|c| c.find_subcommand_mut("create"))
            .expect("zy vm create")
            .render_help()
            .to_string();
        let own = help.find("Options:").expect("own options");
        let global = help.find("Global options:").expect("global options");
        assert!(own < global, "{help}");
        assert!(
            help[own..global].contains("--image") && !help[own..global].contains("--token"),
            "{help}"
        );
    }

    #[test]
    fn ttl_bounds_and_units() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_ttl("10s").is_err());
        assert!(parse_ttl("31d").is_err());
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn path_segments_cannot_escape() {
        assert!(path_segment("node-1").is_ok());
        for bad in ["", "../tokens", "a/b", "a?b", "a b"] {
            assert!(path_segment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_tables_and_bytes() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5K");
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
