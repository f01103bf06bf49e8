//! Planning and sending repairs, and what their answers say.
//!
//! A plan's repairs go out together, in plan order, without waiting: one future per plan,
//! answered later as news. A repair already in flight is not sent again. Each repair kind may
//! run again as often as its fault comes back, up to the rate limit; a repair held for a slot
//! is sent when the slot comes, if the plan still wants it.

use std::collections::BTreeSet;

use futures::{
    FutureExt as _,
    future::{BoxFuture, join_all},
};

use super::{Agent, actor_text, report};
use crate::{
    actuator::{self, ActuatorError, Applied},
    event::{PortState, StpMode},
    model::{Ktime, Transition},
    planner::{self, Action},
    rate::{self, Report},
    sys::clock::monotonic_ns,
};

/// How often a repair that keeps failing the same way is logged.
const FAILURE_LOG_EVERY_NS: u64 = 10_000_000_000;

/// Whose news a repair was planned on, for its log line: `ebpf` when the turn held eBPF
/// events (applied first), else `netlink`; `poll` or `release` (a muffled link fetched, see
/// `polls`) when neither had news, or for a repair of the link polled; `resync` (a dump) or
/// `timer` (a held repair's slot, an answer) when none had.
pub(super) type Trigger = &'static str;

/// A repair sent, with what it is for.
pub(super) struct Sent {
    action: Action,
    key: String,
    trigger: Trigger,
    /// When it was planned (CLOCK_MONOTONIC), for the log line.
    planned: Ktime,
    /// What was wrong, for the log line.
    fault: String,
    outage_since: Option<Ktime>,
    /// When the agent heard of the fault: repair latency counts from there.
    woke: Ktime,
}

pub(super) type Answer = (Sent, Result<Applied, ActuatorError>);

/// The requests of one plan, answered together.
pub(super) type Requests = BoxFuture<'static, Vec<Answer>>;

/// What the rate limit counts a repair as.
fn rate_key(action: &Action) -> rate::Key {
    rate::Key {
        bridge: action.bridge().to_owned(),
        kind: action.kind(),
        port: action.port().map(str::to_owned),
    }
}

/// A repair in words, for fight reports and `status`.
pub(super) fn describe(key: &rate::Key) -> String {
    let (b, p) = (&key.bridge, key.port.as_deref().unwrap_or("?"));
    match key.kind {
        "stp_off" => format!("turning STP off on {b}"),
        "bridge_up" => format!("setting {b} up"),
        "reattach" => format!("re-attaching {p} to {b}"),
        "force_forwarding" => format!("forcing {b} {p} to forwarding"),
        "loop_hold_down" => format!("taking {b} {p} out of forwarding for a loop"),
        "stp_on" => format!("turning STP back on on {b}"),
        other => format!("{other} on {b}"),
    }
}

fn by(actor: Option<&str>) -> String {
    actor.map_or_else(String::new, |a| format!(" (by {a})"))
}

impl Agent {
    /// One turn's work once the news is in: what is due (fight reports, log summaries), the
    /// plan and the repairs it calls for, handed to the netlink connection without waiting.
    /// Whether any were: the caller lets the connection send them before the transitions are
    /// accounted and logged (`flush_transitions`).
    pub(super) fn step(&mut self, woke: Ktime, trigger: Trigger) -> bool {
        let now = monotonic_ns();
        self.limiter
            .set_flood(self.netlink.notifications.flooding());
        for r in self.limiter.tick(now) {
            self.report_fight(&r);
        }
        for s in self.lines.due(now) {
            report::log_coalesced(&s);
        }
        self.account_bridges(now);
        self.repair(woke, now, trigger)
    }

    fn account_bridges(&self, now: Ktime) {
        let mut acc = self.acc();
        for g in &self.cfg.guards {
            let br = self.model.bridge(&g.bridge);
            acc.on_bridge(
                &g.bridge,
                br.is_some(),
                br.is_some_and(|b| self.model.bridge_carrier(b)),
                br.and_then(|b| b.stp),
                now,
            );
        }
    }

    /// Plans and hands the plan's repairs to the connection; whether there were any.
    fn repair(&mut self, woke: Ktime, now: Ktime, trigger: Trigger) -> bool {
        // Loop protection first: what it saw decides which ports may forward.
        let found = self.loops.update(&self.model, now);
        self.account_loops(&found);
        let ctx = self.loops.context(&self.model);
        let plan = planner::plan_at(&self.model, &self.cfg.guards, &ctx, now);
        for r in &plan.refusals {
            if !self.refusals.contains(r) {
                tracing::warn!(bridge = %r.bridge, "refused: {}", r.reason);
            }
        }
        if plan.refusals != self.refusals {
            self.refusals.clone_from(&plan.refusals);
            self.dirty = true;
            let mut acc = self.acc();
            for g in &self.cfg.guards {
                let n = self
                    .refusals
                    .iter()
                    .filter(|r| r.bridge == g.bridge)
                    .count();
                acc.set_refusals(&g.bridge, n as u64);
            }
        }
        if self.cfg.observe {
            let keys: BTreeSet<String> = plan.actions.iter().map(Action::key).collect();
            for a in &plan.actions {
                if !self.observed.contains(&a.key()) {
                    tracing::warn!("observe-only: would {a}: {}", self.fault(a).0);
                }
            }
            self.observed = keys;
            return false;
        }
        let wanted: BTreeSet<String> = plan.actions.iter().map(Action::key).collect();
        self.held.retain(|k, _| wanted.contains(k));
        self.failures.retain(|k, _| wanted.contains(k));
        // Bridges whose STP-off leaves before any port is forced: forcing a port while kernel
        // STP runs is refused (EBUSY), so it only goes behind one, on the same socket.
        let mut stp_off_sent: BTreeSet<String> = self
            .in_flight
            .values()
            .filter_map(|a| match a {
                Action::StpOff { bridge, .. } => Some(bridge.clone()),
                _ => None,
            })
            .collect();
        let mut batch = Vec::new();
        for action in plan.actions {
            let key = action.key();
            if self.in_flight.contains_key(&key) {
                continue;
            }
            if let Action::Forward { bridge, .. } = &action {
                if self.model.stp(bridge) == Some(StpMode::Kernel) && !stp_off_sent.contains(bridge)
                {
                    continue;
                }
            }
            let rk = rate_key(&action);
            if self.limiter.wait_until(&rk, now).is_some() {
                if !self.held.contains_key(&key) {
                    self.acc().on_rate_limited(action.bridge(), action.kind());
                }
                self.held.entry(key).or_insert((rk, now));
                continue;
            }
            let waited = self.held.remove(&key).is_some();
            let undoer = self.undoer(&action);
            if let Some(r) = self.limiter.record(&rk, now, waited, undoer) {
                self.report_fight(&r);
            }
            if let Action::StpOff { bridge, .. } = &action {
                stp_off_sent.insert(bridge.clone());
            }
            let (fault, outage_since) = self.fault(&action);
            self.in_flight.insert(key.clone(), action.clone());
            let trigger = match &self.polled_now {
                Some((link, why)) if action.port().unwrap_or(action.bridge()) == link => *why,
                _ => trigger,
            };
            batch.push(Sent {
                action,
                key,
                trigger,
                planned: now,
                fault,
                outage_since,
                woke,
            });
        }
        if batch.is_empty() {
            return false;
        }
        let handle = self.netlink.handle.clone();
        let mut requests: Requests = Box::pin(async move {
            // join_all polls its futures in order: the requests leave in plan order on one
            // socket, so the kernel takes them in that order, and none waits for another's
            // answer (a recreated bridge's ports cost one round trip, not one each).
            let results = join_all(batch.iter().map(|s| actuator::apply(&handle, &s.action))).await;
            batch.into_iter().zip(results).collect()
        });
        // Polled once now, so that the requests are queued on the connection before this turn
        // logs anything; the next poll, from the loop, registers the loop's waker. Answered at
        // once it cannot be (the connection's task has not run), but if it were, the answers
        // wait for the loop like any other.
        match (&mut requests).now_or_never() {
            Some(answers) => self.requests.push(Box::pin(std::future::ready(answers))),
            None => self.requests.push(requests),
        }
        true
    }

    /// What the kernel answered. The notifications a repair caused were queued before its
    /// answer and have been applied, so the model already shows whether it took; for a muffled
    /// link, which has none, the answer waits for a poll.
    pub(super) fn take_answers(&mut self, answers: Vec<Answer>, acked: Ktime) {
        for (sent, result) in answers {
            if matches!(result, Ok(Applied::Done)) {
                if let Some(ifindex) = self.muffled_link_of(&sent.action) {
                    // No notification shows what it did: answered once a poll does, in flight
                    // (not planned again) until then. A poll already out is older news.
                    self.polls.touched(ifindex);
                    self.polls.ask(ifindex, "poll");
                    self.awaiting_poll.push((ifindex, acked, (sent, result)));
                    continue;
                }
            }
            self.take_answer(&sent, result, acked);
        }
    }

    /// The link a repair changes (the port, for port repairs), if it is muffled.
    fn muffled_link_of(&self, action: &Action) -> Option<u32> {
        let name = action.port().unwrap_or(action.bridge());
        self.model
            .link_by_name(name)
            .map(|l| l.ifindex)
            .filter(|i| self.polls.muffled(*i))
    }

    /// The answers that waited for a poll of `ifindex`, taken now that the model has it.
    pub(super) fn take_awaiting_poll(&mut self, ifindex: u32) {
        let (due, rest) = std::mem::take(&mut self.awaiting_poll)
            .into_iter()
            .partition(|(i, ..)| *i == ifindex);
        self.awaiting_poll = rest;
        for (_, acked, (sent, result)) in due {
            self.take_answer(&sent, result, acked);
        }
    }

    fn take_answer(&mut self, sent: &Sent, result: Result<Applied, ActuatorError>, acked: Ktime) {
        self.in_flight.remove(&sent.key);
        let action = &sent.action;
        let rk = rate_key(action);
        let quiet = !self.limiter.fighting(&rk);
        match result {
            Ok(Applied::Done) => {
                self.loops.applied(action);
                self.acc().on_repair(
                    action.bridge(),
                    action.port(),
                    action.kind(),
                    true,
                    acked.saturating_sub(sent.woke),
                );
                *self.repairs.entry(action.bridge().to_owned()).or_default() += 1;
                self.recent_repairs.record(acked);
                self.failures.remove(&sent.key);
                self.dirty = true;
                if !action.done(&self.model) {
                    tracing::debug!("{action}: acknowledged, and undone again already");
                } else if quiet {
                    let outage = sent.outage_since.map_or_else(String::new, |t| {
                        format!("; out for {:.3} ms", acked.saturating_sub(t) as f64 / 1e6)
                    });
                    tracing::info!(
                        bridge = action.bridge(),
                        action = action.kind(),
                        latency_us = acked.saturating_sub(sent.woke) / 1000,
                        trigger = sent.trigger,
                        planned_ns = sent.planned,
                        "repaired: {action}: {}{outage}",
                        sent.fault
                    );
                } else {
                    tracing::debug!(
                        latency_us = acked.saturating_sub(sent.woke) / 1000,
                        out_us = sent.outage_since.map(|t| acked.saturating_sub(t) / 1000),
                        trigger = sent.trigger,
                        "repaired again: {action}: {}",
                        sent.fault
                    );
                }
            }
            // The port has a master again (`ip link set P master OTHER` detaches it for a
            // moment). Not applied to the model: this answer may be older than the
            // notifications already applied, and the one for that master is on its way.
            Ok(Applied::Stale(fresh)) => {
                tracing::debug!(
                    "not applied, the kernel moved on: {action} ({} has master {:?})",
                    fresh.name,
                    fresh.master
                );
            }
            // The device went away under the repair (a bridge being deleted takes its
            // ports with it): the notifications on their way say what is left to do.
            Err(e) if e.errno() == Some(libc::ENODEV) => {
                // In a fight (a bridge recreated back to back), once per fight report.
                if quiet {
                    tracing::info!(
                        "repair overtaken: {}: {}",
                        crate::error_chain(&e),
                        sent.fault
                    );
                } else {
                    tracing::debug!(
                        "repair overtaken: {}: {}",
                        crate::error_chain(&e),
                        sent.fault
                    );
                }
            }
            // STP came back on between the STP-off and this: the plan sends STP-off again
            // first.
            Err(e) if e.errno() == Some(libc::EBUSY) && action.kind() == "force_forwarding" => {
                tracing::debug!(
                    "repair overtaken by STP turned on again: {}",
                    crate::error_chain(&e)
                );
            }
            Err(e) if e.timed_out() => {
                tracing::warn!(
                    "{}: abandoned; resyncing from a dump",
                    crate::error_chain(&e)
                );
                self.acc().on_unconfirmed(action.bridge(), action.kind());
                self.request_resync("request_timeout");
            }
            Err(e) => {
                self.acc()
                    .on_repair(action.bridge(), action.port(), action.kind(), false, 0);
                self.log_failure(sent, &e, acked);
            }
        }
    }

    /// Logs a failed repair: at once the first time, then once per interval with a count, so
    /// a repair the kernel keeps refusing cannot flood the log.
    fn log_failure(&mut self, sent: &Sent, e: &ActuatorError, now: Ktime) {
        let (count, logged) = self.failures.entry(sent.key.clone()).or_insert((0, 0));
        *count += 1;
        if *logged != 0 && now.saturating_sub(*logged) < FAILURE_LOG_EVERY_NS {
            return;
        }
        let again = if *count > 1 {
            format!(" ({count} times since it was last logged)")
        } else {
            String::new()
        };
        *count = 0;
        *logged = now;
        tracing::error!(
            "repair failed: {}: {}{again}; trying again when it is needed, at most {}/s",
            crate::error_chain(e),
            sent.fault,
            rate::RATE_PER_SEC
        );
    }

    fn report_fight(&mut self, r: &Report) {
        self.dirty = true;
        let what =
            |f: &rate::BridgeFight| f.keys.iter().map(describe).collect::<Vec<_>>().join(", ");
        match r {
            Report::Started { bridge, fight } => {
                for k in &fight.keys {
                    self.acc().on_fight(&k.bridge, k.kind);
                }
                tracing::warn!(
                    bridge = %bridge,
                    actor = fight.actor.as_deref().unwrap_or("unknown"),
                    "fight: something keeps undoing {}{}; repairing it every time, at most {}/s \
                     for each repair",
                    what(fight),
                    by(fight.actor.as_deref()),
                    rate::RATE_PER_SEC
                );
            }
            Report::Joined { key } => {
                self.acc().on_fight(&key.bridge, key.kind);
                tracing::debug!("{} joins the fight on {}", describe(key), key.bridge);
            }
            Report::Ongoing { bridge, fight } => tracing::warn!(
                bridge = %bridge,
                actor = fight.actor.as_deref().unwrap_or("unknown"),
                count = fight.unreported,
                "fight goes on: {} repairs in the last {} s ({}){}",
                fight.unreported,
                rate::FIGHT_REPORT_EVERY / 1_000_000_000,
                what(fight),
                by(fight.actor.as_deref())
            ),
            Report::Ended { bridge, fight } => tracing::info!(
                bridge = %bridge,
                actor = fight.actor.as_deref().unwrap_or("unknown"),
                count = fight.repairs,
                "fight over: {} repairs in {:.1} s ({}){}",
                fight.repairs,
                fight.last_repair.saturating_sub(fight.started) as f64 / 1e9,
                what(fight),
                by(fight.actor.as_deref())
            ),
        }
    }

    /// Who undid what `action` repairs, where eBPF knows.
    fn undoer(&self, action: &Action) -> Option<String> {
        match action {
            Action::StpOff { bridge, .. } => self.model.stp_actor.get(bridge),
            Action::Forward { port, .. }
            | Action::Enslave { port, .. }
            | Action::HoldDown { port, .. } => {
                self.model.track(port).and_then(|t| t.actor.as_ref())
            }
            Action::BridgeUp { .. } | Action::StpOn { .. } => None,
        }
        .map(ToString::to_string)
    }

    /// Why a transition happened, for logs: the STP timer, one of our repairs, or someone else.
    pub(super) fn cause(&self, t: &Transition) -> &'static str {
        use crate::event::Actor;
        match &t.actor {
            Some(Actor::StpTimer) => "stp_timer",
            Some(Actor::Task { pid, .. }) if *pid == self.pid => "repair",
            _ if self.in_flight.values().any(|a| match a {
                Action::Forward { port, .. } => *port == t.port && t.to == PortState::Forwarding,
                Action::Enslave { port, .. } => {
                    *port == t.port && t.from == Some(PortState::Detached)
                }
                Action::HoldDown { port, .. } => *port == t.port,
                Action::BridgeUp { bridge, .. }
                | Action::StpOff { bridge, .. }
                | Action::StpOn { bridge, .. } => *bridge == t.bridge,
            }) =>
            {
                "repair"
            }
            Some(Actor::Task { .. }) => "external",
            None => "unknown",
        }
    }

    /// What is wrong that `action` repairs, for logs, and since when its port is out.
    pub(super) fn fault(&self, action: &Action) -> (String, Option<Ktime>) {
        match action {
            Action::BridgeUp { bridge, .. } => (format!("{bridge} is administratively down"), None),
            Action::StpOff { bridge, .. } => (
                format!(
                    "kernel STP is on on {bridge} (turned on by {})",
                    actor_text(self.model.stp_actor.get(bridge))
                ),
                None,
            ),
            Action::StpOn { bridge, .. } => (
                format!("a NIC or tunnel joined {bridge} after bridge-guard turned its STP off"),
                None,
            ),
            Action::Enslave { bridge, port, .. }
            | Action::Forward { bridge, port, .. }
            | Action::HoldDown { bridge, port, .. } => {
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
}
