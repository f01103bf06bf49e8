//! `cargo xtask bench`: bridge-guard against the least any guard could do (the oracle), the
//! shell guard users write today, and no guard, on the same faults in a network-namespace lab,
//! measured from link notifications.
//!
//! - `lab` (crate level) builds the namespaces, `faults` injects and restores, `monitor` and
//!   `observer` turn notifications into outages, `contenders` runs the guards (`oracle` is
//!   one), `rtnl` speaks netlink.
//! - The modes: `storm` (faults back to back), `fighter` (a flat-out fighter re-enabling STP),
//!   `loops` (a guest that bridges its two NICs), `paced` (faults spaced), `pipeline` (the
//!   agent's event path on its own).
//! - `report` and `targets` turn trials into results, `markdown` and `svg` write them.

pub mod contenders;
pub mod faults;
mod fighter;
pub mod libvirt;
mod loops;
mod machine;
pub(crate) mod markdown;
pub mod monitor;
pub mod observer;
mod oracle;
mod paced;
mod pipeline;
mod report;
pub mod rtnl;
pub mod sched;
pub mod stats;
mod storm;
mod svg;
mod targets;
mod watched;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    contenders::Contender,
    report::{Mode, Report, Settings},
};
use crate::lab::TempDir;

/// What `--help` adds after the options: the modes, the method and the targets.
const HELP: &str = "\
Modes (all by default; pick with --only):
  storm     every fault class back to back for --storm-secs each: the next fault goes in as
            soon as a notification shows the last one repaired, or after --storm-bound when it
            is not (then it counts as unrepaired and the bench restores the lab). Leads the
            results.
  fighter   a thread re-enables STP on the bridge flat out for --fight-secs; bridge-guard's
            and the shell guard's CPU share (utime+stime), log lines, and time to healthy (STP
            off, all forwarding) after the fighter's last request.
  loop      a VM namespace bridges its two veths (vnetA, vnetB on the guarded bridge): time
            from the loop forming to a loop port out of forwarding, and the frames through the
            loop before. The bench ends the loop itself after --loop-wait or --loop-packets.
  paced     each fault on a quiet lab, --repeat times per contender and lab size (--vms).
  libvirt   Debian's libvirtd restarts its network (virsh net-destroy, net-start) under a
            running qemu guest, --repeat times per contender: time until the guest's tap
            forwards on the new bridge, and net-start's own duration. Needs libvirt (`cargo
            xtask test` installs it); skipped with a note otherwise.
  pipeline  the agent alone: idle CPU, zero-loss event rate, kernel-to-user delay.

Contenders: bridge-guard; the oracle (a raw-netlink thread told the fault class in advance,
which sends the one right repair on the first notification showing it: bridge-guard ÷ oracle
is the agent's own overhead); the shell guard (`ip monitor` into a fix script); no guard.

Method: faults are injected through in-process rtnetlink, timestamped right before the
request; outages end at the link notification after which the bridge is up with carrier and
every VM port enslaved and forwarding, stamped by a SCHED_FIFO thread when it arrives.
\"From the fault in place\" starts at the fault's last request or first notification,
whichever is later. Memory: the agent's VmRSS once settled and VmHWM at the end of each run.

Targets (4 VMs, 2 cores): storm 0 unrepaired, median < 1 ms and p99 < 5 ms from the fault in
place; fighter < 5% of one CPU, <= 1 log line/s, healthy within 100 ms of the end; paced median
< 1 ms from injection and <= 1.25x the oracle; peak RSS < 20 MiB; a loop port out of
forwarding within 10 ms.

Timings on a shared machine include contention: publish only runs made when `uptime` shows a
load under 0.5 (the results record the load and the busiest other processes).";

/// A part of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Storm,
    Fighter,
    Loop,
    Paced,
    Libvirt,
    Pipeline,
}

impl Part {
    const ALL: [Self; 6] = [
        Self::Storm,
        Self::Fighter,
        Self::Loop,
        Self::Paced,
        Self::Libvirt,
        Self::Pipeline,
    ];
}

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = HELP)]
pub struct Args {
    /// Only these parts (repeatable) [default: all]. A partial run does not write
    /// docs/benchmarks.md unless --docs is given.
    #[arg(long, value_enum, value_name = "PART")]
    only: Vec<Part>,
    /// Lab sizes of the paced mode, as VMs per lab, comma-separated [default: 4,64; --quick: 4].
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    vms: Option<Vec<usize>>,
    /// VMs in the storm, fighter and loop labs, and the lab size the targets apply to.
    #[arg(long, value_name = "N", default_value_t = 4)]
    storm_vms: usize,
    /// Seconds of back-to-back faults per fault class and contender [default: 10; --quick: 1.5].
    #[arg(long, value_name = "SECS")]
    storm_secs: Option<f64>,
    /// Seconds after which a storm fault counts as unrepaired (also the fighter's bound on
    /// the time to healthy) [default: 8; --quick: 5].
    #[arg(long, value_name = "SECS")]
    storm_bound: Option<f64>,
    /// Seconds the fighter fights [default: 5; --quick: 2].
    #[arg(long, value_name = "SECS")]
    fight_secs: Option<f64>,
    /// Seconds a guest loop may last before the bench ends it [default: 2; --quick: 1].
    #[arg(long, value_name = "SECS")]
    loop_wait: Option<f64>,
    /// Frames through a guest loop after which the bench ends it.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    loop_packets: u64,
    /// Times each fault is injected per contender and lab size in the paced mode
    /// [default: 20; --quick: 2].
    #[arg(long, value_name = "R")]
    repeat: Option<usize>,
    /// Times each fault is injected with no guard in the paced mode, where most faults last
    /// until --timeout [default: 2, at most --repeat; --quick: 1].
    #[arg(long, value_name = "R")]
    none_repeat: Option<usize>,
    /// Seconds after which a paced fault counts as not healed [default: 10; --quick: 5].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Seconds the agent is watched doing nothing, for its idle CPU [default: 10; --quick: 3].
    #[arg(long, value_name = "SECS")]
    idle: Option<u64>,
    /// A short smoke run (about 3 minutes): 4 VMs, short storms and fights, 2 paced
    /// repetitions, fewer load steps. Does not write docs/benchmarks.md unless --docs is given.
    #[arg(long)]
    quick: bool,
    /// Skip the pipeline measurements (the same as leaving `pipeline` out of --only).
    #[arg(long)]
    no_pipeline: bool,
    /// Where bench.json, bench.md and bench.svg go.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Also write the results here (and the chart beside it, as .svg)
    /// [default: docs/benchmarks.md on full runs of every part].
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
    /// Only these contenders (repeatable) [default: all four]. The targets that compare with
    /// the shell guard or the oracle need them.
    #[arg(long, value_enum, value_name = "NAME")]
    contender: Vec<Contender>,
    /// Run nothing: write the markdown, chart and docs again from an earlier run's bench.json.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
}

/// The run, with every default resolved.
struct Plan {
    parts: Vec<Part>,
    storm_vms: usize,
    storm: storm::Plan,
    fighter: fighter::Plan,
    loops: loops::Plan,
    vms: Vec<usize>,
    paced: paced::Plan,
    libvirt: libvirt::Plan,
    pipeline: pipeline::Plan,
    contenders: Vec<Contender>,
    quick: bool,
}

fn secs(v: Option<f64>, full: f64, quick: f64, q: bool, flag: &str) -> Result<Duration> {
    let s = v.unwrap_or(if q { quick } else { full });
    if !(s.is_finite() && s > 0.0 && s <= 3600.0) {
        bail!("{flag} takes seconds from 0 to 3600, e.g. {flag} {full}, not {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

impl Plan {
    fn new(a: &Args) -> Result<Self> {
        let q = a.quick;
        let quiet = Duration::from_millis(250);
        let repeat = a.repeat.unwrap_or(if q { 2 } else { 20 });
        let none_repeat = a.none_repeat.unwrap_or(if q { 1 } else { 2 }).min(repeat);
        let timeout = Duration::from_secs(a.timeout.unwrap_or(if q { 5 } else { 10 }));
        let mut parts: Vec<Part> = if a.only.is_empty() {
            Part::ALL.to_vec()
        } else {
            Part::ALL
                .into_iter()
                .filter(|p| a.only.contains(p))
                .collect()
        };
        if a.no_pipeline {
            parts.retain(|p| *p != Part::Pipeline);
        }
        let bound = secs(a.storm_bound, 8.0, 5.0, q, "--storm-bound")?;
        let plan = Self {
            parts,
            storm_vms: a.storm_vms,
            storm: storm::Plan {
                per_class: secs(a.storm_secs, 10.0, 1.5, q, "--storm-secs")?,
                bound,
                quiet,
            },
            fighter: fighter::Plan {
                secs: secs(a.fight_secs, 5.0, 2.0, q, "--fight-secs")?,
                bound,
                quiet,
            },
            loops: loops::Plan {
                vms: a.storm_vms,
                wait: secs(a.loop_wait, 2.0, 1.0, q, "--loop-wait")?,
                packet_cap: a.loop_packets,
                quiet,
            },
            vms: a
                .vms
                .clone()
                .unwrap_or_else(|| if q { vec![4] } else { vec![4, 64] }),
            paced: paced::Plan {
                repeat,
                none_repeat,
                timeout,
                quiet,
                spacing: Duration::from_millis(1100),
                contenders: Vec::new(),
            },
            libvirt: libvirt::Plan {
                repeat,
                none_repeat,
                timeout,
                quiet,
            },
            pipeline: pipeline::Plan {
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
            },
            contenders: if a.contender.is_empty() {
                Contender::ALL.to_vec()
            } else {
                Contender::ALL
                    .into_iter()
                    .filter(|c| a.contender.contains(c))
                    .collect()
            },
            quick: q,
        };
        if plan.vms.is_empty() || plan.vms.iter().any(|n| !(1..=250).contains(n)) {
            bail!("--vms takes lab sizes from 1 to 250, e.g. --vms 4,64");
        }
        if !(1..=250).contains(&plan.storm_vms) {
            bail!("--storm-vms takes a lab size from 1 to 250, e.g. --storm-vms 4");
        }
        if plan.paced.repeat == 0 {
            bail!("--repeat must be at least 1");
        }
        if plan.loops.packet_cap == 0 {
            bail!("--loop-packets must be at least 1, e.g. --loop-packets 100000");
        }
        Ok(Self {
            paced: paced::Plan {
                contenders: plan.contenders.clone(),
                ..plan.paced
            },
            ..plan
        })
    }

    fn has(&self, p: Part) -> bool {
        self.parts.contains(&p)
    }

    /// The fighter's contenders: the guards (no guard and the oracle do not fight).
    fn fighters(&self) -> Vec<Contender> {
        self.contenders
            .iter()
            .copied()
            .filter(|c| matches!(c, Contender::BridgeGuard | Contender::Shell))
            .collect()
    }

    /// A rough duration, from what each part costs on a quiet machine.
    fn estimate(&self) -> Duration {
        let mut total = Duration::ZERO;
        if self.has(Part::Storm) {
            total += Duration::from_secs(5);
            for c in &self.contenders {
                // Classes a contender never repairs wait for the bound; STP classes the shell
                // guard and no guard leave to STP's 4 s.
                let (never, slow) = match c {
                    Contender::BridgeGuard | Contender::Oracle => (0, 0),
                    Contender::Shell => (0, 2),
                    Contender::None => (3, 2),
                };
                total += self.storm.estimate(never, slow) + Duration::from_secs(3);
                if *c == Contender::Shell {
                    // Its backlog of fix runs drains before the next class settles.
                    total += self.storm.per_class * 6;
                }
            }
        }
        if self.has(Part::Fighter) {
            #[expect(clippy::cast_possible_truncation, reason = "two contenders")]
            let n = self.fighters().len() as u32;
            total += Duration::from_secs(3) + (self.fighter.secs + Duration::from_secs(4)) * n;
        }
        if self.has(Part::Loop) && self.contenders.contains(&Contender::BridgeGuard) {
            total += Duration::from_secs(8) + self.loops.wait;
        }
        if self.has(Part::Paced) {
            for &n in &self.vms {
                total += self.paced.estimate(n);
            }
        }
        if self.has(Part::Libvirt) {
            total += self.libvirt.estimate(&self.contenders);
        }
        if self.has(Part::Pipeline) && self.contenders.contains(&Contender::BridgeGuard) {
            let p = &self.pipeline;
            #[expect(clippy::cast_precision_loss, reason = "estimate")]
            let steps = p.rates.len() as f64;
            let latency: f64 = p.latency_runs.iter().map(|r| r.2.as_secs_f64() + 1.0).sum();
            total += Duration::from_secs_f64(
                15.0 + p.idle.as_secs_f64() + steps * (p.step.as_secs_f64() + 1.5) + latency,
            );
        }
        total
    }
}

/// A progress line on stderr, stamped with the time since the bench started.
fn progress(line: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:6.1} s] {line}");
}

/// Where the results go: `--out`, and the docs file unless this is a quick or partial run or
/// --no-docs.
fn destinations(args: &Args, partial: bool) -> (PathBuf, Option<PathBuf>) {
    let root = crate::workspace_root();
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    };
    let docs = match (&args.docs, args.no_docs || partial) {
        (Some(d), _) => Some(abs(d)),
        (None, false) => Some(root.join("docs/benchmarks.md")),
        (None, true) => None,
    };
    (abs(&args.out), docs)
}

/// Writes the outputs and prints the tables.
fn publish(args: &Args, report: &Report, partial: bool) -> Result<(PathBuf, Option<PathBuf>)> {
    let (out, docs) = destinations(args, partial);
    let chart = svg::chart(
        &report.cells,
        &report.settings.vms,
        report.settings.timeout_s,
    );
    report::write(report, &out, &chart, docs.as_deref())?;
    println!("{}", markdown::summary(report));
    Ok((out, docs))
}

/// `--render`: the outputs again from a saved bench.json.
fn render(args: &Args, json: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let report: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench.json of this version", json.display()))?;
    let partial = report.settings.quick || report.settings.partial;
    let (out, docs) = publish(args, &report, partial)?;
    progress(&format!(
        "bench: rendered {} into {}{}",
        json.display(),
        out.display(),
        docs.map_or_else(String::new, |d| format!(" and {}", d.display()))
    ));
    Ok(())
}

/// Replaces this unoptimised xtask by an optimised one with the same arguments: the bench's
/// link monitor and oracle parse every notification, and unoptimised they would be slower than
/// the agent they measure and take CPU from it.
fn run_optimised() -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    progress(
        "bench: building xtask with optimisations, so that the measuring threads and the oracle run at full speed",
    );
    crate::run(crate::cargo().args(["build", "--quiet", "--release", "-p", "xtask"]))?;
    let exe = crate::target_dir().join("release").join("xtask");
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).with_context(|| format!("running {}", exe.display()))
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
    let plan = Plan::new(args)?;
    if cfg!(debug_assertions) {
        return run_optimised();
    }
    crate::lab::install_signal_cleanup("bench")?;
    let command = std::env::args()
        .skip(1)
        .fold("cargo xtask".to_owned(), |s, a| format!("{s} {a}"));
    let partial = plan.parts.len() < Part::ALL.len() || plan.contenders.len() < 4;
    progress(&format!(
        "bench: {} run of {}; contenders {}; estimated {} on a quiet 2-core machine",
        if plan.quick { "quick" } else { "full" },
        plan.parts
            .iter()
            .map(|p| format!("{p:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", "),
        plan.contenders
            .iter()
            .map(|c| c.key())
            .collect::<Vec<_>>()
            .join(", "),
        {
            let e = plan.estimate().as_secs_f64();
            if e < 120.0 {
                format!("{e:.0} s")
            } else {
                format!("{:.0} min", e / 60.0)
            }
        }
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
    let agent = (bin.as_path(), args.agent_arg.as_slice());
    let bg = plan.contenders.contains(&Contender::BridgeGuard);
    let step = |what: &str| progress(&format!("bench: {what}"));

    let mut trials = Vec::new();
    let mut costs = Vec::new();
    if plan.has(Part::Storm) {
        step("storm: faults back to back");
        let (t, c) = storm::phase(
            &plan.storm,
            (plan.storm_vms, &plan.contenders),
            agent,
            &tmp,
            &progress,
        )?;
        trials.extend(t);
        costs.extend(c);
    }
    let fights = if plan.has(Part::Fighter) && !plan.fighters().is_empty() {
        step("fighter: STP re-enabled flat out");
        fighter::phase(
            &plan.fighter,
            (plan.storm_vms, &plan.fighters()),
            agent,
            &tmp,
            &progress,
        )?
    } else {
        Vec::new()
    };
    let loop_run = if plan.has(Part::Loop) && bg {
        step("loop: a guest bridging its two NICs");
        Some(loops::run(&plan.loops, agent, &tmp, &progress)?)
    } else {
        None
    };
    if plan.has(Part::Paced) {
        for &n in &plan.vms {
            step(&format!("paced: {n} VMs"));
            let r = paced::run(&plan.paced, n, agent, &tmp, &progress)?;
            trials.extend(r.trials);
            costs.extend(r.costs);
        }
    }
    let libvirt = if plan.has(Part::Libvirt) {
        step("libvirt: the network restarted under a running guest");
        Some(libvirt::run(
            &plan.libvirt,
            &plan.contenders,
            agent,
            &tmp,
            &progress,
        )?)
    } else {
        None
    };
    let pipeline = if plan.has(Part::Pipeline) && bg {
        step("pipeline: the agent alone");
        Some(pipeline::run(&plan.pipeline, agent, &progress)?)
    } else {
        None
    };
    machine.finish(cpu_start);
    machine.other_load = sampler.finish();
    let vms = if plan.has(Part::Paced) {
        plan.vms.clone()
    } else {
        Vec::new()
    };
    let mut report = Report {
        command,
        started_unix,
        duration_s: started.elapsed().as_secs_f64(),
        settings: Settings {
            vms: vms.clone(),
            repeat: plan.paced.repeat,
            none_repeat: plan.paced.none_repeat,
            timeout_s: plan.paced.timeout.as_secs(),
            quiet_ms: u64::try_from(plan.paced.quiet.as_millis()).unwrap_or(0),
            spacing_ms: u64::try_from(plan.paced.spacing.as_millis()).unwrap_or(0),
            quick: plan.quick,
            agent_args: args.agent_arg.clone(),
            partial,
            storm_vms: plan.storm_vms,
            storm_secs: plan.storm.per_class.as_secs_f64(),
            storm_bound_s: plan.storm.bound.as_secs_f64(),
            fight_secs: plan.fighter.secs.as_secs_f64(),
            loop_wait_s: plan.loops.wait.as_secs_f64(),
            loop_packets: plan.loops.packet_cap,
        },
        machine,
        cells: report::cells(&trials, &vms, Mode::Paced),
        storm_cells: report::cells(&trials, &[plan.storm_vms], Mode::Storm),
        costs,
        pipeline,
        fights,
        loop_run,
        libvirt,
        memory: Vec::new(),
        targets: Vec::new(),
        trials,
        shell_fix_script: contenders::FIX_SCRIPT.to_owned(),
        shell_monitor_loop: contenders::MONITOR_LOOP.to_owned(),
    };
    report.memory = report::memory(&report);
    report.targets = targets::all(&report);
    let (out, docs) = publish(args, &report, partial || plan.quick)?;
    progress(&format!(
        "bench: done in {:.0} s; results in {}{}",
        report.duration_s,
        out.display(),
        docs.map_or_else(String::new, |d| format!(" and {}", d.display()))
    ));
    Ok(())
}
