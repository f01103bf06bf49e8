//! The model of the guarded bridges: every link in the namespace, each guarded port's state and
//! since when, and which ports belong to which guarded bridge (remembered by name, so a bridge
//! deleted and recreated gets its ports back).
//!
//! Sources only feed it (`apply_*`); each call returns the port transitions it caused, stamped
//! with the kernel's clock when eBPF saw the change and with receive time otherwise.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    event::{Actor, Change, KernelEvent, PortState, StpMode},
    sources::netlink::{LinkKind, LinkSnapshot, NetlinkEvent},
};

/// CLOCK_MONOTONIC nanoseconds.
pub type Ktime = u64;

/// Which clock stamped a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// `bpf_ktime_get_ns` in the hook: when the kernel made the change.
    Kernel,
    /// When the agent received the netlink message (later than the change by its delivery).
    Netlink,
}

/// A guarded port's current state.
#[derive(Clone, Debug, Serialize)]
pub struct Track {
    pub bridge: String,
    pub state: PortState,
    pub since: Ktime,
    pub clock: Clock,
    /// When the port last stopped forwarding, while it is not forwarding.
    pub outage_since: Option<Ktime>,
    /// Who made the last change, where eBPF knows.
    pub actor: Option<Actor>,
}

/// A port changing state, as the model saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub bridge: String,
    pub port: String,
    pub from: Option<PortState>,
    pub to: PortState,
    pub at: Ktime,
    pub clock: Clock,
    /// How long the port was in `from`.
    pub in_from_ns: Option<u64>,
    /// When this transition ends an episode of not forwarding: its whole length.
    pub outage_ns: Option<u64>,
    pub actor: Option<Actor>,
}

#[derive(Debug, Default)]
pub struct Model {
    guarded: BTreeSet<String>,
    links: BTreeMap<u32, LinkSnapshot>,
    /// Link name -> ifindex, kept with `links`: members are remembered by name.
    by_name: BTreeMap<String, u32>,
    /// Guarded port name -> state.
    tracks: BTreeMap<String, Track>,
    /// Guarded bridge name -> port names that belong to it.
    members: BTreeMap<String, BTreeSet<String>>,
    /// Ports that moved from a guarded bridge to another master: (bridge, port, new master).
    moved: BTreeSet<(String, String, String)>,
    /// Who last changed STP on a bridge, where eBPF knows.
    pub stp_actor: BTreeMap<String, Actor>,
    /// Bridges MRP runs on (ifindex), as of the last dump.
    mrp: BTreeSet<u32>,
    /// Whether eBPF reports every port-state change (fentry/kprobe on br_set_state). Then a
    /// port state in a netlink notification is older news: the message was built before the
    /// hook's events were read, and must not undo them.
    kernel_port_states: bool,
    /// The latest port state eBPF saw per port ifindex, with the kernel's time and actor, until
    /// netlink shows the model that state: a new port's first states often reach the ring
    /// buffer before the notification that enslaved it, or made it known at all, when the
    /// model cannot track it yet.
    stamps: BTreeMap<u32, Stamp>,
    /// Whether eBPF reports every join and leave (fentry/kprobe on the upper-device link and
    /// unlink). Then a notification that contradicts a recent join or leave is older news.
    kernel_membership: bool,
    /// The master eBPF last saw a port join (or none, for a leave) with the kernel's time,
    /// until netlink shows the same: a notification queued before an unlink (the port's own
    /// changes on its way out) is read after the hook's event, and must not enslave the port
    /// again in the model, nor delay its repair until the unlink's own notification.
    memberships: BTreeMap<u32, (Option<u32>, Ktime)>,
    /// Ports whose tracking ended (deleted, or moved away) since [`Model::take_forgotten`].
    forgotten: Vec<String>,
    /// When the dump behind the last [`Model::reset`] was asked for: a kernel event stamped
    /// before it is older than that picture (its effect, or a later one, is in the dump).
    dumped_at: Ktime,
    /// Guarded bridges (ifindex) that appeared while the agent watched and have not been up
    /// yet, with when they appeared: their owner (libvirt's `net-start`) is still building them.
    building: BTreeMap<u32, Ktime>,
    /// Guarded bridges an owner builds after creating them (libvirt's networks): only these are
    /// left to settle. Any other bridge that appears down is a bridge recreated and left down,
    /// repaired at once.
    built_by_owner: BTreeSet<String>,
}

/// A port state as eBPF saw it.
#[derive(Clone, Debug)]
struct Stamp {
    state: PortState,
    at: Ktime,
    actor: Actor,
}

/// How long a [`Stamp`] may wait for netlink to catch up. Delivery gaps between the ring
/// buffer and the netlink socket are microseconds to milliseconds (more while the agent is
/// descheduled); an older stamp is more likely news of an earlier visit to the same state.
const STAMP_WINDOW_NS: Ktime = 1_000_000_000;

impl Model {
    pub fn new(guarded: impl IntoIterator<Item = String>) -> Self {
        let guarded: BTreeSet<String> = guarded.into_iter().collect();
        let members = guarded
            .iter()
            .map(|b| (b.clone(), BTreeSet::new()))
            .collect();
        Self {
            guarded,
            members,
            ..Self::default()
        }
    }

    pub fn guarded(&self) -> impl Iterator<Item = &str> {
        self.guarded.iter().map(String::as_str)
    }

    /// Guards another set of bridges (a configuration reload). Members stay remembered for the
    /// bridges still guarded; the ports of bridges no longer guarded are no longer tracked.
    pub fn set_guarded(&mut self, guarded: impl IntoIterator<Item = String>) {
        self.guarded = guarded.into_iter().collect();
        let guarded = &self.guarded;
        self.members.retain(|b, _| guarded.contains(b));
        for b in guarded {
            self.members.entry(b.clone()).or_default();
        }
        let dropped: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| !guarded.contains(&t.bridge))
            .map(|(port, _)| port.clone())
            .collect();
        for port in dropped {
            self.tracks.remove(&port);
            self.forgotten.push(port);
        }
        self.moved.retain(|(b, _, _)| self.guarded.contains(b));
    }

    pub fn link(&self, ifindex: u32) -> Option<&LinkSnapshot> {
        self.links.get(&ifindex)
    }

    pub fn link_by_name(&self, name: &str) -> Option<&LinkSnapshot> {
        self.by_name.get(name).and_then(|i| self.links.get(i))
    }

    fn insert_link(&mut self, snap: LinkSnapshot) {
        if let Some(old) = self.links.get(&snap.ifindex) {
            if old.name != snap.name && self.by_name.get(&old.name) == Some(&snap.ifindex) {
                self.by_name.remove(&old.name);
            }
        }
        self.by_name.insert(snap.name.clone(), snap.ifindex);
        self.links.insert(snap.ifindex, snap);
    }

    fn remove_link(&mut self, ifindex: u32) {
        if let Some(old) = self.links.remove(&ifindex) {
            if self.by_name.get(&old.name) == Some(&ifindex) {
                self.by_name.remove(&old.name);
            }
        }
        self.stamps.remove(&ifindex);
        self.memberships.remove(&ifindex);
        self.building.remove(&ifindex);
    }

    /// Notes a guarded bridge appearing down (its owner is building it) and its first up.
    fn note_building(&mut self, snap: &LinkSnapshot, now: Ktime) {
        if snap.kind != LinkKind::Bridge
            || !self.guarded.contains(&snap.name)
            || !self.built_by_owner.contains(&snap.name)
        {
            return;
        }
        if snap.admin_up {
            self.building.remove(&snap.ifindex);
        } else if !self.links.contains_key(&snap.ifindex) {
            self.building.insert(snap.ifindex, now);
        }
    }

    /// Notes bridges an owner configures after creating them (libvirt names them in its
    /// networks' status): from now on such a bridge appearing down is left to its owner for a
    /// while. Kept for the agent's life, for guarded bridges only: a destroyed network's status
    /// file is gone by the time libvirt creates its bridge again.
    pub fn note_built_by_owner<'a>(&mut self, bridges: impl IntoIterator<Item = &'a str>) {
        for b in bridges {
            if self.guarded.contains(b) && !self.built_by_owner.contains(b) {
                self.built_by_owner.insert(b.to_owned());
            }
        }
    }

    pub fn is_built_by_owner(&self, bridge: &str) -> bool {
        self.built_by_owner.contains(bridge)
    }

    pub fn is_guarded(&self, bridge: &str) -> bool {
        self.guarded.contains(bridge)
    }

    /// Since when guarded bridge `bridge_ifindex` has been built by its owner: it appeared
    /// while the agent watched and has not been up yet.
    pub fn building_since(&self, bridge_ifindex: u32) -> Option<Ktime> {
        self.building.get(&bridge_ifindex).copied()
    }

    /// Every bridge still being built, with since when.
    pub fn building(&self) -> impl Iterator<Item = (u32, Ktime)> + '_ {
        self.building.iter().map(|(i, t)| (*i, *t))
    }

    pub fn links(&self) -> impl Iterator<Item = &LinkSnapshot> {
        self.links.values()
    }

    /// The bridge device currently named `name`.
    pub fn bridge(&self, name: &str) -> Option<&LinkSnapshot> {
        self.link_by_name(name)
            .filter(|l| l.kind == LinkKind::Bridge)
    }

    /// Whether bridge `bridge` has carrier. The kernel turns a bridge's carrier on and off in
    /// the same call that moves its ports (`br_port_state_selection`: on while any port
    /// forwards), but tells of it only from linkwatch, up to a second later, while the ports'
    /// own states are told at once: so it is read off the ports, not off the bridge's flags.
    pub fn bridge_carrier(&self, bridge: &LinkSnapshot) -> bool {
        bridge.admin_up
            && self
                .ports_of(bridge.ifindex)
                .any(|p| p.port_state == Some(PortState::Forwarding))
    }

    /// The links enslaved to `bridge_ifindex`.
    pub fn ports_of(&self, bridge_ifindex: u32) -> impl Iterator<Item = &LinkSnapshot> {
        self.links
            .values()
            .filter(move |l| l.master == Some(bridge_ifindex))
    }

    /// Port names remembered as members of guarded bridge `bridge`.
    pub fn members(&self, bridge: &str) -> impl Iterator<Item = &str> {
        self.members
            .get(bridge)
            .into_iter()
            .flat_map(|m| m.iter().map(String::as_str))
    }

    /// Adds members from outside (libvirt's domain XML): they count as remembered.
    pub fn remember(&mut self, bridge: &str, port: &str) {
        if let Some(m) = self.members.get_mut(bridge) {
            m.insert(port.to_owned());
        }
    }

    /// Ports that left a guarded bridge for another master: (bridge, port, new master).
    pub fn moved(&self) -> impl Iterator<Item = &(String, String, String)> {
        self.moved.iter()
    }

    pub fn track(&self, port: &str) -> Option<&Track> {
        self.tracks.get(port)
    }

    pub fn tracks(&self) -> impl Iterator<Item = (&String, &Track)> {
        self.tracks.iter()
    }

    /// Replaces every link with a fresh dump, asked for at `asked`: the truth over anything
    /// older, so kernel events stamped before `asked` are not applied over it.
    pub fn reset_from_dump(
        &mut self,
        links: Vec<LinkSnapshot>,
        asked: Ktime,
        now: Ktime,
    ) -> Vec<Transition> {
        self.dumped_at = asked;
        self.reset(links, now)
    }

    /// Replaces every link with a fresh dump: the truth over anything older.
    pub fn reset(&mut self, links: Vec<LinkSnapshot>, now: Ktime) -> Vec<Transition> {
        self.links = links.into_iter().map(|l| (l.ifindex, l)).collect();
        // A dump tells nothing of when a bridge appeared: only those already seen appearing
        // and still down are being built.
        let links = &self.links;
        self.building
            .retain(|i, _| links.get(i).is_some_and(|l| !l.admin_up));
        let before = std::mem::replace(
            &mut self.by_name,
            self.links
                .values()
                .map(|l| (l.name.clone(), l.ifindex))
                .collect(),
        );

        // A stamp netlink never confirmed (its notification among those a loss dropped) is
        // superseded by the dump once older than it, or stale once older than the window.
        let dumped_at = self.dumped_at;
        self.stamps.retain(|i, s| {
            self.links.contains_key(i)
                && s.at >= dumped_at
                && now.saturating_sub(s.at) < STAMP_WINDOW_NS
        });
        self.memberships.clear();
        // A member whose device is gone can never be re-attached: a device made later under
        // its name is another device. (Its deletion may have been among lost notifications.)
        // So is one whose name is on another device now: deleted and re-created meanwhile
        // (libvirt names every network's taps vnetN).
        let by_name = &self.by_name;
        for members in self.members.values_mut() {
            members.retain(|p| {
                by_name
                    .get(p)
                    .is_some_and(|now| before.get(p).is_none_or(|was| was == now))
            });
        }
        self.moved.retain(|(_, p, _)| self.by_name.contains_key(p));
        self.stp_actor.retain(|b, _| self.by_name.contains_key(b));
        self.refresh(Scope::All, now, Clock::Netlink, None)
    }

    /// Ports whose tracking ended since the last call: whatever is kept per port elsewhere
    /// (accounting, rate limits) goes with them.
    pub fn take_forgotten(&mut self) -> Vec<String> {
        std::mem::take(&mut self.forgotten)
    }

    /// Sizes of what the model keeps, for memory checks: links, tracked ports, remembered
    /// members, pending eBPF stamps.
    pub fn sizes(&self) -> [(&'static str, usize); 5] {
        [
            ("links", self.links.len()),
            ("tracks", self.tracks.len()),
            ("members", self.members.values().map(BTreeSet::len).sum()),
            ("stamps", self.stamps.len()),
            ("memberships", self.memberships.len()),
        ]
    }

    pub fn apply_netlink(&mut self, ev: NetlinkEvent, now: Ktime) -> Vec<Transition> {
        // The port concerned, when only one is: a bridge's change (or a rename) concerns all.
        let mut port: Option<String> = None;
        match ev {
            NetlinkEvent::Link(mut snap) => {
                let old = self.links.get(&snap.ifindex);
                let bridge = |kind: &LinkKind| *kind == LinkKind::Bridge;
                if !bridge(&snap.kind)
                    && old.is_none_or(|o| !bridge(&o.kind) && o.name == snap.name)
                {
                    port = Some(snap.name.clone());
                }
                if self.kernel_port_states {
                    let kernel = match self.links.get(&snap.ifindex) {
                        Some(old) => old.port_state,
                        // The event beat the link's first notification.
                        None => self.stamps.get(&snap.ifindex).map(|s| s.state),
                    };
                    snap.port_state = snap.master.and(kernel.or(snap.port_state));
                }
                if let Some(master) = self.kernel_master(snap.ifindex, snap.master, now) {
                    snap.master = master;
                    if master.is_none() {
                        snap.port_state = None;
                    }
                }
                self.note_building(&snap, now);
                self.insert_link(snap);
            }
            NetlinkEvent::Removed { ifindex, name } => {
                if self
                    .links
                    .get(&ifindex)
                    .is_none_or(|l| l.kind != LinkKind::Bridge)
                {
                    port = Some(name.clone());
                }
                self.remove_link(ifindex);
                // The device is gone, not detached: its membership ended.
                for m in self.members.values_mut() {
                    m.remove(&name);
                }
                if self.tracks.remove(&name).is_some() {
                    self.forgotten.push(name.clone());
                }
                self.moved.retain(|(_, p, _)| *p != name);
                self.stp_actor.remove(&name);
            }
            NetlinkEvent::PortState {
                ifindex,
                master,
                state,
            } => {
                let Some(l) = self.links.get_mut(&ifindex) else {
                    return Vec::new();
                };
                if !self.kernel_port_states {
                    l.port_state = Some(state);
                }
                let kernel = self
                    .memberships
                    .get(&ifindex)
                    .filter(|(m, at)| *m != master && now.saturating_sub(*at) < STAMP_WINDOW_NS);
                if master.is_some() && kernel.is_none() {
                    l.master = master;
                }
                port = Some(l.name.clone());
            }
            NetlinkEvent::Overrun => return Vec::new(),
        }
        let scope = port.as_deref().map_or(Scope::All, Scope::Port);
        self.refresh(scope, now, Clock::Netlink, None)
    }

    /// Applies an eBPF event: the change, with the kernel's timestamp and actor. An event
    /// older than the last dump is dropped: after a loss, events queued before the dump may
    /// be followed by ones that were lost, and must not undo the dump's picture.
    pub fn apply_kernel(&mut self, ev: &KernelEvent) -> Vec<Transition> {
        if ev.ktime_ns < self.dumped_at {
            return Vec::new();
        }
        match ev.change {
            Change::PortState {
                new: Some(state), ..
            } => {
                self.stamps.insert(
                    ev.port_ifindex,
                    Stamp {
                        state,
                        at: ev.ktime_ns,
                        actor: ev.actor.clone(),
                    },
                );
                if let Some(l) = self.links.get_mut(&ev.port_ifindex) {
                    l.port_state = Some(state);
                }
            }
            Change::Join => {
                if self.kernel_membership {
                    self.memberships
                        .insert(ev.port_ifindex, (Some(ev.bridge_ifindex), ev.ktime_ns));
                }
                if let Some(l) = self.links.get_mut(&ev.port_ifindex) {
                    l.master = Some(ev.bridge_ifindex);
                }
            }
            Change::Leave => {
                if self.kernel_membership {
                    self.memberships
                        .insert(ev.port_ifindex, (None, ev.ktime_ns));
                }
                if let Some(l) = self.links.get_mut(&ev.port_ifindex) {
                    if l.master == Some(ev.bridge_ifindex) {
                        l.master = None;
                        l.port_state = None;
                    }
                }
            }
            Change::Stp { new, .. } => {
                if let Some(l) = self.links.get_mut(&ev.bridge_ifindex) {
                    l.stp = new;
                }
                self.stp_actor.insert(ev.bridge.clone(), ev.actor.clone());
            }
            Change::PortState { new: None, .. } => {}
        }
        let scope = match ev.change {
            Change::Stp { .. } => Scope::All,
            _ => match self.links.get(&ev.port_ifindex) {
                Some(l) => {
                    let name = l.name.clone();
                    return self.refresh(
                        Scope::Port(&name),
                        ev.ktime_ns,
                        Clock::Kernel,
                        Some(&ev.actor),
                    );
                }
                // Not known yet: its stamp waits for the link's notification.
                None => return Vec::new(),
            },
        };
        self.refresh(scope, ev.ktime_ns, Clock::Kernel, Some(&ev.actor))
    }

    /// Says whether eBPF reports every join and leave (see `kernel_membership`).
    pub fn trust_kernel_membership(&mut self, complete: bool) {
        self.kernel_membership = complete;
        if !complete {
            self.memberships.clear();
        }
    }

    /// The master eBPF saw for `ifindex` when a notification showing `shown` contradicts it
    /// within the window: the notification is older. `None` when netlink agrees (the stamp is
    /// used up) or the stamp is too old to judge by.
    fn kernel_master(
        &mut self,
        ifindex: u32,
        shown: Option<u32>,
        now: Ktime,
    ) -> Option<Option<u32>> {
        let &(master, at) = self.memberships.get(&ifindex)?;
        if master != shown && now.saturating_sub(at) < STAMP_WINDOW_NS {
            return Some(master);
        }
        self.memberships.remove(&ifindex);
        None
    }

    /// Says whether eBPF reports every port-state change (see `kernel_port_states`).
    pub fn trust_kernel_port_states(&mut self, complete: bool) {
        self.kernel_port_states = complete;
    }

    /// Records which bridges MRP runs on (from a dump).
    pub fn set_mrp(&mut self, bridges: impl IntoIterator<Item = u32>) {
        self.mrp = bridges.into_iter().collect();
    }

    pub fn mrp(&self, bridge_ifindex: u32) -> bool {
        self.mrp.contains(&bridge_ifindex)
    }

    /// The STP mode of a bridge, by name.
    pub fn stp(&self, bridge: &str) -> Option<StpMode> {
        self.bridge(bridge).and_then(|b| b.stp)
    }

    /// The guarded bridges present now: ifindex -> name.
    fn guarded_bridges(&self) -> BTreeMap<u32, String> {
        self.guarded
            .iter()
            .filter_map(|name| self.bridge(name).map(|b| (b.ifindex, name.clone())))
            .collect()
    }

    /// Recomputes what `scope` can have changed (membership, the state of each guarded port
    /// concerned) and records the transitions. A change to one link costs a few look-ups, not
    /// a walk over every link: churn of thousands of taps stays linear.
    fn refresh(
        &mut self,
        scope: Scope<'_>,
        at: Ktime,
        clock: Clock,
        actor: Option<&Actor>,
    ) -> Vec<Transition> {
        let guarded = self.guarded_bridges();
        let ports: BTreeSet<String> = match scope {
            Scope::Port(name) => [name.to_owned()].into(),
            Scope::All => self
                .links
                .values()
                .map(|l| l.name.clone())
                .chain(self.members.values().flatten().cloned())
                .chain(self.tracks.keys().cloned())
                .collect(),
        };
        for port in &ports {
            self.learn(port, &guarded);
        }
        let mut out = Vec::new();
        for port in &ports {
            out.extend(self.retrack(port, &guarded, at, clock, actor));
        }
        out
    }

    /// Membership of one port: seen on a guarded bridge, it belongs to it; moved to another
    /// master, it is forgotten there (and the move is said once).
    fn learn(&mut self, port: &str, guarded: &BTreeMap<u32, String>) {
        let Some(link) = self.by_name.get(port).and_then(|i| self.links.get(i)) else {
            return;
        };
        let Some(master) = link.master else { return };
        if let Some(bridge) = guarded.get(&master) {
            if let Some(m) = self.members.get_mut(bridge) {
                m.insert(port.to_owned());
            }
            self.moved.retain(|(_, p, _)| p != port);
        }
        let other = self
            .links
            .get(&master)
            .map_or_else(|| master.to_string(), |l| l.name.clone());
        for (bridge, members) in &mut self.members {
            if guarded.get(&master) != Some(bridge) && members.remove(port) {
                self.moved
                    .insert((bridge.clone(), port.to_owned(), other.clone()));
            }
        }
    }

    /// The state of one port on the guarded bridges it belongs to; its transition if it
    /// changed. A port no guarded bridge counts as its own any more is not tracked.
    fn retrack(
        &mut self,
        port: &str,
        guarded: &BTreeMap<u32, String>,
        at: Ktime,
        clock: Clock,
        actor: Option<&Actor>,
    ) -> Vec<Transition> {
        let owners: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.contains(port))
            .map(|(b, _)| b.clone())
            .collect();
        if owners.is_empty() {
            if self.tracks.remove(port).is_some() {
                self.forgotten.push(port.to_owned());
            }
            return Vec::new();
        }
        let link = self.by_name.get(port).and_then(|i| self.links.get(i));
        let mut out = Vec::new();
        for bridge in &owners {
            let bridge_ifindex = guarded
                .iter()
                .find(|(_, name)| *name == bridge)
                .map(|(i, _)| *i);
            let state = match link {
                Some(l) if l.master.is_some() && l.master == bridge_ifindex => {
                    l.port_state.unwrap_or(PortState::Disabled)
                }
                Some(_) => PortState::Detached,
                // Device gone: nothing to track (Removed handles it).
                None => continue,
            };
            // Netlink's news of a state eBPF already stamped: the kernel's time is the true
            // one. The stamp is used up either way once netlink shows that state.
            let stamp = match (clock, link.and_then(|l| self.stamps.get(&l.ifindex))) {
                (Clock::Netlink, Some(s))
                    if s.state == state && s.at <= at && at - s.at < STAMP_WINDOW_NS =>
                {
                    Some(s.clone())
                }
                _ => None,
            };
            let t = match &stamp {
                Some(s) => transition(
                    &mut self.tracks,
                    bridge,
                    port,
                    state,
                    s.at,
                    Clock::Kernel,
                    Some(&s.actor),
                ),
                None => transition(&mut self.tracks, bridge, port, state, at, clock, actor),
            };
            if stamp.is_some() {
                if let Some(i) = link.map(|l| l.ifindex) {
                    self.stamps.remove(&i);
                }
            }
            out.extend(t);
        }
        out
    }
}

/// What a change can affect.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// One link, by name (its membership and state).
    Port(&'a str),
    /// Everything: a bridge changed, or a dump replaced the picture.
    All,
}

/// Updates the track of `port`; returns the transition when the state changed.
fn transition(
    tracks: &mut BTreeMap<String, Track>,
    bridge: &str,
    port: &str,
    state: PortState,
    at: Ktime,
    clock: Clock,
    actor: Option<&Actor>,
) -> Option<Transition> {
    let Some(track) = tracks.get_mut(port) else {
        tracks.insert(
            port.to_owned(),
            Track {
                bridge: bridge.to_owned(),
                state,
                since: at,
                clock,
                outage_since: (state != PortState::Forwarding).then_some(at),
                actor: actor.cloned(),
            },
        );
        return Some(Transition {
            bridge: bridge.to_owned(),
            port: port.to_owned(),
            from: None,
            to: state,
            at,
            clock,
            in_from_ns: None,
            outage_ns: None,
            actor: actor.cloned(),
        });
    };
    if track.state == state {
        // The same state from the kernel's clock, earlier than netlink delivered it: the
        // kernel's time is the true one.
        if clock == Clock::Kernel && track.clock == Clock::Netlink && at < track.since {
            if track.outage_since == Some(track.since) {
                track.outage_since = Some(at);
            }
            track.since = at;
            track.clock = clock;
            track.actor = actor.cloned();
        }
        return None;
    }
    // Netlink delivers after the fact: never let its receive time predate a kernel stamp. A
    // kernel time may predate a receive time, which then said only when the news arrived.
    let at = if clock == Clock::Kernel && track.clock == Clock::Netlink {
        at
    } else {
        at.max(track.since)
    };
    let from = track.state;
    if let Some(start) = track.outage_since.as_mut() {
        *start = (*start).min(at);
    }
    let outage_ns = (state == PortState::Forwarding)
        .then_some(track.outage_since)
        .flatten()
        .map(|start| at.saturating_sub(start));
    let t = Transition {
        bridge: bridge.to_owned(),
        port: port.to_owned(),
        from: Some(from),
        to: state,
        at,
        clock,
        in_from_ns: Some(at.saturating_sub(track.since)),
        outage_ns,
        actor: actor.cloned(),
    };
    track.bridge = bridge.to_owned();
    track.state = state;
    track.since = at;
    track.clock = clock;
    track.actor = actor.cloned();
    match (
        from == PortState::Forwarding,
        state == PortState::Forwarding,
    ) {
        (true, false) => track.outage_since = Some(at),
        (false, true) => track.outage_since = None,
        _ => {}
    }
    Some(t)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{event::Hook, sources::netlink::LinkKind};

    /// A healthy, up link; on `master`, forwarding.
    pub(crate) fn link(
        ifindex: u32,
        name: &str,
        kind: LinkKind,
        master: Option<u32>,
    ) -> LinkSnapshot {
        LinkSnapshot {
            ifindex,
            name: name.into(),
            kind,
            master,
            admin_up: true,
            carrier: true,
            oper_up: true,
            lower: None,
            switchdev: false,
            port_state: master.map(|_| PortState::Forwarding),
            ..LinkSnapshot::default()
        }
    }

    fn lab() -> Vec<LinkSnapshot> {
        let mut br = link(7, "br0", LinkKind::Bridge, None);
        br.stp = Some(StpMode::Off);
        vec![br, link(9, "vnet0", LinkKind::Veth, Some(7))]
    }

    #[test]
    fn a_reload_keeps_what_was_learned_for_bridges_still_guarded() {
        let mut links = lab();
        links.push(link(11, "br1", LinkKind::Bridge, None));
        let tap = LinkKind::Tun {
            tap: Some(true),
            vnet_hdr: Some(true),
        };
        links.push(link(12, "tap1", tap, Some(11)));
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(links.clone(), 100);
        assert!(m.track("vnet0").is_some());
        m.set_guarded(["br0".to_owned(), "br1".to_owned()]);
        assert_eq!(m.members("br0").collect::<Vec<_>>(), ["vnet0"], "kept");
        let t = m.reset(links.clone(), 200);
        assert!(
            t.iter().all(|t| t.port == "tap1"),
            "only the new bridge's port is new: {t:?}"
        );
        assert_eq!(m.members("br1").collect::<Vec<_>>(), ["tap1"], "learned");
        m.take_forgotten();
        m.set_guarded(["br1".to_owned()]);
        assert!(m.track("vnet0").is_none(), "no longer tracked");
        assert_eq!(m.take_forgotten(), ["vnet0"], "and forgotten elsewhere too");
        assert_eq!(m.members("br0").count(), 0);
        assert_eq!(m.guarded().collect::<Vec<_>>(), ["br1"]);
    }

    #[test]
    fn learns_members_and_tracks_detach_and_reattach() {
        let mut m = Model::new(["br0".to_owned()]);
        let t = m.reset(lab(), 100);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, PortState::Forwarding);
        assert_eq!(m.members("br0").collect::<Vec<_>>(), ["vnet0"]);

        let t = m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, None)),
            200,
        );
        assert_eq!(
            (t[0].from, t[0].to),
            (Some(PortState::Forwarding), PortState::Detached)
        );
        assert_eq!(m.track("vnet0").and_then(|t| t.outage_since), Some(200));

        let t = m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, Some(7))),
            350,
        );
        assert_eq!(t[0].to, PortState::Forwarding);
        assert_eq!(t[0].in_from_ns, Some(150));
        assert_eq!(t[0].outage_ns, Some(150));
        assert_eq!(m.track("vnet0").and_then(|t| t.outage_since), None);
    }

    #[test]
    fn a_bridge_has_carrier_while_a_port_forwards_whatever_its_stale_flags_say() {
        let mut links = lab();
        links[0].carrier = false; // linkwatch has not told yet
        links[1].port_state = Some(PortState::Listening);
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(links, 0);
        let carrier = |m: &Model| m.bridge("br0").is_some_and(|b| m.bridge_carrier(b));
        assert!(!carrier(&m), "no port forwards");
        m.apply_netlink(
            NetlinkEvent::PortState {
                ifindex: 9,
                master: Some(7),
                state: PortState::Forwarding,
            },
            1,
        );
        assert!(carrier(&m), "the kernel turned it on with the port");
        m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, None)),
            2,
        );
        assert!(!carrier(&m), "its last port left");
    }

    #[test]
    fn membership_survives_bridge_recreation_by_name() {
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(lab(), 0);
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
        let mut br = link(12, "br0", LinkKind::Bridge, None);
        br.stp = Some(StpMode::Off);
        m.apply_netlink(NetlinkEvent::Link(br), 3);
        assert_eq!(m.members("br0").collect::<Vec<_>>(), ["vnet0"]);
        assert_eq!(m.track("vnet0").map(|t| t.state), Some(PortState::Detached));
    }

    #[test]
    fn a_port_moved_to_another_bridge_is_forgotten_and_reported() {
        let mut m = Model::new(["br0".to_owned()]);
        let mut links = lab();
        links.push(link(20, "br1", LinkKind::Bridge, None));
        m.reset(links, 0);
        m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, Some(20))),
            1,
        );
        assert_eq!(m.members("br0").count(), 0);
        assert_eq!(
            m.moved().cloned().collect::<Vec<_>>(),
            [("br0".to_owned(), "vnet0".to_owned(), "br1".to_owned())]
        );
    }

    #[test]
    fn a_bridge_that_appears_down_is_being_built_until_it_is_first_up() {
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(lab(), 0);
        // No owner named br0: a bridge recreated down is a fault, repaired at once.
        let mut orphan = link(11, "br0", LinkKind::Bridge, None);
        orphan.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(orphan), 2);
        assert_eq!(m.building_since(11), None, "nobody builds it");
        m.note_built_by_owner(["br0", "br9"]);
        assert_eq!(
            m.building_since(7),
            None,
            "present at the dump: already running"
        );
        let mut down = link(7, "br0", LinkKind::Bridge, None);
        down.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(down.clone()), 5);
        assert_eq!(
            m.building_since(7),
            None,
            "a running bridge set down is a fault"
        );

        let mut new = down.clone();
        new.ifindex = 12;
        m.apply_netlink(NetlinkEvent::Link(new.clone()), 10);
        // Configuration changes while down do not restart the clock.
        m.apply_netlink(NetlinkEvent::Link(new.clone()), 20);
        assert_eq!(m.building_since(12), Some(10));
        assert_eq!(m.building().collect::<Vec<_>>(), [(12, 10)]);
        m.reset(vec![new.clone()], 25);
        assert_eq!(m.building_since(12), Some(10), "a resync keeps it");
        new.admin_up = true;
        m.apply_netlink(NetlinkEvent::Link(new.clone()), 30);
        assert_eq!(m.building_since(12), None);
        new.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(new), 40);
        assert_eq!(m.building_since(12), None, "once up, it is running");

        let mut gone = down;
        gone.ifindex = 13;
        m.apply_netlink(NetlinkEvent::Link(gone), 50);
        m.apply_netlink(
            NetlinkEvent::Removed {
                ifindex: 13,
                name: "br0".into(),
            },
            60,
        );
        assert_eq!(m.building_since(13), None);
        let mut other = link(14, "br9", LinkKind::Bridge, None);
        other.admin_up = false;
        m.apply_netlink(NetlinkEvent::Link(other), 70);
        assert_eq!(m.building_since(14), None, "not guarded");
    }

    fn kernel_state(port_ifindex: u32, state: PortState, at: Ktime) -> KernelEvent {
        KernelEvent {
            ktime_ns: at,
            netns: 1,
            bridge: "br0".into(),
            bridge_ifindex: 7,
            port: "vnet0".into(),
            port_ifindex,
            change: Change::PortState {
                old: None,
                new: Some(state),
            },
            actor: Actor::StpTimer,
            hook: Hook::Kretprobe,
        }
    }

    #[test]
    fn with_complete_kernel_hooks_late_netlink_port_states_do_not_undo_them() {
        let mut m = Model::new(["br0".to_owned()]);
        m.trust_kernel_port_states(true);
        m.reset(lab(), 0);
        m.apply_kernel(&kernel_state(9, PortState::Blocking, 10));
        let t = m.apply_kernel(&kernel_state(9, PortState::Listening, 11));
        assert_eq!(t[0].to, PortState::Listening);
        // Notifications built when the port was still blocking arrive now.
        let mut stale = link(9, "vnet0", LinkKind::Veth, Some(7));
        stale.port_state = Some(PortState::Blocking);
        assert!(m.apply_netlink(NetlinkEvent::Link(stale), 20).is_empty());
        let ev = NetlinkEvent::PortState {
            ifindex: 9,
            master: Some(7),
            state: PortState::Blocking,
        };
        assert!(m.apply_netlink(ev, 21).is_empty());
        assert_eq!(
            m.track("vnet0").map(|t| t.state),
            Some(PortState::Listening)
        );
        // Leaving the bridge is still netlink's to say.
        let t = m.apply_netlink(
            NetlinkEvent::Link(link(9, "vnet0", LinkKind::Veth, None)),
            30,
        );
        assert_eq!(t[0].to, PortState::Detached);
    }

    #[test]
    fn a_kernel_state_for_an_unknown_link_waits_for_the_link() {
        let mut m = Model::new(["br0".to_owned()]);
        m.trust_kernel_port_states(true);
        m.reset(lab()[..1].to_vec(), 0);
        assert!(
            m.apply_kernel(&kernel_state(9, PortState::Listening, 5))
                .is_empty()
        );
        let mut late = link(9, "vnet0", LinkKind::Veth, Some(7));
        late.port_state = Some(PortState::Disabled);
        let t = m.apply_netlink(NetlinkEvent::Link(late), 6);
        assert_eq!(t[0].to, PortState::Listening);
    }

    #[test]
    fn a_new_ports_kernel_stamp_outlives_the_late_notifications_that_enslave_it() {
        let mut m = Model::new(["br0".to_owned()]);
        let mut links = lab();
        links[1].master = None;
        links[1].port_state = None;
        m.reset(links, 0);
        // eBPF: the port entered listening at 500, before netlink said it was enslaved.
        let ev = KernelEvent {
            actor: Actor::Task {
                comm: "ip".into(),
                pid: 42,
            },
            ..kernel_state(9, PortState::Listening, 500)
        };
        assert!(m.apply_kernel(&ev).is_empty(), "not a member yet");
        let mut joined = link(9, "vnet0", LinkKind::Veth, Some(7));
        joined.port_state = Some(PortState::Disabled);
        let t = m.apply_netlink(NetlinkEvent::Link(joined), 2_000);
        assert_eq!((t[0].to, t[0].clock), (PortState::Disabled, Clock::Netlink));
        let t = m.apply_netlink(
            NetlinkEvent::PortState {
                ifindex: 9,
                master: Some(7),
                state: PortState::Listening,
            },
            2_100,
        );
        assert_eq!(
            (t[0].to, t[0].at, t[0].clock, t[0].in_from_ns),
            (PortState::Listening, 500, Clock::Kernel, Some(0))
        );
        assert_eq!(t[0].actor, Some(ev.actor.clone()));
        // Not forwarding since the kernel's time, not since the news arrived.
        assert_eq!(m.track("vnet0").and_then(|t| t.outage_since), Some(500));
        // Used up: netlink's next word on the same state leaves the kernel's time alone,
        // and a later visit to listening is stamped on receipt.
        let mut fwd = link(9, "vnet0", LinkKind::Veth, Some(7));
        fwd.port_state = Some(PortState::Forwarding);
        m.apply_netlink(NetlinkEvent::Link(fwd), 3_000);
        let t = m.apply_netlink(
            NetlinkEvent::PortState {
                ifindex: 9,
                master: Some(7),
                state: PortState::Listening,
            },
            4_000,
        );
        assert_eq!((t[0].at, t[0].clock), (4_000, Clock::Netlink));
    }

    #[test]
    fn kernel_events_older_than_a_fresh_dump_never_override_it() {
        let mut m = Model::new(["br0".to_owned()]);
        m.trust_kernel_port_states(true);
        m.reset(lab(), 0);
        // A loss, then a dump asked for at 1_000 shows vnet0 forwarding.
        m.reset_from_dump(lab(), 1_000, 1_100);
        // Queued before the dump, read after it: dropped.
        assert!(
            m.apply_kernel(&kernel_state(9, PortState::Listening, 900))
                .is_empty()
        );
        assert_eq!(
            m.track("vnet0").map(|t| t.state),
            Some(PortState::Forwarding)
        );
        assert_eq!(
            m.link(9).and_then(|l| l.port_state),
            Some(PortState::Forwarding)
        );
        // Stamped after the dump was asked for: news.
        let t = m.apply_kernel(&kernel_state(9, PortState::Blocking, 1_050));
        assert_eq!(t[0].to, PortState::Blocking);
    }

    #[test]
    fn a_notification_queued_before_an_unlink_does_not_undo_the_kernels_leave() {
        let mut m = Model::new(["br0".to_owned()]);
        m.trust_kernel_membership(true);
        m.reset(lab(), 0);
        let baseline = m.sizes();
        let mut leave = kernel_state(9, PortState::Disabled, 1_000);
        leave.change = Change::Leave;
        let t = m.apply_kernel(&leave);
        assert_eq!(t[0].to, PortState::Detached, "{t:?}");
        // The port's own change on its way out, sent before the unlink, read after the event.
        let stale = link(9, "vnet0", LinkKind::Veth, Some(7));
        assert!(m.apply_netlink(NetlinkEvent::Link(stale), 1_500).is_empty());
        assert_eq!(m.track("vnet0").map(|t| t.state), Some(PortState::Detached));
        // The unlink's own notification agrees, and uses the stamp up.
        let gone = link(9, "vnet0", LinkKind::Veth, None);
        assert!(m.apply_netlink(NetlinkEvent::Link(gone), 2_000).is_empty());
        assert_eq!(m.sizes(), baseline);
        // Without complete hooks, netlink's picture is the truth as it comes.
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(lab(), 0);
        m.apply_kernel(&leave);
        let stale = link(9, "vnet0", LinkKind::Veth, Some(7));
        let t = m.apply_netlink(NetlinkEvent::Link(stale), 1_500);
        assert_ne!(t.first().map(|t| t.to), Some(PortState::Detached));
        assert_ne!(m.track("vnet0").map(|t| t.state), Some(PortState::Detached));
    }

    #[test]
    fn a_stamp_netlink_never_confirmed_goes_with_the_next_dump() {
        let mut m = Model::new(["br0".to_owned()]);
        m.trust_kernel_port_states(true);
        m.reset(lab(), 0);
        let baseline = m.sizes();
        // eBPF saw a change whose notification was lost; the dump after the loss shows it.
        m.apply_kernel(&kernel_state(9, PortState::Blocking, 2_000));
        assert_ne!(m.sizes(), baseline, "the stamp waits for netlink");
        m.reset_from_dump(lab(), 3_000, 3_100);
        assert_eq!(m.sizes(), baseline);
    }

    #[test]
    fn churn_of_members_leaves_nothing_behind() {
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(lab(), 0);
        let baseline = m.sizes();
        for i in 0..1_000u32 {
            let ifindex = 100 + i;
            let name = format!("tap{i}");
            m.apply_netlink(
                NetlinkEvent::Link(link(
                    ifindex,
                    &name,
                    LinkKind::Tun {
                        tap: Some(true),
                        vnet_hdr: Some(true),
                    },
                    Some(7),
                )),
                u64::from(i),
            );
            assert_eq!(m.members("br0").count(), 2);
            m.apply_netlink(NetlinkEvent::Removed { ifindex, name }, u64::from(i) + 1);
        }
        assert_eq!(m.sizes(), baseline);
        assert_eq!(m.take_forgotten().len(), 1_000);
        assert_eq!(m.tracks().count(), 1);
    }

    #[test]
    fn kernel_time_corrects_a_later_netlink_stamp_and_never_goes_backwards() {
        let mut m = Model::new(["br0".to_owned()]);
        m.reset(lab(), 0);
        m.apply_netlink(
            NetlinkEvent::PortState {
                ifindex: 9,
                master: Some(7),
                state: PortState::Listening,
            },
            1_000,
        );
        let ev = KernelEvent {
            ktime_ns: 900,
            netns: 1,
            bridge: "br0".into(),
            bridge_ifindex: 7,
            port: "vnet0".into(),
            port_ifindex: 9,
            change: Change::PortState {
                old: Some(PortState::Blocking),
                new: Some(PortState::Listening),
            },
            actor: Actor::StpTimer,
            hook: Hook::TimerStart,
        };
        assert!(m.apply_kernel(&ev).is_empty());
        let t = m.track("vnet0").expect("tracked");
        assert_eq!(
            (t.since, t.clock, t.outage_since),
            (900, Clock::Kernel, Some(900))
        );
        assert_eq!(t.actor, Some(Actor::StpTimer));
    }
}
