//! Kernel timestamps (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`) and their wall-clock equivalent.

use std::time::{Duration, SystemTime};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Now, on the clock eBPF stamps events with.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// The wall-clock time of a CLOCK_MONOTONIC timestamp, using the current offset between clocks.
pub fn wall_time(ktime_ns: u64) -> SystemTime {
    let now_mono = monotonic_ns();
    let now_wall = SystemTime::now();
    if ktime_ns <= now_mono {
        now_wall - Duration::from_nanos(now_mono - ktime_ns)
    } else {
        now_wall + Duration::from_nanos(ktime_ns - now_mono)
    }
}

/// `HH:MM:SS.micros+HH:MM` in local time (the zone's offset at `t`), or `HH:MM:SS.microsZ`
/// in UTC: a time a reader can place without knowing the host's zone.
pub fn format_time_with_offset(t: SystemTime, utc: bool) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let Ok(secs) = libc::time_t::try_from(since.as_secs()) else {
        return format!("{}Z", format_time_of_day(t));
    };
    // SAFETY: an all-zero `tm` is valid; localtime_r/gmtime_r fill it (thread-safe variants).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe {
        if utc {
            !libc::gmtime_r(&secs, &mut tm).is_null()
        } else {
            !libc::localtime_r(&secs, &mut tm).is_null()
        }
    };
    if !ok {
        return format!("{}Z", format_time_of_day(t));
    }
    let clock = format!(
        "{:02}:{:02}:{:02}.{:06}",
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        since.subsec_micros()
    );
    if utc {
        return format!("{clock}Z");
    }
    let off = tm.tm_gmtoff;
    let sign = if off < 0 { '-' } else { '+' };
    let off = off.unsigned_abs();
    format!("{clock}{sign}{:02}:{:02}", off / 3600, off / 60 % 60)
}

/// `HH:MM:SS.micros` in UTC, for log lines.
pub fn format_time_of_day(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_of_now_is_now() {
        let wall = wall_time(monotonic_ns());
        let delta = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(delta < Duration::from_secs(1), "{delta:?}");
    }

    #[test]
    fn times_carry_their_offset() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(3_723_000_042);
        assert_eq!(format_time_with_offset(t, true), "01:02:03.000042Z");
        let local = format_time_with_offset(t, false);
        // Whatever this machine's zone: the clock, then a sign and HH:MM.
        let (clock, off) = local.split_at(local.len() - 6);
        assert_eq!(clock.len(), 15, "{local}");
        assert!(off.starts_with(['+', '-']) && &off[3..4] == ":", "{local}");
    }

    #[test]
    fn formats_time_of_day() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(3_723_000_042);
        assert_eq!(format_time_of_day(t), "01:02:03.000042");
    }
}
