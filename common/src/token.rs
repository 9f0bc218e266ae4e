//! Bootstrap tokens (enroll one node) and API tokens (drive the HTTP API).
//!
//! ```text
//! bootstrap:  zyj1-<token id: 16 hex>-<secret: 32 hex>-<CA fingerprint: 64 hex>
//! API:        zya1-<token id: 16 hex>-<secret: 32 hex>
//! ```
//!
//! The id names the token in listings; the secret is 128 random bits that the coordinator
//! never stores, only its BLAKE3 hash; the fingerprint lets a new node trust the coordinator
//! before it has any certificate. The two kinds have different prefixes so one can never be
//! used as the other.

use std::fmt;
use std::str::FromStr;

use crate::ids::TokenId;
use crate::tls::CaFingerprint;

const BOOTSTRAP_PREFIX: &str = "zyj1";
const API_PREFIX: &str = "zya1";

/// A token that failed to parse. The message never echoes the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not a Zhengyun bootstrap token (expected zyj1-<id>-<secret>-<fingerprint>, as printed by `zy token create`)")]
    NotBootstrap,
    #[error("not a Zhengyun API token (expected zya1-<id>-<secret>)")]
    NotApi,
}

/// The secret half of a token, compared only through its hash.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub [u8; 16]);

impl Secret {
    /// A fresh random secret.
    pub fn new_random() -> Self {
        Self(rand::random())
    }

    /// What the coordinator stores.
    pub fn hash(&self) -> SecretHash {
        SecretHash(*blake3::hash(&self.0).as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The stored hash of a secret. Equality is constant-time.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct SecretHash(pub [u8; 32]);

impl PartialEq for SecretHash {
    fn eq(&self, other: &Self) -> bool {
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}
impl Eq for SecretHash {}

/// A one-time token that enrolls one node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: TokenId,
    pub secret: Secret,
    pub ca: CaFingerprint,
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{BOOTSTRAP_PREFIX}-{}-{}-{}",
            self.id,
            hex(&self.secret.0),
            self.ca
        )
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}, <secret>, ca {})", self.id, self.ca)
    }
}

impl FromStr for BootstrapToken {
    type Err = TokenFormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        let (Some(BOOTSTRAP_PREFIX), Some(id), Some(secret), Some(fp), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenFormatError::NotBootstrap);
        };
        Ok(Self {
            id: TokenId(hex_decode(id).ok_or(TokenFormatError::NotBootstrap)?),
            secret: Secret(hex_decode(secret).ok_or(TokenFormatError::NotBootstrap)?),
            ca: CaFingerprint(hex_decode(fp).ok_or(TokenFormatError::NotBootstrap)?),
        })
    }
}

/// A bearer token for the HTTP API.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ApiToken {
    pub id: TokenId,
    pub secret: Secret,
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{API_PREFIX}-{}-{}", self.id, hex(&self.secret.0))
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken({}, <secret>)", self.id)
    }
}

impl FromStr for ApiToken {
    type Err = TokenFormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        let (Some(API_PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenFormatError::NotApi);
        };
        Ok(Self {
            id: TokenId(hex_decode(id).ok_or(TokenFormatError::NotApi)?),
            secret: Secret(hex_decode(secret).ok_or(TokenFormatError::NotApi)?),
        })
    }
}

/// Lower-case hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Exactly `N` bytes from `2N` hex digits, or `None`.
pub fn hex_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_round_trip_and_do_not_mix() {
        let b = BootstrapToken {
            id: TokenId::new_random(),
            secret: Secret::new_random(),
            ca: CaFingerprint([7; 32]),
        };
        let s = b.to_string();
        assert_eq!(s.parse::<BootstrapToken>().unwrap(), b);
        assert!(s.parse::<ApiToken>().is_err());
        assert!(!format!("{b:?}").contains(&hex(&b.secret.0)));
        let a = ApiToken {
            id: TokenId::new_random(),
            secret: Secret::new_random(),
        };
        assert_eq!(a.to_string().parse::<ApiToken>().unwrap(), a);
        assert!(a.to_string().parse::<BootstrapToken>().is_err());
        assert_eq!(a.secret.hash(), a.secret.hash());
        assert_ne!(a.secret.hash(), Secret::new_random().hash());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = s.parse::<BootstrapToken>();
            let _ = s.parse::<ApiToken>();
        }
    }
}
