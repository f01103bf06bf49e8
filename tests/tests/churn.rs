//! Churn against the real agent: faults back to back with no pause, a flat-out fighter, and
//! thousands of taps made and deleted. Every fault must be repaired every time (a bounded rate,
//! never a give-up), a fight must cost bounded CPU and log lines, and memory must come back.
//!
//! Each fault waits, bounded and on link notifications (never on a timer), for the lab to be
//! healthy again, and the next fault follows at once.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use integration_tests::{Agent, PREFIX, TALK, VmLab, VmLabChecks as _, skip_unless_root};
use prometheus_parse::{Scrape, Value};

/// Bound for one repair to show: they take about a millisecond, or one rate-limit slot
/// (40 ms) under back-to-back faults.
const HEAL: Duration = Duration::from_secs(10);
/// Faults per class, back to back: `$BRIDGE_GUARD_CHURN_ROUNDS`, default 50 (the VM matrix's
/// emulated guests ask for fewer).
fn rounds() -> u64 {
    std::env::var("BRIDGE_GUARD_CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

fn guarded(tag: &str) -> anyhow::Result<(VmLab, Agent)> {
    let lab = VmLab::new(PREFIX, tag, 3)?;
    let agent = Agent::run(&lab.host, &["--bridge", "br0", "--metrics", "127.0.0.1:0"])?;
    healthy(&lab)?;
    Ok((lab, agent))
}

/// Waits until the bridge is up with carrier, every port enslaved and forwarding, and STP off.
fn healthy(lab: &VmLab) -> anyhow::Result<()> {
    lab.wait_until("healthy with STP off", HEAL, |lab| {
        Ok(match lab.unhealthy()? {
            Some(why) => Some(why),
            None => (lab.stp_state()? != 0).then(|| "STP is on".to_owned()),
        })
    })
}

fn scrape(lab: &VmLab, agent: &Agent) -> anyhow::Result<Scrape> {
    integration_tests::scrape::scrape(&lab.host.name, agent)
}

/// Successful repairs of `action` on br0, from `/metrics`.
fn repairs(lab: &VmLab, agent: &Agent, action: &str) -> anyhow::Result<u64> {
    let s = scrape(lab, agent)?;
    let n = s
        .samples
        .iter()
        .filter(|x| {
            x.metric == "bridge_guard_repairs_total"
                && x.labels.get("action") == Some(action)
                && x.labels.get("result") == Some("ok")
        })
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum::<f64>();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter of repairs"
    )]
    Ok(n as u64)
}

/// Injects `fault` [`rounds`] times back to back, each time waiting for the repair, and checks
/// that the agent made exactly one `action` repair per fault.
fn back_to_back(
    tag: &str,
    action: &str,
    fault: impl Fn(&VmLab) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (lab, agent) = guarded(tag)?;
    let before = repairs(&lab, &agent, action)?;
    let started = Instant::now();
    let rounds = rounds();
    for round in 0..rounds {
        fault(&lab)?;
        healthy(&lab).with_context(|| format!("{tag}: fault {round} was not repaired"))?;
    }
    let after = repairs(&lab, &agent, action)?;
    eprintln!(
        "{tag}: {rounds} faults back to back in {:.2} s, {} {action} repairs",
        started.elapsed().as_secs_f64(),
        after - before
    );
    // One repair per fault: none missed, none made twice.
    ensure!(
        after - before == rounds,
        "{tag}: {rounds} faults but {} {action} repairs; log:\n{}",
        after - before,
        agent.log_text()
    );
    lab.guests_talk(0, 2, TALK)?;
    Ok(())
}

/// A fault made of `ip` commands in the lab's host namespace.
fn host(cmds: &'static [&'static str]) -> impl Fn(&VmLab) -> anyhow::Result<()> {
    move |lab| {
        for cmd in cmds {
            lab.host.ip(cmd)?;
        }
        Ok(())
    }
}

#[test]
fn detached_taps_back_to_back_are_reattached_every_time() -> anyhow::Result<()> {
    if skip_unless_root("detached_taps_back_to_back_are_reattached_every_time") {
        return Ok(());
    }
    back_to_back("b2bdetach", "reattach", host(&["link set vnet1 nomaster"]))
}

#[test]
fn a_bridge_set_down_back_to_back_is_raised_every_time() -> anyhow::Result<()> {
    if skip_unless_root("a_bridge_set_down_back_to_back_is_raised_every_time") {
        return Ok(());
    }
    back_to_back("b2bdown", "bridge_up", host(&["link set br0 down"]))
}

#[test]
fn stp_reenabled_and_a_port_flapped_back_to_back_is_turned_off_every_time() -> anyhow::Result<()> {
    if skip_unless_root("stp_reenabled_and_a_port_flapped_back_to_back_is_turned_off_every_time") {
        return Ok(());
    }
    back_to_back(
        "b2bstp",
        "stp_off",
        host(&[
            "link set br0 type bridge stp_state 1",
            "link set vnet0 down",
            "link set vnet0 up",
        ]),
    )
}

#[test]
fn stp_reenabled_and_a_guest_end_flapped_back_to_back_is_repaired_every_time() -> anyhow::Result<()>
{
    if skip_unless_root("stp_reenabled_and_a_guest_end_flapped_back_to_back_is_repaired_every_time")
    {
        return Ok(());
    }
    back_to_back("b2bguest", "stp_off", |lab| {
        lab.host.ip("link set br0 type bridge stp_state 1")?;
        lab.vms[1].ip("link set eth0 down")?;
        lab.vms[1].ip("link set eth0 up")?;
        Ok(())
    })
}

#[test]
fn a_flat_out_fighter_costs_bounded_cpu_and_logs_and_loses_when_it_stops() -> anyhow::Result<()> {
    if skip_unless_root("a_flat_out_fighter_costs_bounded_cpu_and_logs_and_loses_when_it_stops") {
        return Ok(());
    }
    let (lab, mut agent) = guarded("fighter")?;
    let lines_before = agent.drain_log().len();
    let cpu_before = agent.cpu_time()?;
    // As fast as the kernel takes it, for a few seconds: batches of STP re-enables.
    let script = format!(
        "end=$(($(date +%s) + 3)); n=0; while [ $(date +%s) -lt $end ]; do \
         for i in $(seq 1000); do echo link set br0 type bridge stp_state 1; done \
         | ip -n {} -batch - || exit 1; n=$((n+1000)); done; echo $n",
        lab.host.name
    );
    let started = Instant::now();
    let fighter = Command::new("sh").args(["-c", &script]).output()?;
    ensure!(
        fighter.status.success(),
        "the fighter failed: {}",
        String::from_utf8_lossy(&fighter.stderr)
    );
    let fight = started.elapsed();
    let fights = String::from_utf8_lossy(&fighter.stdout).trim().to_owned();
    // The fight is over: the next repair goes out at once and the bridge is healthy.
    healthy(&lab)?;
    let cpu = agent.cpu_time()? - cpu_before;
    agent.drain_log();
    let lines = agent.log.len() - lines_before;
    eprintln!(
        "fighter: {fights} re-enables in {:.2} s; agent CPU {:.0} ms, {lines} log lines",
        fight.as_secs_f64(),
        cpu.as_secs_f64() * 1e3
    );
    // Generous bounds (this is not a benchmark): the agent must not spin with its fighter.
    ensure!(
        cpu < fight.max(Duration::from_millis(200)),
        "agent CPU {cpu:?} during a {fight:?} fight"
    );
    ensure!(
        lines <= 20,
        "{lines} log lines during the fight:\n{}",
        agent.log[lines_before..].join("\n")
    );
    let text = agent.log_text();
    ensure!(
        text.contains("fight: something keeps undoing turning STP off on br0"),
        "the fight was not reported:\n{text}"
    );
    let repaired = repairs(&lab, &agent, "stp_off")?;
    ensure!(repaired >= 2, "{repaired} STP-off repairs during the fight");
    lab.guests_talk(0, 2, TALK)?;
    Ok(())
}

/// A fighter re-enabling STP flat out in the background until dropped (then stopped and
/// waited for).
struct Fighter {
    child: std::process::Child,
    stop: std::path::PathBuf,
}

impl Fighter {
    fn start(lab: &VmLab) -> anyhow::Result<Self> {
        let stop = std::env::temp_dir().join(format!("{PREFIX}-fighter-{}", std::process::id()));
        let _ = std::fs::remove_file(&stop);
        let script = format!(
            "while [ ! -e {stop} ]; do \
             for i in $(seq 1000); do echo link set br0 type bridge stp_state 1; done \
             | ip -n {ns} -batch - || exit 1; done",
            stop = stop.display(),
            ns = lab.host.name
        );
        // Bounded even if the test dies without dropping it.
        let child = Command::new("timeout")
            .args(["60", "sh", "-c", &script])
            .stdout(Stdio::null())
            .spawn()
            .context("starting the fighter")?;
        Ok(Self { child, stop })
    }

    fn running(&mut self) -> anyhow::Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }
}

impl Drop for Fighter {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stop);
    }
}

/// While a fighter floods the bridge's notifications with copies, the agent has the kernel
/// drop them and polls the bridge instead: a change that no notification tells (the bridge set
/// down in the middle of the flood) must still be seen and repaired.
#[test]
fn a_bridge_set_down_while_its_notifications_flood_is_raised() -> anyhow::Result<()> {
    if skip_unless_root("a_bridge_set_down_while_its_notifications_flood_is_raised") {
        return Ok(());
    }
    let (lab, mut agent) = guarded("muffled")?;
    let mut fighter = Fighter::start(&lab)?;
    agent.wait_log(
        "the flood's notifications dropped in the kernel",
        HEAL,
        |l| l.contains("flood with copies") && l.contains("dropped in the kernel"),
    )?;
    lab.host.ip("link set br0 down")?;
    lab.wait_until("br0 up again during the flood", HEAL, |lab| {
        let flags = lab.host.ip("-j link show br0")?;
        Ok((!flags.contains("\"UP\"")).then(|| format!("br0 is down: {flags}")))
    })?;
    ensure!(
        fighter.running()?,
        "the fighter ended before br0 was up again: the repair was not made during the flood"
    );
    drop(fighter);
    healthy(&lab)?;
    let raised = repairs(&lab, &agent, "bridge_up")?;
    ensure!(
        raised >= 1,
        "no bridge_up repair counted; log:\n{}",
        agent.log_text()
    );
    // Seen by a poll while the link was muffled, not when the filter let its notifications
    // through again (`release`, a second or more later).
    let line = agent.wait_logged("the bridge_up repair's line", HEAL, |l| {
        l.contains("repaired: set br0 up")
    })?;
    ensure!(
        line.contains(r#"trigger="poll""#) || line.contains(r#""trigger":"poll""#),
        "br0 was not raised on a poll while muffled: {line}\nlog:\n{}",
        agent.log_text()
    );
    lab.guests_talk(0, 2, TALK)?;
    Ok(())
}

/// How many taps [`thousands_of_taps_made_and_deleted_leave_nothing_behind`] churns:
/// `$BRIDGE_GUARD_CHURN_TAPS`, default 10,000 (slow emulated guests may ask for fewer).
fn churn_taps() -> u32 {
    std::env::var("BRIDGE_GUARD_CHURN_TAPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The per-port series of a scrape (every metric name with its labels, values aside): those
/// must go with their ports. (Bridge-wide counters may gain a label set, e.g. the first
/// resync for a new reason; they do not grow with ports.)
fn series(s: &Scrape) -> BTreeSet<String> {
    s.samples
        .iter()
        .filter(|x| x.labels.get("port").is_some())
        .map(|x| {
            let mut labels: Vec<String> =
                x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            format!("{}{{{}}}", x.metric, labels.join(","))
        })
        .collect()
}

/// The agent's tables that must come back to their size exactly: the model and accounting
/// (the others, rate limits and log windows, empty out over time on their own).
fn tables(status: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    status["tables"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("model.") || k.starts_with("accounting."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Makes `taps` taps, enslaves each to br0 and deletes them all, in one `ip -batch`.
fn tap_cycle(lab: &VmLab, taps: u32) -> anyhow::Result<()> {
    let mut batch = String::new();
    for i in 0..taps {
        // Each tap is a real member for a moment: enslaved (so the agent learns and tracks
        // it), then deleted. Deleted a few hundred at a time (a device group), as one kernel
        // unregistration: one at a time, each waits for its own RCU grace periods (~18 ms).
        batch.push_str(&format!(
            "tuntap add dev ctap{i} mode tap\nlink set ctap{i} group 7 master br0\n"
        ));
        if i % 500 == 499 || i + 1 == taps {
            batch.push_str("link del group 7\n");
        }
    }
    let started = Instant::now();
    let mut ip = Command::new("ip")
        .args(["-n", &lab.host.name, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(ip.stdin.as_mut().context("no stdin")?, batch.as_bytes())?;
    let out = ip.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ip -batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{taps} taps made, enslaved and deleted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn thousands_of_taps_made_and_deleted_leave_nothing_behind() -> anyhow::Result<()> {
    if skip_unless_root("thousands_of_taps_made_and_deleted_leave_nothing_behind") {
        return Ok(());
    }
    let (lab, agent) = guarded("taps")?;
    // The baseline is the agent's settled picture, not the kernel's: its state is published
    // up to 50 ms after a change, and the start's eBPF stamps wait for netlink to confirm
    // them, so a status read the moment the kernel looks healthy can show the start's
    // repairs half done.
    let vms = lab.vms.len();
    let settled = agent.wait_status("every VM port forwarding, nothing pending", HEAL, |s| {
        let forwarding = s["bridges"][0]["ports"]
            .as_array()
            .is_some_and(|p| p.len() == vms && p.iter().all(|p| p["state"] == "forwarding"));
        forwarding && s["tables"]["model.stamps"] == 0 && s["tables"]["model.memberships"] == 0
    })?;
    let tables_before = tables(&settled);
    let series_before = series(&scrape(&lab, &agent)?);
    ensure!(
        series_before.iter().any(|s| s.contains("port=vnet0")),
        "no per-port series for vnet0 before the churn: {series_before:?}"
    );
    let taps = churn_taps();
    // Twice: the first round may raise the allocator's high-water mark (and does more when
    // other tests load the machine); what a leak adds, the second round adds again.
    let mut rss = vec![agent.rss_kib()?];
    for round in 1..=2 {
        tap_cycle(&lab, taps)?;
        // The agent catches up: every table back where it started.
        let status = agent
            .wait_status("every table back to its size before", HEAL * 6, |s| {
                tables(s) == tables_before
            })
            .with_context(|| {
                let log = agent.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!(
                    "round {round}: tables before {tables_before:?}; the agent's last log \
                     lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })?;
        let series_after = series(&scrape(&lab, &agent)?);
        ensure!(
            series_after == series_before,
            "round {round}: /metrics series changed:\nnew: {:?}\ngone: {:?}",
            series_after.difference(&series_before).collect::<Vec<_>>(),
            series_before.difference(&series_after).collect::<Vec<_>>()
        );
        rss.push(agent.rss_kib()?);
        eprintln!(
            "round {round}: tables {}; RSS {rss:?} KiB",
            status["tables"]
        );
    }
    // Generous: allocator slack, not growth per tap (10,000 taps would be megabytes).
    ensure!(
        rss[2] < rss[1] + 3 * 1024 && rss[2] < rss[0] + 12 * 1024,
        "RSS grew round after round: {rss:?} KiB (before, after round 1, after round 2)"
    );
    healthy(&lab)?;
    Ok(())
}

#[test]
fn a_flood_of_flaps_leaves_the_watchdog_publishing_and_metrics_their_turn() -> anyhow::Result<()> {
    if skip_unless_root("a_flood_of_flaps_leaves_the_watchdog_publishing_and_metrics_their_turn") {
        return Ok(());
    }
    use std::os::unix::net::UnixDatagram;
    let lab = VmLab::new(PREFIX, "flood", 3)?;
    // systemd's side of the notification protocol: a datagram socket the agent pings.
    let sock_path = std::env::temp_dir().join(format!("{}-notify", lab.host.name));
    let _ = std::fs::remove_file(&sock_path);
    let notify = UnixDatagram::bind(&sock_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(100)))?;
    let sock = sock_path.to_string_lossy().into_owned();
    let agent = Agent::run_with(
        &lab.host,
        &[],
        &["--bridge", "br0", "--metrics", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", &sock), ("WATCHDOG_USEC", "200000")],
    );
    // Removed on the way out, whatever happens.
    struct Unlink(std::path::PathBuf);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unlink = Unlink(sock_path);
    let mut agent = agent?;
    healthy(&lab)?;
    // A port flapping as fast as the kernel takes it, for a few seconds: 20,000 times, or
    // `$BRIDGE_GUARD_CHURN_FLAPS` (the VM matrix's emulated guests ask for fewer).
    let flaps: u32 = std::env::var("BRIDGE_GUARD_CHURN_FLAPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut batch = String::new();
    for _ in 0..flaps {
        batch.push_str("link set vnet0 down\nlink set vnet0 up\n");
    }
    let mut ip = Command::new("ip")
        .args(["-n", &lab.host.name, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = ip.stdin.take().context("no stdin")?;
    let feeder =
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, batch.as_bytes()));
    let started = Instant::now();
    let first = agent.status()?["updated_unix_ns"].as_u64().unwrap_or(0);
    // systemd's side, counting pings while the flood runs.
    let pinged = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counter = {
        let (pinged, done) = (pinged.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf)
                    && buf[..n].windows(10).any(|w| w == b"WATCHDOG=1")
                {
                    pinged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let (mut scrapes, mut published) = (0u32, false);
    while ip.try_wait()?.is_none() {
        if scrape(&lab, &agent).is_ok() {
            scrapes += 1;
        }
        published |= agent.status()?["updated_unix_ns"].as_u64().unwrap_or(0) > first;
    }
    let flood = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    counter
        .join()
        .map_err(|_| anyhow::anyhow!("ping counter panicked"))?;
    let pings = pinged.load(std::sync::atomic::Ordering::Relaxed);
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("feeder panicked"))??;
    let out = ip.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ip -batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "flood of {} flaps over {:.2} s: {pings} watchdog pings, {scrapes} scrapes, published {published}",
        2 * flaps,
        flood.as_secs_f64()
    );
    // The watchdog is pinged every 100 ms: at least every other one must have gone out.
    let expected = u32::try_from(flood.as_millis() / 200).unwrap_or(u32::MAX);
    ensure!(
        pings >= expected.saturating_sub(1),
        "{pings} watchdog pings during a {flood:?} flood"
    );
    ensure!(scrapes > 0, "no scrape succeeded during the flood");
    ensure!(
        published,
        "the state file was not refreshed during the flood"
    );
    healthy(&lab)?;
    // The flapping port's lines were coalesced, not logged one by one.
    agent.drain_log();
    let lines = agent
        .log
        .iter()
        .filter(|l| l.contains("port=vnet0"))
        .count();
    ensure!(
        lines < 200,
        "{lines} log lines about vnet0 for {} flaps",
        2 * flaps
    );
    Ok(())
}
