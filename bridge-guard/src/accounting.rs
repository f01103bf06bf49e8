//! Accounting: every second each guarded port spends in each state, transitions counted
//! from -> to, episodes of not forwarding, repairs and their latency, per bridge carrier, STP
//! mode and refusals, and the agent's own losses and resyncs. Fed by the model's transitions
//! and the agent's events; read by the logs, `status` and `/metrics`.
//!
//! Times are on the kernel's clock where eBPF stamped the change, and on netlink receive time
//! otherwise; each port says which clock its current state was stamped with.
//!
//! Every label set a dashboard or an alert needs exists from the start, at zero
//! ([`Accounting::guard`]): `rate()` and `increase()` see a series' first event only if the
//! series was there before it. Per-port series go when the port does
//! ([`Accounting::forget_port`]), so deleted taps do not pile up.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    event::{PortState, StpMode},
    model::{Clock, Ktime, Transition},
};

/// Bucket bounds (seconds) for stays in listening and whole outages, per bridge: fine below
/// 50 ms (where repaired outages land), then each just above a time STP walks for (2 s and
/// 4 s at libvirt's forward delay, 15 s and 30 s at the kernel's, 60 s at its longest), so an
/// outage that lasted the full timer falls in the bucket that names it, not the next one up.
pub const OUTAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.25, 1.0, 2.25, 4.5, 16.0, 31.0, 62.0,
];
/// Bucket bounds (seconds) for repair latency: from the event that revealed the fault to the
/// kernel's acknowledgement of the repair.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.1, 1.0,
];

/// Repair kinds (`planner::Action::kind`), so every bridge has each at zero from the start.
pub const ACTIONS: [&str; 6] = [
    "bridge_up",
    "stp_off",
    "reattach",
    "force_forwarding",
    "stp_on",
    "loop_hold_down",
];
/// Repair outcomes in `bridge_guard_repairs_total`.
pub const RESULTS: [&str; 2] = ["ok", "error"];
/// Sources of kernel events.
pub const SOURCES: [&str; 2] = ["ebpf", "netlink"];
/// Why the agent rebuilt its model from a dump.
pub const RESYNC_REASONS: [&str; 9] = [
    "start",
    "periodic",
    "ebpf_lost",
    "netlink_overrun",
    // A second dump once a loss calmed down: drops go on unreported while a socket stays
    // congested.
    "follow_up",
    "inconsistent_dump",
    "request_timeout",
    "retry",
    // The configuration was reloaded (SIGHUP).
    "reload",
];
/// Evidence of a loop the loop guard acts on.
pub const LOOP_EVIDENCE: [&str; 3] = ["bpdu", "probe", "mac_flap"];

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
    /// Completed episodes of not forwarding.
    pub outages: u64,
    /// Their total length (the open episode is added at read time).
    pub outage_ns: u64,
    pub episode: Option<Episode>,
    pub last_episode: Option<Episode>,
    pub longest_outage_ns: u64,
    pub repairs: u64,
    /// Loops detected on this port.
    pub loops: u64,
}

impl PortAccount {
    fn new(t: &Transition) -> Self {
        Self {
            bridge: t.bridge.clone(),
            state: t.to,
            since: t.at,
            clock: t.clock,
            ns_in: BTreeMap::new(),
            transitions: BTreeMap::new(),
            outages: 0,
            outage_ns: 0,
            episode: (t.to != PortState::Forwarding).then(|| Episode {
                start: t.at,
                end: None,
                per_state_ns: BTreeMap::new(),
            }),
            last_episode: None,
            longest_outage_ns: 0,
            repairs: 0,
            loops: 0,
        }
    }

    /// Time in `state` including the open interval up to `now`.
    pub fn ns_in(&self, state: PortState, now: Ktime) -> u64 {
        let open = if self.state == state {
            now.saturating_sub(self.since)
        } else {
            0
        };
        self.ns_in.get(&state).copied().unwrap_or(0) + open
    }

    /// Time not forwarding, completed episodes and the open one up to `now`.
    pub fn outage_ns(&self, now: Ktime) -> u64 {
        self.outage_ns + self.episode.as_ref().map_or(0, |e| e.duration_ns(now))
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

#[derive(Clone, Debug, Serialize)]
pub struct BridgeAccount {
    pub present: bool,
    pub carrier: bool,
    pub stp: Option<StpMode>,
    pub since: Ktime,
    /// Completed time without carrier (the open interval is added at read time).
    pub no_carrier_ns: u64,
    /// Reasons the planner refuses to repair this bridge, now.
    pub refusals: u64,
    /// Each completed stay in listening, of any of its ports.
    pub listening: Histogram,
    /// Each completed episode of not forwarding, of any of its ports.
    pub outages: Histogram,
}

impl Default for BridgeAccount {
    fn default() -> Self {
        Self {
            present: false,
            carrier: false,
            stp: None,
            since: 0,
            no_carrier_ns: 0,
            refusals: 0,
            listening: Histogram::new(OUTAGE_BUCKETS),
            outages: Histogram::new(OUTAGE_BUCKETS),
        }
    }
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

/// What libvirt says about a port: the VM it belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortInfo {
    /// The libvirt domain (VM) name.
    pub domain: String,
    /// The guest-side MAC address, as libvirt's XML gives it.
    pub mac: String,
}

/// A count per (bridge, action kind).
pub type PerAction = BTreeMap<(String, &'static str), u64>;

#[derive(Clone, Debug, Default)]
pub struct Accounting {
    pub ports: BTreeMap<String, PortAccount>,
    /// Port name -> its VM, filled from libvirt's XML.
    pub port_info: BTreeMap<String, PortInfo>,
    pub bridges: BTreeMap<String, BridgeAccount>,
    /// (bridge, action kind, "ok" | "error") -> count.
    pub repairs: BTreeMap<(String, &'static str, &'static str), u64>,
    /// Repairs held back because they came faster than the rate limit allows.
    pub rate_limited: PerAction,
    /// Repairs the kernel did not answer in time (abandoned, then resynced).
    pub unconfirmed: PerAction,
    /// Fights: something undoing a repair again and again.
    pub fights: PerAction,
    /// Per (bridge, action kind).
    pub repair_latency: BTreeMap<(String, &'static str), Histogram>,
    /// "ebpf" | "netlink" -> events received.
    pub events: BTreeMap<&'static str, u64>,
    /// Source -> events lost (eBPF: records dropped by a full ring buffer; netlink: socket
    /// overruns, each losing one or more notifications).
    pub lost: BTreeMap<&'static str, u64>,
    /// Reason -> resyncs from a dump.
    pub resyncs: BTreeMap<&'static str, u64>,
    /// (bridge, evidence) -> loops detected.
    pub loops: BTreeMap<(String, &'static str), u64>,
    /// (hook, tier).
    pub hooks: Vec<(String, String)>,
    /// Observe-only: nothing is repaired.
    pub observe: bool,
}

fn bump<K: Ord>(map: &mut BTreeMap<K, u64>, key: K, n: u64) {
    *map.entry(key).or_default() += n;
}

impl Accounting {
    /// Accounting with every source and resync reason at zero.
    pub fn new() -> Self {
        let mut a = Self::default();
        for s in SOURCES {
            a.events.insert(s, 0);
            a.lost.insert(s, 0);
        }
        for r in RESYNC_REASONS {
            a.resyncs.insert(r, 0);
        }
        a
    }

    /// Starts every per-bridge series of `bridges` at zero: repairs by action and result,
    /// rate-limited and unconfirmed repairs, latency, outage histograms, refusals, loops.
    pub fn guard<'a>(&mut self, bridges: impl IntoIterator<Item = &'a str>) {
        for b in bridges {
            self.bridges.entry(b.to_owned()).or_default();
            for action in ACTIONS {
                for result in RESULTS {
                    self.repairs
                        .entry((b.to_owned(), action, result))
                        .or_default();
                }
                self.rate_limited.entry((b.to_owned(), action)).or_default();
                self.unconfirmed.entry((b.to_owned(), action)).or_default();
                self.fights.entry((b.to_owned(), action)).or_default();
                self.repair_latency
                    .entry((b.to_owned(), action))
                    .or_insert_with(|| Histogram::new(LATENCY_BUCKETS));
            }
            for evidence in LOOP_EVIDENCE {
                self.loops.entry((b.to_owned(), evidence)).or_default();
            }
        }
    }

    /// Forgets a port that no longer exists: its series leave `/metrics`. Its bridge's
    /// histograms keep what it contributed.
    pub fn forget_port(&mut self, port: &str) {
        self.ports.remove(port);
        self.port_info.remove(port);
    }

    /// Accounts for one transition.
    pub fn on_transition(&mut self, t: &Transition) {
        let Some(acc) = self.ports.get_mut(&t.port) else {
            self.ports.insert(t.port.clone(), PortAccount::new(t));
            return;
        };
        let bridge = self.bridges.entry(t.bridge.clone()).or_default();
        let from = acc.state;
        let stay = t.at.saturating_sub(acc.since);
        *acc.ns_in.entry(from).or_default() += stay;
        *acc.transitions.entry((from, t.to)).or_default() += 1;
        if from == PortState::Listening {
            bridge.listening.observe(seconds(stay));
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
                    bridge.outages.observe(seconds(d));
                    acc.outages += 1;
                    acc.outage_ns += d;
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
        bump(&mut self.repairs, (bridge.to_owned(), kind, result), 1);
        if ok {
            self.repair_latency
                .entry((bridge.to_owned(), kind))
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(seconds(latency_ns));
            if let Some(acc) = port.and_then(|p| self.ports.get_mut(p)) {
                acc.repairs += 1;
            }
        }
    }

    /// A repair held back by the rate limit (something keeps undoing it faster than allowed).
    pub fn on_rate_limited(&mut self, bridge: &str, kind: &'static str) {
        bump(&mut self.rate_limited, (bridge.to_owned(), kind), 1);
    }

    /// A repair the kernel did not answer in time.
    pub fn on_unconfirmed(&mut self, bridge: &str, kind: &'static str) {
        bump(&mut self.unconfirmed, (bridge.to_owned(), kind), 1);
    }

    /// A fight started over a repair of `kind` on `bridge`.
    pub fn on_fight(&mut self, bridge: &str, kind: &'static str) {
        bump(&mut self.fights, (bridge.to_owned(), kind), 1);
    }

    /// The model was rebuilt from a dump, for `reason` (one of [`RESYNC_REASONS`] or new).
    pub fn on_resync(&mut self, reason: &'static str) {
        bump(&mut self.resyncs, reason, 1);
    }

    /// `n` events from `source` were lost.
    pub fn on_lost(&mut self, source: &'static str, n: u64) {
        bump(&mut self.lost, source, n);
    }

    /// `source` has lost `total` events since the start (for counters kept by the source
    /// itself, such as the ring buffer's): never goes backwards.
    pub fn note_lost_total(&mut self, source: &'static str, total: u64) {
        let v = self.lost.entry(source).or_default();
        *v = (*v).max(total);
    }

    /// `n` events received from `source`.
    pub fn on_events(&mut self, source: &'static str, n: u64) {
        bump(&mut self.events, source, n);
    }

    /// The loop guard saw a loop on `port` of `bridge`.
    pub fn on_loop_detected(&mut self, bridge: &str, port: &str, evidence: &'static str) {
        bump(&mut self.loops, (bridge.to_owned(), evidence), 1);
        if let Some(acc) = self.ports.get_mut(port) {
            acc.loops += 1;
        }
    }

    /// How many reasons the planner has, now, to refuse repairing `bridge`.
    pub fn set_refusals(&mut self, bridge: &str, n: u64) {
        self.bridges.entry(bridge.to_owned()).or_default().refusals = n;
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
                carrier,
                since: now,
                ..BridgeAccount::default()
            });
        if b.since == 0 {
            // Created at zero by `guard`: its clock starts with the first news of it.
            b.carrier = carrier;
            b.since = now;
        }
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
        let mut a = Accounting::new();
        a.on_transition(&t("vnet0", None, Blocking, 10 * S));
        a.on_transition(&t("vnet0", Some(Blocking), Listening, 10 * S));
        a.on_transition(&t("vnet0", Some(Listening), Learning, 12 * S));
        assert_eq!(a.ports["vnet0"].episode_listening_ns(13 * S), 2 * S);
        assert_eq!(
            a.ports["vnet0"].outage_ns(13 * S),
            3 * S,
            "open episode counted"
        );
        a.on_transition(&t("vnet0", Some(Learning), Forwarding, 14 * S));
        let p = &a.ports["vnet0"];
        assert_eq!(p.ns_in(Listening, 20 * S), 2 * S);
        assert_eq!(p.ns_in(Learning, 20 * S), 2 * S);
        assert_eq!(p.ns_in(Forwarding, 20 * S), 6 * S, "open interval counted");
        assert_eq!(p.transitions[&(Listening, Learning)], 1);
        let br = &a.bridges["br0"];
        assert_eq!((br.listening.count, br.listening.sum), (1, 2.0));
        assert_eq!(br.outages.count, 1);
        assert_eq!((p.outages, p.outage_ns(20 * S)), (1, 4 * S));
        let ep = p.last_episode.as_ref().expect("episode");
        assert_eq!(ep.duration_ns(0), 4 * S);
        assert_eq!(ep.per_state_ns[&Listening], 2 * S);
        assert_eq!(ep.per_state_ns[&Learning], 2 * S);
        assert_eq!(p.longest_outage_ns, 4 * S);
        assert!(p.episode.is_none());
    }

    #[test]
    fn stp_walks_land_in_the_bucket_that_names_them() {
        // The README's walk: 2.013 s listening, 4.029 s out. Bounds on STP's own times put
        // both one bucket up; bounds just above them do not.
        let mut h = Histogram::new(OUTAGE_BUCKETS);
        h.observe(2.013);
        h.observe(4.029);
        let le = |b: f64| {
            let i = OUTAGE_BUCKETS
                .iter()
                .position(|x| (*x - b).abs() < 1e-9)
                .expect("bound");
            h.cumulative[i]
        };
        assert_eq!((le(1.0), le(2.25), le(4.5)), (0, 1, 2));
        for (walk, bound) in [(15.02, 16.0), (30.03, 31.0), (60.05, 62.0)] {
            assert!(walk < bound && bound - walk < 2.0, "{walk} -> {bound}");
        }
        assert!(
            OUTAGE_BUCKETS.iter().filter(|b| **b <= 0.05).count() >= 5,
            "fine buckets below 50 ms"
        );
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
        let mut a = Accounting::new();
        a.guard(["br0"]);
        a.on_bridge("br0", true, false, Some(StpMode::Kernel), 10 * S);
        a.on_bridge("br0", true, true, Some(StpMode::Off), 13 * S);
        a.on_bridge("br0", true, false, Some(StpMode::Off), 15 * S);
        assert_eq!(a.bridges["br0"].no_carrier_ns(16 * S), 4 * S);
    }

    #[test]
    fn repairs_count_by_outcome_and_time_only_successes() {
        let mut a = Accounting::new();
        a.on_transition(&t("vnet0", None, PortState::Listening, 0));
        a.on_repair("br0", Some("vnet0"), "force_forwarding", true, 200_000);
        a.on_repair("br0", Some("vnet0"), "force_forwarding", false, 0);
        assert_eq!(a.repairs[&("br0".into(), "force_forwarding", "ok")], 1);
        assert_eq!(a.repairs[&("br0".into(), "force_forwarding", "error")], 1);
        assert_eq!(
            a.repair_latency[&("br0".into(), "force_forwarding")].count,
            1
        );
        assert_eq!(a.ports["vnet0"].repairs, 1);
    }

    #[test]
    fn guarded_bridges_start_every_series_at_zero() {
        let mut a = Accounting::new();
        a.guard(["br0", "virbr0"]);
        assert_eq!(a.repairs.len(), 2 * ACTIONS.len() * RESULTS.len());
        assert!(a.repairs.values().all(|n| *n == 0));
        assert_eq!(a.rate_limited.len(), 2 * ACTIONS.len());
        assert_eq!(a.unconfirmed.len(), 2 * ACTIONS.len());
        assert_eq!(a.repair_latency.len(), 2 * ACTIONS.len());
        assert_eq!(a.loops.len(), 2 * LOOP_EVIDENCE.len());
        assert_eq!(a.events.len(), SOURCES.len());
        assert_eq!(a.lost.len(), SOURCES.len());
        assert_eq!(a.resyncs.len(), RESYNC_REASONS.len());
        assert_eq!(a.bridges["virbr0"].outages.count, 0);
        a.on_rate_limited("br0", "stp_off");
        a.on_unconfirmed("br0", "reattach");
        a.on_resync("periodic");
        a.on_lost("netlink", 1);
        a.note_lost_total("ebpf", 5);
        a.note_lost_total("ebpf", 3);
        a.on_loop_detected("br0", "vnet0", "bpdu");
        a.set_refusals("virbr0", 2);
        assert_eq!(a.rate_limited[&("br0".into(), "stp_off")], 1);
        assert_eq!(a.unconfirmed[&("br0".into(), "reattach")], 1);
        assert_eq!((a.resyncs["periodic"], a.lost["netlink"]), (1, 1));
        assert_eq!(a.lost["ebpf"], 5, "a source's own total never goes back");
        assert_eq!(a.loops[&("br0".into(), "bpdu")], 1);
        assert_eq!(a.bridges["virbr0"].refusals, 2);
    }

    #[test]
    fn a_forgotten_port_leaves_no_series_but_its_bridge_keeps_its_history() {
        use PortState::*;
        let mut a = Accounting::new();
        a.guard(["br0"]);
        a.on_transition(&t("vnet0", None, Listening, 0));
        a.on_transition(&t("vnet0", Some(Listening), Forwarding, S));
        a.port_info.insert(
            "vnet0".into(),
            PortInfo {
                domain: "vm1".into(),
                mac: "52:54:00:00:00:01".into(),
            },
        );
        a.forget_port("vnet0");
        assert!(a.ports.is_empty() && a.port_info.is_empty());
        assert_eq!(a.bridges["br0"].outages.count, 1);
        a.forget_port("never-seen");
    }
}
