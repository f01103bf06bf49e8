//! Hazards found against the real kernel: devices whose decoding decides whether a bridge is
//! safe to repair (tunnels joining late, veths whose peer sits on another namespace's bridge,
//! VPN-style taps), and the repairs the agent refuses or undoes for them.

use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result};
use integration_tests::{Agent, NetNs, PREFIX, VmLab, VmLabChecks as _, skip_unless_root};

const HEAL: Duration = Duration::from_secs(20);

fn refusals(status: &serde_json::Value) -> String {
    status["bridges"][0]["refusals"].to_string()
}

#[test]
fn a_tunnel_joining_after_stp_off_turns_stp_back_on_also_after_a_restart() -> Result<()> {
    if skip_unless_root("a_tunnel_joining_after_stp_off_turns_stp_back_on_also_after_a_restart") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "latehz", 2)?;
    let mut agent = Agent::run(&lab.host, &["--bridge", "br0"])?;
    lab.wait_healthy(HEAL)?;
    assert_eq!(lab.stp_state()?, 0);
    agent.wait_status("STP off remembered", HEAL, |s| {
        s["bridges"][0]["stp_off_by_agent"] == true
    })?;
    // A restarted agent remembers that it turned STP off (the state file).
    agent.terminate()?;
    let mut agent = Agent::run(&lab.host, &["--bridge", "br0"])?;
    lab.host
        .ip("link add vx0 type vxlan id 42 dstport 4789 local 198.18.1.1")?;
    lab.host.ip("link set vx0 master br0")?;
    lab.host.ip("link set vx0 up")?;
    agent.wait_log("STP back on", HEAL, |l| {
        l.contains("repaired: turn STP back on on br0")
    })?;
    lab.wait_until("STP on", HEAL, |lab| {
        Ok((lab.stp_state()? != 1).then(|| "STP still off".to_owned()))
    })?;
    // Reported when it happened, and the bridge left alone since.
    agent.wait_logged(
        "the log line refused: left alone, STP turned back on:",
        HEAL,
        |l| l.contains("refused: left alone, STP turned back on: vx0 is a vxlan tunnel port"),
    )?;
    let status = agent.wait_status("the refusal", HEAL, |s| {
        refusals(s).contains("left alone: vx0 is a vxlan tunnel port")
            && s["bridges"][0]["stp_off_by_agent"] == false
    })?;
    assert_eq!(status["bridges"][0]["stp"], "kernel", "{status:#}");
    Ok(())
}

#[test]
fn a_veth_whose_peer_is_on_a_bridge_with_a_vxlan_port_is_a_hazard() -> Result<()> {
    if skip_unless_root("a_veth_whose_peer_is_on_a_bridge_with_a_vxlan_port_is_a_hazard") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "vethhz", 1)?;
    // Another namespace (a container host, say) with a bridge that has a tunnel out.
    let far = NetNs::new(PREFIX, "vethhzfar")?;
    far.ip_batch(&[
        "link add brx type bridge".to_owned(),
        "link add vx0 type vxlan id 7 dstport 4789 local 198.18.1.2".to_owned(),
        "link set vx0 master brx".to_owned(),
        "link set brx up".to_owned(),
        "link set vx0 up".to_owned(),
    ])?;
    lab.host.ip_batch(&[
        format!(
            "link add vethp type veth peer name vethq netns {}",
            far.name
        ),
        "link set vethp master br0".to_owned(),
        "link set vethp up".to_owned(),
    ])?;
    far.ip_batch(&[
        "link set vethq master brx".to_owned(),
        "link set vethq up".to_owned(),
    ])?;
    let agent = Agent::run(&lab.host, &["--bridge", "br0"])?;
    // Published before the readiness line.
    let status = agent.status()?;
    let r = refusals(&status);
    assert!(
        r.contains("vethp's peer vethq")
            && r.contains("is on brx, where vx0 is a vxlan tunnel port"),
        "{status:#}"
    );
    assert_eq!(lab.stp_state()?, 1, "left alone");
    assert_eq!(status["bridges"][0]["repairs"], 0, "{status:#}");
    Ok(())
}

/// A tap in namespace `ns`, opened without virtio-net headers (as OpenVPN does, and QEMU for an
/// e1000 NIC) and held by a process named `holder` (a `sleep` under that name); it has carrier
/// while that process runs. Killed on drop.
struct HeldTap {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for HeldTap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn held_tap(ns: &NetNs, name: &str, holder: &str) -> Result<HeldTap> {
    use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: i16 = 0x0002;
    const IFF_NO_PI: i16 = 0x1000;
    let tap_name = name.to_owned();
    let fd: OwnedFd = netlab::in_netns(&ns.name, move || {
        // SAFETY: plain syscalls; the fd is owned right away; the buffer has ifreq's size.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        anyhow::ensure!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = [0u8; 40];
        req[..tap_name.len()].copy_from_slice(tap_name.as_bytes());
        req[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
        anyhow::ensure!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        Ok(fd)
    })
    .context("opening a tap")?;
    let dir = std::env::temp_dir().join(format!("{}-{name}", ns.name));
    std::fs::create_dir_all(&dir)?;
    let exe = dir.join(holder);
    let sleep = which_sleep()?;
    let _ = std::fs::remove_file(&exe);
    std::os::unix::fs::symlink(sleep, &exe)?;
    let raw = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("600");
    // SAFETY: dup2 and fcntl are async-signal-safe; they give the child the tap as fd 3,
    // kept across exec (dup2 onto itself would keep CLOEXEC, hence the fcntl).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the tap's holder")?;
    drop(fd);
    Ok(HeldTap { child, dir })
}

fn which_sleep() -> Result<std::path::PathBuf> {
    ["/usr/bin/sleep", "/bin/sleep"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .context("no sleep binary")
}

#[test]
fn a_vpn_held_tap_is_a_hazard_and_a_vm_held_tap_is_not() -> Result<()> {
    if skip_unless_root("a_vpn_held_tap_is_a_hazard_and_a_vm_held_tap_is_not") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "taphz", 1)?;
    // A VM with an e1000 NIC: no virtio-net headers, held by QEMU.
    let _vm = held_tap(&lab.host, "tapvm", "qemu-system-x86_64")?;
    lab.host.ip_batch(&[
        "link set tapvm master br0".to_owned(),
        "link set tapvm up".to_owned(),
    ])?;
    let mut agent = Agent::run(&lab.host, &["--bridge", "br0"])?;
    // A VM's tap is no hazard: the bridge is repaired.
    lab.wait_until("STP off", HEAL, |lab| {
        Ok((lab.stp_state()? != 0).then(|| "STP still on".to_owned()))
    })?;
    // OpenVPN in tap mode joins: the agent turned STP off, so it turns it back on.
    let _vpn = held_tap(&lab.host, "tapvpn", "openvpn")?;
    lab.host.ip_batch(&[
        "link set tapvpn master br0".to_owned(),
        "link set tapvpn up".to_owned(),
    ])?;
    agent.wait_log("STP back on", HEAL, |l| {
        l.contains("repaired: turn STP back on on br0")
    })?;
    let status = agent.wait_status("the refusal", HEAL, |s| {
        refusals(s).contains("tapvpn is a TAP device held by openvpn[")
    })?;
    assert!(!refusals(&status).contains("tapvm"), "{status:#}");
    Ok(())
}
