//! The paced mode's tables, what bridge-guard repaired, what each contender cost, and the
//! agent's pipeline.

use std::fmt::Write as _;

use super::{cell_text, mib, oracle_ratio, ratio};
use crate::bench::{
    contenders::Contender,
    faults::Fault,
    pipeline::Pipeline,
    report::{Mode, Report},
    stats::{self, human_ns},
};

/// The paced mode's tables, one per lab size.
pub fn results(r: &Report) -> String {
    let mut s = String::new();
    for &n in &r.settings.vms {
        let _ = writeln!(
            s,
            "\n#### {n} VMs\n\n| fault | contender | trials | median | p99 | max | ÷ oracle | speed-up vs shell | from the fault in place: median | p99 | ÷ oracle | speed-up vs shell |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in r.cells.iter().filter(|c| c.vms == n) {
            let _ = writeln!(
                s,
                "| {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.fault.key(),
                c.contender.key(),
                c.trials,
                if c.not_healed > 0 {
                    format!(" ({} not healed)", c.not_healed)
                } else {
                    String::new()
                },
                cell_text(c.outage.median_ns, c.not_healed, r.settings.timeout_s),
                cell_text(c.outage.p99_ns, c.not_healed, r.settings.timeout_s),
                cell_text(c.outage.max_ns, c.not_healed, r.settings.timeout_s),
                oracle_ratio(c.outage.vs_oracle),
                ratio(c.outage.speedup_vs_shell),
                cell_text(c.after_fault.median_ns, c.not_healed, r.settings.timeout_s),
                cell_text(c.after_fault.p99_ns, c.not_healed, r.settings.timeout_s),
                oracle_ratio(c.after_fault.vs_oracle),
                ratio(c.after_fault.speedup_vs_shell),
            );
        }
        let seen: Vec<String> = Contender::ALL
            .iter()
            .filter_map(|c| {
                let v: Vec<u64> = r
                    .trials
                    .iter()
                    .filter(|t| t.mode == Mode::Paced && t.vms == n && t.contender == *c)
                    .filter_map(|t| t.first_unhealthy_ns)
                    .collect();
                let (m, _, _) = stats::summary(&v)?;
                Some(format!("{} with {}", human_ns(m), c.key()))
            })
            .collect();
        if !seen.is_empty() {
            let _ = writeln!(
                s,
                "\nFrom injection to the first notification showing the fault (median over all \
                 faults; the delay of the measurement itself): {}.",
                seen.join(", ")
            );
        }
        let notice: Vec<u64> = r
            .trials
            .iter()
            .filter(|t| t.mode == Mode::Paced && t.vms == n && t.fault == Fault::StpGuestFlap)
            .map(|t| t.last_step_ns)
            .collect();
        if let Some((m, _, mx)) = stats::summary(&notice) {
            let _ = writeln!(
                s,
                "\n`stp-guest-flap` includes the guest link being down until the bridge noticed \
                 (the guest end comes back up only then; the bridge hears of carrier changes \
                 through linkwatch): {} median, {} max, from the fault to the guest end's \"up\".",
                human_ns(m),
                human_ns(mx)
            );
        }
    }
    s
}

/// What bridge-guard did per fault: its most frequent set of repairs.
pub fn repairs_markdown(r: &Report) -> String {
    let mut s = String::from(
        "| lab | fault | bridge-guard's repairs (most frequent set, from its log) | trials with it |\n|---|---|---|---:|\n",
    );
    for &n in &r.settings.vms {
        for f in Fault::ALL {
            let sets: Vec<String> = r
                .trials
                .iter()
                .filter(|t| {
                    t.mode == Mode::Paced
                        && t.vms == n
                        && t.fault == f
                        && t.contender == Contender::BridgeGuard
                })
                .map(|t| {
                    let mut v: Vec<String> = t
                        .repairs
                        .iter()
                        .map(|m| {
                            let m = m.trim_start_matches("repaired: ");
                            m.split(": ").next().unwrap_or(m).to_owned()
                        })
                        .collect();
                    v.sort();
                    v.dedup();
                    if v.len() > 4 {
                        let k = v.len();
                        v.truncate(3);
                        v.push(format!("… ({k} distinct)"));
                    }
                    v.join(", ")
                })
                .collect();
            if sets.is_empty() {
                continue;
            }
            let mut best = (String::new(), 0usize);
            for c in &sets {
                let k = sets.iter().filter(|x| *x == c).count();
                if k > best.1 {
                    best = (c.clone(), k);
                }
            }
            let _ = writeln!(
                s,
                "| {n} VMs | {} | {} | {}/{} |",
                f.key(),
                if best.0.is_empty() {
                    "none logged"
                } else {
                    &best.0
                },
                best.1,
                sets.len()
            );
        }
    }
    s
}

pub fn pipeline_markdown(p: &Pipeline) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Idle: {:.3}% of one CPU ({:.2} ms on CPU over {:.0} s by schedstat; utime+stime {:.0} ms; {} log lines).\n",
        p.idle.percent_of_one_cpu, p.idle.sched_ms, p.idle.secs, p.idle.cpu_ms, p.idle.log_lines
    );
    let _ = writeln!(
        s,
        "Event rate: an unguarded bridge with kernel STP and {} ports in the agent's namespace, set \
         down and up as a whole (one eBPF event per port each time, {} per request); the agent's \
         `bridge_guard_events_total{{source=\"ebpf\"}}` and `bridge_guard_ringbuf_lost_total` \
         before and after each step:\n\n| target events/s | achieved events/s | generated | received | lost (ringbuf) | netlink overruns | agent CPU |\n|---:|---:|---:|---:|---:|---:|---:|",
        p.churn_ports, p.churn_ports
    );
    for st in &p.steps {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {} | {} | {} | {:.0} ms ({:.0}% of one CPU) |",
            st.target_rate
                .map_or_else(|| "unpaced".to_owned(), |r| format!("{r}/s")),
            st.achieved_rate,
            st.generated,
            st.ebpf_events,
            st.lost,
            st.netlink_overruns,
            st.agent_cpu_ms,
            st.agent_cpu_ms / (st.secs * 10.0)
        );
    }
    let _ = writeln!(
        s,
        "\nHighest rate with zero loss: {}. Zero loss at 10k events/s: {}.\n",
        p.best_zero_loss_rate
            .map_or_else(|| "none".to_owned(), |r| format!("{r:.0} events/s")),
        match p.ten_k_zero_loss {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not reached by the generator",
        }
    );
    let _ = writeln!(
        s,
        "Kernel event to user space (`bridge-guard watch --json`: `received_ktime_ns − ktime_ns`):\n\n| load | events | median | p99 | max |\n|---|---:|---:|---:|---:|"
    );
    for l in &p.kernel_to_user {
        let _ = writeln!(
            s,
            "| {} ({}/s) | {} | {} | {} | {} |",
            l.label,
            l.target_rate,
            l.events,
            human_ns(l.median_ns),
            human_ns(l.p99_ns),
            human_ns(l.max_ns)
        );
    }
    s
}

pub fn costs_markdown(r: &Report) -> String {
    let mut s = String::from(
        "| run | contender | faults | CPU | CPU per fault | idle RSS | peak RSS |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for c in &r.costs {
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let per = c.cpu_ms.map(|ms| ms / c.trials.max(1) as f64);
        let _ = writeln!(
            s,
            "| {}, {} VMs | {} | {} | {} | {} | {} | {} |",
            c.mode.key(),
            c.vms,
            c.contender.key(),
            c.trials,
            c.cpu_ms
                .map_or_else(|| "–".to_owned(), |v| format!("{v:.0} ms")),
            per.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms")),
            mib(c.idle_rss_kib),
            mib(c.peak_rss_kib),
        );
    }
    let mut lat = String::new();
    for c in r.costs.iter().filter(|c| !c.repair_latency.is_empty()) {
        for l in &c.repair_latency {
            let _ = writeln!(
                lat,
                "| {} VMs | {} | {} | {} | ≤ {} s | ≤ {} s |",
                c.vms,
                l.action,
                l.count,
                human_ns(l.mean_ns),
                l.p50_le,
                l.p99_le
            );
        }
    }
    if !lat.is_empty() {
        s.push_str(
            "\nRepair latency from the agent's `/metrics` (`bridge_guard_repair_latency_seconds`; the \
             histogram only bounds quantiles by its buckets):\n\n| lab | action | repairs | mean | median | p99 |\n|---|---|---:|---:|---:|---:|\n",
        );
        s.push_str(&lat);
    }
    s
}
