//! A count of events in the last hour, on CLOCK_MONOTONIC, in one-minute buckets: constant
//! memory however many events there are (a fight can mean tens of repairs a second).

const MINUTE_NS: u64 = 60_000_000_000;
const BUCKETS: usize = 60;

#[derive(Debug, Clone)]
pub struct LastHour {
    /// (minute number, events in it), indexed by minute number modulo 60.
    buckets: [(u64, u64); BUCKETS],
}

impl Default for LastHour {
    fn default() -> Self {
        Self {
            buckets: [(0, 0); BUCKETS],
        }
    }
}

impl LastHour {
    /// Counts one event at `now_ns`.
    pub fn record(&mut self, now_ns: u64) {
        let minute = now_ns / MINUTE_NS;
        let bucket = &mut self.buckets[(minute % BUCKETS as u64) as usize];
        if bucket.0 != minute {
            *bucket = (minute, 0);
        }
        bucket.1 += 1;
    }

    /// Events in the hour before `now_ns`, to the minute.
    pub fn count(&self, now_ns: u64) -> u64 {
        let minute = now_ns / MINUTE_NS;
        self.buckets
            .iter()
            .filter(|(m, _)| *m <= minute && minute - m < BUCKETS as u64)
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_last_hour_and_forgets_older_events() {
        let mut h = LastHour::default();
        let t0 = 10 * 3600 * 1_000_000_000;
        assert_eq!(h.count(t0), 0);
        h.record(t0);
        h.record(t0 + 1);
        h.record(t0 + 30 * MINUTE_NS);
        assert_eq!(h.count(t0 + 30 * MINUTE_NS), 3);
        // An hour after the first two, only the later one is left.
        assert_eq!(h.count(t0 + 60 * MINUTE_NS), 1);
        assert_eq!(h.count(t0 + 91 * MINUTE_NS), 0);
        // A bucket reused an hour later starts from zero.
        h.record(t0 + 60 * MINUTE_NS);
        assert_eq!(h.count(t0 + 60 * MINUTE_NS), 2);
        for _ in 0..10_000 {
            h.record(t0 + 61 * MINUTE_NS);
        }
        assert_eq!(h.count(t0 + 61 * MINUTE_NS), 10_002);
    }
}
