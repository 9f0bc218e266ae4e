//! Typed identifiers and the zone boundary.
//!
//! Every id is its own type so that a node id can never be passed where a token id is
//! expected. Zones are an enum, not a string: the extranet and the intranet must never mix,
//! and the type system is the first place that keeps them apart.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The identity of an enrolled node. It is minted by the coordinator at enrollment and
/// written into the node's certificate, so it cannot be claimed by anyone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub Uuid);

impl NodeId {
    /// A fresh random node id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The 16 bytes used as a store key.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The id back from its store key.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::BadNodeId(truncate_for_error(s)))
    }
}

/// The identity of a VM, minted by the coordinator when the VM is asked for. It names the
/// VM's QEMU process (`-uuid`), its files on the node and its records everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId(pub Uuid);

impl VmId {
    /// A fresh random VM id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for VmId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::BadVmId(truncate_for_error(s)))
    }
}

/// The identity of one live migration of a VM from one node to another, minted by the
/// coordinator when it records the operation. Both nodes key their side of the migration by
/// it, so that a repeated command finds the migration it started instead of a second one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MigrationId(pub Uuid);

impl MigrationId {
    /// A fresh random migration id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MigrationId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::BadMigrationId(truncate_for_error(s)))
    }
}

/// The public half of a bootstrap token: names the token in listings and revocations.
/// The secret half is never stored, only its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub [u8; 8]);

impl TokenId {
    /// A fresh random token id.
    pub fn new_random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for TokenId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = crate::token::hex_decode::<8>(s)
            .ok_or_else(|| IdError::BadTokenId(truncate_for_error(s)))?;
        Ok(Self(bytes))
    }
}

/// One of the two clouds. A node, a VM, a network and a replication stream belong to
/// exactly one zone, and nothing ever crosses from one to the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    /// The government extranet and the internet: portals, online approval, licences.
    Extranet,
    /// The internal network: document flow, office automation, video conferencing.
    Intranet,
}

impl Zone {
    /// Both zones, for listings and tests.
    pub const ALL: [Zone; 2] = [Zone::Extranet, Zone::Intranet];

    /// The lower-case name used in the CLI, the API and certificates.
    pub fn as_str(&self) -> &'static str {
        match self {
            Zone::Extranet => "extranet",
            Zone::Intranet => "intranet",
        }
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Zone {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "extranet" => Ok(Zone::Extranet),
            "intranet" => Ok(Zone::Intranet),
            other => Err(IdError::BadZone(truncate_for_error(other))),
        }
    }
}

/// A malformed id or zone name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("`{0}` is not a node id (expected a UUID such as 0f8e6c1a-...)")]
    BadNodeId(String),
    #[error("`{0}` is not a VM id (expected a UUID)")]
    BadVmId(String),
    #[error("`{0}` is not a migration id (expected a UUID)")]
    BadMigrationId(String),
    #[error("`{0}` is not a token id (expected 16 hex digits)")]
    BadTokenId(String),
    #[error("unknown zone `{0}`: the zones are `extranet` and `intranet`")]
    BadZone(String),
    #[error("bad {what} name `{name}`: use 1 to 63 characters of a-z, 0-9 and `-`, starting and ending with a letter or digit")]
    BadName { what: &'static str, name: String },
}

/// Keeps error messages short when someone passes a megabyte of garbage.
pub fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

/// Checks a node name: a DNS label, so it can be used in host names and unit names.
pub fn validate_name(name: &str) -> Result<(), IdError> {
    validate_name_of("node", name)
}

/// Checks the name of a `what` (node, VM, image, site): a DNS label, so it can be used in
/// host names and unit names. The error names the `what`.
pub fn validate_name_of(what: &'static str, name: &str) -> Result<(), IdError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(IdError::BadName {
            what,
            name: truncate_for_error(name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_round_trips_and_rejects_others() {
        for z in Zone::ALL {
            assert_eq!(z.as_str().parse::<Zone>().unwrap(), z);
        }
        let err = "Intranet".parse::<Zone>().unwrap_err();
        assert!(err.to_string().contains("extranet"));
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(validate_name("node-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_parse_and_print() {
        let n = NodeId::new_random();
        assert_eq!(n.to_string().parse::<NodeId>().unwrap(), n);
        let t = TokenId::new_random();
        assert_eq!(t.to_string().parse::<TokenId>().unwrap(), t);
        assert!("zz".parse::<TokenId>().is_err());
        assert!(truncate_for_error(&"é".repeat(100)).ends_with("..."));
    }
}
