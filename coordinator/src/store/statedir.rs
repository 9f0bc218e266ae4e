//! The coordinator's state directory: what `zy-coordinator init` creates and `run` reads.
//!
//! ```text
//! <state>/                  0700
//!   coordinator.toml        the daemon's config
//!   ca.crt  ca.key          the site CA (key 0600)
//!   server.crt server.key   the coordinator's certificate chain and key (key 0600),
//!                           replaced as a pair on renewal (`*.next` while that happens)
//!   zy.redb                 the store
//!   zy.toml                 a CLI config with the admin API token (0600)
//!   blobs/<blake3>          image files, named by the hash of their content
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zy_common::ids::TokenId;
use zy_common::tls::{PemPair, SiteCa};
use zy_common::token::{ApiToken, Secret};

use crate::config::{CoordinatorConfig, CONFIG_FILE};
use crate::store::{ApiTokenRecord, Store, StoreError};

/// Paths inside a state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
}

/// Why a state directory could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("{0} is already initialised (it holds a CA); refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    #[error("{0} is not initialised: run `zy-coordinator init --state-dir {0}` first")]
    NotInitialised(PathBuf),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by others (mode {mode:o}); it holds a private key and must be 0600"
    )]
    LooseKey { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Tls(#[from] zy_common::tls::TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `init` hands back to print.
#[derive(Debug)]
pub struct InitOutcome {
    pub admin_token: ApiToken,
    pub cli_config: PathBuf,
    pub ca_fingerprint: String,
}

impl StateDir {
    /// A state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    pub fn store(&self) -> PathBuf {
        self.root.join("zy.redb")
    }
    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }
    pub fn cli_config(&self) -> PathBuf {
        self.root.join("zy.toml")
    }

    /// Creates a new state directory: CA, server certificate, store, admin token.
    /// `api_address` is what the CLI config will point at; its host joins the server
    /// certificate's names (an IP address as an IP SAN), so that any TLS client that trusts
    /// the CA can reach the API at that address.
    pub fn init(
        &self,
        config: &CoordinatorConfig,
        extra_names: &[String],
        api_address: &str,
    ) -> Result<InitOutcome, StateDirError> {
        if self.ca_key().exists() || self.ca_cert().exists() {
            return Err(StateDirError::AlreadyInitialised(self.root.clone()));
        }
        std::fs::create_dir_all(&self.root).map_err(|source| StateDirError::Write {
            path: self.root.clone(),
            source,
        })?;
        set_mode(&self.root, 0o700)?;
        let (ca, ca_pem) = SiteCa::generate(&config.site)?;
        let mut names = extra_names.to_vec();
        names.extend(host_of(api_address));
        let server = ca.issue_server(&names, config.certs.server_validity)?;
        // Keys first, each created 0600 before a byte is written.
        write_file(&self.ca_key(), ca_pem.key_pem.as_bytes(), 0o600)?;
        write_file(&self.server_key(), server.key_pem.as_bytes(), 0o600)?;
        write_file(&self.server_cert(), server.cert_pem.as_bytes(), 0o644)?;
        write_file(&self.config(), config.to_toml().as_bytes(), 0o644)?;

        let store = Store::open(&self.store())?;
        let token = ApiToken {
            id: TokenId::new_random(),
            secret: Secret::new_random(),
        };
        store.insert_api_token(&ApiTokenRecord {
            id: token.id,
            secret_hash: token.secret.hash(),
            name: "admin".into(),
            created_at_ms: zy_common::time::now_millis(),
            created_by: None,
            expires_at_ms: None,
            revoked_at_ms: None,
            last_used_ms: None,
        })?;
        let cli = format!(
            "# Written by zy-coordinator init. Holds the admin API token: keep it 0600.\n\
             coordinator = \"{api_address}\"\n\
             token = \"{token}\"\n\
             ca = \"{}\"\n",
            self.ca_cert().display()
        );
        write_file(&self.cli_config(), cli.as_bytes(), 0o600)?;
        // The CA certificate last: its presence marks a finished init.
        write_file(&self.ca_cert(), ca_pem.cert_pem.as_bytes(), 0o644)?;
        Ok(InitOutcome {
            admin_token: token,
            cli_config: self.cli_config(),
            ca_fingerprint: ca.fingerprint().to_string(),
        })
    }

    /// Loads the CA, refusing keys that others can read.
    pub fn load_ca(&self) -> Result<SiteCa, StateDirError> {
        if !self.ca_cert().exists() {
            return Err(StateDirError::NotInitialised(self.root.clone()));
        }
        Ok(SiteCa::from_pem(&PemPair {
            cert_pem: read(&self.ca_cert())?,
            key_pem: read_key(&self.ca_key())?,
        })?)
    }

    /// The server certificate chain and key; a renewal that a crash cut short is first
    /// finished or undone.
    pub fn load_server(&self) -> Result<PemPair, StateDirError> {
        zy_common::files::recover_pair(&self.server_key(), &self.server_cert()).map_err(
            |source| StateDirError::Write {
                path: self.server_cert(),
                source,
            },
        )?;
        Ok(PemPair {
            cert_pem: read(&self.server_cert())?,
            key_pem: read_key(&self.server_key())?,
        })
    }
}

impl StateDir {
    /// Replaces the server certificate and key, as a pair (see
    /// [`zy_common::files::replace_pair`]).
    pub fn store_server(&self, pair: &PemPair) -> Result<(), StateDirError> {
        zy_common::files::replace_pair(
            &self.server_key(),
            pair.key_pem.as_bytes(),
            &self.server_cert(),
            pair.cert_pem.as_bytes(),
        )
        .map_err(|source| StateDirError::Write {
            path: self.server_cert(),
            source,
        })
    }

    /// The host the CLI config reaches the API at (`coordinator` in `zy.toml`), if it can
    /// be read: what the server certificate must name.
    pub fn advertised_host(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.cli_config()).ok()?;
        let v: toml::Table = toml::from_str(&text).ok()?;
        host_of(v.get("coordinator")?.as_str()?)
    }
}

/// The host of `host:port` (`[v6]:port` too), or of a bare host.
pub fn host_of(address: &str) -> Option<String> {
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_string());
    }
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        return Some(ip.to_string());
    }
    let host = match address.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => address,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

fn read(path: &Path) -> Result<String, StateDirError> {
    std::fs::read_to_string(path).map_err(|source| StateDirError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_key(path: &Path) -> Result<String, StateDirError> {
    let meta = std::fs::metadata(path).map_err(|source| StateDirError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StateDirError::LooseKey {
            path: path.to_path_buf(),
            mode,
        });
    }
    read(path)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StateDirError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        StateDirError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes a state file atomically with `mode` from its creation.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateDirError> {
    zy_common::files::write_atomic(path, bytes, mode).map_err(|source| StateDirError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_private_keys_and_refuses_twice() {
        let dir = std::env::temp_dir().join(format!("zy-sd-{}", rand::random::<u64>()));
        let sd = StateDir::new(&dir);
        let out = sd
            .init(&CoordinatorConfig::default(), &[], "127.0.0.1:7443")
            .unwrap();
        assert_eq!(out.ca_fingerprint.len(), 64);
        for key in [sd.ca_key(), sd.server_key(), sd.cli_config()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(matches!(
            sd.init(&CoordinatorConfig::default(), &[], "x"),
            Err(StateDirError::AlreadyInitialised(_))
        ));
        sd.load_ca().unwrap();
        // The advertised address is an IP SAN of the server certificate, within the limit.
        let chain =
            zy_common::tls::certs_from_pem("s", &sd.load_server().unwrap().cert_pem).unwrap();
        let info = zy_common::tls::CertInfo::parse(&chain[0]).unwrap();
        assert!(
            info.sans.iter().any(|s| s == "127.0.0.1"),
            "{:?}",
            info.sans
        );
        assert!(info.validity_ms() <= zy_common::tls::SERVER_VALIDITY_MAX.as_millis() as u64);
        assert_eq!(sd.advertised_host().as_deref(), Some("127.0.0.1"));
        std::fs::set_permissions(sd.ca_key(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(sd.load_ca(), Err(StateDirError::LooseKey { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.10:7443").as_deref(), Some("10.0.0.10"));
        assert_eq!(host_of("[::1]:7443").as_deref(), Some("::1"));
        assert_eq!(host_of("coord.gov:7443").as_deref(), Some("coord.gov"));
        assert_eq!(host_of("coord.gov").as_deref(), Some("coord.gov"));
        assert_eq!(host_of(":7443"), None);
    }
}
