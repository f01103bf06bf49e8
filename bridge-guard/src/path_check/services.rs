//! The network's DHCP and DNS server (libvirt's dnsmasq, NetworkManager's shared mode): is
//! anything listening for the VMs on the bridge's address?

use std::net::Ipv4Addr;

use super::{Finding, Report, Subnet};

/// (local address, port) of the IPv4 sockets in a `/proc/net/{udp,tcp}` table, keeping only
/// those in `state` (`07` unconnected UDP, `0A` listening TCP).
fn sockets(table: &str, state: &str) -> Vec<(Ipv4Addr, u16)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, port) = f.get(1)?.split_once(':')?;
            (f.get(3)? == &state).then_some(())?;
            // The kernel prints the address as the u32 it holds, in network byte order.
            let addr = u32::from_str_radix(addr, 16).ok()?;
            Some((
                Ipv4Addr::from(u32::from_be(addr)),
                u16::from_str_radix(port, 16).ok()?,
            ))
        })
        .collect()
}

fn serves(socks: &[(Ipv4Addr, u16)], addr: Ipv4Addr, port: u16) -> bool {
    socks
        .iter()
        .any(|(a, p)| *p == port && (*a == addr || a.is_unspecified()))
}

/// Adds a finding when nothing answers DHCP or DNS for the VMs on `bridge`.
pub fn check(bridge: &str, subnet: Subnet, report: &mut Report) {
    let read = |t: &str| std::fs::read_to_string(format!("/proc/net/{t}"));
    let (Ok(udp), Ok(tcp)) = (read("udp"), read("tcp")) else {
        report
            .skipped
            .push("cannot read /proc/net/udp and tcp: DHCP/DNS not checked".into());
        return;
    };
    let udp = sockets(&udp, "07");
    let tcp = sockets(&tcp, "0A");
    let addr = subnet.addr;
    let dhcp = serves(&udp, addr, 67);
    let dns = serves(&udp, addr, 53) || serves(&tcp, addr, 53);
    if dhcp && dns {
        return;
    }
    let missing: Vec<&str> = [(!dhcp, "DHCP (udp 67)"), (!dns, "DNS (port 53)")]
        .iter()
        .filter(|(m, _)| *m)
        .map(|(_, s)| *s)
        .collect();
    report.findings.push(Finding {
        kind: "dhcp_dns",
        cause: format!(
            "nothing serves {} for the VMs on {bridge}: they get no address or no names",
            missing.join(" or ")
        ),
        evidence: vec![format!(
            "no socket bound to {addr} or 0.0.0.0 for {} in /proc/net/udp and /proc/net/tcp",
            missing.join(" or ")
        )],
        fix: format!(
            "restart the network's dnsmasq (libvirt: virsh net-destroy NETWORK; virsh net-start \
             NETWORK). If another DNS server (a VPN's, or a system dnsmasq) holds port 53 on \
             every address, make it bind only its own interfaces (dnsmasq: bind-interfaces, \
             except-interface={bridge}). Ignore this if the VMs on {bridge} have static \
             addresses and another resolver"
        ),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tables() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   \x20 1: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n\
                   \x20 2: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0\n\
                   \x20 3: FE0012C6:0035 0100A8C0:0035 01 00000000:00000000 00:00000000 00000000     0        0 3 2 0 0\n";
        let s = sockets(udp, "07");
        assert_eq!(
            s,
            [
                (Ipv4Addr::new(127, 0, 0, 1), 53),
                (Ipv4Addr::UNSPECIFIED, 67)
            ]
        );
        let br = Ipv4Addr::new(198, 18, 0, 254);
        assert!(serves(&s, br, 67), "0.0.0.0 serves every address");
        assert!(!serves(&s, br, 53), "127.0.0.1 is not the bridge's");
    }
}
