//! What of a link notification the model reads, cut out before it is parsed.
//!
//! A link message carries its statistics (`IFLA_STATS`, `IFLA_STATS64`) and every address
//! family's settings (`IFLA_AF_SPEC`: IPv6's hundred-odd fields), and netlink-packet-route parses
//! all of them: most of the agent's time on a notification went there, on the path between a
//! fault and its repair. The model reads a handful of attributes (`netlink::snapshot`,
//! `netlink::decode`); only those are kept, the rest skipped without being parsed.

/// `struct nlmsghdr` and `struct ifinfomsg`, which every link message starts with.
const HEADERS: usize = 16 + 16;
/// RTM_NEWLINK and RTM_DELLINK: the link messages.
const LINK_MESSAGES: [u16; 2] = [16, 17];
/// The attribute type without its NLA_F_NESTED and NLA_F_NET_BYTEORDER flags.
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);

/// The attributes `netlink::snapshot` and `netlink::decode` read: IFLA_ADDRESS, IFLA_IFNAME,
/// IFLA_LINK, IFLA_MASTER, IFLA_PROTINFO (an AF_BRIDGE message's port state),
/// IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_PHYS_SWITCH_ID and IFLA_LINK_NETNSID. A decoder
/// that reads another one must add it here (`trimming_keeps_what_the_model_reads` fails until it
/// does, on the kernel's own messages).
const KEPT: [u16; 9] = [1, 3, 5, 10, 12, 16, 18, 36, 37];

/// `msg` (one whole netlink message) with only the attributes the model reads, in `out`; `msg`
/// itself when it is no link message or is malformed (the parser then says so).
pub fn trim<'a>(msg: &'a [u8], out: &'a mut Vec<u8>) -> &'a [u8] {
    let kind = msg.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    if msg.len() < HEADERS || !kind.is_some_and(|k| LINK_MESSAGES.contains(&k)) {
        return msg;
    }
    out.clear();
    out.extend_from_slice(&msg[..HEADERS]);
    let mut rest = &msg[HEADERS..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return msg;
        }
        let aligned = (len + 3) & !3;
        if KEPT.contains(&kind) {
            out.extend_from_slice(&rest[..len]);
            out.resize((out.len() + 3) & !3, 0);
        }
        rest = rest.get(aligned..).unwrap_or_default();
    }
    let Ok(total) = u32::try_from(out.len()) else {
        return msg;
    };
    out[..4].copy_from_slice(&total.to_ne_bytes());
    out
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::{
        RouteNetlinkMessage,
        link::{
            BridgePortState, BridgeStpState, InfoBridge, InfoBridgePort, InfoData, InfoKind,
            InfoPortData, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
            Stats64,
        },
    };
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    use super::*;
    use crate::sources::netlink::{NetlinkEvent, decode};

    fn parse(bytes: &[u8]) -> Option<NetlinkEvent> {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).expect("parses");
        decode(&msg)
    }

    fn bytes(msg: LinkMessage) -> Vec<u8> {
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::NewLink(msg)),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    /// Every link message of this namespace, as the kernel writes them (a dump reads, it
    /// changes nothing).
    fn dumped() -> Vec<Vec<u8>> {
        let mut sock = Socket::new(NETLINK_ROUTE).expect("a netlink socket");
        sock.bind_auto().expect("bound");
        sock.connect(&SocketAddr::new(0, 0)).expect("connected");
        let mut req = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
        );
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        sock.send(&buf, 0).expect("sent");
        let mut out = Vec::new();
        loop {
            let (data, _) = sock.recv_from_full().expect("an answer");
            let mut rest = data.as_slice();
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if kind == 3 {
                    return out; // NLMSG_DONE
                }
                out.push(rest[..len].to_vec());
                rest = rest.get((len + 3) & !3..).unwrap_or_default();
            }
        }
    }

    #[test]
    fn trimming_keeps_what_the_model_reads() {
        let port = {
            let mut m = LinkMessage::default();
            m.header.index = 9;
            m.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
            m.attributes = vec![
                LinkAttribute::IfName("vnet0".into()),
                LinkAttribute::Stats64(Stats64::default()),
                LinkAttribute::Controller(7),
                LinkAttribute::OperState(State::Up),
                LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Veth),
                    LinkInfo::PortKind(InfoPortKind::Bridge),
                    LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::State(
                        BridgePortState::Listening,
                    )])),
                ]),
                LinkAttribute::Link(4),
            ];
            m
        };
        let bridge = {
            let mut m = LinkMessage::default();
            m.header.index = 7;
            m.attributes = vec![
                LinkAttribute::IfName("br0".into()),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Bridge),
                    LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::StpState(
                        BridgeStpState::KernelStp,
                    )])),
                ]),
                LinkAttribute::Stats64(Stats64::default()),
            ];
            m
        };
        let mut messages = vec![bytes(port), bytes(bridge)];
        messages.extend(dumped());
        assert!(messages.len() > 2, "the dump has at least lo");
        let mut scratch = Vec::new();
        for full in &messages {
            let trimmed = trim(full, &mut scratch);
            assert!(trimmed.len() <= full.len());
            assert_eq!(parse(trimmed), parse(full), "the same news, trimmed");
        }
        // The dump's messages carry statistics and address-family settings: trimmed, they are
        // much smaller.
        let lo = messages.last().expect("a dumped link");
        assert!(trim(lo, &mut scratch).len() * 2 < lo.len());
    }

    #[test]
    fn what_is_no_link_message_or_malformed_is_left_whole() {
        let mut scratch = Vec::new();
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert_eq!(trim(&done, &mut scratch), done.as_slice());
        let mut cut = bytes(LinkMessage::default());
        cut.extend_from_slice(&[200, 0, 3, 0]); // an attribute longer than what is left
        assert_eq!(trim(&cut, &mut scratch), cut.as_slice());
    }
}
