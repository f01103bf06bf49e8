//! Results: per-trial records, per-cell statistics and the targets; written as JSON here and as
//! markdown by `markdown`.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    contenders::Contender,
    faults::{Fault, Injected},
    fighter::Fight,
    loops::LoopRun,
    machine::Machine,
    observer::{Measured, Outcome},
    pipeline::{Pipeline, RepairLatency},
    stats::{self, human_ns},
};

/// How faults follow each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Spaced: each fault on a lab that has been quiet for a while.
    #[default]
    Paced,
    /// Back to back: the next fault as soon as the last one is repaired.
    Storm,
}

impl Mode {
    pub fn key(self) -> &'static str {
        match self {
            Self::Paced => "paced",
            Self::Storm => "storm",
        }
    }
}

/// One injected fault.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trial {
    #[serde(default)]
    pub mode: Mode,
    pub vms: usize,
    pub fault: Fault,
    pub contender: Contender,
    pub rep: usize,
    /// `None`: not healed within the timeout (or never observed).
    pub outage_ns: Option<u64>,
    /// From the fault's first request to its last (a flap's "up", the bridge's re-creation);
    /// for a guest flap this includes waiting for the bridge to notice the link went down.
    pub last_step_ns: u64,
    pub observed: bool,
    pub first_unhealthy_ns: Option<u64>,
    pub episodes: u32,
    pub first_problem: Option<String>,
    pub carrier_queried: bool,
    pub overrun: bool,
    /// bridge-guard's "repaired: …" log messages during the trial.
    pub repairs: Vec<String>,
    /// Lines of guard output during the trial (the shell guard prints one per fix run).
    pub guard_lines: usize,
}

impl Trial {
    /// The record of a fault injected `at` and measured as `m`; `repairs` are bridge-guard's
    /// "repaired: …" log messages meanwhile.
    pub fn of(
        (mode, vms, fault, contender, rep): (Mode, usize, Fault, Contender, usize),
        at: &Injected,
        m: &Measured,
        repairs: Vec<String>,
    ) -> Self {
        Self {
            mode,
            vms,
            fault,
            contender,
            rep,
            outage_ns: match m.outcome {
                Outcome::Healed { outage_ns } => Some(outage_ns),
                _ => None,
            },
            last_step_ns: at.last - at.t0,
            observed: !matches!(m.outcome, Outcome::NotObserved),
            first_unhealthy_ns: m.first_unhealthy_ns,
            episodes: m.episodes,
            first_problem: m.first_problem.clone(),
            carrier_queried: m.carrier_queried,
            overrun: m.overrun,
            repairs,
            guard_lines: m.guard_lines.len(),
        }
    }

    /// The outage after the fault was in place: from its last request, or from the first
    /// notification that showed it, whichever came later. No guard can act before then, so
    /// this is the share a guard decides; the rest is the kernel carrying out the fault
    /// (a detach waits for an RCU grace period, a bridge deletion for one per port).
    pub fn after_fault_ns(&self) -> Option<u64> {
        let in_place = self
            .last_step_ns
            .max(self.first_unhealthy_ns.unwrap_or_default());
        self.outage_ns.map(|o| o.saturating_sub(in_place))
    }
}

/// Statistics of one (mode, lab size, fault, contender).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    #[serde(default)]
    pub mode: Mode,
    pub vms: usize,
    pub fault: Fault,
    pub contender: Contender,
    pub trials: usize,
    pub not_healed: usize,
    /// The outage from injection (its fields stay at the top level of the JSON).
    #[serde(flatten)]
    pub outage: Spread,
    /// The same statistics of [`Trial::after_fault_ns`].
    #[serde(default)]
    pub after_fault: Spread,
}

/// Median, p99 and max of one measure; the shell guard's median ÷ this median (how many times
/// faster than the shell guard); and this median ÷ the oracle's (how many times the least any
/// guard could do). `None` where the rank falls on a fault not healed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub median_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub max_ns: Option<u64>,
    pub speedup_vs_shell: Option<f64>,
    #[serde(default)]
    pub vs_oracle: Option<f64>,
}

impl Spread {
    /// From values sorted with not-healed ones (None) last.
    fn of(sorted: &[Option<u64>]) -> Self {
        Self {
            median_ns: stats::nearest_rank(sorted, 50.0).flatten(),
            p99_ns: stats::nearest_rank(sorted, 99.0).flatten(),
            max_ns: sorted.last().copied().flatten(),
            speedup_vs_shell: None,
            vs_oracle: None,
        }
    }
}

/// `num` ÷ `den`.
fn ratio(num: Option<u64>, den: Option<u64>) -> Option<f64> {
    #[expect(clippy::cast_precision_loss, reason = "ratios")]
    num.zip(den).map(|(n, d)| n as f64 / d.max(1) as f64)
}

/// Sorted with not-healed ones (None) last.
fn sorted(mut v: Vec<Option<u64>>) -> Vec<Option<u64>> {
    v.sort_by_key(|o| o.unwrap_or(u64::MAX));
    v
}

/// What one contender cost over one lab size's faults.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunCost {
    #[serde(default)]
    pub mode: Mode,
    pub vms: usize,
    pub contender: Contender,
    pub trials: usize,
    pub cpu_ms: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    /// Resident memory once ready and settled, before the first fault.
    #[serde(default)]
    pub idle_rss_kib: Option<u64>,
    pub ready_line: String,
    pub repair_latency: Vec<RepairLatency>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub met: Option<bool>,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub vms: Vec<usize>,
    pub repeat: usize,
    pub none_repeat: usize,
    pub timeout_s: u64,
    pub quiet_ms: u64,
    pub spacing_ms: u64,
    pub quick: bool,
    /// Extra arguments given to `bridge-guard run` (`--agent-arg`).
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// Some parts or contenders were left out (`--only`, `--contender`).
    #[serde(default)]
    pub partial: bool,
    #[serde(default)]
    pub storm_vms: usize,
    #[serde(default)]
    pub storm_secs: f64,
    #[serde(default)]
    pub storm_bound_s: f64,
    #[serde(default)]
    pub fight_secs: f64,
    #[serde(default)]
    pub loop_wait_s: f64,
    #[serde(default)]
    pub loop_packets: u64,
}

/// bridge-guard's memory over one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryRun {
    pub run: String,
    /// VmRSS once ready and settled.
    pub idle_kib: Option<u64>,
    /// VmHWM at the end.
    pub peak_kib: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub started_unix: u64,
    pub duration_s: f64,
    pub settings: Settings,
    pub machine: Machine,
    /// The paced mode's cells.
    pub cells: Vec<Cell>,
    #[serde(default)]
    pub storm_cells: Vec<Cell>,
    pub costs: Vec<RunCost>,
    pub pipeline: Option<Pipeline>,
    #[serde(default)]
    pub fights: Vec<Fight>,
    #[serde(default)]
    pub loop_run: Option<LoopRun>,
    #[serde(default)]
    pub libvirt: Option<super::libvirt::LibvirtRun>,
    #[serde(default)]
    pub memory: Vec<MemoryRun>,
    pub targets: Vec<Target>,
    pub trials: Vec<Trial>,
    pub shell_fix_script: String,
    pub shell_monitor_loop: String,
}

/// The statistics of every (lab size, fault, contender) of `mode`.
pub fn cells(trials: &[Trial], vms: &[usize], mode: Mode) -> Vec<Cell> {
    let mut out = Vec::new();
    for &n in vms {
        for fault in Fault::ALL {
            let mut row = Vec::new();
            for c in Contender::ALL {
                let these: Vec<&Trial> = trials
                    .iter()
                    .filter(|t| {
                        t.mode == mode && t.vms == n && t.fault == fault && t.contender == c
                    })
                    .collect();
                if these.is_empty() {
                    continue;
                }
                let v = sorted(these.iter().map(|t| t.outage_ns).collect());
                row.push(Cell {
                    mode,
                    vms: n,
                    fault,
                    contender: c,
                    trials: v.len(),
                    not_healed: v.iter().filter(|o| o.is_none()).count(),
                    outage: Spread::of(&v),
                    after_fault: Spread::of(&sorted(
                        these.iter().map(|t| t.after_fault_ns()).collect(),
                    )),
                });
            }
            let medians = |who: Contender| {
                let c = row.iter().find(|c| c.contender == who);
                (
                    c.and_then(|c| c.outage.median_ns),
                    c.and_then(|c| c.after_fault.median_ns),
                )
            };
            let (shell, shell_after) = medians(Contender::Shell);
            let (oracle, oracle_after) = medians(Contender::Oracle);
            for c in &mut row {
                c.outage.speedup_vs_shell = ratio(shell, c.outage.median_ns);
                c.after_fault.speedup_vs_shell = ratio(shell_after, c.after_fault.median_ns);
                c.outage.vs_oracle = ratio(c.outage.median_ns, oracle);
                c.after_fault.vs_oracle = ratio(c.after_fault.median_ns, oracle_after);
            }
            out.extend(row);
        }
    }
    out
}

/// bridge-guard's memory in every run that started it.
pub fn memory(r: &Report) -> Vec<MemoryRun> {
    let mut v: Vec<MemoryRun> = r
        .costs
        .iter()
        .filter(|c| c.contender == Contender::BridgeGuard)
        .map(|c| MemoryRun {
            run: format!("{}, {} VMs", c.mode.key(), c.vms),
            idle_kib: c.idle_rss_kib,
            peak_kib: c.peak_rss_kib,
        })
        .collect();
    v.extend(
        r.fights
            .iter()
            .filter(|f| f.contender == Contender::BridgeGuard)
            .map(|f| MemoryRun {
                run: format!("fighter, {} VMs", f.vms),
                idle_kib: f.idle_rss_kib,
                peak_kib: f.peak_rss_kib,
            }),
    );
    v.extend(r.loop_run.iter().map(|l| MemoryRun {
        run: format!("loop, {} VMs", l.vms),
        idle_kib: l.idle_rss_kib,
        peak_kib: l.peak_rss_kib,
    }));
    v.extend(r.pipeline.iter().map(|p| MemoryRun {
        run: format!("pipeline, {} churn ports", p.churn_ports),
        idle_kib: None,
        peak_kib: p.agent_peak_rss_kib,
    }));
    v
}

/// Writes bench.json, bench.md and bench.svg to `out`, and the document to `docs` if given.
pub fn write(r: &Report, out: &Path, svg: &str, docs: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(out.join("bench.json"), json)?;
    std::fs::write(out.join("bench.svg"), svg)?;
    std::fs::write(
        out.join("bench.md"),
        super::markdown::document(r, Some("bench.svg")),
    )?;
    if let Some(docs) = docs {
        if let Some(dir) = docs.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let svg_path = docs.with_extension("svg");
        std::fs::write(&svg_path, svg)
            .with_context(|| format!("writing {}", svg_path.display()))?;
        let name = svg_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // What the VM matrix wrote between its markers stays.
        let old = std::fs::read_to_string(docs).ok();
        let text = super::markdown::keep_vmtest_block(
            old.as_deref(),
            &super::markdown::document(r, Some(&name)),
        );
        std::fs::write(docs, text).with_context(|| format!("writing {}", docs.display()))?;
    }
    Ok(())
}

/// A one-line summary of a cell for progress output.
pub fn short(v: &[Option<u64>]) -> String {
    let healed: Vec<u64> = v.iter().flatten().copied().collect();
    match stats::summary(&healed) {
        Some((m, _, mx)) => format!("median {} max {}", human_ns(m), human_ns(mx)),
        None => "none healed".to_owned(),
    }
}

/// A small report of every part, for the rendering and target tests.
#[cfg(test)]
pub fn sample() -> Report {
    let trial = |mode, fault, contender, outage_ns: Option<u64>| Trial {
        mode,
        vms: 4,
        fault,
        contender,
        rep: 0,
        outage_ns,
        last_step_ns: 100_000,
        observed: true,
        first_unhealthy_ns: Some(50_000),
        episodes: 1,
        first_problem: None,
        carrier_queried: false,
        overrun: false,
        repairs: vec!["repaired: re-attach vnet0 to br0: was detached".to_owned()],
        guard_lines: 1,
    };
    let mut trials = Vec::new();
    for fault in Fault::ALL {
        for (c, ns) in [
            (Contender::BridgeGuard, 900_000),
            (Contender::Oracle, 800_000),
            (Contender::Shell, 9_000_000),
        ] {
            trials.push(trial(Mode::Paced, fault, c, Some(ns)));
            trials.push(trial(Mode::Storm, fault, c, Some(ns)));
        }
    }
    // One storm fault bridge-guard left unrepaired.
    trials.push(trial(
        Mode::Storm,
        Fault::Detach,
        Contender::BridgeGuard,
        None,
    ));
    let machine = Machine {
        nproc: 2,
        mem_total_mib: 24_000,
        kernel: "6.18".to_owned(),
        cpu_model: "test".to_owned(),
        hooks: Vec::new(),
        agent: "bridge-guard".to_owned(),
        loadavg_start: "0.1".to_owned(),
        loadavg_end: "0.1".to_owned(),
        busy_percent: None,
        steal_percent: None,
        busiest_at_start: Vec::new(),
        other_load: Vec::new(),
    };
    let mut r = Report {
        command: "cargo xtask bench".to_owned(),
        started_unix: 0,
        duration_s: 1.0,
        settings: Settings {
            vms: vec![4],
            repeat: 1,
            none_repeat: 1,
            timeout_s: 10,
            quiet_ms: 250,
            spacing_ms: 1100,
            quick: false,
            agent_args: Vec::new(),
            partial: false,
            storm_vms: 4,
            storm_secs: 10.0,
            storm_bound_s: 8.0,
            fight_secs: 5.0,
            loop_wait_s: 2.0,
            loop_packets: 100_000,
        },
        machine,
        cells: cells(&trials, &[4], Mode::Paced),
        storm_cells: cells(&trials, &[4], Mode::Storm),
        costs: vec![RunCost {
            mode: Mode::Storm,
            vms: 4,
            contender: Contender::BridgeGuard,
            trials: 16,
            cpu_ms: Some(10.0),
            peak_rss_kib: Some(57_000),
            idle_rss_kib: Some(16_800),
            ready_line: String::new(),
            repair_latency: Vec::new(),
        }],
        pipeline: None,
        fights: vec![Fight {
            contender: Contender::BridgeGuard,
            vms: 4,
            secs: 5.0,
            requests: 20_000,
            slowest_request_ns: 1_000_000,
            bench_cpu_ms: Some(5_000.0),
            cpu_ms: Some(150.0),
            cpu_percent: Some(3.0),
            log_lines: 4,
            lines_per_s: 0.8,
            healthy_after_ns: Some(2_000_000),
            bound_s: 8.0,
            lines_after: 1,
            idle_rss_kib: Some(16_000),
            peak_rss_kib: Some(18_000),
        }],
        libvirt: Some(super::libvirt::sample()),
        loop_run: Some(LoopRun {
            vms: 4,
            wait_s: 2.0,
            packet_cap: 100_000,
            blocked_after_ns: None,
            blocked: None,
            packets_before_block: None,
            packets_total: 100_300,
            ended_by: "the bench at its cap of 100000 frames".to_owned(),
            lasted_ns: 700_000_000,
            teardown_ns: 40_000_000,
            idle_rss_kib: None,
            peak_rss_kib: None,
        }),
        memory: Vec::new(),
        targets: Vec::new(),
        trials,
        shell_fix_script: String::new(),
        shell_monitor_loop: String::new(),
    };
    r.memory = memory(&r);
    r.targets = super::targets::all(&r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(c: Contender, outage_ns: Option<u64>) -> Trial {
        Trial {
            mode: Mode::Paced,
            vms: 4,
            fault: Fault::Detach,
            contender: c,
            rep: 0,
            outage_ns,
            last_step_ns: 0,
            observed: true,
            first_unhealthy_ns: None,
            episodes: 1,
            first_problem: None,
            carrier_queried: false,
            overrun: false,
            repairs: Vec::new(),
            guard_lines: 0,
        }
    }

    #[test]
    fn cells_rank_not_healed_last_and_compare_with_the_shell_median() {
        let trials = vec![
            trial(Contender::BridgeGuard, Some(1_000_000)),
            trial(Contender::BridgeGuard, Some(3_000_000)),
            trial(Contender::BridgeGuard, Some(2_000_000)),
            trial(Contender::Shell, Some(20_000_000)),
            trial(Contender::Oracle, Some(500_000)),
            trial(Contender::None, None),
        ];
        assert!(cells(&trials, &[4], Mode::Storm).is_empty());
        let cells = cells(&trials, &[4], Mode::Paced);
        let bg = cells
            .iter()
            .find(|c| c.contender == Contender::BridgeGuard)
            .expect("a bridge-guard cell");
        assert_eq!(bg.outage.median_ns, Some(2_000_000));
        assert_eq!(bg.outage.max_ns, Some(3_000_000));
        assert_eq!(bg.outage.speedup_vs_shell, Some(10.0));
        assert_eq!(bg.outage.vs_oracle, Some(4.0));
        let none = cells
            .iter()
            .find(|c| c.contender == Contender::None)
            .expect("a no-guard cell");
        assert_eq!((none.not_healed, none.outage.median_ns), (1, None));
        // After the fault was in place: less its last step or first sighting, the later.
        let mut t = trial(Contender::BridgeGuard, Some(5_000_000));
        t.last_step_ns = 1_000_000;
        t.first_unhealthy_ns = Some(400_000);
        assert_eq!(t.after_fault_ns(), Some(4_000_000));
        t.first_unhealthy_ns = Some(1_500_000);
        assert_eq!(t.after_fault_ns(), Some(3_500_000));
        assert_eq!(bg.after_fault.median_ns, Some(2_000_000));
        let svg = super::super::svg::chart(&cells, &[4], 10);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn storm_cells_count_the_unrepaired_and_memory_lists_every_run() {
        let r = sample();
        let detach = r
            .storm_cells
            .iter()
            .find(|c| c.fault == Fault::Detach && c.contender == Contender::BridgeGuard)
            .expect("a storm cell");
        assert_eq!((detach.trials, detach.not_healed), (2, 1));
        // Nearest rank of two with one unrepaired: the median is the repaired one.
        assert_eq!(detach.outage.median_ns, Some(900_000));
        assert_eq!(detach.outage.p99_ns, None);
        let runs: Vec<&str> = r.memory.iter().map(|m| m.run.as_str()).collect();
        assert_eq!(runs, ["storm, 4 VMs", "fighter, 4 VMs", "loop, 4 VMs"]);
        // The JSON of this version reads back.
        let json = serde_json::to_string(&r).expect("serialises");
        let back: Report = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back.storm_cells.len(), r.storm_cells.len());
    }
}
