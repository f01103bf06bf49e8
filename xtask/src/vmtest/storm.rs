//! The fault storm: what eBPF buys over netlink alone, measured inside each vmtest guest, where
//! kprobe and fentry attach.
//!
//! `xtask vmtest-storm` runs in the guest after the tests. The same faults, back to back (a
//! port detached; kernel STP turned on, then a port flapping), go against `bridge-guard run`
//! with its eBPF hooks and then with `--no-ebpf`, each in a fresh lab, through the bench's own
//! injection and outage measurement (`bench::faults`, `bench::observer`: from the fault's
//! first request to the link notification after which the lab is healthy again).
//!
//! Under TCG absolute times mean little, so what is reported is relative: per fault, the
//! median outage with netlink alone over the median with eBPF; the share of port transitions
//! the agent could name an actor for; and, from each repair's `trigger` in the agent's log,
//! whether a fault that an attached eBPF hook reports was repaired from the eBPF event (the
//! hook runs in the kernel before netlink's notification is sent; a detach notifies only after
//! an RCU grace period). The host reads `storm.json` back, prints it, and writes it into
//! docs/benchmarks.md between `<!-- vmtest:begin -->` and `<!-- vmtest:end -->`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    bench::{
        contenders::{run_args, spawn_agent},
        faults::{self, BenchLab, Fault},
        markdown::vmtest::{BEGIN, END},
        observer::{Observer, Outcome},
        stats,
    },
    lab::TempDir,
};

/// Options of the guest-side `xtask vmtest-storm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bridge-guard binary.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Where the results go (JSON).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Rounds of the storm per mode; each round injects every fault once.
    #[arg(long, default_value_t = 8)]
    repeat: usize,
    /// Seconds after which a fault counts as not healed.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
}

/// The storm's faults, in the order of each round.
const FAULTS: [Fault; 2] = [Fault::Detach, Fault::StpFlap];
/// VM namespaces in each lab.
const VMS: usize = 2;
/// Nothing for this long after the lab is healthy: the fault is over.
const QUIET: Duration = Duration::from_millis(250);
/// Between injections: the agent's backoff never delays a repair made a second or more after
/// the same one (the bench paces the same way).
const SPACING: Duration = Duration::from_millis(1100);

/// With eBPF, or netlink alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Ebpf,
    NetlinkOnly,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::NetlinkOnly => "netlink-only",
        }
    }

    fn agent_args(self) -> Vec<String> {
        match self {
            Self::Ebpf => Vec::new(),
            Self::NetlinkOnly => vec!["--no-ebpf".to_owned()],
        }
    }
}

/// The eBPF hooks that report `fault` before netlink does.
fn hooks_of(fault: Fault) -> &'static [&'static str] {
    match fault {
        Fault::Detach => &["leave"],
        Fault::StpFlap | Fault::StpGuestFlap => &["stp", "port-state"],
        Fault::BridgeDown | Fault::Recreate => &[],
    }
}

/// One fault, injected `repeat` times in one mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FaultResult {
    pub fault: String,
    /// Per injection; `None`: not healed within the timeout, or never seen.
    pub outages_ns: Vec<Option<u64>>,
    /// Per injection, from the fault to the agent's first repair request (its `planned_ns`);
    /// `None`: no repair logged.
    #[serde(default)]
    pub reactions_ns: Vec<Option<u64>>,
    /// Repairs logged during the measurements, by their `trigger`.
    pub triggers: BTreeMap<String, u64>,
    /// Whether every hook of [`hooks_of`] attached (so eBPF reports this fault first).
    pub ebpf_first: bool,
}

fn median(v: &[Option<u64>]) -> Option<u64> {
    let mut some: Vec<u64> = v.iter().flatten().copied().collect();
    some.sort_unstable();
    stats::percentile(&some, 50.0)
}

impl FaultResult {
    fn median_ns(&self) -> Option<u64> {
        median(&self.outages_ns)
    }

    fn median_reaction_ns(&self) -> Option<u64> {
        median(&self.reactions_ns)
    }

    fn repairs(&self) -> u64 {
        self.triggers.values().sum()
    }

    fn healed(&self) -> usize {
        self.outages_ns.iter().flatten().count()
    }
}

/// One mode's run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: Mode,
    /// The agent's readiness line (its hook tiers).
    pub ready: String,
    pub faults: Vec<FaultResult>,
    /// Port transitions the agent logged, and how many of them named an actor.
    pub transitions: u64,
    pub named: u64,
}

impl ModeResult {
    fn fault(&self, key: &str) -> Option<&FaultResult> {
        self.faults.iter().find(|f| f.fault == key)
    }
}

/// What one guest's storm found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StormReport {
    pub release: String,
    pub repeat: usize,
    pub modes: Vec<ModeResult>,
}

impl StormReport {
    fn mode(&self, mode: Mode) -> Option<&ModeResult> {
        self.modes.iter().find(|m| m.mode == mode)
    }

    /// Why the storm's claims fail on this kernel: a fault not healed, or a fault eBPF reports
    /// first that was repaired from something else.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for m in &self.modes {
            for f in &m.faults {
                let lost = f.outages_ns.len() - f.healed();
                if lost > 0 {
                    p.push(format!(
                        "{} {}: {lost} of {} injections not healed",
                        m.mode.key(),
                        f.fault,
                        f.outages_ns.len()
                    ));
                }
            }
        }
        if let Some(m) = self.mode(Mode::Ebpf) {
            for f in m.faults.iter().filter(|f| f.ebpf_first) {
                let other: u64 = f
                    .triggers
                    .iter()
                    .filter(|(t, _)| *t != "ebpf")
                    .map(|(_, n)| n)
                    .sum();
                if other > 0 || f.repairs() == 0 {
                    p.push(format!(
                        "ebpf {}: eBPF reports this fault first, yet {other} of {} repairs \
                         started from another source ({:?})",
                        f.fault,
                        f.repairs(),
                        f.triggers
                    ));
                }
            }
        }
        p
    }
}

/// `hook=tier` from a readiness line.
fn tier<'a>(ready: &'a str, hook: &str) -> Option<&'a str> {
    ready
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ';')
        .find_map(|w| w.strip_prefix(hook)?.strip_prefix('='))
}

/// The JSON log lines of the agent, as values.
fn log_values(lines: &[String]) -> impl Iterator<Item = Value> + '_ {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
}

/// Repairs among `lines`, counted by their `trigger` field.
fn count_triggers(lines: &[String], into: &mut BTreeMap<String, u64>) {
    for v in log_values(lines) {
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("repaired:"))
        {
            let t = v["trigger"].as_str().unwrap_or("(none logged)").to_owned();
            *into.entry(t).or_default() += 1;
        }
    }
}

/// The earliest repair request among `lines` after `t0` (CLOCK_MONOTONIC, as the agent's
/// `planned_ns`), as a delay from `t0`.
fn first_planned(lines: &[String], t0: u64) -> Option<u64> {
    log_values(lines)
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("repaired:"))
        })
        .filter_map(|v| v["planned_ns"].as_u64()?.checked_sub(t0))
        .min()
}

/// `(transitions, with a named actor)` among `lines`.
fn count_actors(lines: &[String]) -> (u64, u64) {
    let mut total = 0;
    let mut named = 0;
    for v in log_values(lines).filter(|v| v["message"] == "port state") {
        total += 1;
        if v["actor"].as_str().is_some_and(|a| a != "unknown") {
            named += 1;
        }
    }
    (total, named)
}

fn progress(line: &str) {
    eprintln!("storm: {line}");
}

/// One mode: a fresh lab and agent, `repeat` rounds of [`FAULTS`]. The agent's log is kept
/// beside `--out` as `storm-agent-<mode>.log`.
fn run_mode(args: &Args, mode: Mode) -> Result<ModeResult> {
    let mut lab = BenchLab::new("bgs", mode.key(), VMS)?;
    faults::restore(&mut lab, false)?;
    let mut obs = Observer::start(&lab.lab.host.name, lab.bridge(), lab.lab.ports())?;
    obs.settle(QUIET, Duration::from_secs(30))?;
    let state = TempDir::new("bgs", &format!("state-{}", mode.key()))?;
    let run = run_args("br0", &state.path.to_string_lossy(), &mode.agent_args());
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let (agent, ready, _) = spawn_agent(&lab.lab.host, &args.agent, &run, obs.sender())?;
    progress(&format!("{}: {ready}", mode.key()));
    obs.settle(QUIET, Duration::from_secs(30))?;
    let timeout = Duration::from_secs(args.timeout);
    let mut results: Vec<FaultResult> = FAULTS
        .iter()
        .map(|&f| FaultResult {
            fault: f.key().to_owned(),
            ebpf_first: mode == Mode::Ebpf
                && hooks_of(f)
                    .iter()
                    .all(|h| tier(&ready, h).is_some_and(|t| t != "none")),
            ..FaultResult::default()
        })
        .collect();
    let mut lines = Vec::new();
    let mut next: Option<Instant> = None;
    // Round 0 warms up (binaries and caches over 9p, the agent's first repairs) and is not
    // counted: it would favour whichever mode runs second.
    for rep in 0..=args.repeat {
        for (i, &fault) in FAULTS.iter().enumerate() {
            if !obs.healthy() {
                faults::restore(&mut lab, false)?;
            }
            obs.settle(QUIET, Duration::from_secs(15))?;
            if let Some(at) = next {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            lines.extend(obs.drain_guard_lines());
            let injected = Instant::now();
            let at = faults::inject(&mut lab, &mut obs, fault, rep)?;
            let m = obs.measure(at.t0, timeout, QUIET)?;
            next = Some(injected + SPACING);
            let outage = match m.outcome {
                Outcome::Healed { outage_ns } => Some(outage_ns),
                Outcome::NotHealed { .. } | Outcome::NotObserved => None,
            };
            progress(&format!(
                "{} {} {}/{}: {}",
                mode.key(),
                fault.key(),
                rep,
                args.repeat,
                outage.map_or_else(|| format!("{:?}", m.outcome), stats::human_ns)
            ));
            if rep > 0 {
                let r = &mut results[i];
                count_triggers(&m.guard_lines, &mut r.triggers);
                r.outages_ns.push(outage);
                r.reactions_ns.push(first_planned(&m.guard_lines, at.t0));
            }
            lines.extend(m.guard_lines);
            if outage.is_none() {
                faults::restore(&mut lab, false)?;
            }
        }
    }
    obs.settle(QUIET, Duration::from_secs(15))?;
    lines.extend(obs.drain_guard_lines());
    drop(agent);
    let log = args
        .out
        .with_file_name(format!("storm-agent-{}.log", mode.key()));
    std::fs::write(&log, lines.join("\n")).with_context(|| format!("writing {}", log.display()))?;
    let (transitions, named) = count_actors(&lines);
    Ok(ModeResult {
        mode,
        ready,
        faults: results,
        transitions,
        named,
    })
}

/// `xtask vmtest-storm`: both modes, written to `--out`; fails if a claim does not hold.
pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the storm needs root: it builds network namespaces and runs the agent's eBPF");
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    crate::lab::install_signal_cleanup("storm")?;
    let started = Instant::now();
    let release = crate::setup::output(std::process::Command::new("uname").arg("-r"))?
        .trim()
        .to_owned();
    let mut modes = Vec::new();
    for mode in [Mode::Ebpf, Mode::NetlinkOnly] {
        modes.push(run_mode(args, mode).with_context(|| format!("the {} run", mode.key()))?);
    }
    let report = StormReport {
        release,
        repeat: args.repeat,
        modes,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", table(std::slice::from_ref(&report)));
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("the storm's claims fail here:\n{}", problems.join("\n"));
    }
    println!(
        "storm done in {:.0} s: every claim holds",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A guest's `storm.json`, if it wrote one.
pub fn read(out: &Path) -> Result<Option<StormReport>> {
    let path = out.join("storm.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a storm report", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[expect(clippy::cast_precision_loss, reason = "ratios and shares for display")]
fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}×", a as f64 / b as f64)
    }
}

#[expect(clippy::cast_precision_loss, reason = "shares for display")]
fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_owned()
    } else {
        format!(
            "{:.0}% ({part}/{whole})",
            100.0 * part as f64 / whole as f64
        )
    }
}

fn triggers_cell(f: &FaultResult) -> String {
    f.triggers
        .iter()
        .map(|(t, n)| format!("{t} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The markdown tables across kernels: per kernel and fault, the median outages, their ratio
/// and the repairs' triggers; then the share of transitions with a named actor.
pub fn table(reports: &[StormReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| kernel | fault | repair sent, eBPF | netlink only | netlink / eBPF | outage, eBPF | netlink only | netlink / eBPF | repairs from eBPF (eBPF run) | triggers, netlink-only run |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let (Some(e), Some(n)) = (r.mode(Mode::Ebpf), r.mode(Mode::NetlinkOnly)) else {
            continue;
        };
        for f in &e.faults {
            let nf = n.fault(&f.fault);
            let cells = |m: fn(&FaultResult) -> Option<u64>| {
                let (e, n) = (m(f), nf.and_then(m));
                let show = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), stats::human_ns);
                let r = match (n, e) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "-".to_owned(),
                };
                format!("{} | {} | {r}", show(e), show(n))
            };
            let from_ebpf = f.triggers.get("ebpf").copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.release,
                f.fault,
                cells(FaultResult::median_reaction_ns),
                cells(FaultResult::median_ns),
                share(from_ebpf, f.repairs()),
                nf.map(triggers_cell).unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(
        s,
        "\n| kernel | hook tiers (eBPF run) | transitions with a named actor, eBPF | netlink only |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for r in reports {
        let (Some(e), Some(n)) = (r.mode(Mode::Ebpf), r.mode(Mode::NetlinkOnly)) else {
            continue;
        };
        let tiers: Vec<String> = ["port-state", "join", "leave", "stp"]
            .iter()
            .map(|h| format!("{h}={}", tier(&e.ready, h).unwrap_or("?")))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            r.release,
            tiers.join(" "),
            share(e.named, e.transitions),
            share(n.named, n.transitions)
        );
    }
    s
}

/// The docs section for `reports`, with how it was made.
fn section(reports: &[StormReport], when: &str) -> String {
    let repeat = reports.first().map_or(0, |r| r.repeat);
    format!(
        "{BEGIN}\n\
         From `cargo xtask vmtest` ({when}). In each Debian kernel's guest (qemu TCG, one \
         vCPU), after the tests, the same fault storm runs against `bridge-guard run` with its \
         eBPF hooks and then with `--no-ebpf`, each in a fresh lab of {VMS} VM namespaces: \
         {repeat} rounds of a port detached (`nomaster`) then kernel STP turned on and a port \
         flapped, {:.1} s apart. An outage runs from the fault's first request to the link \
         notification after which the bridge is up with carrier and every VM port attached and \
         forwarding (the bench's measure). Under TCG absolute times are inflated and noisy, so \
         read the ratio. A repair's trigger is the source whose news it was planned on (its \
         `trigger` in the agent's log): `ebpf` where the wake-up held eBPF events. Where a hook \
         that reports the fault attached, the kernel runs it before it sends netlink's \
         notification, so each such repair must start from the eBPF event; the run fails if \
         one does not.\n\n{}{END}",
        SPACING.as_secs_f64(),
        table(reports)
    )
}

/// Replaces the section between the markers in `doc` (appended, with its markers, when they
/// are absent). Fails on markers out of order.
fn splice(doc: &str, section: &str) -> Result<String> {
    match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => {
            Ok(format!("{}{section}{}", &doc[..b], &doc[e + END.len()..]))
        }
        (None, None) => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            Ok(format!("{doc}{sep}{section}\n"))
        }
        _ => bail!("the {BEGIN} and {END} markers are not in order"),
    }
}

/// Writes the storm's results into `docs` between the markers.
pub fn write_docs(docs: &Path, reports: &[StormReport], when: &str) -> Result<()> {
    let doc = match std::fs::read_to_string(docs) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", docs.display())),
    };
    let new =
        splice(&doc, &section(reports, when)).with_context(|| format!("in {}", docs.display()))?;
    std::fs::write(docs, new).with_context(|| format!("writing {}", docs.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StormReport {
        let fault = |key: &str, outages: &[u64], trig: &[(&str, u64)], first: bool| FaultResult {
            fault: key.to_owned(),
            outages_ns: outages.iter().map(|&o| Some(o)).collect(),
            reactions_ns: outages.iter().map(|&o| Some(o / 2)).collect(),
            triggers: trig.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
            ebpf_first: first,
        };
        StormReport {
            release: "5.10.0-35-amd64".into(),
            repeat: 3,
            modes: vec![
                ModeResult {
                    mode: Mode::Ebpf,
                    ready: "ready: port-state=kprobe join=fentry leave=fentry stp=kprobe".into(),
                    faults: vec![fault(
                        "detach",
                        &[2_000_000, 4_000_000, 3_000_000],
                        &[("ebpf", 3)],
                        true,
                    )],
                    transitions: 10,
                    named: 9,
                },
                ModeResult {
                    mode: Mode::NetlinkOnly,
                    ready: "ready: netlink only".into(),
                    faults: vec![fault(
                        "detach",
                        &[9_000_000, 6_000_000, 12_000_000],
                        &[("netlink", 3)],
                        false,
                    )],
                    transitions: 8,
                    named: 0,
                },
            ],
        }
    }

    #[test]
    fn the_table_reports_ratio_triggers_and_actors() {
        let t = table(&[report()]);
        assert!(t.contains("| 5.10.0-35-amd64 | detach |"), "{t}");
        assert!(t.contains("| 3.0× | 100% (3/3) | netlink 3 |"), "{t}");
        assert!(
            t.contains("| 1.50 ms | 4.50 ms | 3.0× | 3.00 ms | 9.00 ms | 3.0× |"),
            "{t}"
        );
        assert!(t.contains("| 90% (9/10) | 0% (0/8) |"), "{t}");
        assert!(t.contains("leave=fentry"), "{t}");
        assert!(report().problems().is_empty());
    }

    #[test]
    fn a_repair_from_netlink_where_ebpf_was_first_is_a_problem() {
        let mut r = report();
        r.modes[0].faults[0].triggers.insert("netlink".into(), 1);
        r.modes[1].faults[0].outages_ns.push(None);
        let p = r.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("1 of 4 injections not healed"), "{p:?}");
        assert!(p[1].contains("1 of 4 repairs"), "{p:?}");
    }

    #[test]
    fn counts_triggers_and_actors_from_json_logs() {
        let lines: Vec<String> = [
            r#"{"message":"repaired: re-attach vnet0 to br0: x","trigger":"ebpf","planned_ns":1500}"#,
            r#"{"message":"repaired: turn STP off on br0: y","trigger":"netlink","planned_ns":1200}"#,
            r#"{"message":"port state","actor":"ip[42]"}"#,
            r#"{"message":"port state","actor":"unknown"}"#,
            "not json",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let mut t = BTreeMap::new();
        count_triggers(&lines, &mut t);
        assert_eq!(t.get("ebpf"), Some(&1));
        assert_eq!(t.get("netlink"), Some(&1));
        assert_eq!(count_actors(&lines), (2, 1));
        assert_eq!(first_planned(&lines, 1000), Some(200));
        assert_eq!(first_planned(&lines, 2000), None);
    }

    #[test]
    fn the_docs_section_goes_between_the_markers_and_nowhere_else() -> Result<()> {
        let doc = format!("# Bench\ntext\n{BEGIN}\nold\n{END}\ntail\n");
        let new = splice(&doc, &format!("{BEGIN}\nnew\n{END}"))?;
        assert_eq!(new, format!("# Bench\ntext\n{BEGIN}\nnew\n{END}\ntail\n"));
        let added = splice("# Bench\n", &format!("{BEGIN}\nx\n{END}"))?;
        assert_eq!(added, format!("# Bench\n\n{BEGIN}\nx\n{END}\n"));
        assert!(splice(&format!("{END}\n{BEGIN}"), "s").is_err());
        Ok(())
    }
}
