//! Hook selection by trial: for each thing observed, try the best tier (fentry/fexit), then
//! kprobe/kretprobe, then the tracepoint tier, and keep the first whose programs all load and
//! attach. Never by kernel version: a kernel says what it allows by allowing it.

use std::fmt;

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, RawTracePoint},
};
use serde::Serialize;

/// Whether a program loaded (or a tier attached), with the reason when not.
pub type Outcome = Result<(), String>;

/// A hook tier, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Fentry,
    Kprobe,
    Tracepoint,
    /// Nothing attached: netlink alone observes this.
    None,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Tracepoint => "tracepoint",
            Self::None => "none",
        })
    }
}

/// One program of a tier and where it attaches.
#[derive(Clone, Copy, Debug)]
pub enum Prog {
    FEntry(&'static str, &'static str),
    FExit(&'static str, &'static str),
    /// kprobe or kretprobe, as the program's section says.
    KProbe(&'static str, &'static str),
    TpBtf(&'static str, &'static str),
    RawTp(&'static str, &'static str),
}

impl Prog {
    pub fn program(self) -> &'static str {
        match self {
            Self::FEntry(p, _)
            | Self::FExit(p, _)
            | Self::KProbe(p, _)
            | Self::TpBtf(p, _)
            | Self::RawTp(p, _) => p,
        }
    }

    pub fn target(self) -> &'static str {
        match self {
            Self::FEntry(_, t)
            | Self::FExit(_, t)
            | Self::KProbe(_, t)
            | Self::TpBtf(_, t)
            | Self::RawTp(_, t) => t,
        }
    }
}

/// Something observed in the kernel, with its tiers best first.
pub struct HookSpec {
    pub name: &'static str,
    pub tiers: &'static [(Tier, &'static [Prog])],
}

const TIMER_TIER: &[Prog] = &[
    Prog::TpBtf("timer_expire_entry", "timer_expire_entry"),
    Prog::TpBtf("timer_expire_exit", "timer_expire_exit"),
    Prog::TpBtf("timer_start", "timer_start"),
    Prog::TpBtf("timer_cancel", "timer_cancel"),
];

/// What bridge-guard observes, and how.
pub const HOOKS: &[HookSpec] = &[
    HookSpec {
        name: "port-state",
        tiers: &[
            (
                Tier::Fentry,
                &[
                    Prog::FEntry("set_state_fentry", "br_set_state"),
                    Prog::FExit("set_state_fexit", "br_set_state"),
                ],
            ),
            (
                Tier::Kprobe,
                &[
                    Prog::KProbe("set_state_kprobe", "br_set_state"),
                    Prog::KProbe("set_state_kretprobe", "br_set_state"),
                ],
            ),
            (Tier::Tracepoint, TIMER_TIER),
        ],
    },
    HookSpec {
        name: "join",
        tiers: &[
            (
                Tier::Fentry,
                &[Prog::FExit("link_fexit", "netdev_master_upper_dev_link")],
            ),
            (
                Tier::Kprobe,
                &[
                    Prog::KProbe("link_kprobe", "netdev_master_upper_dev_link"),
                    Prog::KProbe("link_kretprobe", "netdev_master_upper_dev_link"),
                ],
            ),
        ],
    },
    HookSpec {
        name: "leave",
        tiers: &[
            (
                Tier::Fentry,
                &[Prog::FEntry("unlink_fentry", "netdev_upper_dev_unlink")],
            ),
            (
                Tier::Kprobe,
                &[Prog::KProbe("unlink_kprobe", "netdev_upper_dev_unlink")],
            ),
        ],
    },
    HookSpec {
        name: "stp",
        tiers: &[
            (
                Tier::Fentry,
                &[
                    Prog::FEntry("stp_fentry", "br_stp_set_enabled"),
                    Prog::FExit("stp_fexit", "br_stp_set_enabled"),
                ],
            ),
            (
                Tier::Kprobe,
                &[
                    Prog::KProbe("stp_kprobe", "br_stp_set_enabled"),
                    Prog::KProbe("stp_kretprobe", "br_stp_set_enabled"),
                ],
            ),
        ],
    },
    // Loop detection: MAC addresses flapping between ports (`loop_guard`). The tracepoint is
    // in vmlinux even where bridge is a module; raw_tracepoint where tp_btf is refused.
    HookSpec {
        name: "fdb-flap",
        tiers: &[
            (
                Tier::Tracepoint,
                &[Prog::TpBtf("fdb_update_btf", "br_fdb_update")],
            ),
            (
                Tier::Tracepoint,
                &[Prog::RawTp("fdb_update_raw", "br_fdb_update")],
            ),
        ],
    },
];

/// The tracepoint-tier programs that only serve that tier (the others stay as timer context).
pub const TIMER_ONLY_TIER: &[Prog] = &[
    Prog::TpBtf("timer_start", "timer_start"),
    Prog::TpBtf("timer_cancel", "timer_cancel"),
];

/// The timer-context programs, attached beside a better port-state tier so that state changes
/// made by the STP timer are attributed to it rather than to an interrupted task.
pub const TIMER_CONTEXT: &[Prog] = &[
    Prog::TpBtf("timer_expire_entry", "timer_expire_entry"),
    Prog::TpBtf("timer_expire_exit", "timer_expire_exit"),
];

/// Every program a hook may load, in any tier (timer context's included; some twice).
pub fn every_prog() -> impl Iterator<Item = Prog> {
    HOOKS
        .iter()
        .flat_map(|h| h.tiers.iter().flat_map(|(_, progs)| progs.iter()))
        .chain(TIMER_CONTEXT)
        .copied()
}

/// The outcome of selection for one hook.
#[derive(Clone, Debug, Serialize)]
pub struct HookReport {
    pub hook: &'static str,
    pub tier: Tier,
    /// Why each better tier was not used.
    pub failures: Vec<TierFailure>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TierFailure {
    pub tier: Tier,
    pub reason: String,
}

impl fmt::Display for HookReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hook {}: {}", self.hook, self.tier)?;
        if !self.failures.is_empty() {
            let why: Vec<String> = self
                .failures
                .iter()
                .map(|fl| format!("{}: {}", fl.tier, fl.reason))
                .collect();
            write!(f, " (not {})", why.join("; "))?;
        }
        Ok(())
    }
}

/// Short, single-line reason for a program error: the errno for load failures (the verifier log
/// is long and goes to debug logs), the error chain otherwise.
pub fn reason(err: &ProgramError) -> String {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = err
    {
        tracing::debug!(%verifier_log, "verifier log");
        return format!("load failed: {io_error}");
    }
    crate::error_chain(err)
}

/// Loads `prog` (if not loaded yet) without attaching it.
pub fn load(ebpf: &mut Ebpf, btf: Option<&Btf>, prog: Prog) -> Result<(), String> {
    let name = prog.program();
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?;
    let missing_btf = || "no kernel BTF".to_owned();
    let result = match prog {
        Prog::FEntry(_, f) => {
            let p: &mut FEntry = program.try_into().map_err(|e| reason(&e))?;
            p.load(f, btf.ok_or_else(missing_btf)?)
        }
        Prog::FExit(_, f) => {
            let p: &mut FExit = program.try_into().map_err(|e| reason(&e))?;
            p.load(f, btf.ok_or_else(missing_btf)?)
        }
        Prog::KProbe(..) => {
            let p: &mut KProbe = program.try_into().map_err(|e| reason(&e))?;
            p.load()
        }
        Prog::TpBtf(_, tp) => {
            let p: &mut BtfTracePoint = program.try_into().map_err(|e| reason(&e))?;
            p.load(tp, btf.ok_or_else(missing_btf)?)
        }
        Prog::RawTp(..) => {
            let p: &mut RawTracePoint = program.try_into().map_err(|e| reason(&e))?;
            p.load()
        }
    };
    match result {
        Ok(()) | Err(ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => Err(format!("{} {}: {}", name, prog.target(), reason(&e))),
    }
}

fn attach(ebpf: &mut Ebpf, prog: Prog) -> Result<(), String> {
    let name = prog.program();
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?;
    let result = match prog {
        Prog::FEntry(..) => <&mut FEntry>::try_from(program).and_then(|p| p.attach().map(drop)),
        Prog::FExit(..) => <&mut FExit>::try_from(program).and_then(|p| p.attach().map(drop)),
        Prog::KProbe(_, f) => {
            <&mut KProbe>::try_from(program).and_then(|p| p.attach(f, 0).map(drop))
        }
        Prog::TpBtf(..) => {
            <&mut BtfTracePoint>::try_from(program).and_then(|p| p.attach().map(drop))
        }
        Prog::RawTp(_, tp) => {
            <&mut RawTracePoint>::try_from(program).and_then(|p| p.attach(tp).map(drop))
        }
    };
    result.map_err(|e| format!("attach {} to {}: {}", name, prog.target(), reason(&e)))
}

/// Unloads `prog`, detaching its links; used to undo a tier that only half worked.
fn unload(ebpf: &mut Ebpf, prog: Prog) {
    let Some(program) = ebpf.program_mut(prog.program()) else {
        return;
    };
    let _ = match prog {
        Prog::FEntry(..) => <&mut FEntry>::try_from(program).and_then(FEntry::unload),
        Prog::FExit(..) => <&mut FExit>::try_from(program).and_then(FExit::unload),
        Prog::KProbe(..) => <&mut KProbe>::try_from(program).and_then(KProbe::unload),
        Prog::TpBtf(..) => <&mut BtfTracePoint>::try_from(program).and_then(BtfTracePoint::unload),
        Prog::RawTp(..) => <&mut RawTracePoint>::try_from(program).and_then(RawTracePoint::unload),
    };
}

/// Unloads (and so detaches) every program in `progs`.
pub fn unload_all(ebpf: &mut Ebpf, progs: &[Prog]) {
    for &p in progs {
        unload(ebpf, p);
    }
}

/// Loads and attaches every program of a tier, or none of them.
pub fn try_tier(ebpf: &mut Ebpf, btf: Option<&Btf>, progs: &[Prog]) -> Result<(), String> {
    for (i, &prog) in progs.iter().enumerate() {
        if let Err(e) = load(ebpf, btf, prog).and_then(|()| attach(ebpf, prog)) {
            for &done in &progs[..=i] {
                unload(ebpf, done);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Picks a tier for every hook in `HOOKS`, logging one line per hook.
///
/// `allowed` lets a tier be vetoed before trying it (e.g. the tracepoint tier without the timer
/// symbol); its `Err` is recorded as the reason.
pub fn select(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    allowed: impl Fn(&str, Tier) -> Result<(), String>,
) -> Vec<HookReport> {
    HOOKS
        .iter()
        .map(|spec| {
            let mut failures = Vec::new();
            let mut chosen = Tier::None;
            for &(tier, progs) in spec.tiers {
                match allowed(spec.name, tier).and_then(|()| try_tier(ebpf, btf, progs)) {
                    Ok(()) => {
                        chosen = tier;
                        break;
                    }
                    Err(reason) => failures.push(TierFailure { tier, reason }),
                }
            }
            let report = HookReport {
                hook: spec.name,
                tier: chosen,
                failures,
            };
            if chosen == Tier::None {
                tracing::warn!("{report}; netlink alone observes it");
            } else {
                tracing::info!("{report}");
            }
            report
        })
        .collect()
}
