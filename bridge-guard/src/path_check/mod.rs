//! What stops VM traffic beyond layer 2 (`bridge-guard doctor --path BRIDGE`): the bridge
//! itself first, then the default route, the firewall, reverse-path filtering, forwarding and
//! the network's DHCP/DNS server. Each cause is named with its evidence and a suggested fix.
//! Nothing is changed: everything here only reads (`ip`, `nft`, `iptables-save`, `/proc`).

mod firewall;
mod routing;
mod services;
mod tools;

use std::net::Ipv4Addr;

use serde::Serialize;

pub use self::tools::ToolError;
use self::tools::{ip_json, link_kind};

/// One cause of lost VM traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// A stable name for scripts and tests: `bridge_down`, `vpn_default_route`,
    /// `firewall_drop`, `rp_filter`, `ip_forward`, `dhcp_dns`, ...
    pub kind: &'static str,
    pub cause: String,
    pub evidence: Vec<String>,
    pub fix: String,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub bridge: String,
    /// One line on the bridge: state, carrier, STP, ports, addresses.
    pub summary: String,
    pub findings: Vec<Finding>,
    /// What could not be checked, and why (a tool missing, no address).
    pub skipped: Vec<String>,
}

/// The bridge's IPv4 address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn network(self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.addr) & mask)
    }

    /// An address a VM on this subnet could have: the first host that is not the bridge's.
    pub fn vm_addr(self) -> Ipv4Addr {
        let net = u32::from(self.network());
        let first = net + 1;
        if first == u32::from(self.addr) {
            Ipv4Addr::from(first + 1)
        } else {
            Ipv4Addr::from(first)
        }
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// What the bridge looks like, and its layer-2 findings.
fn bridge_itself(bridge: &str, report: &mut Report) -> Result<Option<Subnet>, ToolError> {
    let links = ip_json(&["-d", "link", "show"])?;
    let Some(link) = links.iter().find(|l| l["ifname"] == bridge) else {
        report.findings.push(Finding {
            kind: "bridge_missing",
            cause: format!("there is no interface {bridge}"),
            evidence: vec![format!("`ip link show {bridge}`: no such device")],
            fix: format!(
                "start the network that creates {bridge} (libvirt: virsh net-start NETWORK), or \
                 give the right name"
            ),
        });
        return Ok(None);
    };
    if link_kind(link).as_deref() != Some("bridge") {
        report.findings.push(Finding {
            kind: "not_a_bridge",
            cause: format!("{bridge} is not a bridge"),
            evidence: vec![format!(
                "its kind is {}",
                link_kind(link).unwrap_or_else(|| "none".into())
            )],
            fix: "give the name of the bridge the VMs' taps are attached to".into(),
        });
        return Ok(None);
    }
    let flags = link["flags"].to_string();
    let up = flags.contains("\"UP\"");
    let carrier = flags.contains("LOWER_UP");
    let stp = link["linkinfo"]["info_data"]["stp_state"]
        .as_u64()
        .unwrap_or(0);
    let ports: Vec<(String, String)> = links
        .iter()
        .filter(|l| l["master"] == bridge)
        .map(|l| {
            (
                l["ifname"].as_str().unwrap_or("?").to_owned(),
                l["linkinfo"]["info_slave_data"]["state"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
            )
        })
        .collect();
    let addrs = ip_json(&["-4", "addr", "show", "dev", bridge])?;
    let subnet = addrs
        .first()
        .and_then(|a| a["addr_info"].as_array())
        .and_then(|infos| {
            infos.iter().find_map(|i| {
                Some(Subnet {
                    addr: i["local"].as_str()?.parse().ok()?,
                    prefix: u8::try_from(i["prefixlen"].as_u64()?).ok()?,
                })
            })
        });
    let port_list: Vec<String> = ports.iter().map(|(p, s)| format!("{p} {s}")).collect();
    report.summary = format!(
        "{bridge}: {}, carrier {}, STP {}, {} port(s){}; {}",
        if up { "up" } else { "DOWN" },
        if carrier { "yes" } else { "NO" },
        match stp {
            0 => "off",
            1 => "kernel",
            _ => "user",
        },
        ports.len(),
        if port_list.is_empty() {
            String::new()
        } else {
            format!(" ({})", port_list.join(", "))
        },
        subnet.map_or_else(
            || "no IPv4 address".to_owned(),
            |s| format!("address {}/{}", s.addr, s.prefix)
        )
    );
    if !up {
        report.findings.push(Finding {
            kind: "bridge_down",
            cause: format!("{bridge} is administratively down"),
            evidence: vec![format!("flags {flags}")],
            fix: format!("ip link set {bridge} up (bridge-guard run keeps it up)"),
        });
    } else if !carrier {
        report.findings.push(Finding {
            kind: "bridge_no_carrier",
            cause: format!("{bridge} has no carrier: none of its ports forwards"),
            evidence: vec![format!("flags {flags}")],
            fix: "see the ports below; `bridge-guard run` forces them to forwarding".into(),
        });
    }
    for (port, state) in ports.iter().filter(|(_, s)| s != "forwarding") {
        report.findings.push(Finding {
            kind: "port_not_forwarding",
            cause: format!("{port} on {bridge} is {state}, not forwarding"),
            evidence: vec![format!("`bridge link show dev {port}`: state {state}")],
            fix: if stp == 0 {
                format!("bridge link set dev {port} state 3 (bridge-guard run does this at once)")
            } else {
                format!(
                    "ip link set {bridge} type bridge stp_state 0, then force {port} to \
                     forwarding (bridge-guard run does both)"
                )
            },
        });
    }
    Ok(subnet)
}

/// Checks `bridge` and the path its VMs' traffic takes, in this network namespace.
pub fn check(bridge: &str) -> Result<Report, ToolError> {
    let mut report = Report {
        bridge: bridge.to_owned(),
        ..Report::default()
    };
    let subnet = bridge_itself(bridge, &mut report)?;
    if report.summary.is_empty() {
        // No such bridge: nothing beyond it to check.
        return Ok(report);
    }
    let Some(subnet) = subnet else {
        report.skipped.push(format!(
            "{bridge} has no IPv4 address: this host does not route its VMs, so the routing, \
             firewall, rp_filter, forwarding and DHCP/DNS checks do not apply"
        ));
        return Ok(report);
    };
    let uplink = routing::check(bridge, subnet, &mut report)?;
    firewall::check(bridge, uplink.as_deref(), &mut report);
    services::check(bridge, subnet, &mut report);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_addresses_avoid_the_bridges_own() {
        let s = |a: &str, p| Subnet {
            addr: a.parse().expect("addr"),
            prefix: p,
        };
        assert_eq!(
            s("192.168.122.1", 24).vm_addr(),
            Ipv4Addr::new(192, 168, 122, 2)
        );
        assert_eq!(
            s("198.18.0.254", 24).vm_addr(),
            Ipv4Addr::new(198, 18, 0, 1)
        );
        assert_eq!(s("10.1.2.3", 16).to_string(), "10.1.0.0/16");
    }
}
