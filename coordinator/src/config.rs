//! The coordinator's configuration: a TOML file in its state directory, flags on top.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zy_common::quic::Timings;
use zy_common::tls;
use zy_common::Zone;

/// File name of the config inside the state directory.
pub const CONFIG_FILE: &str = "coordinator.toml";

/// Everything the coordinator daemon reads at start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The site's name, shown in listings and written into its CA.
    pub site: String,
    /// UDP address agents connect to (QUIC).
    pub daemon_listen: SocketAddr,
    /// TCP address of the HTTPS API.
    pub api_listen: SocketAddr,
    /// Heartbeat and transport timing.
    #[serde(default)]
    pub timings: Timings,
    /// Most enrollments in flight at once; more wait their turn.
    #[serde(default = "default_max_joins")]
    pub max_concurrent_joins: usize,
    /// vCPUs placed per host CPU (1.0 to 16.0): how far guests may share a node's CPUs.
    #[serde(default = "default_overcommit")]
    pub cpu_overcommit: f64,
    /// Place only where every zone can still lose any one node and restart its VMs on the
    /// others (N+1, as `zy_packer` defines it). On by default; a zone with one node that
    /// takes VMs cannot be N+1 and is exempt.
    #[serde(default = "default_true")]
    pub n_plus_one: bool,
    /// What each zone's network gives its guests beyond an address: a default gateway, name
    /// servers, search domains. Empty by default (guests reach only their zone).
    #[serde(default, skip_serializing_if = "Zones::is_empty")]
    pub zones: Zones,
    /// Certificate lifetimes.
    #[serde(default)]
    pub certs: CertConfig,
    /// How live migrations go.
    #[serde(default)]
    pub migration: MigrationConfig,
    /// How nodes are drained.
    #[serde(default)]
    pub drain: DrainConfig,
    /// How nodes are powered down and up (standby and wake); without it both are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerConfig>,
    /// How the pool is consolidated.
    #[serde(default)]
    pub consolidation: ConsolidationConfig,
}

/// How nodes are drained (`[drain]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// Migrations off one draining node at once (1 to 16; 1 by default: each move is planned
    /// on the pool the one before it left).
    #[serde(default = "default_one")]
    pub parallel: u32,
}

fn default_one() -> u32 {
    1
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { parallel: 1 }
    }
}

/// Most migrations at once off one draining node.
pub const MAX_DRAIN_PARALLEL: u32 = 16;

/// The power driver's commands (`[power]`): argument vectors run without a shell, with
/// `{node}` (the node's id), `{name}` (its name) and `{ip}` (its last known address)
/// replaced in each argument. IPMI, say:
/// `standby = ["ipmitool", "-I", "lanplus", "-H", "{name}-bmc", "chassis", "power", "soft"]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerConfig {
    /// Powers a node down (an empty node, on `zy node standby` or a consolidation step).
    pub standby: Vec<String>,
    /// Powers a node up.
    pub wake: Vec<String>,
    /// How long either command may run before it is killed and the change refused (1 s to
    /// 1 h; 60 s by default).
    #[serde(
        with = "zy_common::quic::duration_text",
        default = "default_power_timeout"
    )]
    pub timeout: Duration,
}

fn default_power_timeout() -> Duration {
    Duration::from_secs(60)
}

impl PowerConfig {
    fn validate(&self) -> Result<(), String> {
        for (key, argv) in [("standby", &self.standby), ("wake", &self.wake)] {
            match argv.first() {
                None => {
                    return Err(format!(
                        "key `{key}` is empty: give the command and its arguments"
                    ))
                }
                Some(p) if p.trim().is_empty() => {
                    return Err(format!("key `{key}` has an empty program name"))
                }
                Some(_) => {}
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(format!("key `{key}` has an argument with a NUL byte"));
            }
        }
        if self.timeout < Duration::from_secs(1) || self.timeout > Duration::from_secs(3600) {
            return Err(format!(
                "key `timeout` is {}, not within 1s to 1h",
                humantime::format_duration(self.timeout)
            ));
        }
        Ok(())
    }
}

/// How the pool is consolidated (`[consolidation]`): the defaults of `zy plan consolidate`
/// and the periodic mode.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsolidationConfig {
    /// Most migrations in one plan (1 to 1000; 10 by default).
    #[serde(default = "default_max_moves")]
    pub max_moves: u32,
    /// The least share of a node a move must win back (0.0 to 1.0; 0.25 by default).
    #[serde(default = "default_min_gain")]
    pub min_gain: f64,
    /// Ready, empty nodes kept awake in every zone (0 to 1000; 1 by default).
    #[serde(default = "default_spares")]
    pub spares: u32,
    /// Above this fraction of its CPUs busy a node is hot (0.05 to 10; 0.85 by default; a
    /// mark above 1.0 never trips).
    #[serde(default = "default_high_water")]
    pub high_water: f64,
    /// The window the agents' CPU load is averaged over (exponentially; 10 s to 1 h, 5 min
    /// by default).
    #[serde(
        with = "zy_common::quic::duration_text",
        default = "default_load_window"
    )]
    pub load_window: Duration,
    /// Plan and apply a consolidation this often (10 min to 7 days); off when absent.
    #[serde(
        default,
        with = "optional_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub every: Option<Duration>,
}

/// The highest `high_water`: a mark above 1.0 never trips, which turns the load rules off
/// (a lab whose nodes are namespaces of one host, all reporting that host's load).
pub const MAX_HIGH_WATER: f64 = 10.0;

/// Most moves a consolidation plan may be asked for.
pub const MAX_CONSOLIDATION_MOVES: u32 = 1000;

fn default_max_moves() -> u32 {
    10
}
fn default_min_gain() -> f64 {
    0.25
}
fn default_spares() -> u32 {
    1
}
fn default_high_water() -> f64 {
    0.85
}
fn default_load_window() -> Duration {
    Duration::from_secs(300)
}

impl Default for ConsolidationConfig {
    fn default() -> Self {
        Self {
            max_moves: default_max_moves(),
            min_gain: default_min_gain(),
            spares: default_spares(),
            high_water: default_high_water(),
            load_window: default_load_window(),
            every: None,
        }
    }
}

impl ConsolidationConfig {
    fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_CONSOLIDATION_MOVES).contains(&self.max_moves) {
            return Err(format!(
                "key `max_moves` is {}, not within 1..={MAX_CONSOLIDATION_MOVES}",
                self.max_moves
            ));
        }
        if !(0.0..=1.0).contains(&self.min_gain) {
            return Err(format!(
                "key `min_gain` is {}, not within 0.0..=1.0",
                self.min_gain
            ));
        }
        if self.spares > 1000 {
            return Err(format!(
                "key `spares` is {}, not within 0..=1000",
                self.spares
            ));
        }
        if !(0.05..=MAX_HIGH_WATER).contains(&self.high_water) {
            return Err(format!(
                "key `high_water` is {}, not within 0.05..={MAX_HIGH_WATER}",
                self.high_water
            ));
        }
        if self.load_window < Duration::from_secs(10)
            || self.load_window > Duration::from_secs(3600)
        {
            return Err(format!(
                "key `load_window` is {}, not within 10s to 1h",
                humantime::format_duration(self.load_window)
            ));
        }
        if let Some(e) = self.every {
            if e < Duration::from_secs(600) || e > Duration::from_secs(7 * 86_400) {
                return Err(format!(
                    "key `every` is {}, not within 10m to 7days",
                    humantime::format_duration(e)
                ));
            }
        }
        Ok(())
    }
}

/// An optional duration as text (`"1h"`).
mod optional_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration: {e}")))
    }
}

/// How live migrations go (`[migration]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The cap on one migration's traffic, memory and disks together (MiB/s, 1 to
    /// 1048576): leave the backbone room for the guests' own traffic.
    #[serde(default = "default_migration_bandwidth")]
    pub max_bandwidth_mib_s: u32,
    /// The longest pause of a guest at the switch-over (ms, 1 to 60000; QEMU's own default
    /// is 300). The source escalates towards it while the guest dirties memory faster than
    /// it is sent, and gives up (the guest keeps running where it was) if it never fits.
    #[serde(default = "default_migration_downtime")]
    pub max_downtime_ms: u32,
}

fn default_migration_bandwidth() -> u32 {
    512
}

fn default_migration_downtime() -> u32 {
    300
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            max_bandwidth_mib_s: default_migration_bandwidth(),
            max_downtime_ms: default_migration_downtime(),
        }
    }
}

impl MigrationConfig {
    fn validate(&self) -> Result<(), String> {
        if !(1..=zy_common::proto::MAX_MIGRATION_MIB_S).contains(&self.max_bandwidth_mib_s) {
            return Err(format!(
                "key `max_bandwidth_mib_s` is {}, not within 1..={}",
                self.max_bandwidth_mib_s,
                zy_common::proto::MAX_MIGRATION_MIB_S
            ));
        }
        if !(1..=zy_common::proto::MAX_MIGRATION_DOWNTIME_MS).contains(&self.max_downtime_ms) {
            return Err(format!(
                "key `max_downtime_ms` is {}, not within 1..={}",
                self.max_downtime_ms,
                zy_common::proto::MAX_MIGRATION_DOWNTIME_MS
            ));
        }
        Ok(())
    }
}

/// How long the certificates the coordinator issues last. Each is renewed when a third of
/// its validity is left (node certificates by their agent over its link, the server's by
/// the coordinator), and a warning goes out when a sixth is left and it has not been.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// Node certificates: 1 hour to 365 days (default 7 days).
    #[serde(
        with = "zy_common::quic::duration_text",
        default = "default_node_validity"
    )]
    pub node_validity: Duration,
    /// The coordinator's server certificate: 1 day to 397 days (the default; see
    /// [`tls::SERVER_VALIDITY_MAX`]).
    #[serde(
        with = "zy_common::quic::duration_text",
        default = "default_server_validity"
    )]
    pub server_validity: Duration,
    /// Lab tests only: lowers the bounds above to 10 seconds, so that a test sees
    /// certificates renewed within a minute. Logged loudly at start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub short_validity_for_tests: bool,
}

/// The shortest validity `short_validity_for_tests` allows.
pub const TEST_MIN_VALIDITY: Duration = Duration::from_secs(10);

fn default_node_validity() -> Duration {
    tls::NODE_VALIDITY_DEFAULT
}

fn default_server_validity() -> Duration {
    tls::SERVER_VALIDITY_MAX
}

impl Default for CertConfig {
    fn default() -> Self {
        Self {
            node_validity: default_node_validity(),
            server_validity: default_server_validity(),
            short_validity_for_tests: false,
        }
    }
}

impl CertConfig {
    fn validate(&self) -> Result<(), String> {
        let day = Duration::from_secs(86_400);
        let (node_min, server_min) = match self.short_validity_for_tests {
            true => (TEST_MIN_VALIDITY, TEST_MIN_VALIDITY),
            false => (Duration::from_secs(3600), day),
        };
        let check = |key: &str, v: Duration, min: Duration, max: Duration| {
            if v < min || v > max {
                return Err(format!(
                    "key `{key}` is {}, not within {} to {}",
                    humantime::format_duration(v),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ));
            }
            Ok(())
        };
        check(
            "node_validity",
            self.node_validity,
            node_min,
            tls::NODE_VALIDITY_MAX,
        )?;
        check(
            "server_validity",
            self.server_validity,
            server_min,
            tls::SERVER_VALIDITY_MAX,
        )
    }
}

/// The settings of each zone's network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zones {
    #[serde(default, skip_serializing_if = "ZoneSettings::is_empty")]
    pub extranet: ZoneSettings,
    #[serde(default, skip_serializing_if = "ZoneSettings::is_empty")]
    pub intranet: ZoneSettings,
}

impl Zones {
    /// The settings of one zone.
    pub fn get(&self, zone: Zone) -> &ZoneSettings {
        match zone {
            Zone::Extranet => &self.extranet,
            Zone::Intranet => &self.intranet,
        }
    }

    fn is_empty(&self) -> bool {
        self.extranet.is_empty() && self.intranet.is_empty()
    }
}

/// What a zone's guests are told besides their address (`[zones.<zone>]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSettings {
    /// The default route's next hop: a host address of the zone's subnet, which VMs are
    /// then never given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Name servers (at most 3); one outside the zone's subnet needs the gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<Ipv4Addr>,
    /// DNS search domains (at most 6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

impl ZoneSettings {
    fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Checks the settings against the zone's network.
    pub fn validate(&self, zone: Zone) -> Result<(), String> {
        let net = crate::vms::zone_net(zone);
        let key = |k: &str| format!("key `zones.{zone}.{k}`");
        let subnet = format!("{}/{}", net.base, net.prefix);
        let inside = |ip: Ipv4Addr| {
            let mask = u32::MAX << (32 - u32::from(net.prefix));
            u32::from(ip) & mask == u32::from(net.base)
        };
        let broadcast = Ipv4Addr::from(u32::from(net.base) | (u32::MAX >> u32::from(net.prefix)));
        if let Some(gw) = self.gateway {
            if !inside(gw) {
                return Err(format!(
                    "{}: {gw} is outside the zone's subnet {subnet}",
                    key("gateway")
                ));
            }
            if gw == net.base || gw == broadcast {
                return Err(format!(
                    "{}: {gw} is the network or broadcast address of {subnet}",
                    key("gateway")
                ));
            }
        }
        if self.nameservers.len() > zy_common::guest::MAX_NAMESERVERS {
            return Err(format!(
                "{}: {} name servers, over the {} a resolver uses",
                key("nameservers"),
                self.nameservers.len(),
                zy_common::guest::MAX_NAMESERVERS
            ));
        }
        for (i, ns) in self.nameservers.iter().enumerate() {
            if ns.is_unspecified() || ns.is_broadcast() || ns.is_multicast() || ns.is_loopback() {
                return Err(format!(
                    "{}: {ns} cannot be a name server",
                    key("nameservers")
                ));
            }
            if inside(*ns) && (*ns == net.base || *ns == broadcast) {
                return Err(format!(
                    "{}: {ns} is the network or broadcast address of {subnet}",
                    key("nameservers")
                ));
            }
            if !inside(*ns) && self.gateway.is_none() {
                return Err(format!(
                    "{}: {ns} is outside the zone's subnet {subnet} and no gateway is set to reach it",
                    key("nameservers")
                ));
            }
            if self.nameservers[..i].contains(ns) {
                return Err(format!("{}: {ns} is listed twice", key("nameservers")));
            }
        }
        if self.search.len() > zy_common::guest::MAX_SEARCH {
            return Err(format!(
                "{}: {} domains, over {}",
                key("search"),
                self.search.len(),
                zy_common::guest::MAX_SEARCH
            ));
        }
        for d in &self.search {
            zy_common::guest::check_domain(d).map_err(|e| format!("{}: {e}", key("search")))?;
        }
        Ok(())
    }
}

fn default_max_joins() -> usize {
    64
}

fn default_true() -> bool {
    true
}

fn default_overcommit() -> f64 {
    zy_common::resources::MODEL.cpu_overcommit_milli as f64 / 1000.0
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            site: "site1".into(),
            daemon_listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            api_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            timings: Timings::default(),
            max_concurrent_joins: default_max_joins(),
            cpu_overcommit: default_overcommit(),
            n_plus_one: true,
            zones: Zones::default(),
            certs: CertConfig::default(),
            migration: MigrationConfig::default(),
            drain: DrainConfig::default(),
            power: None,
            consolidation: ConsolidationConfig::default(),
        }
    }
}

/// A config file that cannot be used; names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl CoordinatorConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks config text; `path` is for messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Checks the values the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        zy_common::ids::validate_name_of("site", &self.site)
            .map_err(|e| format!("key `site`: {e}"))?;
        self.timings
            .validate()
            .map_err(|e| format!("table `timings`: {e}"))?;
        if self.max_concurrent_joins == 0 || self.max_concurrent_joins > 10_000 {
            return Err("key `max_concurrent_joins` must be within 1..=10000".into());
        }
        self.certs
            .validate()
            .map_err(|e| format!("table `certs`: {e}"))?;
        self.migration
            .validate()
            .map_err(|e| format!("table `migration`: {e}"))?;
        if !(1..=MAX_DRAIN_PARALLEL).contains(&self.drain.parallel) {
            return Err(format!(
                "table `drain`: key `parallel` is {}, not within 1..={MAX_DRAIN_PARALLEL}",
                self.drain.parallel
            ));
        }
        if let Some(p) = &self.power {
            p.validate().map_err(|e| format!("table `power`: {e}"))?;
        }
        self.consolidation
            .validate()
            .map_err(|e| format!("table `consolidation`: {e}"))?;
        if !(1.0..=16.0).contains(&self.cpu_overcommit) {
            return Err(format!(
                "key `cpu_overcommit` is {}, not within 1.0..=16.0 vCPUs per host CPU",
                self.cpu_overcommit
            ));
        }
        for zone in Zone::ALL {
            self.zones.get(zone).validate(zone)?;
        }
        Ok(())
    }

    /// The resource model with this site's CPU overcommit.
    pub fn resource_model(&self) -> zy_common::resources::ResourceModel {
        zy_common::resources::ResourceModel {
            cpu_overcommit_milli: (self.cpu_overcommit * 1000.0).round() as u64,
            ..zy_common::resources::MODEL
        }
    }

    /// The packer's rules for this site: its CPU overcommit (memory and disk 1.0) and N+1.
    pub fn packer_policy(&self) -> zy_packer::Policy {
        zy_packer::Policy {
            overcommit: zy_packer::Overcommit([
                (self.cpu_overcommit * 1000.0).round() as u32,
                1000,
                1000,
            ]),
            n_plus_one: self.n_plus_one,
        }
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        let p = Path::new("/etc/zy/c.toml");
        let good = CoordinatorConfig::default().to_toml();
        assert_eq!(
            CoordinatorConfig::parse(p, &good).unwrap(),
            CoordinatorConfig::default()
        );
        let err = CoordinatorConfig::parse(p, &format!("{good}\nbogus = 1\n")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("c.toml") && msg.contains("bogus"), "{msg}");
        let bad = good.replace("down_after = \"8s\"", "down_after = \"1s\"");
        let msg = CoordinatorConfig::parse(p, &bad).unwrap_err().to_string();
        assert!(msg.contains("timings"), "{msg}");
        let bad = good.replace("\"site1\"", "\"Bad Site\"");
        assert!(CoordinatorConfig::parse(p, &bad).is_err());
    }

    #[test]
    fn drain_power_and_consolidation_keys_are_checked_and_named() {
        let p = Path::new("/etc/zy/c.toml");
        let base =
            "site = \"site1\"\ndaemon_listen = \"0.0.0.0:7400\"\napi_listen = \"0.0.0.0:7443\"";
        let with = |extra: &str| CoordinatorConfig::parse(p, &format!("{base}\n{extra}\n"));
        let power = "[power]\nstandby = [\"ipmitool\", \"-H\", \"{name}-bmc\", \"chassis\", \"power\", \"soft\"]\nwake = [\"ipmitool\", \"-H\", \"{name}-bmc\", \"chassis\", \"power\", \"on\"]";
        let c = with(power).unwrap();
        let pc = c.power.unwrap();
        assert_eq!(pc.timeout, Duration::from_secs(60));
        assert_eq!(pc.wake.last().unwrap(), "on");
        assert_eq!(c.drain.parallel, 1);
        assert_eq!(c.consolidation.max_moves, 10);
        assert_eq!(c.consolidation.every, None);
        let c = with("[consolidation]\nevery = \"1h\"\nspares = 2").unwrap();
        assert_eq!(c.consolidation.every, Some(Duration::from_secs(3600)));
        assert_eq!(c.consolidation.spares, 2);
        for (extra, key) in [
            ("[drain]\nparallel = 0", "parallel"),
            ("[drain]\nparallel = 17", "parallel"),
            ("[power]\nstandby = []\nwake = [\"x\"]", "standby"),
            (
                "[power]\nstandby = [\"x\"]\nwake = [\"x\"]\ntimeout = \"0s\"",
                "timeout",
            ),
            (
                "[power]\nstandby = [\"x\"]\nwake = [\"x\"]\nshell = true",
                "shell",
            ),
            ("[consolidation]\nmax_moves = 0", "max_moves"),
            ("[consolidation]\nmin_gain = 2.0", "min_gain"),
            ("[consolidation]\nhigh_water = 0.0", "high_water"),
            ("[consolidation]\nhigh_water = 11.0", "high_water"),
            ("[consolidation]\nspares = 5000", "spares"),
            ("[consolidation]\nevery = \"1s\"", "every"),
            ("[consolidation]\nevery = \"soon\"", "every"),
            ("[consolidation]\nload_window = \"1s\"", "load_window"),
        ] {
            let msg = with(extra).unwrap_err().to_string();
            assert!(
                msg.contains(key) && msg.contains("c.toml"),
                "{extra}: {msg}"
            );
        }
    }

    #[test]
    fn zone_settings_are_empty_by_default_and_checked_against_the_zone() {
        let p = Path::new("/etc/zy/c.toml");
        let good = CoordinatorConfig::default().to_toml();
        assert!(!good.contains("zones"), "{good}");
        let with = |zones: &str| CoordinatorConfig::parse(p, &format!("{good}\n{zones}"));
        let cfg = with(
            "[zones.intranet]\ngateway = \"10.220.0.1\"\nnameservers = [\"10.220.0.1\", \"192.0.2.53\"]\nsearch = [\"hz-a.gov.internal\"]\n",
        )
        .unwrap();
        let z = cfg.zones.get(Zone::Intranet);
        assert_eq!(z.gateway, Some(Ipv4Addr::new(10, 220, 0, 1)));
        assert_eq!(z.nameservers.len(), 2);
        assert!(cfg.zones.get(Zone::Extranet).is_empty());
        // What is written is read back the same.
        assert_eq!(CoordinatorConfig::parse(p, &cfg.to_toml()).unwrap(), cfg);
        for (zones, want) in [
            ("[zones.intranet]\ngateway = \"10.210.0.1\"\n", "zones.intranet.gateway`: 10.210.0.1 is outside the zone's subnet 10.220.0.0/16"),
            ("[zones.extranet]\ngateway = \"10.210.255.255\"\n", "network or broadcast"),
            ("[zones.extranet]\ngateway = \"10.210.0.0\"\n", "network or broadcast"),
            ("[zones.intranet]\nnameservers = [\"192.0.2.53\"]\n", "no gateway is set"),
            ("[zones.intranet]\nnameservers = [\"127.0.0.53\"]\n", "cannot be a name server"),
            ("[zones.intranet]\nnameservers = [\"10.220.0.9\", \"10.220.0.9\"]\n", "listed twice"),
            ("[zones.intranet]\nnameservers = [\"10.220.0.9\", \"10.220.0.8\", \"10.220.0.7\", \"10.220.0.6\"]\n", "4 name servers"),
            ("[zones.intranet]\nsearch = [\"bad domain\"]\n", "zones.intranet.search`: `bad domain` is not a domain name"),
            ("[zones.intranet]\ngateway = \"nonsense\"\n", "gateway"),
            ("[zones.intranet]\nrouter = \"10.220.0.1\"\n", "router"),
            ("[zones.dmz]\ngateway = \"10.220.0.1\"\n", "dmz"),
        ] {
            let msg = with(zones).unwrap_err().to_string();
            assert!(msg.contains("c.toml") && msg.contains(want), "{zones}: {msg}");
        }
    }

    #[test]
    fn certificate_lifetimes_are_bounded_and_only_tests_go_below_an_hour() {
        let p = Path::new("c.toml");
        let base = "site = \"s\"\ndaemon_listen = \"0.0.0.0:1\"\napi_listen = \"0.0.0.0:2\"\n";
        let cfg = CoordinatorConfig::parse(p, base).unwrap();
        assert_eq!(cfg.certs, CertConfig::default());
        let with = |certs: &str| CoordinatorConfig::parse(p, &format!("{base}[certs]\n{certs}"));
        assert_eq!(
            with("node_validity = \"30d\"").unwrap().certs.node_validity,
            Duration::from_secs(30 * 86_400)
        );
        for bad in [
            "node_validity = \"30s\"",
            "node_validity = \"400d\"",
            "server_validity = \"398d\"",
            "server_validity = \"825d\"",
            "server_validity = \"1h\"",
        ] {
            let msg = with(bad).unwrap_err().to_string();
            assert!(
                msg.contains("certs") && msg.contains("validity"),
                "{bad}: {msg}"
            );
        }
        let short = with(
            "node_validity = \"30s\"\nserver_validity = \"1m\"\nshort_validity_for_tests = true",
        )
        .unwrap();
        assert_eq!(short.certs.node_validity, Duration::from_secs(30));
        assert!(with("node_validity = \"5s\"\nshort_validity_for_tests = true").is_err());
        // The test switch is not written out unless set.
        assert!(!CoordinatorConfig::default()
            .to_toml()
            .contains("short_validity"));
    }
}
