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

/// Where this kernel charges BPF map memory, found by trying, and what was done about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Memlock {
    /// Charged to the memory cgroup (kernels since 5.11): RLIMIT_MEMLOCK does not matter and
    /// is left as it is.
    NotNeeded,
    /// Charged to RLIMIT_MEMLOCK (kernels before 5.11): raised from `was` to unlimited.
    Raised { was: Limit },
    /// Charged to RLIMIT_MEMLOCK and it could not be raised: maps beyond `limit` will fail.
    Kept { limit: Limit, error: String },
    /// The trial could not tell (bpf() itself refused: no CAP_BPF); raised anyway, in case,
    /// with this result.
    Untested {
        probe: String,
        raised: Result<(), String>,
    },
}

/// An RLIMIT_MEMLOCK soft limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(pub libc::rlim_t);

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == libc::RLIM_INFINITY {
            f.write_str("unlimited")
        } else {
            write!(f, "{} KiB", self.0 / 1024)
        }
    }
}

impl Memlock {
    /// Whether this deserves a warning: BPF maps may fail to be created.
    pub fn is_problem(&self) -> bool {
        matches!(
            self,
            Self::Kept { .. } | Self::Untested { raised: Err(_), .. }
        )
    }
}

impl fmt::Display for Memlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotNeeded => f.write_str(
                "not needed: this kernel charges BPF memory to the memory cgroup (a map \
                 created under a zero RLIMIT_MEMLOCK)",
            ),
            Self::Raised { was } => write!(
                f,
                "raised from {was} to unlimited: this kernel charges BPF memory to \
                 RLIMIT_MEMLOCK (a map could not be created under a zero limit)"
            ),
            Self::Kept { limit, error } => write!(
                f,
                "kept at {limit}: this kernel charges BPF memory to RLIMIT_MEMLOCK and raising \
                 it failed ({error}); maps may not fit: run with CAP_SYS_RESOURCE or \
                 LimitMEMLOCK=infinity"
            ),
            Self::Untested {
                probe,
                raised: Ok(()),
            } => write!(
                f,
                "raised to unlimited, untested (the trial map failed: {probe})"
            ),
            Self::Untested {
                probe,
                raised: Err(e),
            } => write!(
                f,
                "not raised ({e}), untested (the trial map failed: {probe})"
            ),
        }
    }
}

fn get_memlock() -> std::io::Result<libc::rlimit> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) } == 0 {
        Ok(rlim)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_memlock(rlim: &libc::rlimit) -> std::io::Result<()> {
    // SAFETY: a valid pointer to a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, rlim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The head of `union bpf_attr` for BPF_MAP_CREATE; the kernel zero-fills the rest.
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Creates (and closes) a one-entry array map.
fn trial_map() -> std::io::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid attr; the returned fd is owned at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: a descriptor bpf() just returned to us.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    Ok(())
}

/// Whether BPF memory is charged to RLIMIT_MEMLOCK, by trying: a map created with the soft
/// limit at zero can only succeed where the kernel charges the memory cgroup instead (5.11's
/// change). The soft limit is restored right after; lowering and restoring it up to the hard
/// limit needs no privilege.
fn charged_to_memlock(saved: &libc::rlimit) -> std::io::Result<bool> {
    trial_map()?;
    set_memlock(&libc::rlimit {
        rlim_cur: 0,
        rlim_max: saved.rlim_max,
    })?;
    let zero = trial_map();
    set_memlock(saved)?;
    match zero {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(true),
        Err(e) => Err(e),
    }
}

fn raise(saved: &libc::rlimit) -> std::io::Result<()> {
    if saved.rlim_cur == libc::RLIM_INFINITY {
        return Ok(());
    }
    set_memlock(&libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    })
}

/// Makes sure map creation cannot fail for RLIMIT_MEMLOCK: finds by trial whether this kernel
/// charges BPF memory to it, and raises it to unlimited only if so.
pub fn ensure_memlock() -> Memlock {
    let saved = match get_memlock() {
        Ok(r) => r,
        Err(e) => {
            return Memlock::Untested {
                probe: format!("getrlimit: {e}"),
                raised: Err("not tried".to_owned()),
            };
        }
    };
    match charged_to_memlock(&saved) {
        Ok(false) => Memlock::NotNeeded,
        Ok(true) => match raise(&saved) {
            Ok(()) => Memlock::Raised {
                was: Limit(saved.rlim_cur),
            },
            Err(e) => Memlock::Kept {
                limit: Limit(saved.rlim_cur),
                error: e.to_string(),
            },
        },
        Err(probe) => Memlock::Untested {
            probe: probe.to_string(),
            raised: raise(&saved).map_err(|e| e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{Limit, Memlock, charged_to_memlock, get_memlock, trial_map};

    #[test]
    fn the_memlock_trial_restores_the_limit() -> std::io::Result<()> {
        if let Err(e) = trial_map() {
            eprintln!(
                "SKIP the_memlock_trial_restores_the_limit: bpf() refused here ({e}) [needs root]"
            );
            return Ok(());
        }
        let before = get_memlock()?;
        let charged = charged_to_memlock(&before)?;
        let after = get_memlock()?;
        assert_eq!(
            (before.rlim_cur, before.rlim_max),
            (after.rlim_cur, after.rlim_max)
        );
        // Either answer is a kernel's; what matters is that a zero limit was really in force.
        eprintln!("BPF memory charged to RLIMIT_MEMLOCK: {charged}");
        Ok(())
    }

    #[test]
    fn memlock_outcomes_read_well() {
        let raised = Memlock::Raised {
            was: Limit(64 * 1024),
        };
        assert!(
            raised
                .to_string()
                .starts_with("raised from 64 KiB to unlimited")
        );
        assert!(!raised.is_problem());
        let kept = Memlock::Kept {
            limit: Limit(libc::RLIM_INFINITY),
            error: "Operation not permitted".into(),
        };
        assert!(kept.to_string().contains("CAP_SYS_RESOURCE"), "{kept}");
        assert!(kept.is_problem());
        assert!(Memlock::NotNeeded.to_string().starts_with("not needed"));
    }
}
