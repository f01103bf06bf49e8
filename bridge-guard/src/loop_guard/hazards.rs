//! Which ports make a bridge unsafe to repair: where turning STP off or forcing a port to
//! forwarding could create a loop with a network beyond this host, or fight its owner.
//!
//! A port is judged by what it is and, for a veth or a stacked device, by where it leads: a
//! veth's peer on a bridge with a NIC is as much a way out as the NIC. What cannot be decoded
//! or followed counts as a hazard, never as safe.

use std::collections::BTreeMap;

use crate::{
    model::Model,
    sources::netlink::{LinkKind, LinkSnapshot},
};

/// What was found where a port leads in another network namespace (`peers`), or who holds a
/// tap (`taps`): per port ifindex, `Some(why)` for a hazard, `None` for safe. A port that
/// needs a look and has no entry has not been looked at, which counts as a hazard.
pub type Remote = BTreeMap<u32, Option<String>>;

/// How deep stacked devices are followed (vlan on macvlan on veth…).
const DEPTH: u8 = 3;

/// A hazard from the device itself, without following it anywhere.
pub fn kind_hazard(link: &LinkSnapshot) -> Option<String> {
    let name = &link.name;
    if link.switchdev {
        return Some(format!("{name} is a switchdev (hardware-offloaded) port"));
    }
    match &link.kind {
        LinkKind::Physical => Some(format!("{name} is a physical NIC")),
        LinkKind::Tunnel(kind) => Some(format!("{name} is a {kind} tunnel port")),
        LinkKind::Bond => Some(format!("{name} is a bond")),
        LinkKind::Overlay(kind) => Some(format!("{name} is {}", overlay(kind))),
        LinkKind::Other(kind) if kind.is_empty() => Some(format!(
            "{name} is a device netlink does not describe (no kind): it may leave the host"
        )),
        LinkKind::Other(kind) => Some(format!(
            "{name} is a {kind} device, a kind bridge-guard does not know: it may leave the host"
        )),
        LinkKind::Bridge
        | LinkKind::Veth
        | LinkKind::Tun { .. }
        | LinkKind::Stacked(_)
        | LinkKind::Loopback
        | LinkKind::Local(_) => None,
    }
}

fn overlay(kind: &str) -> String {
    match kind {
        "team" => "a team device (link aggregation over other links)".to_owned(),
        "macsec" => "a MACsec device (an encrypted link over another device)".to_owned(),
        "hsr" => "an HSR/PRP device (a redundant ring over NICs)".to_owned(),
        "batadv" => "a batman-adv mesh device".to_owned(),
        "openvswitch" => "an Open vSwitch port".to_owned(),
        "dsa" => "a DSA switch port".to_owned(),
        other => format!("a {other} device that carries frames over other links"),
    }
}

/// A hazard from `port` on a guarded bridge: the device itself, and where it leads.
pub fn port_hazard(port: &LinkSnapshot, model: &Model, remote: &Remote) -> Option<String> {
    hazard_at(port, model, remote, DEPTH)
}

fn hazard_at(link: &LinkSnapshot, model: &Model, remote: &Remote, depth: u8) -> Option<String> {
    if let Some(h) = kind_hazard(link) {
        return Some(h);
    }
    match &link.kind {
        LinkKind::Veth => veth_hazard(link, model, remote),
        // Who holds a tap open tells a VPN's from a VM's (`taps`); a tap with virtio-net
        // headers is a VM's, and one without carrier carries nothing (judged again when it
        // gets carrier).
        LinkKind::Tun { vnet_hdr, .. } if link.carrier && *vnet_hdr != Some(true) => {
            remote_hazard(link, remote, "the holder")
        }
        LinkKind::Stacked(kind) => {
            if link.link_netnsid.is_some() {
                return remote_hazard(link, remote, "its lower device");
            }
            let lower = link.lower?;
            let Some(l) = model.link(lower) else {
                return Some(format!(
                    "{} is a {kind} on device {lower}, which netlink does not show",
                    link.name
                ));
            };
            if depth == 0 {
                return Some(format!("{} is stacked too deep to follow", link.name));
            }
            hazard_at(l, model, remote, depth - 1)
                .map(|h| format!("{} is a {kind} on {}: {h}", link.name, l.name))
        }
        _ => None,
    }
}

fn remote_hazard(link: &LinkSnapshot, remote: &Remote, what: &str) -> Option<String> {
    match remote.get(&link.ifindex) {
        Some(found) => found.clone(),
        None => Some(format!(
            "{what} of {} is in another network namespace and was not checked yet",
            link.name
        )),
    }
}

/// A veth is as safe as what its peer is plugged into: judged here for a peer in this
/// namespace, by `peers` for one in another.
fn veth_hazard(port: &LinkSnapshot, model: &Model, remote: &Remote) -> Option<String> {
    if port.link_netnsid.is_some() {
        return remote_hazard(port, remote, "the peer");
    }
    let name = &port.name;
    let Some(peer) = port.lower.and_then(|i| model.link(i)) else {
        return Some(format!("{name} is a veth whose peer netlink does not show"));
    };
    let master = peer.master?;
    if Some(master) == port.master {
        return Some(format!(
            "{name} and its peer {} are both ports of the same bridge: a loop",
            peer.name
        ));
    }
    let Some(m) = model.link(master) else {
        return Some(format!(
            "{name}'s peer {} is enslaved to device {master}, which netlink does not show",
            peer.name
        ));
    };
    if m.kind != LinkKind::Bridge {
        return kind_hazard(m)
            .map(|h| format!("{name}'s peer {} is enslaved to {}: {h}", peer.name, m.name));
    }
    bridge_hazard(model.ports_of(master).filter(|p| p.ifindex != peer.ifindex))
        .map(|h| format!("{name}'s peer {} is on {}, where {h}", peer.name, m.name))
}

/// The first port of another bridge that is a hazard by kind (not followed further: a veth on
/// that bridge leads to yet another namespace, and loop protection covers what is beyond).
pub fn bridge_hazard<'a>(mut ports: impl Iterator<Item = &'a LinkSnapshot>) -> Option<String> {
    ports.find_map(kind_hazard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::link;

    fn model(links: Vec<LinkSnapshot>) -> Model {
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(links, 0);
        m
    }

    #[test]
    fn every_refused_kind_is_a_hazard() {
        for (kind, expect) in [
            (LinkKind::Physical, "physical NIC"),
            (LinkKind::Bond, "a bond"),
            (LinkKind::Tunnel("vxlan".into()), "vxlan tunnel"),
            (LinkKind::Tunnel("gretap".into()), "gretap tunnel"),
            (LinkKind::Tunnel("ip6gretap".into()), "ip6gretap tunnel"),
            (LinkKind::Tunnel("erspan".into()), "erspan tunnel"),
            (LinkKind::Tunnel("l2tpeth".into()), "l2tpeth tunnel"),
            (LinkKind::Overlay("team".into()), "team device"),
            (LinkKind::Overlay("macsec".into()), "MACsec"),
            (LinkKind::Overlay("hsr".into()), "HSR/PRP"),
            (LinkKind::Overlay("batadv".into()), "batman-adv"),
            (LinkKind::Overlay("openvswitch".into()), "Open vSwitch"),
            (LinkKind::Other("newfangled".into()), "does not know"),
            (LinkKind::Other(String::new()), "does not describe"),
        ] {
            let l = link(5, "p0", kind.clone(), Some(7));
            let h = kind_hazard(&l).unwrap_or_else(|| panic!("{kind:?} passed as safe"));
            assert!(h.contains(expect), "{kind:?}: {h}");
        }
        for safe in [
            LinkKind::Veth,
            LinkKind::Tun {
                tap: Some(true),
                vnet_hdr: Some(false),
            },
            LinkKind::Local("dummy".into()),
            LinkKind::Stacked("macvlan".into()),
        ] {
            assert_eq!(
                kind_hazard(&link(5, "p0", safe.clone(), Some(7))),
                None,
                "{safe:?}"
            );
        }
    }

    #[test]
    fn a_tap_is_judged_by_who_holds_it() {
        let m = model(vec![link(7, "br0", LinkKind::Bridge, None)]);
        let tap = |vnet_hdr, carrier| {
            let mut l = link(
                5,
                "tap0",
                LinkKind::Tun {
                    tap: Some(true),
                    vnet_hdr,
                },
                Some(7),
            );
            l.carrier = carrier;
            l
        };
        let none = Remote::new();
        assert_eq!(
            port_hazard(&tap(Some(true), true), &m, &none),
            None,
            "virtio: a VM's"
        );
        assert_eq!(
            port_hazard(&tap(Some(false), false), &m, &none),
            None,
            "nobody holds it"
        );
        assert!(
            port_hazard(&tap(Some(false), true), &m, &none)
                .is_some_and(|h| h.contains("not checked yet")),
            "not looked at yet: a hazard"
        );
        let vpn = Remote::from([(
            5,
            Some("tap0 is a TAP device held by openvpn[9]".to_owned()),
        )]);
        assert!(port_hazard(&tap(None, true), &m, &vpn).is_some_and(|h| h.contains("openvpn")));
        assert_eq!(
            port_hazard(&tap(Some(false), true), &m, &Remote::from([(5, None)])),
            None
        );
    }

    #[test]
    fn a_veth_is_judged_by_its_peers_bridge() {
        let mut v0 = link(10, "v0", LinkKind::Veth, Some(7));
        v0.lower = Some(11);
        let mut v1 = link(11, "v1", LinkKind::Veth, Some(8));
        v1.lower = Some(10);
        let br0 = link(7, "br0", LinkKind::Bridge, None);
        let br1 = link(8, "br1", LinkKind::Bridge, None);
        let vx = link(12, "vx0", LinkKind::Tunnel("vxlan".into()), Some(8));
        let m = model(vec![br0.clone(), br1.clone(), v0.clone(), v1.clone(), vx]);
        let h = port_hazard(&v0, &m, &Remote::new()).expect("hazard");
        assert!(
            h.contains("v0's peer v1 is on br1, where vx0 is a vxlan tunnel port"),
            "{h}"
        );
        let m = model(vec![br0, br1, v0.clone(), v1]);
        assert_eq!(port_hazard(&v0, &m, &Remote::new()), None);

        // In another namespace: what `peers` found, and a hazard until it looked.
        v0.link_netnsid = Some(3);
        assert!(
            port_hazard(&v0, &m, &Remote::new()).is_some_and(|h| h.contains("not checked yet"))
        );
        let found = Remote::from([(10, Some("far away".to_owned()))]);
        assert_eq!(port_hazard(&v0, &m, &found).as_deref(), Some("far away"));
        assert_eq!(port_hazard(&v0, &m, &Remote::from([(10, None)])), None);
    }

    #[test]
    fn both_ends_of_a_veth_on_one_bridge_are_a_loop() {
        let mut a = link(10, "a", LinkKind::Veth, Some(7));
        a.lower = Some(11);
        let mut b = link(11, "b", LinkKind::Veth, Some(7));
        b.lower = Some(10);
        let m = model(vec![link(7, "br0", LinkKind::Bridge, None), a.clone(), b]);
        assert!(port_hazard(&a, &m, &Remote::new()).is_some_and(|h| h.contains("a loop")));
    }

    #[test]
    fn stacked_devices_are_followed_down() {
        let mut vlan = link(11, "bond0.5", LinkKind::Stacked("vlan".into()), Some(7));
        vlan.lower = Some(2);
        let bond = link(2, "bond0", LinkKind::Bond, None);
        let m = model(vec![
            link(7, "br0", LinkKind::Bridge, None),
            bond,
            vlan.clone(),
        ]);
        let h = port_hazard(&vlan, &m, &Remote::new()).expect("hazard");
        assert_eq!(h, "bond0.5 is a vlan on bond0: bond0 is a bond");
        vlan.lower = Some(99);
        assert!(
            port_hazard(&vlan, &m, &Remote::new()).is_some_and(|h| h.contains("does not show"))
        );
    }
}
