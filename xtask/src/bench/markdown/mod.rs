//! The results as markdown: the tables printed at the end of a run, and docs/benchmarks.md.
//! `churn` has the storm, fighter, loop and memory tables, `paced` the paced mode's and the
//! costs, `vmtest` keeps the VM matrix's block of the document.

mod churn;
mod libvirt;
mod paced;
pub(crate) mod vmtest;

use std::fmt::Write as _;

pub use self::vmtest::keep_vmtest_block;
use super::{
    contenders::{FIX_SCRIPT, MONITOR_LOOP},
    faults::Fault,
    machine::Machine,
    report::Report,
    stats::human_ns,
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

/// A ratio to the oracle, to two decimals (the target is 1.25×).
fn oracle_ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "–".to_owned(), |x| format!("{x:.2}×"))
}

/// KiB as MiB.
fn mib(k: Option<u64>) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    k.map_or_else(
        || "–".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
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
/// What a run prints at its end: the targets, the storm and the paced tables.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    if !r.storm_cells.is_empty() {
        let _ = writeln!(s, "\nStorm\n\n{}", churn::storm(r));
    }
    if !r.fights.is_empty() {
        let _ = writeln!(s, "Fighter\n\n{}", churn::fighter(r));
    }
    if r.loop_run.is_some() {
        let _ = writeln!(s, "Guest loop\n\n{}", churn::guest_loop(r));
    }
    if !r.cells.is_empty() {
        let _ = writeln!(s, "Paced\n{}", paced::results(r));
    }
    let _ = writeln!(s, "\n{}", targets(r));
    s
}

/// The method, as the document's bullet list.
fn method(r: &Report) -> String {
    let st = &r.settings;
    format!(
        "- **Lab**: a network namespace with bridge `br0` (kernel STP on, forward delay 2 s, as libvirt \
         makes them) and N VM namespaces, each joined by a veth whose bridge end is `vnetN` \
         (addresses from 198.18.0.0/15). Storm, fighter and loop: {} VMs; paced: {}.\n\
         - **Faults**: {}.\n\
         - **Injection**: in-process rtnetlink requests; the fault's time is CLOCK_MONOTONIC taken \
         right before the first request is sent (the kernel acts inside that `sendmsg()`). A guest \
         end comes back up only once the bridge has reported it down (set down and up within \
         microseconds, the bridge never notices: linkwatch coalesces the two carrier changes).\n\
         - **Outage**: from injection to the link notification after which the lab is healthy \
         (bridge admin-up with carrier, every vnet enslaved and forwarding). A thread in the \
         lab namespace subscribes to RTNLGRP_LINK (AF_UNSPEC and AF_BRIDGE messages), keeps a model \
         of the lab and stamps each notification with CLOCK_MONOTONIC when `recv()` returns; \
         nothing is polled. That thread, and the injecting one while it injects, run SCHED_FIFO, so \
         their timestamps do not include waiting for a CPU the agent or anything else holds \
         (netlink sockets have no kernel receive timestamps). The bridge's carrier change reaches \
         netlink through linkwatch, possibly later than the port-state notification that caused \
         it: when a notification leaves everything healthy but the last reported carrier, one \
         RTM_GETLINK asks the kernel, and the lab counts as healthy as of that notification if the \
         carrier is there.\n\
         - **From the fault in place**: the same outage less the time until the fault's last \
         request was sent or its first notification arrived, whichever came later. No guard can \
         act earlier, so this is the part a guard decides; the rest is the kernel carrying out the \
         fault (a detach waits for an RCU grace period before it notifies; deleting a bridge waits \
         for one per port).\n\
         - **Storm**: the next fault as soon as the notification that shows the lab healthy \
         arrives; {:.1} s per class and contender; unrepaired after {:.1} s.\n\
         - **Paced**: each fault {} times per contender (no guard: {}, as most of its faults \
         last until the {} s timeout), each on a lab healthy and quiet (no notification, no guard \
         output) for {} ms; a trial ends when the lab has been healthy and quiet for as long. \
         bridge-guard's faults are also at least {} ms apart and after its last repair, so its \
         backoff (which slows a repair needed again within 1 s of the last, after 5 free repeats) \
         does not turn this mode into a fight: the storm is where that shows.\n\
         - **Contenders**, one after the other on the same lab: bridge-guard (`bridge-guard run \
         --bridge br0 --port-pattern 'vnet*' --metrics 127.0.0.1:0 --log-format json \
         --state-dir DIR{}`, ready on its `ready:` line, state on tmpfs as `/run` is); the oracle \
         (a thread of the bench at normal priority, told the fault class before each injection, \
         which sends the class's one right repair in one datagram on the first notification that \
         shows the fault in a repairable form: STP off and the stuck port forced to forwarding, \
         the port re-attached, the bridge set up, or the new bridge's STP off, ports attached and \
         bridge up); the shell guard below (`ip monitor link route` into a `while read` loop \
         running the fix script on every line); no guard. \"÷ oracle\" is a median over the \
         oracle's median: the agent's own overhead.\n\
         - **Percentiles** are nearest-rank: with 20 trials, p99 is the maximum.\n",
        st.storm_vms,
        st.vms
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
        Fault::ALL
            .iter()
            .map(|f| format!("`{}` ({})", f.key(), f.what()))
            .collect::<Vec<_>>()
            .join(", "),
        st.storm_secs,
        st.storm_bound_s,
        st.repeat,
        if st.none_repeat == 1 {
            "once".to_owned()
        } else {
            format!("{} times", st.none_repeat)
        },
        st.timeout_s,
        st.quiet_ms,
        st.spacing_ms,
        st.agent_args
            .iter()
            .fold(String::new(), |acc, a| format!("{acc} {a}")),
    )
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
    let _ = writeln!(s, "## Targets\n\n{}", targets(r));
    if !r.storm_cells.is_empty() {
        let _ = writeln!(s, "## Storm: faults back to back\n\n{}", churn::storm(r));
    }
    if !r.fights.is_empty() {
        let _ = writeln!(s, "## Fighter\n\n{}", churn::fighter(r));
    }
    if r.loop_run.is_some() {
        let _ = writeln!(
            s,
            "## A guest bridging its two NICs\n\n{}",
            churn::guest_loop(r)
        );
    }
    if r.libvirt.is_some() {
        let _ = writeln!(
            s,
            "## libvirt: the network restarted under a running guest\n\n{}",
            libvirt::section(r)
        );
    }
    if !r.cells.is_empty() {
        let _ = writeln!(s, "## Paced: one fault at a time\n{}", paced::results(r));
        if let Some(svg) = svg_name {
            let _ = writeln!(
                s,
                "\n![median outage per fault and contender, log scale]({svg})\n"
            );
        }
        let _ = writeln!(
            s,
            "## What bridge-guard did\n\n{}",
            paced::repairs_markdown(r)
        );
    }
    if !r.memory.is_empty() {
        let _ = writeln!(s, "## Memory\n\n{}", churn::memory(r));
    }
    let _ = writeln!(s, "## Cost\n\n{}", paced::costs_markdown(r));
    if let Some(p) = &r.pipeline {
        let _ = writeln!(
            s,
            "## The agent's pipeline\n\n{}",
            paced::pipeline_markdown(p)
        );
    }
    let _ = writeln!(s, "## Machine\n\n{}", machine_markdown(&r.machine));
    let _ = writeln!(s, "## Method\n\n{}", method(r));
    let _ = writeln!(
        s,
        "## Kernel matrix: eBPF against netlink\n\nWritten by `cargo xtask vmtest`; the bench keeps it as it is.\n\n{}\n",
        vmtest::empty_block()
    );
    let _ = writeln!(
        s,
        "## The shell guard\n\nThe fix script (`fix-vm-network.sh`):\n\n```sh\n{}```\n\nThe monitor loop:\n\n```sh\n{}\n```\n",
        FIX_SCRIPT,
        MONITOR_LOOP.replace("@FIX@", "fix-vm-network.sh")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_leads_with_targets_and_the_storm_and_carries_the_vmtest_block() {
        let r = crate::bench::report::sample();
        let doc = document(&r, Some("benchmarks.svg"));
        let at = |s: &str| {
            doc.find(s)
                .unwrap_or_else(|| panic!("no {s:?} in the document"))
        };
        assert!(at("## Targets") < at("## Storm") && at("## Storm") < at("## Paced"));
        assert!(at("## Paced") < at(vmtest::BEGIN) && at(vmtest::BEGIN) < at(vmtest::END));
        // The storm row of the unrepaired detach, bold; a cell's ratio to the oracle.
        assert!(
            doc.contains("| detach | bridge-guard | 2 | **1** |"),
            "{doc}"
        );
        assert!(
            doc.contains("| stp-flap | bridge-guard | 1 | 0 | 800 µs |"),
            "{doc}"
        );
        assert!(doc.contains("| 1.12× |"));
        assert!(doc.contains("| bridge-guard | 20000 | 1.00 ms | 100% | 3.0% | 4 | 0.8 | 2.00 ms | 1 | 17.6 MiB |"), "{doc}");
        assert!(doc.contains("**not blocked** within 700.0 ms"));
        assert!(doc.contains("| storm, 4 VMs | 16.4 MiB | 55.7 MiB |"));
        // libvirt: the agent's two trials, the shell's one, and no guard's not healed.
        assert!(
            doc.contains("| bridge-guard | 2 | 0 | 128.0 ms | 131.0 ms | 131.0 ms | 8.00 ms | 11.0 ms | 90.0 ms |"),
            "{doc}"
        );
        assert!(doc.contains("| none | 1 | **1** | not healed |"), "{doc}");
        let summary = summary(&r);
        assert!(summary.contains("Storm") && summary.contains("| target | met | detail |"));
    }
}
