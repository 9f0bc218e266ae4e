//! The coordinator's configuration: a TOML file in its state directory, flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zy_common::quic::Timings;
use zy_common::tls;

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
    /// Certificate lifetimes.
    #[serde(default)]
    pub certs: CertConfig,
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

fn default_max_joins() -> usize {
    64
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
            certs: CertConfig::default(),
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
        zy_common::ids::validate_name(&self.site).map_err(|e| format!("key `site`: {e}"))?;
        self.timings
            .validate()
            .map_err(|e| format!("table `timings`: {e}"))?;
        if self.max_concurrent_joins == 0 || self.max_concurrent_joins > 10_000 {
            return Err("key `max_concurrent_joins` must be within 1..=10000".into());
        }
        self.certs
            .validate()
            .map_err(|e| format!("table `certs`: {e}"))?;
        if !(1.0..=16.0).contains(&self.cpu_overcommit) {
            return Err(format!(
                "key `cpu_overcommit` is {}, not within 1.0..=16.0 vCPUs per host CPU",
                self.cpu_overcommit
            ));
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
