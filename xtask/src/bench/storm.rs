//! Storm mode: every fault class back to back, as fast as the lab can inject and observe, the
//! way a reconnecting VPN or a network manager re-applying a profile on every route change
//! makes them. The next fault goes in as soon as a notification shows the last one repaired,
//! or after a bound when it is not; a fault not repaired within the bound counts as
//! unrepaired, and the bench restores the lab itself before the next one.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    contenders::{Contender, Running},
    faults::{self, BenchLab, Fault},
    observer::{Observer, Outcome},
    report::{self, Mode, RunCost, Trial},
};
use crate::lab::TempDir;

pub struct Plan {
    /// How long each class is injected for.
    pub per_class: Duration,
    /// How long a fault may take to be repaired before it counts as unrepaired.
    pub bound: Duration,
    /// The quiet wait of the bench's own restores.
    pub quiet: Duration,
}

impl Plan {
    /// A rough duration for one contender: each class its time, plus a bound's wait for the
    /// classes it never repairs, or STP's 4 s for those it leaves to the timers.
    pub fn estimate(&self, never: usize, slow: usize) -> Duration {
        #[expect(clippy::cast_possible_truncation, reason = "a handful of classes")]
        let (never, slow) = (never as u32, slow as u32);
        let classes = u32::try_from(Fault::ALL.len()).unwrap_or(5);
        self.per_class * classes
            + (self.bound + Duration::from_millis(700)) * never
            + Duration::from_secs(4) * slow
    }
}

/// Runs every class back to back against `running` on `lab`; one trial per fault injected.
pub fn run(
    plan: &Plan,
    lab: &mut BenchLab,
    obs: &mut Observer,
    running: &Running,
    progress: &dyn Fn(&str),
) -> Result<Vec<Trial>> {
    let n = lab.guests.len();
    let who = running.contender.key();
    let mut trials = Vec::new();
    for fault in Fault::ALL {
        // Every class starts on the lab as the bench leaves it: STP off, all forwarding.
        faults::restore(lab, false)?;
        obs.settle(plan.quiet, Duration::from_secs(30))?;
        let started = Instant::now();
        let mut rep = 0;
        let mut outages = Vec::new();
        while started.elapsed() < plan.per_class {
            running.arm(fault);
            obs.drain_guard_lines();
            let at = faults::inject(lab, obs, fault, rep)?;
            // No quiet wait: the first notification that shows the lab healthy ends it.
            let m = obs.measure(at.t0, plan.bound, Duration::ZERO)?;
            let outage = match m.outcome {
                Outcome::Healed { outage_ns } => Some(outage_ns),
                _ => None,
            };
            outages.push(outage);
            trials.push(Trial {
                mode: Mode::Storm,
                vms: n,
                fault,
                contender: running.contender,
                rep,
                outage_ns: outage,
                last_step_ns: at.last - at.t0,
                observed: !matches!(m.outcome, Outcome::NotObserved),
                first_unhealthy_ns: m.first_unhealthy_ns,
                episodes: m.episodes,
                first_problem: m.first_problem.clone(),
                carrier_queried: m.carrier_queried,
                overrun: m.overrun,
                repairs: Vec::new(),
                guard_lines: m.guard_lines.len(),
            });
            if outage.is_none() {
                progress(&format!(
                    "bench: storm {who} {}: fault {} not repaired within {:?} ({}); restoring the lab",
                    fault.key(),
                    rep + 1,
                    plan.bound,
                    obs.problem()
                ));
                faults::restore(lab, false)?;
                obs.settle(plan.quiet, Duration::from_secs(30))?;
            }
            rep += 1;
        }
        let unrepaired = outages.iter().filter(|o| o.is_none()).count();
        progress(&format!(
            "bench: storm {who} {}: {rep} faults in {:.1} s, {unrepaired} unrepaired; {}",
            fault.key(),
            started.elapsed().as_secs_f64(),
            report::short(&outages)
        ));
    }
    Ok(trials)
}

/// The storm lab: every contender of `contenders` in turn, each on its own start.
pub fn phase(
    plan: &Plan,
    (vms, contenders): (usize, &[Contender]),
    (bin, extra): (&Path, &[String]),
    tmp: &TempDir,
    progress: &dyn Fn(&str),
) -> Result<(Vec<Trial>, Vec<RunCost>)> {
    progress(&format!(
        "bench: storm: building the lab ({vms} VM namespaces); {:.0} s per fault class and contender",
        plan.per_class.as_secs_f64()
    ));
    let mut lab = BenchLab::new("bgb", "storm", vms)?;
    faults::restore(&mut lab, false)?;
    let ports = lab.lab.ports();
    let mut obs = Observer::start(&lab.lab.host.name, lab.bridge(), ports.clone())?;
    obs.settle(plan.quiet, Duration::from_secs(30))?;
    let (mut trials, mut costs) = (Vec::new(), Vec::new());
    for &c in contenders {
        progress(&format!("bench: storm: {} starting", c.key()));
        let running = Running::start(
            c,
            (&lab.lab.host, &ports),
            (bin, extra),
            &mut obs,
            &mut lab.host,
            tmp,
        )?;
        obs.settle(plan.quiet, Duration::from_secs(30))?;
        let idle_rss_kib = running.rss_now_kib();
        let cpu0 = running.cpu_ms();
        let these = run(plan, &mut lab, &mut obs, &running, progress)?;
        costs.push(RunCost {
            mode: Mode::Storm,
            vms,
            contender: c,
            trials: these.len(),
            cpu_ms: running.cpu_ms().zip(cpu0).map(|(a, b)| a - b),
            peak_rss_kib: running.peak_rss_kib(),
            idle_rss_kib,
            ready_line: running.ready_line.clone(),
            repair_latency: Vec::new(),
        });
        trials.extend(these);
    }
    Ok((trials, costs))
}
