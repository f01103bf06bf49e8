//! The results as markdown: the tables printed at the end of a run, and docs/benchmarks.md.

use std::fmt::Write as _;

use super::{
    contenders::{Contender, FIX_SCRIPT, MONITOR_LOOP},
    faults::Fault,
    machine::Machine,
    pipeline::Pipeline,
    report::Report,
    stats::{self, human_ns},
};

fn cell_text(v: Option<u64>, not_healed: usize, timeout_s: u64) -> String {
    match v {
        Some(ns) => human_ns(ns),
        None if not_healed > 0 => format!("> {timeout_s} s (not healed)"),
        None => "–".to_owned(),
    }
}

fn ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "–".to_owned(), |x| format!("{x:.1}×"))
}

/// The results tables, one per lab size.
pub fn results(r: &Report) -> String {
    let mut s = String::new();
    for &n in &r.settings.vms {
        let _ = writeln!(
            s,
            "\n#### {n} VMs\n\n| fault | contender | trials | median | p99 | max | speed-up vs shell median | after the fault was in place: median | p99 | speed-up |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in r.cells.iter().filter(|c| c.vms == n) {
            let _ = writeln!(
                s,
                "| {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} |",
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
                ratio(c.outage.speedup_vs_shell),
                cell_text(c.after_fault.median_ns, c.not_healed, r.settings.timeout_s),
                cell_text(c.after_fault.p99_ns, c.not_healed, r.settings.timeout_s),
                ratio(c.after_fault.speedup_vs_shell),
            );
        }
        let seen: Vec<String> = Contender::ALL
            .iter()
            .filter_map(|c| {
                let v: Vec<u64> = r
                    .trials
                    .iter()
                    .filter(|t| t.vms == n && t.contender == *c)
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
            .filter(|t| t.vms == n && t.fault == Fault::StpGuestFlap)
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

pub fn targets(r: &Report) -> String {
    let mut s = String::from("| target | met | detail |\n|---|---|---|\n");
    for t in &r.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            t.name,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            },
            t.detail
        );
    }
    s
}

/// What bridge-guard did per fault: its most frequent set of repairs.
fn repairs_markdown(r: &Report) -> String {
    let mut s = String::from(
        "| lab | fault | bridge-guard's repairs (most frequent set, from its log) | trials with it |\n|---|---|---|---:|\n",
    );
    for &n in &r.settings.vms {
        for f in Fault::ALL {
            let sets: Vec<String> = r
                .trials
                .iter()
                .filter(|t| t.vms == n && t.fault == f && t.contender == Contender::BridgeGuard)
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

fn pipeline_markdown(p: &Pipeline) -> String {
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

fn costs_markdown(r: &Report) -> String {
    let mut s = String::from(
        "| lab | contender | faults | CPU | CPU per fault | peak RSS |\n|---|---|---:|---:|---:|---:|\n",
    );
    for c in &r.costs {
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let per = c.cpu_ms.map(|ms| ms / c.trials.max(1) as f64);
        let _ = writeln!(
            s,
            "| {} VMs | {} | {} | {} | {} | {} |",
            c.vms,
            c.contender.key(),
            c.trials,
            c.cpu_ms
                .map_or_else(|| "–".to_owned(), |v| format!("{v:.0} ms")),
            per.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms")),
            c.peak_rss_kib.map_or_else(
                || "–".to_owned(),
                |k| format!("{:.1} MiB", k as f64 / 1024.0)
            ),
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

fn machine_markdown(m: &Machine) -> String {
    let hooks = m
        .hooks
        .iter()
        .map(|(h, t)| format!("{h}={t}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "| | |\n|---|---|\n| CPUs | {} × {} |\n| memory | {} MiB |\n| kernel | {} |\n| hook tiers (`bridge-guard doctor --json`) | {} |\n| agent | {} |\n| load average at start / end | {} / {} |\n| CPU busy over the run (all CPUs, bench included) | {} |\n| steal | {} |\n| busiest processes at start (`ps`, %CPU) | {} |\n",
        m.nproc,
        m.cpu_model,
        m.mem_total_mib,
        m.kernel,
        hooks,
        m.agent,
        m.loadavg_start,
        m.loadavg_end,
        m.busy_percent
            .map_or_else(|| "–".to_owned(), |v| format!("{v:.0}%")),
        m.steal_percent
            .map_or_else(|| "–".to_owned(), |v| format!("{v:.1}%")),
        m.busiest_at_start.join("; ")
    ) + &contention(m)
}

/// A warning when something else was busy: the numbers then include contention for the CPUs.
fn contention(m: &Machine) -> String {
    let mut s = String::new();
    if !m.other_load.is_empty() {
        let _ = writeln!(
            s,
            "| other processes' CPU over the run (average % of one CPU) | {} |",
            m.other_load
                .iter()
                .map(|(c, p)| format!("{c} {p:.0}%"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let busy: Vec<&str> = m
        .other_load
        .iter()
        .filter(|(_, p)| *p >= 10.0)
        .map(|(c, _)| c.as_str())
        .collect();
    if !busy.is_empty() {
        let _ = writeln!(
            s,
            "\n**Shared machine**: {} ran beside the bench. The agent, the shell guard and the \
             kernel work they cause competed with it for {} CPUs, so the numbers here include \
             that contention. The bench's own timestamping threads run SCHED_FIFO and are not \
             delayed by it.",
            busy.iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", "),
            m.nproc
        );
    }
    s
}

/// The whole document (docs/benchmarks.md).
pub fn document(r: &Report, svg_name: Option<&str>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Benchmarks\n\nWritten by `{}` ({}; {:.0} s). Re-run it to refresh this page; the same data is in \
         `target/bench/bench.json`.\n",
        r.command,
        if r.settings.quick {
            "quick run"
        } else {
            "full run"
        },
        r.duration_s
    );
    let _ = writeln!(s, "## Machine\n\n{}", machine_markdown(&r.machine));
    let _ = writeln!(
        s,
        "## Method\n\n\
         - **Lab**: a network namespace with bridge `br0` (kernel STP on, forward delay 2 s, as libvirt \
         makes them) and N VM namespaces, each joined by a veth whose bridge end is `vnetN` \
         (addresses from 198.18.0.0/15). Lab sizes: {}.\n\
         - **Faults**, each injected {} times per contender (no guard: {} times, as most of its \
         faults last until the {} s timeout): {}.\n\
         - **Injection**: in-process rtnetlink requests; the fault's time is CLOCK_MONOTONIC taken \
         right before the first request is sent (the kernel acts inside that `sendmsg()`). A guest \
         end comes back up only once the bridge has reported it down (set down and up within \
         microseconds, the bridge never notices: linkwatch coalesces the two carrier changes).\n\
         - **Outage**: from injection to the link notification after which the lab is healthy for \
         good (bridge admin-up with carrier, every vnet enslaved and forwarding). A thread in the \
         lab namespace subscribes to RTNLGRP_LINK (AF_UNSPEC and AF_BRIDGE messages), keeps a model \
         of the lab and stamps each notification with CLOCK_MONOTONIC when `recv()` returns; \
         nothing is polled. That thread, and the injecting one while it injects, run SCHED_FIFO, so \
         their timestamps do not include waiting for a CPU the agent or anything else holds \
         (netlink sockets have no kernel receive timestamps). The bridge's carrier change reaches netlink through linkwatch, possibly \
         later than the port-state notification that caused it: when a notification leaves \
         everything healthy but the last reported carrier, one RTM_GETLINK asks the kernel, and the \
         lab counts as healthy as of that notification if the carrier is there. A trial ends when \
         the lab has been healthy with no notification and no guard output for {} ms.\n\
         - **After the fault was in place**: the same outage less the time until the fault's last \
         request was sent or its first notification arrived, whichever came later. No guard can \
         act earlier, so this is the part a guard decides; the rest is the kernel carrying out the \
         fault (a detach waits for an RCU grace period before it notifies; deleting a bridge waits \
         for one per port).\n\
         - **Spacing** (bridge-guard only): a fault is injected at least {} ms after the previous \
         one and after the previous repair, so bridge-guard's backoff (which slows a repair needed \
         again within 1 s of the last, after 5 free repeats) does not turn a benchmark into a \
         fight. The agent's state directory is on tmpfs, as `/run` is on the hosts it guards.\n\
         - **Contenders**, one after the other on the same lab: bridge-guard (`bridge-guard run \
         --bridge br0 --port-pattern 'vnet*' --metrics 127.0.0.1:0 --log-format json \
         --state-dir DIR{}`, ready on its `ready:` line); the shell guard below (`ip monitor link \
         route` into a `while read` loop running the fix script on every line); no guard.\n\
         - **Percentiles** are nearest-rank: with 20 trials, p99 is the maximum.\n",
        r.settings
            .vms
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
        r.settings.repeat,
        r.settings.none_repeat,
        r.settings.timeout_s,
        Fault::ALL
            .iter()
            .map(|f| format!("`{}` ({})", f.key(), f.what()))
            .collect::<Vec<_>>()
            .join(", "),
        r.settings.quiet_ms,
        r.settings.spacing_ms,
        r.settings
            .agent_args
            .iter()
            .fold(String::new(), |acc, a| format!("{acc} {a}")),
    );
    let _ = writeln!(s, "## Outage per fault\n{}", results(r));
    if let Some(svg) = svg_name {
        let _ = writeln!(
            s,
            "\n![median outage per fault and contender, log scale]({svg})\n"
        );
    }
    let _ = writeln!(s, "## Targets\n\n{}", targets(r));
    let _ = writeln!(s, "## What bridge-guard did\n\n{}", repairs_markdown(r));
    let _ = writeln!(s, "## Cost\n\n{}", costs_markdown(r));
    if let Some(p) = &r.pipeline {
        let _ = writeln!(s, "## The agent's pipeline\n\n{}", pipeline_markdown(p));
    }
    let _ = writeln!(
        s,
        "## The shell guard\n\nThe fix script (`fix-vm-network.sh`):\n\n```sh\n{}```\n\nThe monitor loop:\n\n```sh\n{}\n```\n",
        FIX_SCRIPT,
        MONITOR_LOOP.replace("@FIX@", "fix-vm-network.sh")
    );
    s
}
