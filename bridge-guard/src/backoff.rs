//! Backoff for repairs that someone keeps undoing: the same repair needed again soon after the
//! last one waits exponentially longer (capped), so the agent never fights in a tight loop.

use std::{collections::BTreeMap, time::Duration};

use crate::model::Ktime;

/// A repair needed again within this window after it was last allowed counts as a repeat.
const WINDOW: Duration = Duration::from_secs(1);
/// Repeats allowed at once before waiting: a flap and its aftermath legitimately need a few;
/// something fighting the agent needs many more within the window.
const FREE_REPEATS: u32 = 5;
const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    repeats: u32,
    last: Ktime,
    next_allowed: Ktime,
}

#[derive(Debug, Default)]
pub struct Backoff {
    entries: BTreeMap<String, Entry>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Backoff {
    /// `None` if the repair `key` may run at `now`, else when it may.
    pub fn wait_until(&self, key: &str, now: Ktime) -> Option<Ktime> {
        self.entries
            .get(key)
            .map(|e| e.next_allowed)
            .filter(|&t| t > now)
    }

    /// Records that repair `key` ran at `now`; returns the delay imposed on the next one.
    pub fn record(&mut self, key: &str, now: Ktime) -> Duration {
        let e = self.entries.entry(key.to_owned()).or_default();
        e.repeats = if e.last != 0 && now.saturating_sub(e.next_allowed) < ns(WINDOW) {
            e.repeats + 1
        } else {
            0
        };
        e.last = now;
        let delay = match e.repeats.checked_sub(FREE_REPEATS + 1) {
            None => Duration::ZERO,
            Some(n) => BASE
                .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
                .min(CAP),
        };
        e.next_allowed = now + ns(delay);
        delay
    }

    /// The earliest time any waiting repair becomes allowed, after `now`.
    pub fn next_wakeup(&self, now: Ktime) -> Option<Ktime> {
        self.entries
            .values()
            .map(|e| e.next_allowed)
            .filter(|&t| t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn first_repairs_are_free_then_the_wait_doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let mut now = 1;
        let mut delays = Vec::new();
        for _ in 0..17 {
            assert_eq!(b.wait_until("stp-off:br0", now), None);
            delays.push(b.record("stp-off:br0", now).as_millis());
            now += 5 * MS + u64::try_from(delays.last().copied().unwrap_or(0)).unwrap_or(0) * MS;
        }
        assert_eq!(&delays[..9], &[0, 0, 0, 0, 0, 0, 100, 200, 400]);
        assert!(delays.iter().all(|&d| d <= 30_000));
        assert_eq!(*delays.last().unwrap_or(&0), 30_000);
    }

    #[test]
    fn a_quiet_window_resets_and_keys_are_independent() {
        let mut b = Backoff::default();
        for i in 0..8 {
            b.record("up:br0", 1 + i * MS);
        }
        assert!(b.wait_until("up:br0", 8 * MS).is_some());
        assert_eq!(b.wait_until("up:br1", 8 * MS), None);
        let later = 8 * MS + ns(WINDOW) + ns(CAP);
        assert_eq!(b.record("up:br0", later), Duration::ZERO);
    }
}
