//! The coordinator's configuration: a TOML file in its state directory, flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zy_common::quic::Timings;

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
}
