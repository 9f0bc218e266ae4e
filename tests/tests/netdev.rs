//! The agent's netlink networking, for real, in two lab nodes: a segment per zone joined
//! across nodes by VXLAN, ports attached, zones kept apart, and nothing left behind.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use zy_agent::netdev::{Netdev, NetdevError, Segment};
use zy_common::Zone;
use zy_lab::{sh, Lab};

fn segment(lab: &Lab, node: usize, vni: u32, zone: Zone) -> Segment {
    let other = if node == 1 { 2 } else { 1 };
    Segment {
        vni,
        zone,
        local: lab.node_ip(node),
        peers: BTreeSet::from([lab.node_ip(other)]),
        underlay_mtu: 1500,
    }
}

/// Runs async netlink work inside a node's namespace.
fn on<T: Send>(lab: &Lab, node: usize, f: impl AsyncFnOnce(Netdev) -> T + Send) -> T {
    lab.run_in(&lab.node_ns(node), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let nd = Netdev::new().unwrap();
            f(nd).await
        })
    })
}

/// A probe: a veth pair in the node's namespace, one end on the segment, the other with an
/// address, standing in for a VM.
fn probe(lab: &Lab, node: usize, name: &str, seg: &Segment, ip: &str) {
    let ns = lab.node_ns(node);
    sh(
        "ip",
        &[
            "-n",
            &ns,
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{name}p"),
        ],
    )
    .unwrap();
    let s = seg.clone();
    let n = name.to_string();
    on(lab, node, async move |nd| nd.attach(&n, &s).await.unwrap());
    sh(
        "ip",
        &["-n", &ns, "addr", "add", ip, "dev", &format!("{name}p")],
    )
    .unwrap();
    sh("ip", &["-n", &ns, "link", "set", &format!("{name}p"), "up"]).unwrap();
}

fn reaches(lab: &Lab, from: usize, to: SocketAddr) -> bool {
    lab.run_in(&lab.node_ns(from), || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok()
    })
}

#[test]
fn segments_join_nodes_keep_zones_apart_and_leave_nothing() {
    let lab = Lab::new(2).unwrap();
    // The second node answers ARP only on the interface that holds the address, so the
    // isolation check below cannot pass by accident.
    for k in ["all", "default"] {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &lab.node_ns(2),
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{k}.arp_ignore=1"),
            ],
        )
        .unwrap();
    }
    for node in [1, 2] {
        for (vni, zone) in [(100, Zone::Intranet), (200, Zone::Extranet)] {
            let s = segment(&lab, node, vni, zone);
            on(&lab, node, async move |nd| {
                nd.ensure_segment(&s).await.unwrap();
                // Idempotent.
                nd.ensure_segment(&s).await.unwrap();
            });
        }
    }
    probe(
        &lab,
        1,
        "zyq1",
        &segment(&lab, 1, 100, Zone::Intranet),
        "192.168.77.1/24",
    );
    probe(
        &lab,
        2,
        "zyq2",
        &segment(&lab, 2, 100, Zone::Intranet),
        "192.168.77.2/24",
    );
    probe(
        &lab,
        2,
        "zyq3",
        &segment(&lab, 2, 200, Zone::Extranet),
        "192.168.77.3/24",
    );
    // A listener on each address of node 2.
    let listeners: Vec<std::net::TcpListener> = ["192.168.77.2:9000", "192.168.77.3:9000"]
        .iter()
        .map(|a| lab.run_in(&lab.node_ns(2), || std::net::TcpListener::bind(a).unwrap()))
        .collect();
    assert!(
        reaches(&lab, 1, "192.168.77.2:9000".parse().unwrap()),
        "same zone across nodes"
    );
    assert!(
        !reaches(&lab, 1, "192.168.77.3:9000".parse().unwrap()),
        "the other zone is unreachable"
    );
    drop(listeners);

    // A segment of one zone is never reused for the other.
    let clash = segment(&lab, 1, 100, Zone::Extranet);
    let err = on(&lab, 1, async move |nd| {
        nd.ensure_segment(&clash).await.unwrap_err()
    });
    assert!(matches!(err, NetdevError::ZoneClash { .. }), "{err}");

    // The MTU leaves room for VXLAN, and peers can be changed.
    let s = segment(&lab, 1, 100, Zone::Intranet);
    let (mtu, users) = on(&lab, 1, async move |nd| {
        let m = nd.link("zyq1").await.unwrap().unwrap();
        let mtu = m.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        nd.sync_peers(&s.vxlan(), &BTreeSet::from([Ipv4Addr::new(10, 77, 0, 99)]))
            .await
            .unwrap();
        (mtu, nd.users(&s).await.unwrap())
    });
    assert_eq!(mtu, Some(1450));
    assert_eq!(users, vec!["zyq1".to_string()]);

    // Released only when its last user is gone, then nothing is left.
    let s = segment(&lab, 1, 100, Zone::Intranet);
    let s2 = s.clone();
    assert!(!on(&lab, 1, async move |nd| nd
        .release_segment(&s2)
        .await
        .unwrap()));
    sh("ip", &["-n", &lab.node_ns(1), "link", "del", "zyq1"]).unwrap();
    let left = on(&lab, 1, async move |nd| {
        assert!(nd.release_segment(&s).await.unwrap());
        (
            nd.link("zybr100").await.unwrap().is_some(),
            nd.link("zyvx100").await.unwrap().is_some(),
        )
    });
    assert_eq!(left, (false, false));
}
