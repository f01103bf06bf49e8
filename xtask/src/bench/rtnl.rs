//! In-process rtnetlink: synchronous requests (each sent and acknowledged before the call
//! returns) on a socket opened inside a lab namespace, and decoding of link messages into the
//! little the bench needs.
//!
//! Faults are injected through this, not through `ip`: the timestamp taken right before
//! `send()` is within microseconds of the kernel acting, since the kernel processes an
//! rtnetlink request inside the sender's `sendmsg()`.

use anyhow::{Context as _, Result};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{
        BridgePortState, BridgeStpState, InfoBridge, InfoBridgePort, InfoData, InfoKind,
        InfoPortData, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
        LinkProtoInfoBridge,
    },
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// `RTNLGRP_LINK` from `linux/rtnetlink.h`.
pub const RTNLGRP_LINK: u32 = 1;
/// `IFLA_BRPORT_STATE` inside AF_BRIDGE `IFLA_PROTINFO`.
const IFLA_BRPORT_STATE: u16 = 1;

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns` and of the agent's logs.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A bridge port's STP state, as the kernel numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Disabled,
    Listening,
    Learning,
    Forwarding,
    Blocking,
    Other(u8),
}

impl PortState {
    pub fn from_kernel(v: u8) -> Self {
        match v {
            0 => Self::Disabled,
            1 => Self::Listening,
            2 => Self::Learning,
            3 => Self::Forwarding,
            4 => Self::Blocking,
            o => Self::Other(o),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Listening => "listening",
            Self::Learning => "learning",
            Self::Forwarding => "forwarding",
            Self::Blocking => "blocking",
            Self::Other(_) => "unknown",
        }
    }
}

/// What an AF_UNSPEC link message says about a link.
#[derive(Clone, Debug, Default)]
pub struct LinkView {
    pub ifindex: u32,
    pub name: String,
    pub is_bridge: bool,
    pub admin_up: bool,
    pub carrier: bool,
    pub master: Option<u32>,
    /// From the bridge-port slave data, when the link is a bridge port.
    pub port_state: Option<PortState>,
    /// Kernel or user STP on, for a bridge (its `IFLA_BR_STP_STATE`).
    pub stp_on: Option<bool>,
    /// Packets received and sent (`IFLA_STATS64`), when the message carries them.
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Decodes an AF_UNSPEC link message.
pub fn link_view(msg: &LinkMessage) -> LinkView {
    let mut v = LinkView {
        ifindex: msg.header.index,
        admin_up: msg.header.flags.contains(LinkFlags::Up),
        carrier: msg.header.flags.contains(LinkFlags::LowerUp),
        ..LinkView::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => v.name.clone_from(n),
            LinkAttribute::Controller(m) if *m != 0 => v.master = Some(*m),
            LinkAttribute::Stats64(st) => {
                v.rx_packets = st.rx_packets;
                v.tx_packets = st.tx_packets;
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Bridge) => v.is_bridge = true,
                        LinkInfo::Data(InfoData::Bridge(data)) => {
                            for d in data {
                                if let InfoBridge::StpState(s) = d {
                                    v.stp_on = Some(*s != BridgeStpState::Disabled);
                                }
                            }
                        }
                        LinkInfo::PortData(InfoPortData::BridgePort(data)) => {
                            for d in data {
                                if let InfoBridgePort::State(s) = d {
                                    v.port_state = Some(PortState::from_kernel(u8::from(*s)));
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
    v
}

/// The port state carried by an AF_BRIDGE link message (`IFLA_PROTINFO`).
pub fn bridge_port_state(msg: &LinkMessage) -> Option<PortState> {
    for attr in &msg.attributes {
        if let LinkAttribute::ProtoInfoBridge(infos) = attr {
            for info in infos {
                if let LinkProtoInfoBridge::Other(nla) = info {
                    use netlink_packet_core::Nla as _;
                    if nla.kind() == IFLA_BRPORT_STATE && nla.value_len() == 1 {
                        let mut b = [0u8; 1];
                        nla.emit_value(&mut b);
                        return Some(PortState::from_kernel(b[0]));
                    }
                }
            }
        }
    }
    None
}

/// Splits a datagram into its netlink messages; undecodable ones are skipped.
pub fn messages(buf: &[u8]) -> Vec<NetlinkMessage<RouteNetlinkMessage>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 16 <= buf.len() {
        let Some(len_bytes) = buf.get(off..off + 4) else {
            break;
        };
        let mut b = [0u8; 4];
        b.copy_from_slice(len_bytes);
        let len = u32::from_ne_bytes(b) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        if let Some(m) = buf
            .get(off..off + len)
            .and_then(|slice| NetlinkMessage::<RouteNetlinkMessage>::deserialize(slice).ok())
        {
            out.push(m);
        }
        // Messages are 4-byte aligned.
        off += (len + 3) & !3;
    }
    out
}

/// Opens a NETLINK_ROUTE socket inside namespace `ns`.
pub fn socket_in(ns: &str) -> Result<Socket> {
    crate::lab::in_netns(ns, || {
        let mut s = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        s.bind_auto().context("binding the netlink socket")?;
        Ok(s)
    })
}

/// Receives one datagram (64 KiB holds any link message, and any batch, of these labs).
pub fn recv(sock: &Socket) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(64 * 1024);
    sock.recv(&mut buf, 0)?;
    Ok(buf)
}

/// Makes blocking receives on `sock` give up after `timeout` (`EAGAIN`).
pub fn set_recv_timeout(sock: &Socket, timeout: std::time::Duration) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: a valid socket fd and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(16),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(())
}

/// Sets the receive buffer to `bytes`, beyond `rmem_max` (needs CAP_NET_ADMIN, which the bench
/// has): a burst of notifications must not overrun the listener.
pub fn force_rcvbuf(sock: &Socket, bytes: usize) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket fd and an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&v).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
    }
    Ok(())
}

/// The kernel refused a request with this errno.
#[derive(Debug)]
pub struct Refused(pub i32);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the kernel refused: {}",
            std::io::Error::from_raw_os_error(self.0)
        )
    }
}

impl std::error::Error for Refused {}

/// A request as bytes.
pub fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// A request to make, as a message with its netlink flags: what [`Rtnl`] sends one at a time
/// and [`Rtnl::batch`] several in one datagram.
#[derive(Clone, Debug)]
pub struct Request {
    msg: RouteNetlinkMessage,
    flags: u16,
    what: String,
}

impl Request {
    fn set(msg: LinkMessage, what: String) -> Self {
        Self {
            msg: RouteNetlinkMessage::SetLink(msg),
            flags: NLM_F_REQUEST | NLM_F_ACK,
            what,
        }
    }

    fn change(msg: LinkMessage, what: String) -> Self {
        Self {
            msg: RouteNetlinkMessage::NewLink(msg),
            flags: NLM_F_REQUEST | NLM_F_ACK,
            what,
        }
    }

    /// What `ip` command this is, for error messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// `ip link set NAME up|down`.
    pub fn set_up(name: &str, up: bool) -> Self {
        let mut m = by_name(name);
        if up {
            m.header.flags |= LinkFlags::Up;
        }
        m.header.change_mask |= LinkFlags::Up;
        Self::set(
            m,
            format!("ip link set {name} {}", if up { "up" } else { "down" }),
        )
    }

    /// `ip link set NAME master IFINDEX`, or `nomaster` with `None`.
    pub fn set_master(name: &str, master: Option<u32>) -> Self {
        let mut m = by_name(name);
        m.attributes
            .push(LinkAttribute::Controller(master.unwrap_or(0)));
        let to = master.map_or_else(|| "nomaster".to_owned(), |i| format!("master {i}"));
        Self::set(m, format!("ip link set {name} {to}"))
    }

    /// `ip link set BRIDGE type bridge stp_state 0|1`.
    pub fn set_stp(bridge: &str, on: bool) -> Self {
        let mut m = by_name(bridge);
        let state = if on {
            BridgeStpState::KernelStp
        } else {
            BridgeStpState::Disabled
        };
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::StpState(state)])),
        ]));
        Self::change(
            m,
            format!(
                "ip link set {bridge} type bridge stp_state {}",
                u8::from(on)
            ),
        )
    }

    /// `ip link set NAME type bridge_slave state forwarding`.
    pub fn set_forwarding(port: &str) -> Self {
        Self::set_port_state(port, BridgePortState::Forwarding)
    }

    /// `ip link set NAME type bridge_slave state STATE` (refused while kernel STP is on).
    pub fn set_port_state(port: &str, state: BridgePortState) -> Self {
        let mut m = by_name(port);
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::State(state)])),
        ]));
        Self::change(
            m,
            format!(
                "ip link set {port} type bridge_slave state {}",
                PortState::from_kernel(u8::from(state)).name()
            ),
        )
    }

    /// `ip link add NAME type bridge stp_state S forward_delay FD` (centiseconds); left down.
    pub fn add_bridge(name: &str, stp: bool, forward_delay_cs: u32) -> Self {
        let mut m = by_name(name);
        let state = if stp {
            BridgeStpState::KernelStp
        } else {
            BridgeStpState::Disabled
        };
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::ForwardDelay(forward_delay_cs),
                InfoBridge::StpState(state),
            ])),
        ]));
        Self {
            msg: RouteNetlinkMessage::NewLink(m),
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            what: format!("ip link add {name} type bridge"),
        }
    }

    /// `ip link del NAME`.
    pub fn del(name: &str) -> Self {
        Self {
            msg: RouteNetlinkMessage::DelLink(by_name(name)),
            flags: NLM_F_REQUEST | NLM_F_ACK,
            what: format!("ip link del {name}"),
        }
    }
}

/// A request socket in one namespace.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

fn by_name(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_owned()));
    m
}

impl Rtnl {
    pub fn open(ns: &str) -> Result<Self> {
        Ok(Self::from_socket(socket_in(ns)?))
    }

    /// Uses `sock`, which must be bound and subscribed to nothing.
    pub fn from_socket(sock: Socket) -> Self {
        Self { sock, seq: 0 }
    }

    /// Sends `msg` and waits for its acknowledgement (or its reply, for GET).
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
        self.seq = self.seq.wrapping_add(1);
        let buf = encode(msg, flags, self.seq);
        self.sock.send(&buf, 0).context("netlink send")?;
        let mut replies = Vec::new();
        loop {
            let data = recv(&self.sock).context("netlink recv")?;
            for m in messages(&data) {
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(Refused(-code.get()).into());
                        }
                        return Ok(replies);
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => replies.push(m),
                }
            }
        }
    }

    /// Sends one request and waits for its acknowledgement.
    pub fn request(&mut self, r: Request) -> Result<()> {
        let what = r.what;
        self.exchange(r.msg, r.flags).map(drop).context(what)
    }

    /// Sends every request in one datagram (the kernel carries them out in order, within
    /// one `sendmsg()`), then reads every acknowledgement: per request, the errno it was
    /// refused with, if it was.
    pub fn batch(&mut self, requests: Vec<Request>) -> Result<Vec<Option<i32>>> {
        let first = self.seq.wrapping_add(1);
        let mut buf = Vec::new();
        for r in requests {
            self.seq = self.seq.wrapping_add(1);
            buf.extend(encode(r.msg, r.flags, self.seq));
        }
        let n = self.seq.wrapping_sub(first).wrapping_add(1) as usize;
        self.sock.send(&buf, 0).context("netlink send")?;
        let mut acks: Vec<Option<Option<i32>>> = vec![None; n];
        while acks.iter().any(Option::is_none) {
            let data = recv(&self.sock).context("netlink recv")?;
            for m in messages(&data) {
                let i = m.header.sequence_number.wrapping_sub(first) as usize;
                if let (NetlinkPayload::Error(e), Some(slot)) = (&m.payload, acks.get_mut(i)) {
                    *slot = Some(e.code.map(|c| -c.get()));
                }
            }
        }
        Ok(acks.into_iter().map(Option::flatten).collect())
    }

    /// `ip link set NAME up|down`.
    pub fn set_up(&mut self, name: &str, up: bool) -> Result<()> {
        self.request(Request::set_up(name, up))
    }

    /// `ip link set NAME master MASTER` (ifindex), or `nomaster` with `None`.
    pub fn set_master(&mut self, name: &str, master: Option<u32>) -> Result<()> {
        self.request(Request::set_master(name, master))
    }

    /// `ip link set BRIDGE type bridge stp_state 0|1`.
    pub fn set_stp(&mut self, bridge: &str, on: bool) -> Result<()> {
        self.request(Request::set_stp(bridge, on))
    }

    /// `ip link add NAME type bridge stp_state S forward_delay FD` (centiseconds); left down.
    pub fn add_bridge(&mut self, name: &str, stp: bool, forward_delay_cs: u32) -> Result<()> {
        self.request(Request::add_bridge(name, stp, forward_delay_cs))
    }

    /// `ip link del NAME`.
    pub fn del(&mut self, name: &str) -> Result<()> {
        self.request(Request::del(name))
    }

    /// `ip link set NAME type bridge_slave state forwarding`.
    pub fn set_forwarding(&mut self, port: &str) -> Result<()> {
        self.request(Request::set_forwarding(port))
    }

    /// `ip link set NAME type bridge_slave state disabled`: the port forwards nothing from
    /// then on, with no RCU grace period to wait for (detaching or deleting a port waits for
    /// one, which a broadcast storm on every CPU can hold off for tens of seconds).
    pub fn set_disabled(&mut self, port: &str) -> Result<()> {
        self.request(Request::set_port_state(port, BridgePortState::Disabled))
    }

    /// `ip link show NAME`, decoded; `None` when there is no such link.
    pub fn get(&mut self, name: &str) -> Result<Option<LinkView>> {
        let mut m = by_name(name);
        m.header.interface_family = AddressFamily::Unspec;
        // With NLM_F_ACK the reply is followed by an acknowledgement, which ends the wait.
        match self.exchange(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match &r.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Some(link_view(l)),
                _ => None,
            })),
            Err(e)
                if e.downcast_ref::<Refused>()
                    .is_some_and(|r| r.0 == libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.context(format!("ip link show {name}"))),
        }
    }
}
