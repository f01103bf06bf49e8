//! Loop protection: what keeps a bridge loop-free once kernel STP is off, the way switches
//! protect edge ports.
//!
//! - **Probes**: a frame of our own (`frame`) goes out of every port of a protected bridge every
//!   [`holds::PROBE_EVERY_NS`], at once when a port joins, gets carrier or starts forwarding,
//!   and before a port is first forced to forwarding. One that comes back on another port of
//!   the same bridge is a loop between the two.
//! - **BPDU guard**: a BPDU arriving on a port of a bridge with STP off means a bridge is on the
//!   other side; this bridge's own BPDU coming back is a loop.
//! - **MAC flapping**: the `br_fdb_update` tracepoint, counted in the kernel (`fdb-flap` hook),
//!   reports an address moving between two ports again and again: looped frames.
//!
//! A port seen in a loop is held out of forwarding (`holds`; the planner sets it disabled,
//! which STP-off bridges do not undo, and never forces it back), re-probed while held, and let
//! go when the loop is gone. Frames are read from one packet socket per port (`socket`), which
//! sees what arrives on a port even while the bridge holds it out.
//!
//! The same module holds what the planner needs from outside the model: kernel STP's own loop
//! evidence (`stp`), hazards by kind and by where a port leads (`hazards`, `peers`), ports the
//! kernel lists but netlink could not decode, and which bridges bridge-guard turned STP off on.

pub mod flap;
pub mod frame;
pub mod hazards;
pub mod holds;
pub mod peers;
pub mod socket;
pub mod stp;
pub mod taps;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use rtnetlink::Handle;

use self::{
    flap::{Flap, FlapStream},
    frame::Frame,
    holds::{Detection, Evidence, Holds, PROBE_EVERY_NS, Sighting},
    socket::{Received, Sockets},
};

/// At most one probe round per bridge this often to check flaps that may be a cut loop's
/// drain (hundreds of them arrive while it lasts).
const VERIFY_EVERY_NS: Ktime = 20_000_000;
use crate::{
    event::{PortState, StpMode},
    model::{Ktime, Model},
    planner::{Action, Context, Guard},
    sources::{
        ebpf::{Probes, hooks::Tier},
        netlink::{self, LinkKind, LinkSnapshot},
    },
    status,
    sys::clock::monotonic_ns,
};

/// How often a blocking port's STP fields are fetched again while it stays blocking: netlink
/// announces port-state changes (AF_BRIDGE) without the designated bridge and port.
const STP_RECHECK_NS: Ktime = 1_000_000_000;
/// How often the MAC-flap program's loss counters are read at most.
const COUNTERS_EVERY_NS: Ktime = 1_000_000_000;
/// How long a fetch of a port's STP fields may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);

/// What a look-up beyond the model found.
enum Lookup {
    /// Where a port leads in another namespace (`peers`).
    Peer {
        ifindex: u32,
        key: (i32, u32),
        verdict: Option<String>,
    },
    /// Who holds a tap: `Some(why)` when a VPN does (`taps`).
    Tap {
        ifindex: u32,
        verdict: Option<String>,
    },
    /// A blocking port's fresh snapshot, with its STP fields (`None`: gone, or no answer).
    Stp {
        ifindex: u32,
        fresh: Option<LinkSnapshot>,
    },
}

pub struct LoopGuard {
    /// For look-ups beyond the model (other namespaces, STP fields).
    handle: Handle,
    /// Look-ups in flight, answered as news; the ports they are for wait for them.
    lookups: FuturesUnordered<BoxFuture<'static, Lookup>>,
    looking: BTreeSet<u32>,
    /// Fresh snapshots fetched, for the model.
    fresh: Vec<LinkSnapshot>,
    /// Every guarded bridge, and those with loop protection on.
    guarded: Vec<String>,
    protected: BTreeSet<String>,
    sockets: Option<Sockets>,
    flaps: Option<FlapStream>,
    /// The flap program's (lost, not judged) counters at the last look.
    flap_counters: (u64, u64),
    /// When that look was.
    counters_read: Option<Ktime>,
    holds: Holds,
    nonce: u64,
    /// Source MAC of our probes: locally administered, from the nonce.
    mac: [u8; 6],
    seq: u32,
    frames: Vec<Received>,
    flap_batch: Vec<Flap>,
    /// When a flap that may be a cut loop's drain last sent a bridge's ports a probe round.
    verified: BTreeMap<u32, Ktime>,
    /// Per port ifindex: (oper up, forwarding) at the last update.
    last: BTreeMap<u32, (bool, bool)>,
    /// Per bridge ifindex: when its next periodic probe round is due.
    next_round: BTreeMap<u32, Ktime>,
    peers: peers::Peers,
    /// Per tap ifindex: who holds it, when that was looked up (`taps`).
    taps: BTreeMap<u32, Option<String>>,
    /// Per bridge ifindex: ports the kernel lists that netlink could not decode.
    undecoded: BTreeMap<u32, Vec<u32>>,
    /// Per blocking port ifindex: when its STP fields were last fetched.
    stp_checked: BTreeMap<u32, Ktime>,
    /// Bridges whose STP bridge-guard turned off (kept across restarts in the state file).
    stp_off_by_us: BTreeSet<String>,
    /// Bridges without a MAC already warned about.
    warned: BTreeSet<u32>,
    /// Why there are no packet sockets at all, if so.
    no_sockets: Option<String>,
    /// Observe-only: loops are reported, not cut.
    observe: bool,
    /// Whether the first probe round (before the first repair pass) was made.
    started: bool,
}

fn random_nonce() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: a valid buffer of the size passed.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        // No entropy source: still unique enough per host (pid and start time).
        monotonic_ns() ^ (u64::from(std::process::id()) << 40)
    }
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The guarded bridges with loop protection on.
fn protected(guards: &[Guard]) -> BTreeSet<String> {
    guards
        .iter()
        .filter(|g| g.policy.loop_protect)
        .map(|g| g.bridge.clone())
        .collect()
}

impl LoopGuard {
    /// Opens what loop protection needs for `guards` and logs which detectors run. `observe`:
    /// loops are reported, not cut.
    pub fn new(
        guards: &[Guard],
        probes: Option<&mut Probes>,
        observe: bool,
        handle: Handle,
    ) -> Self {
        let nonce = random_nonce();
        let n = nonce.to_be_bytes();
        let protected = protected(guards);
        let mut guard = Self {
            handle,
            lookups: FuturesUnordered::new(),
            looking: BTreeSet::new(),
            fresh: Vec::new(),
            guarded: guards.iter().map(|g| g.bridge.clone()).collect(),
            protected,
            sockets: None,
            flaps: None,
            flap_counters: (0, 0),
            counters_read: None,
            holds: Holds::default(),
            nonce,
            mac: [0x02, n[0], n[1], n[2], n[3], n[4]],
            seq: 0,
            frames: Vec::new(),
            flap_batch: Vec::new(),
            verified: BTreeMap::new(),
            last: BTreeMap::new(),
            next_round: BTreeMap::new(),
            peers: peers::Peers::default(),
            taps: BTreeMap::new(),
            undecoded: BTreeMap::new(),
            stp_checked: BTreeMap::new(),
            stp_off_by_us: BTreeSet::new(),
            warned: BTreeSet::new(),
            no_sockets: None,
            observe,
            started: false,
        };
        guard.open_detectors(probes);
        guard
    }

    /// Opens the detectors the protected bridges need and not yet open, and logs which run.
    fn open_detectors(&mut self, probes: Option<&mut Probes>) {
        if self.protected.is_empty() {
            tracing::info!("loop protection: off (loop_protect = false on every guarded bridge)");
            return;
        }
        if self.sockets.is_none() {
            match Sockets::new() {
                Ok(s) => {
                    self.sockets = Some(s);
                    self.no_sockets = None;
                }
                Err(e) => self.no_sockets = Some(e.to_string()),
            }
        }
        let probing = match &self.no_sockets {
            None => "probes and BPDU guard: packet sockets".to_owned(),
            Some(e) => format!("probes and BPDU guard: none ({e})"),
        };
        const FLAPS_BY_EBPF: &str = "MAC flapping: eBPF (br_fdb_update tracepoint)";
        let flapping = match probes {
            _ if self.flaps.is_some() => FLAPS_BY_EBPF.to_owned(),
            Some(p) if p.tier("fdb-flap") != Tier::None => match p.fdb_flaps() {
                Ok(f) => {
                    self.flaps = Some(f);
                    FLAPS_BY_EBPF.to_owned()
                }
                Err(e) => format!("MAC flapping: none ({})", crate::error_chain(&e)),
            },
            Some(_) => "MAC flapping: none (the fdb-flap hook did not attach)".to_owned(),
            None => "MAC flapping: none (no eBPF)".to_owned(),
        };
        let names: Vec<&str> = self.protected.iter().map(String::as_str).collect();
        let line = format!(
            "loop protection on {}: {probing}; {flapping}; probe MAC {}",
            names.join(", "),
            mac_text(&self.mac)
        );
        if self.sockets.is_none() || self.flaps.is_none() {
            tracing::warn!("{line}");
        } else {
            tracing::info!("{line}");
        }
    }

    /// Takes a reloaded configuration: which bridges are guarded and protected, observe-only.
    /// Detectors a newly protected bridge needs are opened; holds on bridges no longer
    /// protected are let go (the planner judges those ports as any other again).
    pub fn reconfigure(&mut self, guards: &[Guard], observe: bool, probes: Option<&mut Probes>) {
        let before = std::mem::take(&mut self.protected);
        self.guarded = guards.iter().map(|g| g.bridge.clone()).collect();
        self.protected = protected(guards);
        self.observe = observe;
        if self.protected.is_empty() {
            self.holds = Holds::default();
        }
        if self.protected != before {
            self.open_detectors(probes);
        }
    }

    /// Remembers that bridge-guard turned STP off on `bridge` (from the previous run's state).
    pub fn restore_stp_off(&mut self, bridge: &str) {
        self.stp_off_by_us.insert(bridge.to_owned());
    }

    /// Whether bridge-guard turned STP off on `bridge` (and it was not turned back on since).
    pub fn turned_stp_off(&self, bridge: &str) -> bool {
        self.stp_off_by_us.contains(bridge)
    }

    /// Notes a repair the kernel acknowledged.
    pub fn applied(&mut self, action: &Action) {
        match action {
            Action::StpOff { bridge, .. } => {
                self.stp_off_by_us.insert(bridge.clone());
            }
            Action::StpOn { bridge, .. } => {
                self.stp_off_by_us.remove(bridge);
            }
            _ => {}
        }
    }

    /// Whether a probe round is still waiting for its frames.
    pub fn probing(&self) -> bool {
        self.holds.probing()
    }

    fn next_deadline(&self) -> Option<Ktime> {
        self.holds
            .next_deadline()
            .into_iter()
            .chain(self.next_round.values().copied())
            .min()
    }

    /// Waits until a frame or a flap report arrives, or something falls due. Frames are kept
    /// for [`LoopGuard::update`].
    pub async fn wait(&mut self) {
        let deadline = self.next_deadline();
        let Self {
            sockets,
            frames,
            flaps,
            flap_batch,
            lookups,
            ..
        } = self;
        let frames_in = async {
            match sockets {
                Some(s) => {
                    if let Err(e) = s.recv(frames).await {
                        tracing::warn!("loop protection cannot read its sockets: {e}");
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let flaps_in = async {
            match flaps {
                Some(f) => {
                    if let Err(e) = f.recv(flap_batch).await {
                        tracing::warn!("loop protection cannot read MAC-flap reports: {e}");
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        let due = async {
            match deadline {
                Some(t) => {
                    let wait = Duration::from_nanos(t.saturating_sub(monotonic_ns()));
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending().await,
            }
        };
        let answer = async {
            if lookups.is_empty() {
                std::future::pending().await
            } else {
                lookups.next().await
            }
        };
        let found = tokio::select! {
            () = frames_in => None,
            () = flaps_in => None,
            () = due => None,
            l = answer => l,
        };
        if let Some(l) = found {
            self.take_lookup(l);
        }
    }

    fn take_lookup(&mut self, l: Lookup) {
        match l {
            Lookup::Peer {
                ifindex,
                key,
                verdict,
            } => {
                self.looking.remove(&ifindex);
                self.peers.insert(ifindex, key, verdict);
            }
            Lookup::Tap { ifindex, verdict } => {
                self.looking.remove(&ifindex);
                if let Some(why) = &verdict {
                    tracing::debug!(ifindex, "{why}");
                }
                self.taps.insert(ifindex, verdict);
            }
            Lookup::Stp { ifindex, fresh } => {
                self.looking.remove(&ifindex);
                self.fresh.extend(fresh);
            }
        }
    }

    /// Snapshots fetched since the last call (fresh STP fields of blocking ports): news for
    /// the model.
    pub fn take_fresh(&mut self) -> Vec<LinkSnapshot> {
        std::mem::take(&mut self.fresh)
    }

    /// Waits for every look-up in flight (one-shot use: `fix`).
    pub async fn finish_lookups(&mut self) {
        while let Some(l) = self.lookups.next().await {
            self.take_lookup(l);
        }
    }

    /// Starts the look-ups the planner waits for: where new ports lead in other namespaces
    /// (once per port), and fresh STP fields of ports kernel STP blocks (once per blocking
    /// episode, and again every [`STP_RECHECK_NS`] while it lasts).
    fn start_lookups(&mut self, model: &Model, now: Ktime) {
        let needed: Vec<(LinkSnapshot, (i32, u32))> = self
            .judged(model)
            .filter(|p| !self.looking.contains(&p.ifindex))
            .filter_map(|p| self.peers.needs(p).map(|key| (p.clone(), key)))
            .collect();
        for (p, key) in needed {
            self.looking.insert(p.ifindex);
            let handle = self.handle.clone();
            self.lookups.push(Box::pin(async move {
                let ifindex = p.ifindex;
                let verdict = peers::look(handle, p, key.0, key.1).await;
                Lookup::Peer {
                    ifindex,
                    key,
                    verdict,
                }
            }));
        }
        // Taps with carrier and without virtio-net headers: who holds them (/proc, off the
        // event loop's thread).
        self.taps.retain(|i, _| model.link(*i).is_some());
        let taps: Vec<(u32, String)> = self
            .judged(model)
            .filter(|p| {
                matches!(p.kind, LinkKind::Tun { vnet_hdr, .. } if vnet_hdr != Some(true))
                    && p.carrier
                    && !self.taps.contains_key(&p.ifindex)
                    && !self.looking.contains(&p.ifindex)
            })
            .map(|p| (p.ifindex, p.name.clone()))
            .collect();
        for (ifindex, name) in taps {
            self.looking.insert(ifindex);
            self.lookups.push(Box::pin(async move {
                let verdict = tokio::task::spawn_blocking(move || taps::vpn_holder(&name))
                    .await
                    .unwrap_or_else(|e| Some(format!("cannot tell who holds the tap: {e}")));
                Lookup::Tap { ifindex, verdict }
            }));
        }
        let blocking: Vec<(u32, Ktime)> = self
            .bridges(model)
            .iter()
            .filter(|(b, _)| b.stp == Some(StpMode::Kernel))
            .flat_map(|(b, _)| model.ports_of(b.ifindex))
            .filter(|p| p.port_state == Some(PortState::Blocking))
            .map(|p| (p.ifindex, model.track(&p.name).map_or(0, |t| t.since)))
            .collect();
        self.stp_checked
            .retain(|i, _| blocking.iter().any(|(b, _)| b == i));
        for (ifindex, blocking_since) in blocking {
            let stale = self
                .stp_checked
                .get(&ifindex)
                .is_none_or(|t| *t < blocking_since || now.saturating_sub(*t) > STP_RECHECK_NS);
            if !stale || self.looking.contains(&ifindex) {
                continue;
            }
            self.stp_checked.insert(ifindex, now);
            self.looking.insert(ifindex);
            let handle = self.handle.clone();
            self.lookups.push(Box::pin(async move {
                let fetched =
                    tokio::time::timeout(FETCH_TIMEOUT, netlink::link_in(&handle, None, ifindex))
                        .await;
                let fresh = match fetched {
                    Ok(Ok(l)) => l,
                    Ok(Err(e)) => {
                        tracing::debug!(
                            ifindex,
                            "cannot fetch STP fields: {}",
                            crate::error_chain(&e)
                        );
                        None
                    }
                    Err(_) => None,
                };
                Lookup::Stp { ifindex, fresh }
            }));
        }
    }

    /// The guarded bridges present, by ifindex, with whether loop protection is on.
    fn bridges<'m>(&self, model: &'m Model) -> Vec<(&'m LinkSnapshot, bool)> {
        self.guarded
            .iter()
            .filter_map(|b| model.bridge(b))
            .map(|b| (b, self.protected.contains(&b.name)))
            .collect()
    }

    /// Takes in what arrived and what fell due: sightings become holds, due probe rounds go
    /// out. Returns the ports newly taken out of forwarding (already logged).
    pub fn update(&mut self, model: &Model, now: Ktime) -> Vec<Detection> {
        if self.protected.is_empty() {
            return Vec::new();
        }
        if let Some(s) = &self.sockets {
            s.drain(&mut self.frames);
        }
        if let Some(f) = &mut self.flaps {
            f.drain(&mut self.flap_batch);
        }
        let bridges: Vec<u32> = self
            .bridges(model)
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(b, _)| b.ifindex)
            .collect();
        let ports: BTreeMap<u32, u32> = bridges
            .iter()
            .flat_map(|b| model.ports_of(*b).map(move |p| (p.ifindex, *b)))
            .collect();
        let wanted: BTreeSet<u32> = ports.keys().copied().collect();
        // Sockets on ports with carrier only: nothing flows through the others (a tap nobody
        // opened yet), and a churn of such taps costs no syscalls.
        if let Some(s) = &mut self.sockets {
            let up: BTreeSet<u32> = wanted
                .iter()
                .copied()
                .filter(|i| model.link(*i).is_some_and(|l| l.oper_up))
                .collect();
            s.sync(&up, |i| model.link(i).is_some());
        }
        let forwarding = |i: u32| {
            model
                .link(i)
                .is_some_and(|l| l.port_state == Some(PortState::Forwarding))
        };
        self.holds.settle(|i| wanted.contains(&i), forwarding);
        self.next_round.retain(|b, _| bridges.contains(b));

        // A port that just got carrier or started forwarding is probed at once: a join, a
        // repair, or a guest that came back may have closed a loop.
        let mut due: BTreeSet<u32> = BTreeSet::new();
        for (&port, &bridge) in &ports {
            let Some(l) = model.link(port) else { continue };
            let state = (l.oper_up, l.port_state == Some(PortState::Forwarding));
            let prev = self.last.insert(port, state);
            let rose = prev.map_or(state.0 || state.1, |p| state.0 && !p.0 || state.1 && !p.1);
            if rose {
                due.insert(bridge);
            }
        }
        self.last.retain(|p, _| wanted.contains(p));

        let mut detections = Vec::new();
        let since = |i: u32| {
            model
                .link(i)
                .filter(|l| l.port_state == Some(PortState::Forwarding))
                .map(|l| model.track(&l.name).map_or(0, |t| t.since))
        };
        let frames = std::mem::take(&mut self.frames);
        for r in &frames {
            if let Some(s) = self.frame_sighting(r, model, now) {
                tracing::debug!(bridge = %s.bridge, port = %s.port.1, "loop sighting: {}", s.evidence);
                detections.extend(self.holds.observe(s, since));
            }
        }
        let flaps = std::mem::take(&mut self.flap_batch);
        for f in &flaps {
            let Some(s) = self.flap_sighting(f, model) else {
                continue;
            };
            // Maybe the drain of a loop just cut: a probe round tells (a loop returns it).
            let probed = |i: u32| self.sockets.as_ref().is_some_and(|x| x.watching(i));
            let verifiable = probed(s.port.0) && s.other.as_ref().is_some_and(|o| probed(o.0));
            if verifiable && self.holds.may_be_drain(&s) {
                let last = self.verified.get(&s.bridge_ifindex).copied();
                if last.is_none_or(|t| now.saturating_sub(t) >= VERIFY_EVERY_NS) {
                    self.verified.insert(s.bridge_ifindex, now);
                    tracing::debug!(bridge = %s.bridge, port = %s.port.1, "a flap that may be a cut loop's drain, probing: {}", s.evidence);
                    due.insert(s.bridge_ifindex);
                }
                continue;
            }
            detections.extend(self.holds.observe(s, since));
        }
        self.verified.retain(|b, _| bridges.contains(b));

        due.extend(self.holds.tick(now));
        due.extend(
            self.next_round
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(b, _)| *b),
        );
        for b in &bridges {
            self.next_round.entry(*b).or_insert(now);
        }
        for b in due {
            self.send_round(b, model, now);
        }
        self.start_lookups(model, now);
        for d in &detections {
            tracing::warn!(
                bridge = %d.bridge,
                port = %d.port,
                other = d.other.as_deref().unwrap_or("-"),
                evidence = d.evidence.kind(),
                hold_ms = d.hold_ns / 1_000_000,
                "loop{}: {} {} out of forwarding for {:.0} s: {}; the loop's other port: {}",
                if d.repeat { " again" } else { "" },
                if self.observe { "observe-only, would take" } else { "taking" },
                d.port,
                d.hold_ns as f64 / 1e9,
                d.evidence,
                d.other.as_deref().unwrap_or("not known")
            );
        }
        detections
    }

    /// Warns of MAC-flap reports lost or not judged since the last look, at most once per
    /// [`COUNTERS_EVERY_NS`]: reading per-CPU counters costs system calls, so it is done after
    /// a turn's repairs went out, never on their path.
    pub fn check_flap_counters(&mut self, at: Ktime) {
        let Some(f) = &self.flaps else { return };
        if self
            .counters_read
            .is_some_and(|t| at.saturating_sub(t) < COUNTERS_EVERY_NS)
        {
            return;
        }
        self.counters_read = Some(at);
        let now = f.counters();
        let (lost, failed) = (
            now.0.saturating_sub(self.flap_counters.0),
            now.1.saturating_sub(self.flap_counters.1),
        );
        if lost > 0 || failed > 0 {
            tracing::warn!(
                lost,
                not_judged = failed,
                "MAC-flap detection: reports lost (ring buffer full) or updates it could not read"
            );
        }
        self.flap_counters = now;
    }

    /// A port of a protected bridge in `model`, with its bridge.
    fn port_of<'m>(
        &self,
        model: &'m Model,
        ifindex: u32,
    ) -> Option<(&'m LinkSnapshot, &'m LinkSnapshot)> {
        let port = model.link(ifindex)?;
        let bridge = model.link(port.master?)?;
        self.protected
            .contains(&bridge.name)
            .then_some((port, bridge))
    }

    fn frame_sighting(&self, r: &Received, model: &Model, now: Ktime) -> Option<Sighting> {
        let (port, bridge) = self.port_of(model, r.ifindex)?;
        let (other, evidence) = match frame::parse(&r.frame)? {
            Frame::Probe(p) => {
                if p.nonce != self.nonce || p.port_ifindex == r.ifindex {
                    return None; // Another agent's, or reflected by the device it was sent to.
                }
                let origin = model.link(p.port_ifindex)?;
                if p.bridge_ifindex != bridge.ifindex {
                    tracing::debug!(
                        "probe sent out of {} came back on {} of {}: a device joins two bridges",
                        origin.name,
                        port.name,
                        bridge.name
                    );
                    return None;
                }
                let rtt_us = now.saturating_sub(p.sent_ns) / 1000;
                (
                    Some((origin.ifindex, origin.name.clone())),
                    Evidence::Probe {
                        sent_on: origin.name.clone(),
                        rtt_us,
                    },
                )
            }
            Frame::Bpdu(b) => {
                // With kernel STP on, BPDUs are STP's business; with user-space STP the bridge
                // is left alone anyway.
                if bridge.stp != Some(StpMode::Off) {
                    return None;
                }
                let own = b.bridge.is_some() && b.bridge == bridge.bridge_id;
                let other = b
                    .port_id
                    .filter(|_| own)
                    .and_then(|id| {
                        model
                            .ports_of(bridge.ifindex)
                            .find(|p| p.stp_port.port_no == Some(id & 0x3ff))
                    })
                    .map(|p| (p.ifindex, p.name.clone()));
                (
                    other,
                    Evidence::Bpdu {
                        from: b.bridge,
                        own,
                    },
                )
            }
        };
        Some(Sighting {
            bridge: bridge.name.clone(),
            bridge_ifindex: bridge.ifindex,
            port: (port.ifindex, port.name.clone()),
            other,
            evidence,
            at: now,
        })
    }

    fn flap_sighting(&self, f: &Flap, model: &Model) -> Option<Sighting> {
        if f.mac == self.mac {
            return None; // Our own probes, coming back through a loop already seen.
        }
        let (port, bridge) = self.port_of(model, f.port_ifindex)?;
        if bridge.ifindex != f.bridge_ifindex || bridge.stp != Some(StpMode::Off) {
            return None;
        }
        let other = model
            .link(f.prev_ifindex)
            .filter(|p| p.master == Some(bridge.ifindex))
            .map(|p| (p.ifindex, p.name.clone()));
        Some(Sighting {
            bridge: bridge.name.clone(),
            bridge_ifindex: bridge.ifindex,
            port: (port.ifindex, port.name.clone()),
            other,
            evidence: Evidence::Flap {
                mac: mac_text(&f.mac),
                vid: f.vid,
                moves: f.moves,
            },
            at: f.ktime_ns,
        })
    }

    /// Sends a probe out of every oper-up port of `bridge_ifindex`.
    fn send_round(&mut self, bridge_ifindex: u32, model: &Model, now: Ktime) {
        // Socket drops are read on the periodic rounds only: a syscall per port.
        let periodic = self
            .next_round
            .get(&bridge_ifindex)
            .is_some_and(|at| *at <= now);
        self.next_round.insert(bridge_ifindex, now + PROBE_EVERY_NS);
        let Some(br) = model.link(bridge_ifindex) else {
            return;
        };
        let Some(dst) = br.address else {
            if self.warned.insert(bridge_ifindex) {
                tracing::warn!(bridge = %br.name, "no MAC address known for the bridge: not probing it");
            }
            return;
        };
        let mut sent = BTreeSet::new();
        for p in model.ports_of(bridge_ifindex).filter(|p| p.oper_up) {
            let watched = self.sockets.as_ref().is_some_and(|s| s.watching(p.ifindex));
            if !watched {
                // Cannot be probed: flap detection is what watches it, if anything does.
                if self.flaps.is_some() {
                    self.holds.clear_unprobed(p.ifindex);
                }
                continue;
            }
            self.seq = self.seq.wrapping_add(1);
            let probe = frame::Probe {
                nonce: self.nonce,
                bridge_ifindex,
                port_ifindex: p.ifindex,
                seq: self.seq,
                sent_ns: now,
            };
            let f = frame::probe(dst, self.mac, &probe);
            match self.sockets.as_ref().map(|s| s.send(p.ifindex, &f)) {
                Some(Ok(())) => {
                    sent.insert(p.ifindex);
                }
                Some(Err(e)) => tracing::debug!(port = %p.name, "probe not sent: {e}"),
                None => {}
            }
        }
        tracing::debug!(bridge = %br.name, ports = sent.len(), "probe round");
        self.holds.start_round(bridge_ifindex, sent, now);
        if let Some(s) = self.sockets.as_ref().filter(|_| periodic) {
            let drops = s.take_drops();
            if drops > 0 {
                tracing::warn!(
                    bridge = %br.name,
                    drops,
                    "loop protection's sockets dropped frames (a flood of BPDUs or probes)"
                );
            }
        }
    }

    /// The ports of the guarded bridges, and members to re-attach: both are judged by where
    /// they lead.
    fn judged<'m>(&'m self, model: &'m Model) -> impl Iterator<Item = &'m LinkSnapshot> {
        let ports = self
            .guarded
            .iter()
            .filter_map(|b| model.bridge(b))
            .flat_map(|b| model.ports_of(b.ifindex));
        let detached = self
            .guarded
            .iter()
            .flat_map(|b| model.members(b))
            .filter_map(|m| model.link_by_name(m))
            .filter(|l| l.master.is_none());
        ports.chain(detached)
    }

    /// A full reconcile: looks beyond this namespace again, and lists the ports netlink could
    /// not decode. The first time, also probes every port and waits for the round (20 ms), so
    /// that the first repair pass already knows which ports may be forced.
    ///
    /// `full`: also look beyond the namespace again and list undecodable ports (the start and
    /// the periodic reconcile); a resync after lost notifications skips that, so that a churn
    /// of links is not slowed further by it.
    pub async fn resync(&mut self, handle: &Handle, model: &Model, full: bool) -> Vec<Detection> {
        let mut detections = Vec::new();
        if !self.started {
            self.started = true;
            detections = self.update(model, monotonic_ns());
            while self.probing() {
                self.wait().await;
                detections.extend(self.update(model, monotonic_ns()));
            }
        }
        if !full {
            return detections;
        }
        let judged = self.judged(model).cloned().collect();
        self.peers.refresh_all(handle, judged).await;
        let guarded: BTreeSet<u32> = self.bridges(model).iter().map(|(b, _)| b.ifindex).collect();
        let listed = tokio::time::timeout(FETCH_TIMEOUT * 2, netlink::bridge_ports(handle)).await;
        match listed {
            Err(_) => tracing::debug!("no AF_BRIDGE port list: no answer"),
            Ok(Ok(ports)) => {
                self.undecoded.clear();
                for (port, bridge) in ports {
                    if !guarded.contains(&bridge) || model.link(port).is_some() {
                        continue;
                    }
                    // Not in the link dump: made since (its notification is on its way), gone
                    // since, or really undecodable; only a second, targeted request tells.
                    let asked =
                        tokio::time::timeout(FETCH_TIMEOUT, netlink::undecodable(handle, port));
                    if asked.await.unwrap_or(false) {
                        self.undecoded.entry(bridge).or_default().push(port);
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!("no AF_BRIDGE port list: {}", crate::error_chain(&e)),
        }
        detections
    }

    /// What the planner needs from loop protection and the checks beyond the model.
    pub fn context(&self, model: &Model) -> Context {
        let mut ctx = Context {
            stp_off_by_us: self.stp_off_by_us.clone(),
            remote: self
                .peers
                .remote()
                .into_iter()
                .chain(self.taps.iter().map(|(i, v)| (*i, v.clone())))
                .collect(),
            undecoded: self.undecoded.clone(),
            looking: self.looking.clone(),
            ..Context::default()
        };
        for (b, on) in self.bridges(model) {
            if !on {
                continue;
            }
            for p in model.ports_of(b.ifindex) {
                // A port nothing watches: no socket, and no flap detection to fall back on.
                if self.flaps.is_none() && p.oper_up {
                    let why = match &self.sockets {
                        None => self.no_sockets.clone(),
                        Some(s) => s.failure(p.ifindex).map(|e| format!("{}: {e}", p.name)),
                    };
                    if let Some(why) = why {
                        ctx.unprotected.entry(b.name.clone()).or_insert(why);
                    }
                }
                if let Some(v) = self.holds.verdict(p.ifindex) {
                    ctx.ports.insert(p.ifindex, v);
                }
            }
        }
        ctx
    }

    /// The holds on `bridge`, for `status`; `unix` converts the monotonic clock.
    pub fn status(&self, bridge: &str, unix: impl Fn(Ktime) -> u64) -> Vec<status::LoopHold> {
        self.holds
            .holds()
            .filter(|h| h.bridge == bridge)
            .map(|h| {
                let (phase, until) = match h.phase {
                    holds::Phase::Held { until } => ("held", Some(until)),
                    holds::Phase::Rechecking { until } => ("rechecking", Some(until)),
                    holds::Phase::Releasing => ("releasing", None),
                };
                status::LoopHold {
                    port: h.port.clone(),
                    phase: phase.to_owned(),
                    since_unix_ns: unix(h.since),
                    until_unix_ns: until.map(&unix),
                    evidence: h.evidence.to_string(),
                    evidence_kind: h.evidence.kind().to_owned(),
                    other: h.other.clone(),
                    sightings: h.sightings,
                }
            })
            .collect()
    }
}
