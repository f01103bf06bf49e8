//! The fighter: something that undoes a guard's repair as fast as it can. A thread in the lab
//! namespace re-enables kernel STP on the bridge over in-process rtnetlink, each request
//! acknowledged before the next, for a fixed time. Measured for the guard: its CPU share during
//! the fight (utime+stime from `/proc`), the lines it logged, and how long after the
//! fighter's last request the lab is healthy with STP off for good.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    contenders::{Contender, Running},
    rtnl::{Rtnl, monotonic_ns},
    stats::{self, human_ns},
    watched::WatchedLab,
};
use crate::lab::TempDir;

pub struct Plan {
    pub secs: Duration,
    /// How long the lab may take to be healthy after the fight before it counts as not.
    pub bound: Duration,
    pub quiet: Duration,
}

/// One fight against one guard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fight {
    pub contender: Contender,
    pub vms: usize,
    pub secs: f64,
    /// STP-on requests the fighter made.
    pub requests: u64,
    /// The fighter's longest wait for one request's acknowledgement.
    #[serde(default)]
    pub slowest_request_ns: u64,
    /// The bench's own CPU time over the fight (fighter, link monitor, observer): what the
    /// measurement itself cost the machine.
    #[serde(default)]
    pub bench_cpu_ms: Option<f64>,
    /// The guard's CPU time over the fight (for the shell guard, its whole process group with
    /// the fix scripts it ran).
    pub cpu_ms: Option<f64>,
    /// `cpu_ms` as a share of one CPU.
    pub cpu_percent: Option<f64>,
    /// Lines the guard wrote (the agent's log on stderr; the shell guard's one per fix run).
    pub log_lines: usize,
    pub lines_per_s: f64,
    /// From the fighter's last request to the lab healthy with STP off for good; `None`: not
    /// within `bound_s`.
    pub healthy_after_ns: Option<u64>,
    pub bound_s: f64,
    /// Lines the guard wrote after the fight until healthy (or the bound).
    pub lines_after: usize,
    #[serde(default)]
    pub idle_rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
}

impl Fight {
    pub fn healthy_text(&self) -> String {
        self.healthy_after_ns
            .map_or_else(|| format!("not within {:.0} s", self.bound_s), human_ns)
    }
}

/// Fights `running` on `lab` for `plan.secs`.
pub fn run(
    plan: &Plan,
    w: &mut WatchedLab,
    running: &Running,
    progress: &dyn Fn(&str),
) -> Result<Fight> {
    let who = running.contender.key();
    w.restore()?;
    let idle_rss_kib = running.rss_now_kib();
    let bridge = w.lab.bridge().to_owned();
    let mut fighter = Rtnl::open(&w.lab.lab.host.name)?;
    let obs = &mut w.obs;
    progress(&format!(
        "bench: fighter vs {who}: re-enabling STP on {bridge} flat out for {:.0} s",
        plan.secs.as_secs_f64()
    ));
    obs.drain_guard_lines();
    let cpu0 = running.cpu_ms();
    let own0 = stats::cpu_ms(std::process::id());
    let started = Instant::now();
    let secs = plan.secs;
    let handle = std::thread::Builder::new()
        .name("fighter".into())
        .spawn(move || -> Result<(u64, u64, u64)> {
            let (mut n, mut slowest) = (0u64, 0u64);
            while started.elapsed() < secs {
                let t = monotonic_ns();
                fighter.set_stp(&bridge, true)?;
                slowest = slowest.max(monotonic_ns() - t);
                n += 1;
            }
            Ok((n, slowest, monotonic_ns()))
        })
        .context("starting the fighter")?;
    let log_lines = obs.count_guard_lines_until(started + plan.secs)?;
    let (requests, slowest_request_ns, t_end) = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the fighter panicked"))??;
    let fought = started.elapsed().as_secs_f64();
    let cpu_ms = running.cpu_ms().zip(cpu0).map(|(a, b)| a - b);
    let bench_cpu_ms = stats::cpu_ms(std::process::id())
        .zip(own0)
        .map(|(a, b)| a - b);
    let (healthy_after_ns, lines_after) =
        obs.healthy_for_good(t_end, plan.bound, plan.quiet, true)?;
    let fight = Fight {
        contender: running.contender,
        vms: w.lab.guests.len(),
        secs: fought,
        requests,
        slowest_request_ns,
        bench_cpu_ms,
        cpu_ms,
        cpu_percent: cpu_ms.map(|ms| ms / (fought * 10.0)),
        log_lines,
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        lines_per_s: log_lines as f64 / fought,
        healthy_after_ns,
        bound_s: plan.bound.as_secs_f64(),
        lines_after,
        idle_rss_kib,
        peak_rss_kib: running.peak_rss_kib(),
    };
    progress(&format!(
        "bench: fighter vs {who}: {requests} STP-on requests in {fought:.1} s (slowest {}; the bench used {} CPU); {} CPU, {log_lines} lines; healthy {} after the fight",
        human_ns(slowest_request_ns),
        bench_cpu_ms.map_or_else(|| "?".to_owned(), |ms| format!("{ms:.0} ms")),
        fight
            .cpu_percent
            .map_or_else(|| "?".to_owned(), |p| format!("{p:.1}%")),
        fight.healthy_text()
    ));
    Ok(fight)
}

/// The fighter lab: each of `contenders` (a fresh start each) against the fighter.
pub fn phase(
    plan: &Plan,
    (vms, contenders): (usize, &[Contender]),
    (bin, extra): (&Path, &[String]),
    tmp: &TempDir,
    progress: &dyn Fn(&str),
) -> Result<Vec<Fight>> {
    let mut w = WatchedLab::new("fight", vms, plan.quiet, |_| Ok(Vec::new()))?;
    let mut fights = Vec::new();
    for &c in contenders {
        let running = w.start(c, (bin, extra), tmp)?;
        fights.push(run(plan, &mut w, &running, progress)?);
    }
    Ok(fights)
}
