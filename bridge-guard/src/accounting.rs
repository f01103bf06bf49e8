//! Accounting: every second each guarded port spends in each state, transitions counted
//! from -> to, episodes of not forwarding, repairs and their latency, and per bridge carrier
//! and STP mode. Fed by the model's transitions; read by the logs, `status` and `/metrics`.
//!
//! Times are on the kernel's clock where eBPF stamped the change, and on netlink receive time
//! otherwise; each port says which clock its current state was stamped with.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    event::{PortState, StpMode},
    model::{Clock, Ktime, Transition},
};

/// Bucket bounds (seconds) for time spent in listening and for whole outages: up to 60 s, the
/// longest STP walk (2 x 30 s).
pub const OUTAGE_BUCKETS: &[f64] = &[0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];
/// Bucket bounds (seconds) for repair latency: from the event that revealed the fault to the
/// kernel's acknowledgement of the repair.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.1, 1.0,
];

/// A cumulative histogram in Prometheus' sense.
#[derive(Clone, Debug, Serialize)]
pub struct Histogram {
    #[serde(skip)]
    pub bounds: &'static [f64],
    /// Observations <= each bound, then the total (the +Inf bucket).
    pub cumulative: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            cumulative: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.cumulative[i] += 1;
            }
        }
        if let Some(inf) = self.cumulative.last_mut() {
            *inf += 1;
        }
        self.sum += v;
        self.count += 1;
    }
}

/// One stretch of not forwarding.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Episode {
    pub start: Ktime,
    pub end: Option<Ktime>,
    /// Time in each state during the episode (the current state's open interval excluded).
    pub per_state_ns: BTreeMap<PortState, u64>,
}

impl Episode {
    pub fn duration_ns(&self, now: Ktime) -> u64 {
        self.end.unwrap_or(now).saturating_sub(self.start)
    }
}

#[derive(Clone, Debug)]
pub struct PortAccount {
    pub bridge: String,
    pub state: PortState,
    pub since: Ktime,
    pub clock: Clock,
    /// Completed time per state (the open interval is added at read time).
    pub ns_in: BTreeMap<PortState, u64>,
    pub transitions: BTreeMap<(PortState, PortState), u64>,
    /// Each completed stay in listening.
    pub listening: Histogram,
    /// Each completed episode of not forwarding.
    pub outages: Histogram,
    pub episode: Option<Episode>,
    pub last_episode: Option<Episode>,
    pub longest_outage_ns: u64,
    pub repairs: u64,
}

impl PortAccount {
    /// Time in `state` including the open interval up to `now`.
    pub fn ns_in(&self, state: PortState, now: Ktime) -> u64 {
        let open = if self.state == state {
            now.saturating_sub(self.since)
        } else {
            0
        };
        self.ns_in.get(&state).copied().unwrap_or(0) + open
    }

    /// Time in listening during the current episode, up to `now`.
    pub fn episode_listening_ns(&self, now: Ktime) -> u64 {
        let Some(ep) = &self.episode else { return 0 };
        let open = if self.state == PortState::Listening {
            now.saturating_sub(self.since)
        } else {
            0
        };
        ep.per_state_ns
            .get(&PortState::Listening)
            .copied()
            .unwrap_or(0)
            + open
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BridgeAccount {
    pub present: bool,
    pub carrier: bool,
    pub stp: Option<StpMode>,
    pub since: Ktime,
    /// Completed time without carrier (the open interval is added at read time).
    pub no_carrier_ns: u64,
}

impl BridgeAccount {
    pub fn no_carrier_ns(&self, now: Ktime) -> u64 {
        let open = if self.carrier {
            0
        } else {
            now.saturating_sub(self.since)
        };
        self.no_carrier_ns + open
    }
}

#[derive(Clone, Debug, Default)]
pub struct Accounting {
    pub ports: BTreeMap<String, PortAccount>,
    pub bridges: BTreeMap<String, BridgeAccount>,
    /// (bridge, action kind, "ok" | "error") -> count.
    pub repairs: BTreeMap<(String, &'static str, &'static str), u64>,
    /// Per action kind.
    pub repair_latency: BTreeMap<&'static str, Histogram>,
    /// "ebpf" | "netlink" -> events received.
    pub events: BTreeMap<&'static str, u64>,
    pub ringbuf_lost: u64,
    /// (hook, tier).
    pub hooks: Vec<(String, String)>,
    /// (bridge, action kind) -> repairs that had to wait for a rate-limit slot.
    pub rate_limited: BTreeMap<(String, &'static str), u64>,
    /// (bridge, action kind) -> fights seen (something undoing a repair again and again).
    pub fights: BTreeMap<(String, &'static str), u64>,
    /// Why the model was rebuilt from a dump -> how often.
    pub resyncs: BTreeMap<&'static str, u64>,
    /// (bridge, action kind) -> repairs abandoned because the kernel did not answer in time.
    pub unanswered: BTreeMap<(String, &'static str), u64>,
}

impl Accounting {
    /// Accounts for one transition.
    pub fn on_transition(&mut self, t: &Transition) {
        let Some(acc) = self.ports.get_mut(&t.port) else {
            let episode = (t.to != PortState::Forwarding).then(|| Episode {
                start: t.at,
                end: None,
                per_state_ns: BTreeMap::new(),
            });
            self.ports.insert(
                t.port.clone(),
                PortAccount {
                    bridge: t.bridge.clone(),
                    state: t.to,
                    since: t.at,
                    clock: t.clock,
                    ns_in: BTreeMap::new(),
                    transitions: BTreeMap::new(),
                    listening: Histogram::new(OUTAGE_BUCKETS),
                    outages: Histogram::new(OUTAGE_BUCKETS),
                    episode,
                    last_episode: None,
                    longest_outage_ns: 0,
                    repairs: 0,
                },
            );
            return;
        };
        let from = acc.state;
        let stay = t.at.saturating_sub(acc.since);
        *acc.ns_in.entry(from).or_default() += stay;
        *acc.transitions.entry((from, t.to)).or_default() += 1;
        if from == PortState::Listening {
            acc.listening.observe(seconds(stay));
        }
        if let Some(ep) = acc.episode.as_mut() {
            *ep.per_state_ns.entry(from).or_default() += stay;
        }
        match (from == PortState::Forwarding, t.to == PortState::Forwarding) {
            (true, false) => {
                acc.episode = Some(Episode {
                    start: t.at,
                    end: None,
                    per_state_ns: BTreeMap::new(),
                });
            }
            (false, true) => {
                if let Some(mut ep) = acc.episode.take() {
                    ep.end = Some(t.at);
                    let d = ep.duration_ns(t.at);
                    acc.outages.observe(seconds(d));
                    acc.longest_outage_ns = acc.longest_outage_ns.max(d);
                    acc.last_episode = Some(ep);
                }
            }
            _ => {}
        }
        acc.bridge.clone_from(&t.bridge);
        acc.state = t.to;
        acc.since = t.at;
        acc.clock = t.clock;
    }

    /// Records a repair: its outcome and, when it was acknowledged, its latency.
    pub fn on_repair(
        &mut self,
        bridge: &str,
        port: Option<&str>,
        kind: &'static str,
        ok: bool,
        latency_ns: u64,
    ) {
        let result = if ok { "ok" } else { "error" };
        *self
            .repairs
            .entry((bridge.to_owned(), kind, result))
            .or_default() += 1;
        if ok {
            self.repair_latency
                .entry(kind)
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(seconds(latency_ns));
            if let Some(acc) = port.and_then(|p| self.ports.get_mut(p)) {
                acc.repairs += 1;
            }
        }
    }

    /// Forgets a port that is gone: its series leave the metrics with it.
    pub fn forget_port(&mut self, port: &str) {
        self.ports.remove(port);
    }

    pub fn on_rate_limited(&mut self, bridge: &str, kind: &'static str) {
        *self
            .rate_limited
            .entry((bridge.to_owned(), kind))
            .or_default() += 1;
    }

    pub fn on_fight(&mut self, bridge: &str, kind: &'static str) {
        *self.fights.entry((bridge.to_owned(), kind)).or_default() += 1;
    }

    pub fn on_resync(&mut self, reason: &'static str) {
        *self.resyncs.entry(reason).or_default() += 1;
    }

    pub fn on_unanswered(&mut self, bridge: &str, kind: &'static str) {
        *self
            .unanswered
            .entry((bridge.to_owned(), kind))
            .or_default() += 1;
    }

    /// Updates a bridge's carrier and STP mode; a carrier change closes the open interval.
    pub fn on_bridge(
        &mut self,
        name: &str,
        present: bool,
        carrier: bool,
        stp: Option<StpMode>,
        now: Ktime,
    ) {
        let b = self
            .bridges
            .entry(name.to_owned())
            .or_insert_with(|| BridgeAccount {
                present,
                carrier,
                stp,
                since: now,
                no_carrier_ns: 0,
            });
        if b.carrier != carrier {
            if !b.carrier {
                b.no_carrier_ns += now.saturating_sub(b.since);
            }
            b.carrier = carrier;
            b.since = now;
        }
        b.present = present;
        b.stp = stp;
    }
}

#[expect(clippy::cast_precision_loss, reason = "seconds as f64 for exposition")]
pub fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn t(port: &str, from: Option<PortState>, to: PortState, at: u64) -> Transition {
        transition("br0", port, from, to, at)
    }

    /// A kernel-stamped transition, as the model reports them.
    pub(crate) fn transition(
        bridge: &str,
        port: &str,
        from: Option<PortState>,
        to: PortState,
        at: u64,
    ) -> Transition {
        Transition {
            bridge: bridge.into(),
            port: port.into(),
            from,
            to,
            at,
            clock: Clock::Kernel,
            in_from_ns: None,
            outage_ns: None,
            actor: None,
        }
    }

    #[test]
    fn an_stp_walk_is_one_episode_of_listening_and_learning() {
        use PortState::*;
        let mut a = Accounting::default();
        a.on_transition(&t("vnet0", None, Blocking, 10 * S));
        a.on_transition(&t("vnet0", Some(Blocking), Listening, 10 * S));
        a.on_transition(&t("vnet0", Some(Listening), Learning, 12 * S));
        assert_eq!(a.ports["vnet0"].episode_listening_ns(13 * S), 2 * S);
        a.on_transition(&t("vnet0", Some(Learning), Forwarding, 14 * S));
        let p = &a.ports["vnet0"];
        assert_eq!(p.ns_in(Listening, 20 * S), 2 * S);
        assert_eq!(p.ns_in(Learning, 20 * S), 2 * S);
        assert_eq!(p.ns_in(Forwarding, 20 * S), 6 * S, "open interval counted");
        assert_eq!(p.transitions[&(Listening, Learning)], 1);
        assert_eq!((p.listening.count, p.listening.sum), (1, 2.0));
        assert_eq!(p.outages.count, 1);
        let ep = p.last_episode.as_ref().expect("episode");
        assert_eq!(ep.duration_ns(0), 4 * S);
        assert_eq!(ep.per_state_ns[&Listening], 2 * S);
        assert_eq!(ep.per_state_ns[&Learning], 2 * S);
        assert_eq!(p.longest_outage_ns, 4 * S);
        assert!(p.episode.is_none());
    }

    #[test]
    fn histograms_are_cumulative() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(5.0);
        assert_eq!(h.cumulative, [1, 2, 3]);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn bridge_no_carrier_time_accumulates_across_changes() {
        let mut a = Accounting::default();
        a.on_bridge("br0", true, false, Some(StpMode::Kernel), 0);
        a.on_bridge("br0", true, true, Some(StpMode::Off), 3 * S);
        a.on_bridge("br0", true, false, Some(StpMode::Off), 5 * S);
        assert_eq!(a.bridges["br0"].no_carrier_ns(6 * S), 4 * S);
    }

    #[test]
    fn repairs_count_by_outcome_and_time_only_successes() {
        let mut a = Accounting::default();
        a.on_transition(&t("vnet0", None, PortState::Listening, 0));
        a.on_repair("br0", Some("vnet0"), "force_forwarding", true, 200_000);
        a.on_repair("br0", Some("vnet0"), "force_forwarding", false, 0);
        assert_eq!(a.repairs[&("br0".into(), "force_forwarding", "ok")], 1);
        assert_eq!(a.repairs[&("br0".into(), "force_forwarding", "error")], 1);
        assert_eq!(a.repair_latency["force_forwarding"].count, 1);
        assert_eq!(a.ports["vnet0"].repairs, 1);
    }
}
