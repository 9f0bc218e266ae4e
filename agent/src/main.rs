//! `zy-agent`: the Zhengyun node agent. Thin: parse, load config, run the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::info;
use zy_agent::config::{AccelChoice, AgentConfig, DEFAULT_CONFIG};
use zy_agent::identity::IdentityDir;

#[derive(Debug, Parser)]
#[command(name = "zy-agent", version, about = "The Zhengyun node agent")]
struct Args {
    /// Config file (TOML). Missing is fine at the default path.
    #[arg(long, global = true, env = "ZY_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the node's identity and data live (overrides the config).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Enroll this server with a coordinator, using a token from `zy token create`.
    Join {
        /// The coordinator's daemon address, host:port (UDP, default port 7400).
        coordinator: String,
        /// The one-time bootstrap token (zyj1-...).
        token: String,
        /// The node's name as ops will see it (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the agent.
    Run {
        /// The coordinator's daemon address (overrides the one recorded at join).
        #[arg(long)]
        coordinator: Option<String>,
        /// auto, kvm or tcg.
        #[arg(long)]
        accel: Option<AccelChoice>,
        /// Log JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Print what this node would report as its inventory, as JSON.
    Inventory,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // One thread: the agent's work is a report a second and a handful of commands.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zy-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("zy-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<AgentConfig> {
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut cfg = AgentConfig::load(&path, required)?;
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

async fn run(args: Args) -> anyhow::Result<u8> {
    let mut cfg = load_config(&args)?;
    match args.command {
        Cmd::Join {
            coordinator,
            token,
            name,
        } => {
            let name = match name {
                Some(n) => n,
                None => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .map(|h| h.to_lowercase())
                    .unwrap_or_default(),
            };
            let joined = zy_agent::join::join(&cfg.data_dir, &coordinator, &token, &name).await?;
            println!(
                "enrolled as node {} ({}) in zone {}\nstart the agent with `zy-agent run{}`",
                joined.node.name,
                joined.node.node_id,
                joined.node.zone,
                args.data_dir
                    .map(|d| format!(" --data-dir {}", d.display()))
                    .unwrap_or_default()
            );
            Ok(0)
        }
        Cmd::Run {
            coordinator,
            accel,
            log_json,
        } => {
            zy_common::logging::init(log_json);
            if let Some(c) = coordinator {
                cfg.coordinator = Some(c);
            }
            if let Some(a) = accel {
                cfg.accel = a;
            }
            let identity = std::sync::Arc::new(IdentityDir::new(&cfg.data_dir).load()?);
            info!(node = %identity.node.node_id, name = %identity.node.name, zone = %identity.node.zone, "agent starting");
            zy_common::sdnotify::notify("READY=1");
            let _watchdog = zy_common::sdnotify::spawn_watchdog();
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
            let accel =
                zy_agent::host::inventory(&cfg.data_dir, identity.node.zone, cfg.accel)?.accel;
            let supervisor = zy_agent::node::supervisor(cfg.supervisor)
                .await
                .context("cannot use systemd for VMs (set supervisor = \"direct\" in agent.toml to run them without it)")?;
            let supervised_by = supervisor.as_str();
            let (published, uplink) = zy_agent::uplink::Uplink::new();
            let (node, events) = zy_agent::node::Node::start(
                cfg.qemu.clone(),
                &cfg.data_dir,
                accel,
                supervisor,
                uplink,
            )
            .await?;
            info!(
                vms = node.vms.list().len(),
                accel = accel.as_str(),
                supervisor = supervised_by,
                "VMs recovered"
            );
            tokio::select! {
                e = zy_agent::link::run(&cfg, &identity, node, published, events) => {
                    eprintln!("zy-agent: {e}");
                    Ok(zy_agent::EXIT_REFUSED)
                }
                r = async { zy_common::sdnotify::shutdown_signal().await.context("cannot watch for SIGTERM") } => {
                    r?;
                    info!("agent stopping");
                    Ok(0)
                }
            }
        }
        Cmd::Inventory => {
            let zone = IdentityDir::new(&cfg.data_dir)
                .load()
                .map(|i| i.node.zone)
                .unwrap_or(zy_common::Zone::Intranet);
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
            let inv = zy_agent::host::inventory(&cfg.data_dir, zone, cfg.accel)?;
            println!("{}", serde_json::to_string_pretty(&inv)?);
            Ok(0)
        }
    }
}
