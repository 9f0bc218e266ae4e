//! The node's virtual networks, through netlink (rtnetlink; no `ip` commands).
//!
//! One *segment* per network (a VXLAN VNI): a bridge `zybr<vni>` and a VXLAN device
//! `zyvx<vni>` joined to it, with one all-zeros FDB entry per peer node (head-end
//! replication over unicast, no multicast needed in the underlay). VM taps join the
//! bridge. Zones never share a segment: the bridge's alias records its zone and VNI, and a
//! segment that exists for another zone is refused rather than reused. The MTU leaves 50
//! bytes for the VXLAN header.
//!
//! ```text
//!   tap (VM) --+
//!   tap (VM) --+-- zybr<vni> -- zyvx<vni> ==UDP 4789==> peer nodes of the same zone
//! ```
//!
//! The rest of the agent sees only [`Networks`]: join a VM's taps, leave, update a
//! segment's peers. [`Netdev`] is its netlink implementation (tested as root in
//! `tests/tests/netdev.rs` and the lab); unit tests use an in-memory fake.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use futures_util::future::BoxFuture;
use futures_util::TryStreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkBridge, LinkUnspec, LinkVxlan};
use zy_common::Zone;

/// The VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes VXLAN adds to each frame (outer IPv4 + UDP + VXLAN + inner Ethernet).
pub const VXLAN_OVERHEAD: u32 = 50;
/// The backbone's MTU, assumed for now (jumbo frames would lift the guests' MTU with it).
pub const UNDERLAY_MTU: u32 = 1500;
/// The MTU a guest gets on a zone network: the underlay's less VXLAN's headers.
pub const OVERLAY_MTU: u32 = UNDERLAY_MTU - VXLAN_OVERHEAD;

/// What failed on the host's network.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink refused to {action} `{name}`")]
    Netlink {
        action: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("`{0}` does not exist")]
    Missing(String),
    #[error("segment {vni} exists on this node for zone {found}, not {wanted}: zones never share a segment")]
    ZoneClash {
        vni: u32,
        found: String,
        wanted: Zone,
    },
    #[error("VNI {0} is outside 1..=16777215")]
    BadVni(u32),
}

/// One virtual network on this node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub vni: u32,
    pub zone: Zone,
    /// This node's underlay address (the VXLAN source).
    pub local: Ipv4Addr,
    /// The underlay addresses of the other nodes with this segment.
    pub peers: BTreeSet<Ipv4Addr>,
    /// MTU of the underlay; the segment's is 50 less.
    pub underlay_mtu: u32,
}

impl Segment {
    pub fn bridge(&self) -> String {
        format!("zybr{}", self.vni)
    }
    pub fn vxlan(&self) -> String {
        format!("zyvx{}", self.vni)
    }
    pub fn mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    }
    fn alias(&self) -> String {
        format!("zy:{}:{}", self.zone, self.vni)
    }
}

/// The node's networks as VMs need them. Each call is one change of the node's networks:
/// an implementation makes them one at a time, so that two VMs making or releasing the same
/// segment never interleave.
pub trait Networks: Send + Sync + std::fmt::Debug {
    /// Joins each port (a VM's tap, by name) to its segment, making the segment first if
    /// needed; idempotent.
    fn join<'a>(&'a self, ports: &'a [(String, Segment)])
        -> BoxFuture<'a, Result<(), NetdevError>>;

    /// Releases the segments of these ports that nothing else uses any more (the ports
    /// themselves went with their VM); what could not be released.
    fn leave<'a>(&'a self, ports: &'a [(String, Segment)]) -> BoxFuture<'a, Vec<NetdevError>>;

    /// Makes segment `vni`'s flood list exactly `peers`, if the segment is on this node.
    fn sync_peers<'a>(
        &'a self,
        vni: u32,
        peers: &'a BTreeSet<Ipv4Addr>,
    ) -> BoxFuture<'a, Result<(), NetdevError>>;
}

impl Networks for Netdev {
    fn join<'a>(
        &'a self,
        ports: &'a [(String, Segment)],
    ) -> BoxFuture<'a, Result<(), NetdevError>> {
        Box::pin(async move {
            let _one_at_a_time = self.changing().await;
            for (tap, seg) in ports {
                self.ensure_segment(seg).await?;
                self.attach(tap, seg).await?;
            }
            Ok(())
        })
    }

    fn leave<'a>(&'a self, ports: &'a [(String, Segment)]) -> BoxFuture<'a, Vec<NetdevError>> {
        Box::pin(async move {
            let _one_at_a_time = self.changing().await;
            let mut failed = Vec::new();
            for (_, seg) in ports {
                if let Err(e) = self.release_segment(seg).await {
                    failed.push(e);
                }
            }
            failed
        })
    }

    fn sync_peers<'a>(
        &'a self,
        vni: u32,
        peers: &'a BTreeSet<Ipv4Addr>,
    ) -> BoxFuture<'a, Result<(), NetdevError>> {
        Box::pin(async move {
            let vxlan = format!("zyvx{vni}");
            let _one_at_a_time = self.changing().await;
            if self.link(&vxlan).await?.is_none() {
                // No VM of that network here: nothing to update.
                return Ok(());
            }
            Netdev::sync_peers(self, &vxlan, peers).await
        })
    }
}

/// A netlink session with the host (or the namespace this runs in).
#[derive(Debug, Clone)]
pub struct Netdev {
    handle: rtnetlink::Handle,
    /// Network changes one at a time: all requests share one netlink socket, on which the
    /// kernel runs one dump at a time (a second gets EBUSY), and two VMs making or
    /// releasing the same segment at once must not interleave.
    changes: std::sync::Arc<tokio::sync::Mutex<()>>,
}

fn nl(action: &'static str, name: &str) -> impl FnOnce(rtnetlink::Error) -> NetdevError {
    let name = name.to_string();
    move |source| NetdevError::Netlink {
        action,
        name,
        source,
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

impl Netdev {
    /// Opens netlink; the connection runs on the current tokio runtime.
    pub fn new() -> Result<Self, NetdevError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetdevError::Socket)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            changes: Default::default(),
        })
    }

    /// Holds off every other change of the node's networks while the guard lives; callers
    /// that make, join, release or re-peer segments take it first.
    pub async fn changing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// A link by name, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetdevError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_errno(&e, libc_enodev()) => Ok(None),
            Err(e) => Err(nl("look up", name)(e)),
        }
    }

    async fn index(&self, name: &str) -> Result<u32, NetdevError> {
        self.link(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| NetdevError::Missing(name.to_string()))
    }

    /// Makes sure the segment exists as described: bridge, VXLAN device, peers.
    pub async fn ensure_segment(&self, seg: &Segment) -> Result<(), NetdevError> {
        if seg.vni == 0 || seg.vni > 0x00ff_ffff {
            return Err(NetdevError::BadVni(seg.vni));
        }
        let br = seg.bridge();
        match self.link(&br).await? {
            Some(m) => {
                let alias = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfAlias(s) => Some(s.clone()),
                    _ => None,
                });
                match alias {
                    Some(a) if a == seg.alias() => {}
                    // A bridge of ours whose creation was interrupted before its alias
                    // was set: adopt it.
                    None => self.set_alias(m.header.index, seg).await?,
                    Some(a) => {
                        return Err(NetdevError::ZoneClash {
                            vni: seg.vni,
                            found: a,
                            wanted: seg.zone,
                        })
                    }
                }
            }
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(&br).mtu(seg.mtu()).build())
                    .execute()
                    .await
                    .map_err(nl("create bridge", &br))?;
                // The kernel takes an alias only on a change, not at creation.
                let index = self.index(&br).await?;
                self.set_alias(index, seg).await?;
            }
        }
        let br_index = self.index(&br).await?;
        let vx = seg.vxlan();
        if self.link(&vx).await?.is_none() {
            self.handle
                .link()
                .add(
                    LinkVxlan::new(&vx, seg.vni)
                        .local(seg.local)
                        .port(VXLAN_PORT)
                        .learning(true)
                        .mtu(seg.mtu())
                        .controller(br_index)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl("create VXLAN device", &vx))?;
        }
        self.sync_peers(&vx, &seg.peers).await
    }

    async fn set_alias(&self, index: u32, seg: &Segment) -> Result<(), NetdevError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).alias(seg.alias()).build())
            .execute()
            .await
            .map_err(nl("label", &seg.bridge()))
    }

    /// Makes the VXLAN device's flood list exactly `peers`.
    pub async fn sync_peers(
        &self,
        vxlan: &str,
        peers: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), NetdevError> {
        let index = self.index(vxlan).await?;
        let have = self.flood_list(index).await?;
        for p in peers.difference(&have) {
            self.fdb(index, *p, true)
                .await
                .map_err(nl("add a peer to", vxlan))?;
        }
        for p in have.difference(peers) {
            self.fdb(index, *p, false)
                .await
                .map_err(nl("remove a peer from", vxlan))?;
        }
        Ok(())
    }

    async fn flood_list(&self, index: u32) -> Result<BTreeSet<Ipv4Addr>, NetdevError> {
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        let mut out = BTreeSet::new();
        let what = format!("the VXLAN device #{index}");
        while let Some(m) = s.try_next().await.map_err(nl("list the FDB of", &what))? {
            if m.header.ifindex != index {
                continue;
            }
            let zero = m.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l.iter().all(|b| *b == 0))
            });
            let dst = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            if let (true, Some(ip)) = (zero, dst) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// `bridge fdb append|del 00:00:00:00:00:00 dev <vxlan> dst <peer>`.
    async fn fdb(&self, index: u32, peer: Ipv4Addr, add: bool) -> Result<(), rtnetlink::Error> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                peer,
            )));
        let mut req = NetlinkMessage::from(if add {
            RouteNetlinkMessage::NewNeighbour(msg)
        } else {
            RouteNetlinkMessage::DelNeighbour(msg)
        });
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        if add {
            req.header.flags |= NLM_F_CREATE | NLM_F_APPEND;
        }
        let mut handle = self.handle.clone();
        let mut resp = handle.request(req)?;
        while let Some(m) = futures_util::StreamExt::next(&mut resp).await {
            if let NetlinkPayload::Error(e) = m.payload {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }

    /// Joins a port (a VM's tap) to a segment's bridge, with the segment's MTU, and brings
    /// it up.
    pub async fn attach(&self, port: &str, seg: &Segment) -> Result<(), NetdevError> {
        let port_index = self.index(port).await?;
        let br_index = self.index(&seg.bridge()).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(port_index)
                    .controller(br_index)
                    .mtu(seg.mtu())
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("attach", port))
    }

    /// The ports of a bridge other than its VXLAN device.
    pub async fn users(&self, seg: &Segment) -> Result<Vec<String>, NetdevError> {
        let Some(br) = self.link(&seg.bridge()).await? else {
            return Ok(Vec::new());
        };
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        let vx = seg.vxlan();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(nl("list the links of", &seg.bridge()))?
        {
            let controller = m
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(i) if *i == br.header.index));
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let (true, Some(n)) = (controller, name) {
                if n != vx {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Removes a segment when nothing but its VXLAN device uses it. Returns whether it did.
    pub async fn release_segment(&self, seg: &Segment) -> Result<bool, NetdevError> {
        if !self.users(seg).await?.is_empty() {
            return Ok(false);
        }
        for name in [seg.vxlan(), seg.bridge()] {
            if let Some(m) = self.link(&name).await? {
                self.handle
                    .link()
                    .del(m.header.index)
                    .execute()
                    .await
                    .map_err(nl("delete", &name))?;
            }
        }
        Ok(true)
    }
}

/// ENODEV: what the kernel answers for a link that does not exist.
const fn libc_enodev() -> i32 {
    19
}
