//! Exposition: the accounting as Prometheus text format (version 0.0.4), served on `/metrics`
//! and optionally written to a node_exporter textfile. Rendered at scrape time, so open
//! intervals (time in the current state) are counted up to the moment of the scrape.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{
    accounting::{Accounting, Histogram, seconds},
    event::PortState,
    model::Ktime,
    sys::clock::monotonic_ns,
};

const STATES: [PortState; 6] = [
    PortState::Disabled,
    PortState::Listening,
    PortState::Learning,
    PortState::Forwarding,
    PortState::Blocking,
    PortState::Detached,
];

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {addr}: {source}; give an address of this host, e.g. \
     --metrics 127.0.0.1:9558"
)]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
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

#[expect(clippy::cast_precision_loss, reason = "counts as f64 samples")]
fn f(v: u64) -> f64 {
    v as f64
}

/// Renders every metric as of `now`.
pub fn render(acc: &Accounting, now: Ktime) -> String {
    let mut o = Out(String::new());
    let ports = &acc.ports;

    o.family(
        "bridge_guard_port_state",
        "gauge",
        "1 for the state the port is in, 0 for the others.",
    );
    for (port, p) in ports {
        for s in STATES {
            let v = if p.state == s { 1.0 } else { 0.0 };
            o.sample(
                "bridge_guard_port_state",
                &[("bridge", &p.bridge), ("port", port), ("state", s.as_str())],
                v,
            );
        }
    }
    o.family(
        "bridge_guard_port_state_seconds_total",
        "counter",
        "Seconds the port spent in each state.",
    );
    for (port, p) in ports {
        for s in STATES {
            let v = seconds(p.ns_in(s, now));
            o.sample(
                "bridge_guard_port_state_seconds_total",
                &[("bridge", &p.bridge), ("port", port), ("state", s.as_str())],
                v,
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
            o.sample(
                "bridge_guard_port_transitions_total",
                &[
                    ("bridge", &p.bridge),
                    ("port", port),
                    ("from", from.as_str()),
                    ("to", to.as_str()),
                ],
                f(*n),
            );
        }
    }
    o.family(
        "bridge_guard_port_listening_seconds",
        "histogram",
        "Each completed stay in the listening state.",
    );
    for (port, p) in ports {
        o.histogram(
            "bridge_guard_port_listening_seconds",
            &[("bridge", &p.bridge), ("port", port)],
            &p.listening,
        );
    }
    o.family(
        "bridge_guard_port_outage_seconds",
        "histogram",
        "Each completed episode of not forwarding.",
    );
    for (port, p) in ports {
        o.histogram(
            "bridge_guard_port_outage_seconds",
            &[("bridge", &p.bridge), ("port", port)],
            &p.outages,
        );
    }
    o.family("bridge_guard_port_clock_kernel", "gauge", "1 if the current state was stamped by the kernel's clock (eBPF), 0 if by netlink receive time.");
    for (port, p) in ports {
        let v = if p.clock == crate::model::Clock::Kernel {
            1.0
        } else {
            0.0
        };
        o.sample(
            "bridge_guard_port_clock_kernel",
            &[("bridge", &p.bridge), ("port", port)],
            v,
        );
    }

    o.family(
        "bridge_guard_bridge_carrier",
        "gauge",
        "1 if the bridge has carrier (a port forwards).",
    );
    for (name, b) in &acc.bridges {
        o.sample(
            "bridge_guard_bridge_carrier",
            &[("bridge", name)],
            if b.carrier { 1.0 } else { 0.0 },
        );
    }
    o.family(
        "bridge_guard_bridge_no_carrier_seconds_total",
        "counter",
        "Seconds the bridge spent without carrier.",
    );
    for (name, b) in &acc.bridges {
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
    for (name, b) in &acc.bridges {
        for mode in ["off", "kernel", "user"] {
            let v = if b.stp.is_some_and(|s| s.as_str() == mode) {
                1.0
            } else {
                0.0
            };
            o.sample(
                "bridge_guard_bridge_stp_state",
                &[("bridge", name), ("mode", mode)],
                v,
            );
        }
    }

    o.family(
        "bridge_guard_repairs_total",
        "counter",
        "Repairs made, by action and result.",
    );
    for ((bridge, action, result), n) in &acc.repairs {
        o.sample(
            "bridge_guard_repairs_total",
            &[("bridge", bridge), ("action", action), ("result", result)],
            f(*n),
        );
    }
    o.family(
        "bridge_guard_repair_latency_seconds",
        "histogram",
        "From the event that revealed a fault to the kernel's acknowledgement of its repair.",
    );
    for (action, h) in &acc.repair_latency {
        o.histogram(
            "bridge_guard_repair_latency_seconds",
            &[("action", action)],
            h,
        );
    }
    o.family(
        "bridge_guard_events_total",
        "counter",
        "Kernel events received, by source.",
    );
    for (source, n) in &acc.events {
        o.sample("bridge_guard_events_total", &[("source", source)], f(*n));
    }
    o.family(
        "bridge_guard_ringbuf_lost_total",
        "counter",
        "eBPF events lost because the ring buffer was full.",
    );
    o.sample("bridge_guard_ringbuf_lost_total", &[], f(acc.ringbuf_lost));
    for (name, help, counts) in [
        (
            "bridge_guard_repairs_rate_limited_total",
            "Repairs that waited for a rate-limit slot (something undoes them faster than the limit).",
            &acc.rate_limited,
        ),
        (
            "bridge_guard_fights_total",
            "Fights: something undoing a repair again and again, by action.",
            &acc.fights,
        ),
        (
            "bridge_guard_repairs_unanswered_total",
            "Repairs abandoned because the kernel did not answer in time.",
            &acc.unanswered,
        ),
    ] {
        o.family(name, "counter", help);
        for ((bridge, action), n) in counts {
            o.sample(name, &[("bridge", bridge), ("action", action)], f(*n));
        }
    }
    o.family(
        "bridge_guard_resyncs_total",
        "counter",
        "Rebuilds of the model from a kernel dump, by reason.",
    );
    for (reason, n) in &acc.resyncs {
        o.sample("bridge_guard_resyncs_total", &[("reason", reason)], f(*n));
    }
    o.family(
        "bridge_guard_hook_info",
        "gauge",
        "The hook tier chosen for each observation.",
    );
    for (hook, tier) in &acc.hooks {
        o.sample(
            "bridge_guard_hook_info",
            &[("hook", hook), ("tier", tier)],
            1.0,
        );
    }
    o.0
}

/// Parses `--metrics`: `PORT` (on 127.0.0.1) or `ADDR:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!("'{s}' is not PORT or ADDRESS:PORT (e.g. 9558, 127.0.0.1:9558, [::1]:9558)")
    })
}

/// Binds the metrics listener; errors here are start-up errors.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })
}

/// Serves `GET /metrics` (and `/`) until the runtime stops.
pub async fn serve(listener: TcpListener, acc: Arc<Mutex<Accounting>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let acc = Arc::clone(&acc);
        tokio::spawn(async move {
            // Read up to the end of the headers: clients may send the request in pieces.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let request = String::from_utf8_lossy(&buf);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) =
                if request.starts_with("GET ") && (path == "/metrics" || path == "/") {
                    let text = acc
                        .lock()
                        .map(|a| render(&a, monotonic_ns()))
                        .unwrap_or_default();
                    ("200 OK", text)
                } else {
                    ("404 Not Found", "try /metrics\n".to_owned())
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Writes the metrics for node_exporter's textfile collector (atomically: it may read anytime).
pub fn write_textfile(path: &Path, acc: &Accounting) -> std::io::Result<()> {
    crate::cli::write_atomically(path, &render(acc, monotonic_ns()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::tests::transition;

    #[test]
    fn renders_parseable_text_with_escaped_labels() {
        let mut acc = Accounting::default();
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
            acc.on_transition(&transition("br\"0", "vnet0", from, to, at));
        }
        acc.hooks.push(("port-state".into(), "tracepoint".into()));
        let text = render(&acc, 5_000_000_000);
        assert!(text.contains(r#"bridge_guard_port_state_seconds_total{bridge="br\"0",port="vnet0",state="listening"} 2"#), "{text}");
        assert!(
            text.contains(
                r#"bridge_guard_port_state{bridge="br\"0",port="vnet0",state="forwarding"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"bridge_guard_port_listening_seconds_bucket{bridge="br\"0",port="vnet0",le="+Inf"} 1"#), "{text}");
        assert!(
            text.contains(r#"bridge_guard_hook_info{hook="port-state",tier="tracepoint"} 1"#),
            "{text}"
        );
        // Every sample line belongs to a family declared before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or("").to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                assert!(
                    declared.iter().any(|d| name.starts_with(d.as_str())),
                    "undeclared: {line}"
                );
            }
        }
    }

    #[test]
    fn metrics_addresses() {
        assert_eq!(
            parse_addr("9558"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9558)))
        );
        assert_eq!(
            parse_addr("0.0.0.0:1"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 1)))
        );
        assert!(
            parse_addr("localhost:x")
                .expect_err("bad")
                .contains("not PORT or ADDRESS:PORT")
        );
    }
}
