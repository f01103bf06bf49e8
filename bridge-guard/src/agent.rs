//! The agent: wires sources -> model -> planner -> actuator, and publishes its state.
//!
//! Every event is applied to the model and followed at once by a plan and its repairs, so a
//! fault is repaired as soon as the first source reports it. A repair in flight is not issued
//! again until the model confirms it or it times out; one undone again and again backs off.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    accounting::{Accounting, seconds},
    actuator,
    backoff::Backoff,
    event::{Actor, PortState},
    exposition, membership,
    model::{Ktime, Model, Transition},
    planner::{self, Action, Guard, Refusal},
    sources::{
        ebpf::{self, Probes, ring::EventStream},
        netlink::{self, LinkKind, Netlink, NetlinkError, NetlinkEvent},
    },
    status::{self, Status},
    sys::{
        clock::{monotonic_ns, wall_time},
        last_hour::LastHour,
        notify::Notifier,
    },
};

/// How long published state may lag the model: coalesces bursts of changes into one write.
const PUBLISH_DELAY: Duration = Duration::from_millis(5);

/// How long a repair may go unconfirmed before it may be issued again.
const CONFIRM_TIMEOUT_NS: u64 = 1_000_000_000;

#[derive(Clone, Debug)]
pub struct Config {
    pub guards: Vec<Guard>,
    /// Repair nothing; report everything.
    pub observe: bool,
    pub reconcile_every: Duration,
    pub libvirt_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Try eBPF hooks; without them, netlink alone.
    pub ebpf: bool,
    /// How often each port's summary is logged (also logged at shutdown).
    pub summary_every: Duration,
    /// A node_exporter textfile to keep up to date with the metrics.
    pub metrics_textfile: Option<PathBuf>,
    /// systemd's watchdog: pinged from the event loop, so a stuck loop gets the agent restarted.
    pub watchdog: Option<(Arc<Notifier>, Duration)>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("the netlink connection closed")]
    NetlinkClosed,
    #[error("reading the eBPF ring buffer")]
    Ring(#[source] std::io::Error),
}

/// A new configuration for the running agent (SIGHUP): what can change without dropping the
/// hooks or the model.
#[derive(Debug)]
pub struct Reload {
    pub guards: Vec<Guard>,
    pub observe: bool,
    pub libvirt_dir: PathBuf,
    /// Told the new status line once the reload is applied and its first repair pass done.
    pub done: tokio::sync::oneshot::Sender<String>,
}

struct Pending {
    action: Action,
    issued: Ktime,
    /// What was wrong, for the log line when it is confirmed.
    fault: String,
    outage_since: Option<Ktime>,
}

pub struct Agent {
    cfg: Config,
    model: Model,
    netlink: Netlink,
    probes: Option<Probes>,
    events: Option<EventStream>,
    backoff: Backoff,
    pending: BTreeMap<String, Pending>,
    /// Faults reported in observe-only mode, so each is logged once while it lasts.
    observed: BTreeSet<String>,
    refusals: Vec<Refusal>,
    logged_refusals: BTreeSet<Refusal>,
    repairs: BTreeMap<String, u64>,
    accounting: Arc<Mutex<Accounting>>,
    /// Ring-buffer losses already resynced for.
    lost_seen: u64,
    /// Transitions seen but not yet accounted and logged, with their cause.
    unlogged: Vec<(Transition, &'static str)>,
    dirty: bool,
    /// Our own pid, to recognise our repairs in eBPF's actors (`process::id` is a syscall).
    pid: u32,
    /// Repairs done in the last hour, for the status line.
    recent_repairs: LastHour,
    /// Where the status line goes (systemd's STATUS=), and the last one sent.
    status_to: Option<(Arc<Notifier>, String)>,
    /// Configuration reloads (see [`Agent::reloads`]).
    reloads: Option<tokio::sync::mpsc::Receiver<Reload>>,
}

/// Whether the eBPF hooks report every port-state change (the tracepoint tier sees only the
/// timer-driven ones).
fn complete_port_states(probes: &Probes) -> bool {
    matches!(
        probes.tier("port-state"),
        ebpf::hooks::Tier::Fentry | ebpf::hooks::Tier::Kprobe
    )
}

fn actor_text(a: Option<&Actor>) -> String {
    a.map_or_else(|| "unknown".to_owned(), ToString::to_string)
}

impl Agent {
    /// Opens netlink and, if asked, attaches the eBPF hooks (falling back to netlink alone
    /// with a warning when they cannot be had).
    pub fn start(cfg: Config) -> Result<Self, AgentError> {
        let netlink = Netlink::open()?;
        let mut probes = None;
        let mut events = None;
        if cfg.ebpf {
            let opts = ebpf::Options {
                netns: crate::sys::netns::current_inode().ok(),
                ..ebpf::Options::default()
            };
            match Probes::attach(&opts).and_then(|mut p| p.events().map(|e| (p, e))) {
                Ok((p, e)) => {
                    probes = Some(p);
                    events = Some(e);
                }
                Err(e) => tracing::warn!(
                    "running on netlink alone, without kernel timestamps or actors: {}",
                    crate::error_chain(&e)
                ),
            }
        }
        let mut model = Model::new(cfg.guards.iter().map(|g| g.bridge.clone()));
        model.trust_kernel_port_states(probes.as_ref().is_some_and(complete_port_states));
        // A restarted agent must not forget a tap detached while it was down: the previous
        // run's published ports are members until the kernel says otherwise.
        if let Ok(previous) = Status::read(&cfg.state_dir) {
            for b in &previous.bridges {
                for p in &b.ports {
                    model.remember(&b.name, &p.name);
                }
            }
        }
        Ok(Self {
            cfg,
            model,
            netlink,
            probes,
            events,
            backoff: Backoff::default(),
            pending: BTreeMap::new(),
            observed: BTreeSet::new(),
            refusals: Vec::new(),
            logged_refusals: BTreeSet::new(),
            repairs: BTreeMap::new(),
            accounting: Arc::new(Mutex::new(Accounting::default())),
            lost_seen: 0,
            unlogged: Vec::new(),
            pid: std::process::id(),
            dirty: true,
            recent_repairs: LastHour::default(),
            status_to: None,
            reloads: None,
        })
        .inspect(|agent| {
            let hooks = agent.probes.as_ref().map_or_else(Vec::new, |p| {
                p.hooks
                    .iter()
                    .map(|h| (h.hook.to_owned(), h.tier.to_string()))
                    .collect()
            });
            agent.acc().hooks = hooks;
        })
    }

    /// The accounting, shared with the metrics server.
    pub fn accounting(&self) -> Arc<Mutex<Accounting>> {
        Arc::clone(&self.accounting)
    }

    fn acc(&self) -> MutexGuard<'_, Accounting> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.accounting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `hook=tier ...`, or `netlink only`.
    pub fn hooks_summary(&self) -> String {
        self.probes
            .as_ref()
            .map_or_else(|| "netlink only".to_owned(), Probes::summary)
    }

    /// Sends the status line to systemd (STATUS=) now, and again whenever the state is
    /// published and the line changed.
    pub fn report_status_to(&mut self, notifier: Arc<Notifier>) {
        let line = self.status_line();
        if let Err(e) = notifier.status(&line) {
            tracing::warn!("cannot send systemd the status line: {e}");
        }
        self.status_to = Some((notifier, line));
    }

    /// Where to send configuration reloads; [`Agent::run`] applies them between events.
    pub fn reloads(&mut self) -> tokio::sync::mpsc::Sender<Reload> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        self.reloads = Some(rx);
        tx
    }

    /// Swaps the guarded bridges and their policy, keeping the hooks, the model's links and
    /// learned members (of bridges still guarded) and the accounting, then resyncs and repairs
    /// under the new policy.
    pub async fn reload(
        &mut self,
        guards: Vec<Guard>,
        observe: bool,
        libvirt_dir: PathBuf,
    ) -> Result<(), AgentError> {
        self.model
            .set_guarded(guards.iter().map(|g| g.bridge.clone()));
        self.cfg.guards = guards;
        self.cfg.observe = observe;
        self.cfg.libvirt_dir = libvirt_dir;
        // What is refused or only observed is said again under the new policy.
        self.observed.clear();
        self.logged_refusals.clear();
        self.dirty = true;
        self.resync().await
    }

    /// One line for systemd's STATUS=, e.g. "guarding virbr0: 3/3 forwarding, 2 repairs in the
    /// last hour".
    pub fn status_line(&self) -> String {
        let bridges: Vec<String> = self
            .cfg
            .guards
            .iter()
            .map(|g| {
                if self.model.bridge(&g.bridge).is_none() {
                    return format!("{}: absent", g.bridge);
                }
                let (mut ports, mut forwarding) = (0, 0);
                for (_, t) in self.model.tracks().filter(|(_, t)| t.bridge == g.bridge) {
                    ports += 1;
                    forwarding += usize::from(t.state == PortState::Forwarding);
                }
                let refused = if self.refusals.iter().any(|r| r.bridge == g.bridge) {
                    " (repairs refused)"
                } else {
                    ""
                };
                format!("{}: {forwarding}/{ports} forwarding{refused}", g.bridge)
            })
            .collect();
        let repairs = self.recent_repairs.count(monotonic_ns());
        format!(
            "guarding {}, {repairs} repair{} in the last hour{}",
            bridges.join("; "),
            if repairs == 1 { "" } else { "s" },
            if self.cfg.observe {
                "; observe-only"
            } else {
                ""
            }
        )
    }

    /// Rebuilds the model from a dump (and libvirt's XML), then repairs.
    pub async fn resync(&mut self) -> Result<(), AgentError> {
        let links = self.netlink.dump().await?;
        match netlink::mrp_bridges(&self.netlink.handle).await {
            Ok(mrp) => self.model.set_mrp(mrp),
            Err(e) => tracing::debug!("no MRP information: {}", crate::error_chain(&e)),
        }
        let transitions = self.model.reset(links, monotonic_ns());
        for (bridge, port) in membership::libvirt_ports(&self.cfg.libvirt_dir) {
            self.model.remember(&bridge, &port);
        }
        self.record_transitions(&transitions);
        self.reconcile(monotonic_ns()).await;
        Ok(())
    }

    /// Runs until `shutdown` completes.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval_at(
            Instant::now() + self.cfg.reconcile_every,
            self.cfg.reconcile_every,
        );
        let mut summary = tokio::time::interval_at(
            Instant::now() + self.cfg.summary_every,
            self.cfg.summary_every,
        );
        let mut watchdog = self
            .cfg
            .watchdog
            .as_ref()
            .map(|(n, every)| (Arc::clone(n), tokio::time::interval(*every)));
        let mut batch = Vec::new();
        let mut notices = Vec::new();
        let mut publish_at: Option<Instant> = None;
        loop {
            let now = monotonic_ns();
            let wake = self
                .backoff
                .next_wakeup(now)
                .into_iter()
                .chain(self.pending.values().map(|p| p.issued + CONFIRM_TIMEOUT_NS))
                .min()
                .map(|t| Instant::now() + Duration::from_nanos(t.saturating_sub(now)));
            let ebpf_next = async {
                match self.events.as_mut() {
                    Some(ev) => ev.next_batch(&mut batch).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = ebpf_next => r.map_err(AgentError::Ring)?,
                ev = netlink::next_event(&mut self.netlink.notifications) => {
                    notices.push(ev.ok_or(AgentError::NetlinkClosed)?);
                }
                _ = tick.tick() => self.resync().await?,
                Some(r) = async {
                    match self.reloads.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reload(r.guards, r.observe, r.libvirt_dir).await?;
                    let _ = r.done.send(self.status_line());
                }
                () = async {
                    match publish_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    publish_at = None;
                    self.publish();
                    continue;
                }
                _ = summary.tick() => self.log_summary(),
                () = async {
                    match watchdog.as_mut() {
                        Some((_, every)) => drop(every.tick().await),
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((n, _)) = &watchdog {
                        if let Err(e) = n.watchdog() {
                            tracing::warn!("cannot ping systemd's watchdog: {e}");
                        }
                    }
                    continue;
                }
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            // A repair's latency counts from here: the moment the agent heard of the fault.
            let woke = monotonic_ns();
            // Plan on the kernel's latest word: whatever either source already queued is
            // applied before any repair is chosen (a bridge going down is a burst, each port
            // then the bridge, and eBPF usually tells of the ports before netlink of the
            // bridge). eBPF first: it reports a change as it happens, netlink after it.
            // One turn of the scheduler first: woken by the ring buffer, this task runs before
            // the netlink connection's task has read the socket it shares a wakeup with.
            tokio::task::yield_now().await;
            if let Some(ev) = self.events.as_mut() {
                ev.drain(&mut batch);
            }
            while let Ok((msg, _)) = self.netlink.notifications.try_recv() {
                notices.extend(netlink::decode(&msg));
            }
            if !batch.is_empty() {
                *self.acc().events.entry("ebpf").or_default() += batch.len() as u64;
                // Events the kernel could not queue mean the model may have missed a change.
                let lost = self.events.as_ref().map_or(0, EventStream::lost);
                if lost > self.lost_seen {
                    tracing::warn!(
                        lost = lost - self.lost_seen,
                        "eBPF events were lost (ring buffer full): resyncing from a dump"
                    );
                    self.lost_seen = lost;
                    self.acc().ringbuf_lost = lost;
                    self.resync().await?;
                }
            }
            for ev in batch.drain(..) {
                match ev {
                    Ok(ev) => {
                        tracing::debug!(%ev, "kernel event");
                        let t = self.model.apply_kernel(&ev);
                        self.record_transitions(&t);
                    }
                    Err(e) => tracing::warn!("undecodable eBPF event: {e}"),
                }
            }
            let mut overrun = false;
            for ev in notices.drain(..) {
                match ev {
                    NetlinkEvent::Overrun => overrun = true,
                    ev => self.apply_netlink(ev),
                }
            }
            if overrun {
                tracing::warn!("netlink notifications were lost (ENOBUFS): resyncing from a dump");
                self.resync().await?;
            }
            self.reconcile(woke).await;
            // Publishing (state file, textfile) waits a little and coalesces: it must never
            // sit between a fault's notifications and their repair.
            if self.dirty && publish_at.is_none() {
                publish_at = Some(Instant::now() + PUBLISH_DELAY);
            }
        }
        if let Some(ev) = &self.events {
            let lost = ev.lost();
            if lost > 0 {
                tracing::warn!(lost, "eBPF events lost because the ring buffer was full");
            }
        }
        self.flush_transitions();
        self.log_summary();
        self.dirty = true;
        self.publish();
        Ok(())
    }

    /// One line per guarded port: time in each state, episodes, repairs.
    pub fn log_summary(&self) {
        let now = monotonic_ns();
        let acc = self.acc();
        for (port, p) in &acc.ports {
            let secs = |s: PortState| format!("{:.3}", seconds(p.ns_in(s, now)));
            tracing::info!(
                port = %port,
                bridge = %p.bridge,
                state = p.state.as_str(),
                forwarding_s = %secs(PortState::Forwarding),
                listening_s = %secs(PortState::Listening),
                learning_s = %secs(PortState::Learning),
                blocking_s = %secs(PortState::Blocking),
                disabled_s = %secs(PortState::Disabled),
                detached_s = %secs(PortState::Detached),
                outages = p.outages.count,
                longest_outage_ms = p.longest_outage_ns / 1_000_000,
                last_outage_ms = p.last_episode.as_ref().map(|e| e.duration_ns(now) / 1_000_000),
                repairs = p.repairs,
                "summary"
            );
        }
    }

    fn apply_netlink(&mut self, ev: NetlinkEvent) {
        *self.acc().events.entry("netlink").or_default() += 1;
        if matches!(&ev, NetlinkEvent::Link(l) if l.kind == LinkKind::Bridge) {
            self.retry_probes();
        }
        let t = self.model.apply_netlink(ev, monotonic_ns());
        self.record_transitions(&t);
    }

    /// A bridge appeared: if that loaded the bridge module, better hooks may attach now.
    fn retry_probes(&mut self) {
        let Some(probes) = self.probes.as_mut() else {
            return;
        };
        match probes.retry_after_bridge_module() {
            Ok(None) => {}
            Ok(Some(changed)) => {
                let hooks: Vec<(String, String)> = probes
                    .hooks
                    .iter()
                    .map(|h| (h.hook.to_owned(), h.tier.to_string()))
                    .collect();
                let summary = probes.summary();
                let complete = complete_port_states(probes);
                self.model.trust_kernel_port_states(complete);
                self.acc().hooks = hooks;
                self.dirty = true;
                if changed.is_empty() {
                    tracing::info!("bridge module loaded; no better hook attaches ({summary})");
                } else {
                    tracing::info!("bridge module loaded: {} ({summary})", changed.join(", "));
                }
            }
            Err(e) => tracing::warn!(
                "re-attaching hooks after the bridge module loaded: {}",
                crate::error_chain(&e)
            ),
        }
    }

    /// Why a transition happened, for logs: the STP timer, one of our repairs, or someone else.
    fn cause(&self, t: &Transition) -> &'static str {
        let ours = self.pid;
        match &t.actor {
            Some(Actor::StpTimer) => "stp_timer",
            Some(Actor::Task { pid, .. }) if *pid == ours => "repair",
            _ if self.pending.values().any(|p| match &p.action {
                Action::Forward { port, .. } => *port == t.port && t.to == PortState::Forwarding,
                Action::Enslave { port, .. } => {
                    *port == t.port && t.from == Some(PortState::Detached)
                }
                Action::BridgeUp { bridge, .. } | Action::StpOff { bridge, .. } => {
                    *bridge == t.bridge
                }
            }) =>
            {
                "repair"
            }
            Some(Actor::Task { .. }) => "external",
            None => "unknown",
        }
    }

    /// Notes transitions for accounting and logging, which happen after the repairs they call
    /// for are sent (`flush_transitions`); the cause is decided now, against the repairs that
    /// were pending when the change arrived.
    fn record_transitions(&mut self, transitions: &[Transition]) {
        for t in transitions {
            let cause = self.cause(t);
            self.unlogged.push((t.clone(), cause));
        }
    }

    fn flush_transitions(&mut self) {
        for (t, cause) in std::mem::take(&mut self.unlogged) {
            let t = &t;
            self.dirty = true;
            let listening_ns = {
                let mut acc = self.acc();
                acc.on_transition(t);
                // Listening time of the episode this transition belongs to (ended or not).
                acc.ports
                    .get(&t.port)
                    .map_or(0, |p| match (&p.episode, &p.last_episode) {
                        (Some(_), _) => p.episode_listening_ns(t.at),
                        (None, Some(ep)) if ep.end == Some(t.at) => ep
                            .per_state_ns
                            .get(&PortState::Listening)
                            .copied()
                            .unwrap_or(0),
                        _ => 0,
                    })
            };
            tracing::info!(
                bridge = %t.bridge,
                port = %t.port,
                from = t.from.map_or("none", PortState::as_str),
                to = t.to.as_str(),
                listening_ms = listening_ns / 1_000_000,
                in_from_ms = t.in_from_ns.map(|n| n / 1_000_000),
                outage_ms = t.outage_ns.map(|n| n / 1_000_000),
                cause,
                actor = %actor_text(t.actor.as_ref()),
                clock = ?t.clock,
                "port state"
            );
        }
    }

    /// What is wrong that `action` repairs, for logs.
    fn fault(&self, action: &Action) -> (String, Option<Ktime>) {
        match action {
            Action::BridgeUp { bridge, .. } => (format!("{bridge} is administratively down"), None),
            Action::StpOff { bridge, .. } => (
                format!(
                    "kernel STP is on on {bridge} (turned on by {})",
                    actor_text(self.model.stp_actor.get(bridge))
                ),
                None,
            ),
            Action::Enslave { bridge, port, .. } | Action::Forward { bridge, port, .. } => {
                let track = self.model.track(port);
                let state = track.map_or("unknown", |t| t.state.as_str());
                (
                    format!(
                        "{bridge} {port} is {state} (by {})",
                        actor_text(track.and_then(|t| t.actor.as_ref()))
                    ),
                    track.and_then(|t| t.outage_since),
                )
            }
        }
    }

    /// Plans and applies the repairs the model calls for.
    async fn reconcile(&mut self, woke: Ktime) {
        self.repair(woke).await;
        self.flush_transitions();
    }

    /// `woke`: when the agent heard of what it now repairs; repair latency counts from there.
    async fn repair(&mut self, woke: Ktime) {
        let now = monotonic_ns();
        self.confirm(now);
        {
            let mut acc = self
                .accounting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for g in &self.cfg.guards {
                let br = self.model.bridge(&g.bridge);
                acc.on_bridge(
                    &g.bridge,
                    br.is_some(),
                    br.is_some_and(|b| b.carrier),
                    br.and_then(|b| b.stp),
                    now,
                );
            }
        }
        let plan = planner::plan(&self.model, &self.cfg.guards);
        for r in &plan.refusals {
            if self.logged_refusals.insert(r.clone()) {
                tracing::warn!(bridge = %r.bridge, "refused: {}", r.reason);
            }
        }
        if plan.refusals != self.refusals {
            self.refusals.clone_from(&plan.refusals);
            self.dirty = true;
        }
        if self.cfg.observe {
            let keys: BTreeSet<String> = plan.actions.iter().map(Action::key).collect();
            for a in &plan.actions {
                if !self.observed.contains(&a.key()) {
                    tracing::warn!("observe-only: would {a}: {}", self.fault(a).0);
                }
            }
            self.observed = keys;
            return;
        }
        let mut todo = Vec::new();
        for action in plan.actions {
            let key = action.key();
            if self.pending.contains_key(&key) || self.backoff.wait_until(&key, now).is_some() {
                continue;
            }
            let (fault, outage_since) = self.fault(&action);
            todo.push((key, action, fault, outage_since));
        }
        if todo.is_empty() {
            return;
        }
        // Every request goes out before the first acknowledgement is awaited: one socket, so
        // the kernel still takes them in plan order (STP off before a port is forced), and a
        // recreated bridge's ports cost one round trip, not one each.
        let issued = monotonic_ns();
        let handle = self.netlink.handle.clone();
        let results = futures::future::join_all(
            todo.iter()
                .map(|(_, action, _, _)| actuator::apply(&handle, action)),
        )
        .await;
        let acked = monotonic_ns();
        for ((key, action, fault, outage_since), result) in todo.into_iter().zip(results) {
            match result {
                Ok(actuator::Applied::Stale(fresh)) => {
                    tracing::debug!("not applied, the kernel moved on: {action}");
                    let t = self
                        .model
                        .apply_netlink(NetlinkEvent::Link(fresh), monotonic_ns());
                    self.record_transitions(&t);
                }
                Ok(actuator::Applied::Done) => {
                    self.acc().on_repair(
                        action.bridge(),
                        action.port(),
                        action.kind(),
                        true,
                        acked.saturating_sub(woke),
                    );
                    *self.repairs.entry(action.bridge().to_owned()).or_default() += 1;
                    self.recent_repairs.record(acked);
                    self.dirty = true;
                    let delay = self.backoff.record(&key, issued);
                    if !delay.is_zero() {
                        tracing::warn!(
                            "backing off: {action} again in {delay:?} — something keeps undoing it ({fault})"
                        );
                    }
                    self.pending.insert(
                        key,
                        Pending {
                            action,
                            issued,
                            fault,
                            outage_since,
                        },
                    );
                }
                // The device went away under the repair (a bridge being deleted takes its
                // ports with it): nothing was undone, so nothing to back off from; the
                // notifications on their way will say what is left to do.
                Err(e) if e.errno() == Some(libc::ENODEV) => {
                    tracing::info!("repair overtaken: {}: {fault}", crate::error_chain(&e));
                }
                Err(e) => {
                    self.acc()
                        .on_repair(action.bridge(), action.port(), action.kind(), false, 0);
                    let delay = self.backoff.record(&key, issued);
                    tracing::error!(
                        "repair failed: {}: {fault}; next try in {delay:?} at the earliest",
                        crate::error_chain(&e)
                    );
                }
            }
        }
    }

    /// Logs and forgets repairs the model shows done, and those that timed out.
    fn confirm(&mut self, now: Ktime) {
        let model = &self.model;
        self.pending.retain(|_, p| {
            if p.action.done(model) {
                let outage = p.outage_since.map_or_else(String::new, |t| {
                    format!("; out for {:.3} ms", (now.saturating_sub(t)) as f64 / 1e6)
                });
                tracing::info!(
                    bridge = p.action.bridge(),
                    action = p.action.kind(),
                    latency_us = now.saturating_sub(p.issued) / 1000,
                    "repaired: {}: {}{outage}",
                    p.action,
                    p.fault
                );
                false
            } else if now.saturating_sub(p.issued) > CONFIRM_TIMEOUT_NS {
                tracing::warn!(
                    "repair not confirmed within 1 s: {} ({})",
                    p.action,
                    p.fault
                );
                false
            } else {
                true
            }
        });
    }

    /// The state `status` shows.
    pub fn status(&self) -> Status {
        let unix = |t: Ktime| {
            u64::try_from(
                wall_time(t)
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            )
            .unwrap_or(0)
        };
        let bridges = self
            .cfg
            .guards
            .iter()
            .map(|g| {
                let br = self.model.bridge(&g.bridge);
                status::BridgeStatus {
                    name: g.bridge.clone(),
                    present: br.is_some(),
                    admin_up: br.is_some_and(|b| b.admin_up),
                    carrier: br.is_some_and(|b| b.carrier),
                    stp: br
                        .and_then(|b| b.stp)
                        .map_or_else(String::new, |s| s.to_string()),
                    refusals: self
                        .refusals
                        .iter()
                        .filter(|r| r.bridge == g.bridge)
                        .map(|r| r.reason.clone())
                        .collect(),
                    repairs: self.repairs.get(&g.bridge).copied().unwrap_or(0),
                    ports: self
                        .model
                        .tracks()
                        .filter(|(_, t)| t.bridge == g.bridge)
                        .map(|(name, t)| {
                            let acc = self.acc();
                            let account = acc.ports.get(name);
                            let now = monotonic_ns();
                            status::PortStatus {
                                name: name.clone(),
                                state: t.state.to_string(),
                                since_unix_ns: unix(t.since),
                                clock: format!("{:?}", t.clock).to_lowercase(),
                                actor: t.actor.as_ref().map(ToString::to_string),
                                last_outage_ns: account
                                    .and_then(|a| a.last_episode.as_ref())
                                    .map(|e| e.duration_ns(now)),
                                last_episode: account.and_then(|a| a.last_episode.as_ref()).map(
                                    |e| {
                                        e.per_state_ns
                                            .iter()
                                            .map(|(s, ns)| (s.to_string(), *ns))
                                            .collect()
                                    },
                                ),
                                time_in_ns: account.map_or_else(Default::default, |a| {
                                    PortState::ALL
                                        .iter()
                                        .map(|s| (s.to_string(), a.ns_in(*s, now)))
                                        .filter(|(_, ns)| *ns > 0)
                                        .collect()
                                }),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            updated_unix_ns: unix(monotonic_ns()),
            hooks: self.hooks_summary(),
            observe: self.cfg.observe,
            bridges,
        }
    }

    /// Writes the state file if anything changed.
    pub fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Some(ev) = &self.events {
            self.acc().ringbuf_lost = ev.lost();
        }
        if let Some(path) = &self.cfg.metrics_textfile {
            if let Err(e) = exposition::write_textfile(path, &self.acc()) {
                tracing::warn!("cannot write the metrics textfile {}: {e}", path.display());
            }
        }
        // STATUS= first: whoever sees the new state file can count on systemd having it.
        let line = self.status_line();
        if let Some((notifier, sent)) = &mut self.status_to {
            if *sent != line {
                if let Err(e) = notifier.status(&line) {
                    tracing::warn!("cannot send systemd the status line: {e}");
                }
                *sent = line;
            }
        }
        if let Err(e) = self.status().write(&self.cfg.state_dir) {
            tracing::warn!("{}", crate::error_chain(&e));
        }
    }
}
