//! This process's resource use, from `/proc/self`: what Prometheus' `process_*` metrics say.

use std::io;

/// A snapshot of the process's CPU, memory and file descriptors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
    pub open_fds: u64,
    /// The soft RLIMIT_NOFILE, if limited.
    pub max_fds: Option<u64>,
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|v| *v > 0)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {what}"))
}

/// Fields of `/proc/<pid>/stat` after the command name, which may itself hold spaces and
/// parentheses: field 3 (state) is the first item returned.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_ascii_whitespace().collect())
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl ProcessStats {
    pub fn read() -> io::Result<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let f = stat_fields(&stat).ok_or_else(|| invalid("/proc/self/stat"))?;
        // Indices from proc(5), minus the 3 fields before the state.
        let num = |i: usize| -> io::Result<u64> {
            f.get(i - 3)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| invalid("/proc/self/stat field"))
        };
        let ticks = sysconf(libc::_SC_CLK_TCK).unwrap_or(100);
        let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
        let boot = boot_time(&std::fs::read_to_string("/proc/stat")?)
            .ok_or_else(|| invalid("/proc/stat"))?;
        #[expect(clippy::cast_precision_loss, reason = "seconds as f64")]
        let secs = |t: u64| t as f64 / ticks as f64;
        let open_fds = u64::try_from(std::fs::read_dir("/proc/self/fd")?.count()).unwrap_or(0);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid out-pointer.
        let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0
            && lim.rlim_cur != libc::RLIM_INFINITY)
            .then_some(lim.rlim_cur);
        #[expect(clippy::cast_precision_loss, reason = "seconds as f64")]
        let boot_secs = boot as f64;
        Ok(Self {
            cpu_seconds: secs(num(14)? + num(15)?),
            resident_bytes: num(24)? * page,
            virtual_bytes: num(23)?,
            start_time_seconds: boot_secs + secs(num(22)?),
            // The count includes the directory handle read_dir held open.
            open_fds: open_fds.saturating_sub(1),
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_with_spaces_and_parentheses_do_not_shift_fields() {
        let stat = "42 (we ird) (x) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 500 \
                    1000 25";
        let f = stat_fields(stat).expect("fields");
        assert_eq!(f[0], "S");
        assert_eq!((f[14 - 3], f[15 - 3]), ("7", "3"));
        assert_eq!((f[22 - 3], f[23 - 3], f[24 - 3]), ("500", "1000", "25"));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read().expect("reads /proc/self");
        assert!(s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes);
        assert!(s.open_fds >= 3, "stdin, stdout, stderr at least: {s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
