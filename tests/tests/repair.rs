//! Fault scenarios against the real agent (`bridge-guard run`) in a namespace lab: a bridge with
//! kernel STP on and forward delay 2 s, and three VM namespaces joined by veths (`vnetN`).
//! After each fault the test waits, bounded and on link notifications, for the lab to be
//! healthy again, checks the repair that did it, and that the guests can really talk.

use std::{process::Command, time::Duration};

use integration_tests::{
    Agent, PREFIX, TALK, VmLab, VmLabChecks as _, agent_bin, skip_unless_root,
};

/// Bound for a repair to show. Repairs take about a millisecond; the STP timers that would heal
/// some faults on their own take 4 s, which is why mechanism is checked separately.
const HEAL: Duration = Duration::from_secs(20);

/// A guarded lab, healthy (the agent turned STP off and forced the new ports on start).
fn guarded_lab(tag: &str, extra: &[&str]) -> anyhow::Result<(VmLab, Agent)> {
    let lab = VmLab::new(PREFIX, tag, 3)?;
    let mut args = vec!["--bridge", "br0"];
    args.extend_from_slice(extra);
    let agent = Agent::run(&lab.host, &args)?;
    lab.wait_healthy(HEAL)?;
    Ok((lab, agent))
}

/// Log lines since `from` that mention `needle`.
fn since<'a>(agent: &'a mut Agent, from: usize, needle: &str) -> Vec<&'a String> {
    agent.drain_log()[from..]
        .iter()
        .filter(|l| l.contains(needle))
        .collect()
}

fn stp_state(lab: &VmLab) -> anyhow::Result<u64> {
    lab.stp_state()
}

#[test]
fn stp_reenabled_then_a_port_flaps() -> anyhow::Result<()> {
    if skip_unless_root("stp_reenabled_then_a_port_flaps") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("stpflap", &[])?;
    let mark = agent.drain_log().len();
    lab.host.ip("link set br0 type bridge stp_state 1")?;
    lab.host.ip("link set vnet0 down")?;
    lab.host.ip("link set vnet0 up")?;
    lab.wait_healthy(HEAL)?;
    agent.wait_log("STP turned off", HEAL, |l| {
        l.contains("repaired: turn STP off on br0")
    })?;
    assert_eq!(stp_state(&lab)?, 0);
    // Forced or re-enabled straight into forwarding: it never walked the STP timers.
    let learning = since(&mut agent, mark, "to=\"learning\"");
    assert!(
        learning.is_empty(),
        "a port walked the STP timers: {learning:?}"
    );
    lab.guests_talk(0, 1, TALK)?;
    Ok(())
}

#[test]
fn a_detached_port_is_reattached() -> anyhow::Result<()> {
    if skip_unless_root("a_detached_port_is_reattached") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("detach", &[])?;
    lab.host.ip("link set vnet1 nomaster")?;
    agent.wait_log("re-attach", HEAL, |l| {
        l.contains("repaired: re-attach vnet1 to br0")
    })?;
    lab.wait_healthy(HEAL)?;
    lab.guests_talk(1, 2, TALK)?;
    Ok(())
}

#[test]
fn a_downed_bridge_is_raised() -> anyhow::Result<()> {
    if skip_unless_root("a_downed_bridge_is_raised") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("down", &[])?;
    lab.host.ip("link set br0 down")?;
    agent.wait_log("bridge up", HEAL, |l| l.contains("repaired: set br0 up"))?;
    lab.wait_healthy(HEAL)?;
    lab.guests_talk(2, 0, TALK)?;
    Ok(())
}

#[test]
fn stp_on_and_a_guest_end_flaps() -> anyhow::Result<()> {
    if skip_unless_root("stp_on_and_a_guest_end_flaps") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("guestflap", &[])?;
    let mark = agent.drain_log().len();
    lab.host.ip("link set br0 type bridge stp_state 1")?;
    lab.vms[1].ip("link set eth0 down")?;
    lab.vms[1].ip("link set eth0 up")?;
    lab.wait_healthy(HEAL)?;
    assert_eq!(stp_state(&lab)?, 0);
    let learning = since(&mut agent, mark, "to=\"learning\"");
    assert!(
        learning.is_empty(),
        "a port walked the STP timers: {learning:?}"
    );
    lab.guests_talk(1, 0, TALK)?;
    Ok(())
}

#[test]
fn a_recreated_bridge_gets_its_ports_back() -> anyhow::Result<()> {
    if skip_unless_root("a_recreated_bridge_gets_its_ports_back") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("recreate", &[])?;
    lab.host.ip("link del br0")?;
    // Recreated the way a network manager would, with STP on and down, without its taps.
    lab.host
        .ip("link add br0 type bridge stp_state 1 forward_delay 200")?;
    // Each port is re-attached, in whatever order the agent logs them.
    let mut left: std::collections::BTreeSet<String> = (0..3)
        .map(|i| format!("repaired: re-attach vnet{i} to br0"))
        .collect();
    while !left.is_empty() {
        let line = agent.wait_log("every re-attach", HEAL, |l| {
            left.iter().any(|w| l.contains(w.as_str()))
        })?;
        left.retain(|w| !line.contains(w.as_str()));
    }
    lab.wait_healthy(HEAL)?;
    assert_eq!(stp_state(&lab)?, 0);
    lab.guests_talk(0, 2, TALK)?;
    Ok(())
}

#[test]
fn a_vpn_like_change_is_left_alone() -> anyhow::Result<()> {
    if skip_unless_root("a_vpn_like_change_is_left_alone") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("vpn", &["--port-pattern", "vnet*"])?;
    let mark = agent.drain_log().len();
    // What a VPN client in tap mode does: a tap device, up, addressed, with split default
    // routes. Its name matches the port pattern and a tap can be enslaved: only learned
    // membership (it never was on br0) keeps the agent from pulling it onto the bridge.
    let vpn = "vnet9";
    lab.host.ip(&format!("tuntap add dev {vpn} mode tap"))?;
    lab.host
        .ip(&format!("addr add 198.19.255.2/30 dev {vpn}"))?;
    lab.host.ip(&format!("link set {vpn} up"))?;
    lab.host.ip("addr add 198.18.0.254/24 dev br0")?;
    lab.host.ip(&format!("route add 0.0.0.0/1 dev {vpn}"))?;
    lab.host.ip(&format!("route add 128.0.0.0/1 dev {vpn}"))?;
    // Barrier: a fault after the VPN change. Its repair proves the agent has processed every
    // notification the VPN change caused.
    lab.host.ip("link set vnet2 nomaster")?;
    agent.wait_log("barrier repair", HEAL, |l| {
        l.contains("repaired: re-attach vnet2 to br0")
    })?;
    let repairs: Vec<_> = since(&mut agent, mark, "repaired:")
        .into_iter()
        .filter(|l| !l.contains("re-attach vnet2"))
        .cloned()
        .collect();
    assert!(
        repairs.is_empty(),
        "the VPN change caused repairs: {repairs:?}"
    );
    let dev: serde_json::Value =
        serde_json::from_str(&lab.host.ip(&format!("-j link show {vpn}"))?)?;
    assert!(dev[0].get("master").is_none(), "{vpn} was enslaved: {dev}");
    lab.wait_healthy(HEAL)?;
    lab.guests_talk(0, 1, TALK)?;
    Ok(())
}

#[test]
fn a_bridge_with_a_vxlan_port_is_left_alone_and_the_refusal_reported() -> anyhow::Result<()> {
    if skip_unless_root("a_bridge_with_a_vxlan_port_is_left_alone_and_the_refusal_reported") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "vxlan", 1)?;
    lab.host
        .ip("link add vx0 type vxlan id 42 dstport 4789 local 198.18.1.1")?;
    lab.host.ip("link set vx0 master br0")?;
    lab.host.ip("link set vx0 up")?;
    let mut agent = Agent::run(&lab.host, &["--bridge", "br0"])?;
    // The status is published before the readiness line: the refusal is there now.
    let status = agent.status()?;
    let refusals = status["bridges"][0]["refusals"].to_string();
    assert!(
        refusals.contains("vx0 is a vxlan tunnel port"),
        "{status:#}"
    );
    agent.wait_logged("the refusal's log line", HEAL, |l| l.contains("refused:"))?;
    // Nothing was touched: STP still on, the VM port still walking its timers.
    assert_eq!(stp_state(&lab)?, 1);
    assert_eq!(status["bridges"][0]["repairs"], 0, "{status:#}");
    Ok(())
}

#[test]
fn a_port_moved_to_another_bridge_is_not_pulled_back() -> anyhow::Result<()> {
    if skip_unless_root("a_port_moved_to_another_bridge_is_not_pulled_back") {
        return Ok(());
    }
    let (lab, mut agent) = guarded_lab("moved", &["--port-pattern", "vnet*"])?;
    lab.host.ip("link add br9 type bridge")?;
    lab.host.ip("link set br9 up")?;
    lab.host.ip("link set vnet2 master br9")?;
    agent.wait_log("the refusal", HEAL, |l| {
        l.contains("vnet2 moved to br9: not pulling it back")
    })?;
    // Barrier: a later fault is repaired, and vnet2 is still on br9.
    lab.host.ip("link set br0 down")?;
    agent.wait_log("bridge up", HEAL, |l| l.contains("repaired: set br0 up"))?;
    let v: serde_json::Value = serde_json::from_str(&lab.host.ip("-j link show vnet2")?)?;
    assert_eq!(v[0]["master"], "br9", "{v}");
    Ok(())
}

#[test]
fn observe_only_repairs_nothing_and_reports_what_it_would_do() -> anyhow::Result<()> {
    if skip_unless_root("observe_only_repairs_nothing_and_reports_what_it_would_do") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "observe", 1)?;
    let mut agent = Agent::run(&lab.host, &["--bridge", "br0", "--observe"])?;
    // Logged by the first reconcile, before the readiness line.
    // Once loop protection has probed every port (STP goes off only after that).
    agent.wait_logged("the would-do line for STP", HEAL, |l| {
        l.contains("observe-only: would turn STP off on br0")
    })?;
    lab.host.ip("link set br0 down")?;
    agent.wait_log("the would-do line", HEAL, |l| {
        l.contains("observe-only: would set br0 up")
    })?;
    assert_eq!(stp_state(&lab)?, 1);
    assert!(lab.unhealthy()?.is_some(), "observe-only must not repair");
    assert_eq!(agent.status()?["bridges"][0]["repairs"], 0);
    Ok(())
}

#[test]
fn fix_repairs_once_and_exits() -> anyhow::Result<()> {
    if skip_unless_root("fix_repairs_once_and_exits") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "fix", 2)?;
    lab.host.ip("link set vnet1 nomaster")?;
    lab.host.ip("link set br0 down")?;
    // vnet1 was detached before fix ran: libvirt's live XML says it belongs to br0 (a name
    // pattern alone never makes a port a member).
    let libvirt = std::env::temp_dir().join(format!("{}-libvirt", lab.host.name));
    std::fs::create_dir_all(libvirt.join("qemu"))?;
    std::fs::write(
        libvirt.join("qemu/guest.xml"),
        "<domstatus><domain><devices><interface type='bridge'><source bridge='br0'/>\
         <target dev='vnet1'/></interface></devices></domain></domstatus>",
    )?;
    let out = lab
        .host
        .command(agent_bin())
        .args(["fix", "br0", "--port-pattern", "vnet*", "--libvirt-dir"])
        .arg(&libvirt)
        .output()?;
    let _ = std::fs::remove_dir_all(&libvirt);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fix failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "turn STP off on br0: done",
        "set br0 up: done",
        "re-attach vnet1 to br0: done",
    ] {
        assert!(text.contains(line), "missing '{line}' in:\n{text}");
    }
    // No agent runs any more: whatever is healthy now, fix did.
    lab.wait_healthy(HEAL)?;
    lab.guests_talk(0, 1, TALK)?;

    let missing = lab
        .host
        .command(agent_bin())
        .args(["fix", "nosuchbr"])
        .output()?;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no bridge named nosuchbr"));
    Ok(())
}

#[test]
fn bad_bridge_names_are_rejected_with_a_hint() -> anyhow::Result<()> {
    let out = Command::new(agent_bin())
        .args(["run", "--bridge", "bad/name"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an interface name"), "{err}");
    Ok(())
}
