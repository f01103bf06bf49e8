//! Bounded logs for port transitions: each port's lines are logged as they happen, up to
//! [`PER_WINDOW`] in a [`WINDOW_NS`] window; past that they are counted and summarised once when
//! the window ends ("vnet0 flapped 812 times in 10 s, listening 0.3 s in all"), so a port
//! flapping at kHz cannot flood journald.

use std::collections::BTreeMap;

use crate::model::Ktime;

/// Lines a port may log per window before its transitions are summarised instead.
pub const PER_WINDOW: u32 = 20;
pub const WINDOW_NS: u64 = 10_000_000_000;

#[derive(Clone, Debug)]
struct Window {
    bridge: String,
    start: Ktime,
    logged: u32,
    suppressed: u64,
    listening_ns: u64,
}

/// Transitions of one port that were not logged one by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub bridge: String,
    pub port: String,
    pub suppressed: u64,
    /// The window's length so far.
    pub over_ns: u64,
    /// Time spent listening in the suppressed transitions.
    pub listening_ns: u64,
}

#[derive(Debug, Default)]
pub struct Coalescer {
    ports: BTreeMap<String, Window>,
}

impl Coalescer {
    /// Whether a transition of `port` at `now` is logged; if not it is counted, with the
    /// listening time it ended (`listening_ns`).
    pub fn admit(&mut self, bridge: &str, port: &str, now: Ktime, listening_ns: u64) -> bool {
        let w = self.ports.entry(port.to_owned()).or_insert_with(|| Window {
            bridge: bridge.to_owned(),
            start: now,
            logged: 0,
            suppressed: 0,
            listening_ns: 0,
        });
        if w.logged < PER_WINDOW {
            w.logged += 1;
            return true;
        }
        w.suppressed += 1;
        w.listening_ns += listening_ns;
        false
    }

    /// Summaries of windows that ended by `now`; ended windows are forgotten.
    pub fn due(&mut self, now: Ktime) -> Vec<Summary> {
        let mut out = Vec::new();
        self.ports.retain(|port, w| {
            if now.saturating_sub(w.start) < WINDOW_NS {
                return true;
            }
            if w.suppressed > 0 {
                out.push(summary(port, w, now));
            }
            false
        });
        out
    }

    /// When [`Coalescer::due`] next has something to do.
    pub fn next_due(&self) -> Option<Ktime> {
        self.ports.values().map(|w| w.start + WINDOW_NS).min()
    }

    /// Forgets a port that is gone; its summary, if it has one to give.
    pub fn forget(&mut self, port: &str, now: Ktime) -> Option<Summary> {
        let w = self.ports.remove(port)?;
        (w.suppressed > 0).then(|| summary(port, &w, now))
    }

    /// Every summary still open (at shutdown).
    pub fn flush(&mut self, now: Ktime) -> Vec<Summary> {
        std::mem::take(&mut self.ports)
            .into_iter()
            .filter(|(_, w)| w.suppressed > 0)
            .map(|(port, w)| summary(&port, &w, now))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

fn summary(port: &str, w: &Window, now: Ktime) -> Summary {
    Summary {
        bridge: w.bridge.clone(),
        port: port.to_owned(),
        suppressed: w.suppressed,
        over_ns: now.saturating_sub(w.start),
        listening_ns: w.listening_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_flapping_port_logs_a_few_lines_then_one_summary_per_window() {
        let mut c = Coalescer::default();
        let mut logged = 0;
        for i in 0..1000 {
            if c.admit("br0", "vnet0", i * MS, MS / 2) {
                logged += 1;
            }
        }
        assert_eq!(logged, PER_WINDOW);
        assert!(c.due(5_000 * MS).is_empty(), "window still open");
        let s = c.due(WINDOW_NS);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suppressed, 1000 - u64::from(PER_WINDOW));
        assert_eq!(s[0].listening_ns, s[0].suppressed * MS / 2);
        assert!(c.is_empty());
        // A new window logs again.
        assert!(c.admit("br0", "vnet0", WINDOW_NS + 1, 0));
    }

    #[test]
    fn quiet_ports_have_nothing_to_summarise_and_gone_ports_are_forgotten() {
        let mut c = Coalescer::default();
        assert!(c.admit("br0", "vnet0", 0, 0));
        assert!(c.due(WINDOW_NS).is_empty());
        for i in 0..u64::from(PER_WINDOW) + 10 {
            c.admit("br0", "vnet1", i, 0);
        }
        let s = c.forget("vnet1", 20).expect("summary");
        assert_eq!((s.suppressed, s.over_ns), (10, 20));
        assert!(c.is_empty());
        assert_eq!(c.next_due(), None);
    }
}
