//! The libvirt part's table.

use std::fmt::Write as _;

use crate::bench::{
    contenders::Contender,
    libvirt::LibvirtTrial,
    report::Report,
    stats::{human_ns, summary},
};

pub fn section(r: &Report) -> String {
    let Some(l) = &r.libvirt else {
        return String::new();
    };
    if let Some(why) = &l.skipped {
        return format!("Not measured in this run: {why}.\n");
    }
    let mut s = format!(
        "libvirt ({}) restarts its network under a running qemu guest: `virsh net-destroy \
         default` then `net-start default` (`virbr0`, STP on, libvirt's delay 0, DHCP), as \
         libvirt users do; libvirt leaves the running guest's tap out of the new bridge. Timed \
         from the `net-destroy` request, and from `net-start`'s return, to the link \
         notification after which `virbr0` is up and the tap is on it, forwarding; a trial not \
         healed within {:.0} s counts as not healed. `net-start` is libvirt's own time, with \
         the guard running.\n\n\
         | contender | trials | not healed | from net-destroy: median | p99 | max | from net-start's return: median | max | net-start: median |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        l.libvirt, l.timeout_s
    );
    for c in Contender::ALL {
        let these: Vec<&LibvirtTrial> = l.trials.iter().filter(|t| t.contender == c).collect();
        if these.is_empty() {
            continue;
        }
        let healed: Vec<u64> = these.iter().filter_map(|t| t.outage_ns).collect();
        let after: Vec<u64> = these.iter().filter_map(|t| t.after_start_ns).collect();
        let starts: Vec<u64> = these.iter().map(|t| t.net_start_ns).collect();
        let cell = |v: Option<u64>| match v {
            None => "not healed".to_owned(),
            // Repaired before libvirt returned.
            Some(0) => "0 (before)".to_owned(),
            Some(ns) => human_ns(ns),
        };
        let (m, p99, max) =
            summary(&healed).map_or((None, None, None), |(a, b, c)| (Some(a), Some(b), Some(c)));
        let (am, _, amax) =
            summary(&after).map_or((None, None, None), |(a, b, c)| (Some(a), Some(b), Some(c)));
        let not_healed = these.len() - healed.len();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.key(),
            these.len(),
            if not_healed > 0 {
                format!("**{not_healed}**")
            } else {
                "0".to_owned()
            },
            cell(m),
            cell(p99),
            cell(max),
            cell(am),
            cell(amax),
            summary(&starts).map_or_else(|| "–".to_owned(), |(m, _, _)| human_ns(m)),
        );
    }
    s
}
