//! The capabilities this process holds, and the memlock limit eBPF maps may need.

use std::fmt;

/// The capabilities bridge-guard cares about, by number (`linux/capability.h`).
pub const WANTED: &[(u32, &str, &str)] = &[
    (12, "CAP_NET_ADMIN", "repair bridges over rtnetlink"),
    (
        38,
        "CAP_PERFMON",
        "attach tracing programs (kernels >= 5.8)",
    ),
    (
        39,
        "CAP_BPF",
        "load eBPF programs and maps (kernels >= 5.8)",
    ),
    (21, "CAP_SYS_ADMIN", "eBPF on kernels before 5.8"),
    (
        24,
        "CAP_SYS_RESOURCE",
        "raise RLIMIT_MEMLOCK (kernels before 5.11)",
    ),
];

/// The effective capability set, from `/proc/self/status`.
#[derive(Clone, Copy, Debug)]
pub struct Caps(u64);

impl Caps {
    pub fn current() -> std::io::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        Ok(Self(mask))
    }

    pub fn has(self, cap: u32) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }
}

/// What happened when the memlock limit was raised.
#[derive(Clone, Debug)]
pub enum Memlock {
    Raised,
    /// Failed; fine on kernels >= 5.11, which charge BPF memory to the cgroup instead.
    Kept {
        error: String,
    },
}

impl fmt::Display for Memlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Raised => f.write_str("raised to unlimited"),
            Self::Kept { error } => write!(
                f,
                "not raised ({error}); fine on kernels >= 5.11, which account BPF memory to the cgroup"
            ),
        }
    }
}

/// Tries to lift RLIMIT_MEMLOCK so map creation cannot fail on old kernels.
pub fn raise_memlock() -> Memlock {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid pointer to a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } == 0 {
        Memlock::Raised
    } else {
        Memlock::Kept {
            error: std::io::Error::last_os_error().to_string(),
        }
    }
}
