//! The churn tables: storm, fighter, guest loop, and the agent's memory.

use std::fmt::Write as _;

use super::{mib, oracle_ratio};
use crate::bench::{report::Report, stats::human_ns};

fn or_dash(v: Option<u64>) -> String {
    v.map_or_else(|| "–".to_owned(), human_ns)
}

/// A percentile of a storm cell: unrepaired where it falls on an unrepaired fault.
fn rank(v: Option<u64>, unrepaired: usize) -> String {
    match v {
        Some(ns) => human_ns(ns),
        None if unrepaired > 0 => "unrepaired".to_owned(),
        None => "–".to_owned(),
    }
}

/// One row per (fault class, contender) of the storm.
pub fn storm(r: &Report) -> String {
    let st = &r.settings;
    let mut s = format!(
        "Every fault class back to back for {:.1} s per contender, {} VMs: the next fault as soon as a \
         notification shows the last one repaired; a fault not repaired within {:.0} s counts as \
         unrepaired (the bench then restores the lab). Unrepaired faults rank as the longest \
         outages, so a percentile that falls on one reads \"unrepaired\".\n\n\
         | fault | contender | injected | unrepaired | from the fault in place: median | p99 | max | ÷ oracle | from injection: median | p99 | max | ÷ oracle |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        st.storm_secs, st.storm_vms, st.storm_bound_s
    );
    for c in &r.storm_cells {
        let a = &c.after_fault;
        let o = &c.outage;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.fault.key(),
            c.contender.key(),
            c.trials,
            if c.not_healed > 0 {
                format!("**{}**", c.not_healed)
            } else {
                "0".to_owned()
            },
            rank(a.median_ns, c.not_healed),
            rank(a.p99_ns, c.not_healed),
            rank(a.max_ns, c.not_healed),
            oracle_ratio(a.vs_oracle),
            rank(o.median_ns, c.not_healed),
            rank(o.p99_ns, c.not_healed),
            rank(o.max_ns, c.not_healed),
            oracle_ratio(o.vs_oracle),
        );
    }
    s
}

pub fn fighter(r: &Report) -> String {
    let mut s = format!(
        "A thread re-enables kernel STP on `br0` over rtnetlink as fast as it can (each request \
         acknowledged before the next) for {:.1} s, {} VMs. CPU is the guard's utime+stime over the \
         fight (the shell guard's whole process group, fix scripts included) as a share of one CPU; \
         lines are what it wrote (the agent's log lines, the shell guard's one line per fix run); \
         healthy means STP off and every port forwarding, counted from the fighter's last request. \
         The fighter's slowest request and the bench's own CPU (fighter, link monitor and \
         observer, on the same {} CPUs) show what the guard competed with.\n\n\
         | guard | fighter requests | slowest | bench CPU | guard CPU | log lines | per second | healthy after the end | lines after the end | peak RSS |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.settings.fight_secs, r.settings.storm_vms, r.machine.nproc
    );
    for f in &r.fights {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
            f.contender.key(),
            f.requests,
            human_ns(f.slowest_request_ns),
            f.bench_cpu_ms.map_or_else(
                || "–".to_owned(),
                |ms| format!("{:.0}%", ms / (f.secs * 10.0))
            ),
            f.cpu_percent
                .map_or_else(|| "–".to_owned(), |p| format!("{p:.1}%")),
            f.log_lines,
            f.lines_per_s,
            f.healthy_text(),
            f.lines_after,
            mib(f.peak_rss_kib),
        );
    }
    s
}

pub fn guest_loop(r: &Report) -> String {
    let Some(l) = &r.loop_run else {
        return String::new();
    };
    let mut s = format!(
        "A VM namespace bridges its two veths (`vnetA`, `vnetB` on `br0`, STP off, {} more VMs on \
         the bridge): the loop forms when the guest enslaves its second NIC to its bridge, and one \
         broadcast from a VM starts it circulating. Measured from that request to the first link \
         notification showing `vnetA` or `vnetB` out of forwarding, with the frames that came back \
         out of the loop VM (rx packets of `vnetA` + `vnetB`). The bench ends the loop itself \
         (second NIC off the guest bridge, the bridge deleted) after {:.1} s or {} frames.\n\n",
        l.vms, l.wait_s, l.packet_cap
    );
    let _ = writeln!(
        s,
        "| blocked | after | frames before the block | frames in all | ended by |\n|---|---:|---:|---:|---|\n| {} | {} | {} | {} | {} |",
        l.blocked
            .clone()
            .unwrap_or_else(|| format!("**not blocked** within {}", human_ns(l.lasted_ns))),
        or_dash(l.blocked_after_ns),
        l.packets_before_block
            .map_or_else(|| "–".to_owned(), |p| p.to_string()),
        l.packets_total,
        l.ended_by
    );
    s
}

pub fn memory(r: &Report) -> String {
    let mut s = String::from(
        "bridge-guard's resident memory in each run: VmRSS once ready and settled, VmHWM (the \
         peak) at the end.\n\n| run | idle RSS | peak RSS |\n|---|---:|---:|\n",
    );
    for m in &r.memory {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            m.run,
            mib(m.idle_kib),
            mib(m.peak_kib)
        );
    }
    s
}
