//! Reporting against the real kernel: time in each state, in the logs and on the metrics
//! endpoint, scraped over HTTP and parsed with a real Prometheus text-format parser.

use std::time::Duration;

use integration_tests::{
    Agent, PREFIX, VmLab, VmLabChecks as _, agent_bin,
    scrape::{find, histogram, parse, value},
    skip_unless_root,
};
use prometheus_parse::Scrape;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// Kernel timers fire on jiffies; netlink-stamped edges add delivery time. 250 ms is far
/// above both and far below the 2 s being measured.
const TOLERANCE: f64 = 0.25;

fn scrape(lab: &VmLab, agent: &Agent) -> anyhow::Result<Scrape> {
    integration_tests::scrape::scrape(&lab.host.name, agent)
}

fn near(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= TOLERANCE,
        "{what}: {actual:.3} s, expected {expected} s ± {TOLERANCE}"
    );
}

/// A veth `vnet0`/`guest0` with both ends up and carrier, not yet on the bridge: enslaving it
/// then enables the port at once, in the enslaving process (no link-watch delay).
fn ready_port(lab: &VmLab) -> anyhow::Result<()> {
    lab.host.ip("link add vnet0 type veth peer name guest0")?;
    lab.host.ip("link set vnet0 up")?;
    lab.host.ip("link set guest0 up")?;
    lab.wait_until("vnet0 with carrier", WAIT, |lab| {
        let v: Value = serde_json::from_str(&lab.host.ip("-j link show vnet0")?)?;
        Ok((!v[0]["flags"].to_string().contains("LOWER_UP")).then(|| "no carrier".to_owned()))
    })
}

fn json_log(agent: &mut Agent, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let line = agent.wait_log(what, WAIT, |l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v))
    })?;
    Ok(serde_json::from_str(&line)?)
}

#[test]
fn observe_only_accounts_listening_and_learning_in_logs_and_metrics() -> anyhow::Result<()> {
    if skip_unless_root("observe_only_accounts_listening_and_learning_in_logs_and_metrics") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "acct", 0)?;
    let textfile = std::env::temp_dir().join(format!("{}.prom", lab.host.name));
    let textfile_arg = textfile.to_string_lossy().into_owned();
    let mut agent = Agent::run(
        &lab.host,
        &[
            "--bridge",
            "br0",
            "--observe",
            "--metrics",
            "127.0.0.1:0",
            "--metrics-textfile",
            &textfile_arg,
            "--log-format",
            "json",
        ],
    )?;
    ready_port(&lab)?;
    lab.host.ip("link set vnet0 master br0")?;

    // The log: one line per transition; the last one ends the episode with its length.
    let fwd = json_log(&mut agent, "vnet0 forwarding", |v| {
        v["port"] == "vnet0" && v["to"] == "forwarding"
    })?;
    assert_eq!(fwd["from"], "learning", "{fwd}");
    assert_eq!(fwd["bridge"], "br0");
    assert_eq!(fwd["cause"], "stp_timer", "{fwd}");
    let ms = |k: &str| fwd[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    near(ms("listening_ms"), 2.0, "listening in the log");
    near(ms("in_from_ms"), 2.0, "learning in the log");
    near(ms("outage_ms"), 4.0, "outage in the log");
    let learning = agent.log.iter().find_map(|l| {
        serde_json::from_str::<Value>(l)
            .ok()
            .filter(|v| v["port"] == "vnet0" && v["to"] == "learning")
    });
    let learning = learning.expect("a learning transition was logged");
    assert_eq!(learning["from"], "listening", "{learning}");

    // The endpoint, parsed as Prometheus would.
    let s = scrape(&lab, &agent)?;
    let port = [("bridge", "br0"), ("port", "vnet0")];
    let with = |state: &'static str| [("bridge", "br0"), ("port", "vnet0"), ("state", state)];
    near(
        value(
            &s,
            "bridge_guard_port_state_seconds_total",
            &with("listening"),
        ),
        2.0,
        "listening on /metrics",
    );
    near(
        value(
            &s,
            "bridge_guard_port_state_seconds_total",
            &with("learning"),
        ),
        2.0,
        "learning on /metrics",
    );
    assert_eq!(
        value(&s, "bridge_guard_port_state", &with("forwarding")),
        1.0
    );
    assert_eq!(
        value(&s, "bridge_guard_port_state", &with("listening")),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "bridge_guard_port_transitions_total",
            &[("port", "vnet0"), ("from", "listening"), ("to", "learning")]
        ),
        1.0
    );
    let bridge = [("bridge", "br0")];
    let (count, sum) = histogram(&s, "bridge_guard_listening_seconds", &bridge);
    assert_eq!(count, 1.0);
    near(sum, 2.0, "listening histogram sum");
    let (count, sum) = histogram(&s, "bridge_guard_outage_seconds", &bridge);
    assert_eq!(count, 1.0);
    near(sum, 4.0, "outage histogram sum");
    assert_eq!(value(&s, "bridge_guard_port_outages_total", &port), 1.0);
    near(
        value(&s, "bridge_guard_port_outage_seconds_total", &port),
        4.0,
        "outage counter",
    );
    assert_eq!(
        value(&s, "bridge_guard_hook_info", &[("hook", "port-state")]),
        1.0
    );
    assert!(
        s.samples
            .iter()
            .filter(|x| x.metric == "bridge_guard_repairs_total")
            .all(|x| matches!(x.value, prometheus_parse::Value::Counter(v) if v == 0.0)),
        "observe-only repaired something"
    );
    assert_eq!(value(&s, "bridge_guard_observe_only", &[]), 1.0);
    assert_eq!(
        value(
            &s,
            "bridge_guard_bridge_stp_state",
            &[("bridge", "br0"), ("mode", "kernel")]
        ),
        1.0
    );

    // status shows the episode too (published a moment after the change).
    let status = agent.wait_status("vnet0's last episode", WAIT, |s| {
        !s["bridges"][0]["ports"][0]["last_episode"].is_null()
    })?;
    let p = &status["bridges"][0]["ports"][0];
    assert_eq!(p["name"], "vnet0", "{status:#}");
    near(
        p["last_episode"]["listening"].as_f64().unwrap_or(0.0) / 1e9,
        2.0,
        "listening in status",
    );

    // The textfile parses the same way (written when the state changed).
    let text = std::fs::read_to_string(&textfile)?;
    let parsed = parse(&text)?;
    assert!(
        find(
            &parsed,
            "bridge_guard_port_state_seconds_total",
            &with("learning")
        )
        .is_some()
    );
    let _ = std::fs::remove_file(textfile);
    Ok(())
}

#[test]
fn with_repair_a_port_barely_listens_and_each_listening_is_one_repair() -> anyhow::Result<()> {
    if skip_unless_root("with_repair_a_port_barely_listens_and_each_listening_is_one_repair") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "acctfix", 0)?;
    let mut agent = Agent::run(
        &lab.host,
        &[
            "--bridge",
            "br0",
            "--metrics",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
    )?;
    ready_port(&lab)?;
    // STP back on and the port added while the agent is stopped: left running, the agent
    // turns STP off between the two commands often enough that the port never listens. Paused,
    // it finds the port listening once and must cut that stay with exactly one repair.
    agent.pause()?;
    let paused = (|| {
        lab.host.ip("link set br0 type bridge stp_state 1")?;
        lab.host.ip("link set vnet0 master br0")?;
        lab.wait_until("vnet0 listening", WAIT, |lab| {
            let v: Value = serde_json::from_str(&lab.host.ip("-j -d link show vnet0")?)?;
            let state = &v[0]["linkinfo"]["info_slave_data"]["state"];
            Ok((state != "listening").then(|| format!("vnet0 is {state}")))
        })
    })();
    agent.resume()?;
    paused?;
    json_log(&mut agent, "vnet0 forwarding", |v| {
        v["port"] == "vnet0" && v["to"] == "forwarding"
    })?;
    lab.wait_until("STP off", WAIT, |lab| {
        Ok((lab.stp_state()? != 0).then(|| "STP on".into()))
    })?;

    let s = scrape(&lab, &agent)?;
    let count = |name: &str, labels: &[(&str, &str)]| {
        find(&s, name, labels).map_or(0.0, |_| value(&s, name, labels))
    };
    let listened = count(
        "bridge_guard_port_transitions_total",
        &[("port", "vnet0"), ("to", "listening")],
    );
    let forced = count(
        "bridge_guard_repairs_total",
        &[("action", "force_forwarding"), ("result", "ok")],
    );
    assert_eq!(listened, 1.0, "vnet0 entered listening {listened} times");
    assert_eq!(forced, 1.0, "one listening stay, {forced} forced repairs");
    // Cut short by the repair: straight from listening to forwarding, never reaching learning
    // (the STP timer's next step, a forward delay of 2 s later).
    let cut = count(
        "bridge_guard_port_transitions_total",
        &[
            ("port", "vnet0"),
            ("from", "listening"),
            ("to", "forwarding"),
        ],
    );
    let learned = count(
        "bridge_guard_port_transitions_total",
        &[("port", "vnet0"), ("to", "learning")],
    );
    assert_eq!(
        (cut, learned),
        (1.0, 0.0),
        "listening -> forwarding, no learning"
    );
    let listening = value(
        &s,
        "bridge_guard_port_state_seconds_total",
        &[("port", "vnet0"), ("state", "listening")],
    );
    // The stay includes the pause above and the agent's reaction: milliseconds here, and up to
    // 1.6 s has been seen under emulation (the VM matrix, two guests on a busy machine), so the
    // bound is the 2 s forward delay an unguarded port listens. How fast is the benchmark's
    // business; this asserts "cut short" (and no learning above says the timer never fired).
    assert!(listening < 2.0, "{listening} s in listening: not cut short");
    assert!(
        value(
            &s,
            "bridge_guard_repairs_total",
            &[("action", "stp_off"), ("result", "ok")]
        ) >= 1.0
    );
    let (count, _) = histogram(
        &s,
        "bridge_guard_repair_latency_seconds",
        &[("action", "stp_off")],
    );
    assert!(count >= 1.0);
    eprintln!(
        "listened {listened} time(s), forced {forced} time(s), {listening:.6} s in listening"
    );
    Ok(())
}

#[test]
fn a_bad_metrics_address_fails_at_start_with_a_clear_error() -> anyhow::Result<()> {
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--bridge", "br0", "--metrics", "nonsense"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not PORT or ADDRESS:PORT"), "{err}");

    if skip_unless_root("a_bad_metrics_address_fails_at_start_with_a_clear_error (bind part)") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "badmetrics", 0)?;
    let out = lab
        .host
        .command(agent_bin())
        .args(["run", "--bridge", "br0", "--metrics", "198.18.77.77:9558"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen for metrics on 198.18.77.77:9558"),
        "{err}"
    );
    assert!(err.contains("address"), "{err}");
    assert!(
        !err.contains("ready:"),
        "it must fail before starting: {err}"
    );
    Ok(())
}
