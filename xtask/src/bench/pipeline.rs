//! The agent's pipeline on its own: idle CPU, the event rate it takes without losing any, and
//! the delay from the kernel's event to user space (`bridge-guard watch --json`).
//!
//! Load comes from a second bridge in the lab, `brc`, which the agent does not guard: kernel
//! STP on with the longest forward delay (30 s) and 64 veth ports `cpN`. Setting a port down or
//! up is one eBPF event on every hook tier (its forward-delay timer is cancelled or started);
//! setting the whole bridge down or up is one such event per port, 64 per request, which is
//! how the event-rate steps reach tens of thousands of events per second on two cores. The
//! kernel-to-user-space delay uses single port changes.

use std::{
    path::Path,
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    contenders::{metrics_addr, run_args, spawn_agent},
    faults::{self, BenchLab},
    monitor::Activity,
    rtnl::Rtnl,
    stats,
};
use crate::lab::{TempDir, http_get};

const CHURN_PORTS: usize = 64;
/// Threads changing single ports, each with its own netlink socket and share of the ports.
const GENERATOR_THREADS: usize = 2;

pub struct Plan {
    pub idle: Duration,
    /// Target rates (events/s); `None` is "as fast as the generator goes".
    pub rates: Vec<Option<u64>>,
    pub step: Duration,
    /// (label, events/s, duration) for the kernel-to-user-space delay.
    pub latency_runs: Vec<(&'static str, u64, Duration)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Idle {
    pub secs: f64,
    /// utime + stime over the window (clock ticks, so 10 ms resolution).
    pub cpu_ms: f64,
    /// Time on CPU of all the agent's threads over the window (schedstat, ns resolution).
    pub sched_ms: f64,
    /// sched_ms as a share of one CPU.
    pub percent_of_one_cpu: f64,
    pub log_lines: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// Events per second asked for; `None`: as fast as the generator goes.
    pub target_rate: Option<u64>,
    /// Churn-bridge down/up requests made.
    pub toggles: u64,
    /// eBPF events they cause: one per churn port each.
    pub generated: u64,
    pub secs: f64,
    pub achieved_rate: f64,
    /// `bridge_guard_events_total{source="ebpf"}` over the step.
    pub ebpf_events: u64,
    /// `bridge_guard_ringbuf_lost_total` over the step.
    pub lost: u64,
    /// "netlink notifications were lost (ENOBUFS)" warnings from the agent over the step.
    pub netlink_overruns: usize,
    pub agent_cpu_ms: f64,
    pub zero_loss: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Latency {
    pub label: String,
    pub target_rate: u64,
    pub events: usize,
    pub median_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pipeline {
    pub churn_ports: usize,
    pub idle: Idle,
    pub steps: Vec<Step>,
    pub best_zero_loss_rate: Option<f64>,
    /// Whether a step at (at least 90% of) 10k events/s ran with zero loss; `None` when the
    /// generator could not reach it.
    pub ten_k_zero_loss: Option<bool>,
    pub kernel_to_user: Vec<Latency>,
    pub agent_peak_rss_kib: Option<u64>,
    pub ready_line: String,
}

/// Sets churn ports down and up in turn, one rtnetlink request per change.
struct Churn {
    rtnl: Rtnl,
    ports: Vec<String>,
    up: Vec<bool>,
    cursor: usize,
}

impl Churn {
    fn op(&mut self) -> Result<()> {
        let i = self.cursor % self.ports.len();
        let up = !self.up.get(i).copied().unwrap_or(true);
        let port = self.ports.get(i).context("no churn port")?;
        self.rtnl.set_up(port, up)?;
        if let Some(u) = self.up.get_mut(i) {
            *u = up;
        }
        self.cursor += 1;
        Ok(())
    }

    fn all_up(&self) -> bool {
        self.cursor.is_multiple_of(2 * self.ports.len())
    }

    /// Runs for `dur` at `rate` changes per second (unpaced with `None`), then on until every
    /// port is up again; returns (changes made, time taken).
    fn run(&mut self, rate: Option<u64>, dur: Duration) -> Result<(u64, Duration)> {
        let start = Instant::now();
        let mut ops = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= dur && self.all_up() {
                break;
            }
            if let Some(r) = rate {
                #[expect(clippy::cast_precision_loss, reason = "pacing arithmetic")]
                let next_at = Duration::from_secs_f64(ops as f64 / r as f64);
                if next_at > elapsed {
                    // The pacing timer of the load generator.
                    std::thread::sleep((next_at - elapsed).max(Duration::from_micros(50)));
                    continue;
                }
            }
            self.op()?;
            ops += 1;
        }
        Ok((ops, start.elapsed()))
    }
}

/// Several generators on threads of their own, each with its share of the ports and of the
/// rate: one rtnetlink request at a time does not reach 10k changes/s on two cores.
struct Churner {
    workers: Vec<Churn>,
}

impl Churner {
    fn new(ns: &str, ports: &[String], threads: usize) -> Result<Self> {
        let per = ports.len().div_ceil(threads.max(1));
        let workers = ports
            .chunks(per.max(1))
            .map(|chunk| {
                Ok(Churn {
                    rtnl: Rtnl::open(ns)?,
                    ports: chunk.to_vec(),
                    up: vec![true; chunk.len()],
                    cursor: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { workers })
    }

    /// As [`Churn::run`], the rate shared among the threads.
    fn run(&mut self, rate: Option<u64>, dur: Duration) -> Result<(u64, Duration)> {
        let n = u64::try_from(self.workers.len()).unwrap_or(1).max(1);
        let results: Vec<Result<(u64, Duration)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .workers
                .iter_mut()
                .map(|w| scope.spawn(move || w.run(rate.map(|r| r.div_ceil(n)), dur)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a load generator thread panicked"))?
                })
                .collect()
        });
        let mut ops = 0;
        let mut took = Duration::ZERO;
        for r in results {
            let (o, t) = r?;
            ops += o;
            took = took.max(t);
        }
        Ok((ops, took))
    }
}

/// A sample of `name` with all `labels` (`k="v"`) in the exposition text.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let bare = series.split('{').next().unwrap_or("");
            bare == name && labels.iter().all(|want| series.contains(want))
        })
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// One repair action's latency histogram from `/metrics`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepairLatency {
    pub action: String,
    pub count: u64,
    pub mean_ns: u64,
    /// Upper bounds of the buckets holding the median and p99 (histograms only bound them).
    pub p50_le: String,
    pub p99_le: String,
}

/// `bridge_guard_repair_latency_seconds` per action.
pub fn repair_latencies(text: &str) -> Vec<RepairLatency> {
    let name = "bridge_guard_repair_latency_seconds";
    let mut actions: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_count{{action=\"")))
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect();
    actions.dedup();
    actions
        .into_iter()
        .filter_map(|a| {
            let label = format!("action=\"{a}\"");
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "counts"
            )]
            let count = metric(text, &format!("{name}_count"), &[&label])? as u64;
            let sum = metric(text, &format!("{name}_sum"), &[&label])?;
            let buckets: Vec<(String, f64)> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{name}_bucket{{")) && l.contains(&label))
                .filter_map(|l| {
                    let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
                    Some((le, l.rsplit_once(' ')?.1.parse().ok()?))
                })
                .collect();
            #[expect(clippy::cast_precision_loss, reason = "counts")]
            let q = |p: f64| {
                buckets
                    .iter()
                    .find(|(_, c)| *c >= p * count as f64)
                    .map_or_else(|| "+Inf".to_owned(), |(le, _)| le.clone())
            };
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "ns"
            )]
            let mean_ns = if count > 0 {
                (sum / count as f64 * 1e9) as u64
            } else {
                0
            };
            Some(RepairLatency {
                action: a,
                count,
                mean_ns,
                p50_le: q(0.5),
                p99_le: q(0.99),
            })
        })
        .collect()
}

/// Waits for the agent's log line of `port` reaching `to` (the barrier after each step).
fn wait_port_log(
    rx: &Receiver<Activity>,
    port: &str,
    to: &str,
    overruns: &mut usize,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Activity::Guard { line, .. }) => {
                if line.contains("ENOBUFS") {
                    *overruns += 1;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "port state"
                    && v["port"].as_str().is_some_and(|p| p.ends_with(port))
                    && v["to"] == to
                {
                    return Ok(());
                }
            }
            Ok(Activity::Link(_)) => {}
            Err(RecvTimeoutError::Timeout) => bail!("the agent never logged {port} -> {to}"),
            Err(RecvTimeoutError::Disconnected) => bail!("the agent's log closed"),
        }
    }
}

pub fn run(
    plan: &Plan,
    (bin, extra): (&Path, &[String]),
    progress: &dyn Fn(&str),
) -> Result<Pipeline> {
    let mut lab = BenchLab::new("bgb", "pipe", 2)?;
    let ns = lab.lab.host.name.clone();
    let mut lines = vec![
        "link add brc type bridge stp_state 1 forward_delay 3000".to_owned(),
        "link set brc up".to_owned(),
    ];
    let ports: Vec<String> = (0..CHURN_PORTS).map(|i| format!("cp{i}")).collect();
    for (i, p) in ports.iter().enumerate() {
        lines.push(format!("link add {p} type veth peer name cq{i}"));
        lines.push(format!("link set {p} master brc"));
        lines.push(format!("link set cq{i} up"));
        lines.push(format!("link set {p} up"));
    }
    lab.lab.host.ip_batch(&lines)?;
    faults::restore(&mut lab, false)?;

    let state = TempDir::on_tmpfs("bgb", "pipe-state")?;
    let dir = state.path.to_string_lossy().into_owned();
    let (tx, rx) = mpsc::channel();
    let args = run_args("br0", &dir, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (agent, ready_line, _) = spawn_agent(&lab.lab.host, bin, &args, tx)?;
    let addr = metrics_addr(&ready_line).context("no metrics address in the ready line")?;
    let pid = agent.pid();
    // Its start-up repairs done: nothing logged for a second.
    while rx.recv_timeout(Duration::from_secs(1)).is_ok() {}

    progress(&format!(
        "bench: pipeline: idle agent for {:.0} s",
        plan.idle.as_secs_f64()
    ));
    let (cpu0, sched0) = (stats::cpu_ms(pid), stats::sched_ns(pid));
    let started = Instant::now();
    let mut idle_lines = 0;
    // The measurement window: count what the agent logs while nothing happens.
    loop {
        let left = plan.idle.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        if rx.recv_timeout(left).is_ok() {
            idle_lines += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (cpu1, sched1) = (stats::cpu_ms(pid), stats::sched_ns(pid));
    #[expect(clippy::cast_precision_loss, reason = "ns to ms")]
    let sched_ms = sched1
        .zip(sched0)
        .map_or(0.0, |(a, b)| a.saturating_sub(b) as f64 / 1e6);
    let idle = Idle {
        secs,
        cpu_ms: cpu1.zip(cpu0).map_or(0.0, |(a, b)| a - b),
        sched_ms,
        percent_of_one_cpu: sched_ms / (secs * 1000.0) * 100.0,
        log_lines: idle_lines,
    };

    let mut churn = Churner::new(&ns, &ports, GENERATOR_THREADS)?;
    // The whole churn bridge down and up: every port's timer cancelled, then started.
    let mut toggler = Churn {
        rtnl: Rtnl::open(&ns)?,
        ports: vec!["brc".to_owned()],
        up: vec![true],
        cursor: 0,
    };
    let per_toggle = u64::try_from(CHURN_PORTS).unwrap_or(64);
    let mut steps = Vec::new();
    for rate in &plan.rates {
        let scrape = || http_get(&ns, &addr, "/metrics");
        let before = scrape()?;
        let cpu_before = stats::cpu_ms(pid).unwrap_or(0.0);
        let (ops, took) = toggler.run(rate.map(|r| r.div_ceil(per_toggle)), plan.step)?;
        let generated = ops * per_toggle;
        // Barrier: a guarded port flaps; once the agent has logged it, it has published the
        // kernel's lost-event count (final once the generator stopped) and read the ring.
        let mut overruns = 0;
        lab.host.set_up("vnet0", false)?;
        lab.host.set_up("vnet0", true)?;
        wait_port_log(&rx, "vnet0", "disabled", &mut overruns)?;
        wait_port_log(&rx, "vnet0", "forwarding", &mut overruns)?;
        let after = scrape()?;
        let get = |t: &str, n: &str, l: &[&str]| metric(t, n, l).unwrap_or(0.0);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "counters"
        )]
        let ebpf = (get(&after, "bridge_guard_events_total", &["source=\"ebpf\""])
            - get(&before, "bridge_guard_events_total", &["source=\"ebpf\""]))
            as u64;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "counters"
        )]
        let lost = (get(&after, "bridge_guard_ringbuf_lost_total", &[])
            - get(&before, "bridge_guard_ringbuf_lost_total", &[])) as u64;
        let secs = took.as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "rates")]
        let achieved = generated as f64 / secs;
        let step = Step {
            target_rate: *rate,
            toggles: ops,
            generated,
            secs,
            achieved_rate: achieved,
            ebpf_events: ebpf,
            lost,
            netlink_overruns: overruns,
            agent_cpu_ms: stats::cpu_ms(pid).unwrap_or(0.0) - cpu_before,
            zero_loss: lost == 0 && ebpf >= generated,
        };
        progress(&format!(
            "bench: pipeline: load {} -> {:.0} events/s generated ({generated} events, {ops} bridge toggles), {ebpf} received, {lost} lost, {overruns} netlink overruns",
            rate.map_or_else(|| "unpaced".to_owned(), |r| format!("{r}/s")),
            achieved,
        ));
        steps.push(step);
    }
    let agent_peak_rss_kib = stats::status_kib(pid, "VmHWM");
    drop(agent);

    let best_zero_loss_rate = steps
        .iter()
        .filter(|s| s.zero_loss)
        .map(|s| s.achieved_rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let ten_k_zero_loss = {
        let at_10k: Vec<&Step> = steps
            .iter()
            .filter(|s| s.achieved_rate >= 9_000.0)
            .collect();
        if at_10k.is_empty() {
            None
        } else {
            Some(at_10k.iter().any(|s| s.zero_loss))
        }
    };

    progress("bench: pipeline: kernel-to-user-space delay (bridge-guard watch --json)");
    let mut kernel_to_user = Vec::new();
    {
        let (etx, erx) = mpsc::channel::<Activity>();
        let (tx, _log) = mpsc::channel();
        let (watch, _, _) = spawn_watch(&lab, bin, etx, tx)?;
        for (label, rate, dur) in &plan.latency_runs {
            let (ops, _) = churn.run(Some(*rate), *dur)?;
            let mut delays = Vec::new();
            // Until every change is reported, or nothing came for a second.
            while let Ok(Activity::Guard { line, .. }) = erx.recv_timeout(Duration::from_secs(1)) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let (Some(k), Some(r)) =
                    (v["ktime_ns"].as_u64(), v["received_ktime_ns"].as_u64())
                {
                    delays.push(r.saturating_sub(k));
                }
                if delays.len() as u64 >= ops {
                    break;
                }
            }
            let (median_ns, p99_ns, max_ns) = stats::summary(&delays).unwrap_or_default();
            progress(&format!(
                "bench: pipeline: {label}: {} events, kernel-to-user median {} p99 {} max {}",
                delays.len(),
                stats::human_ns(median_ns),
                stats::human_ns(p99_ns),
                stats::human_ns(max_ns)
            ));
            kernel_to_user.push(Latency {
                label: (*label).to_owned(),
                target_rate: *rate,
                events: delays.len(),
                median_ns,
                p99_ns,
                max_ns,
            });
        }
        drop(watch);
    }
    Ok(Pipeline {
        churn_ports: CHURN_PORTS,
        idle,
        steps,
        best_zero_loss_rate,
        ten_k_zero_loss,
        kernel_to_user,
        agent_peak_rss_kib,
        ready_line,
    })
}

/// `bridge-guard watch --json` in the lab, its JSON lines to `events`.
fn spawn_watch(
    lab: &BenchLab,
    bin: &Path,
    events: mpsc::Sender<Activity>,
    log: mpsc::Sender<Activity>,
) -> Result<(crate::lab::Proc, String, Vec<String>)> {
    super::contenders::spawn_agent_with_stdout(
        &lab.lab.host,
        bin,
        &["watch", "--json"],
        log,
        events,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE bridge_guard_events_total counter
bridge_guard_events_total{source=\"ebpf\"} 1025
bridge_guard_events_total{source=\"netlink\"} 77
bridge_guard_ringbuf_lost_total 3
bridge_guard_repair_latency_seconds_bucket{action=\"bridge_up\",le=\"0.00025\"} 0
bridge_guard_repair_latency_seconds_bucket{action=\"bridge_up\",le=\"0.0005\"} 6
bridge_guard_repair_latency_seconds_bucket{action=\"bridge_up\",le=\"0.001\"} 9
bridge_guard_repair_latency_seconds_bucket{action=\"bridge_up\",le=\"+Inf\"} 10
bridge_guard_repair_latency_seconds_sum{action=\"bridge_up\"} 0.006
bridge_guard_repair_latency_seconds_count{action=\"bridge_up\"} 10
";

    #[test]
    fn reads_counters_and_histograms_from_the_exposition() {
        assert_eq!(
            metric(TEXT, "bridge_guard_events_total", &["source=\"ebpf\""]),
            Some(1025.0)
        );
        assert_eq!(
            metric(TEXT, "bridge_guard_ringbuf_lost_total", &[]),
            Some(3.0)
        );
        assert_eq!(metric(TEXT, "bridge_guard_events", &[]), None);
        let l = repair_latencies(TEXT);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].action, "bridge_up");
        assert_eq!(l[0].count, 10);
        assert_eq!(l[0].mean_ns, 600_000);
        assert_eq!(l[0].p50_le, "0.0005");
        assert_eq!(l[0].p99_le, "+Inf");
    }
}
