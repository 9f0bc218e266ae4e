//! What a VM's owner hands its guest: SSH public keys and a `#cloud-config` user-data
//! document, and the zone's name servers and search domains. These cross the API, the
//! store, the wire and the node's records, so they are checked here, once, in the words
//! every side uses.
//!
//! A key is an OpenSSH public key line (`type base64 [comment]`) whose body really is a key
//! of the type it names: the base64 decodes, the blob's own type field matches, its fields
//! have the sizes of that key type, and an RSA modulus has at least [`MIN_RSA_BITS`] bits.
//! Only the comment is free text, and only of [`COMMENT_CHARS`]. A key is kept in one
//! normal form (single spaces), so it can be written into YAML or `authorized_keys`
//! without quoting surprises.
//!
//! User-data is checked here for its shape (size, the `#cloud-config` line, no control
//! characters); that it is a YAML mapping is checked by the coordinator, the one place
//! that accepts it from outside (the agent writes it verbatim into the guest's seed).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The most SSH keys one VM takes.
pub const MAX_SSH_KEYS: usize = 32;
/// The longest key line (an RSA key of 16384 bits is about 2.8 KB).
pub const MAX_SSH_KEY_LEN: usize = 4096;
/// The most bytes of keys one VM takes, all lines together.
pub const MAX_SSH_KEYS_TOTAL: usize = 16 * 1024;
/// The longest key comment.
pub const MAX_COMMENT: usize = 256;
/// The smallest RSA modulus accepted (OpenSSH refuses under 1024; NIST retired 1024).
pub const MIN_RSA_BITS: usize = 2048;
/// The characters a key's comment may hold, besides ASCII letters and digits.
pub const COMMENT_CHARS: &str = " .@_+-:=/,()";
/// The largest user-data document (what omicron and most clouds allow).
pub const MAX_USER_DATA: usize = 32 * 1024;
/// The line a user-data document must start with.
pub const CLOUD_CONFIG: &str = "#cloud-config";
/// The most name servers a zone gives its guests (the resolver uses three).
pub const MAX_NAMESERVERS: usize = 3;
/// The most search domains a zone gives its guests.
pub const MAX_SEARCH: usize = 6;

/// The key types accepted, as their lines name them.
pub const KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Why a key, a user-data document or a zone setting was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes, over {max}")]
    TooLong { len: usize, max: usize },
    #[error("holds a line break or another control character: give one key per entry")]
    ControlCharacter,
    #[error("is not `type base64 [comment]`")]
    Shape,
    #[error("has key type `{0}`, which is not accepted (accepted: {types})", types = KEY_TYPES.join(", "))]
    KeyType(String),
    #[error("has a body that is not valid base64")]
    Base64,
    #[error("has a body that is not a {key_type} key: {why}")]
    Body { key_type: String, why: &'static str },
    #[error("is an RSA key of {0} bits, too weak (at least {MIN_RSA_BITS})")]
    WeakRsa(usize),
    #[error(
        "has a comment with characters other than ASCII letters, digits and `{COMMENT_CHARS}`"
    )]
    Comment,
    #[error("does not start with a `{CLOUD_CONFIG}` line (only cloud-config user-data is taken)")]
    NotCloudConfig,
    #[error("holds control characters other than tab and line breaks")]
    UserDataControl,
    #[error("`{0}` is not a domain name")]
    Domain(String),
}

/// An OpenSSH public key line, checked and in normal form: `type base64[ comment]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SshKey(String);

impl SshKey {
    /// Checks a public key line and puts it in normal form.
    pub fn parse(line: &str) -> Result<Self, GuestError> {
        let line = line.trim_matches(|c| c == ' ' || c == '\t');
        if line.is_empty() {
            return Err(GuestError::Empty);
        }
        if line.len() > MAX_SSH_KEY_LEN {
            return Err(GuestError::TooLong {
                len: line.len(),
                max: MAX_SSH_KEY_LEN,
            });
        }
        if line.chars().any(|c| c.is_control() && c != '\t') {
            return Err(GuestError::ControlCharacter);
        }
        let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
        let (Some(kind), Some(body)) = (fields.next(), fields.next()) else {
            return Err(GuestError::Shape);
        };
        let comment: Vec<&str> = fields.collect();
        let comment = comment.join(" ");
        if !KEY_TYPES.contains(&kind) {
            return Err(GuestError::KeyType(kind.chars().take(64).collect()));
        }
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| GuestError::Base64)?;
        check_blob(kind, &blob)?;
        if comment.len() > MAX_COMMENT
            || !comment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || COMMENT_CHARS.contains(c))
        {
            return Err(GuestError::Comment);
        }
        Ok(SshKey(if comment.is_empty() {
            format!("{kind} {body}")
        } else {
            format!("{kind} {body} {comment}")
        }))
    }

    /// The key line.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's type, as its line names it.
    pub fn key_type(&self) -> &str {
        self.0.split(' ').next().unwrap_or_default()
    }
}

impl std::fmt::Display for SshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads the SSH wire format's length-prefixed strings (RFC 4251 section 5).
struct Blob<'a>(&'a [u8]);

impl<'a> Blob<'a> {
    fn string(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > rest.len() {
            return None;
        }
        let (s, rest) = rest.split_at(len);
        self.0 = rest;
        Some(s)
    }
}

/// Checks that `blob` is a public key of type `kind`, field by field, with nothing after.
fn check_blob(kind: &str, blob: &[u8]) -> Result<(), GuestError> {
    let bad = |why| GuestError::Body {
        key_type: kind.to_string(),
        why,
    };
    let mut b = Blob(blob);
    if b.string().ok_or(bad("it is cut short"))? != kind.as_bytes() {
        return Err(bad("it names another key type"));
    }
    let ecdsa_point = |b: &mut Blob, curve: &str| -> Result<(), GuestError> {
        if b.string().ok_or(bad("it is cut short"))? != curve.as_bytes() {
            return Err(bad("it names another curve"));
        }
        let want = match curve {
            "nistp256" => 65,
            "nistp384" => 97,
            _ => 133,
        };
        let q = b.string().ok_or(bad("it is cut short"))?;
        if q.len() != want || q[0] != 4 {
            return Err(bad("its point is not an uncompressed point of the curve"));
        }
        Ok(())
    };
    match kind {
        "ssh-ed25519" | "sk-ssh-ed25519@openssh.com" => {
            if b.string().ok_or(bad("it is cut short"))?.len() != 32 {
                return Err(bad("its public key is not 32 bytes"));
            }
        }
        "ssh-rsa" => {
            let e = b.string().ok_or(bad("it is cut short"))?;
            let n = b.string().ok_or(bad("it is cut short"))?;
            if e.is_empty() || e.len() > 8 || e.iter().all(|x| *x == 0) {
                return Err(bad("its public exponent is not plausible"));
            }
            let n = match n.iter().position(|x| *x != 0) {
                Some(i) => &n[i..],
                None => return Err(bad("its modulus is zero")),
            };
            let bits = n.len() * 8 - n[0].leading_zeros() as usize;
            if bits < MIN_RSA_BITS {
                return Err(GuestError::WeakRsa(bits));
            }
        }
        _ => {
            let curve = kind
                .trim_end_matches("@openssh.com")
                .rsplit('-')
                .next()
                .unwrap_or_default();
            ecdsa_point(&mut b, curve)?;
        }
    }
    if kind.starts_with("sk-") && b.string().ok_or(bad("it is cut short"))?.is_empty() {
        return Err(bad("its security key application is empty"));
    }
    if !b.0.is_empty() {
        return Err(bad("bytes follow the key"));
    }
    Ok(())
}

/// Checks a list of keys against the bounds of one VM.
pub fn check_ssh_keys(keys: &[SshKey]) -> Result<(), String> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(format!(
            "{} keys, over the {MAX_SSH_KEYS} a VM takes",
            keys.len()
        ));
    }
    let total: usize = keys.iter().map(|k| k.0.len()).sum();
    if total > MAX_SSH_KEYS_TOTAL {
        return Err(format!(
            "the keys are {total} bytes together, over {MAX_SSH_KEYS_TOTAL}"
        ));
    }
    Ok(())
}

/// Checks the shape of a user-data document: at most [`MAX_USER_DATA`] bytes, a first line
/// of `#cloud-config`, and no control characters but tab and line breaks.
pub fn check_user_data(text: &str) -> Result<(), GuestError> {
    if text.len() > MAX_USER_DATA {
        return Err(GuestError::TooLong {
            len: text.len(),
            max: MAX_USER_DATA,
        });
    }
    let first = text.lines().next().unwrap_or_default();
    if first.trim_end() != CLOUD_CONFIG {
        return Err(GuestError::NotCloudConfig);
    }
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(GuestError::UserDataControl);
    }
    Ok(())
}

/// Checks a DNS search domain: dot-separated labels of 1 to 63 letters, digits and inner
/// hyphens, 253 characters at most (a final dot allowed).
pub fn check_domain(name: &str) -> Result<(), GuestError> {
    let bad = || GuestError::Domain(name.chars().take(64).collect());
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(bad());
    }
    for label in trimmed.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Real keys, made by ssh-keygen.
    pub const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKwxyYVhVBnDWR4OE6Ix9qctTrkxiKMI3txQaLpbjA/ ops@hz-a";
    pub const ECDSA256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBM/OpeLee4WhsNDsJd+wPchrLTqwwCSCqyxDUKhxkxLiDyytOoJBin2uriwQcVnYPTVMy101vEGI10tbgQP6gwA=";

    fn blob(fields: &[&[u8]]) -> String {
        let mut b = Vec::new();
        for f in fields {
            b.extend_from_slice(&(f.len() as u32).to_be_bytes());
            b.extend_from_slice(f);
        }
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn rsa(bits: usize) -> String {
        let mut n = vec![0u8; bits / 8 + 1];
        n[1] = 0x80;
        format!("ssh-rsa {}", blob(&[b"ssh-rsa", &[1, 0, 1], &n]))
    }

    #[test]
    fn good_keys_are_taken_in_normal_form() {
        let k = SshKey::parse(&format!("  {}\t \n", ED25519.replace(' ', "  "))).unwrap_err();
        assert_eq!(k, GuestError::ControlCharacter, "a line break is refused");
        let k = SshKey::parse(&format!("  {}\t ", ED25519.replace(' ', "  "))).unwrap();
        assert_eq!(k.as_str(), ED25519);
        assert_eq!(k.key_type(), "ssh-ed25519");
        assert_eq!(SshKey::parse(ECDSA256).unwrap().as_str(), ECDSA256);
        let r = SshKey::parse(&format!("{} alice (laptop), 2026", rsa(2048))).unwrap();
        assert!(r.as_str().ends_with(" alice (laptop), 2026"));
        let sk = format!(
            "sk-ssh-ed25519@openssh.com {}",
            blob(&[b"sk-ssh-ed25519@openssh.com", &[7; 32], b"ssh:"])
        );
        SshKey::parse(&sk).unwrap();
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        let body = ED25519.split(' ').nth(1).unwrap();
        let cases: Vec<(String, GuestError)> = vec![
            ("".into(), GuestError::Empty),
            ("ssh-ed25519".into(), GuestError::Shape),
            (
                format!("ssh-dss {body}"),
                GuestError::KeyType("ssh-dss".into()),
            ),
            ("ssh-ed25519 AAAA!!!!".into(), GuestError::Base64),
            (
                format!("ssh-rsa {body}"),
                GuestError::Body {
                    key_type: "ssh-rsa".into(),
                    why: "it names another key type",
                },
            ),
            (
                format!("ssh-ed25519 {}", blob(&[b"ssh-ed25519", &[1; 31]])),
                GuestError::Body {
                    key_type: "ssh-ed25519".into(),
                    why: "its public key is not 32 bytes",
                },
            ),
            (
                format!("ssh-ed25519 {}", blob(&[b"ssh-ed25519", &[1; 32], b"x"])),
                GuestError::Body {
                    key_type: "ssh-ed25519".into(),
                    why: "bytes follow the key",
                },
            ),
            (rsa(1024), GuestError::WeakRsa(1024)),
            (format!("{ED25519} \"quoted\""), GuestError::Comment),
            (format!("{ED25519} #1"), GuestError::Comment),
            (
                format!("{ED25519}\nssh-ed25519 {body}"),
                GuestError::ControlCharacter,
            ),
            (
                format!("ssh-ed25519 {}", "A".repeat(5000)),
                GuestError::TooLong {
                    len: 5012,
                    max: MAX_SSH_KEY_LEN,
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(SshKey::parse(&line), Err(want), "{line}");
        }
        let p384 = format!(
            "ecdsa-sha2-nistp384 {}",
            blob(&[b"ecdsa-sha2-nistp384", b"nistp256", &[4; 65]])
        );
        assert!(SshKey::parse(&p384).is_err());
        // The messages name the problem.
        let msg = SshKey::parse(&format!("ssh-dss {body}"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ssh-dss") && msg.contains("ssh-ed25519"),
            "{msg}"
        );
    }

    #[test]
    fn key_lists_are_bounded() {
        let k = SshKey::parse(ED25519).unwrap();
        assert!(check_ssh_keys(&vec![k.clone(); MAX_SSH_KEYS]).is_ok());
        assert!(check_ssh_keys(&vec![k; MAX_SSH_KEYS + 1]).is_err());
        let big = SshKey::parse(&rsa(16384)).unwrap();
        assert!(check_ssh_keys(&vec![big; 8]).is_err());
    }

    #[test]
    fn user_data_must_be_cloud_config_text() {
        assert!(check_user_data("#cloud-config\npackages: [nginx]\n").is_ok());
        assert!(check_user_data("#cloud-config \r\nruncmd:\n\t- x\n").is_ok());
        assert!(check_user_data("#cloud-config").is_ok());
        assert_eq!(
            check_user_data("#!/bin/sh\necho hi\n"),
            Err(GuestError::NotCloudConfig)
        );
        assert_eq!(
            check_user_data("\n#cloud-config\n"),
            Err(GuestError::NotCloudConfig)
        );
        assert_eq!(
            check_user_data("#cloud-config\na: \u{7}\n"),
            Err(GuestError::UserDataControl)
        );
        let big = format!("#cloud-config\n# {}\n", "x".repeat(MAX_USER_DATA));
        assert!(matches!(
            check_user_data(&big),
            Err(GuestError::TooLong { .. })
        ));
    }

    #[test]
    fn search_domains() {
        for ok in ["hz-a.gov.internal", "example.", "a"] {
            check_domain(ok).unwrap();
        }
        for bad in ["", ".", "-a.b", "a..b", "a b", "a_b.c", &"x".repeat(64)] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }
}
