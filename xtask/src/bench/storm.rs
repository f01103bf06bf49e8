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
    faults::{self, Fault},
    report::{self, Mode, RunCost, Trial},
    watched::WatchedLab,
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

/// Runs every class back to back against `running` on `w`; one trial per fault injected.
pub fn run(
    plan: &Plan,
    w: &mut WatchedLab,
    running: &Running,
    progress: &dyn Fn(&str),
) -> Result<Vec<Trial>> {
    let n = w.lab.guests.len();
    let who = running.contender.key();
    let mut trials = Vec::new();
    for fault in Fault::ALL {
        // Every class starts on the lab as the bench leaves it: STP off, all forwarding.
        w.restore()?;
        let started = Instant::now();
        let mut rep = 0;
        let mut outages = Vec::new();
        while started.elapsed() < plan.per_class {
            running.arm(fault);
            w.obs.drain_guard_lines();
            let at = faults::inject(&mut w.lab, &mut w.obs, fault, rep)?;
            // No quiet wait: the first notification that shows the lab healthy ends it.
            let m = w.obs.measure(at.t0, plan.bound, Duration::ZERO)?;
            let t = Trial::of(
                (Mode::Storm, n, fault, running.contender, rep),
                &at,
                &m,
                Vec::new(),
            );
            let outage = t.outage_ns;
            outages.push(outage);
            trials.push(t);
            if outage.is_none() {
                progress(&format!(
                    "bench: storm {who} {}: fault {} not repaired within {:?} ({}); restoring the lab",
                    fault.key(),
                    rep + 1,
                    plan.bound,
                    w.obs.problem()
                ));
                w.restore()?;
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
        "bench: storm: building the lab ({vms} VM namespaces); {:.1} s per fault class and contender",
        plan.per_class.as_secs_f64()
    ));
    let mut w = WatchedLab::new("storm", vms, plan.quiet, |_| Ok(Vec::new()))?;
    let (mut trials, mut costs) = (Vec::new(), Vec::new());
    for &c in contenders {
        progress(&format!("bench: storm: {} starting", c.key()));
        let running = w.start(c, (bin, extra), tmp)?;
        let idle_rss_kib = running.rss_now_kib();
        let cpu0 = running.cpu_ms();
        let these = run(plan, &mut w, &running, progress)?;
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
