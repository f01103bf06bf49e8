//! `cargo xtask bench`: bridge-guard against the shell guard users write today, and against no
//! guard, on the same faults in a network-namespace lab, measured from link notifications.
//!
//! - `lab` (crate level) builds the namespaces, `faults` injects and restores, `monitor` turns
//!   notifications into outages, `contenders` runs the guards, `pipeline` measures the agent's
//!   event path on its own, `report` and `svg` write the results.

pub mod contenders;
pub mod faults;
mod machine;
mod markdown;
pub mod monitor;
pub mod observer;
mod pipeline;
mod report;
pub mod rtnl;
pub mod sched;
pub mod stats;
mod svg;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    contenders::{Contender, Running},
    faults::{BenchLab, Fault},
    observer::{Observer, Outcome},
    report::{Report, RunCost, Settings, Trial},
};
use crate::lab::{TempDir, http_get};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Lab sizes to run, as VMs per lab, comma-separated [default: 4,64; --quick: 4].
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    vms: Option<Vec<usize>>,
    /// Times each fault is injected per contender and lab size [default: 20; --quick: 5].
    #[arg(long, value_name = "R")]
    repeat: Option<usize>,
    /// Times each fault is injected with no guard, where most faults last until --timeout
    /// [default: 2, at most --repeat; --quick: 1].
    #[arg(long, value_name = "R")]
    none_repeat: Option<usize>,
    /// Seconds after which a fault counts as not healed [default: 10; --quick: 6].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Seconds the agent is watched doing nothing, for its idle CPU [default: 10; --quick: 3].
    #[arg(long, value_name = "SECS")]
    idle: Option<u64>,
    /// A short run (about 3 minutes): 4 VMs, 5 repetitions, fewer load steps. Does not write
    /// docs/benchmarks.md unless --docs is given.
    #[arg(long)]
    quick: bool,
    /// Skip the pipeline measurements (idle CPU, event rate, kernel-to-user delay).
    #[arg(long)]
    no_pipeline: bool,
    /// Where bench.json, bench.md and bench.svg go.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Also write the results here (and the chart beside it, as .svg)
    /// [default: docs/benchmarks.md on full runs].
    #[arg(long, value_name = "PATH")]
    docs: Option<PathBuf>,
    /// Do not write docs/benchmarks.md.
    #[arg(long, conflicts_with = "docs")]
    no_docs: bool,
    /// Use this bridge-guard binary instead of building one with `cargo xtask build --release`.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// An extra argument for `bridge-guard run` (repeatable), to compare settings, e.g.
    /// `--agent-arg=--no-ebpf` or `--agent-arg=--log-level=warn`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Only these contenders (repeatable) [default: all three]. The targets that compare with
    /// the shell guard need it.
    #[arg(long, value_enum, value_name = "NAME")]
    contender: Vec<Contender>,
    /// Run nothing: write the markdown, chart and docs again from an earlier run's bench.json.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
}

/// The run, with every default resolved.
struct Plan {
    vms: Vec<usize>,
    repeat: usize,
    none_repeat: usize,
    timeout: Duration,
    quiet: Duration,
    spacing: Duration,
    pipeline: Option<pipeline::Plan>,
    contenders: Vec<Contender>,
    quick: bool,
}

impl Plan {
    fn new(a: &Args) -> Result<Self> {
        let q = a.quick;
        let repeat = a.repeat.unwrap_or(if q { 5 } else { 20 });
        let plan = Self {
            vms: a
                .vms
                .clone()
                .unwrap_or_else(|| if q { vec![4] } else { vec![4, 64] }),
            repeat,
            none_repeat: a.none_repeat.unwrap_or(if q { 1 } else { 2 }).min(repeat),
            timeout: Duration::from_secs(a.timeout.unwrap_or(if q { 6 } else { 10 })),
            quiet: Duration::from_millis(250),
            spacing: Duration::from_millis(1100),
            pipeline: (!a.no_pipeline).then(|| pipeline::Plan {
                idle: Duration::from_secs(a.idle.unwrap_or(if q { 3 } else { 10 })),
                rates: if q {
                    vec![Some(2_000), Some(10_000), None]
                } else {
                    vec![
                        Some(1_000),
                        Some(2_000),
                        Some(5_000),
                        Some(10_000),
                        Some(20_000),
                        Some(50_000),
                        None,
                    ]
                },
                step: Duration::from_secs(if q { 1 } else { 2 }),
                latency_runs: vec![
                    ("spaced", 100, Duration::from_secs(if q { 1 } else { 2 })),
                    ("loaded", 5_000, Duration::from_secs(1)),
                ],
            }),
            contenders: if a.contender.is_empty() {
                Contender::ALL.to_vec()
            } else {
                a.contender.clone()
            },
            quick: q,
        };
        if plan.vms.is_empty() || plan.vms.iter().any(|n| !(1..=250).contains(n)) {
            bail!("--vms takes lab sizes from 1 to 250, e.g. --vms 4,64");
        }
        if plan.repeat == 0 {
            bail!("--repeat must be at least 1");
        }
        Ok(plan)
    }

    /// A rough duration, from what each trial costs on a quiet machine.
    fn estimate(&self) -> Duration {
        let t = self.timeout.as_secs_f64();
        let gap = self.spacing.as_secs_f64();
        // Per trial: the quiet wait, plus the restore and settle before it.
        let over = self.quiet.as_secs_f64() + 0.3;
        let mut secs = 0.0;
        for &n in &self.vms {
            #[expect(clippy::cast_precision_loss, reason = "estimate")]
            let setup = 4.0 + 0.1 * n as f64;
            #[expect(clippy::cast_precision_loss, reason = "estimate")]
            let (r, nr) = (self.repeat as f64, self.none_repeat as f64);
            // bridge-guard: paced trials; shell and no guard: 4 s of STP timers on two faults,
            // and no guard the timeout on the other three.
            let bg = 3.0 + r * 5.0 * gap;
            let shell = 1.0 + r * (3.0 * (0.05 + over) + 2.0 * (4.05 + over));
            let none = nr * (2.0 * (4.05 + over) + 3.0 * (t + over + 0.3));
            secs += setup + bg + shell + none;
        }
        if let Some(p) = &self.pipeline {
            #[expect(clippy::cast_precision_loss, reason = "estimate")]
            let steps = p.rates.len() as f64;
            let latency: f64 = p.latency_runs.iter().map(|r| r.2.as_secs_f64() + 1.0).sum();
            secs += 15.0 + p.idle.as_secs_f64() + steps * (p.step.as_secs_f64() + 1.5) + latency;
        }
        Duration::from_secs_f64(secs)
    }
}

fn progress(line: &str) {
    eprintln!("{line}");
}

/// One lab size: every contender on every fault.
fn fault_phase(
    plan: &Plan,
    n: usize,
    (bin, extra): (&Path, &[String]),
    tmp: &TempDir,
    trials: &mut Vec<Trial>,
    costs: &mut Vec<RunCost>,
) -> Result<()> {
    progress(&format!(
        "bench: N={n}: building the lab ({n} VM namespaces)"
    ));
    let mut lab = BenchLab::new("bgb", &format!("n{n}"), n)?;
    faults::restore(&mut lab, false)?;
    let mut obs = Observer::start(&lab.lab.host.name, lab.bridge(), lab.lab.ports())?;
    obs.settle(plan.quiet, Duration::from_secs(30))?;
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
            "bench: N={n} contender={}: starting{}",
            contender.key(),
            if contender == Contender::None {
                format!(" ({reps} repetitions per fault: no guard heals most faults never)")
            } else {
                String::new()
            }
        ));
        let running = Running::start(
            contender,
            &lab.lab.host,
            (bin, extra),
            &mut obs,
            &mut lab.host,
            tmp,
        )?;
        if !obs.healthy() {
            faults::restore(&mut lab, false)?;
        }
        obs.settle(plan.quiet, Duration::from_secs(30))?;
        let cpu0 = running.cpu_ms();
        let mut next_injection: Option<Instant> = None;
        let mut count = 0;
        for fault in Fault::ALL {
            let mut outages = Vec::new();
            for rep in 0..reps {
                if contender == Contender::None || !obs.healthy() {
                    faults::restore(&mut lab, false)?;
                }
                if let Err(e) = obs.settle(plan.quiet, Duration::from_secs(15)) {
                    progress(&format!("bench: {e:#}; restoring the lab"));
                    faults::restore(&mut lab, false)?;
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
                let injected = Instant::now();
                let at = faults::inject(&mut lab, &mut obs, fault, rep)?;
                let m = obs.measure(at.t0, plan.timeout, plan.quiet)?;
                // The measurement ended `quiet` after the last repair.
                next_injection = Some(
                    (injected + plan.spacing)
                        .max(Instant::now() + plan.spacing.saturating_sub(plan.quiet)),
                );
                count += 1;
                let outage = match &m.outcome {
                    Outcome::Healed { outage_ns } => Some(*outage_ns),
                    _ => None,
                };
                outages.push(outage);
                let shown = match &m.outcome {
                    Outcome::Healed { outage_ns } => stats::human_ns(*outage_ns),
                    Outcome::NotHealed { why } => {
                        format!("not healed after {:?} ({why})", plan.timeout)
                    }
                    Outcome::NotObserved => "fault never showed in a notification".to_owned(),
                };
                progress(&format!(
                    "bench: N={n} fault={} contender={} {}/{reps} outage {shown}",
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
                trials.push(Trial {
                    vms: n,
                    fault,
                    contender,
                    rep,
                    outage_ns: outage,
                    last_step_ns: at.last - at.t0,
                    observed: !matches!(m.outcome, Outcome::NotObserved),
                    first_unhealthy_ns: m.first_unhealthy_ns,
                    episodes: m.episodes,
                    first_problem: m.first_problem.clone(),
                    carrier_queried: m.carrier_queried,
                    overrun: m.overrun,
                    repairs,
                    guard_lines: m.guard_lines.len(),
                });
                if outage.is_none() {
                    faults::restore(&mut lab, false)?;
                }
            }
            progress(&format!(
                "bench: N={n} fault={} contender={}: {}",
                fault.key(),
                contender.key(),
                report::short(&outages)
            ));
        }
        let repair_latency = match &running.metrics {
            Some(addr) => http_get(&lab.lab.host.name, addr, "/metrics")
                .map(|t| pipeline::repair_latencies(&t))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        costs.push(RunCost {
            vms: n,
            contender,
            trials: count,
            cpu_ms: running.cpu_ms().zip(cpu0).map(|(a, b)| a - b),
            peak_rss_kib: running.peak_rss_kib(),
            ready_line: running.ready_line.clone(),
            repair_latency,
        });
        drop(running);
    }
    Ok(())
}

/// Where the results go: `--out`, and the docs file unless this is a quick run or --no-docs.
fn destinations(args: &Args, quick: bool) -> (PathBuf, Option<PathBuf>) {
    let root = crate::workspace_root();
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    };
    let docs = match (&args.docs, args.no_docs || quick) {
        (Some(d), _) => Some(abs(d)),
        (None, false) => Some(root.join("docs/benchmarks.md")),
        (None, true) => None,
    };
    (abs(&args.out), docs)
}

/// `--render`: the outputs again from a saved bench.json.
fn render(args: &Args, json: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench.json of this version", json.display()))?;
    let (out, docs) = destinations(args, report.settings.quick);
    let chart = svg::chart(
        &report.cells,
        &report.settings.vms,
        report.settings.timeout_s,
    );
    report::write(&report, &out, &chart, docs.as_deref())?;
    println!("{}", markdown::results(&report));
    println!("\n{}", markdown::targets(&report));
    progress(&format!(
        "bench: rendered {} into {}{}",
        json.display(),
        out.display(),
        docs.map_or_else(String::new, |d| format!(" and {}", d.display()))
    ));
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(json) = &args.render {
        return render(args, json);
    }
    if !crate::is_root() {
        bail!(
            "the bench needs root: it creates network namespaces and runs the agent's eBPF \
             hooks. Run `sudo -E cargo xtask bench`"
        );
    }
    crate::lab::install_signal_cleanup("bench")?;
    let plan = Plan::new(args)?;
    let command = std::env::args()
        .skip(1)
        .fold("cargo xtask".to_owned(), |s, a| format!("{s} {a}"));
    progress(&format!(
        "bench: {} run: labs of {:?} VMs, {} repetitions per fault ({} without a guard), timeout {:?}; estimated {:.0} min on a quiet 2-core machine",
        if plan.quick { "quick" } else { "full" },
        plan.vms,
        plan.repeat,
        plan.none_repeat,
        plan.timeout,
        plan.estimate().as_secs_f64() / 60.0
    ));
    let bin = match &args.agent {
        Some(p) => p.clone(),
        None => crate::build(true)?,
    };
    if !bin.is_file() {
        bail!("no agent at {}", bin.display());
    }
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let cpu_start = machine::cpu_times();
    let mut machine = machine::collect(&bin);
    let sampler = machine::LoadSampler::start();
    let tmp = TempDir::new("bgb", "work")?;
    let mut trials = Vec::new();
    let mut costs = Vec::new();
    for &n in &plan.vms {
        fault_phase(
            &plan,
            n,
            (&bin, &args.agent_arg),
            &tmp,
            &mut trials,
            &mut costs,
        )?;
    }
    let pipeline = match &plan.pipeline {
        Some(p) => Some(pipeline::run(p, (&bin, &args.agent_arg), &progress)?),
        None => None,
    };
    machine.finish(cpu_start);
    machine.other_load = sampler.finish();
    let cells = report::cells(&trials, &plan.vms);
    let targets = report::targets(&cells, pipeline.as_ref());
    let report = Report {
        command,
        started_unix,
        duration_s: started.elapsed().as_secs_f64(),
        settings: Settings {
            vms: plan.vms.clone(),
            repeat: plan.repeat,
            none_repeat: plan.none_repeat,
            timeout_s: plan.timeout.as_secs(),
            quiet_ms: u64::try_from(plan.quiet.as_millis()).unwrap_or(0),
            spacing_ms: u64::try_from(plan.spacing.as_millis()).unwrap_or(0),
            quick: plan.quick,
            agent_args: args.agent_arg.clone(),
        },
        machine,
        cells,
        costs,
        pipeline,
        targets,
        trials,
        shell_fix_script: contenders::FIX_SCRIPT.to_owned(),
        shell_monitor_loop: contenders::MONITOR_LOOP.to_owned(),
    };
    let (out, docs) = destinations(args, plan.quick);
    let chart = svg::chart(&report.cells, &plan.vms, plan.timeout.as_secs());
    report::write(&report, &out, &chart, docs.as_deref())?;
    println!("{}", markdown::results(&report));
    println!("\n{}", markdown::targets(&report));
    progress(&format!(
        "bench: done in {:.0} s; results in {}{}",
        report.duration_s,
        out.display(),
        docs.map_or_else(String::new, |d| format!(" and {}", d.display()))
    ));
    Ok(())
}
