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
        AfSpecBridge, InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, LinkAttribute,
        LinkExtentMask, LinkFlags, LinkInfo, LinkLayerType, LinkMessage, LinkProtoInfoBridge,
        State,
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
    Tun,
    /// vxlan, gre(tap), geneve, ipip, sit…: traffic leaves the host through it.
    Tunnel(String),
    Bond,
    /// vlan, macvlan, ipvlan…: stacked on another device (`IFLA_LINK`).
    Stacked(String),
    /// No `IFLA_INFO_KIND`: a driver-backed device, normally a physical NIC.
    Physical,
    Loopback,
    Other(String),
}

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
            InfoKind::Tun => Self::Tun,
            InfoKind::Bond => Self::Bond,
            InfoKind::Vxlan
            | InfoKind::GreTap
            | InfoKind::GreTap6
            | InfoKind::GreTun
            | InfoKind::GreTun6
            | InfoKind::Geneve
            | InfoKind::IpIp
            | InfoKind::Ip6Tnl
            | InfoKind::SitTun
            | InfoKind::Vti
            | InfoKind::Vti6 => Self::Tunnel(kind.to_string()),
            InfoKind::Vlan
            | InfoKind::MacVlan
            | InfoKind::MacVtap
            | InfoKind::IpVlan
            | InfoKind::IpVtap => Self::Stacked(kind.to_string()),
            other => Self::Other(other.to_string()),
        }
    }
}

/// One link as an AF_UNSPEC link message describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
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
        name: String::new(),
        kind: LinkKind::Other(String::new()),
        master: None,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        carrier: msg.header.flags.contains(LinkFlags::LowerUp),
        oper_up: false,
        lower: None,
        switchdev: false,
        port_state: None,
        stp: None,
    };
    let mut info_kind = None;
    let mut oper = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => snap.name.clone_from(n),
            LinkAttribute::Controller(m) if *m != 0 => snap.master = Some(*m),
            LinkAttribute::Link(l) if *l != 0 && *l != msg.header.index => snap.lower = Some(*l),
            LinkAttribute::PhysSwitchId(_) => snap.switchdev = true,
            LinkAttribute::OperState(s) => oper = Some(*s),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => info_kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Bridge(data)) => {
                            for d in data {
                                if let InfoBridge::StpState(s) = d {
                                    snap.stp = StpMode::from_kernel(u32::from(*s));
                                }
                            }
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(data)) => {
                            for d in data {
                                if let InfoBridgePort::State(s) = d {
                                    snap.port_state = port_state(u8::from(*s));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    snap.kind = LinkKind::from_info(info_kind.as_ref(), msg.header.link_layer_type);
    // Devices without operstate support report "unknown" while working: count them as up when
    // they are admin-up with carrier, as the bridge does (netif_oper_up).
    snap.oper_up = match oper {
        Some(State::Up) => true,
        Some(State::Unknown) | None => snap.admin_up && snap.carrier,
        Some(_) => false,
    };
    snap
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
        tokio::spawn(conn);
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
