//! The planner: a pure function from the model and each bridge's policy to the repairs to make
//! and the repairs refused (with why). No I/O, no clock: unit-tested without root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde::Serialize;

use crate::{
    event::{PortState, StpMode},
    loop_guard::{
        hazards::{Remote, port_hazard},
        holds::Verdict,
        stp::stp_loop,
    },
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
    /// Glob patterns (`*`, `?`) of the port names that may be remembered as this bridge's
    /// members (none: every port seen on it). A pattern never makes a port a member.
    pub port_patterns: Vec<String>,
    /// Loop protection while STP is off (probes, BPDU guard, MAC flapping; `loop_guard`).
    pub loop_protect: bool,
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
            loop_protect: true,
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
    /// Kernel STP back on: a hazard joined a bridge whose STP bridge-guard had turned off.
    StpOn {
        bridge: String,
        bridge_ifindex: u32,
    },
    /// Out of forwarding for a loop (port state disabled: with STP off, the kernel turns a
    /// port set to blocking straight back to forwarding; disabled it leaves alone), and the
    /// bridge's learned addresses flushed, as STP does on a topology change: the loop taught
    /// it wrong ports for its guests' MACs.
    HoldDown {
        bridge: String,
        bridge_ifindex: u32,
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
            Self::StpOn {
                bridge,
                bridge_ifindex,
            } => format!("stp-on:{bridge}@{bridge_ifindex}"),
            Self::HoldDown {
                bridge,
                port,
                port_ifindex,
                ..
            } => format!("hold-down:{bridge}:{port}@{port_ifindex}"),
        }
    }

    /// Short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BridgeUp { .. } => "bridge_up",
            Self::StpOff { .. } => "stp_off",
            Self::Enslave { .. } => "reattach",
            Self::Forward { .. } => "force_forwarding",
            Self::StpOn { .. } => "stp_on",
            Self::HoldDown { .. } => "loop_hold_down",
        }
    }

    /// The port a repair is about, if any.
    pub fn port(&self) -> Option<&str> {
        match self {
            Self::Enslave { port, .. }
            | Self::Forward { port, .. }
            | Self::HoldDown { port, .. } => Some(port),
            Self::BridgeUp { .. } | Self::StpOff { .. } | Self::StpOn { .. } => None,
        }
    }

    pub fn bridge(&self) -> &str {
        match self {
            Self::BridgeUp { bridge, .. }
            | Self::StpOff { bridge, .. }
            | Self::Enslave { bridge, .. }
            | Self::Forward { bridge, .. }
            | Self::StpOn { bridge, .. }
            | Self::HoldDown { bridge, .. } => bridge,
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
            Self::StpOn { bridge_ifindex, .. } => model
                .link(*bridge_ifindex)
                .is_some_and(|l| l.stp == Some(StpMode::Kernel)),
            // Out of forwarding either way: disabled, or without carrier.
            Self::HoldDown { port_ifindex, .. } => model
                .link(*port_ifindex)
                .is_none_or(|l| l.port_state != Some(PortState::Forwarding)),
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
            Self::StpOn { bridge, .. } => write!(f, "turn STP back on on {bridge}"),
            Self::HoldDown { bridge, port, .. } => {
                write!(f, "take {bridge} {port} out of forwarding (loop hold-down)")
            }
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

/// What the planner is told beyond the model: loop protection's word on ports, what was found
/// beyond this namespace, and what bridge-guard itself did before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// Per port ifindex (ports without an entry: nothing against forcing them).
    pub ports: BTreeMap<u32, Verdict>,
    /// Bridges whose STP bridge-guard turned off: a hazard that joins later turns it back on.
    pub stp_off_by_us: BTreeSet<String>,
    /// Where ports lead in other network namespaces (`loop_guard::peers`).
    pub remote: Remote,
    /// Per bridge ifindex: ports the kernel lists that netlink could not decode.
    pub undecoded: BTreeMap<u32, Vec<u32>>,
    /// Per bridge name: why loop protection cannot run there.
    pub unprotected: BTreeMap<String, String>,
    /// Ports being looked up beyond the model (where they lead, fresh STP fields): their
    /// bridge waits for the answer (a round trip) before anything is repaired or refused.
    pub looking: BTreeSet<u32>,
}

/// How long a guarded bridge that appeared down is left to its owner before it is repaired
/// anyway. libvirt's `net-start` creates its bridge down, configures it and raises it 70-150 ms
/// later on a loaded 2-core machine; a bridge nobody raises is repaired after this. Only
/// bridges an owner is known to build wait (see [`Model::note_built_by_owner`]).
pub const SETTLE_NS: Ktime = 500_000_000;

/// Plans the repairs of every guarded bridge, with every bridge's settle time over (for
/// one-shot repairs, which see no bridge appear).
pub fn plan(model: &Model, guards: &[Guard], ctx: &Context) -> Plan {
    plan_at(model, guards, ctx, Ktime::MAX)
}

/// Plans the repairs of every guarded bridge at `now` (CLOCK_MONOTONIC, as the model's times).
pub fn plan_at(model: &Model, guards: &[Guard], ctx: &Context, now: Ktime) -> Plan {
    let mut plan = Plan::default();
    for guard in guards {
        plan_bridge(model, guard, ctx, &mut plan, now);
    }
    plan
}

/// Why repairing this bridge could create a loop or fight an owner.
fn bridge_hazards(
    br: &LinkSnapshot,
    ports: &[&LinkSnapshot],
    model: &Model,
    ctx: &Context,
) -> Vec<String> {
    let mut hazards: Vec<String> = ports
        .iter()
        .filter_map(|p| port_hazard(p, model, &ctx.remote))
        .collect();
    for port in ctx.undecoded.get(&br.ifindex).into_iter().flatten() {
        hazards.push(format!(
            "port {port} is on it but netlink could not decode it: counted as a hazard"
        ));
    }
    if br.stp == Some(StpMode::User) {
        hazards.push("user-space STP (mstpd) runs it".to_owned());
    }
    if model.mrp(br.ifindex) {
        hazards.push("MRP runs it (it drives port states itself)".to_owned());
    }
    if br.switchdev {
        hazards.push(format!("{} is offloaded to a switch (switchdev)", br.name));
    }
    hazards
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

fn plan_bridge(model: &Model, guard: &Guard, ctx: &Context, plan: &mut Plan, now: Ktime) {
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
    if ports.iter().any(|p| ctx.looking.contains(&p.ifindex)) {
        return;
    }

    let hazards = bridge_hazards(br, &ports, model, ctx);
    if !hazards.is_empty() && !policy.allow_unsafe {
        // A hazard that came after bridge-guard turned STP off: STP goes back on, since the
        // loop protection it relied on ends at this host's edge.
        if br.stp == Some(StpMode::Off) && ctx.stp_off_by_us.contains(name) {
            plan.actions.push(Action::StpOn {
                bridge: name.to_owned(),
                bridge_ifindex: br.ifindex,
            });
            refuse(
                plan,
                format!(
                    "left alone, STP turned back on: {}; it joined after bridge-guard turned STP off, and a loop through it would leave the host (override: allow_unsafe)",
                    hazards.join(", ")
                ),
            );
        } else {
            refuse(
                plan,
                format!(
                    "left alone: {}; repairing could create a loop or fight its owner (override: allow_unsafe)",
                    hazards.join(", ")
                ),
            );
        }
        return;
    }

    let verdict = |p: &LinkSnapshot| ctx.ports.get(&p.ifindex).filter(|_| policy.loop_protect);
    let oper_up_unprobed = ports
        .iter()
        .any(|p| p.oper_up && verdict(p) == Some(&Verdict::Unprobed));
    let held: Vec<&str> = ports
        .iter()
        .filter_map(|p| match verdict(p) {
            Some(Verdict::Hold { why }) => Some(why.as_str()),
            _ => None,
        })
        .collect();

    // STP off before raising a bridge: ports that come up then go straight to forwarding. Not
    // while kernel STP shows a loop, nor before loop protection has looked at every port.
    let stp_on = br.stp == Some(StpMode::Kernel);
    let mut stp_off_planned = policy.stp_off && stp_on;
    if stp_off_planned {
        let loops: Vec<String> = ports
            .iter()
            .filter_map(|p| stp_loop(p, br, model))
            .collect();
        let unprotected = ctx.unprotected.get(name).filter(|_| policy.loop_protect);
        if !loops.is_empty() {
            refuse(plan, format!("STP stays on: {}", loops.join("; ")));
            stp_off_planned = false;
        } else if !held.is_empty() {
            refuse(plan, format!("STP stays on: {}", held.join("; ")));
            stp_off_planned = false;
        } else if let Some(why) = unprotected {
            refuse(
                plan,
                format!(
                    "STP stays on: loop protection cannot run ({why}); loop_protect = false turns STP off without it"
                ),
            );
            stp_off_planned = false;
        } else if oper_up_unprobed {
            stp_off_planned = false; // Deferred until the probe round ends (milliseconds).
        }
    }
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

    // With STP off (or on its way off), loop protection decides first: a held port is taken
    // out and kept out, a released one put back, an unprobed one waits for its probe.
    let stp_off = br.stp == Some(StpMode::Off) || stp_off_planned;
    let mut decided: BTreeSet<u32> = BTreeSet::new();
    if stp_off && br.admin_up {
        for p in &ports {
            let action = match verdict(p) {
                Some(Verdict::Hold { .. })
                    if p.oper_up && p.port_state != Some(PortState::Disabled) =>
                {
                    Some(Action::HoldDown {
                        bridge: name.to_owned(),
                        bridge_ifindex: br.ifindex,
                        port: p.name.clone(),
                        port_ifindex: p.ifindex,
                    })
                }
                Some(Verdict::Release)
                    if policy.force_forwarding
                        && p.oper_up
                        && p.port_state != Some(PortState::Forwarding) =>
                {
                    Some(Action::Forward {
                        bridge: name.to_owned(),
                        port: p.name.clone(),
                        port_ifindex: p.ifindex,
                    })
                }
                _ => None,
            };
            if verdict(p).is_some() {
                decided.insert(p.ifindex);
            }
            plan.actions.extend(action);
        }
    }

    // Ports of a bridge that is down are disabled and come up by themselves with it.
    if policy.force_forwarding && br.admin_up {
        for p in ports.iter().filter(|p| !decided.contains(&p.ifindex)) {
            // Disabled is transient (carrier lost, or leaving the bridge): the kernel enables
            // the port when its carrier returns, straight into forwarding once STP is off.
            let stuck = p.oper_up
                && p.port_state
                    .is_some_and(|s| !matches!(s, PortState::Forwarding | PortState::Disabled));
            if !stuck {
                continue;
            }
            if stp_on && !stp_off_planned {
                // Said once for the bridge above when STP stays on for a loop or for probes.
                if policy.stp_off {
                    continue;
                }
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
        // Only members are re-attached: ports seen on this bridge (or named for it by libvirt),
        // as far as the patterns allow remembering them. A matching name alone is no claim:
        // libvirt names every network's taps vnetN.
        let remembered = |port: &str| {
            policy.port_patterns.is_empty()
                || policy.port_patterns.iter().any(|pat| glob_match(pat, port))
        };
        for port in model.members(name).filter(|p| remembered(p)) {
            let Some(link) = model.link_by_name(port) else {
                continue;
            };
            if link.master.is_some() || link.ifindex == br.ifindex || link.kind == LinkKind::Bridge
            {
                continue; // On this bridge, or on another master (see `moved`): never pulled back.
            }
            if ctx.looking.contains(&link.ifindex) {
                continue; // Where it leads is being looked up.
            }
            if let Some(h) = port_hazard(link, model, &ctx.remote).filter(|_| !policy.allow_unsafe)
            {
                refuse(plan, format!("not re-attaching: {h}"));
                continue;
            }
            // Re-attached with STP off, a port forwards at once: not one held for a loop.
            if let Some(Verdict::Hold { why }) = verdict(link) {
                refuse(plan, format!("not re-attaching: {why}"));
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

    /// A VM's tap, as QEMU opens it.
    const TAP: LinkKind = LinkKind::Tun {
        tap: Some(true),
        vnet_hdr: Some(true),
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

    /// Plans with nothing from loop protection or beyond the model.
    fn plan(model: &Model, guards: &[Guard]) -> Plan {
        super::plan(model, guards, &Context::default())
    }

    #[test]
    fn healthy_bridge_needs_nothing() {
        let m = model(vec![
            bridge(7, "br0", StpMode::Off),
            link(9, "vnet0", TAP, Some(7)),
        ]);
        assert_eq!(plan(&m, &guard("br0")), Plan::default());
    }

    #[test]
    fn stp_on_with_listening_port_turns_stp_off_then_forces_the_port() {
        let mut port = link(9, "vnet0", TAP, Some(7));
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
        let mut port = link(9, "vnet0", TAP, Some(7));
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
        let mut port = link(9, "vnet0", TAP, Some(7));
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
            link(9, "vnet0", TAP, Some(7)),
        ]);
        m.apply_netlink(NetlinkEvent::Link(link(9, "vnet0", TAP, None)), 1);
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
        m.note_built_by_owner(["br0"]);
        // A running bridge set down is repaired at once, whatever the time.
        let mut down = bridge(7, "br0", StpMode::Off);
        down.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(down.clone()), 1_000);
        assert!(
            !plan_at(&m, &guard("br0"), &Context::default(), 1_000)
                .actions
                .is_empty()
        );
        // Deleted and created again by its owner: down, STP on, its port not back yet.
        m.apply_netlink(NetlinkEvent::Link(link(9, "vnet0", TAP, None)), 2_000);
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
        assert_eq!(
            plan_at(&m, &guard("br0"), &Context::default(), 3_000),
            Plan::default()
        );
        assert_eq!(settle_deadline(&m, 3_000), Some(3_000 + SETTLE_NS));
        // Nobody raised it: repaired once the settle time is over.
        let late = plan_at(&m, &guard("br0"), &Context::default(), 3_000 + SETTLE_NS);
        assert_eq!(late.actions.len(), 3, "{late:?}");
        assert_eq!(settle_deadline(&m, 3_000 + SETTLE_NS), None);
        // Its owner raised it: repaired at once.
        new.admin_up = true;
        m.apply_netlink(NetlinkEvent::Link(new), 3_100);
        let kinds: Vec<&str> = plan_at(&m, &guard("br0"), &Context::default(), 3_100)
            .actions
            .iter()
            .map(Action::kind)
            .collect();
        assert_eq!(kinds, ["stp_off", "reattach"]);
    }

    fn port_on(ifindex: u32, master: u32) -> LinkSnapshot {
        link(ifindex, "vnet0", TAP, Some(master))
    }

    #[test]
    fn ports_on_another_bridge_are_never_pulled_back() {
        let mut m = model(vec![
            bridge(7, "br0", StpMode::Off),
            bridge(8, "br1", StpMode::Off),
            link(9, "vnet0", TAP, Some(7)),
        ]);
        m.apply_netlink(NetlinkEvent::Link(link(9, "vnet0", TAP, Some(8))), 1);
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
        let mut port = link(9, "vnet0", TAP, Some(7));
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
        let mut veth = link(3, "v0", LinkKind::Veth, None);
        veth.lower = Some(4);
        let peer = link(4, "v1", LinkKind::Veth, None);
        let m = model(vec![bridge(7, "br0", StpMode::Off), veth, peer, mv]);
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

    fn vnet(ifindex: u32, name: &str, state: PortState) -> LinkSnapshot {
        let mut p = link(ifindex, name, TAP, Some(7));
        p.port_state = Some(state);
        p
    }

    fn ctx(verdicts: &[(u32, Verdict)]) -> Context {
        Context {
            ports: verdicts.iter().cloned().collect(),
            ..Context::default()
        }
    }

    fn hold() -> Verdict {
        Verdict::Hold {
            why: "vnet1 is held out of forwarding for a loop with vnet0".into(),
        }
    }

    #[test]
    fn every_refused_kind_leaves_the_bridge_alone() {
        for kind in [
            LinkKind::Physical,
            LinkKind::Bond,
            LinkKind::Tunnel("vxlan".into()),
            LinkKind::Tunnel("gretap".into()),
            LinkKind::Tunnel("ip6gretap".into()),
            LinkKind::Tunnel("erspan".into()),
            LinkKind::Tunnel("l2tpeth".into()),
            LinkKind::Overlay("team".into()),
            LinkKind::Overlay("macsec".into()),
            LinkKind::Overlay("hsr".into()),
            LinkKind::Overlay("batadv".into()),
            LinkKind::Overlay("openvswitch".into()),
            LinkKind::Other("mystery".into()),
        ] {
            let m = model(vec![
                bridge(7, "br0", StpMode::Kernel),
                vnet(9, "vnet0", PortState::Listening),
                link(10, "x0", kind.clone(), Some(7)),
            ]);
            let p = plan(&m, &guard("br0"));
            assert!(p.actions.is_empty(), "{kind:?}: {p:?}");
            assert!(
                p.refusals[0].reason.starts_with("left alone: x0 is"),
                "{kind:?}: {p:?}"
            );
        }
    }

    #[test]
    fn a_port_netlink_could_not_decode_is_a_hazard() {
        let m = model(vec![bridge(7, "br0", StpMode::Kernel)]);
        let c = Context {
            undecoded: [(7, vec![33])].into(),
            ..Context::default()
        };
        let p = super::plan(&m, &guard("br0"), &c);
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(p.refusals[0].reason.contains("port 33"), "{p:?}");
    }

    #[test]
    fn a_late_hazard_turns_stp_back_on_where_we_turned_it_off() {
        let links = vec![
            bridge(7, "br0", StpMode::Off),
            vnet(9, "vnet0", PortState::Forwarding),
            link(10, "vx0", LinkKind::Tunnel("vxlan".into()), Some(7)),
        ];
        let m = model(links);
        let mut c = Context::default();
        let p = super::plan(&m, &guard("br0"), &c);
        assert!(p.actions.is_empty(), "not ours to turn on: {p:?}");
        c.stp_off_by_us.insert("br0".into());
        let p = super::plan(&m, &guard("br0"), &c);
        assert_eq!(
            p.actions,
            [Action::StpOn {
                bridge: "br0".into(),
                bridge_ifindex: 7
            }]
        );
        assert!(
            p.refusals[0]
                .reason
                .contains("STP turned back on: vx0 is a vxlan tunnel port")
        );
    }

    #[test]
    fn kernel_stp_blocking_a_port_for_a_loop_keeps_stp_on() {
        use crate::sources::netlink::{BridgeIdent, StpPort};
        let own = BridgeIdent {
            priority: 0x8000,
            mac: [2, 0, 0, 0, 0, 1],
        };
        let mut br = bridge(7, "br0", StpMode::Kernel);
        br.bridge_id = Some(own);
        let mut v0 = vnet(9, "vnet0", PortState::Listening);
        v0.stp_port = StpPort {
            designated_bridge: Some(own),
            designated_port: Some(0x8001),
            port_id: Some(0x8001),
            port_no: Some(1),
            designated_root: Some(own),
        };
        let mut v1 = vnet(10, "vnet1", PortState::Blocking);
        v1.stp_port = StpPort {
            port_id: Some(0x8002),
            port_no: Some(2),
            ..v0.stp_port
        };
        let m = model(vec![br, v0, v1]);
        let p = plan(&m, &guard("br0"));
        assert!(
            p.actions.is_empty(),
            "neither STP off nor a forced port: {p:?}"
        );
        assert_eq!(p.refusals.len(), 1, "{p:?}");
        assert!(
            p.refusals[0]
                .reason
                .starts_with("STP stays on: kernel STP holds vnet1 in blocking"),
            "{p:?}"
        );
    }

    #[test]
    fn stp_goes_off_only_once_every_port_was_probed_and_none_is_held() {
        let m = model(vec![
            bridge(7, "br0", StpMode::Kernel),
            vnet(9, "vnet0", PortState::Listening),
            vnet(10, "vnet1", PortState::Listening),
        ]);
        let p = super::plan(&m, &guard("br0"), &ctx(&[(9, Verdict::Unprobed)]));
        assert_eq!(p, Plan::default(), "deferred, silently, for milliseconds");
        let p = super::plan(&m, &guard("br0"), &ctx(&[(10, hold())]));
        assert!(p.actions.is_empty());
        assert!(
            p.refusals[0]
                .reason
                .starts_with("STP stays on: vnet1 is held"),
            "{p:?}"
        );
        let c = Context {
            unprotected: [("br0".to_owned(), "no sockets".to_owned())].into(),
            ..Context::default()
        };
        let p = super::plan(&m, &guard("br0"), &c);
        assert!(
            p.refusals[0]
                .reason
                .contains("loop protection cannot run (no sockets)")
        );
        let mut guards = guard("br0");
        guards[0].policy.loop_protect = false;
        let p = super::plan(&m, &guards, &c);
        assert_eq!(
            p.actions.len(),
            3,
            "without loop protection: STP off at once: {p:?}"
        );
    }

    #[test]
    fn a_held_port_is_taken_out_kept_out_and_put_back_when_released() {
        let links = |state| {
            vec![
                bridge(7, "br0", StpMode::Off),
                vnet(9, "vnet0", PortState::Forwarding),
                vnet(10, "vnet1", state),
            ]
        };
        let hold_down = Action::HoldDown {
            bridge: "br0".into(),
            bridge_ifindex: 7,
            port: "vnet1".into(),
            port_ifindex: 10,
        };
        let m = model(links(PortState::Forwarding));
        let p = super::plan(&m, &guard("br0"), &ctx(&[(10, hold())]));
        assert_eq!(p.actions, std::slice::from_ref(&hold_down));
        // Out: kept out, never forced back.
        let m = model(links(PortState::Disabled));
        assert!(
            super::plan(&m, &guard("br0"), &ctx(&[(10, hold())]))
                .actions
                .is_empty()
        );
        let m = model(links(PortState::Listening));
        assert_eq!(
            super::plan(&m, &guard("br0"), &ctx(&[(10, hold())])).actions,
            [hold_down],
            "not forced, taken out"
        );
        // Released: back to forwarding, from disabled too.
        let m = model(links(PortState::Disabled));
        assert_eq!(
            super::plan(&m, &guard("br0"), &ctx(&[(10, Verdict::Release)])).actions,
            [Action::Forward {
                bridge: "br0".into(),
                port: "vnet1".into(),
                port_ifindex: 10
            }]
        );
        // Not probed yet: not forced until its round ends.
        let m = model(links(PortState::Learning));
        assert!(
            super::plan(&m, &guard("br0"), &ctx(&[(10, Verdict::Unprobed)]))
                .actions
                .is_empty()
        );
        // Loop protection off: the hold is not asked for, the port forced as before.
        let mut guards = guard("br0");
        guards[0].policy.loop_protect = false;
        assert_eq!(
            super::plan(&m, &guards, &ctx(&[(10, hold())]))
                .actions
                .len(),
            1
        );
    }

    #[test]
    fn a_pattern_never_captures_a_port_that_was_not_a_member() {
        let mut m = model(vec![
            bridge(7, "br0", StpMode::Off),
            bridge(8, "br1", StpMode::Off),
            vnet(9, "vnet0", PortState::Forwarding),
        ]);
        let mut guards = guard("br0");
        guards[0].policy.port_patterns = vec!["vnet*".into()];
        // A fresh tap about to be added to br1 by libvirt: its name matches, it is not ours.
        m.apply_netlink(
            NetlinkEvent::Link(link(
                20,
                "vnet7",
                LinkKind::Tun {
                    tap: Some(true),
                    vnet_hdr: Some(true),
                },
                None,
            )),
            1,
        );
        assert_eq!(plan(&m, &guards), Plan::default());
        // A member detached is re-attached; one the patterns do not allow is not remembered.
        m.apply_netlink(NetlinkEvent::Link(link(9, "vnet0", TAP, None)), 2);
        assert_eq!(plan(&m, &guards).actions.len(), 1);
        guards[0].policy.port_patterns = vec!["tap*".into()];
        assert!(plan(&m, &guards).actions.is_empty());
        // Nor one held for a loop: enslaved with STP off, it would forward at once.
        guards[0].policy.port_patterns.clear();
        let p = super::plan(&m, &guards, &ctx(&[(9, hold())]));
        assert!(p.actions.is_empty(), "{p:?}");
        assert!(
            p.refusals[0]
                .reason
                .starts_with("not re-attaching: vnet1 is held"),
            "{p:?}"
        );
    }

    #[test]
    fn a_member_re_created_unseen_is_a_new_device_and_not_a_member() {
        let mut m = model(vec![
            bridge(7, "br0", StpMode::Off),
            vnet(9, "vnet0", PortState::Forwarding),
        ]);
        // Deleted and re-created (another network's guest) while notifications were lost: the
        // next dump shows a fresh vnet0 without a master.
        m.reset(
            vec![bridge(7, "br0", StpMode::Off), link(21, "vnet0", TAP, None)],
            5,
        );
        assert_eq!(plan(&m, &guard("br0")), Plan::default());
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
