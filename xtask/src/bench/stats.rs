//! Percentiles and what `/proc` says about a process: CPU time and peak memory.

/// Nearest-rank percentile of sorted `v` (`p` in 0..=100): with 20 samples, p99 is the maximum.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    nearest_rank(sorted, p)
}

/// The nearest-rank sample at `p` of any sorted slice (e.g. outages, not-healed ones last).
pub fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Median, p99 and max of `v` (unsorted).
pub fn summary(v: &[u64]) -> Option<(u64, u64, u64)> {
    let mut s = v.to_vec();
    s.sort_unstable();
    Some((percentile(&s, 50.0)?, percentile(&s, 99.0)?, *s.last()?))
}

/// The fields of `/proc/PID/stat` the bench uses (CPU times in clock ticks).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStat {
    pub pgrp: i32,
    pub utime: u64,
    pub stime: u64,
    /// Of children that exited and were waited for.
    pub cutime: u64,
    pub cstime: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some(ProcStat {
        pgrp: f.get(2)?.parse().ok()?,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// utime + stime of `pid` in milliseconds (what the brief calls the agent's CPU time).
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let s = proc_stat(pid)?;
    #[expect(clippy::cast_precision_loss, reason = "tick counts")]
    Some((s.utime + s.stime) as f64 * 1000.0 / clk_tck() as f64)
}

/// utime + stime + waited-for children of every pid, in milliseconds.
pub fn group_cpu_ms(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| proc_stat(*p))
        .map(|s| s.utime + s.stime + s.cutime + s.cstime)
        .sum();
    #[expect(clippy::cast_precision_loss, reason = "tick counts")]
    let ms = ticks as f64 * 1000.0 / clk_tck() as f64;
    ms
}

/// Time on CPU of every thread of `pid`, in nanoseconds (`/proc/PID/task/*/schedstat`): finer
/// than the ticks of `stat`, for the idle measurement.
pub fn sched_ns(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for t in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        total += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// A `/proc/PID/status` field in KiB (`VmHWM`, `VmRSS`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Milliseconds, microseconds or seconds, whichever reads best.
pub fn human_ns(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let v = ns as f64;
    if ns < 1_000_000 {
        format!("{:.0} µs", v / 1e3)
    } else if ns < 10_000_000 {
        format!("{:.2} ms", v / 1e6)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", v / 1e6)
    } else {
        format!("{:.2} s", v / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&v, 50.0), Some(10));
        assert_eq!(percentile(&v, 99.0), Some(20));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(summary(&[3, 1, 2]), Some((2, 3, 3)));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(proc_stat(me).is_some());
        assert!(status_kib(me, "VmHWM").is_some_and(|k| k > 0));
        assert_eq!(human_ns(850_000), "850 µs");
        assert_eq!(human_ns(4_030_000_000), "4.03 s");
    }
}
