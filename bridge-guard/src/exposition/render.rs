//! The accounting as Prometheus text format (version 0.0.4). Rendered at scrape time, so open
//! intervals (time in the current state, an outage still going on) count up to the moment of
//! the scrape.

use std::fmt::Write as _;

use crate::{
    accounting::{Accounting, Histogram, seconds},
    event::PortState,
    model::{Clock, Ktime},
    sys::process::ProcessStats,
};

/// What the binary is, for `bridge_guard_build_info`.
#[derive(Clone, Copy, Debug)]
pub struct BuildInfo {
    pub version: &'static str,
    /// The source revision, where the build recorded one.
    pub revision: &'static str,
    /// Whether the eBPF programs are embedded.
    pub ebpf: bool,
}

impl BuildInfo {
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            revision: option_env!("BRIDGE_GUARD_REVISION").unwrap_or("unknown"),
            ebpf: crate::sources::ebpf::embedded(),
        }
    }
}

/// Label value escaping: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.0, "{name}{} {value}", labels(pairs));
    }

    fn count(&mut self, name: &str, pairs: &[(&str, &str)], value: u64) {
        let _ = writeln!(self.0, "{name}{} {value}", labels(pairs));
    }

    fn flag(&mut self, name: &str, pairs: &[(&str, &str)], on: bool) {
        self.count(name, pairs, u64::from(on));
    }

    fn histogram(&mut self, name: &str, pairs: &[(&str, &str)], h: &Histogram) {
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = h
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
            let mut with_le = pairs.to_vec();
            with_le.push(("le", &le));
            let _ = writeln!(self.0, "{name}_bucket{} {count}", labels(&with_le));
        }
        let _ = writeln!(self.0, "{name}_sum{} {}", labels(pairs), h.sum);
        let _ = writeln!(self.0, "{name}_count{} {}", labels(pairs), h.count);
    }
}

fn ports(o: &mut Out, acc: &Accounting, now: Ktime) {
    let ports = &acc.ports;
    o.family(
        "bridge_guard_port_state",
        "gauge",
        "1 for the state the port is in, 0 for the others.",
    );
    for (port, p) in ports {
        for s in PortState::ALL {
            o.flag(
                "bridge_guard_port_state",
                &[("bridge", &p.bridge), ("port", port), ("state", s.as_str())],
                p.state == s,
            );
        }
    }
    o.family(
        "bridge_guard_port_state_seconds_total",
        "counter",
        "Seconds the port spent in each state.",
    );
    for (port, p) in ports {
        for s in PortState::ALL {
            o.sample(
                "bridge_guard_port_state_seconds_total",
                &[("bridge", &p.bridge), ("port", port), ("state", s.as_str())],
                seconds(p.ns_in(s, now)),
            );
        }
    }
    o.family(
        "bridge_guard_port_transitions_total",
        "counter",
        "Port state changes, by from and to.",
    );
    for (port, p) in ports {
        for ((from, to), n) in &p.transitions {
            o.count(
                "bridge_guard_port_transitions_total",
                &[
                    ("bridge", &p.bridge),
                    ("port", port),
                    ("from", from.as_str()),
                    ("to", to.as_str()),
                ],
                *n,
            );
        }
    }
    o.family(
        "bridge_guard_port_outages_total",
        "counter",
        "Completed episodes of not forwarding.",
    );
    for (port, p) in ports {
        o.count(
            "bridge_guard_port_outages_total",
            &[("bridge", &p.bridge), ("port", port)],
            p.outages,
        );
    }
    o.family(
        "bridge_guard_port_outage_seconds_total",
        "counter",
        "Seconds the port spent not forwarding, the outage going on included.",
    );
    for (port, p) in ports {
        o.sample(
            "bridge_guard_port_outage_seconds_total",
            &[("bridge", &p.bridge), ("port", port)],
            seconds(p.outage_ns(now)),
        );
    }
    o.family(
        "bridge_guard_port_repairs_total",
        "counter",
        "Repairs of this port the kernel acknowledged.",
    );
    for (port, p) in ports {
        o.count(
            "bridge_guard_port_repairs_total",
            &[("bridge", &p.bridge), ("port", port)],
            p.repairs,
        );
    }
    o.family(
        "bridge_guard_port_loops_detected_total",
        "counter",
        "Loops the loop guard detected on this port.",
    );
    for (port, p) in ports {
        o.count(
            "bridge_guard_port_loops_detected_total",
            &[("bridge", &p.bridge), ("port", port)],
            p.loops,
        );
    }
    o.family(
        "bridge_guard_port_clock_kernel",
        "gauge",
        "1 if the current state was stamped by the kernel's clock (eBPF), 0 if by netlink \
         receive time.",
    );
    for (port, p) in ports {
        o.flag(
            "bridge_guard_port_clock_kernel",
            &[("bridge", &p.bridge), ("port", port)],
            p.clock == Clock::Kernel,
        );
    }
    o.family(
        "bridge_guard_port_info",
        "gauge",
        "Always 1: the VM (libvirt domain) a port belongs to, and its MAC address.",
    );
    for (port, info) in &acc.port_info {
        let Some(p) = ports.get(port) else { continue };
        o.count(
            "bridge_guard_port_info",
            &[
                ("bridge", &p.bridge),
                ("port", port),
                ("domain", &info.domain),
                ("mac", &info.mac),
            ],
            1,
        );
    }
}

fn bridges(o: &mut Out, acc: &Accounting, now: Ktime) {
    let bridges = &acc.bridges;
    o.family(
        "bridge_guard_bridge_present",
        "gauge",
        "1 if the guarded bridge exists.",
    );
    for (name, b) in bridges {
        o.flag(
            "bridge_guard_bridge_present",
            &[("bridge", name)],
            b.present,
        );
    }
    o.family(
        "bridge_guard_bridge_carrier",
        "gauge",
        "1 if the bridge has carrier (a port forwards).",
    );
    for (name, b) in bridges {
        o.flag(
            "bridge_guard_bridge_carrier",
            &[("bridge", name)],
            b.carrier,
        );
    }
    o.family(
        "bridge_guard_bridge_no_carrier_seconds_total",
        "counter",
        "Seconds the bridge spent without carrier.",
    );
    for (name, b) in bridges {
        o.sample(
            "bridge_guard_bridge_no_carrier_seconds_total",
            &[("bridge", name)],
            seconds(b.no_carrier_ns(now)),
        );
    }
    o.family(
        "bridge_guard_bridge_stp_state",
        "gauge",
        "1 for the bridge's STP mode (off, kernel, user).",
    );
    for (name, b) in bridges {
        for mode in ["off", "kernel", "user"] {
            o.flag(
                "bridge_guard_bridge_stp_state",
                &[("bridge", name), ("mode", mode)],
                b.stp.is_some_and(|s| s.as_str() == mode),
            );
        }
    }
    o.family(
        "bridge_guard_bridge_refusals",
        "gauge",
        "Reasons the agent refuses to repair the bridge now (a loop or an owner it could \
         fight); 0 when it guards it.",
    );
    for (name, b) in bridges {
        o.count(
            "bridge_guard_bridge_refusals",
            &[("bridge", name)],
            b.refusals,
        );
    }
    o.family(
        "bridge_guard_listening_seconds",
        "histogram",
        "Each completed stay of one of the bridge's ports in the listening state.",
    );
    for (name, b) in bridges {
        o.histogram(
            "bridge_guard_listening_seconds",
            &[("bridge", name)],
            &b.listening,
        );
    }
    o.family(
        "bridge_guard_outage_seconds",
        "histogram",
        "Each completed episode of one of the bridge's ports not forwarding.",
    );
    for (name, b) in bridges {
        o.histogram(
            "bridge_guard_outage_seconds",
            &[("bridge", name)],
            &b.outages,
        );
    }
}

fn repairs(o: &mut Out, acc: &Accounting) {
    o.family(
        "bridge_guard_repairs_total",
        "counter",
        "Repairs made, by action and result (ok: the kernel acknowledged it).",
    );
    for ((bridge, action, result), n) in &acc.repairs {
        o.count(
            "bridge_guard_repairs_total",
            &[("bridge", bridge), ("action", action), ("result", result)],
            *n,
        );
    }
    for (name, help, map) in [
        (
            "bridge_guard_repairs_rate_limited_total",
            "Repairs held back because something undid them faster than the rate limit allows.",
            &acc.rate_limited,
        ),
        (
            "bridge_guard_repairs_unconfirmed_total",
            "Repairs the kernel did not answer within a second (abandoned, then resynced).",
            &acc.unconfirmed,
        ),
        (
            "bridge_guard_fights_total",
            "Fights: something undoing a repair again and again (each repaired every time, at a bounded rate).",
            &acc.fights,
        ),
    ] {
        o.family(name, "counter", help);
        for ((bridge, action), n) in map {
            o.count(name, &[("bridge", bridge), ("action", action)], *n);
        }
    }
    o.family(
        "bridge_guard_repair_latency_seconds",
        "histogram",
        "From the event that revealed a fault to the kernel's acknowledgement of its repair.",
    );
    for ((bridge, action), h) in &acc.repair_latency {
        o.histogram(
            "bridge_guard_repair_latency_seconds",
            &[("action", action), ("bridge", bridge)],
            h,
        );
    }
    o.family(
        "bridge_guard_loops_detected_total",
        "counter",
        "Loops the loop guard detected, by the evidence it acted on.",
    );
    for ((bridge, evidence), n) in &acc.loops {
        o.count(
            "bridge_guard_loops_detected_total",
            &[("bridge", bridge), ("evidence", evidence)],
            *n,
        );
    }
}

fn agent(o: &mut Out, acc: &Accounting, build: &BuildInfo) {
    o.family(
        "bridge_guard_events_total",
        "counter",
        "Kernel events received, by source.",
    );
    for (source, n) in &acc.events {
        o.count("bridge_guard_events_total", &[("source", source)], *n);
    }
    o.family(
        "bridge_guard_events_lost_total",
        "counter",
        "Kernel events lost, by source: for ebpf the records a full ring buffer dropped, for \
         netlink the socket overruns (ENOBUFS), each losing one or more notifications. Each \
         loss is followed by a resync.",
    );
    for (source, n) in &acc.lost {
        o.count("bridge_guard_events_lost_total", &[("source", source)], *n);
    }
    o.family(
        "bridge_guard_ringbuf_lost_total",
        "counter",
        "eBPF events lost because the ring buffer was full (events_lost_total{source=\"ebpf\"}).",
    );
    o.count(
        "bridge_guard_ringbuf_lost_total",
        &[],
        acc.lost.get("ebpf").copied().unwrap_or(0),
    );
    o.family(
        "bridge_guard_resyncs_total",
        "counter",
        "Rebuilds of the agent's model from a kernel dump, by reason.",
    );
    for (reason, n) in &acc.resyncs {
        o.count("bridge_guard_resyncs_total", &[("reason", reason)], *n);
    }
    o.family(
        "bridge_guard_observe_only",
        "gauge",
        "1 if the agent repairs nothing (observe-only), 0 if it repairs.",
    );
    o.flag("bridge_guard_observe_only", &[], acc.observe);
    o.family(
        "bridge_guard_hook_info",
        "gauge",
        "The hook tier chosen for each observation.",
    );
    for (hook, tier) in &acc.hooks {
        o.count(
            "bridge_guard_hook_info",
            &[("hook", hook), ("tier", tier)],
            1,
        );
    }
    o.family(
        "bridge_guard_build_info",
        "gauge",
        "Always 1: the agent's version, source revision, and whether its eBPF programs are \
         embedded.",
    );
    o.count(
        "bridge_guard_build_info",
        &[
            ("version", build.version),
            ("revision", build.revision),
            ("ebpf", if build.ebpf { "yes" } else { "no" }),
        ],
        1,
    );
}

fn process(o: &mut Out, p: &ProcessStats) {
    #[expect(clippy::cast_precision_loss, reason = "byte and fd counts as samples")]
    let f = |v: u64| v as f64;
    for (name, kind, help, value) in [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            f(p.resident_bytes),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            f(p.virtual_bytes),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_seconds,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            f(p.open_fds),
        ),
    ] {
        o.family(name, kind, help);
        o.sample(name, &[], value);
    }
    if let Some(max) = p.max_fds {
        o.family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        o.count("process_max_fds", &[], max);
    }
}

/// Renders every metric as of `now`; `process` adds the `process_*` families.
pub fn render(
    acc: &Accounting,
    now: Ktime,
    build: &BuildInfo,
    process_stats: Option<&ProcessStats>,
) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    ports(&mut o, acc, now);
    bridges(&mut o, acc, now);
    repairs(&mut o, acc);
    agent(&mut o, acc, build);
    if let Some(p) = process_stats {
        process(&mut o, p);
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{PortInfo, tests::transition};

    const BUILD: BuildInfo = BuildInfo {
        version: "1.2.3",
        revision: "abc",
        ebpf: true,
    };

    /// Every sample belongs to a family declared before it, and each family once.
    fn assert_well_formed(text: &str) {
        let mut declared: Vec<String> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or("").to_owned();
                assert!(!declared.contains(&name), "declared twice: {name}");
                declared.push(name);
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert!(
                    declared.iter().any(|d| name.starts_with(d.as_str())),
                    "undeclared: {line}"
                );
            }
        }
    }

    fn walk(acc: &mut Accounting, bridge: &str, port: &str) {
        for (from, to, at) in [
            (None, PortState::Listening, 0),
            (
                Some(PortState::Listening),
                PortState::Learning,
                2_000_000_000,
            ),
            (
                Some(PortState::Learning),
                PortState::Forwarding,
                4_000_000_000,
            ),
        ] {
            acc.on_transition(&transition(bridge, port, from, to, at));
        }
    }

    #[test]
    fn renders_parseable_text_with_escaped_labels() {
        let mut acc = Accounting::new();
        walk(&mut acc, "br\"0", "vnet0");
        acc.hooks.push(("port-state".into(), "tracepoint".into()));
        let text = render(&acc, 5_000_000_000, &BUILD, None);
        assert!(text.contains(r#"bridge_guard_port_state_seconds_total{bridge="br\"0",port="vnet0",state="listening"} 2"#), "{text}");
        assert!(
            text.contains(
                r#"bridge_guard_port_state{bridge="br\"0",port="vnet0",state="forwarding"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"bridge_guard_listening_seconds_bucket{bridge="br\"0",le="2.25"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bridge_guard_outage_seconds_bucket{bridge="br\"0",le="4.5"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bridge_guard_port_outages_total{bridge="br\"0",port="vnet0"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bridge_guard_hook_info{hook="port-state",tier="tracepoint"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"bridge_guard_build_info{version="1.2.3",revision="abc",ebpf="yes"} 1"#
            ),
            "{text}"
        );
        assert_well_formed(&text);
    }

    #[test]
    fn a_guarded_bridge_has_every_alerting_series_at_zero_before_any_event() {
        let mut acc = Accounting::new();
        acc.guard(["virbr0"]);
        let text = render(&acc, 1, &BUILD, None);
        for series in [
            r#"bridge_guard_repairs_total{bridge="virbr0",action="stp_off",result="error"} 0"#,
            r#"bridge_guard_repairs_total{bridge="virbr0",action="reattach",result="ok"} 0"#,
            r#"bridge_guard_repairs_rate_limited_total{bridge="virbr0",action="force_forwarding"} 0"#,
            r#"bridge_guard_repairs_unconfirmed_total{bridge="virbr0",action="bridge_up"} 0"#,
            r#"bridge_guard_repair_latency_seconds_count{action="stp_off",bridge="virbr0"} 0"#,
            r#"bridge_guard_outage_seconds_count{bridge="virbr0"} 0"#,
            r#"bridge_guard_loops_detected_total{bridge="virbr0",evidence="bpdu"} 0"#,
            r#"bridge_guard_bridge_refusals{bridge="virbr0"} 0"#,
            r#"bridge_guard_events_total{source="netlink"} 0"#,
            r#"bridge_guard_events_lost_total{source="ebpf"} 0"#,
            r#"bridge_guard_resyncs_total{reason="netlink_overrun"} 0"#,
            "bridge_guard_observe_only 0",
        ] {
            assert!(text.contains(series), "missing {series}:\n{text}");
        }
        assert_well_formed(&text);
    }

    #[test]
    fn a_forgotten_port_has_no_series_and_port_info_names_its_vm() {
        let mut acc = Accounting::new();
        acc.guard(["br0"]);
        walk(&mut acc, "br0", "vnet0");
        walk(&mut acc, "br0", "vnet1");
        for (port, domain) in [("vnet0", "web"), ("vnet1", "db")] {
            acc.port_info.insert(
                port.into(),
                PortInfo {
                    domain: domain.into(),
                    mac: "52:54:00:12:34:56".into(),
                },
            );
        }
        acc.forget_port("vnet0");
        let text = render(&acc, 5_000_000_000, &BUILD, None);
        assert!(!text.contains("vnet0"), "{text}");
        assert!(
            text.contains(r#"bridge_guard_port_info{bridge="br0",port="vnet1",domain="db",mac="52:54:00:12:34:56"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"bridge_guard_outage_seconds_count{bridge="br0"} 2"#),
            "the bridge keeps the forgotten port's outage: {text}"
        );
    }

    #[test]
    fn process_metrics_come_from_proc() {
        let stats = ProcessStats::read().expect("reads /proc/self");
        let text = render(&Accounting::new(), 1, &BUILD, Some(&stats));
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "no {name}: {text}");
        }
        assert_well_formed(&text);
    }

    #[test]
    fn the_shipped_rules_and_dashboard_name_only_metrics_the_agent_serves() {
        let mut acc = Accounting::new();
        acc.guard(["virbr0"]);
        walk(&mut acc, "virbr0", "vnet0");
        acc.hooks.push(("port-state".into(), "tracepoint".into()));
        let stats = ProcessStats::read().expect("reads /proc/self");
        let text = render(&acc, 5_000_000_000, &BUILD, Some(&stats));
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring");
        let mut checked = 0;
        for file in ["alerts.yml", "alerts.test.yml", "dashboard.json"] {
            let body = std::fs::read_to_string(dir.join(file)).expect("monitoring file");
            for (i, _) in body.match_indices("bridge_guard_") {
                let name: String = body[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|f| families.contains(f))
                    .unwrap_or(&name);
                assert!(
                    families.contains(&family),
                    "{file} names {name}, which the agent does not serve"
                );
                checked += 1;
            }
        }
        assert!(checked > 20, "only {checked} metric names found");
    }
}
