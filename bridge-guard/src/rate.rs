//! Repair rate limits and fights.
//!
//! A fault that keeps coming back is repaired every time: each repair (per bridge, repair kind
//! and port) may run [`RATE_PER_SEC`] times a second indefinitely, after a burst of [`BURST`].
//! Only above that rate does a repair wait, and only until its next slot (at most
//! `1 / RATE_PER_SEC`), never longer. Slots are kept with GCRA (a token bucket held as one
//! timestamp per key), so an idle key costs nothing and is forgotten.
//!
//! Something that undoes a repair again and again is a *fight*: it is reported when it starts,
//! once per [`FIGHT_REPORT_EVERY`] while it lasts (count and actor), and when it ends; the
//! individual repairs of a fight are not logged one by one.

use std::collections::BTreeMap;

use crate::model::Ktime;

/// Repairs a second each key may make, indefinitely.
pub const RATE_PER_SEC: u64 = 25;
/// Repairs each key may make at once before the rate applies.
pub const BURST: u64 = 10;
/// Slot spacing.
const INTERVAL_NS: u64 = 1_000_000_000 / RATE_PER_SEC;
/// A repair needed again within this time of the previous one repeats it.
const REPEAT_NS: u64 = 1_000_000_000;
/// Repeats in a row that make a fight.
const FIGHT_AFTER: u32 = 2;
/// A fight is over once its repair was not needed for this long.
const FIGHT_QUIET_NS: u64 = 2_000_000_000;
/// How often an ongoing fight is reported.
pub const FIGHT_REPORT_EVERY: u64 = 10_000_000_000;

/// What is rate-limited: one repair kind on one bridge (and port, for port repairs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub bridge: String,
    pub kind: &'static str,
    pub port: Option<String>,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.port {
            Some(p) => write!(f, "{} on {} {p}", self.kind, self.bridge),
            None => write!(f, "{} on {}", self.kind, self.bridge),
        }
    }
}

/// An ongoing fight over one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fight {
    pub started: Ktime,
    pub last_repair: Ktime,
    /// Repairs made during the fight.
    pub repairs: u64,
    /// Repairs that had to wait for a slot.
    pub limited: u64,
    /// Who undid the repair last, where known.
    pub actor: Option<String>,
    /// Repairs since the fight was last reported.
    pub unreported: u64,
    pub reported: Ktime,
}

/// What the caller should log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Started { key: Key, fight: Fight },
    Ongoing { key: Key, fight: Fight },
    Ended { key: Key, fight: Fight },
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// GCRA theoretical arrival time: the key is free when `tat <= now + tolerance`.
    tat: Ktime,
    last: Ktime,
    repeats: u32,
    fight: Option<Fight>,
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    entries: BTreeMap<Key, Entry>,
}

const TOLERANCE_NS: u64 = (BURST - 1) * INTERVAL_NS;

impl RateLimiter {
    /// `None` if `key` may be repaired at `now`, else the time of its next slot.
    pub fn wait_until(&self, key: &Key, now: Ktime) -> Option<Ktime> {
        let e = self.entries.get(key)?;
        let free_at = e.tat.saturating_sub(TOLERANCE_NS);
        (free_at > now).then_some(free_at)
    }

    /// Records a repair of `key` made at `now` (it must have been allowed) after `waited`
    /// (it was held back for a slot); `actor` undid it last. Returns a report when this makes
    /// a fight start.
    pub fn record(
        &mut self,
        key: &Key,
        now: Ktime,
        waited: bool,
        actor: Option<String>,
    ) -> Option<Report> {
        let e = self.entries.entry(key.clone()).or_default();
        e.tat = e.tat.max(now) + INTERVAL_NS;
        let repeat = e.last != 0 && now.saturating_sub(e.last) < REPEAT_NS;
        e.repeats = if repeat { e.repeats + 1 } else { 0 };
        e.last = now;
        if let Some(f) = e.fight.as_mut() {
            f.repairs += 1;
            f.unreported += 1;
            f.limited += u64::from(waited);
            f.last_repair = now;
            if actor.is_some() {
                f.actor = actor;
            }
            return None;
        }
        if e.repeats < FIGHT_AFTER && !waited {
            return None;
        }
        let fight = Fight {
            started: now,
            last_repair: now,
            repairs: 1,
            limited: u64::from(waited),
            actor,
            unreported: 0,
            reported: now,
        };
        e.fight = Some(fight.clone());
        Some(Report::Started {
            key: key.clone(),
            fight,
        })
    }

    /// Whether `key` is in a fight (its repairs are then not logged one by one).
    pub fn fighting(&self, key: &Key) -> bool {
        self.entries.get(key).is_some_and(|e| e.fight.is_some())
    }

    /// Ongoing fights, for `status` and metrics.
    pub fn fights(&self) -> impl Iterator<Item = (&Key, &Fight)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.fight.as_ref().map(|f| (k, f)))
    }

    /// Reports fights due (ongoing every [`FIGHT_REPORT_EVERY`], and ended ones), and forgets
    /// keys whose slots are all free again.
    pub fn tick(&mut self, now: Ktime) -> Vec<Report> {
        let mut out = Vec::new();
        self.entries.retain(|key, e| {
            if let Some(f) = e.fight.as_mut() {
                if now.saturating_sub(f.last_repair) >= FIGHT_QUIET_NS {
                    out.push(Report::Ended {
                        key: key.clone(),
                        fight: f.clone(),
                    });
                    e.fight = None;
                } else if now.saturating_sub(f.reported) >= FIGHT_REPORT_EVERY {
                    out.push(Report::Ongoing {
                        key: key.clone(),
                        fight: f.clone(),
                    });
                    f.unreported = 0;
                    f.reported = now;
                }
            }
            e.fight.is_some() || e.tat > now || now.saturating_sub(e.last) < REPEAT_NS
        });
        out
    }

    /// When [`RateLimiter::tick`] next has something to do.
    pub fn next_tick(&self) -> Option<Ktime> {
        self.entries
            .values()
            .map(|e| match &e.fight {
                Some(f) => (f.last_repair + FIGHT_QUIET_NS).min(f.reported + FIGHT_REPORT_EVERY),
                None => e.tat.max(e.last + REPEAT_NS),
            })
            .min()
    }

    /// Forgets everything about a deleted port.
    pub fn forget_port(&mut self, port: &str) {
        self.entries.retain(|k, _| k.port.as_deref() != Some(port));
    }

    /// Keys kept, for memory checks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn key() -> Key {
        Key {
            bridge: "br0".into(),
            kind: "stp_off",
            port: None,
        }
    }

    /// Repairs `key` whenever allowed for `secs` seconds, asking every `step` ns; returns the
    /// repairs made and the longest wait a needed repair had.
    fn flat_out(r: &mut RateLimiter, start: Ktime, secs: u64, step: u64) -> (u64, u64) {
        let (mut made, mut longest, mut needed_since) = (0, 0, None::<Ktime>);
        let mut now = start;
        while now < start + secs * 1_000 * MS {
            let since = *needed_since.get_or_insert(now);
            if r.wait_until(&key(), now).is_none() {
                r.record(&key(), now, now > since, None);
                longest = longest.max(now - since);
                needed_since = None;
                made += 1;
            }
            now += step;
        }
        (made, longest)
    }

    #[test]
    fn a_burst_then_the_rate_forever_and_no_wait_above_one_slot() {
        let mut r = RateLimiter::default();
        let (made, longest) = flat_out(&mut r, 1, 60, MS / 10);
        // A minute of a flat-out fighter: the burst, then 25 a second, every second.
        assert_eq!(made, BURST + 60 * RATE_PER_SEC - 1);
        assert!(longest <= INTERVAL_NS, "longest wait {longest} ns");
        const { assert!(INTERVAL_NS <= 100 * MS) };
    }

    #[test]
    fn faults_seconds_apart_never_wait_and_are_not_a_fight() {
        let mut r = RateLimiter::default();
        for i in 0..100 {
            let now = 1 + i * 1_500 * MS;
            assert_eq!(r.wait_until(&key(), now), None);
            assert_eq!(r.record(&key(), now, false, None), None);
            r.tick(now);
        }
        assert!(!r.fighting(&key()));
    }

    #[test]
    fn back_to_back_faults_within_the_rate_are_repaired_every_time() {
        // 20 faults a second, each repaired at once: never held back.
        let mut r = RateLimiter::default();
        for i in 0..400 {
            let now = 1 + i * 50 * MS;
            assert_eq!(r.wait_until(&key(), now), None, "fault {i}");
            r.record(&key(), now, false, None);
        }
    }

    #[test]
    fn a_fight_is_reported_when_it_starts_periodically_and_when_it_ends() {
        let mut r = RateLimiter::default();
        let mut reports = Vec::new();
        let mut now = 1;
        for _ in 0..(12 * RATE_PER_SEC) {
            if let Some(rep) = r.record(&key(), now, false, Some("nm[812]".into())) {
                reports.push(rep);
            }
            reports.extend(r.tick(now));
            now += INTERVAL_NS;
        }
        assert!(matches!(reports[0], Report::Started { .. }), "{reports:?}");
        assert!(r.fighting(&key()));
        assert_eq!(
            reports
                .iter()
                .filter(|x| matches!(x, Report::Ongoing { .. }))
                .count(),
            1,
            "once per interval"
        );
        reports.extend(r.tick(now + FIGHT_QUIET_NS));
        let Some(Report::Ended { fight, .. }) = reports.last() else {
            panic!("no end: {reports:?}");
        };
        assert_eq!(fight.actor.as_deref(), Some("nm[812]"));
        assert!(fight.repairs >= 12 * RATE_PER_SEC - u64::from(FIGHT_AFTER));
        // The fight is over: the next repair goes out at once.
        assert_eq!(r.wait_until(&key(), now + FIGHT_QUIET_NS), None);
    }

    #[test]
    fn idle_keys_and_deleted_ports_are_forgotten() {
        let mut r = RateLimiter::default();
        let port = Key {
            port: Some("vnet0".into()),
            kind: "force_forwarding",
            ..key()
        };
        r.record(&key(), 1, false, None);
        r.record(&port, 1, false, None);
        assert_eq!(r.len(), 2);
        r.forget_port("vnet0");
        assert_eq!(r.len(), 1);
        r.tick(10 * 1_000 * MS);
        assert!(r.is_empty());
        assert_eq!(r.next_tick(), None);
    }
}
