//! Results: per-trial records, per-cell statistics and the targets; written as JSON here and as
//! markdown by `markdown`.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    contenders::Contender,
    faults::Fault,
    machine::Machine,
    pipeline::{Pipeline, RepairLatency},
    stats::{self, human_ns},
};

/// One injected fault.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trial {
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

/// Statistics of one (lab size, fault, contender).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
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

/// Median, p99 and max of one measure, and the shell guard's median ÷ this median: how many
/// times faster than the shell guard. `None` where the rank falls on a fault not healed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub median_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub max_ns: Option<u64>,
    pub speedup_vs_shell: Option<f64>,
}

impl Spread {
    /// From values sorted with not-healed ones (None) last.
    fn of(sorted: &[Option<u64>]) -> Self {
        Self {
            median_ns: stats::nearest_rank(sorted, 50.0).flatten(),
            p99_ns: stats::nearest_rank(sorted, 99.0).flatten(),
            max_ns: sorted.last().copied().flatten(),
            speedup_vs_shell: None,
        }
    }
}

/// `shell` ÷ `median`.
fn speedup(shell: Option<u64>, median: Option<u64>) -> Option<f64> {
    #[expect(clippy::cast_precision_loss, reason = "ratios")]
    shell.zip(median).map(|(s, m)| s as f64 / m.max(1) as f64)
}

/// Sorted with not-healed ones (None) last.
fn sorted(mut v: Vec<Option<u64>>) -> Vec<Option<u64>> {
    v.sort_by_key(|o| o.unwrap_or(u64::MAX));
    v
}

/// What one contender cost over one lab size's faults.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunCost {
    pub vms: usize,
    pub contender: Contender,
    pub trials: usize,
    pub cpu_ms: Option<f64>,
    pub peak_rss_kib: Option<u64>,
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
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub started_unix: u64,
    pub duration_s: f64,
    pub settings: Settings,
    pub machine: Machine,
    pub cells: Vec<Cell>,
    pub costs: Vec<RunCost>,
    pub pipeline: Option<Pipeline>,
    pub targets: Vec<Target>,
    pub trials: Vec<Trial>,
    pub shell_fix_script: String,
    pub shell_monitor_loop: String,
}

pub fn cells(trials: &[Trial], vms: &[usize]) -> Vec<Cell> {
    let mut out = Vec::new();
    for &n in vms {
        for fault in Fault::ALL {
            let mut row = Vec::new();
            for c in Contender::ALL {
                let these: Vec<&Trial> = trials
                    .iter()
                    .filter(|t| t.vms == n && t.fault == fault && t.contender == c)
                    .collect();
                if these.is_empty() {
                    continue;
                }
                let v = sorted(these.iter().map(|t| t.outage_ns).collect());
                row.push(Cell {
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
            let shell = row.iter().find(|c| c.contender == Contender::Shell);
            let (shell, shell_after) = (
                shell.and_then(|c| c.outage.median_ns),
                shell.and_then(|c| c.after_fault.median_ns),
            );
            for c in &mut row {
                c.outage.speedup_vs_shell = speedup(shell, c.outage.median_ns);
                c.after_fault.speedup_vs_shell = speedup(shell_after, c.after_fault.median_ns);
            }
            out.extend(row);
        }
    }
    out
}

pub fn targets(cells: &[Cell], pipeline: Option<&Pipeline>) -> Vec<Target> {
    let bg: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.contender == Contender::BridgeGuard)
        .collect();
    let fmt = |o: Option<u64>| o.map_or_else(|| "not healed".to_owned(), human_ns);
    let misses = |f: &dyn Fn(&Cell) -> bool, what: &dyn Fn(&Cell) -> String| -> Vec<String> {
        bg.iter()
            .filter(|c| !f(c))
            .map(|c| format!("N={} {}: {}", c.vms, c.fault.key(), what(c)))
            .collect()
    };
    let verdict = |name: &str, miss: Vec<String>, ok: &str| Target {
        name: name.to_owned(),
        met: (!bg.is_empty()).then_some(miss.is_empty()),
        detail: if miss.is_empty() {
            ok.to_owned()
        } else {
            format!("missed on {}", miss.join("; "))
        },
    };
    let mut t = vec![
        verdict(
            "bridge-guard median outage < 1 ms on every fault",
            misses(
                &|c| c.outage.median_ns.is_some_and(|m| m < 1_000_000),
                &|c| format!("median {}", fmt(c.outage.median_ns)),
            ),
            "met on every fault and lab size",
        ),
        verdict(
            "bridge-guard p99 outage < 5 ms on every fault",
            misses(&|c| c.outage.p99_ns.is_some_and(|m| m < 5_000_000), &|c| {
                format!("p99 {}", fmt(c.outage.p99_ns))
            }),
            "met on every fault and lab size",
        ),
        verdict(
            "bridge-guard ≥ 30× faster than the shell guard's median on every fault",
            misses(
                &|c| c.outage.speedup_vs_shell.is_some_and(|s| s >= 30.0),
                &|c| {
                    c.outage
                        .speedup_vs_shell
                        .map_or_else(|| "no ratio".to_owned(), |s| format!("{s:.1}×"))
                },
            ),
            "met on every fault and lab size",
        ),
        verdict(
            "the same three, counted from the fault in place: median < 1 ms, p99 < 5 ms, ≥ 30× the shell guard",
            misses(
                &|c| {
                    let a = &c.after_fault;
                    a.median_ns.is_some_and(|m| m < 1_000_000)
                        && a.p99_ns.is_some_and(|m| m < 5_000_000)
                        && a.speedup_vs_shell.is_some_and(|s| s >= 30.0)
                },
                &|c| {
                    let a = &c.after_fault;
                    format!(
                        "median {}, p99 {}, {}",
                        fmt(a.median_ns),
                        fmt(a.p99_ns),
                        a.speedup_vs_shell
                            .map_or_else(|| "no ratio".to_owned(), |s| format!("{s:.1}×"))
                    )
                },
            ),
            "met on every fault and lab size",
        ),
    ];
    if let Some(p) = pipeline {
        t.push(Target {
            name: "zero lost events at 10k events/s".to_owned(),
            met: p.ten_k_zero_loss,
            detail: match p.ten_k_zero_loss {
                None => format!(
                    "not measurable: the load generator peaked at {:.0} changes/s",
                    p.steps.iter().map(|s| s.achieved_rate).fold(0.0, f64::max)
                ),
                Some(ok) => format!(
                    "{}; highest rate with zero loss: {}",
                    if ok { "no loss" } else { "events were lost" },
                    p.best_zero_loss_rate
                        .map_or_else(|| "none".to_owned(), |r| format!("{r:.0}/s"))
                ),
            },
        });
        t.push(Target {
            name: "idle agent CPU near zero (< 0.1% of one CPU)".to_owned(),
            met: Some(p.idle.percent_of_one_cpu < 0.1),
            detail: format!(
                "{:.3}% of one CPU ({:.2} ms on CPU in {:.0} s; utime+stime {:.0} ms)",
                p.idle.percent_of_one_cpu, p.idle.sched_ms, p.idle.secs, p.idle.cpu_ms
            ),
        });
    }
    t
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
        std::fs::write(docs, super::markdown::document(r, Some(&name)))
            .with_context(|| format!("writing {}", docs.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(c: Contender, outage_ns: Option<u64>) -> Trial {
        Trial {
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
            trial(Contender::None, None),
        ];
        let cells = cells(&trials, &[4]);
        let bg = cells
            .iter()
            .find(|c| c.contender == Contender::BridgeGuard)
            .expect("a bridge-guard cell");
        assert_eq!(bg.outage.median_ns, Some(2_000_000));
        assert_eq!(bg.outage.max_ns, Some(3_000_000));
        assert_eq!(bg.outage.speedup_vs_shell, Some(10.0));
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
}
