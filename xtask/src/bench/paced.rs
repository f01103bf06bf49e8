//! Paced mode: each fault on a lab that has been quiet for a while, every contender in turn,
//! on each lab size. Bridge-guard's faults are also spaced in time (see `Plan::spacing`).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    contenders::Contender,
    faults::{self, Fault},
    observer::Outcome,
    pipeline,
    report::{self, Mode, RunCost, Trial},
    stats,
    watched::WatchedLab,
};
use crate::lab::{TempDir, http_get};

pub struct Plan {
    pub repeat: usize,
    pub none_repeat: usize,
    pub timeout: Duration,
    pub quiet: Duration,
    /// The least time between two of bridge-guard's faults, and between its last repair and
    /// the next fault.
    pub spacing: Duration,
    pub contenders: Vec<Contender>,
}

impl Plan {
    /// A rough duration for one lab size, from what each trial costs on a quiet machine.
    pub fn estimate(&self, n: usize) -> Duration {
        let t = self.timeout.as_secs_f64();
        let gap = self.spacing.as_secs_f64();
        // Per trial: the quiet wait, plus the restore and settle before it.
        let over = self.quiet.as_secs_f64() + 0.3;
        #[expect(clippy::cast_precision_loss, reason = "estimate")]
        let setup = 4.0 + 0.1 * n as f64;
        #[expect(clippy::cast_precision_loss, reason = "estimate")]
        let (r, nr) = (self.repeat as f64, self.none_repeat as f64);
        let has = |c| self.contenders.contains(&c);
        let mut secs = setup;
        // bridge-guard: paced trials; the oracle: quick ones; shell and no guard: 4 s of STP
        // timers on two faults, and no guard the timeout on the other three.
        if has(Contender::BridgeGuard) {
            secs += 3.0 + r * 5.0 * gap;
        }
        if has(Contender::Oracle) {
            secs += 1.0 + r * 5.0 * (0.05 + over);
        }
        if has(Contender::Shell) {
            secs += 1.0 + r * (3.0 * (0.05 + over) + 2.0 * (4.05 + over));
        }
        if has(Contender::None) {
            secs += nr * (2.0 * (4.05 + over) + 3.0 * (t + over + 0.3));
        }
        Duration::from_secs_f64(secs)
    }
}

/// What a run of one contender produced.
pub struct Results {
    pub trials: Vec<Trial>,
    pub costs: Vec<RunCost>,
}

/// One lab size: every contender on every fault.
pub fn run(
    plan: &Plan,
    n: usize,
    (bin, extra): (&Path, &[String]),
    tmp: &TempDir,
    progress: &dyn Fn(&str),
) -> Result<Results> {
    progress(&format!(
        "bench: paced N={n}: building the lab ({n} VM namespaces); about {:.0} s",
        plan.estimate(n).as_secs_f64()
    ));
    let mut out = Results {
        trials: Vec::new(),
        costs: Vec::new(),
    };
    let mut w = WatchedLab::new(&format!("n{n}"), n, plan.quiet, |_| Ok(Vec::new()))?;
    for contender in Contender::ALL
        .into_iter()
        .filter(|c| plan.contenders.contains(c))
    {
        let reps = if contender == Contender::None {
            plan.none_repeat
        } else {
            plan.repeat
        };
        progress(&format!(
            "bench: paced N={n} contender={}: starting{}",
            contender.key(),
            if contender == Contender::None {
                format!(" ({reps} repetitions per fault: no guard heals most faults never)")
            } else {
                String::new()
            }
        ));
        let running = w.start(contender, (bin, extra), tmp)?;
        let (lab, obs) = (&mut w.lab, &mut w.obs);
        let idle_rss_kib = running.rss_now_kib();
        let cpu0 = running.cpu_ms();
        let mut next_injection: Option<Instant> = None;
        let mut count = 0;
        for fault in Fault::ALL {
            let mut outages = Vec::new();
            for rep in 0..reps {
                if contender == Contender::None || !obs.healthy() {
                    faults::restore(lab, false)?;
                }
                if let Err(e) = obs.settle(plan.quiet, Duration::from_secs(15)) {
                    progress(&format!("bench: {e:#}; restoring the lab"));
                    faults::restore(lab, false)?;
                    obs.settle(plan.quiet, Duration::from_secs(30))?;
                }
                // Pacing, not waiting: bridge-guard never needs the same repair again within
                // its 1 s backoff window of the last one.
                if let Some(at) = next_injection.filter(|_| contender == Contender::BridgeGuard) {
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                }
                obs.drain_guard_lines();
                running.arm(fault);
                let injected = Instant::now();
                let at = faults::inject(lab, obs, fault, rep)?;
                let m = obs.measure(at.t0, plan.timeout, plan.quiet)?;
                // The measurement ended `quiet` after the last repair.
                next_injection = Some(
                    (injected + plan.spacing)
                        .max(Instant::now() + plan.spacing.saturating_sub(plan.quiet)),
                );
                count += 1;
                let shown = match &m.outcome {
                    Outcome::Healed { outage_ns } => stats::human_ns(*outage_ns),
                    Outcome::NotHealed { why } => {
                        format!("not healed after {:?} ({why})", plan.timeout)
                    }
                    Outcome::NotObserved => "fault never showed in a notification".to_owned(),
                };
                progress(&format!(
                    "bench: paced N={n} fault={} contender={} {}/{reps} outage {shown}",
                    fault.key(),
                    contender.key(),
                    rep + 1,
                ));
                let repairs = m
                    .guard_lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|v| v["message"].as_str().map(str::to_owned))
                    .filter(|msg| msg.starts_with("repaired:"))
                    .collect();
                let trial = Trial::of((Mode::Paced, n, fault, contender, rep), &at, &m, repairs);
                let outage = trial.outage_ns;
                outages.push(outage);
                out.trials.push(trial);
                if outage.is_none() {
                    faults::restore(lab, false)?;
                }
            }
            progress(&format!(
                "bench: paced N={n} fault={} contender={}: {}",
                fault.key(),
                contender.key(),
                report::short(&outages)
            ));
        }
        if let Some((sent, refused)) = running.oracle_tally().filter(|t| t.1 > 0) {
            progress(&format!(
                "bench: paced N={n}: the kernel refused {refused} of the oracle's requests ({sent} repairs)"
            ));
        }
        let repair_latency = match &running.metrics {
            Some(addr) => http_get(&lab.lab.host.name, addr, "/metrics")
                .map(|t| pipeline::repair_latencies(&t))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        out.costs.push(RunCost {
            mode: Mode::Paced,
            vms: n,
            contender,
            trials: count,
            cpu_ms: running.cpu_ms().zip(cpu0).map(|(a, b)| a - b),
            peak_rss_kib: running.peak_rss_kib(),
            idle_rss_kib,
            ready_line: running.ready_line.clone(),
            repair_latency,
        });
        drop(running);
    }
    Ok(out)
}
