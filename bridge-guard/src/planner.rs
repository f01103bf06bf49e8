//! The planner: a pure function from the model and each bridge's policy to the repairs to make
//! and the repairs refused (with why). No I/O, no clock: unit-tested without root.

use std::fmt;

use serde::Serialize;

use crate::{
    event::{PortState, StpMode},
    model::{Ktime, Model},
    sources::netlink::{LinkKind, LinkSnapshot},
};

/// What to do for one guarded bridge. Defaults repair everything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub stp_off: bool,
    pub force_forwarding: bool,
    pub reattach: bool,
    pub keep_up: bool,
    /// Repair even where it could create a loop or fight an owner (physical NIC, tunnel port,
    /// switchdev, user-space STP). For those who know their topology.
    pub allow_unsafe: bool,
    /// Glob patterns (`*`, `?`) of port names that always belong to this bridge.
    pub port_patterns: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            stp_off: true,
            force_forwarding: true,
            reattach: true,
            keep_up: true,
            allow_unsafe: false,
            port_patterns: Vec::new(),
        }
    }
}

/// One guarded bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Guard {
    pub bridge: String,
    pub policy: Policy,
}

/// A repair.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    BridgeUp {
        bridge: String,
        bridge_ifindex: u32,
    },
    StpOff {
        bridge: String,
        bridge_ifindex: u32,
    },
    Enslave {
        bridge: String,
        bridge_ifindex: u32,
        port: String,
        port_ifindex: u32,
    },
    Forward {
        bridge: String,
        port: String,
        port_ifindex: u32,
    },
}

impl Action {
    /// Stable identity for in-flight tracking: the same repair of the same devices. The
    /// ifindexes are part of it: a bridge recreated under the same name is another device, and
    /// what happened to its predecessor (failures, requests in flight) must not hold back its repair.
    pub fn key(&self) -> String {
        match self {
            Self::BridgeUp {
                bridge,
                bridge_ifindex,
            } => format!("up:{bridge}@{bridge_ifindex}"),
            Self::StpOff {
                bridge,
                bridge_ifindex,
            } => format!("stp-off:{bridge}@{bridge_ifindex}"),
            Self::Enslave {
                bridge,
                bridge_ifindex,
                port,
                port_ifindex,
            } => {
                format!("enslave:{bridge}@{bridge_ifindex}:{port}@{port_ifindex}")
            }
            Self::Forward {
                bridge,
                port,
                port_ifindex,
            } => format!("forward:{bridge}:{port}@{port_ifindex}"),
        }
    }

    /// Short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BridgeUp { .. } => "bridge_up",
            Self::StpOff { .. } => "stp_off",
            Self::Enslave { .. } => "reattach",
            Self::Forward { .. } => "force_forwarding",
        }
    }

    /// The port a repair is about, if any.
    pub fn port(&self) -> Option<&str> {
        match self {
            Self::Enslave { port, .. } | Self::Forward { port, .. } => Some(port),
            Self::BridgeUp { .. } | Self::StpOff { .. } => None,
        }
    }

    pub fn bridge(&self) -> &str {
        match self {
            Self::BridgeUp { bridge, .. }
            | Self::StpOff { bridge, .. }
            | Self::Enslave { bridge, .. }
            | Self::Forward { bridge, .. } => bridge,
        }
    }

    /// Whether the model shows the repair took effect.
    pub fn done(&self, model: &Model) -> bool {
        match self {
            Self::BridgeUp { bridge_ifindex, .. } => {
                model.link(*bridge_ifindex).is_some_and(|l| l.admin_up)
            }
            Self::StpOff { bridge_ifindex, .. } => model
                .link(*bridge_ifindex)
                .is_some_and(|l| l.stp == Some(StpMode::Off)),
            Self::Enslave {
                bridge_ifindex,
                port_ifindex,
                ..
            } => model
                .link(*port_ifindex)
                .is_some_and(|l| l.master == Some(*bridge_ifindex)),
            Self::Forward { port_ifindex, .. } => model
                .link(*port_ifindex)
                .is_some_and(|l| l.port_state == Some(PortState::Forwarding)),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BridgeUp { bridge, .. } => write!(f, "set {bridge} up"),
            Self::StpOff { bridge, .. } => write!(f, "turn STP off on {bridge}"),
            Self::Enslave { bridge, port, .. } => write!(f, "re-attach {port} to {bridge}"),
            Self::Forward { bridge, port, .. } => write!(f, "force {bridge} {port} to forwarding"),
        }
    }
}

/// A repair not made, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Refusal {
    pub bridge: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub refusals: Vec<Refusal>,
}

/// Matches `*` (any run) and `?` (one character) against the whole name.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// Why repairing a bridge with `port` on it could create a loop or fight an owner.
fn hazard(port: &LinkSnapshot, model: &Model) -> Option<String> {
    if port.switchdev {
        return Some(format!(
            "{} is a switchdev (hardware-offloaded) port",
            port.name
        ));
    }
    match &port.kind {
        LinkKind::Physical => Some(format!("{} is a physical NIC", port.name)),
        LinkKind::Tunnel(kind) => Some(format!("{} is a {kind} tunnel port", port.name)),
        LinkKind::Bond => Some(format!("{} is a bond", port.name)),
        LinkKind::Stacked(kind) => {
            let lower = port.lower.and_then(|i| model.link(i));
            match lower {
                Some(l) if matches!(l.kind, LinkKind::Physical | LinkKind::Bond) => Some(format!(
                    "{} is a {kind} on {}, which leaves the host",
                    port.name, l.name
                )),
                // A lower device in another namespace is unknown: assume it leaves the host.
                None if port.lower.is_some() => Some(format!(
                    "{} is a {kind} on a device outside this namespace",
                    port.name
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// How long a guarded bridge that appeared down is left to its owner before it is repaired
/// anyway. libvirt's `net-start` creates its bridge down, configures it and raises it 70-150 ms
/// later on a loaded 2-core machine; a bridge nobody raises is repaired after this.
pub const SETTLE_NS: Ktime = 500_000_000;

/// Plans the repairs of every guarded bridge, with every bridge's settle time over (for
/// one-shot repairs, which see no bridge appear).
pub fn plan(model: &Model, guards: &[Guard]) -> Plan {
    plan_at(model, guards, Ktime::MAX)
}

/// Plans the repairs of every guarded bridge at `now` (CLOCK_MONOTONIC, as the model's times).
pub fn plan_at(model: &Model, guards: &[Guard], now: Ktime) -> Plan {
    let mut plan = Plan::default();
    for guard in guards {
        plan_bridge(model, guard, &mut plan, now);
    }
    plan
}

/// When, after `now`, the next bridge's owner is given up on and it is repaired: the agent
/// plans again then.
pub fn settle_deadline(model: &Model, now: Ktime) -> Option<Ktime> {
    model
        .building()
        .map(|(_, since)| since.saturating_add(SETTLE_NS))
        .filter(|t| *t > now)
        .min()
}

fn plan_bridge(model: &Model, guard: &Guard, plan: &mut Plan, now: Ktime) {
    let policy = &guard.policy;
    let name = guard.bridge.as_str();
    let refuse = |plan: &mut Plan, reason: String| {
        plan.refusals.push(Refusal {
            bridge: name.to_owned(),
            reason,
        });
    };
    let Some(br) = model.bridge(name) else {
        return; // Not there (yet): recreating it is its owner's job; we re-attach when it returns.
    };
    // Its owner is still building it (created down, being configured): leave it alone until
    // the owner raises it, or the settle time is over. Fighting libvirt's net-start here once
    // cost it the bridge.
    if model
        .building_since(br.ifindex)
        .is_some_and(|since| now < since.saturating_add(SETTLE_NS))
    {
        return;
    }
    let ports: Vec<&LinkSnapshot> = model.ports_of(br.ifindex).collect();

    let mut hazards: Vec<String> = ports.iter().filter_map(|p| hazard(p, model)).collect();
    if br.stp == Some(StpMode::User) {
        hazards.push("user-space STP (mstpd) runs it".to_owned());
    }
    if model.mrp(br.ifindex) {
        hazards.push("MRP runs it (it drives port states itself)".to_owned());
    }
    if br.switchdev {
        hazards.push(format!("{name} is offloaded to a switch (switchdev)"));
    }
    if !hazards.is_empty() && !policy.allow_unsafe {
        refuse(
            plan,
            format!(
                "left alone: {}; repairing could create a loop or fight its owner (override: allow_unsafe)",
                hazards.join(", ")
            ),
        );
        return;
    }

    // STP off before raising a bridge: ports that come up then go straight to forwarding.
    let stp_on = br.stp == Some(StpMode::Kernel);
    let stp_off_planned = policy.stp_off && stp_on;
    if stp_off_planned {
        plan.actions.push(Action::StpOff {
            bridge: name.to_owned(),
            bridge_ifindex: br.ifindex,
        });
    }
    if policy.keep_up && !br.admin_up {
        plan.actions.push(Action::BridgeUp {
            bridge: name.to_owned(),
            bridge_ifindex: br.ifindex,
        });
    }

    // Ports of a bridge that is down are disabled and come up by themselves with it.
    if policy.force_forwarding && br.admin_up {
        for p in &ports {
            // Disabled is transient (carrier lost, or leaving the bridge): the kernel enables
            // the port when its carrier returns, straight into forwarding once STP is off.
            let stuck = p.oper_up
                && p.port_state
                    .is_some_and(|s| !matches!(s, PortState::Forwarding | PortState::Disabled));
            if !stuck {
                continue;
            }
            if stp_on && !stp_off_planned {
                refuse(
                    plan,
                    format!(
                        "{} is not forwarding but kernel STP is on and stp_off is disabled",
                        p.name
                    ),
                );
                continue;
            }
            plan.actions.push(Action::Forward {
                bridge: name.to_owned(),
                port: p.name.clone(),
                port_ifindex: p.ifindex,
            });
        }
    }

    if policy.reattach {
        let mut wanted: Vec<&str> = model.members(name).collect();
        for l in model.links() {
            if policy
                .port_patterns
                .iter()
                .any(|pat| glob_match(pat, &l.name))
                && !wanted.contains(&l.name.as_str())
            {
                wanted.push(&l.name);
            }
        }
        for port in wanted {
            let Some(link) = model.link_by_name(port) else {
                continue;
            };
            if link.master.is_some() || link.ifindex == br.ifindex || link.kind == LinkKind::Bridge
            {
                continue; // On this bridge, or on another master (see `moved`): never pulled back.
            }
            if let Some(h) = hazard(link, model).filter(|_| !policy.allow_unsafe) {
                refuse(plan, format!("not re-attaching: {h}"));
                continue;
            }
            plan.actions.push(Action::Enslave {
                bridge: name.to_owned(),
                bridge_ifindex: br.ifindex,
                port: port.to_owned(),
                port_ifindex: link.ifindex,
            });
        }
    }
    for (bridge, port, other) in model.moved() {
        if bridge == name {
            refuse(
                plan,
                format!("{port} moved to {other}: not pulling it back"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{Model, tests::link},
        sources::netlink::NetlinkEvent,
    };

    fn bridge(ifindex: u32, name: &str, stp: StpMode) -> LinkSnapshot {
        let mut b = link(ifindex, name, LinkKind::Bridge, None);
        b.stp = Some(stp);
        b
    }

    fn guard(bridge: &str) -> Vec<Guard> {
        vec![Guard {
            bridge: bridge.into(),
            policy: Policy::default(),
        }]
    }

    fn model(links: Vec<LinkSnapshot>) -> Model {
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(links, 0);
        m
    }

    #[test]
    fn healthy_bridge_needs_nothing() {
        let m = model(vec![
            bridge(7, "br0", StpMode::Off),
            link(9, "vnet0", LinkKind::Veth, Some(7)),
        ]);
        assert_eq!(plan(&m, &guard("br0")), Plan::default());
    }

    #[test]
    fn stp_on_with_listening_port_turns_stp_off_then_forces_the_port() {
        let mut port = link(9, "vnet0", LinkKind::Veth, Some(7));
        port.port_state = Some(PortState::Listening);
        let m = model(vec![bridge(7, "br0", StpMode::Kernel), port]);
        let p = plan(&m, &guard("br0"));
        assert_eq!(
            p.actions,
            [
                Action::StpOff {
                    bridge: "br0".into(),
                    bridge_ifindex: 7
                },
                Action::Forward {
                    bridge: "br0".into(),
                    port: "vnet0".into(),
                    port_ifindex: 9
                },
            ]
        );
    }

    #[test]
    fn ports_without_carrier_or_disabled_are_not_forced() {
        let mut port = link(9, "vnet0", LinkKind::Veth, Some(7));
        port.port_state = Some(PortState::Blocking);
        port.oper_up = false;
        let m = model(vec![bridge(7, "br0", StpMode::Off), port.clone()]);
        assert!(plan(&m, &guard("br0")).actions.is_empty());
        port.oper_up = true;
        port.port_state = Some(PortState::Disabled);
        let m = model(vec![bridge(7, "br0", StpMode::Off), port]);
        assert!(plan(&m, &guard("br0")).actions.is_empty());
    }

    #[test]
    fn a_down_bridge_with_stp_on_gets_stp_off_before_it_is_raised() {
        let mut br = bridge(7, "br0", StpMode::Kernel);
        br.admin_up = false;
        let m = model(vec![br]);
        assert_eq!(
            plan(&m, &guard("br0")).actions,
            [
                Action::StpOff {
                    bridge: "br0".into(),
                    bridge_ifindex: 7
                },
                Action::BridgeUp {
                    bridge: "br0".into(),
                    bridge_ifindex: 7
                },
            ]
        );
    }

    #[test]
    fn a_down_bridge_is_raised_and_its_ports_left_to_follow() {
        let mut br = bridge(7, "br0", StpMode::Off);
        br.admin_up = false;
        let mut port = link(9, "vnet0", LinkKind::Veth, Some(7));
        port.port_state = Some(PortState::Disabled);
        let m = model(vec![br, port]);
        assert_eq!(
            plan(&m, &guard("br0")).actions,
            [Action::BridgeUp {
                bridge: "br0".into(),
                bridge_ifindex: 7
            }]
        );
    }

    #[test]
    fn detached_members_are_reattached_even_to_a_recreated_bridge() {
        let mut m = model(vec![
            bridge(7, "br0", StpMode::Off),
            link(9, "vnet0", LinkKind::Veth, Some(7)),
        ]);
        m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, None)),
            1,
        );
        m.apply_netlink(
            NetlinkEvent::Removed {
                ifindex: 7,
                name: "br0".into(),
            },
            2,
        );
        assert!(
            plan(&m, &guard("br0")).actions.is_empty(),
            "no bridge, nothing to do"
        );
        m.apply_netlink(NetlinkEvent::Link(bridge(30, "br0", StpMode::Off)), 3);
        assert_eq!(
            plan(&m, &guard("br0")).actions,
            [Action::Enslave {
                bridge: "br0".into(),
                bridge_ifindex: 30,
                port: "vnet0".into(),
                port_ifindex: 9
            }]
        );
    }

    #[test]
    fn a_bridge_its_owner_is_still_building_is_left_alone_until_up_or_settled() {
        let mut m = model(vec![bridge(7, "br0", StpMode::Off), port_on(9, 7)]);
        // A running bridge set down is repaired at once, whatever the time.
        let mut down = bridge(7, "br0", StpMode::Off);
        down.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(down.clone()), 1_000);
        assert!(!plan_at(&m, &guard("br0"), 1_000).actions.is_empty());
        // Deleted and created again by its owner: down, STP on, its port not back yet.
        m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, None)),
            2_000,
        );
        m.apply_netlink(
            NetlinkEvent::Removed {
                ifindex: 7,
                name: "br0".into(),
            },
            2_000,
        );
        let mut new = bridge(30, "br0", StpMode::Kernel);
        new.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(new.clone()), 3_000);
        assert_eq!(plan_at(&m, &guard("br0"), 3_000), Plan::default());
        assert_eq!(settle_deadline(&m, 3_000), Some(3_000 + SETTLE_NS));
        // Nobody raised it: repaired once the settle time is over.
        let late = plan_at(&m, &guard("br0"), 3_000 + SETTLE_NS);
        assert_eq!(late.actions.len(), 3, "{late:?}");
        assert_eq!(settle_deadline(&m, 3_000 + SETTLE_NS), None);
        // Its owner raised it: repaired at once.
        new.admin_up = true;
        m.apply_netlink(NetlinkEvent::Link(new), 3_100);
        let kinds: Vec<&str> = plan_at(&m, &guard("br0"), 3_100)
            .actions
            .iter()
            .map(Action::kind)
            .collect();
        assert_eq!(kinds, ["stp_off", "reattach"]);
    }

    fn port_on(ifindex: u32, master: u32) -> LinkSnapshot {
        link(ifindex, "vnet0", LinkKind::Veth, Some(master))
    }

    #[test]
    fn ports_on_another_bridge_are_never_pulled_back() {
        let mut m = model(vec![
            bridge(7, "br0", StpMode::Off),
            bridge(8, "br1", StpMode::Off),
            link(9, "vnet0", LinkKind::Veth, Some(7)),
        ]);
        m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, Some(8))),
            1,
        );
        let mut guards = guard("br0");
        guards[0].policy.port_patterns = vec!["vnet*".into()];
        let p = plan(&m, &guards);
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(
            p.refusals[0].reason,
            "vnet0 moved to br1: not pulling it back"
        );
    }

    #[test]
    fn bridges_with_tunnels_nics_or_user_stp_are_left_alone_unless_overridden() {
        let mut port = link(9, "vnet0", LinkKind::Veth, Some(7));
        port.port_state = Some(PortState::Listening);
        for (hazard, expect) in [
            (
                link(10, "vx0", LinkKind::Tunnel("vxlan".into()), Some(7)),
                "vx0 is a vxlan tunnel port",
            ),
            (
                link(10, "eth0", LinkKind::Physical, Some(7)),
                "eth0 is a physical NIC",
            ),
        ] {
            let m = model(vec![
                bridge(7, "br0", StpMode::Kernel),
                port.clone(),
                hazard,
            ]);
            let p = plan(&m, &guard("br0"));
            assert!(p.actions.is_empty(), "{p:?}");
            assert!(p.refusals[0].reason.contains(expect), "{p:?}");

            let mut guards = guard("br0");
            guards[0].policy.allow_unsafe = true;
            assert_eq!(plan(&m, &guards).actions.len(), 2, "override repairs");
        }
        let m = model(vec![bridge(7, "br0", StpMode::User), port.clone()]);
        assert!(plan(&m, &guard("br0")).refusals[0].reason.contains("mstpd"));
        let mut m = model(vec![bridge(7, "br0", StpMode::Kernel), port]);
        m.set_mrp([7]);
        let p = plan(&m, &guard("br0"));
        assert!(
            p.actions.is_empty() && p.refusals[0].reason.contains("MRP runs it"),
            "{p:?}"
        );
    }

    #[test]
    fn vlan_on_a_nic_is_a_hazard_but_macvlan_on_a_veth_is_not() {
        let mut vlan = link(11, "eth0.5", LinkKind::Stacked("vlan".into()), Some(7));
        vlan.lower = Some(2);
        let nic = link(2, "eth0", LinkKind::Physical, None);
        let m = model(vec![bridge(7, "br0", StpMode::Off), nic, vlan]);
        assert!(
            plan(&m, &guard("br0")).refusals[0]
                .reason
                .contains("eth0.5 is a vlan on eth0")
        );

        let mut mv = link(11, "mv0", LinkKind::Stacked("macvlan".into()), Some(7));
        mv.lower = Some(3);
        let veth = link(3, "v0", LinkKind::Veth, None);
        let m = model(vec![bridge(7, "br0", StpMode::Off), veth, mv]);
        assert!(plan(&m, &guard("br0")).refusals.is_empty());
    }

    #[test]
    fn disabled_repairs_stay_disabled() {
        let mut br = bridge(7, "br0", StpMode::Kernel);
        br.admin_up = false;
        let m = model(vec![br]);
        let guards = vec![Guard {
            bridge: "br0".into(),
            policy: Policy {
                stp_off: false,
                keep_up: false,
                ..Policy::default()
            },
        }];
        assert!(plan(&m, &guards).actions.is_empty());
    }

    #[test]
    fn globs() {
        assert!(glob_match("vnet*", "vnet12"));
        assert!(glob_match("vnet?", "vnet1"));
        assert!(!glob_match("vnet?", "vnet12"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("tap*", "vnet0"));
    }
}
