//! The chart: median outage per fault and contender as bars on a log scale, with the p99 as a
//! whisker; faults that were not healed reach the top, hatched.

use std::fmt::Write as _;

use super::{contenders::Contender, faults::Fault, report::Cell};

const LO_NS: f64 = 10_000.0; // 10 µs
const HI_NS: f64 = 100_000_000_000.0; // 100 s
const PLOT_H: f64 = 320.0;
const TOP: f64 = 50.0;
const LEFT: f64 = 70.0;
const BAR_W: f64 = 16.0;
const GROUP_GAP: f64 = 22.0;

fn color(c: Contender) -> &'static str {
    match c {
        Contender::BridgeGuard => "#1f77b4",
        Contender::Oracle => "#2ca02c",
        Contender::Shell => "#ff7f0e",
        Contender::None => "#8c8c8c",
    }
}

#[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
fn y(ns: u64) -> f64 {
    let v = (ns as f64).clamp(LO_NS, HI_NS);
    let frac = (v.log10() - LO_NS.log10()) / (HI_NS.log10() - LO_NS.log10());
    TOP + PLOT_H * (1.0 - frac)
}

pub fn chart(cells: &[Cell], vms: &[usize], timeout_s: u64) -> String {
    let groups: Vec<(usize, Fault)> = vms
        .iter()
        .flat_map(|&n| Fault::ALL.iter().map(move |&f| (n, f)))
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "four contenders")]
    let group_w = BAR_W * Contender::ALL.len() as f64 + GROUP_GAP;
    #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
    let width = LEFT + group_w * groups.len() as f64 + 110.0;
    let height = TOP + PLOT_H + 130.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">
<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#ddd"/><line x1="0" y1="0" x2="0" y2="6" stroke="#888" stroke-width="3"/></pattern></defs>
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="20" font-size="14" font-weight="bold">Outage per fault: median (bar) and p99 (whisker), log scale</text>"##
    );
    // Axis and grid.
    for (ns, label) in [
        (10_000u64, "10 µs"),
        (100_000, "100 µs"),
        (1_000_000, "1 ms"),
        (10_000_000, "10 ms"),
        (100_000_000, "100 ms"),
        (1_000_000_000, "1 s"),
        (10_000_000_000, "10 s"),
        (100_000_000_000, "100 s"),
    ] {
        let yy = y(ns);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.0}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{:.0}" y="{:.1}" text-anchor="end">{label}</text>"##,
            width - 20.0,
            LEFT - 6.0,
            yy + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.0}" stroke="#333"/>"##,
        TOP + PLOT_H
    );
    for (gi, (n, fault)) in groups.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
        let gx = LEFT + 10.0 + group_w * gi as f64;
        for (ci, c) in Contender::ALL.iter().enumerate() {
            let Some(cell) = cells
                .iter()
                .find(|x| x.vms == *n && x.fault == *fault && x.contender == *c)
            else {
                continue;
            };
            #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
            let x = gx + BAR_W * ci as f64;
            let base = TOP + PLOT_H;
            match cell.outage.median_ns {
                Some(m) => {
                    let top = y(m);
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} N={} {}: median {}</title></rect>"##,
                        BAR_W - 2.0,
                        base - top,
                        color(*c),
                        c.key(),
                        n,
                        fault.key(),
                        super::stats::human_ns(m)
                    );
                }
                None => {
                    let top = y(timeout_s * 1_000_000_000);
                    let _ = writeln!(
                        s,
                        r##"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="url(#hatch)" stroke="{}"><title>{} N={} {}: not healed within {timeout_s} s</title></rect>"##,
                        BAR_W - 2.0,
                        base - top,
                        color(*c),
                        c.key(),
                        n,
                        fault.key()
                    );
                }
            }
            if let Some(p) = cell
                .outage
                .p99_ns
                .filter(|_| cell.outage.median_ns.is_some())
            {
                let cx = x + (BAR_W - 2.0) / 2.0;
                let _ = writeln!(
                    s,
                    r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#222"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#222"/>"##,
                    y(p),
                    y(cell.outage.median_ns.unwrap_or(p)),
                    cx - 3.0,
                    y(p),
                    cx + 3.0,
                    y(p)
                );
            }
        }
        let lx = gx + BAR_W * 2.0;
        let ly = TOP + PLOT_H + 12.0;
        let _ = writeln!(
            s,
            r##"<text transform="translate({lx:.1},{ly:.1}) rotate(40)" text-anchor="start">{} · {n} VMs</text>"##,
            fault.key()
        );
    }
    let ly = height - 18.0;
    for (i, c) in Contender::ALL.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "plot coordinates")]
        let lx = LEFT + 150.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.0}" y="{:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{ly:.0}">{}</text>"##,
            ly - 10.0,
            color(*c),
            lx + 16.0,
            c.key()
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{:.0}" y="{:.0}" width="12" height="12" fill="url(#hatch)" stroke="#888"/><text x="{:.0}" y="{ly:.0}">not healed within {timeout_s} s</text>"##,
        LEFT + 600.0,
        ly - 10.0,
        LEFT + 616.0
    );
    s.push_str("</svg>\n");
    s
}
