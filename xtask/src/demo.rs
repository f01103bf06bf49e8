//! `cargo xtask demo`: what bridge-guard is for, shown in half a minute on a machine without
//! VMs. A lab bridge with kernel STP on and two VM namespaces goes through the same faults
//! twice: with no guard (ports stuck in listening, the bridge NO-CARRIER or down, a tap left
//! detached) and with bridge-guard (each repaired in about a millisecond, the guests talking).
//! Outages are measured from link notifications, as in `cargo xtask bench`.

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench::{
        contenders::spawn_agent,
        faults::{self, BenchLab},
        monitor::Sample,
        observer::{Observer, Outcome},
        rtnl::{PortState, monotonic_ns},
        stats::human_ns,
    },
    lab::TempDir,
};

/// How long the demo lets a fault last with no guard before calling it not healed.
const CAP: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    VpnFlap,
    BridgeDown,
    Detach,
}

impl Scenario {
    const ALL: [Self; 3] = [Self::VpnFlap, Self::BridgeDown, Self::Detach];

    fn title(self) -> &'static str {
        match self {
            Self::VpnFlap => "A VPN connects: STP is switched back on and both VM links flap",
            Self::BridgeDown => "The bridge is left down (a network manager re-applied its config)",
            Self::Detach => "A VM's tap is detached from the bridge",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::VpnFlap => "STP on + VM links flap",
            Self::BridgeDown => "bridge left down",
            Self::Detach => "tap detached",
        }
    }

    fn inject(self, lab: &mut BenchLab, obs: &mut Observer) -> Result<u64> {
        let _rt = crate::bench::sched::Realtime::new();
        let t0 = monotonic_ns();
        match self {
            Self::VpnFlap => {
                lab.host.set_stp("br0", true)?;
                for g in &mut lab.guests {
                    g.set_up("eth0", false)?;
                }
                faults::wait_ports_down(obs, &lab.lab.ports())?;
                for g in &mut lab.guests {
                    g.set_up("eth0", true)?;
                }
            }
            Self::BridgeDown => lab.host.set_up("br0", false)?,
            Self::Detach => lab.host.set_master("vnet1", None)?,
        }
        Ok(t0)
    }

    /// Whether `s` shows the fault at its worst, worth printing as evidence.
    fn shows(self, s: &Sample) -> bool {
        let v = &s.view;
        match self {
            Self::VpnFlap => v
                .ports
                .iter()
                .all(|p| p.state == Some(PortState::Listening)),
            Self::BridgeDown => v.bridge.as_ref().is_some_and(|b| !b.up),
            Self::Detach => v.ports.iter().any(|p| p.exists && !p.attached),
        }
    }
}

/// The lines of `ip`/`bridge` output that show the fault.
fn evidence(ns: &str, scenario: Scenario) -> Vec<String> {
    let run = |args: &[&str]| -> String {
        Command::new(args.first().copied().unwrap_or("ip"))
            .args(args.get(1..).unwrap_or_default())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let link = run(&["ip", "-n", ns, "-d", "link", "show", "br0"]);
    if let Some(first) = link.lines().next() {
        let stp = link
            .split_whitespace()
            .skip_while(|w| *w != "stp_state")
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        out.push(format!(
            "$ ip -d link show br0   {}{}",
            first.split(" qlen").next().unwrap_or(first).trim(),
            if stp.is_empty() {
                String::new()
            } else {
                format!(" … {stp}")
            }
        ));
    }
    let ports = run(&["bridge", "-n", ns, "link", "show"]);
    for l in ports.lines() {
        out.push(format!(
            "$ bridge link           {}",
            l.split(" priority").next().unwrap_or(l).trim()
        ));
    }
    if scenario == Scenario::Detach {
        let v1 = run(&["ip", "-n", ns, "link", "show", "vnet1"]);
        if let Some(first) = v1.lines().next() {
            out.push(format!(
                "$ ip link show vnet1    {}",
                first.split(" qlen").next().unwrap_or(first).trim()
            ));
        }
    }
    out
}

fn say(s: &str) {
    println!("{s}");
}

/// One fault, measured; returns the outage (None: not healed) and prints what happened.
fn play(
    scenario: Scenario,
    lab: &mut BenchLab,
    obs: &mut Observer,
    guarded: bool,
) -> Result<Option<u64>> {
    say(&format!("\n── {}", scenario.title()));
    if !guarded {
        faults::restore(lab, true)?;
    }
    obs.settle(QUIET, Duration::from_secs(20))?;
    obs.drain_guard_lines();
    let ns = lab.lab.host.name.clone();
    let t0 = scenario.inject(lab, obs)?;
    let mut shown = false;
    let vms_ns: Vec<String> = lab.lab.vms.iter().map(|v| v.name.clone()).collect();
    let m = obs.measure_with(
        t0,
        if guarded {
            Duration::from_secs(10)
        } else {
            CAP
        },
        QUIET,
        &mut |s| {
            if guarded || shown || !scenario.shows(s) {
                return;
            }
            shown = true;
            say(&format!(
                "   at +{} ({}):",
                human_ns(s.t_ns.saturating_sub(t0)),
                s.problem.as_deref().unwrap_or("healthy")
            ));
            for l in evidence(&ns, scenario) {
                say(&format!("      {l}"));
            }
            if scenario == Scenario::VpnFlap {
                let talk = talk_once(&vms_ns);
                say(&format!("      {talk}"));
            }
        },
    )?;
    let outage = match &m.outcome {
        Outcome::Healed { outage_ns } => Some(*outage_ns),
        _ => None,
    };
    if guarded {
        let repairs: Vec<String> = m
            .guard_lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                let msg = v["message"].as_str()?.strip_prefix("repaired: ")?;
                let what = msg.split(": ").next().unwrap_or(msg).to_owned();
                Some(match v["latency_us"].as_u64() {
                    Some(us) => format!("{what} (confirmed {us} µs after it was sent)"),
                    None => what,
                })
            })
            .collect();
        for r in &repairs {
            say(&format!("   bridge-guard: {r}"));
        }
    }
    match &m.outcome {
        Outcome::Healed { outage_ns } => say(&format!(
            "   healthy again {} after the fault{}",
            human_ns(*outage_ns),
            if guarded {
                ""
            } else {
                " (the kernel's STP timers: listening 2 s, then learning 2 s)"
            }
        )),
        Outcome::NotHealed { why } => {
            say(&format!("   NOT healed after {} s: {why}", CAP.as_secs()));
            for l in evidence(&ns, scenario) {
                say(&format!("      {l}"));
            }
        }
        Outcome::NotObserved => say("   (the fault never showed in a link notification)"),
    }
    if guarded && outage.is_some() {
        match lab.lab.guests_talk(0, 1, Duration::from_secs(2)) {
            Ok(d) => say(&format!(
                "   VM 0 → VM 1: a UDP datagram arrived {} after it was sent",
                human_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            )),
            Err(e) => say(&format!("   VM 0 → VM 1: {e:#}")),
        }
    }
    Ok(outage)
}

/// One datagram from VM 0 to VM 1 with a short wait, as evidence during an outage.
fn talk_once(vms: &[String]) -> String {
    let (Some(from), Some(to)) = (vms.first().cloned(), vms.get(1).cloned()) else {
        return String::new();
    };
    let receiver = std::thread::spawn(move || -> Result<bool> {
        crate::lab::enter_netns(&to)?;
        let sock = std::net::UdpSocket::bind("198.18.0.2:7778")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 16];
        Ok(sock.recv_from(&mut buf).is_ok())
    });
    let sent = crate::lab::in_netns(&from, || {
        let sock = std::net::UdpSocket::bind("198.18.0.1:0")?;
        sock.send_to(b"hello", "198.18.0.2:7778")?;
        Ok(())
    });
    match (sent, receiver.join()) {
        (Ok(()), Ok(Ok(false))) => {
            "VM 0 → VM 1: a UDP datagram is lost (no port forwards)".to_owned()
        }
        (Ok(()), Ok(Ok(true))) => "VM 0 → VM 1: a UDP datagram got through".to_owned(),
        _ => "VM 0 → VM 1: could not try".to_owned(),
    }
}

pub fn run(release: bool) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the demo needs root: it creates network namespaces and runs bridge-guard's eBPF \
             hooks. Run `sudo -E cargo xtask demo`"
        );
    }
    crate::lab::install_signal_cleanup("demo")?;
    let bin = crate::build(release)?;
    let started = Instant::now();
    say(
        "\nbridge-guard demo: a bridge carrying two VMs goes through three faults, first with no guard, then with bridge-guard.",
    );
    let mut lab = BenchLab::new("bgd", "demo", 2)?;
    say(&format!(
        "\nThe lab (network namespaces, removed when the demo ends or on Ctrl-C):\n   {:<26} bridge br0, kernel STP on, forward delay 2 s (libvirt's settings)\n   {:<26} VM 0 at 198.18.0.1, on tap vnet0\n   {:<26} VM 1 at 198.18.0.2, on tap vnet1",
        lab.lab.host.name,
        lab.lab.vms.first().map_or("", |v| v.name.as_str()),
        lab.lab.vms.get(1).map_or("", |v| v.name.as_str()),
    ));
    faults::restore(&mut lab, true)?;
    let mut obs = Observer::start(&lab.lab.host.name, "br0", lab.lab.ports())?;
    obs.settle(QUIET, Duration::from_secs(20))?;

    say("\n━━ Part 1: no guard ━━");
    let mut before = Vec::new();
    for s in Scenario::ALL {
        before.push(play(s, &mut lab, &mut obs, false)?);
    }
    faults::restore(&mut lab, true)?;

    say("\n━━ Part 2: bridge-guard ━━");
    let state = TempDir::on_tmpfs("bgd", "state")?;
    let dir = state.path.to_string_lossy().into_owned();
    let args = [
        "run",
        "--bridge",
        "br0",
        "--port-pattern",
        "vnet*",
        "--log-format",
        "json",
        "--state-dir",
        &dir,
    ];
    say(&format!(
        "   $ bridge-guard {}",
        args.iter()
            .map(|a| if a.contains('*') {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            })
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let (agent, ready, _) =
        spawn_agent(&lab.lab.host, &bin, &args, obs.sender()).context("starting bridge-guard")?;
    say(&format!(
        "   {}",
        ready.trim_start_matches("bridge-guard: ")
    ));
    if !release {
        say("   (a debug build: `--release` repairs faster)");
    }
    obs.settle(QUIET, Duration::from_secs(20))?;
    let mut after = Vec::new();
    for s in Scenario::ALL {
        after.push(play(s, &mut lab, &mut obs, true)?);
    }
    drop(agent);

    let mut table = String::from("\n━━ Before and after ━━\n\n");
    let _ = writeln!(table, "   {:<26} {:<28} bridge-guard", "fault", "no guard");
    for (i, s) in Scenario::ALL.iter().enumerate() {
        let show = |o: Option<&Option<u64>>| match o {
            Some(Some(ns)) => human_ns(*ns),
            _ => format!("not healed after {} s", CAP.as_secs()),
        };
        let _ = writeln!(
            table,
            "   {:<26} {:<28} {}",
            s.short(),
            show(before.get(i)),
            show(after.get(i))
        );
    }
    say(&table);
    say(&format!(
        "━━ Where to go next ━━\n\n\
         Guard your own bridge (libvirt's is virbr0), with metrics on 127.0.0.1:19469:\n   \
         sudo {bin} run --bridge virbr0 --port-pattern 'vnet*' --metrics 19469\n\
         What it knows, and what it repaired:\n   \
         sudo {bin} status\n   \
         curl -s http://127.0.0.1:19469/metrics | grep -E 'bridge_guard_(repairs_total|port_outage)'\n\
         Every bridge event live, and what this kernel allows:\n   \
         cargo xtask run -- watch\n   \
         cargo xtask run -- doctor\n\
         The numbers against a shell guard: cargo xtask bench --quick\n\n\
         demo: done in {:.0} s; the lab is removed.",
        started.elapsed().as_secs_f64(),
        bin = bin.display()
    ));
    Ok(())
}
