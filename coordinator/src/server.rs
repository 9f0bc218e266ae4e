//! Starting and stopping the coordinator: opens the store, builds the fleet, binds the QUIC
//! endpoint and the HTTPS API, runs the membership monitor, and shuts down in order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::{error, info};
use zy_common::ids::TokenId;
use zy_common::quic;
use zy_common::time::now_millis;
use zy_common::tls::{self, SiteCa};

use crate::config::CoordinatorConfig;
use crate::fleet::Fleet;
use crate::store::statedir::{StateDir, StateDirError};
use crate::store::{ApiTokenRecord, Store, StoreError};

/// Socket buffers of the daemon port: a reconnect storm of thousands of agents arrives at
/// once, and the kernel's default (~208 KiB) drops handshakes.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// How often membership is evaluated and made durable.
const MONITOR_TICK: Duration = Duration::from_millis(250);

/// How often unneeded blobs are looked for, and how long an uploaded blob may wait for the
/// image that names it.
const BLOB_COLLECT_EVERY: Duration = Duration::from_secs(600);
const BLOB_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Everything a running coordinator holds; shared by the daemon sessions and the API.
#[derive(Debug)]
pub struct Coordinator {
    pub config: CoordinatorConfig,
    pub state: StateDir,
    pub store: Arc<Store>,
    pub fleet: Arc<Fleet>,
    pub ca: SiteCa,
    /// The server certificate both listeners serve; renewed in place.
    pub server_cert: Arc<tls::CertSlot>,
    pub api_tokens: RwLock<HashMap<TokenId, ApiTokenRecord>>,
    /// Refused API tokens, for logging them at a bounded rate.
    pub refusals: crate::api::refusals::Refusals,
    pub join_slots: Arc<Semaphore>,
    pub started: Instant,
    /// Image files and other content-addressed blobs.
    pub blobs: zy_common::blob::BlobDir,
    /// The site's VMs.
    pub vms: crate::vms::Vms,
    /// The live event stream.
    pub events: crate::api::events::Events,
    /// What the VM reconciler keeps between its ticks.
    pub reconciler: Arc<std::sync::Mutex<crate::vms::reconcile::State>>,
    /// The live migrations under way: their drivers and latest progress.
    pub migrations: crate::vms::migrate::Migrations,
    /// Node administration's memory: notes, power commands running, load averages.
    pub nodeadmin: crate::nodeadmin::NodeAdmin,
    /// Wakes the drain driver (a drain was asked).
    pub drain_wake: tokio::sync::Notify,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Blobs(#[from] zy_common::blob::BlobError),
    #[error("could not start the VM table's committer thread")]
    Committer(#[source] std::io::Error),
    #[error("the zone settings of {config} conflict with the VMs: {}; pick another gateway", conflicts.join("; "))]
    Gateway {
        config: String,
        conflicts: Vec<String>,
    },
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Addresses actually bound (a port of 0 in the config picks a free one).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub daemon: SocketAddr,
    pub api: SocketAddr,
}

/// A started coordinator; [`Running::shutdown`] stops it in order.
#[derive(Debug)]
pub struct Running {
    pub coord: Arc<Coordinator>,
    pub bound: Bound,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Coordinator {
    /// Loads the state directory and opens the store.
    pub fn open(state: StateDir, config: CoordinatorConfig) -> Result<Self, StartError> {
        let ca = state.load_ca()?;
        let server = state.load_server()?;
        let server_cert = tls::CertSlot::new(
            tls::certs_from_pem("server certificate", &server.cert_pem)?,
            tls::key_from_pem("server key", &server.key_pem)?,
        )?;
        if config.certs.short_validity_for_tests {
            tracing::warn!(node_validity = ?config.certs.node_validity, server_validity = ?config.certs.server_validity,
                "short_validity_for_tests is set: certificates may last seconds; never use this outside the lab");
        }
        let store = Store::open(&state.store())?;
        let fleet = Fleet::new(
            store.nodes()?,
            store.removed()?,
            config.timings,
            Instant::now(),
        );
        let api_tokens = store.api_tokens()?.into_iter().map(|t| (t.id, t)).collect();
        let blobs = zy_common::blob::BlobDir::open(&state.blobs())?;
        let store = Arc::new(store);
        let all = store.vms()?;
        let conflicts = crate::vms::gateway_conflicts(&config, &all);
        if !conflicts.is_empty() {
            return Err(StartError::Gateway {
                config: state.config().display().to_string(),
                conflicts,
            });
        }
        let vms = crate::vms::Vms::new(store.clone(), all, store.ops()?)
            .map_err(StartError::Committer)?;
        let power = config.power.clone().map(|p| {
            Arc::new(crate::nodeadmin::power::CommandPower::new(p))
                as Arc<dyn crate::nodeadmin::power::Power>
        });
        Ok(Self {
            nodeadmin: crate::nodeadmin::NodeAdmin::new(power, config.consolidation.load_window),
            drain_wake: tokio::sync::Notify::new(),
            reconciler: Arc::default(),
            migrations: Default::default(),
            events: crate::api::events::Events::default(),
            vms,
            blobs,
            join_slots: Arc::new(Semaphore::new(config.max_concurrent_joins)),
            config,
            state,
            store,
            fleet: Arc::new(fleet),
            ca,
            server_cert,
            api_tokens: RwLock::new(api_tokens),
            refusals: Default::default(),
            started: Instant::now(),
        })
    }

    /// Binds both listeners and starts every task.
    pub async fn start(self) -> Result<Running, StartError> {
        let coord = Arc::new(self);
        let daemon_tls = tls::daemon_server_config(coord.ca.cert_der(), coord.server_cert.clone())?;
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(daemon_tls)
            .map_err(|e| tls::TlsError::Quic(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        server_config.transport_config(quic::transport(coord.config.timings.idle_timeout));
        let bind_err = |source| StartError::Bind {
            what: "daemon, UDP",
            addr: coord.config.daemon_listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(coord.config.daemon_listen).map_err(bind_err)?;
        crate::sys::grow_socket_buffers(&socket, UDP_BUFFER_BYTES);
        let daemon_addr = socket.local_addr().map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;

        let api_tls = tls::https_server_config(coord.server_cert.clone())?;
        let listener = tokio::net::TcpListener::bind(coord.config.api_listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "API, TCP",
                addr: coord.config.api_listen,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| StartError::Bind {
            what: "API, TCP",
            addr: coord.config.api_listen,
            source,
        })?;

        let tasks = vec![
            tokio::spawn(crate::fleet::daemon::serve(coord.clone(), endpoint.clone())),
            tokio::spawn(crate::api::https::serve(
                listener,
                Arc::new(api_tls),
                crate::api::router(coord.clone()),
            )),
            tokio::spawn(monitor(coord.clone())),
            tokio::spawn(crate::vms::reconcile::run(coord.clone())),
            tokio::spawn(collect_blobs(coord.clone())),
            tokio::spawn(crate::fleet::certs::run(coord.clone())),
            tokio::spawn(crate::nodeadmin::drain::run(coord.clone())),
            tokio::spawn(crate::nodeadmin::consolidate::periodic(coord.clone())),
        ];
        info!(daemon = %daemon_addr, api = %api_addr, site = %coord.config.site,
              nodes = coord.fleet.snapshot().len(), "coordinator started");
        Ok(Running {
            coord,
            bound: Bound {
                daemon: daemon_addr,
                api: api_addr,
            },
            endpoint,
            tasks,
        })
    }
}

impl Running {
    /// Stops accepting, closes every node connection, and makes pending state durable.
    pub async fn shutdown(self) {
        self.endpoint.close(
            zy_common::proto::close::SHUTDOWN.into(),
            b"coordinator stopping",
        );
        for t in &self.tasks {
            t.abort();
        }
        let updates = self.coord.fleet.tick(Instant::now(), now_millis());
        let store = self.coord.store.clone();
        match tokio::task::spawn_blocking(move || store.apply(&updates)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "could not save state at shutdown"),
            Err(e) => error!(error = %e, "could not save state at shutdown"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("coordinator stopped");
    }
}

/// Evaluates membership every tick and writes the changes in one transaction.
async fn monitor(coord: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(MONITOR_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let updates = coord.fleet.tick(Instant::now(), now_millis());
        if updates.is_empty() {
            continue;
        }
        for t in updates.iter().filter_map(|u| u.transition.as_ref()) {
            info!(node = %t.node, from = %t.from, to = %t.to, reason = %t.reason, "membership changed");
            let name = coord
                .fleet
                .find(&t.node.to_string())
                .map(|n| n.record.name)
                .unwrap_or_default();
            coord.events.publish(
                "node",
                t.node.to_string(),
                name,
                t.to.to_string(),
                format!("{} -> {}: {}", t.from, t.to, t.reason),
            );
        }
        let store = coord.store.clone();
        match tokio::task::spawn_blocking(move || store.apply(&updates)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "could not record membership changes"),
            Err(e) => error!(error = %e, "membership writer panicked"),
        }
    }
}

/// Removes blobs that no image and no VM needs once they are older than [`BLOB_GRACE`]
/// (uploads never made into an image, uploads a crash cut short).
async fn collect_blobs(coord: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(BLOB_COLLECT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut keep: std::collections::HashSet<zy_common::blob::BlobHash> = coord
            .vms
            .with(|t| t.vms.values().flat_map(|v| v.boot.blobs()).collect());
        let (store, blobs) = (coord.store.clone(), coord.blobs.clone());
        let r = tokio::task::spawn_blocking(move || {
            for img in store.images().map_err(|e| zy_common::error::chain(&e))? {
                keep.extend(img.kind.blobs());
            }
            blobs
                .collect(&|h| keep.contains(h), BLOB_GRACE)
                .map_err(|e| zy_common::error::chain(&e))
        })
        .await;
        match r {
            Ok(Ok(removed)) if !removed.is_empty() => {
                info!(count = removed.len(), "removed blobs nothing needs")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error!(error = %e, "cannot collect unneeded blobs"),
            Err(e) => error!(error = %e, "the blob collector failed"),
        }
    }
}
