//! TLS identities: the site CA, the coordinator's server certificate, node certificates,
//! and the rustls configurations that make every daemon-to-daemon connection mutual.
//!
//! Trust model:
//! - Each site has one CA, made by `zy-coordinator init`. Its private key never leaves the
//!   coordinator's state directory (mode 0600).
//! - The coordinator's server certificate always names [`SERVER_NAME`], whatever address it
//!   is reached at, plus any names given at init, so agents and the CLI verify it by CA, not
//!   by IP address.
//! - A node certificate names the node id (subject CN) and zone (subject OU), signed by the
//!   CA at enrollment. The coordinator reads identity from the certificate alone; a node
//!   cannot claim another id or zone.
//! - Before enrollment an agent has no CA to trust; it pins the CA by the BLAKE3 fingerprint
//!   carried in its bootstrap token ([`PinnedCaVerifier`]).
//!
//! Lifetimes: the CA lasts ten years; node certificates [`NODE_VALIDITY_DEFAULT`] (the site
//! may choose), renewed by their agent over its link when a third of that remains; the
//! server certificate at most [`SERVER_VALIDITY_MAX`], renewed by the coordinator itself the
//! same way and swapped into its listeners without a restart ([`CertSlot`]). Every
//! certificate is back-dated a little (a tenth of its validity, at most an hour) for clocks
//! that lag, and that back-dating counts in its validity: `not_after - not_before` is the
//! validity asked for, never more.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[cfg(feature = "pki")]
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
#[cfg(feature = "pki")]
use time::OffsetDateTime;

use crate::ids::{NodeId, Zone};

/// The name every coordinator certificate carries and every client verifies.
pub const SERVER_NAME: &str = "coordinator.zhengyun";
/// ALPN of the daemon protocol.
pub const ALPN_ZY: &[u8] = b"zy/1";
/// ALPN of the HTTP API.
pub const ALPN_HTTP: &[u8] = b"http/1.1";

#[cfg(feature = "pki")]
const CA_DAYS: i64 = 3650;

const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The longest a server certificate may last, back-dating included: 397 days, what browsers
/// and Apple's TLS stack accept of publicly trusted certificates (398 days) less a day of
/// margin, and far within the 825 days some clients demand of any certificate (the old
/// "825 days and an hour" was refused by them).
pub const SERVER_VALIDITY_MAX: std::time::Duration = DAY.saturating_mul(397);
/// How long a node certificate lasts unless the site says otherwise.
pub const NODE_VALIDITY_DEFAULT: std::time::Duration = DAY.saturating_mul(7);
/// The longest a node certificate may be made to last.
pub const NODE_VALIDITY_MAX: std::time::Duration = DAY.saturating_mul(365);

/// What went wrong making or using an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[cfg(feature = "pki")]
    #[error("could not generate or sign a certificate")]
    Rcgen(#[from] rcgen::Error),
    #[error("rustls rejected the configuration")]
    Rustls(#[from] rustls::Error),
    #[error("{what} is not valid PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the client verifier could not be built")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the certificate request is not acceptable: {0}")]
    BadCsr(String),
    #[error("the certificate does not name a Zhengyun node: {0}")]
    NotANodeCert(String),
    #[error("the certificate cannot be read: {0}")]
    BadCert(String),
    #[error("`{0}` is not a CA fingerprint (64 hex digits)")]
    BadFingerprint(String),
    #[error("QUIC refused the TLS configuration: {0}")]
    Quic(String),
}

/// The BLAKE3 hash of the CA certificate's DER: what a bootstrap token pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint(pub [u8; 32]);

impl CaFingerprint {
    /// Fingerprint of a certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(*blake3::hash(der).as_bytes())
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFingerprint({self})")
    }
}

impl FromStr for CaFingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::token::hex_decode::<32>(s)
            .map(Self)
            .ok_or_else(|| TlsError::BadFingerprint(crate::ids::truncate_for_error(s)))
    }
}

/// The crypto provider used everywhere: ring, so no C toolchain beyond cc is needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(feature = "pki")]
fn days_from_now(days: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::days(days)
}

#[cfg(feature = "pki")]
fn an_hour_ago() -> OffsetDateTime {
    OffsetDateTime::now_utc() - time::Duration::hours(1)
}

/// `(not_before, not_after)` of a certificate that lasts `validity` from now: back-dated by a
/// tenth of it (at most an hour), so that `not_after - not_before == validity`.
#[cfg(feature = "pki")]
fn validity_window(validity: std::time::Duration) -> (OffsetDateTime, OffsetDateTime) {
    let back = (validity / 10).min(std::time::Duration::from_secs(3600));
    let now = OffsetDateTime::now_utc();
    let not_before = now - back;
    (not_before, not_before + validity)
}

/// A certificate and its private key, both PEM, as written to disk.
#[derive(Clone)]
pub struct PemPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for PemPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemPair")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The site certificate authority.
#[cfg(feature = "pki")]
pub struct SiteCa {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

#[cfg(feature = "pki")]
impl fmt::Debug for SiteCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteCa")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

#[cfg(feature = "pki")]
impl SiteCa {
    /// Makes a new CA for a site.
    pub fn generate(site: &str) -> Result<(Self, PemPair), TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Zhengyun");
        dn.push(DnType::CommonName, format!("Zhengyun site CA {site}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = an_hour_ago();
        params.not_after = days_from_now(CA_DAYS);
        let cert = params.self_signed(&key)?;
        let pem = PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let ca = Self {
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, pem))
    }

    /// Loads a CA from its PEM files' contents.
    pub fn from_pem(pair: &PemPair) -> Result<Self, TlsError> {
        let cert_der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).map_err(|e| {
            TlsError::Pem {
                what: "CA certificate",
                source: e,
            }
        })?;
        let key = KeyPair::from_pem(&pair.key_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self { cert_der, issuer })
    }

    /// The CA certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// What bootstrap tokens pin.
    pub fn fingerprint(&self) -> CaFingerprint {
        CaFingerprint::of(&self.cert_der)
    }

    /// Issues the coordinator's server certificate for [`SERVER_NAME`] plus `extra_names`
    /// (DNS names, or IP addresses, which become IP SANs), valid for `validity` (at most
    /// [`SERVER_VALIDITY_MAX`]). The PEM chain holds the CA too, so that joining agents can
    /// find the CA they pinned.
    pub fn issue_server(
        &self,
        extra_names: &[String],
        validity: std::time::Duration,
    ) -> Result<PemPair, TlsError> {
        let mut names = vec![
            SERVER_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        for n in extra_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        (params.not_before, params.not_after) = validity_window(validity.min(SERVER_VALIDITY_MAX));
        let cert = params.signed_by(&key, &self.issuer)?;
        let ca_pem = pem_cert(&self.cert_der);
        Ok(PemPair {
            cert_pem: format!("{}{}", cert.pem(), ca_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's certificate request, valid for `validity` (at most
    /// [`NODE_VALIDITY_MAX`]). Everything the request asks for is ignored but its public key:
    /// the id, zone and usages are the coordinator's to decide.
    pub fn issue_node(
        &self,
        csr_der: &[u8],
        node: NodeId,
        zone: Zone,
        validity: std::time::Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        self.sign_node(
            csr_der,
            node,
            zone,
            validity,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            vec![KeyUsagePurpose::DigitalSignature],
        )
    }

    /// Signs a node's certificate request for node-to-node TLS, where the node is the
    /// server as well as the client: a live migration's destination QEMU serves its NBD
    /// export and its incoming stream with it (gnutls through QEMU's `tls-creds-x509`),
    /// and the source QEMU presents it as a client. [`SiteCa::issue_node`]'s certificate
    /// is not enough for that: QEMU 10's check of a server certificate wants key usage
    /// keyEncipherment beside digitalSignature (it refuses the enrollment certificate with
    /// "usage does not permit key encipherment"), and its extended key usage is clientAuth
    /// only, which does not allow a TLS server. Same subject as a node certificate
    /// (O=Zhengyun, OU=zone, CN=node id) and the same DNS name, `<node>.node.zhengyun`,
    /// which the client checks (QEMU's `tls-hostname`).
    pub fn issue_node_peer(
        &self,
        csr_der: &[u8],
        node: NodeId,
        zone: Zone,
        validity: std::time::Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        self.sign_node(
            csr_der,
            node,
            zone,
            validity,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
        )
    }

    fn sign_node(
        &self,
        csr_der: &[u8],
        node: NodeId,
        zone: Zone,
        validity: std::time::Duration,
        extended: Vec<ExtendedKeyUsagePurpose>,
        usages: Vec<KeyUsagePurpose>,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| TlsError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(vec![format!("{node}.node.zhengyun")])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Zhengyun");
        dn.push(DnType::OrganizationalUnitName, zone.as_str());
        dn.push(DnType::CommonName, node.to_string());
        params.distinguished_name = dn;
        params.extended_key_usages = extended;
        params.key_usages = usages;
        (params.not_before, params.not_after) = validity_window(validity.min(NODE_VALIDITY_MAX));
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.der().clone())
    }
}

#[cfg(feature = "pki")]
impl SiteCa {
    /// Renews a node's certificate over its link: a certificate for the node that
    /// `current` (the certificate its session was authenticated with) names, for the key of
    /// `csr_der`, valid for `validity`. What the request claims is ignored, as at
    /// enrollment; the request must be signed by its key (proof of possession) and that key
    /// must be new: a renewal that kept the old key would extend a key's exposure forever.
    pub fn renew_node(
        &self,
        csr_der: &[u8],
        current: &[u8],
        validity: std::time::Duration,
    ) -> Result<(NodeIdentity, CertificateDer<'static>), TlsError> {
        use x509_parser::prelude::FromDer;
        let who = NodeIdentity::from_cert(current)?;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
                .map_err(|e| TlsError::BadCsr(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(current)
            .map_err(|e| TlsError::NotANodeCert(e.to_string()))?;
        if csr.certification_request_info.subject_pki.raw == cert.public_key().raw {
            return Err(TlsError::BadCsr(
                "it is for the key of the current certificate; a renewal needs a new key".into(),
            ));
        }
        // The peer kind (server and client): a node enrolled before it existed gets it
        // here, at its next renewal, and can then be a migration's endpoint.
        let issued = self.issue_node_peer(csr_der, who.node_id, who.zone, validity)?;
        Ok((who, issued))
    }
}

/// Whether a node certificate can serve TLS as QEMU does for a live migration's
/// destination (gnutls through `tls-creds-x509`): extended key usage serverAuth (or none)
/// and key usage keyEncipherment (or none), as [`SiteCa::issue_node_peer`] writes them.
/// `Err` says what is missing, in words for ops: certificates of [`SiteCa::issue_node`]
/// (enrollments before protocol version 4) are for clients only until their renewal.
#[cfg(feature = "pki")]
pub fn check_serves_tls(der: &[u8]) -> Result<(), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable: {e}"))?;
    let mut missing = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        if !eku.value.server_auth && !eku.value.any {
            missing.push("extended key usage serverAuth");
        }
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_encipherment() {
            missing.push("key usage keyEncipherment");
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the node certificate lacks {} and cannot serve QEMU's TLS (a certificate issued \
             at an enrollment before protocol version 4: it is replaced by one that can at the \
             node's next renewal)",
            missing.join(" and ")
        ))
    }
}

/// When a certificate valid from `not_before_ms` to `not_after_ms` is due for renewal: once
/// a third of its validity is left, brought forward by up to a twelfth of it by `spread`
/// (0.0 to 1.0, drawn once per holder) so that certificates issued together are not all
/// renewed in the same instant.
pub fn renew_at_ms(not_before_ms: u64, not_after_ms: u64, spread: f64) -> u64 {
    let validity = not_after_ms.saturating_sub(not_before_ms);
    let early = (validity as f64 / 12.0 * spread.clamp(0.0, 1.0)) as u64;
    not_after_ms
        .saturating_sub(validity / 3)
        .saturating_sub(early)
}

/// When a certificate that should have been renewed by now deserves a warning: once a
/// sixth of its validity is left (half of the renewal window gone).
pub fn warn_at_ms(not_before_ms: u64, not_after_ms: u64) -> u64 {
    not_after_ms.saturating_sub(not_after_ms.saturating_sub(not_before_ms) / 6)
}

/// How long to wait before trying a failed renewal again: a twentieth of the time left,
/// within 1 s and 10 minutes, times `jitter` (0.5 to 1.0, random per try), so that many
/// holders refused at once do not come back at once, and a certificate close to its end
/// is tried often.
pub fn renewal_retry_ms(now_ms: u64, not_after_ms: u64, jitter: f64) -> u64 {
    let cap = (not_after_ms.saturating_sub(now_ms) / 20).clamp(1_000, 600_000);
    (cap as f64 * jitter.clamp(0.5, 1.0)) as u64
}

/// PEM of one certificate.
pub fn pem_cert(der: &CertificateDer<'_>) -> String {
    let b64 = base64_encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// A node's key and certificate request, made at join.
#[cfg(feature = "pki")]
pub fn node_request(name: &str) -> Result<(KeyPair, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Who a node certificate says its holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub zone: Zone,
}

#[cfg(feature = "pki")]
impl NodeIdentity {
    /// Reads the node id and zone from a certificate that the CA verified.
    pub fn from_cert(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::NotANodeCert(e.to_string()))?;
        let subject = cert.subject();
        let cn = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| TlsError::NotANodeCert("no common name".into()))?;
        let ou = subject
            .iter_organizational_unit()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| TlsError::NotANodeCert("no zone".into()))?;
        let node_id = cn
            .parse::<NodeId>()
            .map_err(|e| TlsError::NotANodeCert(e.to_string()))?;
        let zone = ou
            .parse::<Zone>()
            .map_err(|e| TlsError::NotANodeCert(e.to_string()))?;
        Ok(Self { node_id, zone })
    }
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem { what, source: e })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// Parses a private key from PEM.
pub fn key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem { what, source: e })
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    Ok(Arc::new(roots))
}

/// The coordinator's own certificate and key as its listeners serve them: one slot that
/// both the daemon endpoint and the HTTPS API read at every handshake, so that a renewed
/// certificate is served from the next handshake on, and connections already up keep
/// theirs.
#[derive(Debug)]
pub struct CertSlot {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl CertSlot {
    /// A slot serving `chain` (leaf first) with `key`; fails if the key is not the leaf's.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(Arc::new(certified(chain, key)?)),
        }))
    }

    /// Serves `chain` and `key` from the next handshake on. Checked first: a key that is not
    /// the leaf's is refused and the slot keeps what it has.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), TlsError> {
        let new = Arc::new(certified(chain, key)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    /// The leaf certificate served now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.get().cert[0].clone()
    }

    fn get(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::Pem {
            what: "server certificate",
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let ck = rustls::sign::CertifiedKey::from_der(chain, key, &provider())?;
    ck.keys_match()?;
    Ok(ck)
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

/// The site CA's verifier of client certificates, which also says in the log which node
/// presented an expired certificate (the handshake fails before any session could).
#[derive(Debug)]
struct NodeCertVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl rustls::server::danger::ClientCertVerifier for NodeCertVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) = &r
        {
            #[cfg(feature = "pki")]
            let who = CertInfo::parse(end_entity)
                .map(|c| {
                    format!(
                        "{} (certificate {} expired {})",
                        c.subject,
                        c.serial,
                        crate::time::rfc3339(c.not_after_ms)
                    )
                })
                .unwrap_or_else(|_| "an unreadable certificate".into());
            #[cfg(not(feature = "pki"))]
            let who = String::from("a node");
            tracing::warn!(node = %who, "refused a node whose certificate has expired: it cannot reconnect and must be re-enrolled (zy node remove, then zy-agent join with a new token)");
        }
        r
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The coordinator's TLS config for daemon connections: a client certificate is verified
/// against the site CA when presented; connections without one may only enroll. The
/// server's own certificate comes from `cert`, read at every handshake.
pub fn daemon_server_config(
    ca: &CertificateDer<'static>,
    cert: Arc<CertSlot>,
) -> Result<rustls::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(NodeCertVerifier { inner }))
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_ZY.to_vec()];
    Ok(cfg)
}

/// The HTTPS API's TLS config: server authentication only; clients prove themselves with
/// API tokens. The certificate comes from `cert`, read at every handshake.
pub fn https_server_config(cert: Arc<CertSlot>) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_HTTP.to_vec()];
    Ok(cfg)
}

/// What ops need to know of a certificate: who it names, for which names, and when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, RFC 4514 style (`CN=...,OU=...,O=...`).
    pub subject: String,
    /// The serial number, lower-case hex.
    pub serial: String,
    /// DNS names and IP addresses it is valid for.
    pub sans: Vec<String>,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// BLAKE3 of the DER, as bootstrap tokens pin a CA.
    pub fingerprint: CaFingerprint,
}

#[cfg(feature = "pki")]
impl CertInfo {
    /// Reads a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::BadCert(e.to_string()))?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(n) => sans.push(n.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => sans.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                                .to_string(),
                        ),
                        16 => sans.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                                .to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        let ms = |t: x509_parser::time::ASN1Time| {
            u64::try_from(t.timestamp())
                .unwrap_or(0)
                .saturating_mul(1000)
        };
        Ok(Self {
            subject: cert.subject().to_string(),
            serial: crate::token::hex(cert.raw_serial()),
            sans,
            not_before_ms: ms(cert.validity().not_before),
            not_after_ms: ms(cert.validity().not_after),
            fingerprint: CaFingerprint::of(der),
        })
    }

    /// How long it lasts in all.
    pub fn validity_ms(&self) -> u64 {
        self.not_after_ms.saturating_sub(self.not_before_ms)
    }
}

/// An enrolled agent's TLS config: trusts only the site CA and presents the node
/// certificate.
pub fn daemon_client_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_ZY.to_vec()];
    Ok(cfg)
}

/// A joining agent's TLS config: trusts the CA whose fingerprint the token carries.
pub fn join_client_config(pin: CaFingerprint) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        pin,
        provider: provider(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_ZY.to_vec()];
    Ok(cfg)
}

/// The CLI's TLS config for the HTTPS API: trusts only the site CA.
pub fn https_client_config(ca: &CertificateDer<'static>) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_HTTP.to_vec()];
    Ok(cfg)
}

/// Verifies the coordinator against the CA pinned by a bootstrap token: the server must
/// send the CA in its chain, the CA's fingerprint must match, and the leaf must verify
/// against it like any other certificate.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

/// The text of the error a pin mismatch produces; the agent looks for it to explain.
pub const PIN_MISMATCH: &str = "coordinator CA does not match the fingerprint in the token";

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| CaFingerprint::of(c) == self.pin)
            .ok_or_else(|| rustls::Error::General(PIN_MISMATCH.into()))?;
        let mut store = RootCertStore::empty();
        store.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(all(test, feature = "pki"))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn node_certificates_carry_identity_and_ignore_requests() {
        let (ca, pem) = SiteCa::generate("test").unwrap();
        let again = SiteCa::from_pem(&pem).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let (_key, csr) = node_request("n1").unwrap();
        let id = NodeId::new_random();
        let cert = again
            .issue_node(&csr, id, Zone::Intranet, NODE_VALIDITY_DEFAULT)
            .unwrap();
        let who = NodeIdentity::from_cert(&cert).unwrap();
        assert_eq!(who.node_id, id);
        assert_eq!(who.zone, Zone::Intranet);
        assert!(ca
            .issue_node(b"garbage", id, Zone::Intranet, NODE_VALIDITY_DEFAULT)
            .is_err());
        let info = CertInfo::parse(&cert).unwrap();
        assert_eq!(info.validity_ms(), NODE_VALIDITY_DEFAULT.as_millis() as u64);
        assert!(info.subject.contains(&id.to_string()), "{}", info.subject);
        // Asked for more than the most a node certificate may last: capped.
        let long = ca
            .issue_node(&csr, id, Zone::Intranet, NODE_VALIDITY_MAX * 2)
            .unwrap();
        assert_eq!(
            CertInfo::parse(&long).unwrap().validity_ms(),
            NODE_VALIDITY_MAX.as_millis() as u64
        );
    }

    #[test]
    fn renewal_is_for_the_sessions_node_with_a_new_key_whatever_the_request_claims() {
        let (ca, _) = SiteCa::generate("test").unwrap();
        let (key, csr) = node_request("n1").unwrap();
        let id = NodeId::new_random();
        let current = ca
            .issue_node(&csr, id, Zone::Extranet, NODE_VALIDITY_DEFAULT)
            .unwrap();
        // The same key again: refused.
        let err = ca
            .renew_node(&csr, &current, NODE_VALIDITY_DEFAULT)
            .unwrap_err();
        assert!(err.to_string().contains("new key"), "{err}");
        let _ = key;
        // A request that claims another node's name: the session's node it is.
        let (_, other) = node_request(&NodeId::new_random().to_string()).unwrap();
        let (who, cert) = ca
            .renew_node(&other, &current, Duration::from_secs(60))
            .unwrap();
        assert_eq!((who.node_id, who.zone), (id, Zone::Extranet));
        let renewed = NodeIdentity::from_cert(&cert).unwrap();
        assert_eq!((renewed.node_id, renewed.zone), (id, Zone::Extranet));
        let info = CertInfo::parse(&cert).unwrap();
        assert_eq!(info.validity_ms(), 60_000);
        assert_ne!(info.serial, CertInfo::parse(&current).unwrap().serial);
        // A request whose signature does not hold: refused.
        let mut forged = other.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(ca
            .renew_node(&forged, &current, NODE_VALIDITY_DEFAULT)
            .is_err());
        // Not a node certificate (the server's): refused.
        let server = ca.issue_server(&[], SERVER_VALIDITY_MAX).unwrap();
        let sc = certs_from_pem("s", &server.cert_pem).unwrap();
        assert!(ca
            .renew_node(&other, &sc[0], NODE_VALIDITY_DEFAULT)
            .is_err());
    }

    #[test]
    fn only_peer_certificates_serve_tls_and_renewal_issues_them() {
        let (ca, _) = SiteCa::generate("test").unwrap();
        let id = NodeId::new_random();
        let (_, csr) = node_request("n1").unwrap();
        let old = ca
            .issue_node(&csr, id, Zone::Intranet, NODE_VALIDITY_DEFAULT)
            .unwrap();
        let e = check_serves_tls(&old).unwrap_err();
        assert!(
            e.contains("serverAuth") && e.contains("keyEncipherment") && e.contains("renewal"),
            "{e}"
        );
        let peer = ca
            .issue_node_peer(&csr, id, Zone::Intranet, NODE_VALIDITY_DEFAULT)
            .unwrap();
        check_serves_tls(&peer).unwrap();
        // A node enrolled with the old kind gets the new kind at its renewal.
        let (_, csr2) = node_request("n1").unwrap();
        let (who, renewed) = ca.renew_node(&csr2, &old, NODE_VALIDITY_DEFAULT).unwrap();
        assert_eq!(who.node_id, id);
        check_serves_tls(&renewed).unwrap();
        assert!(check_serves_tls(b"garbage").is_err());
    }

    #[test]
    fn renewal_timing_follows_the_validity_with_a_bounded_spread() {
        let day = 86_400_000u64;
        // A 7-day certificate: renewed with 2⅓ days left, up to 14 hours earlier by spread.
        let (nb, na) = (10 * day, 17 * day);
        assert_eq!(renew_at_ms(nb, na, 0.0), na - 7 * day / 3);
        assert_eq!(renew_at_ms(nb, na, 1.0), na - 7 * day / 3 - 7 * day / 12);
        assert_eq!(renew_at_ms(nb, na, 7.0), renew_at_ms(nb, na, 1.0));
        assert!(renew_at_ms(nb, na, 0.5) > nb + 7 * day / 2);
        // The warning comes after the renewal was due, before the end.
        assert!(warn_at_ms(nb, na) > renew_at_ms(nb, na, 0.0));
        assert!(warn_at_ms(nb, na) < na);
        // Retries: a twentieth of what is left, within 1 s..10 min, jittered.
        assert_eq!(renewal_retry_ms(na - day, na, 1.0), 600_000);
        assert_eq!(renewal_retry_ms(na - 40_000, na, 1.0), 2_000);
        assert_eq!(renewal_retry_ms(na, na, 1.0), 1_000);
        assert_eq!(renewal_retry_ms(na - 40_000, na, 0.5), 1_000);
        // Nonsense dates never panic.
        assert_eq!(renew_at_ms(na, nb, 0.3), nb);
    }

    #[test]
    fn pem_round_trips() {
        let (ca, _) = SiteCa::generate("t").unwrap();
        let pem = pem_cert(ca.cert_der());
        let back = certs_from_pem("ca", &pem).unwrap();
        assert_eq!(back[0], *ca.cert_der());
        let server = ca
            .issue_server(
                &["10.0.0.1".into(), "coord.example".into()],
                SERVER_VALIDITY_MAX * 3,
            )
            .unwrap();
        let chain = certs_from_pem("chain", &server.cert_pem).unwrap();
        assert_eq!(chain.len(), 2);
        assert!(format!("{server:?}").contains("redacted"));
        let info = CertInfo::parse(&chain[0]).unwrap();
        // The names given, IP addresses as IP SANs, and never over the limit.
        for name in [
            SERVER_NAME,
            "localhost",
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "coord.example",
        ] {
            assert!(
                info.sans.iter().any(|s| s == name),
                "{name} in {:?}",
                info.sans
            );
        }
        assert_eq!(info.validity_ms(), SERVER_VALIDITY_MAX.as_millis() as u64);
        assert!(info.validity_ms() < 825 * 86_400_000);
    }

    #[test]
    fn a_cert_slot_serves_the_new_pair_and_refuses_a_mismatched_one() {
        let (ca, _) = SiteCa::generate("t").unwrap();
        let load = |p: &PemPair| {
            (
                certs_from_pem("c", &p.cert_pem).unwrap(),
                key_from_pem("k", &p.key_pem).unwrap(),
            )
        };
        let a = ca.issue_server(&[], SERVER_VALIDITY_MAX).unwrap();
        let b = ca.issue_server(&[], SERVER_VALIDITY_MAX).unwrap();
        let (chain_a, key_a) = load(&a);
        let (chain_b, key_b) = load(&b);
        let slot = CertSlot::new(chain_a.clone(), key_a.clone_key()).unwrap();
        assert_eq!(slot.leaf(), chain_a[0]);
        assert!(slot.replace(chain_b.clone(), key_a).is_err());
        assert_eq!(slot.leaf(), chain_a[0]);
        slot.replace(chain_b.clone(), key_b).unwrap();
        assert_eq!(slot.leaf(), chain_b[0]);
    }
}
