//! The node's identity on disk, written once by `zy-agent join`:
//!
//! ```text
//! <data_dir>/identity/      0700
//!   node.key                the node's private key (0600), generated here, never sent
//!   node.crt                the node certificate the coordinator signed
//!                           (key and certificate are replaced as a pair at every renewal,
//!                           `*.next` while that happens)
//!   ca.crt                  the site CA, as pinned by the bootstrap token
//!   node.toml               node id, name, zone, coordinator address
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use zy_common::ids::{NodeId, Zone};
use zy_common::tls::{self, CertInfo, NodeIdentity};

/// What `node.toml` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub node_id: NodeId,
    pub name: String,
    pub zone: Zone,
    pub coordinator: String,
}

/// A loaded identity, ready for TLS. Its key and certificate can be replaced while the agent
/// runs (a renewal): each connection takes the pair current when it starts.
#[derive(Debug)]
pub struct Identity {
    pub node: NodeFile,
    pub ca: CertificateDer<'static>,
    dir: IdentityDir,
    creds: RwLock<Arc<Creds>>,
}

/// The node's key and certificate, and what the certificate says.
#[derive(Debug)]
pub struct Creds {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub info: CertInfo,
}

impl Identity {
    /// The key and certificate to connect with now.
    pub fn creds(&self) -> Arc<Creds> {
        self.creds.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a renewed certificate for a new key: checks that it names this node and fits
    /// the key, writes both as a pair (a crash leaves the old pair or the new one), and
    /// connects with them from the next connection on.
    pub fn install(
        &self,
        key_pem: &str,
        cert: CertificateDer<'static>,
    ) -> Result<CertInfo, IdentityError> {
        let invalid = |message: String| IdentityError::Invalid {
            path: self.dir.cert(),
            message,
        };
        let who = NodeIdentity::from_cert(&cert)?;
        if who.node_id != self.node.node_id || who.zone != self.node.zone {
            return Err(invalid(format!(
                "the renewed certificate names node {} in {}, this is {} in {}",
                who.node_id, who.zone, self.node.node_id, self.node.zone
            )));
        }
        let key = tls::key_from_pem("node key", key_pem)?;
        let chain = vec![cert];
        // The same check a TLS handshake makes, before anything is written.
        tls::daemon_client_config(&self.ca, chain.clone(), key.clone_key())?;
        let info = CertInfo::parse(&chain[0])?;
        zy_common::files::replace_pair(
            &self.dir.key(),
            key_pem.as_bytes(),
            &self.dir.cert(),
            tls::pem_cert(&chain[0]).as_bytes(),
        )
        .map_err(|source| IdentityError::Write {
            path: self.dir.cert(),
            source,
        })?;
        *self.creds.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Creds {
            chain,
            key,
            info: info.clone(),
        });
        Ok(info)
    }

    /// Where the identity lives.
    pub fn dir(&self) -> &Path {
        &self.dir.dir
    }
}

/// Why the identity could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this node is not enrolled ({0} has no identity): run `zy-agent join <coordinator> <token>` first")]
    NotEnrolled(PathBuf),
    #[error("this node is already enrolled as {name} ({id}); to enroll it again, remove it with `zy node remove {name}` and delete {dir}")]
    AlreadyEnrolled {
        name: String,
        id: NodeId,
        dir: PathBuf,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path} holds a private key but others can read it (mode {mode:o}); chmod 600 it")]
    LooseKey { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Paths of the identity files.
#[derive(Debug, Clone)]
pub struct IdentityDir {
    pub dir: PathBuf,
}

impl IdentityDir {
    /// The identity directory under a data directory.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("identity"),
        }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn node(&self) -> PathBuf {
        self.dir.join("node.toml")
    }

    /// Refuses to enroll twice.
    pub fn ensure_not_enrolled(&self) -> Result<(), IdentityError> {
        if self.node().exists() {
            let node = self.read_node()?;
            return Err(IdentityError::AlreadyEnrolled {
                name: node.name,
                id: node.node_id,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    fn read_node(&self) -> Result<NodeFile, IdentityError> {
        let path = self.node();
        let text = std::fs::read_to_string(&path).map_err(|source| IdentityError::Read {
            path: path.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| IdentityError::Invalid {
            path,
            message: e.to_string(),
        })
    }

    /// Loads the identity and checks that the certificate matches node.toml.
    pub fn load(&self) -> Result<Identity, IdentityError> {
        if !self.node().exists() {
            return Err(IdentityError::NotEnrolled(self.dir.clone()));
        }
        let node = self.read_node()?;
        zy_common::files::recover_pair(&self.key(), &self.cert()).map_err(|source| {
            IdentityError::Write {
                path: self.cert(),
                source,
            }
        })?;
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path).map_err(|source| IdentityError::Read { path, source })
        };
        let key_path = self.key();
        let mode = std::fs::metadata(&key_path)
            .map_err(|source| IdentityError::Read {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::LooseKey {
                path: key_path,
                mode,
            });
        }
        let key = tls::key_from_pem("node key", &read(key_path)?)?;
        let chain = tls::certs_from_pem("node certificate", &read(self.cert())?)?;
        let ca = tls::certs_from_pem("CA certificate", &read(self.ca())?)?.remove(0);
        let who = NodeIdentity::from_cert(&chain[0])?;
        if who.node_id != node.node_id || who.zone != node.zone {
            return Err(IdentityError::Invalid {
                path: self.cert(),
                message: format!(
                    "certificate names node {} in {}, node.toml says {} in {}",
                    who.node_id, who.zone, node.node_id, node.zone
                ),
            });
        }
        let info = CertInfo::parse(&chain[0])?;
        Ok(Identity {
            node,
            ca,
            dir: self.clone(),
            creds: RwLock::new(Arc::new(Creds { chain, key, info })),
        })
    }

    /// Writes a fresh identity: key first, node.toml last (its presence marks a finished
    /// enrollment).
    pub fn store(
        &self,
        node: &NodeFile,
        key_pem: &str,
        cert: &CertificateDer<'_>,
        ca: &CertificateDer<'_>,
    ) -> Result<(), IdentityError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| IdentityError::Write {
            path: self.dir.clone(),
            source,
        })?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| IdentityError::Write {
                path: self.dir.clone(),
                source,
            },
        )?;
        write_file(&self.key(), key_pem.as_bytes(), 0o600)?;
        write_file(&self.cert(), tls::pem_cert(cert).as_bytes(), 0o644)?;
        write_file(&self.ca(), tls::pem_cert(ca).as_bytes(), 0o644)?;
        let text = toml::to_string_pretty(node).map_err(|e| IdentityError::Invalid {
            path: self.node(),
            message: e.to_string(),
        })?;
        write_file(&self.node(), text.as_bytes(), 0o644)
    }
}

/// Writes a state file atomically with `mode` from its creation.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    zy_common::files::write_atomic(path, bytes, mode).map_err(|source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    })
}
