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
#[cfg(feature = "pki")]
const SERVER_DAYS: i64 = 825;
#[cfg(feature = "pki")]
const NODE_DAYS: i64 = 365;

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
            .ok_or_else(|| TlsError::NotANodeCert("bad fingerprint".into()))
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
    /// (DNS names or IP addresses). The PEM chain holds the CA too, so that joining agents
    /// can find the CA they pinned.
    pub fn issue_server(&self, extra_names: &[String]) -> Result<PemPair, TlsError> {
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
        params.not_before = an_hour_ago();
        params.not_after = days_from_now(SERVER_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        let ca_pem = pem_cert(&self.cert_der);
        Ok(PemPair {
            cert_pem: format!("{}{}", cert.pem(), ca_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node's certificate request. Everything the request asks for is ignored but
    /// its public key: the id, zone and usages are the coordinator's to decide.
    pub fn issue_node(
        &self,
        csr_der: &[u8],
        node: NodeId,
        zone: Zone,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| TlsError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(vec![format!("{node}.node.zhengyun")])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Zhengyun");
        dn.push(DnType::OrganizationalUnitName, zone.as_str());
        dn.push(DnType::CommonName, node.to_string());
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = an_hour_ago();
        params.not_after = days_from_now(NODE_DAYS);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.der().clone())
    }
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

/// The coordinator's TLS config for daemon connections: a client certificate is verified
/// against the site CA when presented; connections without one may only enroll.
pub fn daemon_server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_ZY.to_vec()];
    Ok(cfg)
}

/// The HTTPS API's TLS config: server authentication only; clients prove themselves with
/// API tokens.
pub fn https_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_HTTP.to_vec()];
    Ok(cfg)
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

    #[test]
    fn node_certificates_carry_identity_and_ignore_requests() {
        let (ca, pem) = SiteCa::generate("test").unwrap();
        let again = SiteCa::from_pem(&pem).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let (_key, csr) = node_request("n1").unwrap();
        let id = NodeId::new_random();
        let cert = again.issue_node(&csr, id, Zone::Intranet).unwrap();
        let who = NodeIdentity::from_cert(&cert).unwrap();
        assert_eq!(who.node_id, id);
        assert_eq!(who.zone, Zone::Intranet);
        assert!(ca.issue_node(b"garbage", id, Zone::Intranet).is_err());
    }

    #[test]
    fn pem_round_trips() {
        let (ca, _) = SiteCa::generate("t").unwrap();
        let pem = pem_cert(ca.cert_der());
        let back = certs_from_pem("ca", &pem).unwrap();
        assert_eq!(back[0], *ca.cert_der());
        let server = ca.issue_server(&["10.0.0.1".into()]).unwrap();
        assert_eq!(certs_from_pem("chain", &server.cert_pem).unwrap().len(), 2);
        assert!(format!("{server:?}").contains("redacted"));
    }
}
