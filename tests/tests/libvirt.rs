//! The first user's stack, not a lookalike: Debian's libvirt makes the bridge and the taps, qemu
//! holds them, and the faults come from libvirt itself (see `integration_tests::libvirt`).
//!
//! Every wait is on link notifications or the agent's published state, bounded by [`HEAL`].

use std::time::Duration;

use integration_tests::{
    Agent,
    libvirt::{LibvirtLab, Network, Tap, skip_unless_libvirt, with_log},
};
use serde_json::Value;

/// Bound on every wait for a repair (generous: CI machines are busy, and VMs slower still).
const HEAL: Duration = Duration::from_secs(20);

/// A lab with libvirt's `default` network (virbr0, STP on, delay 0) and a running guest `g0`
/// on it; the guest's tap.
fn lab_with_guest(tag: &str) -> anyhow::Result<(LibvirtLab, Network, Tap)> {
    let lab = integration_tests::libvirt::lab(tag)?;
    let net = Network::new("default", "virbr0", 122);
    with_log(&lab, lab.start_network(&net))?;
    let taps = with_log(&lab, lab.start_guest("g0", &[&net.name]))?;
    let tap = taps.into_iter().next().expect("one interface, one tap");
    lab.wait_forwarding(&tap.dev, &net.bridge, HEAL)?;
    Ok((lab, net, tap))
}

/// The agent guarding `bridge` and reading the lab's libvirt state.
fn agent(lab: &LibvirtLab, bridge: &str, extra: &[&str]) -> anyhow::Result<Agent> {
    let dir = lab.run_dir().to_string_lossy().into_owned();
    let mut args = vec!["--bridge", bridge, "--libvirt-dir", &dir];
    args.extend_from_slice(extra);
    Agent::run(&lab.ns, &args)
}

/// The ports the agent's published state lists on `bridge`, with their states.
fn status_ports(status: &Value, bridge: &str) -> Vec<(String, String)> {
    status["bridges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["name"] == bridge)
        .flat_map(|b| b["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn lists_port(status: &Value, bridge: &str, port: &str) -> bool {
    status_ports(status, bridge).iter().any(|(p, _)| p == port)
}

/// `virsh net-destroy` + `net-start` `rounds` times, each time waiting for the tap to be back
/// and forwarding; `net-start`'s durations.
fn recreate_rounds(
    lab: &LibvirtLab,
    net: &Network,
    tap: &Tap,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::new();
    for round in 1..=rounds {
        took.push(with_log(lab, lab.recreate_network(&net.name))?);
        lab.wait_forwarding(&tap.dev, &net.bridge, HEAL)
            .map_err(|e| e.context(format!("round {round}: libvirt left the tap out")))?;
    }
    Ok(took)
}

#[test]
fn libvirts_network_recreate_gets_the_tap_back_every_time_and_after_a_restart() -> anyhow::Result<()>
{
    if skip_unless_libvirt(
        "libvirts_network_recreate_gets_the_tap_back_every_time_and_after_a_restart",
    ) {
        return Ok(());
    }
    let (lab, net, tap) = lab_with_guest("lvrecreate")?;
    // Without a guard libvirt leaves the running guest's tap out of the new bridge for good:
    // the fault is real. Measured without the agent, for the net-start comparison below.
    let mut without = Vec::new();
    for _ in 0..3 {
        without.push(with_log(&lab, lab.recreate_network(&net.name))?);
    }
    assert!(
        lab.not_forwarding(&tap.dev, &net.bridge)?
            .is_some_and(|why| why.contains("master")),
        "libvirt re-attached the tap by itself: this test would prove nothing"
    );
    // The agent learns the tap from libvirt's live XML and the network's status.
    let mut agent = agent(&lab, &net.bridge, &[])?;
    lab.wait_forwarding(&tap.dev, &net.bridge, HEAL)?;
    // Right after ready, three recreates in a row.
    let with = recreate_rounds(&lab, &net, &tap, 3)?;
    // A restarted agent: the same again, right after it says ready.
    let status = agent.terminate()?;
    assert!(status.success(), "agent exited with {status}");
    let mut agent = self::agent(&lab, &net.bridge, &[])?;
    assert!(
        lists_port(&agent.status()?, &net.bridge, &tap.dev),
        "ready, yet the tap is unknown:\n{:#}",
        agent.status()?
    );
    let again = recreate_rounds(&lab, &net, &tap, 3)?;
    let log = agent.drain_log().join("\n");
    assert!(!log.contains("repair failed"), "{log}");
    eprintln!(
        "net-start took {without:?} without the agent, {with:?} with it, {again:?} after a \
         restart (timings under load are noise; re-measure on a quiet machine)"
    );
    Ok(())
}

/// The start-up race of issue 14: the agent subscribed to netlink, and before its first dump
/// libvirt recreates the network, so the tap is already out when the agent first looks and
/// the only word that it belongs to virbr0 is libvirt's. The window is widened by stopping the
/// agent (SIGSTOP) while it attaches its eBPF hooks, after its netlink socket is open.
#[test]
fn a_tap_left_out_while_the_agent_starts_is_known_from_libvirt() -> anyhow::Result<()> {
    if skip_unless_libvirt("a_tap_left_out_while_the_agent_starts_is_known_from_libvirt") {
        return Ok(());
    }
    let (lab, net, tap) = lab_with_guest("lvrace")?;
    let dir = lab.run_dir().to_string_lossy().into_owned();
    let args = [
        "--bridge",
        net.bridge.as_str(),
        "--libvirt-dir",
        dir.as_str(),
    ];
    // Logged while the hooks attach: netlink is subscribed by then, the dump not taken yet.
    let mut agent = Agent::run_until(
        &lab.ns,
        &args,
        ("the first hook line", &|l: &str| l.contains("hook ")),
    )?;
    agent.pause()?;
    let recreated = with_log(&lab, lab.recreate_network(&net.name));
    agent.resume()?;
    recreated?;
    agent.wait_log("the readiness line", HEAL, |l| l.contains("ready:"))?;
    // Ready means every port of the bridge is known: the state published before the line.
    let status = agent.status()?;
    assert!(
        lists_port(&status, &net.bridge, &tap.dev),
        "ready, yet blind to {}:\n{status:#}",
        tap.dev
    );
    lab.wait_forwarding(&tap.dev, &net.bridge, HEAL)?;
    let log = agent.drain_log().join("\n");
    assert!(!log.contains("repair failed"), "{log}");
    Ok(())
}

#[test]
fn a_guest_started_and_an_interface_hot_plugged_land_on_libvirts_bridge() -> anyhow::Result<()> {
    if skip_unless_libvirt("a_guest_started_and_an_interface_hot_plugged_land_on_libvirts_bridge") {
        return Ok(());
    }
    let lab = integration_tests::libvirt::lab("lvplug")?;
    let net = Network::new("default", "virbr0", 122);
    with_log(&lab, lab.start_network(&net))?;
    // The pattern makes every vnet tap a candidate: it must still never beat libvirt to it.
    let mut agent = agent(&lab, &net.bridge, &["--port-pattern", "vnet*"])?;
    // libvirt enslaves the tap itself; a guard that got there first would make that EBUSY
    // and the start fail.
    let taps = with_log(&lab, lab.start_guest("g1", &[&net.name]))?;
    lab.wait_forwarding(&taps[0].dev, &net.bridge, HEAL)?;
    let plugged = with_log(&lab, lab.attach_interface("g1", &net.name))?;
    lab.wait_forwarding(&plugged.dev, &net.bridge, HEAL)?;
    agent.wait_status("both taps listed", HEAL, |s| {
        lists_port(s, &net.bridge, &taps[0].dev) && lists_port(s, &net.bridge, &plugged.dev)
    })?;
    with_log(&lab, lab.detach_interface("g1", &plugged.mac))?;
    lab.wait_gone(&plugged.dev, HEAL)?;
    agent.wait_status("the unplugged tap gone", HEAL, |s| {
        !lists_port(s, &net.bridge, &plugged.dev) && lists_port(s, &net.bridge, &taps[0].dev)
    })?;
    let log = agent.drain_log().join("\n");
    assert!(
        !log.contains("re-attach"),
        "the agent enslaved a tap itself:\n{log}"
    );
    assert!(!log.contains("repair failed"), "{log}");
    Ok(())
}

#[test]
fn a_guest_shut_down_takes_its_tap_and_its_port_with_it() -> anyhow::Result<()> {
    if skip_unless_libvirt("a_guest_shut_down_takes_its_tap_and_its_port_with_it") {
        return Ok(());
    }
    let (lab, net, tap) = lab_with_guest("lvdown")?;
    let agent = agent(&lab, &net.bridge, &[])?;
    agent.wait_status("the tap listed", HEAL, |s| {
        lists_port(s, &net.bridge, &tap.dev)
    })?;
    // The guest has no OS to act on ACPI, so it is powered off (what a guest shutdown ends in
    // for libvirt: qemu exits and libvirt tears its taps down).
    with_log(&lab, lab.virsh(&["destroy", "g0"]))?;
    lab.wait_gone(&tap.dev, HEAL)?;
    agent.wait_status("the port forgotten", HEAL, |s| {
        status_ports(s, &net.bridge).is_empty()
    })?;
    Ok(())
}

#[test]
fn a_second_networks_taps_are_never_taken() -> anyhow::Result<()> {
    if skip_unless_libvirt("a_second_networks_taps_are_never_taken") {
        return Ok(());
    }
    let (lab, net, tap) = lab_with_guest("lvsecond")?;
    let second = Network::new("second", "virbr1", 123);
    with_log(&lab, lab.start_network(&second))?;
    let mut agent = agent(&lab, &net.bridge, &["--port-pattern", "vnet*"])?;
    let other = with_log(&lab, lab.start_guest("g2", &[&second.name]))?;
    lab.wait_forwarding(&other[0].dev, &second.bridge, HEAL)?;
    // libvirt leaves both networks' taps out when it recreates them: the guarded one's tap is
    // re-attached, the other one's, a vnet too, is not libvirt's for virbr0 and stays out.
    with_log(&lab, lab.recreate_network(&second.name))?;
    with_log(&lab, lab.recreate_network(&net.name))?;
    lab.wait_forwarding(&tap.dev, &net.bridge, HEAL)?;
    // The agent has acted on everything up to the guarded tap's return; it saw the other tap
    // out before that, and left it.
    let why = lab.not_forwarding(&other[0].dev, &second.bridge)?;
    assert!(
        why.as_deref().is_some_and(|w| w.contains("master is null")),
        "{} should still be out of every bridge: {why:?}",
        other[0].dev
    );
    let log = agent.drain_log().join("\n");
    assert!(
        !log.contains(&format!("re-attach {} to", other[0].dev)),
        "the other network's tap was taken:\n{log}"
    );
    let status = agent.status()?;
    assert!(
        !lists_port(&status, &net.bridge, &other[0].dev),
        "{status:#}"
    );
    Ok(())
}

#[test]
fn stp_re_enabled_and_a_tap_flapped_under_a_running_guest() -> anyhow::Result<()> {
    if skip_unless_libvirt("stp_re_enabled_and_a_tap_flapped_under_a_running_guest") {
        return Ok(());
    }
    let (lab, net, tap) = lab_with_guest("lvstp")?;
    let mut agent = agent(&lab, &net.bridge, &[])?;
    let stp = |lab: &LibvirtLab| -> anyhow::Result<Option<String>> {
        let v: Value =
            serde_json::from_str(&lab.ns.ip(&format!("-j -d link show {}", net.bridge))?)?;
        let s = v[0]["linkinfo"]["info_data"]["stp_state"].as_u64();
        Ok((s != Some(0)).then(|| format!("stp_state {s:?}")))
    };
    crate_wait(&lab, "STP off", || stp(&lab))?;
    let mark = agent.drain_log().len();
    lab.ns
        .ip(&format!("link set {} type bridge stp_state 1", net.bridge))?;
    lab.ns.ip(&format!("link set {} down", tap.dev))?;
    lab.ns.ip(&format!("link set {} up", tap.dev))?;
    crate_wait(&lab, "STP off again", || stp(&lab))?;
    lab.wait_forwarding(&tap.dev, &net.bridge, HEAL)?;
    let log = agent.drain_log()[mark..].join("\n");
    assert!(log.contains("turn STP off"), "{log}");
    assert!(
        !log.contains("to=\"learning\""),
        "the tap walked STP's timers:\n{log}"
    );
    Ok(())
}

/// [`integration_tests::wait_on_links`] in the lab's namespace.
fn crate_wait(
    lab: &LibvirtLab,
    what: &str,
    problem: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    integration_tests::wait_on_links(&lab.ns, what, HEAL, problem)
}
