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

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Ktime;

/// Repairs a second each key may make, indefinitely. Faults re-injected as fast as a repair
/// shows (the bench's storm: a bridge set down ~900 times a second) must not wait for a slot,
/// and a fight's cost is its flood of notifications, not the repairs (measured against a
/// flat-out fighter: 11% of a CPU at 25/s, 14% at 1000/s); a slot is 1 ms.
pub const RATE_PER_SEC: u64 = 1000;
/// Repairs each key may make at once before the rate applies.
pub const BURST: u64 = 50;
/// Slot spacing.
const INTERVAL_NS: u64 = 1_000_000_000 / RATE_PER_SEC;
/// Repairs a second a key that fights may make while link notifications flood with copies of
/// one message (a tool re-applying a setting flat out, see `sources::unchanged`). Such a
/// fighter undoes a repair within microseconds whatever its rate, so a faster one buys no
/// forwarding, only CPU: with the copies dropped in the kernel (`sources::muffle`), a fight's
/// cost is its repairs, each a request that waits for the RTNL lock the fighter holds and makes
/// notifications to every listener (measured against the bench's fighter: 4.4-5.0% of a CPU
/// at 50 a second, 2.6-3.0% at 25). Still more than the 20 a second every repair is owed, and
/// a slot of 40 ms, within the 100 ms a repair may wait.
pub const FLOOD_RATE_PER_SEC: u64 = 25;
const FLOOD_INTERVAL_NS: u64 = 1_000_000_000 / FLOOD_RATE_PER_SEC;
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
    pub last_repair: Ktime,
    /// Repairs made during the fight.
    pub repairs: u64,
    /// Who undid the repair last, where known.
    pub actor: Option<String>,
}

/// A fight as the log tells of it: by bridge, not by repair. STP turned on again makes every
/// port's forwarding a fight too; one line says so when the bridge's first repair becomes a
/// fight, one per [`FIGHT_REPORT_EVERY`] while any of its repairs still fights, one when the
/// last is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeFight {
    pub started: Ktime,
    pub last_repair: Ktime,
    /// Repairs made during the fight, of every kind.
    pub repairs: u64,
    /// Who undid a repair last, where known.
    pub actor: Option<String>,
    /// Repairs since the fight was last reported.
    pub unreported: u64,
    pub reported: Ktime,
    /// The repairs that fight (ongoing or over), for the log.
    pub keys: BTreeSet<Key>,
}

/// What the caller should log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Started {
        bridge: String,
        fight: BridgeFight,
    },
    /// Another repair of a bridge already fighting became a fight: counted, not logged.
    Joined {
        key: Key,
    },
    Ongoing {
        bridge: String,
        fight: BridgeFight,
    },
    Ended {
        bridge: String,
        fight: BridgeFight,
    },
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
    /// Fights by bridge, for the log.
    bridges: BTreeMap<String, BridgeFight>,
    /// Notifications flood with copies: fights go at [`FLOOD_RATE_PER_SEC`].
    flood: bool,
}

const TOLERANCE_NS: u64 = (BURST - 1) * INTERVAL_NS;

impl RateLimiter {
    /// `None` if `key` may be repaired at `now`, else the time of its next slot.
    pub fn wait_until(&self, key: &Key, now: Ktime) -> Option<Ktime> {
        let e = self.entries.get(key)?;
        let free_at = e.tat.saturating_sub(TOLERANCE_NS);
        (free_at > now).then_some(free_at)
    }

    /// When the first of the held `keys` may be repaired: `now` for one whose slot came free
    /// since it was held. Without that, a held repair whose slot passed between the step that
    /// held it and the wait would sleep until the next news (seen in the storm: 2 s, until a
    /// fight's end woke the agent).
    pub fn next_slot<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a Key>,
        now: Ktime,
    ) -> Option<Ktime> {
        keys.into_iter()
            .map(|k| self.wait_until(k, now).unwrap_or(now))
            .min()
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
        let interval = if self.flood && e.fight.is_some() {
            FLOOD_INTERVAL_NS
        } else {
            INTERVAL_NS
        };
        e.tat = e.tat.max(now) + interval;
        let repeat = e.last != 0 && now.saturating_sub(e.last) < REPEAT_NS;
        e.repeats = if repeat { e.repeats + 1 } else { 0 };
        e.last = now;
        let mut joined = false;
        if let Some(f) = e.fight.as_mut() {
            f.repairs += 1;
            f.last_repair = now;
            if actor.is_some() {
                f.actor.clone_from(&actor);
            }
        } else if e.repeats < FIGHT_AFTER && !waited {
            return None;
        } else {
            joined = true;
            e.fight = Some(Fight {
                last_repair: now,
                repairs: 1,
                actor: actor.clone(),
            });
        }
        // The bridge's fight: started by this repair, or joined.
        let started = !self.bridges.contains_key(&key.bridge);
        let b = self
            .bridges
            .entry(key.bridge.clone())
            .or_insert_with(|| BridgeFight {
                started: now,
                last_repair: now,
                repairs: 0,
                actor: None,
                unreported: 0,
                reported: now,
                keys: BTreeSet::new(),
            });
        b.repairs += 1;
        b.unreported += u64::from(!started);
        b.last_repair = now;
        if actor.is_some() {
            b.actor = actor;
        }
        b.keys.insert(key.clone());
        if started {
            Some(Report::Started {
                bridge: key.bridge.clone(),
                fight: b.clone(),
            })
        } else {
            joined.then(|| Report::Joined { key: key.clone() })
        }
    }

    /// Says whether link notifications flood with copies now.
    pub fn set_flood(&mut self, flood: bool) {
        self.flood = flood;
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
        self.entries.retain(|_, e| {
            if e.fight
                .as_ref()
                .is_some_and(|f| now.saturating_sub(f.last_repair) >= FIGHT_QUIET_NS)
            {
                e.fight = None;
            }
            e.fight.is_some() || e.tat > now || now.saturating_sub(e.last) < REPEAT_NS
        });
        let mut out = Vec::new();
        let entries = &self.entries;
        self.bridges.retain(|bridge, b| {
            let fighting = entries
                .iter()
                .any(|(k, e)| k.bridge == *bridge && e.fight.is_some());
            if !fighting {
                out.push(Report::Ended {
                    bridge: bridge.clone(),
                    fight: b.clone(),
                });
                return false;
            }
            if now.saturating_sub(b.reported) >= FIGHT_REPORT_EVERY {
                out.push(Report::Ongoing {
                    bridge: bridge.clone(),
                    fight: b.clone(),
                });
                b.unreported = 0;
                b.reported = now;
            }
            true
        });
        out
    }

    /// When [`RateLimiter::tick`] next has something to do.
    pub fn next_tick(&self) -> Option<Ktime> {
        self.entries
            .values()
            .map(|e| match &e.fight {
                Some(f) => f.last_repair + FIGHT_QUIET_NS,
                None => e.tat.max(e.last + REPEAT_NS),
            })
            .chain(
                self.bridges
                    .values()
                    .map(|b| b.reported + FIGHT_REPORT_EVERY),
            )
            .min()
    }

    /// Forgets everything about a deleted port.
    pub fn forget_port(&mut self, port: &str) {
        self.entries.retain(|k, _| k.port.as_deref() != Some(port));
        for b in self.bridges.values_mut() {
            b.keys.retain(|k| k.port.as_deref() != Some(port));
        }
    }

    /// Keys kept, for memory checks.
    pub fn len(&self) -> usize {
        self.entries.len() + self.bridges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.bridges.is_empty()
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
        // A minute of a flat-out fighter: the burst, then the rate, every second.
        assert_eq!(made, BURST + 60 * RATE_PER_SEC - 1);
        assert!(longest <= INTERVAL_NS, "longest wait {longest} ns");
        const { assert!(INTERVAL_NS <= 100 * MS) };
    }

    #[test]
    fn a_fight_in_a_flood_of_copies_goes_slower_but_still_owed_its_rate() {
        let mut r = RateLimiter::default();
        r.set_flood(true);
        let (made, longest) = flat_out(&mut r, 1, 10, MS / 10);
        // A fight after its first repeats, then the flood's rate (the burst's tolerance spent
        // in a few repairs of slow slots).
        assert!(
            (10 * FLOOD_RATE_PER_SEC..=10 * FLOOD_RATE_PER_SEC + 10).contains(&made),
            "{made} repairs in 10 s"
        );
        assert!(longest <= FLOOD_INTERVAL_NS, "longest wait {longest} ns");
        const { assert!(FLOOD_RATE_PER_SEC >= 20 && FLOOD_INTERVAL_NS <= 100 * MS) };
        // The flood over, the fight goes at full rate again.
        r.set_flood(false);
        let (made, _) = flat_out(&mut r, 1 + 10_000 * MS, 1, MS / 10);
        // (after the last slow slot, at most 40 ms)
        let lost = FLOOD_INTERVAL_NS / INTERVAL_NS;
        assert!(made >= RATE_PER_SEC - lost, "{made} in the second after");
        // A repair that does not fight is never slowed by a flood.
        let mut calm = RateLimiter::default();
        calm.set_flood(true);
        assert_eq!(calm.record(&key(), 5 * MS, false, None), None);
        assert_eq!(calm.wait_until(&key(), 5 * MS + INTERVAL_NS), None);
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
        assert_eq!(fight.keys.len(), 1);
        assert_eq!(fight.actor.as_deref(), Some("nm[812]"));
        assert!(fight.repairs >= 12 * RATE_PER_SEC - u64::from(FIGHT_AFTER));
        // The fight is over: the next repair goes out at once.
        assert_eq!(r.wait_until(&key(), now + FIGHT_QUIET_NS), None);
    }

    #[test]
    fn a_bridges_fights_are_one_fight_in_the_log() {
        // STP turned on flat out: turning it off and forcing each port fight together.
        let mut r = RateLimiter::default();
        let keys: Vec<Key> = std::iter::once(key())
            .chain((0..4).map(|i| Key {
                kind: "force_forwarding",
                port: Some(format!("vnet{i}")),
                ..key()
            }))
            .collect();
        let mut reports = Vec::new();
        let mut now = 1;
        for _ in 0..(25 * RATE_PER_SEC) {
            for k in &keys {
                if r.wait_until(k, now).is_none() {
                    reports.extend(r.record(k, now, false, None));
                }
            }
            reports.extend(r.tick(now));
            now += INTERVAL_NS;
        }
        assert_eq!(r.fights().count(), keys.len(), "each repair fights");
        reports.extend(r.tick(now + FIGHT_QUIET_NS));
        let kinds: Vec<&str> = reports
            .iter()
            .map(|r| match r {
                Report::Started { .. } => "started",
                Report::Joined { .. } => "joined",
                Report::Ongoing { .. } => "ongoing",
                Report::Ended { .. } => "ended",
            })
            .collect();
        // 25 s: started, twice ongoing, ended; never once per repair kind.
        let logged: Vec<&str> = kinds.into_iter().filter(|k| *k != "joined").collect();
        assert_eq!(logged, ["started", "ongoing", "ongoing", "ended"]);
        let Some(Report::Ended { bridge, fight }) = reports.last() else {
            unreachable!()
        };
        assert_eq!(bridge, "br0");
        assert_eq!(fight.keys.len(), keys.len());
        assert!(fight.repairs >= keys.len() as u64 * 25 * RATE_PER_SEC - 20);
        assert!(r.is_empty());
    }

    #[test]
    fn a_held_repair_whose_slot_came_free_is_due_at_once() {
        let mut r = RateLimiter::default();
        let mut now = 1;
        while r.wait_until(&key(), now).is_none() {
            r.record(&key(), now, false, None);
        }
        // Held at `now`: due at its slot.
        let slot = r.wait_until(&key(), now).expect("held");
        assert_eq!(r.next_slot([&key()], now), Some(slot));
        // The slot passed before the agent went to sleep: due now, not never.
        now = slot + 1;
        assert_eq!(r.wait_until(&key(), now), None);
        assert_eq!(r.next_slot([&key()], now), Some(now));
        assert_eq!(r.next_slot([], now), None);
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
