//! The targets (issue 15 and issue 10, for 4 VMs on a 2-core machine), each met, missed or not
//! measured in this run.

use super::{
    contenders::Contender,
    report::{Cell, Report, Target},
    stats::human_ns,
};

const MS: u64 = 1_000_000;
const MIB: u64 = 1024;

fn fmt(o: Option<u64>) -> String {
    o.map_or_else(|| "not healed".to_owned(), human_ns)
}

/// A target over `cells`: met when every cell passes `ok`; each miss described by `what`.
fn over_cells(
    name: String,
    cells: &[&Cell],
    ok: impl Fn(&Cell) -> bool,
    what: impl Fn(&Cell) -> String,
) -> Target {
    let miss: Vec<String> = cells
        .iter()
        .filter(|c| !ok(c))
        .map(|c| format!("{} ({} VMs): {}", c.fault.key(), c.vms, what(c)))
        .collect();
    Target {
        name,
        met: (!cells.is_empty()).then_some(miss.is_empty()),
        detail: if cells.is_empty() {
            "not measured in this run".to_owned()
        } else if miss.is_empty() {
            "met on every fault".to_owned()
        } else {
            format!("missed on {}", miss.join("; "))
        },
    }
}

fn single(name: &str, met: Option<bool>, detail: String) -> Target {
    Target {
        name: name.to_owned(),
        met,
        detail: if met.is_none() && detail.is_empty() {
            "not measured in this run".to_owned()
        } else {
            detail
        },
    }
}

fn storm_targets(r: &Report, n: usize) -> Vec<Target> {
    let bg: Vec<&Cell> = r
        .storm_cells
        .iter()
        .filter(|c| c.contender == Contender::BridgeGuard)
        .collect();
    vec![
        over_cells(
            format!("storm ({n} VMs): no fault left unrepaired"),
            &bg,
            |c| c.not_healed == 0,
            |c| format!("{} of {} unrepaired", c.not_healed, c.trials),
        ),
        over_cells(
            "storm: median < 1 ms from the fault in place".to_owned(),
            &bg,
            |c| c.after_fault.median_ns.is_some_and(|m| m < MS),
            |c| format!("median {}", fmt(c.after_fault.median_ns)),
        ),
        over_cells(
            "storm: p99 < 5 ms from the fault in place".to_owned(),
            &bg,
            |c| c.after_fault.p99_ns.is_some_and(|m| m < 5 * MS),
            |c| format!("p99 {}", fmt(c.after_fault.p99_ns)),
        ),
    ]
}

fn fighter_targets(r: &Report) -> Vec<Target> {
    let f = r
        .fights
        .iter()
        .find(|f| f.contender == Contender::BridgeGuard);
    vec![
        single(
            "fighter: bridge-guard under 5% of one CPU",
            f.and_then(|f| f.cpu_percent.map(|p| p < 5.0)),
            f.map(|f| {
                format!(
                    "{} over {:.1} s against {} STP-on requests",
                    f.cpu_percent
                        .map_or_else(|| "unknown".to_owned(), |p| format!("{p:.1}%")),
                    f.secs,
                    f.requests
                )
            })
            .unwrap_or_default(),
        ),
        single(
            "fighter: at most one log line a second",
            f.map(|f| f.lines_per_s <= 1.0),
            f.map(|f| format!("{} lines in {:.1} s", f.log_lines, f.secs))
                .unwrap_or_default(),
        ),
        single(
            "fighter: healthy within 100 ms of the fight's end",
            f.map(|f| f.healthy_after_ns.is_some_and(|ns| ns < 100 * MS)),
            f.map(|f| format!("healthy {} after", f.healthy_text()))
                .unwrap_or_default(),
        ),
    ]
}

fn paced_targets(r: &Report, n: usize) -> Vec<Target> {
    let bg: Vec<&Cell> = r
        .cells
        .iter()
        .filter(|c| c.contender == Contender::BridgeGuard && c.vms == n)
        .collect();
    let all_bg: Vec<&Cell> = r
        .cells
        .iter()
        .filter(|c| c.contender == Contender::BridgeGuard)
        .collect();
    let ratio = |x: Option<f64>| x.map_or_else(|| "no ratio".to_owned(), |x| format!("{x:.2}×"));
    vec![
        over_cells(
            format!("paced ({n} VMs): median < 1 ms from injection"),
            &bg,
            |c| c.outage.median_ns.is_some_and(|m| m < MS),
            |c| format!("median {}", fmt(c.outage.median_ns)),
        ),
        over_cells(
            format!("paced ({n} VMs): median at most 1.25× the oracle's"),
            &bg,
            |c| c.outage.vs_oracle.is_some_and(|x| x <= 1.25),
            |c| ratio(c.outage.vs_oracle),
        ),
        over_cells(
            "paced: ≥ 30× faster than the shell guard's median (every lab size)".to_owned(),
            &all_bg,
            |c| c.outage.speedup_vs_shell.is_some_and(|s| s >= 30.0),
            |c| {
                c.outage
                    .speedup_vs_shell
                    .map_or_else(|| "no ratio".to_owned(), |s| format!("{s:.1}×"))
            },
        ),
    ]
}

fn memory_target(r: &Report) -> Target {
    let peaks: Vec<(&str, u64)> = r
        .memory
        .iter()
        .filter_map(|m| Some((m.run.as_str(), m.peak_kib?)))
        .collect();
    let worst = peaks.iter().max_by_key(|p| p.1);
    #[expect(clippy::cast_precision_loss, reason = "display")]
    single(
        "peak RSS under 20 MiB (every bridge-guard run)",
        worst.map(|w| w.1 < 20 * MIB),
        worst
            .map(|(run, k)| format!("highest {:.1} MiB ({run})", *k as f64 / 1024.0))
            .unwrap_or_default(),
    )
}

fn loop_target(r: &Report) -> Target {
    let l = r.loop_run.as_ref();
    single(
        "loop: the looping port out of forwarding within 10 ms of the loop forming",
        l.map(|l| l.blocked_after_ns.is_some_and(|ns| ns < 10 * MS)),
        l.map(super::loops::LoopRun::summary).unwrap_or_default(),
    )
}

/// Issue 14: libvirt's own restart of its network leaves the running guest's tap out; the
/// agent must bring it back every time.
fn libvirt_target(r: &Report) -> Target {
    let l = r.libvirt.as_ref().filter(|l| l.skipped.is_none());
    let bg: Vec<_> = l
        .map(|l| {
            l.trials
                .iter()
                .filter(|t| t.contender == Contender::BridgeGuard)
                .collect()
        })
        .unwrap_or_default();
    let healed: Vec<u64> = bg.iter().filter_map(|t| t.outage_ns).collect();
    single(
        "libvirt: a network restarted under a running guest gets its tap back, every time",
        (!bg.is_empty()).then_some(healed.len() == bg.len()),
        match super::stats::summary(&healed) {
            _ if bg.is_empty() => r
                .libvirt
                .as_ref()
                .and_then(|l| l.skipped.clone())
                .unwrap_or_default(),
            Some((_, _, max)) => format!(
                "{} of {} restarts healed; the slowest {} after net-destroy",
                healed.len(),
                bg.len(),
                human_ns(max)
            ),
            None => format!("none of {} restarts healed", bg.len()),
        },
    )
}

fn pipeline_targets(r: &Report) -> Vec<Target> {
    let Some(p) = &r.pipeline else {
        return Vec::new();
    };
    vec![
        Target {
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
        },
        Target {
            name: "idle agent CPU near zero (< 0.1% of one CPU)".to_owned(),
            met: Some(p.idle.percent_of_one_cpu < 0.1),
            detail: format!(
                "{:.3}% of one CPU ({:.2} ms on CPU in {:.0} s; utime+stime {:.0} ms)",
                p.idle.percent_of_one_cpu, p.idle.sched_ms, p.idle.secs, p.idle.cpu_ms
            ),
        },
    ]
}

/// Every target, in the order the document shows them.
pub fn all(r: &Report) -> Vec<Target> {
    let n = r.settings.storm_vms;
    let mut t = storm_targets(r, n);
    t.extend(fighter_targets(r));
    t.extend(paced_targets(r, n));
    t.push(memory_target(r));
    t.push(loop_target(r));
    t.push(libvirt_target(r));
    t.extend(pipeline_targets(r));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict<'a>(t: &'a [Target], name: &str) -> &'a Target {
        t.iter()
            .find(|t| t.name.starts_with(name))
            .unwrap_or_else(|| panic!("no target {name}"))
    }

    #[test]
    fn each_target_is_met_missed_or_not_measured_from_the_report() {
        let r = crate::bench::report::sample();
        let t = &r.targets;
        let storm = verdict(t, "storm (4 VMs): no fault left unrepaired");
        assert_eq!(storm.met, Some(false));
        assert!(storm.detail.contains("detach (4 VMs): 1 of 2 unrepaired"));
        assert_eq!(verdict(t, "fighter: bridge-guard under 5%").met, Some(true));
        assert_eq!(verdict(t, "fighter: at most one log line").met, Some(true));
        assert_eq!(verdict(t, "fighter: healthy within 100 ms").met, Some(true));
        assert_eq!(verdict(t, "paced (4 VMs): median < 1 ms").met, Some(true));
        // 0.9 ms over the oracle's 0.8 ms: 1.125×.
        assert_eq!(
            verdict(t, "paced (4 VMs): median at most 1.25×").met,
            Some(true)
        );
        let rss = verdict(t, "peak RSS");
        assert_eq!(rss.met, Some(false));
        assert!(
            rss.detail.contains("55.7 MiB (storm, 4 VMs)"),
            "{}",
            rss.detail
        );
        let l = verdict(t, "loop:");
        assert_eq!(l.met, Some(false));
        assert!(l.detail.contains("not blocked"));
        let lv = verdict(t, "libvirt:");
        assert_eq!(lv.met, Some(true));
        assert!(
            lv.detail.starts_with("2 of 2 restarts healed"),
            "{}",
            lv.detail
        );
        assert!(t.iter().all(|t| !t.name.contains("idle agent CPU")));
    }

    #[test]
    fn parts_not_run_are_not_measured_rather_than_missed() {
        let mut r = crate::bench::report::sample();
        r.fights.clear();
        r.loop_run = None;
        r.libvirt = None;
        let t = all(&r);
        for name in ["fighter: bridge-guard", "loop:", "libvirt:"] {
            let v = verdict(&t, name);
            assert_eq!(v.met, None, "{name}");
            assert_eq!(v.detail, "not measured in this run");
        }
    }
}
