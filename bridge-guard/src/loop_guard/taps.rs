//! Whether a TAP device on a guarded bridge belongs to a VPN: a tap-mode VPN (OpenVPN
//! `dev tap`, tinc, ZeroTier, n2n, SoftEther) carries the bridge's frames to another site, so a
//! loop through it leaves the host, while a VM's tap ends in the guest.
//!
//! The kernel cannot tell them apart: both are tun devices in TAP mode, created by root. What
//! differs is who holds them open: `/proc/PID/fdinfo` names the device (`iff:`) for every open
//! `/dev/net/tun`. A tap opened with virtio-net headers (`IFF_VNET_HDR`) is a VM's (virtio
//! NICs; no VPN opens it that way) and needs no look; any other tap with carrier is looked up
//! once, and counts as a VPN's when its holder is a known VPN daemon. An unknown holder (QEMU
//! with an e1000 NIC, libvirt while it sets a guest up, a process /proc does not show) counts as
//! a VM's: the names below are the limit of what is recognised.

use std::path::Path;

/// Process names (`comm`) of tap-mode VPN daemons.
const VPNS: &[&str] = &[
    "openvpn",
    "tincd",
    "zerotier-one",
    "edge",
    "supernode",
    "vpnserver",
    "vpnbridge",
    "vpnclient",
    "fastd",
    "peervpn",
    "nebula",
    "vtund",
];

/// A hazard if the tap `name` is held open by a VPN daemon; `None` otherwise. Blocking: it
/// reads /proc.
pub fn vpn_holder(name: &str) -> Option<String> {
    let proc = Path::new("/proc");
    let want = format!("iff:\t{name}");
    for entry in std::fs::read_dir(proc).ok()?.flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue; // Not ours to look at, or gone.
        };
        for fd in fds.flatten() {
            let is_tun =
                std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/net/tun"));
            if !is_tun {
                continue;
            }
            let info = std::fs::read_to_string(dir.join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            if !info.lines().any(|l| l == want) {
                continue;
            }
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let comm = comm.trim();
            return VPNS.contains(&comm).then(|| {
                format!(
                    "{name} is a TAP device held by {comm}[{pid}], a VPN: frames through it \
                     leave the host"
                )
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_nobody_holds_is_no_vpn() {
        assert_eq!(vpn_holder("bg-no-such-tap"), None);
    }
}
