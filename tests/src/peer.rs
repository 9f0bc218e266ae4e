//! Speaking the daemon protocol from a test: QUIC endpoints inside a lab namespace, client
//! configs, and a node's identity taken from its agent directory.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zy_common::proto::{Accel, Hello, Inventory, Message};
use zy_common::tls;
use zy_common::wire::{self, PROTOCOL_VERSIONS};

use crate::site::Site;
use crate::Lab;

/// A QUIC endpoint on a socket bound inside `ns` (a server if `server` is given).
pub fn endpoint_in(
    lab: &Lab,
    ns: &str,
    server: Option<quinn::ServerConfig>,
    port: u16,
) -> quinn::Endpoint {
    let sock = lab
        .udp_socket_in(ns, format!("0.0.0.0:{port}").parse().expect("address"))
        .expect("socket in namespace");
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        sock,
        Arc::new(quinn::TokioRuntime),
    )
    .expect("endpoint")
}

/// A QUIC client config around a TLS config, with the shared transport settings.
pub fn client(tls: rustls::ClientConfig) -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("TLS 1.3 config");
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(zy_common::quic::transport(Duration::from_secs(5)));
    c
}

/// The site CA certificate.
pub fn site_ca(site: &Site) -> CertificateDer<'static> {
    let pem = std::fs::read_to_string(site.state.join("ca.crt")).expect("ca.crt");
    tls::certs_from_pem("ca", &pem).expect("CA PEM").remove(0)
}

/// Node `i`'s certificate chain and key, from its agent directory.
pub fn node_identity(
    site: &Site,
    i: usize,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let dir = site.agent_dir(i).join("identity");
    let chain = tls::certs_from_pem(
        "node",
        &std::fs::read_to_string(dir.join("node.crt")).expect("node.crt"),
    )
    .expect("node PEM");
    let key = tls::key_from_pem(
        "key",
        &std::fs::read_to_string(dir.join("node.key")).expect("node.key"),
    )
    .expect("key PEM");
    (chain, key)
}

/// A plausible inventory.
pub fn inventory(zone: zy_common::Zone) -> Inventory {
    Inventory {
        hostname: "peer".into(),
        cpu_model: "x".into(),
        cpus: 1,
        memory_bytes: 1 << 30,
        disk_total_bytes: 1 << 30,
        disk_free_bytes: 1 << 29,
        kvm_usable: false,
        accel: Accel::Tcg,
        zone,
        agent_version: "0".into(),
        kernel: "k".into(),
    }
}

/// Connects as enrolled node `i` and completes preamble, Hello and Welcome on the control
/// stream; returns the connection, the version and the control stream.
pub async fn connect_as_node(
    site: &Site,
    ep: &quinn::Endpoint,
    i: usize,
    zone: zy_common::Zone,
) -> (quinn::Connection, u16, quinn::SendStream, quinn::RecvStream) {
    let (chain, key) = node_identity(site, i);
    let cfg = client(tls::daemon_client_config(&site_ca(site), chain, key).expect("client config"));
    let conn = ep
        .connect_with(cfg, site.lab.daemon_addr(), tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut io = tokio::io::join(&mut recv, &mut send);
    let v = wire::open_preamble(&mut io, PROTOCOL_VERSIONS)
        .await
        .expect("preamble");
    wire::write_frame(
        &mut io,
        v,
        &Message::Hello(Hello {
            inventory: inventory(zone),
        }),
    )
    .await
    .expect("hello");
    let mut buf = Vec::new();
    let welcome: Message = wire::read_frame(&mut io, v, wire::MAX_BODY, &mut buf)
        .await
        .expect("welcome");
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    (conn, v, send, recv)
}
