//! `zy-coordinator`: the site coordinator daemon. Thin: parse, load, run the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use zy_coordinator::config::CoordinatorConfig;
use zy_coordinator::store::statedir::StateDir;
use zy_coordinator::Coordinator;

#[derive(Debug, Parser)]
#[command(
    name = "zy-coordinator",
    version,
    about = "The Zhengyun site coordinator"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a state directory: site CA, server certificate, store, admin API token.
    Init {
        #[arg(
            long,
            env = "ZY_STATE_DIR",
            default_value = "/var/lib/zhengyun/coordinator"
        )]
        state_dir: PathBuf,
        /// The site's name (a DNS label).
        #[arg(long, default_value = "site1")]
        site: String,
        /// Extra DNS names or IP addresses for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// UDP address agents connect to.
        #[arg(long, default_value = "0.0.0.0:7400")]
        daemon_listen: SocketAddr,
        /// TCP address of the HTTPS API.
        #[arg(long, default_value = "0.0.0.0:7443")]
        api_listen: SocketAddr,
        /// The host:port the CLI config should use to reach the API.
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Run the coordinator.
    Run {
        #[arg(
            long,
            env = "ZY_STATE_DIR",
            default_value = "/var/lib/zhengyun/coordinator"
        )]
        state_dir: PathBuf,
        /// Config file (default: <state-dir>/coordinator.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the config's daemon_listen.
        #[arg(long)]
        daemon_listen: Option<SocketAddr>,
        /// Override the config's api_listen.
        #[arg(long)]
        api_listen: Option<SocketAddr>,
        /// Log JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Replay a trace through the packer, with no daemon (docs/operations.md, "Judging the
    /// packer"): writes where every request went, or that it was rejected.
    Pack {
        /// The trace (JSON; the format is in `packer/src/trace.rs`).
        #[arg(long)]
        trace: PathBuf,
        /// Where to write PLACEMENTS.json.
        #[arg(long)]
        out: PathBuf,
        /// The packer: zhengyun, or a baseline (ffd, bfd, nomad, nomad-sampled, k8s-least,
        /// k8s-most).
        #[arg(long, default_value = "zhengyun")]
        packer: String,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Cmd::Pack { trace, out, packer } = &args.command {
        // Pure computation: no runtime, no logging.
        return match pack(trace, out, packer) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("zy-coordinator: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zy-coordinator: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zy-coordinator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `zy-coordinator pack`: the trace through the named packer into PLACEMENTS.json.
fn pack(trace: &Path, out: &Path, packer: &str) -> anyhow::Result<()> {
    let p = zy_packer::baselines::by_name(packer).with_context(|| {
        format!(
            "no packer `{packer}` (known: {})",
            zy_packer::baselines::NAMES.join(", ")
        )
    })?;
    let text = std::fs::read_to_string(trace)
        .with_context(|| format!("cannot read the trace {}", trace.display()))?;
    let t = zy_packer::trace::Trace::parse(&text)
        .with_context(|| format!("bad trace {}", trace.display()))?;
    let t0 = Instant::now();
    let mut clock = move || t0.elapsed().as_nanos() as u64;
    let replay = zy_packer::replay::replay(&t, &p, &mut clock)?;
    let placements = replay.placements(&t);
    let json = serde_json::to_string_pretty(&placements)?;
    std::fs::write(out, json + "\n").with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        // main runs it before any runtime starts; here for completeness.
        Cmd::Pack { trace, out, packer } => pack(&trace, &out, &packer),
        Cmd::Init {
            state_dir,
            site,
            sans,
            daemon_listen,
            api_listen,
            advertise,
        } => {
            let config = CoordinatorConfig {
                site,
                daemon_listen,
                api_listen,
                ..CoordinatorConfig::default()
            };
            config.validate().map_err(anyhow::Error::msg)?;
            let advertise = advertise.unwrap_or_else(|| {
                let port = api_listen.port();
                if api_listen.ip().is_unspecified() {
                    format!("127.0.0.1:{port}")
                } else {
                    api_listen.to_string()
                }
            });
            let sd = StateDir::new(&state_dir);
            let out = sd.init(&config, &sans, &advertise)?;
            println!(
                "initialised {}\n  CA fingerprint: {}\n  CLI config:     {} (holds the admin token; keep it 0600)\n\nStart it with `zy-coordinator run --state-dir {}`, then\n  export ZY_CONFIG={}\n  zy token create --zone intranet",
                state_dir.display(),
                out.ca_fingerprint,
                out.cli_config.display(),
                state_dir.display(),
                out.cli_config.display(),
            );
            Ok(())
        }
        Cmd::Run {
            state_dir,
            config,
            daemon_listen,
            api_listen,
            log_json,
        } => {
            zy_common::logging::init(log_json);
            let sd = StateDir::new(&state_dir);
            let path = config.unwrap_or_else(|| sd.config());
            let mut cfg = CoordinatorConfig::load(&path)?;
            if let Some(a) = daemon_listen {
                cfg.daemon_listen = a;
            }
            if let Some(a) = api_listen {
                cfg.api_listen = a;
            }
            let running = Coordinator::open(sd, cfg)
                .context("cannot open the coordinator's state")?
                .start()
                .await?;
            zy_common::sdnotify::notify("READY=1");
            let watchdog = zy_common::sdnotify::spawn_watchdog();
            zy_common::sdnotify::shutdown_signal()
                .await
                .context("cannot watch for SIGTERM")?;
            zy_common::sdnotify::notify("STOPPING=1");
            if let Some(w) = watchdog {
                w.abort();
            }
            tokio::time::timeout(Duration::from_secs(10), running.shutdown())
                .await
                .context("shutdown took longer than 10s")?;
            Ok(())
        }
    }
}
