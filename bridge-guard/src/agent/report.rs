//! What the agent says: one line per port transition (bounded per port), per-port summaries,
//! the state `status` reads, and the metrics textfile.

use std::{collections::BTreeMap, sync::Arc};

use super::{Agent, actor_text};
use crate::{
    accounting::seconds,
    coalesce::Summary,
    event::PortState,
    exposition,
    model::{Ktime, Transition},
    status::{self, FightStatus, Status},
    sys::{
        clock::{monotonic_ns, wall_time},
        notify::Notifier,
    },
};

/// The line for transitions a port made past its log budget.
pub(super) fn log_coalesced(s: &Summary) {
    tracing::info!(
        bridge = %s.bridge,
        port = %s.port,
        count = s.suppressed,
        listening_ms = s.listening_ns / 1_000_000,
        "{} flapped {} more times in {:.1} s, listening {:.3} s in all (not logged one by one)",
        s.port,
        s.suppressed,
        seconds(s.over_ns),
        seconds(s.listening_ns)
    );
}

/// A monotonic time as Unix nanoseconds.
fn unix(t: Ktime) -> u64 {
    u64::try_from(
        wall_time(t)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    )
    .unwrap_or(0)
}

impl Agent {
    /// Notes transitions for accounting and logging, which happen after the repairs they call
    /// for are sent (`flush_transitions`); the cause is decided now, against the repairs that
    /// were in flight when the change arrived.
    pub(super) fn record_transitions(&mut self, transitions: &[Transition]) {
        for t in transitions {
            let cause = self.cause(t);
            self.unlogged.push((t.clone(), cause));
        }
    }

    pub(super) fn flush_transitions(&mut self) {
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
            let listened = match t.from {
                Some(PortState::Listening) => t.in_from_ns.unwrap_or(0),
                _ => 0,
            };
            if !self.lines.admit(&t.bridge, &t.port, t.at, listened) {
                continue;
            }
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
                outages = p.outages,
                longest_outage_ms = p.longest_outage_ns / 1_000_000,
                last_outage_ms = p.last_episode.as_ref().map(|e| e.duration_ns(now) / 1_000_000),
                repairs = p.repairs,
                "summary"
            );
        }
    }

    /// Sizes of everything the agent keeps per port or per repair, for memory checks.
    fn tables(&self) -> BTreeMap<String, usize> {
        let mut t: BTreeMap<String, usize> = self
            .model
            .sizes()
            .into_iter()
            .map(|(k, n)| (format!("model.{k}"), n))
            .collect();
        t.insert("accounting.ports".into(), self.acc().ports.len());
        t.insert("rate_limits".into(), self.limiter.len());
        t.insert("log_windows".into(), self.lines.len());
        t.insert("held".into(), self.held.len());
        t.insert("in_flight".into(), self.in_flight.len());
        t.insert("failures".into(), self.failures.len());
        t.insert(
            "notification_prints".into(),
            self.netlink.notifications.remembered(),
        );
        t
    }

    /// The state `status` shows.
    pub fn status(&self) -> Status {
        let now = monotonic_ns();
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
                    carrier: br.is_some_and(|b| self.model.bridge_carrier(b)),
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
                    stp_off_by_agent: self.loops.turned_stp_off(&g.bridge),
                    loops: self.loops.status(&g.bridge, unix),
                    ports: self
                        .model
                        .tracks()
                        .filter(|(_, t)| t.bridge == g.bridge)
                        .map(|(name, t)| self.port_status(name, t, now))
                        .collect(),
                    fights: self
                        .limiter
                        .fights()
                        .filter(|(k, _)| k.bridge == g.bridge)
                        .map(|(k, f)| FightStatus {
                            action: k.kind.to_owned(),
                            actor: f.actor.clone(),
                            count: f.repairs,
                            last_unix_ns: unix(f.last_repair),
                        })
                        .collect(),
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            updated_unix_ns: unix(now),
            hooks: self.hooks_summary(),
            observe: self.cfg.observe,
            heartbeat_secs: super::HEARTBEAT.as_secs(),
            bridges,
            tables: self.tables(),
        }
    }

    fn port_status(&self, name: &str, t: &crate::model::Track, now: Ktime) -> status::PortStatus {
        let acc = self.acc();
        let account = acc.ports.get(name);
        status::PortStatus {
            name: name.to_owned(),
            state: t.state.to_string(),
            since_unix_ns: unix(t.since),
            clock: format!("{:?}", t.clock).to_lowercase(),
            actor: t.actor.as_ref().map(ToString::to_string),
            last_outage_ns: account
                .and_then(|a| a.last_episode.as_ref())
                .map(|e| e.duration_ns(now)),
            last_episode: account.and_then(|a| a.last_episode.as_ref()).map(|e| {
                e.per_state_ns
                    .iter()
                    .map(|(s, ns)| (s.to_string(), *ns))
                    .collect()
            }),
            time_in_ns: account.map_or_else(Default::default, |a| {
                PortState::ALL
                    .iter()
                    .map(|s| (s.to_string(), a.ns_in(*s, now)))
                    .filter(|(_, ns)| *ns > 0)
                    .collect()
            }),
        }
    }

    /// Writes the state file (and the metrics textfile) if anything changed.
    pub fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Some(ev) = &self.events {
            self.acc().note_lost_total("ebpf", ev.lost());
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

    /// Sends the status line to systemd (STATUS=) now, and again whenever the state is
    /// published and the line changed.
    pub fn report_status_to(&mut self, notifier: Arc<Notifier>) {
        let line = self.status_line();
        if let Err(e) = notifier.status(&line) {
            tracing::warn!("cannot send systemd the status line: {e}");
        }
        self.status_to = Some((notifier, line));
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
}
