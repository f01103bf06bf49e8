//! The netlink source: a dump of every link, then RTNLGRP_LINK notifications, decoded into
//! plain [`LinkSnapshot`]s and [`NetlinkEvent`]s the model understands.
//!
//! Netlink always runs: it is the fallback where eBPF cannot attach, the resync source after a
//! lost notification (ENOBUFS arrives as an overrun message), and the check that a repair took.
//! Port states come from two kinds of message: AF_UNSPEC link messages carry them in the bridge
//! slave data, and the bridge sends AF_BRIDGE messages on every port-state change, including
//! those its STP timers make.

use futures::{StreamExt as _, TryStreamExt as _};
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{
        AfSpecBridge, BridgeId, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData,
        InfoTun, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
        LinkProtoInfoBridge, State,
    },
};
use rtnetlink::Handle;

use super::notifications::Notifications;

use crate::event::{PortState, StpMode};

/// `IFLA_BRPORT_STATE`, inside AF_BRIDGE `IFLA_PROTINFO`.
const IFLA_BRPORT_STATE: u16 = 1;
/// Receive buffer for notifications: large enough that bursts (a bridge with many ports
/// flapping) do not overrun it; overruns are survivable (resync) but cost a dump.
const RX_BUFFER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot subscribe to link notifications")]
    Subscribe(#[source] std::io::Error),
    #[error("link dump failed")]
    Dump(#[source] rtnetlink::Error),
    #[error("no answer from the kernel to a {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error(
        "every one of {attempts} link dumps was interrupted by concurrent changes (NLM_F_DUMP_INTR)"
    )]
    Inconsistent { attempts: u32 },
}

/// What a link is, as far as repair safety is concerned.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkKind {
    Bridge,
    Veth,
    /// A tun/tap device. `tap`: TAP (Ethernet) mode; `vnet_hdr`: opened with virtio-net headers,
    /// as VM monitors (QEMU, Firecracker, cloud-hypervisor) open theirs and VPNs (OpenVPN, tinc,
    /// ZeroTier) do not. `None` where the kernel did not say (`IFLA_TUN_*`, Linux 4.15+).
    Tun {
        tap: Option<bool>,
        vnet_hdr: Option<bool>,
    },
    /// vxlan, gre(tap), erspan, geneve, l2tp, ipip, sit…: traffic leaves the host through it.
    Tunnel(String),
    Bond,
    /// team, macsec, hsr/prp, batman-adv, Open vSwitch, dsa…: a layer-2 device that aggregates,
    /// encrypts or switches frames over other links, which may leave the host.
    Overlay(String),
    /// vlan, macvlan, ipvlan…: stacked on another device (`IFLA_LINK`).
    Stacked(String),
    /// No `IFLA_INFO_KIND`: a driver-backed device, normally a physical NIC.
    Physical,
    Loopback,
    /// dummy, ifb, nlmon: devices that never carry frames off the host.
    Local(String),
    /// A kind this version does not know: it may leave the host.
    Other(String),
}

impl Default for LinkKind {
    fn default() -> Self {
        Self::Other(String::new())
    }
}

/// `IFLA_TUN_TYPE`, `IFLA_TUN_VNET_HDR` inside a tun device's `IFLA_INFO_DATA`.
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_VNET_HDR: u16 = 5;
/// `IFF_TAP` in `IFLA_TUN_TYPE`.
const IFF_TAP: u8 = 2;

impl LinkKind {
    fn from_info(kind: Option<&InfoKind>, layer: LinkLayerType) -> Self {
        let Some(kind) = kind else {
            return if layer == LinkLayerType::Loopback {
                Self::Loopback
            } else {
                Self::Physical
            };
        };
        match kind {
            InfoKind::Bridge => Self::Bridge,
            InfoKind::Veth => Self::Veth,
            InfoKind::Tun => Self::Tun {
                tap: None,
                vnet_hdr: None,
            },
            InfoKind::Bond => Self::Bond,
            InfoKind::Vxlan
            | InfoKind::GreTap
            | InfoKind::GreTap6
            | InfoKind::GreTun
            | InfoKind::GreTun6
            | InfoKind::ErSpan
            | InfoKind::Ip6ErSpan
            | InfoKind::Geneve
            | InfoKind::BareUdp
            | InfoKind::Amt
            | InfoKind::Gtp
            | InfoKind::Pfcp
            | InfoKind::IpIp
            | InfoKind::Ip6Tnl
            | InfoKind::SitTun
            | InfoKind::Vti
            | InfoKind::Vti6
            | InfoKind::Xfrm
            | InfoKind::Wireguard => Self::Tunnel(kind.to_string()),
            InfoKind::Team
            | InfoKind::MacSec
            | InfoKind::Hsr
            | InfoKind::BatAdv
            | InfoKind::Dsa
            | InfoKind::RmNet
            | InfoKind::Wwan
            | InfoKind::Ipoib => Self::Overlay(kind.to_string()),
            InfoKind::Vlan
            | InfoKind::MacVlan
            | InfoKind::MacVtap
            | InfoKind::IpVlan
            | InfoKind::IpVtap
            | InfoKind::VirtWifi => Self::Stacked(kind.to_string()),
            InfoKind::Dummy | InfoKind::Ifb | InfoKind::Nlmon => Self::Local(kind.to_string()),
            InfoKind::Other(k) => match k.as_str() {
                "l2tpeth" => Self::Tunnel(k.clone()),
                "openvswitch" => Self::Overlay(k.clone()),
                _ => Self::Other(k.clone()),
            },
            other => Self::Other(other.to_string()),
        }
    }
}

/// A bridge identifier (802.1D): priority and MAC, as `8000.525400aabbcc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct BridgeIdent {
    pub priority: u16,
    pub mac: [u8; 6],
}

impl BridgeIdent {
    fn from_netlink(id: &BridgeId) -> Self {
        Self {
            priority: id.priority,
            mac: id.address,
        }
    }
}

impl std::fmt::Display for BridgeIdent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}.", self.priority)?;
        self.mac.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What kernel STP knows about a bridge port (`IFLA_BRPORT_*`): whose BPDUs it hears.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StpPort {
    pub designated_root: Option<BridgeIdent>,
    pub designated_bridge: Option<BridgeIdent>,
    pub designated_port: Option<u16>,
    /// This port's own STP port id (priority and number).
    pub port_id: Option<u16>,
    pub port_no: Option<u16>,
}

/// One link as an AF_UNSPEC link message describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkSnapshot {
    pub ifindex: u32,
    pub name: String,
    pub kind: LinkKind,
    pub master: Option<u32>,
    /// `IFF_UP`: administratively up.
    pub admin_up: bool,
    /// `IFF_LOWER_UP`: carrier.
    pub carrier: bool,
    /// RFC 2863 operational state is up (what the bridge requires to forward).
    pub oper_up: bool,
    /// The device this one is stacked on (`IFLA_LINK`), in this namespace.
    pub lower: Option<u32>,
    /// Has a switch ID: hardware-offloaded (switchdev).
    pub switchdev: bool,
    /// For bridge ports: the STP port state.
    pub port_state: Option<PortState>,
    /// For bridges: the STP mode.
    pub stp: Option<StpMode>,
    /// The MAC address (`IFLA_ADDRESS`), for Ethernet-like devices.
    pub address: Option<[u8; 6]>,
    /// `IFLA_LINK_NETNSID`: `lower` (a veth's peer, a vlan's parent) is in the namespace with
    /// this id, not in this one.
    pub link_netnsid: Option<i32>,
    /// For bridges: the bridge's own STP identifier and the root it believes in.
    pub bridge_id: Option<BridgeIdent>,
    pub root_id: Option<BridgeIdent>,
    /// For bridge ports: what kernel STP knows about the port.
    pub stp_port: StpPort,
}

/// A change reported by netlink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetlinkEvent {
    /// A link appeared or changed (AF_UNSPEC RTM_NEWLINK).
    Link(LinkSnapshot),
    /// A link was deleted (AF_UNSPEC RTM_DELLINK).
    Removed { ifindex: u32, name: String },
    /// A bridge port's state (AF_BRIDGE RTM_NEWLINK).
    PortState {
        ifindex: u32,
        master: Option<u32>,
        state: PortState,
    },
    /// Notifications were lost (ENOBUFS): the model must resync from a dump.
    Overrun,
}

fn port_state(raw: u8) -> Option<PortState> {
    PortState::from_kernel(raw)
}

/// Decodes an AF_UNSPEC link message.
pub fn snapshot(msg: &LinkMessage) -> LinkSnapshot {
    let mut snap = LinkSnapshot {
        ifindex: msg.header.index,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        carrier: msg.header.flags.contains(LinkFlags::LowerUp),
        ..LinkSnapshot::default()
    };
    let mut info_kind = None;
    let mut oper = None;
    let mut tun = (None, None);
    // A veth whose peer lives in another namespace names it by that namespace's ifindex, which
    // may equal this link's own: only a same-namespace self-reference means "no lower device".
    let netnsid = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    });
    snap.link_netnsid = netnsid;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => snap.name.clone_from(n),
            LinkAttribute::Controller(m) if *m != 0 => snap.master = Some(*m),
            LinkAttribute::Link(l) if *l != 0 && (netnsid.is_some() || *l != msg.header.index) => {
                snap.lower = Some(*l);
            }
            LinkAttribute::PhysSwitchId(_) => snap.switchdev = true,
            LinkAttribute::OperState(s) => oper = Some(*s),
            LinkAttribute::Address(a) => snap.address = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => info_kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Bridge(data)) => decode_bridge(data, &mut snap),
                        LinkInfo::Data(InfoData::Tun(data)) => tun = decode_tun(data),
                        LinkInfo::PortData(InfoPortData::BridgePort(data)) => {
                            decode_bridge_port(data, &mut snap);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    snap.kind = match LinkKind::from_info(info_kind.as_ref(), msg.header.link_layer_type) {
        LinkKind::Tun { .. } => LinkKind::Tun {
            tap: tun.0,
            vnet_hdr: tun.1,
        },
        kind => kind,
    };
    // Devices without operstate support report "unknown" while working: count them as up when
    // they are admin-up with carrier, as the bridge does (netif_oper_up).
    snap.oper_up = match oper {
        Some(State::Up) => true,
        Some(State::Unknown) | None => snap.admin_up && snap.carrier,
        Some(_) => false,
    };
    snap
}

fn decode_bridge(data: &[InfoBridge], snap: &mut LinkSnapshot) {
    for d in data {
        match d {
            InfoBridge::StpState(s) => snap.stp = StpMode::from_kernel(u32::from(*s)),
            InfoBridge::BridgeId(id) => snap.bridge_id = Some(BridgeIdent::from_netlink(id)),
            InfoBridge::RootId(id) => snap.root_id = Some(BridgeIdent::from_netlink(id)),
            _ => {}
        }
    }
}

fn decode_bridge_port(data: &[InfoBridgePort], snap: &mut LinkSnapshot) {
    let stp = &mut snap.stp_port;
    for d in data {
        match d {
            InfoBridgePort::State(s) => snap.port_state = port_state(u8::from(*s)),
            // The kernel's names: IFLA_BRPORT_ROOT_ID is the port's designated root,
            // IFLA_BRPORT_BRIDGE_ID its designated bridge.
            InfoBridgePort::RootId(id) => stp.designated_root = Some(BridgeIdent::from_netlink(id)),
            InfoBridgePort::BridgeId(id) => {
                stp.designated_bridge = Some(BridgeIdent::from_netlink(id));
            }
            InfoBridgePort::DesignatedPort(p) => stp.designated_port = Some(*p),
            InfoBridgePort::PortId(p) => stp.port_id = Some(*p),
            InfoBridgePort::PortNumber(p) => stp.port_no = Some(*p),
            _ => {}
        }
    }
}

/// `(TAP mode, virtio-net header)` from a tun device's `IFLA_INFO_DATA`.
fn decode_tun(data: &[InfoTun]) -> (Option<bool>, Option<bool>) {
    use netlink_packet_core::Nla as _;
    let mut out = (None, None);
    for d in data {
        let InfoTun::Other(nla) = d else { continue };
        if nla.value_len() != 1 {
            continue;
        }
        let mut v = [0u8; 1];
        nla.emit_value(&mut v);
        match nla.kind() {
            IFLA_TUN_TYPE => out.0 = Some(v[0] & IFF_TAP != 0),
            IFLA_TUN_VNET_HDR => out.1 = Some(v[0] != 0),
            _ => {}
        }
    }
    out
}

/// The port state inside an AF_BRIDGE link message, with the port's master.
fn bridge_port_state(msg: &LinkMessage) -> Option<(Option<u32>, PortState)> {
    let mut master = None;
    let mut state = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Controller(m) if *m != 0 => master = Some(*m),
            LinkAttribute::ProtoInfoBridge(infos) => {
                for info in infos {
                    if let LinkProtoInfoBridge::Other(nla) = info {
                        use netlink_packet_core::Nla as _;
                        if nla.kind() == IFLA_BRPORT_STATE && nla.value_len() == 1 {
                            let mut v = [0u8; 1];
                            nla.emit_value(&mut v);
                            state = port_state(v[0]);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    state.map(|s| (master, s))
}

/// Decodes one notification; `None` for messages the model does not need.
pub fn decode(msg: &NetlinkMessage<RouteNetlinkMessage>) -> Option<NetlinkEvent> {
    match &msg.payload {
        NetlinkPayload::Overrun(_) => Some(NetlinkEvent::Overrun),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
            if link.header.interface_family == AddressFamily::Bridge {
                bridge_port_state(link).map(|(master, state)| NetlinkEvent::PortState {
                    ifindex: link.header.index,
                    master,
                    state,
                })
            } else {
                Some(NetlinkEvent::Link(snapshot(link)))
            }
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
            if link.header.interface_family != AddressFamily::Bridge =>
        {
            Some(NetlinkEvent::Removed {
                ifindex: link.header.index,
                name: snapshot(link).name,
            })
        }
        _ => None,
    }
}

/// Link notifications on their own socket, plus a connection for requests (repairs, dumps).
pub struct Netlink {
    pub handle: Handle,
    pub notifications: Notifications,
}

impl Netlink {
    /// Opens both sockets in this process's network namespace, subscribed to RTNLGRP_LINK.
    /// Must be called inside a tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        // Subscribed first: nothing that happens from now on is missed by a dump taken later.
        let notifications = Notifications::open()?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(drive(conn));
        Ok(Self {
            handle,
            notifications,
        })
    }

    /// Dumps every link, consistently.
    pub async fn dump(&self) -> Result<Vec<LinkSnapshot>, NetlinkError> {
        dump_consistent(&self.handle).await
    }
}

/// Polls a netlink connection until it has sent what is queued, each time it wakes.
///
/// netlink-proto sends one request per poll and then waits to be woken, which the kernel's
/// answer does: a plan's requests went out one wake-up of the runtime each, a task switch
/// apiece (a recreated bridge's ten requests took milliseconds). The kernel answers each
/// request inside its `sendto`, so polling again at once reads that answer and sends the next
/// request. A poll with nothing to do makes no system call (the socket's readiness is known),
/// so the bound costs an idle wake-up nothing worth counting.
async fn drive<F: Future<Output = ()> + Unpin>(mut conn: F) {
    /// Requests sent per wake-up at most: above any plan's size, and a bound so that a flood
    /// of requests still lets the runtime's other tasks run between bursts.
    const POLLS_PER_WAKE: usize = 32;
    std::future::poll_fn(|cx| {
        for _ in 0..POLLS_PER_WAKE {
            if std::pin::Pin::new(&mut conn).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await;
}

/// Asks for [`RX_BUFFER`] bytes of receive buffer: past `net.core.rmem_max` with
/// SO_RCVBUFFORCE (CAP_NET_ADMIN), else as much as SO_RCVBUF allows. A larger buffer is a
/// nicety (an overrun costs a dump, not correctness), so failing only gets a log line.
pub(super) fn grow_rx_buffer(socket: &mut netlink_sys::Socket) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let want = libc::c_int::try_from(RX_BUFFER).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket fd and a c_int option value of the right length.
    let forced = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&want).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    let how = if forced {
        "SO_RCVBUFFORCE"
    } else {
        let _ = socket.set_rx_buf_sz(RX_BUFFER);
        "SO_RCVBUF, capped by net.core.rmem_max: SO_RCVBUFFORCE needs CAP_NET_ADMIN"
    };
    // The kernel reports twice what it grants to data (the rest is its bookkeeping).
    let got = socket.get_rx_buf_sz().map_or(0, |n| n / 2);
    if forced {
        tracing::debug!("netlink receive buffer: {} KiB ({how})", got / 1024);
    } else {
        tracing::info!("netlink receive buffer: {} KiB ({how})", got / 1024);
    }
}

/// How long a dump may take before it is abandoned.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(2);
/// Dumps tried before giving up on a consistent one.
const DUMP_ATTEMPTS: u32 = 3;

/// Every link, from one dump.
#[derive(Debug)]
pub struct Dump {
    pub links: Vec<LinkSnapshot>,
    /// False when every attempt was interrupted by concurrent changes: the links may miss or
    /// repeat some; the caller should dump again once things calm down.
    pub consistent: bool,
}

/// Dumps every link through `handle`. A dump the kernel marks interrupted (NLM_F_DUMP_INTR:
/// links were added or removed while it ran, so it may miss or repeat some) is taken again, up
/// to [`DUMP_ATTEMPTS`] times; each attempt is bounded by [`DUMP_TIMEOUT`].
pub async fn dump(handle: &Handle) -> Result<Dump, NetlinkError> {
    let mut last = Vec::new();
    for attempt in 1..=DUMP_ATTEMPTS {
        let (links, interrupted) = tokio::time::timeout(DUMP_TIMEOUT, dump_once(handle))
            .await
            .map_err(|_| NetlinkError::Timeout {
                what: "link dump",
                after: DUMP_TIMEOUT,
            })??;
        if !interrupted {
            return Ok(Dump {
                links,
                consistent: true,
            });
        }
        tracing::debug!(
            attempt,
            "link dump interrupted by concurrent changes; dumping again"
        );
        last = links;
    }
    Ok(Dump {
        links: last,
        consistent: false,
    })
}

/// [`dump`], insisting on a consistent one.
pub async fn dump_consistent(handle: &Handle) -> Result<Vec<LinkSnapshot>, NetlinkError> {
    let d = dump(handle).await?;
    if d.consistent {
        Ok(d.links)
    } else {
        Err(NetlinkError::Inconsistent {
            attempts: DUMP_ATTEMPTS,
        })
    }
}

/// One link dump, and whether the kernel flagged it interrupted.
async fn dump_once(handle: &Handle) -> Result<(Vec<LinkSnapshot>, bool), NetlinkError> {
    let mut msg = LinkMessage::default();
    // Statistics are most of each message's size and none of the model's business.
    msg.attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut responses = handle.clone().request(req).map_err(NetlinkError::Dump)?;
    let mut links = Vec::new();
    let mut interrupted = false;
    while let Some(msg) = responses.next().await {
        interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                links.push(snapshot(&link));
            }
            NetlinkPayload::Error(e) => {
                return Err(NetlinkError::Dump(rtnetlink::Error::NetlinkError(e)));
            }
            _ => {}
        }
    }
    Ok((links, interrupted))
}

/// `IFLA_BRIDGE_MRP`, inside an AF_BRIDGE message's `IFLA_AF_SPEC`.
const IFLA_BRIDGE_MRP: u16 = 4;

/// Whether an AF_BRIDGE message (dumped with the MRP filter) says MRP runs on this bridge.
pub fn has_mrp(msg: &LinkMessage) -> bool {
    use netlink_packet_core::Nla as _;
    msg.attributes.iter().any(|a| match a {
        LinkAttribute::AfSpecBridge(specs) => specs
            .iter()
            .any(|s| matches!(s, AfSpecBridge::Other(nla) if nla.kind() == IFLA_BRIDGE_MRP)),
        _ => false,
    })
}

/// The bridges MRP (media redundancy, IEC 62439-2) runs on: it drives port states itself.
pub async fn mrp_bridges(handle: &Handle) -> Result<Vec<u32>, NetlinkError> {
    let dump = handle
        .link()
        .get()
        .set_filter_mask(AddressFamily::Bridge, vec![LinkExtentMask::Mrp])
        .execute()
        .try_filter_map(|m| async move { Ok(has_mrp(&m).then_some(m.header.index)) })
        .try_collect();
    tokio::time::timeout(DUMP_TIMEOUT, dump)
        .await
        .map_err(|_| NetlinkError::Timeout {
            what: "bridge MRP dump",
            after: DUMP_TIMEOUT,
        })?
        .map_err(NetlinkError::Dump)
}

/// Every bridge port as the AF_BRIDGE dump lists them: `(port ifindex, bridge ifindex)`. Its
/// messages are small, so a port whose AF_UNSPEC message could not be decoded (and was dropped)
/// still shows here: the planner counts such a port as a hazard instead of not seeing it.
pub async fn bridge_ports(handle: &Handle) -> Result<Vec<(u32, u32)>, NetlinkError> {
    handle
        .link()
        .get()
        .set_filter_mask(AddressFamily::Bridge, vec![])
        .execute()
        .try_filter_map(|m| async move {
            let master = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Controller(c) if *c != 0 => Some(*c),
                _ => None,
            });
            Ok(master.map(|b| (m.header.index, b)))
        })
        .try_collect()
        .await
        .map_err(NetlinkError::Dump)
}

/// Whether link `ifindex` exists but its message cannot be decoded: the request is answered
/// (no error) yet no message comes through, because the codec dropped it. Gone or decodable:
/// `false`.
pub async fn undecodable(handle: &Handle, ifindex: u32) -> bool {
    let mut answers = handle.link().get().match_index(ifindex).execute();
    match answers.try_next().await {
        Ok(Some(_)) | Err(_) => false,
        Ok(None) => true,
    }
}

/// One link, fresh from the kernel: in this namespace (`netnsid` `None`) or in the namespace
/// this one knows by `netnsid` (`IFLA_TARGET_NETNSID`, Linux 4.20+). `None` if it is gone.
pub async fn link_in(
    handle: &Handle,
    netnsid: Option<i32>,
    ifindex: u32,
) -> Result<Option<LinkSnapshot>, NetlinkError> {
    let mut req = handle.link().get().match_index(ifindex);
    if let Some(id) = netnsid {
        req.message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(id));
    }
    match req.execute().try_next().await {
        Ok(m) => Ok(m.map(|m| snapshot(&m))),
        Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == libc::ENODEV => Ok(None),
        Err(e) => Err(NetlinkError::Dump(e)),
    }
}

/// The ports of bridge `master` in the namespace this one knows by `netnsid`.
pub async fn ports_in(
    handle: &Handle,
    netnsid: i32,
    master: u32,
) -> Result<Vec<LinkSnapshot>, NetlinkError> {
    let mut req = handle.link().get();
    let attrs = &mut req.message_mut().attributes;
    attrs.push(LinkAttribute::IfNetnsId(netnsid));
    attrs.push(LinkAttribute::Controller(master));
    req.execute()
        .map_ok(|m| snapshot(&m))
        // The kernel filters by master where it can; filter again for kernels that do not.
        .try_filter(|l| std::future::ready(l.master == Some(master)))
        .try_collect()
        .await
        .map_err(NetlinkError::Dump)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::DefaultNla;
    use netlink_packet_route::link::{BridgePortState, BridgeStpState, InfoPortKind};

    use super::*;

    fn link(index: u32, attrs: Vec<LinkAttribute>, flags: LinkFlags) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = flags;
        msg.header.link_layer_type = LinkLayerType::Ether;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn decodes_a_bridge_port_with_state_and_master() {
        let msg = link(
            9,
            vec![
                LinkAttribute::IfName("vnet0".into()),
                LinkAttribute::Controller(7),
                LinkAttribute::OperState(State::Up),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Veth),
                    LinkInfo::PortKind(InfoPortKind::Bridge),
                    LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::State(
                        BridgePortState::Listening,
                    )])),
                ]),
            ],
            LinkFlags::Up | LinkFlags::LowerUp,
        );
        let s = snapshot(&msg);
        assert_eq!(s.name, "vnet0");
        assert_eq!(s.master, Some(7));
        assert_eq!(s.kind, LinkKind::Veth);
        assert!(s.admin_up && s.carrier && s.oper_up);
        assert_eq!(s.port_state, Some(PortState::Listening));
    }

    #[test]
    fn decodes_bridge_stp_mode_and_kinds() {
        let msg = link(
            7,
            vec![
                LinkAttribute::IfName("br0".into()),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Bridge),
                    LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::StpState(
                        BridgeStpState::KernelStp,
                    )])),
                ]),
            ],
            LinkFlags::empty(),
        );
        let s = snapshot(&msg);
        assert_eq!(s.kind, LinkKind::Bridge);
        assert_eq!(s.stp, Some(StpMode::Kernel));
        assert!(!s.admin_up && !s.oper_up);

        let nic = snapshot(&link(
            2,
            vec![LinkAttribute::IfName("eth0".into())],
            LinkFlags::Up,
        ));
        assert_eq!(nic.kind, LinkKind::Physical);
        let vx = snapshot(&link(
            3,
            vec![LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Vxlan,
            )])],
            LinkFlags::Up,
        ));
        assert!(matches!(vx.kind, LinkKind::Tunnel(_)));
    }

    #[test]
    fn decodes_what_stp_knows_about_a_port_and_the_bridge_id() {
        use netlink_packet_route::link::BridgeId;
        let id = |p, last| BridgeId {
            priority: p,
            address: [0x52, 0x54, 0, 0, 0, last],
        };
        let port = snapshot(&link(
            9,
            vec![
                LinkAttribute::IfName("vnet1".into()),
                LinkAttribute::Controller(7),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Veth),
                    LinkInfo::PortKind(InfoPortKind::Bridge),
                    LinkInfo::PortData(InfoPortData::BridgePort(vec![
                        InfoBridgePort::State(BridgePortState::Blocking),
                        InfoBridgePort::RootId(id(0x8000, 1)),
                        InfoBridgePort::BridgeId(id(0x1000, 9)),
                        InfoBridgePort::DesignatedPort(0x8001),
                        InfoBridgePort::PortId(0x8002),
                        InfoBridgePort::PortNumber(2),
                    ])),
                ]),
            ],
            LinkFlags::Up,
        ));
        let s = port.stp_port;
        assert_eq!(
            s.designated_bridge.map(|b| b.to_string()).as_deref(),
            Some("1000.525400000009")
        );
        assert_eq!(
            s.designated_root.map(|b| b.to_string()).as_deref(),
            Some("8000.525400000001")
        );
        assert_eq!(
            (s.designated_port, s.port_id, s.port_no),
            (Some(0x8001), Some(0x8002), Some(2))
        );
        let br = snapshot(&link(
            7,
            vec![LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Bridge),
                LinkInfo::Data(InfoData::Bridge(vec![
                    InfoBridge::BridgeId(id(0x8000, 1)),
                    InfoBridge::RootId(id(0x8000, 1)),
                ])),
            ])],
            LinkFlags::Up,
        ));
        assert_eq!(br.bridge_id, br.root_id);
        assert!(br.bridge_id.is_some());
    }

    #[test]
    fn decodes_taps_peers_in_other_namespaces_and_unknown_kinds() {
        use netlink_packet_route::link::InfoTun;
        let tap = |vnet_hdr: u8| {
            snapshot(&link(
                5,
                vec![LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Tun),
                    LinkInfo::Data(InfoData::Tun(vec![
                        InfoTun::Other(DefaultNla::new(IFLA_TUN_TYPE, vec![2])),
                        InfoTun::Other(DefaultNla::new(IFLA_TUN_VNET_HDR, vec![vnet_hdr])),
                    ])),
                ])],
                LinkFlags::Up,
            ))
            .kind
        };
        assert_eq!(
            tap(1),
            LinkKind::Tun {
                tap: Some(true),
                vnet_hdr: Some(true)
            }
        );
        assert_eq!(
            tap(0),
            LinkKind::Tun {
                tap: Some(true),
                vnet_hdr: Some(false)
            }
        );
        // A veth whose peer is in namespace 3 as ifindex 9, the same number as itself.
        let veth = snapshot(&link(
            9,
            vec![
                LinkAttribute::Link(9),
                LinkAttribute::LinkNetNsId(3),
                LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
                LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
            ],
            LinkFlags::Up,
        ));
        assert_eq!((veth.lower, veth.link_netnsid), (Some(9), Some(3)));
        assert_eq!(veth.address, Some([2, 0, 0, 0, 0, 1]));
        let kind = |k: &str| {
            snapshot(&link(
                4,
                vec![LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Other(k.into()),
                )])],
                LinkFlags::Up,
            ))
            .kind
        };
        assert_eq!(kind("l2tpeth"), LinkKind::Tunnel("l2tpeth".into()));
        assert_eq!(kind("openvswitch"), LinkKind::Overlay("openvswitch".into()));
        assert_eq!(kind("frobnicator"), LinkKind::Other("frobnicator".into()));
    }

    #[test]
    fn finds_mrp_in_af_spec() {
        let mut msg = link(7, vec![], LinkFlags::Up);
        msg.header.interface_family = AddressFamily::Bridge;
        assert!(!has_mrp(&msg));
        msg.attributes
            .push(LinkAttribute::AfSpecBridge(vec![AfSpecBridge::Other(
                DefaultNla::new(IFLA_BRIDGE_MRP, vec![0; 8]),
            )]));
        assert!(has_mrp(&msg));
    }

    #[test]
    fn decodes_af_bridge_port_state_notifications() {
        let mut msg = link(
            9,
            vec![
                LinkAttribute::Controller(7),
                LinkAttribute::ProtoInfoBridge(vec![LinkProtoInfoBridge::Other(DefaultNla::new(
                    IFLA_BRPORT_STATE,
                    vec![3],
                ))]),
            ],
            LinkFlags::Up,
        );
        msg.header.interface_family = AddressFamily::Bridge;
        let nl = NetlinkMessage::from(RouteNetlinkMessage::NewLink(msg));
        assert_eq!(
            decode(&nl),
            Some(NetlinkEvent::PortState {
                ifindex: 9,
                master: Some(7),
                state: PortState::Forwarding
            })
        );
    }
}
