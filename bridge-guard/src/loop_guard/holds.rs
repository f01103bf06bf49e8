//! Loop protection's memory, without I/O: which ports are held out of forwarding and until
//! when, which were probed clean, and which probe rounds are still waiting for their frames.
//!
//! A port seen in a loop is held down (the planner takes it out of forwarding) for a while;
//! every further sighting while held extends the hold, so it lasts as long as the loop does.
//! When the hold runs out, the port is re-probed while still held; only if no probe comes back
//! is it released, and a loop that comes back is held longer each time (up to a minute).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{model::Ktime, sources::netlink::BridgeIdent};

/// How long a probe round waits for its frames. A probe crosses a guest's bridge in tens of
/// microseconds; the margin is for a loaded host.
pub const PROBE_WAIT_NS: Ktime = 20_000_000;
/// How often every port is probed while nothing happens.
pub const PROBE_EVERY_NS: Ktime = 2_000_000_000;
/// Hold-down lengths, first time and on each repeat. The shortest spans two periodic probe
/// rounds, so that a loop that persists is seen again before its hold runs out.
const HOLD_NS: [Ktime; 5] = [
    5_000_000_000,
    10_000_000_000,
    20_000_000_000,
    40_000_000_000,
    60_000_000_000,
];
/// After this long without a loop on a port, its next hold starts short again.
const FORGET_NS: Ktime = 300_000_000_000;
/// Frames still in flight when a loop is cut move addresses a little longer: for this long,
/// a sighting on the cut loop's other port counts as that loop, not as a new one.
const SETTLE_NS: Ktime = 250_000_000;
/// How long after a cut a MAC flap through the cut loop's other port may still be its drain:
/// frames queued before the cut (a backlog of up to `netdev_max_backlog` per CPU, seconds of
/// work on a slow or loaded host) still move the addresses of guests that sent into the
/// loop, between their own port and the other one. Holding on such a flap takes an innocent
/// guest's port out; the loop guard probes instead, and a probe that comes back is a loop.
pub const DRAIN_NS: Ktime = 3_000_000_000;

/// What showed a loop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// Our probe, sent out of `sent_on`, came back on this port.
    Probe { sent_on: String, rtt_us: u64 },
    /// A BPDU arrived on this port (BPDU guard). `own`: this bridge's own, come back.
    Bpdu {
        from: Option<BridgeIdent>,
        own: bool,
    },
    /// A MAC address flapped between this port and `other` (`br_fdb_update`).
    Flap { mac: String, vid: u16, moves: u32 },
}

impl Evidence {
    /// Short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Probe { .. } => "probe",
            Self::Bpdu { .. } => "bpdu",
            Self::Flap { .. } => "mac_flap",
        }
    }
}

impl std::fmt::Display for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Probe { sent_on, rtt_us } => {
                write!(
                    f,
                    "our probe sent out of {sent_on} came back after {rtt_us} µs"
                )
            }
            Self::Bpdu { own: true, .. } => write!(f, "this bridge's own BPDU came back"),
            Self::Bpdu { from: Some(b), .. } => write!(f, "a BPDU from bridge {b} (BPDU guard)"),
            Self::Bpdu { from: None, .. } => write!(f, "a BPDU (BPDU guard)"),
            Self::Flap { mac, vid, moves } => {
                write!(
                    f,
                    "MAC {mac} (vlan {vid}) moved between ports {moves} times within 1 s"
                )
            }
        }
    }
}

/// A port and its name.
pub type Port = (u32, String);

/// One observation of a loop.
#[derive(Clone, Debug)]
pub struct Sighting {
    pub bridge: String,
    pub bridge_ifindex: u32,
    /// Where the looped frame arrived.
    pub port: Port,
    /// The loop's other port, where known.
    pub other: Option<Port>,
    pub evidence: Evidence,
    pub at: Ktime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Out of forwarding until `until` (extended by every sighting).
    Held { until: Ktime },
    /// Still out, re-probed; released at `until` if no probe came back.
    Rechecking { until: Ktime },
    /// No loop any more: to be put back to forwarding.
    Releasing,
}

#[derive(Clone, Debug, Serialize)]
pub struct Hold {
    pub bridge: String,
    pub bridge_ifindex: u32,
    pub port: String,
    pub phase: Phase,
    /// Index into the hold lengths: how often the loop came back.
    pub level: usize,
    pub since: Ktime,
    pub evidence: Evidence,
    pub other: Option<String>,
    #[serde(skip)]
    pub other_ifindex: Option<u32>,
    /// Sightings during this hold.
    pub sightings: u64,
}

/// A port taken out of forwarding, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    pub bridge: String,
    pub port: String,
    pub other: Option<String>,
    pub evidence: Evidence,
    pub hold_ns: Ktime,
    /// The loop came back on a port being re-probed or released.
    pub repeat: bool,
}

/// Loop protection's word on a port, for the planner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it out of forwarding; never force it back.
    Hold { why: String },
    /// The loop is gone: put it back to forwarding.
    Release,
    /// Not probed yet: do not force it to forwarding until its probe round is over.
    Unprobed,
}

struct Round {
    until: Ktime,
    ports: BTreeSet<u32>,
}

#[derive(Default)]
pub struct Holds {
    holds: BTreeMap<u32, Hold>,
    /// Per port: the level of its last hold and when its loop was last seen.
    history: BTreeMap<u32, (usize, Ktime)>,
    /// Ports probed with no loop found.
    cleared: BTreeSet<u32>,
    /// Per bridge ifindex: the probe round in flight.
    rounds: BTreeMap<u32, Round>,
}

fn hold_ns(level: usize) -> Ktime {
    HOLD_NS[level.min(HOLD_NS.len() - 1)]
}

impl Holds {
    /// Whether `s`, a MAC flap past the settle time, may be the drain of a loop cut less than
    /// [`DRAIN_NS`] ago: it involves that loop's other port, and neither of its ports is held.
    pub fn may_be_drain(&self, s: &Sighting) -> bool {
        if !matches!(s.evidence, Evidence::Flap { .. }) {
            return false;
        }
        let candidates: Vec<u32> = std::iter::once(s.port.0)
            .chain(s.other.as_ref().map(|o| o.0))
            .collect();
        if candidates.iter().any(|i| self.holds.contains_key(i)) {
            return false;
        }
        self.holds.values().any(|h| {
            h.bridge_ifindex == s.bridge_ifindex
                && h.other_ifindex.is_some_and(|o| candidates.contains(&o))
                && s.at.saturating_sub(h.since) < DRAIN_NS
        })
    }

    /// Records a sighting. `forwarding_since(ifindex)`: since when the port forwards, `None`
    /// if it does not. Returns a detection when a port is taken out (again).
    pub fn observe(
        &mut self,
        s: Sighting,
        forwarding_since: impl Fn(u32) -> Option<Ktime>,
    ) -> Option<Detection> {
        let candidates: Vec<&Port> = std::iter::once(&s.port).chain(s.other.as_ref()).collect();
        // Already held: the loop is cut there; it persists, so the hold lasts. Just cut: the
        // last frames of that loop still arrive on its other port.
        let just_cut = |i: u32| {
            self.holds.iter().find_map(|(held, h)| {
                (h.other_ifindex == Some(i)
                    && h.bridge_ifindex == s.bridge_ifindex
                    && s.at.saturating_sub(h.since) < SETTLE_NS)
                    .then_some(*held)
            })
        };
        let held = candidates.iter().find_map(|(i, _)| {
            if self.holds.contains_key(i) {
                Some(*i)
            } else {
                just_cut(*i)
            }
        });
        if let Some(ifindex) = held.as_ref() {
            let h = self.holds.get_mut(ifindex)?;
            h.sightings += 1;
            let detection = match h.phase {
                Phase::Held { until } => {
                    h.phase = Phase::Held {
                        until: until.max(s.at + hold_ns(h.level)),
                    };
                    None
                }
                Phase::Rechecking { .. } | Phase::Releasing => {
                    h.level = (h.level + 1).min(HOLD_NS.len() - 1);
                    h.phase = Phase::Held {
                        until: s.at + hold_ns(h.level),
                    };
                    h.evidence = s.evidence.clone();
                    Some(Detection {
                        bridge: h.bridge.clone(),
                        port: h.port.clone(),
                        other: h.other.clone(),
                        evidence: s.evidence,
                        hold_ns: hold_ns(h.level),
                        repeat: true,
                    })
                }
            };
            self.history.insert(*ifindex, (h.level, s.at));
            return detection;
        }
        // Take out the port that carries least: one not forwarding, else the one that
        // started forwarding last (it closed the loop), else where the frame arrived.
        let victim = *candidates
            .iter()
            .rev()
            .max_by_key(|(i, _)| forwarding_since(*i).map_or(Ktime::MAX, |t| t))?;
        let other = candidates.iter().find(|(i, _)| *i != victim.0);
        let (other_ifindex, other) = (other.map(|(i, _)| *i), other.map(|(_, n)| n.clone()));
        let level = match self.history.get(&victim.0) {
            Some(&(level, last)) if s.at.saturating_sub(last) < FORGET_NS => {
                (level + 1).min(HOLD_NS.len() - 1)
            }
            _ => 0,
        };
        self.cleared.remove(&victim.0);
        self.history.insert(victim.0, (level, s.at));
        self.holds.insert(
            victim.0,
            Hold {
                bridge: s.bridge.clone(),
                bridge_ifindex: s.bridge_ifindex,
                port: victim.1.clone(),
                phase: Phase::Held {
                    until: s.at + hold_ns(level),
                },
                level,
                since: s.at,
                evidence: s.evidence.clone(),
                other: other.clone(),
                other_ifindex,
                sightings: 1,
            },
        );
        Some(Detection {
            bridge: s.bridge,
            port: victim.1.clone(),
            other,
            evidence: s.evidence,
            hold_ns: hold_ns(level),
            repeat: level > 0,
        })
    }

    /// A probe round on `bridge_ifindex` went out of `ports` at `now`.
    pub fn start_round(&mut self, bridge_ifindex: u32, ports: BTreeSet<u32>, now: Ktime) {
        let round = self.rounds.entry(bridge_ifindex).or_insert(Round {
            until: 0,
            ports: BTreeSet::new(),
        });
        round.until = round.until.max(now + PROBE_WAIT_NS);
        round.ports.extend(ports);
    }

    /// Moves time on: ends probe rounds and holds that ran out. Returns the bridges whose
    /// held ports must be re-probed now.
    pub fn tick(&mut self, now: Ktime) -> BTreeSet<u32> {
        let mut recheck = BTreeSet::new();
        for h in self.holds.values_mut() {
            match h.phase {
                Phase::Held { until } if until <= now => {
                    h.phase = Phase::Rechecking {
                        until: now + PROBE_WAIT_NS,
                    };
                    recheck.insert(h.bridge_ifindex);
                }
                Phase::Rechecking { until } if until <= now => h.phase = Phase::Releasing,
                _ => {}
            }
        }
        let holds = &self.holds;
        let cleared = &mut self.cleared;
        self.rounds.retain(|_, r| {
            if r.until > now {
                return true;
            }
            cleared.extend(r.ports.iter().filter(|p| !holds.contains_key(p)));
            false
        });
        recheck
    }

    /// Drops what is known of ports for which `keep` is false (gone, or off the bridge), and
    /// releases that took (`forwarding` true).
    pub fn settle(&mut self, keep: impl Fn(u32) -> bool, forwarding: impl Fn(u32) -> bool) {
        self.holds
            .retain(|i, h| keep(*i) && !(h.phase == Phase::Releasing && forwarding(*i)));
        self.cleared.retain(|i| keep(*i));
        self.history.retain(|i, _| keep(*i));
        for r in self.rounds.values_mut() {
            r.ports.retain(|i| keep(*i));
        }
    }

    /// Loop protection's word on `ifindex`; `None`: nothing against forcing it.
    pub fn verdict(&self, ifindex: u32) -> Option<Verdict> {
        match self.holds.get(&ifindex) {
            Some(h) if h.phase == Phase::Releasing => Some(Verdict::Release),
            Some(h) => Some(Verdict::Hold {
                why: format!(
                    "{} is held out of forwarding for a loop{}: {}",
                    h.port,
                    h.other
                        .as_ref()
                        .map_or_else(String::new, |o| format!(" with {o}")),
                    h.evidence
                ),
            }),
            None if self.cleared.contains(&ifindex) => None,
            None => Some(Verdict::Unprobed),
        }
    }

    /// Counts `ifindex` as probed clean without a probe (loop protection cannot probe it).
    pub fn clear_unprobed(&mut self, ifindex: u32) {
        if !self.holds.contains_key(&ifindex) {
            self.cleared.insert(ifindex);
        }
    }

    /// When something is due next.
    pub fn next_deadline(&self) -> Option<Ktime> {
        let holds = self.holds.values().filter_map(|h| match h.phase {
            Phase::Held { until } | Phase::Rechecking { until } => Some(until),
            Phase::Releasing => None,
        });
        holds.chain(self.rounds.values().map(|r| r.until)).min()
    }

    /// Whether a probe round is still waiting for its frames.
    pub fn probing(&self) -> bool {
        !self.rounds.is_empty()
    }

    pub fn holds(&self) -> impl Iterator<Item = &Hold> {
        self.holds.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Ktime = 1_000_000;
    const S: Ktime = 1_000 * MS;

    fn probe(port: (u32, &str), other: (u32, &str), at: Ktime) -> Sighting {
        Sighting {
            bridge: "br0".into(),
            bridge_ifindex: 7,
            port: (port.0, port.1.into()),
            other: Some((other.0, other.1.into())),
            evidence: Evidence::Probe {
                sent_on: other.1.into(),
                rtt_us: 40,
            },
            at,
        }
    }

    #[test]
    fn ports_are_unprobed_until_a_round_ends_clean() {
        let mut h = Holds::default();
        assert_eq!(h.verdict(9), Some(Verdict::Unprobed));
        h.start_round(7, [9, 10].into(), 0);
        assert!(h.tick(PROBE_WAIT_NS - 1).is_empty());
        assert_eq!(h.verdict(9), Some(Verdict::Unprobed));
        h.tick(PROBE_WAIT_NS);
        assert_eq!((h.verdict(9), h.verdict(10)), (None, None));
    }

    #[test]
    fn the_port_that_closed_the_loop_is_held_and_the_other_cleared() {
        let mut h = Holds::default();
        h.start_round(7, [9, 10].into(), 0);
        // vnet1 forwards since 500, vnet0 since 100: vnet1 closed the loop.
        let since = |i| Some(if i == 10 { 500 } else { 100 });
        let d = h
            .observe(probe((9, "vnet0"), (10, "vnet1"), MS), since)
            .expect("detection");
        assert_eq!(
            (d.port.as_str(), d.other.as_deref()),
            ("vnet1", Some("vnet0"))
        );
        assert!(!d.repeat);
        // The same loop seen the other way round only extends the hold.
        assert!(
            h.observe(probe((10, "vnet1"), (9, "vnet0"), 2 * MS), since)
                .is_none()
        );
        h.tick(PROBE_WAIT_NS);
        assert_eq!(h.verdict(9), None, "the other port is cleared");
        assert!(matches!(h.verdict(10), Some(Verdict::Hold { why }) if why.contains("with vnet0")));
    }

    #[test]
    fn a_port_not_forwarding_is_taken_before_one_that_is() {
        let mut h = Holds::default();
        let since = |i| (i == 9).then_some(100);
        let d = h.observe(probe((9, "vnet0"), (10, "vnet1"), MS), since);
        assert_eq!(d.map(|d| d.port), Some("vnet1".to_owned()));
    }

    #[test]
    fn a_hold_lasts_while_the_loop_does_then_rechecks_then_releases() {
        let mut h = Holds::default();
        let none = |_| None;
        h.observe(probe((10, "vnet1"), (9, "vnet0"), 0), none);
        // Seen again at 2 s: held until 7 s.
        h.observe(probe((10, "vnet1"), (9, "vnet0"), 2 * S), none);
        assert!(h.tick(6 * S).is_empty());
        assert_eq!(h.tick(7 * S), BTreeSet::from([7]), "re-probe now");
        assert!(
            matches!(h.verdict(10), Some(Verdict::Hold { .. })),
            "still out while rechecking"
        );
        h.tick(7 * S + PROBE_WAIT_NS);
        assert_eq!(h.verdict(10), Some(Verdict::Release));
        h.settle(|_| true, |_| false);
        assert_eq!(h.verdict(10), Some(Verdict::Release), "until it forwards");
        h.settle(|_| true, |i| i == 10);
        assert_eq!(
            h.verdict(10),
            Some(Verdict::Unprobed),
            "probed again as it forwards"
        );
    }

    #[test]
    fn a_loop_that_comes_back_is_held_longer() {
        let mut h = Holds::default();
        let none = |_| None;
        let first = h.observe(probe((10, "vnet1"), (9, "vnet0"), 0), none);
        assert_eq!(first.map(|d| d.hold_ns), Some(5 * S));
        h.tick(5 * S);
        // The re-probe finds the loop still there.
        let again = h
            .observe(probe((10, "vnet1"), (9, "vnet0"), 5 * S + MS), none)
            .expect("detection");
        assert!(again.repeat);
        assert_eq!(again.hold_ns, 10 * S);
        // Released, then the loop forms again soon after: longer still.
        h.tick(15 * S + MS);
        h.tick(15 * S + MS + PROBE_WAIT_NS);
        h.settle(|_| true, |_| true);
        let later = h
            .observe(probe((10, "vnet1"), (9, "vnet0"), 20 * S), none)
            .expect("detection");
        assert_eq!(later.hold_ns, 20 * S);
        // Long after, it starts short again.
        h.tick(40 * S);
        h.tick(40 * S + PROBE_WAIT_NS);
        h.settle(|_| true, |_| true);
        let much_later = h
            .observe(probe((10, "vnet1"), (9, "vnet0"), 400 * S), none)
            .expect("detection");
        assert_eq!(much_later.hold_ns, 5 * S);
    }

    #[test]
    fn the_last_frames_of_a_cut_loop_are_not_a_second_loop() {
        let mut h = Holds::default();
        let none = |_| None;
        h.observe(probe((10, "vnet1"), (9, "vnet0"), 0), none);
        // A guest's MAC moves between its own port and the loop's other port once more.
        let late = probe((11, "vnet2"), (9, "vnet0"), 100 * MS);
        assert!(h.observe(late.clone(), none).is_none());
        assert_eq!(h.holds().count(), 1);
        // Later, the same is a loop of its own.
        let d = h.observe(
            Sighting {
                at: 300 * MS,
                ..late
            },
            none,
        );
        assert_eq!(d.map(|d| d.port), Some("vnet2".to_owned()));
    }

    #[test]
    fn a_flap_through_a_cut_loops_other_port_may_be_its_drain_for_a_while() {
        let mut h = Holds::default();
        h.observe(probe((10, "vnet3"), (9, "vnet0"), 0), |_| None);
        let flap = |port: (u32, &str), other: (u32, &str), at| Sighting {
            evidence: Evidence::Flap {
                mac: "02:00:00:00:00:01".into(),
                vid: 0,
                moves: 3,
            },
            ..probe(port, other, at)
        };
        // A guest's MAC between its own port and the loop's other port, 1.4 s after the cut.
        assert!(h.may_be_drain(&flap((11, "vnet1"), (9, "vnet0"), 1_400 * MS)));
        // Not a port of that loop; or too late to be its drain; or a probe (a loop for sure).
        assert!(!h.may_be_drain(&flap((11, "vnet1"), (12, "vnet2"), 1_400 * MS)));
        assert!(!h.may_be_drain(&flap((11, "vnet1"), (9, "vnet0"), DRAIN_NS)));
        assert!(!h.may_be_drain(&probe((11, "vnet1"), (9, "vnet0"), 1_400 * MS)));
    }

    #[test]
    fn gone_ports_are_forgotten() {
        let mut h = Holds::default();
        h.observe(probe((10, "vnet1"), (9, "vnet0"), 0), |_| None);
        h.settle(|i| i != 10, |_| false);
        assert_eq!(h.holds().count(), 0);
        assert_eq!(h.next_deadline(), None);
    }
}
