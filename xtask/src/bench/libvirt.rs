//! libvirt restarting its network under a running guest, the first user's fault: `virsh
//! net-destroy` then `net-start`. libvirt makes a new bridge and leaves the running guest's tap
//! out of it for good. Measured with Debian's libvirtd, dnsmasq and a qemu guest in a lab of
//! their own ([`netlab::libvirt`]), against bridge-guard, the shell guard and no guard.
//!
//! Each trial is timed from the `net-destroy` request to the link notification after which
//! the new bridge is up and the tap is on it, forwarding (the bench's observer, as for every
//! other fault), and also from the moment `net-start` returned: what the user waits for once
//! libvirt says it is done. `net-start`'s own duration shows whether the guard slowed libvirt.

use std::time::Duration;

use anyhow::{Context as _, Result};
use netlab::libvirt::{self as lv, LibvirtLab, Network};
use serde::{Deserialize, Serialize};

use super::{
    contenders::{Contender, Running},
    observer::{Observer, Outcome},
    rtnl::{Rtnl, monotonic_ns},
};
use crate::lab::TempDir;

/// The network, as a new user's `default`: STP on, libvirt's delay 0 (the kernel's 2 s).
const NETWORK: &str = "default";
const BRIDGE: &str = "virbr0";
/// How long the lab may take to settle (the tap forwards 4 s after it joins with STP on).
const SETTLE: Duration = Duration::from_secs(30);

pub struct Plan {
    pub repeat: usize,
    pub none_repeat: usize,
    pub timeout: Duration,
    pub quiet: Duration,
}

impl Plan {
    pub fn estimate(&self, contenders: &[Contender]) -> Duration {
        let mut t = Duration::from_secs(15);
        for c in contenders {
            t += match c {
                Contender::None => {
                    (self.timeout + Duration::from_secs(5)) * count(self.none_repeat)
                }
                Contender::Oracle => Duration::ZERO,
                _ => Duration::from_millis(800) * count(self.repeat) + Duration::from_secs(6),
            };
        }
        t
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LibvirtTrial {
    pub contender: Contender,
    pub rep: usize,
    /// From the `net-destroy` request to the tap forwarding on the new bridge; `None`: not
    /// healed within the timeout.
    pub outage_ns: Option<u64>,
    /// From `net-start`'s return to the same (0 when it was repaired before libvirt returned).
    pub after_start_ns: Option<u64>,
    /// How long `net-start` took.
    pub net_start_ns: u64,
    pub first_problem: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LibvirtRun {
    /// `virsh --version` of the lab's libvirt; empty when skipped.
    pub libvirt: String,
    /// Why this part did not run, if it did not.
    pub skipped: Option<String>,
    pub timeout_s: f64,
    pub trials: Vec<LibvirtTrial>,
}

/// Runs the part against `contenders` (the oracle is not told libvirt's faults: skipped).
pub fn run(
    plan: &Plan,
    contenders: &[Contender],
    (bin, extra): (&std::path::Path, &[String]),
    tmp: &TempDir,
    progress: &dyn Fn(&str),
) -> Result<LibvirtRun> {
    let mut out = LibvirtRun {
        libvirt: String::new(),
        skipped: None,
        timeout_s: plan.timeout.as_secs_f64(),
        trials: Vec::new(),
    };
    let missing = lv::missing_programs();
    if !missing.is_empty() {
        let why = format!(
            "needs libvirt ({} not found); `cargo xtask test` installs it",
            missing.join(", ")
        );
        progress(&format!("bench: SKIP libvirt: {why}"));
        out.skipped = Some(why);
        return Ok(out);
    }
    progress("bench: libvirt: starting libvirtd, the network and a qemu guest");
    let lab = LibvirtLab::new("bgb", "libvirt")?;
    out.libvirt = netlab::run(std::process::Command::new("virsh").arg("--version"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    lv::with_log(&lab, lab.start_network(&Network::new(NETWORK, BRIDGE, 20)))?;
    let taps = lv::with_log(&lab, lab.start_guest("g0", &[NETWORK]))?;
    let tap = taps.first().context("the guest has no tap")?.dev.clone();
    let ports = vec![tap.clone()];
    let mut obs = Observer::start(&lab.ns.name, BRIDGE, ports.clone())?;
    let mut host = Rtnl::open(&lab.ns.name)?;
    // The agent reads which taps are libvirt's, and which bridge is, from libvirt's run dir.
    let mut agent_args = extra.to_vec();
    agent_args.extend([
        "--libvirt-dir".to_owned(),
        lab.run_dir().to_string_lossy().into_owned(),
    ]);
    for &c in contenders {
        if c == Contender::Oracle {
            continue;
        }
        restore(&lab, &mut host, &mut obs, &tap, plan.quiet)?;
        let running = Running::start(
            c,
            (&lab.ns, BRIDGE, &ports),
            (bin, &agent_args),
            &mut obs,
            &mut host,
            tmp,
        )?;
        obs.settle(plan.quiet, SETTLE)?;
        let n = if c == Contender::None {
            plan.none_repeat
        } else {
            plan.repeat
        };
        progress(&format!(
            "bench: libvirt vs {}: the network restarted {n} times",
            c.key()
        ));
        for rep in 0..n {
            let t0 = monotonic_ns();
            lv::with_log(&lab, lab.virsh(&["net-destroy", NETWORK]))?;
            let t1 = monotonic_ns();
            lv::with_log(&lab, lab.virsh(&["net-start", NETWORK]))?;
            let t2 = monotonic_ns();
            let m = obs.measure(t0, plan.timeout, plan.quiet)?;
            let outage_ns = match m.outcome {
                Outcome::Healed { outage_ns } => Some(outage_ns),
                _ => None,
            };
            out.trials.push(LibvirtTrial {
                contender: c,
                rep,
                outage_ns,
                after_start_ns: outage_ns.map(|o| o.saturating_sub(t2 - t0)),
                net_start_ns: t2 - t1,
                first_problem: m.first_problem,
            });
            if outage_ns.is_none() {
                restore(&lab, &mut host, &mut obs, &tap, plan.quiet)?;
            }
        }
        drop(running);
    }
    Ok(out)
}

/// The tap back on the bridge, and the lab healthy (with libvirt's STP on, 4 s later).
fn restore(
    lab: &LibvirtLab,
    host: &mut Rtnl,
    obs: &mut Observer,
    tap: &str,
    quiet: Duration,
) -> Result<()> {
    if obs.healthy() {
        return Ok(());
    }
    let bridge = lab.ns.ifindex(BRIDGE)?;
    if lab
        .not_forwarding(tap, BRIDGE)?
        .is_some_and(|why| why.contains("master"))
    {
        host.set_master(tap, Some(bridge))?;
    }
    obs.settle(quiet, SETTLE)
}

#[cfg(test)]
pub fn sample() -> LibvirtRun {
    let trial = |contender, rep, outage_ns: Option<u64>| LibvirtTrial {
        contender,
        rep,
        outage_ns,
        after_start_ns: outage_ns.map(|o| o.saturating_sub(120_000_000)),
        net_start_ns: 90_000_000,
        first_problem: Some("vnet0 does not exist".into()),
    };
    LibvirtRun {
        libvirt: "9.0.0".into(),
        skipped: None,
        timeout_s: 10.0,
        trials: vec![
            trial(Contender::BridgeGuard, 0, Some(131_000_000)),
            trial(Contender::BridgeGuard, 1, Some(128_000_000)),
            trial(Contender::Shell, 0, Some(4_300_000_000)),
            trial(Contender::None, 0, None),
        ],
    }
}
