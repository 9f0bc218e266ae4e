//! The agent's configuration: a TOML file (unknown keys rejected), flags on top.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default location of the agent's state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/zhengyun/agent";
/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/zhengyun/agent.toml";

/// Which accelerator VMs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM where the CPU has vmx/svm and `/dev/kvm` works, TCG otherwise.
    #[default]
    Auto,
    /// KVM or refuse to start.
    Kvm,
    /// Always software emulation.
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            o => Err(format!("unknown accelerator `{o}`: use auto, kvm or tcg")),
        }
    }
}

/// Who runs the QEMU processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SupervisorChoice {
    /// systemd transient units where the host was booted with systemd and its bus answers,
    /// the agent itself otherwise.
    #[default]
    Auto,
    /// systemd or refuse to start.
    Systemd,
    /// The agent itself, limits through cgroups.
    Direct,
}

/// Everything `zy-agent run` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the node's identity and (later) its disks live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The coordinator's daemon address (host:port); overrides the one recorded at join.
    #[serde(default)]
    pub coordinator: Option<String>,
    #[serde(default)]
    pub accel: AccelChoice,
    #[serde(default)]
    pub supervisor: SupervisorChoice,
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    /// The longest wait between reconnection attempts.
    #[serde(
        default = "default_max_backoff",
        with = "zy_common::quic::duration_text"
    )]
    pub max_backoff: Duration,
    /// QUIC idle timeout on the agent's side; the smaller of both sides' applies.
    #[serde(default = "default_idle", with = "zy_common::quic::duration_text")]
    pub idle_timeout: Duration,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}
fn default_qemu() -> PathBuf {
    PathBuf::from("/usr/bin/qemu-system-x86_64")
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_idle() -> Duration {
    zy_common::quic::Timings::default().idle_timeout
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            coordinator: None,
            accel: AccelChoice::Auto,
            supervisor: SupervisorChoice::Auto,
            qemu: default_qemu(),
            max_backoff: default_max_backoff(),
            idle_timeout: default_idle(),
        }
    }
}

/// A config that cannot be used.
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
}

impl AgentConfig {
    /// Reads a config file. A missing file at the default path means defaults; a missing
    /// file that was asked for by name is an error.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is for messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Checks the values the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.max_backoff) {
            return Err("key `max_backoff` must be within 1s..=1h".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.idle_timeout) {
            return Err("key `idle_timeout` must be within 1s..=10m".into());
        }
        if !self.data_dir.is_absolute() {
            return Err("key `data_dir` must be an absolute path".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_rejects_unknown_keys() {
        let p = Path::new("agent.toml");
        assert_eq!(AgentConfig::parse(p, "").unwrap(), AgentConfig::default());
        let c = AgentConfig::parse(p, "accel = \"tcg\"\nmax_backoff = \"5s\"\n").unwrap();
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.max_backoff, Duration::from_secs(5));
        let e = AgentConfig::parse(p, "acel = \"tcg\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.toml") && e.contains("acel"), "{e}");
        assert!(AgentConfig::parse(p, "accel = \"fast\"\n").is_err());
        let c = AgentConfig::parse(p, "supervisor = \"systemd\"\n").unwrap();
        assert_eq!(c.supervisor, SupervisorChoice::Systemd);
        assert!(AgentConfig::parse(p, "supervisor = \"init\"\n").is_err());
        assert!(AgentConfig::parse(p, "max_backoff = \"0s\"\n").is_err());
        assert!(AgentConfig::parse(p, "data_dir = \"rel\"\n").is_err());
        assert!(AgentConfig::load(Path::new("/nonexistent/agent.toml"), false).is_ok());
        assert!(AgentConfig::load(Path::new("/nonexistent/agent.toml"), true).is_err());
    }
}
