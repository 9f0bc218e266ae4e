//! A thousand garbage, truncated and oversized frames at the coordinator (from strangers and
//! from an enrolled node), garbage at its HTTPS port, and a rogue coordinator feeding an
//! agent garbage: both daemons stay healthy.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, RngCore};
use tokio::io::AsyncReadExt;
use zy_common::proto::*;
use zy_common::tls::{self, CaFingerprint};
use zy_common::wire::{self, Preamble, VersionRange, PROTOCOL_VERSIONS, WIRE_MAGIC};
use zy_coordinator::store::statedir::StateDir;
use zy_lab::peer::{client, endpoint_in, inventory};
use zy_lab::site::Site;
use zy_lab::wait_for;

const T: Duration = Duration::from_secs(30);

fn preamble() -> Vec<u8> {
    Preamble {
        range: PROTOCOL_VERSIONS,
        chosen: 0,
    }
    .to_bytes()
    .to_vec()
}

/// The protocol version both daemons speak.
const V: u16 = PROTOCOL_VERSIONS.max;

fn frame(version: u16, m: &Message) -> Vec<u8> {
    wire::encode(WIRE_MAGIC, version, m, wire::MAX_BODY).unwrap()
}

fn header(len: u32) -> Vec<u8> {
    let mut h = WIRE_MAGIC.to_vec();
    h.extend_from_slice(&V.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn random(rng: &mut impl RngCore, max: usize) -> Vec<u8> {
    let n = rng.random_range(1..max);
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

fn join_request(name: &str) -> Message {
    Message::JoinRequest(JoinRequest {
        token: "zyj1-0011223344556677-00112233445566778899aabbccddeeff-00".into(),
        csr_der: vec![0x30, 0x03, 0x02, 0x01, 0x00],
        name: name.into(),
        agent_version: "0".into(),
    })
}

/// What a stranger sends on an unauthenticated connection, case `i`.
fn stranger_case(i: usize, rng: &mut impl RngCore) -> Vec<u8> {
    let mut b;
    match i % 10 {
        0 => b = random(rng, 2000),
        1 => {
            b = preamble();
            b.extend(random(rng, 2000));
        }
        2 => {
            b = preamble();
            b.extend(header(u32::MAX));
        }
        3 => {
            b = preamble();
            b.extend(header(100));
            b.extend([7u8; 10]);
        }
        4 => {
            b = preamble();
            b.extend(frame(7, &join_request("n9")));
        }
        5 => {
            b = preamble();
            b.extend(frame(
                V,
                &Message::Hello(Hello {
                    inventory: inventory(zy_common::Zone::Intranet),
                }),
            ));
        }
        6 => {
            b = preamble();
            b.extend(frame(V, &join_request("BAD NAME")));
        }
        7 => {
            b = Preamble {
                range: VersionRange { min: 9, max: 9 },
                chosen: 0,
            }
            .to_bytes()
            .to_vec();
        }
        8 => {
            b = preamble();
            let mut f = frame(V, &join_request("n9"));
            let at = rng.random_range(0..f.len());
            f[at] ^= 1 << rng.random_range(0..8);
            b.extend(f);
        }
        _ => {
            b = preamble();
            let mut h = header(4);
            h[0] = b'X';
            b.extend(h);
            b.extend([0u8; 4]);
        }
    }
    b
}

/// What an enrolled node sends after a proper hello, case `i`.
fn node_case(i: usize, rng: &mut impl RngCore) -> Vec<u8> {
    match i % 6 {
        0 => random(rng, 2000),
        1 => header(u32::MAX),
        2 => {
            let mut h = header(300);
            h.extend([1u8; 20]);
            h
        }
        // A version the session did not negotiate.
        3 => frame(V + 1, &Message::Load(load())),
        4 => frame(V, &join_request("n9")),
        _ => {
            let mut l = load();
            l.cpu_percent = f32::NAN;
            frame(V, &Message::Load(l))
        }
    }
}

fn load() -> LoadReport {
    LoadReport {
        seq: 1,
        cpu_percent: 1.0,
        mem_used_bytes: 1,
        mem_available_bytes: 1,
        load1: 0.0,
        load5: 0.0,
        load15: 0.0,
        net_rx_bytes: 0,
        net_tx_bytes: 0,
        disk_free_bytes: 0,
    }
}

/// Sends bytes on a new connection's stream and reads whatever comes back.
async fn poke(
    ep: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    to: std::net::SocketAddr,
    bytes: Vec<u8>,
    hello_first: bool,
) -> Vec<u8> {
    let Ok(connecting) = ep.connect_with(cfg, to, tls::SERVER_NAME) else {
        return Vec::new();
    };
    let Ok(conn) = connecting.await else {
        return Vec::new();
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return Vec::new();
    };
    if hello_first {
        let mut io = tokio::io::join(&mut recv, &mut send);
        let Ok(v) = wire::open_preamble(&mut io, PROTOCOL_VERSIONS).await else {
            return Vec::new();
        };
        let hello = Message::Hello(Hello {
            inventory: inventory(zy_common::Zone::Intranet),
        });
        if wire::write_frame(&mut io, v, &hello).await.is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let welcome: Result<Message, _> =
            wire::read_frame(&mut io, v, wire::MAX_BODY, &mut buf).await;
        assert!(matches!(welcome, Ok(Message::Welcome(_))), "{welcome:?}");
    }
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        AsyncReadExt::read_to_end(&mut recv, &mut out),
    )
    .await;
    conn.close(0u32.into(), b"");
    out
}

#[test]
fn garbage_frames_leave_both_daemons_healthy() {
    let site = Site::new(3).unwrap();
    site.join(1, "intranet").unwrap();
    site.join(3, "intranet").unwrap();
    site.start_agent(1, &[]).unwrap();
    let seq0 = site.wait_reporting("n1", 0, T).unwrap().load.unwrap().seq;
    let lab = &site.lab;
    let to = lab.daemon_addr();
    let ca_pem = std::fs::read_to_string(site.state.join("ca.crt")).unwrap();
    let ca = tls::certs_from_pem("ca", &ca_pem).unwrap().remove(0);
    let fp = CaFingerprint::of(&ca);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = endpoint_in(lab, &lab.node_ns(2), None, 0);
        // 1,000 strangers, 25 at a time.
        let mut version_answers = 0;
        for batch in 0..40 {
            let mut set = tokio::task::JoinSet::new();
            for k in 0..25 {
                let i = batch * 25 + k;
                let bytes = stranger_case(i, &mut rand::rng());
                let cfg = client(tls::join_client_config(fp).unwrap());
                let ep = ep.clone();
                set.spawn(async move { (i, poke(&ep, cfg, to, bytes, false).await) });
            }
            while let Some(r) = set.join_next().await {
                let (i, answer) = r.unwrap();
                if i % 10 == 7 {
                    // The version refusal names our range and theirs.
                    let head: [u8; 10] = answer[..10].try_into().unwrap();
                    let p = Preamble::parse(&head).unwrap();
                    assert_eq!(p.chosen, 0);
                    assert_eq!(p.range, PROTOCOL_VERSIONS);
                    version_answers += 1;
                }
            }
        }
        assert_eq!(version_answers, 100);

        // 100 rounds of garbage from an enrolled node after a proper hello.
        let id = zy_lab::peer::node_identity(&site, 3);
        for i in 0..100 {
            let bytes = node_case(i, &mut rand::rng());
            let cfg =
                client(tls::daemon_client_config(&ca, id.0.clone(), id.1.clone_key()).unwrap());
            let answer = poke(&ep, cfg, to, bytes, true).await;
            // Where the node's garbage was readable as a frame, the coordinator explains.
            if i % 6 >= 3 {
                let mut buf = Vec::new();
                let mut r = answer.as_slice();
                let m: Message =
                    wire::read_frame(&mut r, PROTOCOL_VERSIONS.max, wire::MAX_BODY, &mut buf)
                        .await
                        .unwrap();
                assert!(
                    matches!(
                        m,
                        Message::Refused(Refusal {
                            code: RefusalCode::BadRequest,
                            ..
                        })
                    ),
                    "{m:?}"
                );
            }
        }
        ep.wait_idle().await;

        // Garbage at the HTTPS port: raw bytes, then TLS with nonsense HTTP.
        for _ in 0..50 {
            let mut tcp = lab
                .tcp_connect_in(&lab.coord_ns(), "10.77.0.1:7443".parse().unwrap())
                .unwrap();
            use std::io::{Read, Write};
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = tcp.write_all(&random(&mut rand::rng(), 3000));
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink);
        }
    });

    // The coordinator is healthy: alive, serving, the real agent still reporting, and a
    // new node can enroll.
    assert!(lab.is_running("coordinator"));
    site.wait_reporting("n1", seq0 + 2, T).unwrap();
    site.join(2, "extranet").unwrap();
    assert!(site.lab.log("coordinator").contains("broke the protocol"));

    // Now a rogue coordinator (with a certificate from the real CA) feeds an agent garbage.
    let ca_full = StateDir::new(&site.state).load_ca().unwrap();
    let server = ca_full.issue_server(&[]).unwrap();
    let chain = tls::certs_from_pem("chain", &server.cert_pem).unwrap();
    let key = tls::key_from_pem("key", &server.key_pem).unwrap();
    let scfg = tls::daemon_server_config(&ca, chain, key).unwrap();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(scfg).unwrap(),
    ));
    server_config.transport_config(zy_common::quic::transport(Duration::from_secs(5)));
    let cfg_path = site.lab.dir.join("agent-n2.toml");
    std::fs::write(&cfg_path, "max_backoff = \"1s\"\n").unwrap();
    let node2 = site
        .nodes()
        .unwrap()
        .into_iter()
        .find(|n| n.name == "n2")
        .unwrap()
        .id;
    rt.block_on(async {
        let ep = endpoint_in(lab, &lab.coord_ns(), Some(server_config), 7500);
        let cfg = cfg_path.to_string_lossy().into_owned();
        let dir = site.agent_dir(2).to_string_lossy().into_owned();
        lab.spawn(
            &lab.node_ns(2),
            "agent-n2",
            &zy_lab::bin("zy-agent"),
            &[
                "--config",
                &cfg,
                "--data-dir",
                &dir,
                "run",
                "--coordinator",
                "10.77.0.1:7500",
            ],
        )
        .unwrap();
        const CASES: usize = 13;
        for case in 0..=CASES {
            let incoming = tokio::time::timeout(T, ep.accept())
                .await
                .expect("the agent reconnects")
                .unwrap();
            let conn = incoming.await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut rng = rand::rng();
            let mut pre = [0u8; 10];
            recv.read_exact(&mut pre).await.unwrap();
            let good_pre = Preamble {
                range: PROTOCOL_VERSIONS,
                chosen: V,
            }
            .to_bytes();
            let welcome = |node| {
                frame(
                    V,
                    &Message::Welcome(Welcome {
                        node_id: node,
                        report_interval_ms: 1000,
                    }),
                )
            };
            let mut out: Vec<u8> = match case {
                0 => random(&mut rng, 500),
                1 => {
                    let mut p = good_pre;
                    p[0] = b'Q';
                    p.to_vec()
                }
                2 => Preamble {
                    range: PROTOCOL_VERSIONS,
                    chosen: 5,
                }
                .to_bytes()
                .to_vec(),
                _ => good_pre.to_vec(),
            };
            if case >= 3 {
                // Answer the preamble, then read the agent's hello.
                send.write_all(&out).await.unwrap();
                out.clear();
                let mut io = tokio::io::join(&mut recv, &mut send);
                let mut buf = Vec::new();
                let hello: Message =
                    wire::read_frame(&mut io, PROTOCOL_VERSIONS.max, wire::MAX_BODY, &mut buf)
                        .await
                        .unwrap_or_else(|e| panic!("case {case}: {e}"));
                assert!(matches!(hello, Message::Hello(_)));
            }
            match case {
                3 => {
                    out.extend(welcome(node2));
                    out.extend(random(&mut rng, 500));
                }
                4 => {
                    out.extend(welcome(node2));
                    out.extend(header(u32::MAX));
                }
                5 => {
                    out.extend(welcome(node2));
                    out.extend(frame(9, &Message::Load(load())));
                }
                6 => {
                    out.extend(welcome(node2));
                    out.extend(header(200));
                    out.extend([0u8; 5]);
                }
                7 => out.extend(welcome(zy_common::NodeId::new_random())),
                8 => {
                    out.extend(welcome(node2));
                    out.extend(frame(
                        V,
                        &Message::Command(Command {
                            id: 1,
                            kind: CommandKind::SetReportInterval { ms: 0 },
                        }),
                    ));
                }
                9 => {
                    out.extend(welcome(node2));
                    out.extend(frame(V, &join_request("x")));
                }
                10 => {
                    out.extend(welcome(node2));
                    out.extend(frame(
                        V,
                        &Message::Refused(Refusal {
                            code: RefusalCode::Internal,
                            message: "try later".into(),
                        }),
                    ));
                }
                11 => out.extend(frame(V, &Message::Load(load()))),
                12 => {
                    out.extend(welcome(node2));
                    let mut f = frame(
                        V,
                        &Message::Command(Command {
                            id: 2,
                            kind: CommandKind::Ping,
                        }),
                    );
                    let at = rng.random_range(8..f.len());
                    f[at] = 0xff;
                    out.extend(f);
                }
                _ => {}
            }
            if case < CASES {
                let _ = send.write_all(&out).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                continue;
            }
            // The last connection is honest: the agent answers a ping and reports load.
            out.extend(welcome(node2));
            out.extend(frame(
                V,
                &Message::Command(Command {
                    id: 42,
                    kind: CommandKind::Ping,
                }),
            ));
            send.write_all(&out).await.unwrap();
            let mut io = tokio::io::join(&mut recv, &mut send);
            let mut buf = Vec::new();
            let (mut pong, mut loads) = (false, 0);
            while !(pong && loads >= 1) {
                let m: Message = tokio::time::timeout(
                    T,
                    wire::read_frame(&mut io, PROTOCOL_VERSIONS.max, wire::MAX_BODY, &mut buf),
                )
                .await
                .unwrap()
                .unwrap();
                match m {
                    Message::Reply(Reply {
                        id: 42,
                        result: Ok(ReplyKind::Pong),
                    }) => pong = true,
                    Message::Load(_) => loads += 1,
                    Message::VmReport(r) => assert!(r.vms.is_empty()),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    });
    assert!(lab.is_running("agent-n2"), "the agent survived every case");
    let log = lab.log("agent-n2");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("broke the protocol"), "{log}");
    wait_for("n1 still reporting", T, || {
        site.wait_reporting("n1", seq0 + 4, T).ok()
    })
    .unwrap();
}
