//! The agent: wires sources -> model -> planner -> actuator, and publishes its state.
//!
//! One loop gathers news (ring buffer, netlink notifications, answers to repair requests,
//! timers) and [`Agent::step`] turns it into the next repairs, top to bottom. Every fault is
//! repaired as soon as the first source reports it, and again every time it comes back, up to a
//! bounded rate (`rate`). Requests are never awaited in the loop: a plan's requests go out
//! together as one future whose answers are news like any other, each bounded by a timeout.
//!
//! - `polls`: links whose notifications flood with copies, muffled in the kernel and polled;
//! - `repair`: planning, sending, answers, fights;
//! - `report`: transition logs, summaries, `status`, publishing.

mod polls;
mod repair;
mod report;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::{StreamExt as _, stream::FuturesUnordered};
use tokio::time::Instant;

use crate::{
    accounting::Accounting,
    coalesce::Coalescer,
    event::{Actor, DecodeError, KernelEvent},
    loop_guard::{LoopGuard, holds::Detection},
    membership,
    model::{Ktime, Model, Transition},
    planner::{self, Action, Guard, Refusal},
    rate::{self, RateLimiter},
    sources::{
        ebpf::{
            self, Probes,
            ring::{self, EventStream},
        },
        netlink::{self, LinkKind, Netlink, NetlinkError, NetlinkEvent},
    },
    status::Status,
    sys::{clock::monotonic_ns, last_hour::LastHour, notify::Notifier},
};

use self::{
    polls::{Polled, Polls, Taken},
    repair::Requests,
};

/// How long published state may lag the model: coalesces bursts of changes into one write.
const PUBLISH_DELAY: Duration = Duration::from_millis(5);
/// The least time between two writes of published state: a fight changes the model every
/// millisecond, and a state file rewritten 200 times a second costs more than the fight's
/// repairs (every write is a create, a write and a rename).
const PUBLISH_GAP: Duration = Duration::from_millis(50);
/// How often the state file is rewritten even when nothing changed: `status` judges a state
/// file older than a few of these as left by an agent that is not running.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// Notifications taken per turn: bounded, so that a flood leaves timers their turn.
const NETLINK_BATCH: usize = 4096;
/// How soon a resync that failed is tried again.
const RESYNC_RETRY: Duration = Duration::from_secs(1);
/// How long after a loss (or an inconsistent dump) a second resync is taken.
const FOLLOW_UP: Duration = Duration::from_millis(500);

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
    #[error("reading link notifications")]
    Notifications(#[source] std::io::Error),
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
    /// Told the new status line once the reload is applied: resynced, and its repairs sent.
    pub done: tokio::sync::oneshot::Sender<String>,
}

pub struct Agent {
    cfg: Config,
    model: Model,
    netlink: Netlink,
    probes: Option<Probes>,
    events: Option<EventStream>,
    /// Repair rate limits and fights.
    limiter: RateLimiter,
    /// Repairs sent and not answered yet, by key.
    in_flight: BTreeMap<String, Action>,
    /// The futures of those requests, one per plan.
    requests: FuturesUnordered<Requests>,
    /// Repairs the plan wants that wait for a rate-limit slot: key -> (slot key, since when).
    held: BTreeMap<String, (rate::Key, Ktime)>,
    /// Repair failures being counted instead of logged: key -> (count, when last logged).
    failures: BTreeMap<String, (u64, Ktime)>,
    /// Faults reported in observe-only mode, so each is logged once while it lasts.
    observed: BTreeSet<String>,
    refusals: Vec<Refusal>,
    repairs: BTreeMap<String, u64>,
    accounting: Arc<Mutex<Accounting>>,
    /// Ring-buffer losses already resynced for.
    lost_seen: u64,
    /// eBPF events came since the loss counter was last read.
    lost_unchecked: bool,
    /// Transitions seen but not yet accounted and logged, with their cause.
    unlogged: Vec<(Transition, &'static str)>,
    /// Bounds the transition lines each port may log.
    lines: Coalescer,
    dirty: bool,
    /// Our own pid, to recognise our repairs in eBPF's actors (`process::id` is a syscall).
    pid: u32,
    /// A resync is due, and why.
    resync_due: Option<&'static str>,
    /// A resync due later, and why: a failed one tried again, or the follow-up of a loss
    /// (drops go on unreported while the socket stays congested, so the dump taken at once
    /// may miss some: another is taken once things calm down).
    resync_later: Option<(Instant, &'static str)>,
    /// Loop protection, and what the planner needs from beyond the model.
    loops: LoopGuard,
    /// Repairs done in the last hour, for the status line.
    recent_repairs: LastHour,
    /// Where the status line goes (systemd's STATUS=), and the last one sent.
    status_to: Option<(Arc<Notifier>, String)>,
    /// Configuration reloads (see [`Agent::reloads`]).
    reloads: Option<tokio::sync::mpsc::Receiver<Reload>>,
    /// Links muffled for a flood of copies, polled instead.
    polls: Polls,
    /// Repairs of muffled links, answered by the kernel, waiting for a poll to show their
    /// effect: link, when answered, the answer.
    awaiting_poll: Vec<(u32, Ktime, repair::Answer)>,
    /// The muffled link a poll brought fresh news of this turn, and why it was polled: a
    /// repair of it was planned on that news, whatever else the turn heard (its own
    /// notifications are dropped; those of its ports, set off by the same change, are not).
    polled_now: Option<(String, polls::Why)>,
}

/// Whether the eBPF hooks report every port-state change (the tracepoint tier sees only the
/// timer-driven ones).
fn complete_port_states(probes: &Probes) -> bool {
    matches!(
        probes.tier("port-state"),
        ebpf::hooks::Tier::Fentry | ebpf::hooks::Tier::Kprobe
    )
}

/// Whether eBPF reports every join and leave: both hooks on fentry or kprobe.
fn complete_membership(probes: &Probes) -> bool {
    ["join", "leave"].iter().all(|hook| {
        matches!(
            probes.tier(hook),
            ebpf::hooks::Tier::Fentry | ebpf::hooks::Tier::Kprobe
        )
    })
}

fn actor_text(a: Option<&Actor>) -> String {
    a.map_or_else(|| "unknown".to_owned(), ToString::to_string)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Opens netlink and, if asked, attaches the eBPF hooks (falling back to netlink alone
    /// with a warning when they cannot be had).
    pub fn start(cfg: Config) -> Result<Self, AgentError> {
        crate::sys::memory::map_large_allocations();
        let mut netlink = Netlink::open()?;
        netlink.notifications.muffle_floods();
        let polls = Polls::new(netlink.handle.clone());
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
        let mut loops = LoopGuard::new(
            &cfg.guards,
            probes.as_mut(),
            cfg.observe,
            netlink.handle.clone(),
        );
        let mut model = Model::new(cfg.guards.iter().map(|g| g.bridge.clone()));
        model.trust_kernel_port_states(probes.as_ref().is_some_and(complete_port_states));
        model.trust_kernel_membership(probes.as_ref().is_some_and(complete_membership));
        // A restarted agent must not forget a tap detached while it was down: the previous
        // run's published ports are members until the kernel says otherwise.
        if let Ok(previous) = Status::read(&cfg.state_dir) {
            for b in &previous.bridges {
                for p in &b.ports {
                    model.remember(&b.name, &p.name);
                }
                if b.stp_off_by_agent {
                    loops.restore_stp_off(&b.name);
                }
            }
        }
        let agent = Self {
            cfg,
            model,
            netlink,
            probes,
            events,
            limiter: RateLimiter::default(),
            in_flight: BTreeMap::new(),
            requests: FuturesUnordered::new(),
            held: BTreeMap::new(),
            failures: BTreeMap::new(),
            observed: BTreeSet::new(),
            refusals: Vec::new(),
            repairs: BTreeMap::new(),
            accounting: Arc::new(Mutex::new(Accounting::new())),
            lost_seen: 0,
            lost_unchecked: false,
            unlogged: Vec::new(),
            lines: Coalescer::default(),
            pid: std::process::id(),
            dirty: true,
            resync_due: None,
            resync_later: None,
            loops,
            recent_repairs: LastHour::default(),
            status_to: None,
            reloads: None,
            polled_now: None,
            polls,
            awaiting_poll: Vec::new(),
        };
        let hooks = agent.probes.as_ref().map_or_else(Vec::new, |p| {
            p.hooks
                .iter()
                .map(|h| (h.hook.to_owned(), h.tier.to_string()))
                .collect()
        });
        {
            let mut acc = agent.acc();
            acc.hooks = hooks;
            // Every guarded bridge's series exist from the start, at zero.
            acc.guard(agent.cfg.guards.iter().map(|g| g.bridge.as_str()));
            acc.observe = agent.cfg.observe;
        }
        Ok(agent)
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

    /// The first pass: a consistent picture from a dump, and the repairs it calls for, sent
    /// and answered (each bounded by its timeout). After it, every present port of every
    /// guarded bridge is known: what "ready" means.
    pub async fn start_up(&mut self) -> Result<(), AgentError> {
        self.resync("start").await?;
        let now = monotonic_ns();
        self.step(now, "resync");
        self.flush_transitions();
        while let Some(answers) = self.requests.next().await {
            let acked = monotonic_ns();
            let trigger = self.gather(&mut Vec::new(), &mut Vec::new());
            self.take_answers(answers, acked);
            self.step(acked, trigger.unwrap_or("resync"));
            self.flush_transitions();
        }
        self.publish();
        Ok(())
    }

    /// Rebuilds the model from a consistent dump (and libvirt's XML). What either source had
    /// queued is older than the dump: it is applied first, and the dump corrects it.
    async fn resync(&mut self, reason: &'static str) -> Result<(), AgentError> {
        self.gather(&mut Vec::new(), &mut Vec::new());
        let asked = monotonic_ns();
        let dump = netlink::dump(&self.netlink.handle).await?;
        if !dump.consistent {
            tracing::info!(
                reason,
                "every link dump was interrupted by concurrent changes: using the last one, and \
                 dumping again in {FOLLOW_UP:?}"
            );
            self.resync_in(FOLLOW_UP, "inconsistent_dump");
        }
        let links = dump.links;
        self.netlink.notifications.forget_seen();
        match netlink::mrp_bridges(&self.netlink.handle).await {
            Ok(mrp) => self.model.set_mrp(mrp),
            Err(e) => tracing::debug!("no MRP information: {}", crate::error_chain(&e)),
        }
        // Before the reset, so that the ports libvirt names are tracked (and published) from
        // this dump on, detached ones too: ready means every port is known. Each interface also
        // carries what `bridge_guard_port_info` shows (domain, MAC).
        let dirs = membership::LibvirtDirs::new(&self.cfg.libvirt_dir);
        let interfaces = membership::libvirt_interfaces(&dirs);
        for i in &interfaces {
            self.model.remember(&i.bridge, &i.dev);
        }
        // libvirt's bridges, left to libvirt while it builds them again (`net-start`).
        let networks = membership::libvirt_network_bridges(&dirs);
        self.model
            .note_built_by_owner(networks.iter().map(String::as_str));
        let transitions = self.model.reset_from_dump(links, asked, monotonic_ns());
        {
            let mut acc = self.acc();
            acc.port_info = interfaces
                .into_iter()
                .filter(|i| self.model.track(&i.dev).is_some())
                .map(|i| {
                    let info = crate::accounting::PortInfo {
                        domain: i.domain,
                        mac: i.mac,
                    };
                    (i.dev, info)
                })
                .collect();
        }
        self.record_transitions(&transitions);
        // The dump may have dropped ports whose deletion was among lost news: forget them now,
        // not at the next news, which may be a long time coming.
        self.forget_gone();
        let full = matches!(reason, "start" | "periodic");
        let found = self
            .loops
            .resync(&self.netlink.handle, &self.model, full)
            .await;
        self.account_loops(&found);
        self.acc().on_resync(reason);
        tracing::debug!(reason, "resynced from a dump");
        Ok(())
    }

    /// Where to send configuration reloads; [`Agent::run`] applies them between events.
    pub fn reloads(&mut self) -> tokio::sync::mpsc::Sender<Reload> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        self.reloads = Some(rx);
        tx
    }

    /// Swaps the guarded bridges and their policy, keeping the hooks, the model's links and
    /// learned members (of bridges still guarded) and the accounting; a resync follows, and
    /// the repairs the new policy calls for.
    fn reload(&mut self, guards: Vec<Guard>, observe: bool, libvirt_dir: PathBuf) {
        self.model
            .set_guarded(guards.iter().map(|g| g.bridge.clone()));
        self.acc().guard(guards.iter().map(|g| g.bridge.as_str()));
        self.acc().observe = observe;
        self.loops
            .reconfigure(&guards, observe, self.probes.as_mut());
        self.cfg.guards = guards;
        self.cfg.observe = observe;
        self.cfg.libvirt_dir = libvirt_dir;
        // What is refused or only observed is said again under the new policy.
        self.observed.clear();
        self.refusals.clear();
        self.dirty = true;
        self.request_resync("reload");
    }

    fn request_resync(&mut self, reason: &'static str) {
        self.resync_due.get_or_insert(reason);
    }

    /// Asks for a resync `after` from now (replacing one asked for earlier).
    fn resync_in(&mut self, after: Duration, reason: &'static str) {
        self.resync_later = Some((Instant::now() + after, reason));
    }

    /// Runs until `shutdown` completes.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut reconcile = tokio::time::interval_at(
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
        let mut published = Instant::now();
        // The state file's timestamp is the agent's heartbeat for `status`.
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        let mut reloaded = None;
        loop {
            let wake = self.next_wakeup();
            let mut answers = None;
            let mut polled = None;
            let ebpf_next = async {
                match self.events.as_mut() {
                    Some(ev) => ev.next_batch(&mut batch, ring::BATCH).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                // Housekeeping first: each is cheap and rarely due, and a flood of events
                // must not starve it.
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
                () = sleep_until(publish_at) => {
                    publish_at = None;
                    published = Instant::now();
                    self.publish();
                    continue;
                }
                _ = summary.tick() => {
                    self.log_summary();
                    continue;
                }
                _ = heartbeat.tick() => {
                    self.dirty = true;
                    published = Instant::now();
                    self.publish();
                    // What a burst (a flood, thousands of taps) made the heap grow by goes
                    // back to the system, off the hot path.
                    crate::sys::memory::trim();
                    continue;
                }
                _ = reconcile.tick() => self.request_resync("periodic"),
                Some(r) = async {
                    match self.reloads.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reload(r.guards, r.observe, r.libvirt_dir);
                    reloaded = Some(r.done);
                }
                Some(a) = self.requests.next(), if !self.requests.is_empty() => answers = Some(a),
                Some(p) = self.polls.next(), if !self.polls.is_empty() => polled = Some(p),
                r = ebpf_next => r.map_err(AgentError::Ring)?,
                ev = self.netlink.notifications.recv() => {
                    notices.push(ev.map_err(AgentError::Notifications)?);
                }
                () = self.loops.wait() => {}
                () = sleep_until(wake) => {}
            }
            // A repair's latency counts from here: the moment the agent heard of the fault.
            let woke = monotonic_ns();
            // One turn of the scheduler first: woken by the ring buffer, this task runs before
            // the netlink connection's task has read the socket it shares a wakeup with.
            tokio::task::yield_now().await;
            let news = self.gather(&mut batch, &mut notices);
            if let Some(a) = answers {
                self.take_answers(a, woke);
            }
            let polled = self.tend_polls(polled);
            if let Some((at, reason)) = self.resync_later {
                if at <= Instant::now() {
                    self.resync_later = None;
                    self.request_resync(reason);
                }
            }
            let resynced = self.resync_due.is_some();
            if let Some(reason) = self.resync_due.take() {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    r = self.resync(reason) => if let Err(e) = r {
                        tracing::warn!("resync ({reason}) failed, retrying in {RESYNC_RETRY:?}: {}", crate::error_chain(&e));
                        self.resync_in(RESYNC_RETRY, "retry");
                    },
                }
            }
            let sent = self.step(
                woke,
                news.or(polled)
                    .unwrap_or(if resynced { "resync" } else { "timer" }),
            );
            if sent {
                // The connection's task sends the plan's requests in this yield (the kernel
                // applies each inside its `sendto`); the turn's log lines and accounting come
                // after, off the repair's path.
                tokio::task::yield_now().await;
            }
            self.check_counters();
            self.flush_transitions();
            if let Some(done) = reloaded.take() {
                let _ = done.send(self.status_line());
            }
            // Publishing (state file, textfile) waits a little and coalesces: it must never
            // sit between a fault's notifications and their repair.
            if self.dirty && publish_at.is_none() {
                publish_at = Some((Instant::now() + PUBLISH_DELAY).max(published + PUBLISH_GAP));
            }
        }
        self.shut_down();
        Ok(())
    }

    /// When the loop must wake up although no news came: a held repair's slot, a fight or a
    /// log summary due, a resync to retry.
    fn next_wakeup(&self) -> Option<Instant> {
        let now = monotonic_ns();
        let at = self
            .limiter
            .next_slot(self.held.values().map(|(key, _)| key), now)
            .into_iter()
            .chain(self.limiter.next_tick())
            .chain(self.lines.next_due())
            .chain(planner::settle_deadline(&self.model, now))
            .min()
            .map(|t| Instant::now() + Duration::from_nanos(t.saturating_sub(now)));
        // A resync asked for after the turn's plan (a loss found then) runs at once.
        let resync_now = self.resync_due.map(|_| Instant::now());
        at.into_iter()
            .chain(resync_now)
            .chain(self.resync_later.map(|(t, _)| t))
            .chain(self.polls.next_due())
            .chain(self.netlink.notifications.next_release())
            .min()
    }

    /// Muffled links: a poll's answer applied (the turn's news, returned), releases due made
    /// (each polled once, after the filter let its notifications through again), due polls
    /// sent.
    fn tend_polls(&mut self, polled: Option<Polled>) -> Option<repair::Trigger> {
        let mut news = None;
        self.polled_now = None;
        match polled.map(|p| self.polls.take(p)) {
            Some(Taken::Fresh(link, why)) => {
                let ifindex = link.ifindex;
                self.polled_now = Some((link.name.clone(), why));
                let t = self
                    .model
                    .apply_netlink(NetlinkEvent::Link(link), monotonic_ns());
                self.record_transitions(&t);
                self.take_awaiting_poll(ifindex);
                news = Some(why);
            }
            Some(Taken::Nothing(ifindex)) => self.take_awaiting_poll(ifindex),
            Some(Taken::Stale) | None => {}
        }
        for (ifindex, copies) in self.netlink.notifications.take_floods() {
            let name = self
                .model
                .link(ifindex)
                .map_or_else(|| format!("link {ifindex}"), |l| l.name.clone());
            tracing::info!(
                link = %name,
                copies,
                "notifications of {name} flood with copies ({copies} in {:?}): dropped in the \
                 kernel while the flood lasts, and {name} polled every {:?} instead",
                crate::sources::notifications::FLOOD_WINDOW,
                polls::POLL_EVERY
            );
        }
        let now = Instant::now();
        let released = self.netlink.notifications.release_due(now);
        self.polls.follow(self.netlink.notifications.muffled(), now);
        for l in released {
            tracing::debug!(ifindex = l, "a muffled link's notifications are read again");
            self.polls.ask(l, "release");
        }
        self.polls.ask_due(now);
        news
    }

    /// Takes the news both sources queued (bounded per turn) and applies it: eBPF first, as
    /// it tells of a change as it happens and netlink after it. Says whose news came first:
    /// what a repair planned next is triggered by.
    fn gather(
        &mut self,
        batch: &mut Vec<Result<KernelEvent, DecodeError>>,
        notices: &mut Vec<NetlinkEvent>,
    ) -> Option<repair::Trigger> {
        if let Some(ev) = self.events.as_mut() {
            ev.drain(batch, ring::BATCH);
        }
        // Bounded per turn; what is left waits in the kernel's buffer (a flood overflows it
        // into a resync rather than into the agent's memory).
        while notices.len() < NETLINK_BATCH {
            match self.netlink.notifications.try_recv() {
                Ok(Some(ev)) => notices.push(ev),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("reading link notifications: {e}; resyncing from a dump");
                    self.request_resync("netlink_overrun");
                    break;
                }
            }
        }
        let news = match (batch.is_empty(), notices.is_empty()) {
            (false, _) => Some("ebpf"),
            (true, false) => Some("netlink"),
            (true, true) => None,
        };
        if !batch.is_empty() {
            *self.acc().events.entry("ebpf").or_default() += batch.len() as u64;
            self.lost_unchecked = true;
        }
        for ev in batch.drain(..) {
            match ev {
                Ok(ev) => {
                    tracing::debug!(%ev, "kernel event");
                    self.polls.touched(ev.bridge_ifindex);
                    self.polls.touched(ev.port_ifindex);
                    let t = self.model.apply_kernel(&ev);
                    self.record_transitions(&t);
                }
                Err(e) => tracing::warn!("undecodable eBPF event: {e}"),
            }
        }
        // Fresh STP fields loop protection fetched: news like any notification.
        for l in self.loops.take_fresh() {
            let t = self
                .model
                .apply_netlink(NetlinkEvent::Link(l), monotonic_ns());
            self.record_transitions(&t);
        }
        for ev in notices.drain(..) {
            match ev {
                NetlinkEvent::Overrun => {
                    tracing::warn!(
                        "netlink notifications were lost (ENOBUFS): resyncing from a dump"
                    );
                    self.acc().on_lost("netlink", 1);
                    self.request_resync("netlink_overrun");
                    self.resync_in(FOLLOW_UP, "follow_up");
                }
                ev => self.apply_netlink(ev),
            }
        }
        self.forget_gone();
        news
    }

    /// What is read from the kernel's counters once a turn's repairs went out: reading a
    /// per-CPU map is a few system calls, which a repair must not wait behind.
    ///
    /// Events the ring buffer could not queue mean the model may have missed a change: the
    /// resync asked for runs before the loop sleeps again, and anything planned meanwhile was
    /// planned from news that was true when it came (a repair checks what it changes).
    fn check_counters(&mut self) {
        if std::mem::take(&mut self.lost_unchecked) {
            let lost = self.events.as_ref().map_or(0, EventStream::lost);
            if lost > self.lost_seen {
                tracing::warn!(
                    lost = lost - self.lost_seen,
                    "eBPF events were lost (ring buffer full): resyncing from a dump"
                );
                self.lost_seen = lost;
                self.acc().note_lost_total("ebpf", lost);
                self.request_resync("ebpf_lost");
                self.resync_in(FOLLOW_UP, "follow_up");
            }
        }
        self.loops.check_flap_counters(monotonic_ns());
    }

    fn apply_netlink(&mut self, ev: NetlinkEvent) {
        *self.acc().events.entry("netlink").or_default() += 1;
        if let NetlinkEvent::Link(l) = &ev {
            if l.kind == LinkKind::Bridge {
                self.retry_probes();
                if !l.admin_up
                    && self.model.link(l.ifindex).is_none()
                    && self.model.is_guarded(&l.name)
                    && !self.model.is_built_by_owner(&l.name)
                {
                    // A guarded bridge appearing down: is it libvirt starting a network the
                    // agent has not seen running yet? Its status file says so.
                    let dirs = membership::LibvirtDirs::new(&self.cfg.libvirt_dir);
                    let networks = membership::libvirt_network_bridges(&dirs);
                    self.model
                        .note_built_by_owner(networks.iter().map(String::as_str));
                }
            }
        }
        let t = self.model.apply_netlink(ev, monotonic_ns());
        self.record_transitions(&t);
    }

    /// Forgets what is kept per port for ports the model no longer tracks: bounded memory and
    /// series under any churn of taps.
    fn forget_gone(&mut self) {
        let gone = self.model.take_forgotten();
        if gone.is_empty() {
            return;
        }
        // Their last transitions are accounted before they go.
        self.flush_transitions();
        let now = monotonic_ns();
        for port in gone {
            tracing::debug!(port, "no longer tracked: forgetting it");
            self.acc().forget_port(&port);
            self.limiter.forget_port(&port);
            if let Some(s) = self.lines.forget(&port, now) {
                report::log_coalesced(&s);
            }
            self.dirty = true;
        }
    }

    /// Counts ports loop protection took out of forwarding.
    fn account_loops(&mut self, found: &[Detection]) {
        for d in found {
            self.acc()
                .on_loop_detected(&d.bridge, &d.port, d.evidence.kind());
            self.dirty = true;
        }
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
                self.model
                    .trust_kernel_membership(complete_membership(probes));
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

    /// At shutdown: what is in flight is abandoned (the kernel applies or refuses it on its
    /// own), every open summary is logged, and the state is published one last time.
    fn shut_down(&mut self) {
        if let Some(ev) = &self.events {
            let lost = ev.lost();
            if lost > 0 {
                tracing::warn!(lost, "eBPF events lost because the ring buffer was full");
            }
        }
        if !self.in_flight.is_empty() {
            tracing::info!(
                "stopping with {} repair(s) unanswered: {}",
                self.in_flight.len(),
                self.in_flight
                    .values()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.flush_transitions();
        for s in self.lines.flush(monotonic_ns()) {
            report::log_coalesced(&s);
        }
        self.log_summary();
        self.dirty = true;
        self.publish();
    }
}
