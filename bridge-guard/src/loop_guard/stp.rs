//! The kernel's own evidence of a loop: a port that kernel STP holds in blocking because it
//! hears BPDUs. A port is blocking under STP when it is neither the root port nor designated:
//! the best BPDU on its segment comes from another bridge, or from this bridge's own other
//! port (its BPDUs came back). Either way a second path exists, so forcing the port, or turning
//! STP off under it, would make the loop forward.

use crate::{
    event::{PortState, StpMode},
    model::Model,
    sources::netlink::LinkSnapshot,
};

/// Bits of an STP port id that hold the port number (`BR_PORT_BITS`).
const PORT_BITS: u16 = 10;

/// Why kernel STP holds `port` of `bridge` in blocking, when it does so because it hears
/// BPDUs; the other port of the loop where it can be named.
pub fn stp_loop(port: &LinkSnapshot, bridge: &LinkSnapshot, model: &Model) -> Option<String> {
    if bridge.stp != Some(StpMode::Kernel) || port.port_state != Some(PortState::Blocking) {
        return None;
    }
    let name = &port.name;
    let s = &port.stp_port;
    let (Some(own), Some(designated), Some(dport), Some(port_id)) = (
        bridge.bridge_id,
        s.designated_bridge,
        s.designated_port,
        s.port_id,
    ) else {
        return Some(format!(
            "kernel STP holds {name} in blocking and netlink does not say why: counted as a loop"
        ));
    };
    let others = || {
        model
            .ports_of(bridge.ifindex)
            .filter(|p| p.ifindex != port.ifindex)
    };
    if designated != own {
        // The other end of the loop is where this bridge hears the same bridge, or its root.
        let other = others()
            .find(|p| {
                let heard = p.stp_port.designated_bridge;
                heard == Some(designated)
                    || p.port_state == Some(PortState::Forwarding)
                        && heard.is_some_and(|b| b != own)
            })
            .map_or_else(String::new, |p| format!(" (also heard on {})", p.name));
        let root = s
            .designated_root
            .map_or_else(String::new, |r| format!(", root {r}"));
        return Some(format!(
            "kernel STP holds {name} in blocking: it hears BPDUs of bridge {designated}{root}{other}, \
             a second path to the same network: a loop"
        ));
    }
    if dport != port_id {
        let no = dport & ((1 << PORT_BITS) - 1);
        let other = others()
            .find(|p| p.stp_port.port_no == Some(no))
            .map_or_else(|| format!("port {no}"), |p| p.name.clone());
        return Some(format!(
            "kernel STP holds {name} in blocking: this bridge's own BPDUs, sent out of {other}, \
             come back on it: a loop between {other} and {name}"
        ));
    }
    // Designated for itself: the short blocking of a port being enabled, not a loop.
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::tests::link,
        sources::netlink::{BridgeIdent, LinkKind, StpPort},
    };

    const OWN: BridgeIdent = BridgeIdent {
        priority: 0x8000,
        mac: [0x52, 0x54, 0, 0, 0, 1],
    };

    fn lab(vnet1: StpPort) -> (Model, LinkSnapshot, LinkSnapshot) {
        let mut br = link(7, "br0", LinkKind::Bridge, None);
        br.stp = Some(StpMode::Kernel);
        br.bridge_id = Some(OWN);
        let mut v0 = link(9, "vnet0", LinkKind::Veth, Some(7));
        v0.stp_port = StpPort {
            designated_bridge: Some(OWN),
            designated_port: Some(0x8001),
            port_id: Some(0x8001),
            port_no: Some(1),
            designated_root: Some(OWN),
        };
        let mut v1 = link(10, "vnet1", LinkKind::Veth, Some(7));
        v1.port_state = Some(PortState::Blocking);
        v1.stp_port = vnet1;
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(vec![br.clone(), v0, v1.clone()], 0);
        (m, br, v1)
    }

    #[test]
    fn our_own_bpdus_coming_back_are_a_loop_between_the_two_ports() {
        let (m, br, v1) = lab(StpPort {
            designated_bridge: Some(OWN),
            designated_port: Some(0x8001),
            port_id: Some(0x8002),
            port_no: Some(2),
            designated_root: Some(OWN),
        });
        let why = stp_loop(&v1, &br, &m).expect("a loop");
        assert!(why.contains("sent out of vnet0"), "{why}");
        assert!(why.contains("between vnet0 and vnet1"), "{why}");
    }

    #[test]
    fn another_bridges_bpdus_are_a_loop() {
        let other = BridgeIdent {
            priority: 0x1000,
            mac: [2, 0, 0, 0, 0, 9],
        };
        let (m, br, v1) = lab(StpPort {
            designated_bridge: Some(other),
            designated_port: Some(0x8001),
            port_id: Some(0x8002),
            port_no: Some(2),
            designated_root: Some(other),
        });
        let why = stp_loop(&v1, &br, &m).expect("a loop");
        assert!(why.contains("bridge 1000.020000000009"), "{why}");
    }

    #[test]
    fn a_port_designated_for_itself_or_not_blocking_is_no_evidence() {
        let own = StpPort {
            designated_bridge: Some(OWN),
            designated_port: Some(0x8002),
            port_id: Some(0x8002),
            port_no: Some(2),
            designated_root: Some(OWN),
        };
        let (m, br, mut v1) = lab(own);
        assert_eq!(stp_loop(&v1, &br, &m), None);
        v1.port_state = Some(PortState::Listening);
        v1.stp_port.designated_port = Some(0x8001);
        assert_eq!(stp_loop(&v1, &br, &m), None, "only blocking counts");
        let mut off = br.clone();
        off.stp = Some(StpMode::Off);
        v1.port_state = Some(PortState::Blocking);
        assert_eq!(stp_loop(&v1, &off, &m), None, "STP off: stale fields");
        v1.stp_port = StpPort::default();
        assert!(stp_loop(&v1, &br, &m).is_some(), "unknown counts as a loop");
    }
}
