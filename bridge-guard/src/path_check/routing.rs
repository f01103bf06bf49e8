//! Routing: is forwarding on, does the VMs' traffic leave through a VPN, do replies come back
//! through the bridge, and would strict reverse-path filtering drop them.

use serde_json::Value;

use super::{
    Finding, Report, Subnet,
    tools::{ToolError, ip_json, ipv4_sysctl, link_kind},
};

/// A destination on the internet for route lookups: TEST-NET-3 (RFC 5737). Only looked up,
/// never sent to.
const INTERNET: &str = "203.0.113.1";

/// Link kinds that are VPN tunnels.
const VPN_KINDS: &[&str] = &[
    "tun",
    "wireguard",
    "amneziawg",
    "ovpn-dco",
    "xfrm",
    "vti",
    "vti6",
    "ipip",
    "ip6tnl",
    "gre",
    "ip6gre",
    "sit",
];

/// Why `dev` looks like a VPN device, if it does.
fn vpn_device(dev: &str) -> Result<Option<String>, ToolError> {
    let links = ip_json(&["-d", "link", "show", "dev", dev])?;
    let Some(link) = links.first() else {
        return Ok(None);
    };
    if let Some(kind) = link_kind(link).filter(|k| VPN_KINDS.contains(&k.as_str())) {
        return Ok(Some(format!("{dev} is a {kind} device")));
    }
    if link["link_type"] == "ppp" {
        return Ok(Some(format!("{dev} is a PPP link")));
    }
    Ok(None)
}

/// `ip route get ARGS`: the route, or the kernel's reason for having none.
fn route_get(args: &[&str]) -> Result<Result<Value, String>, ToolError> {
    let mut all = vec!["route", "get"];
    all.extend_from_slice(args);
    match ip_json(&all) {
        Ok(routes) => Ok(routes
            .into_iter()
            .next()
            .ok_or_else(|| "no route".to_owned())),
        Err(ToolError::Failed { stderr, .. }) => Ok(Err(stderr)),
        Err(e) => Err(e),
    }
}

fn describe(route: &Value) -> String {
    let mut s = format!("dev {}", route["dev"].as_str().unwrap_or("?"));
    if let Some(gw) = route["gateway"].as_str() {
        s = format!("via {gw} {s}");
    }
    s
}

/// Adds the routing findings; the device VM traffic leaves through, if any.
pub fn check(
    bridge: &str,
    subnet: Subnet,
    report: &mut Report,
) -> Result<Option<String>, ToolError> {
    let vm = subnet.vm_addr().to_string();
    let net = subnet.to_string();

    let all = ipv4_sysctl("ip_forward");
    let dev = ipv4_sysctl(&format!("conf/{bridge}/forwarding"));
    if all == Some(0) || dev == Some(0) {
        report.findings.push(Finding {
            kind: "ip_forward",
            cause: format!("IPv4 forwarding is off: nothing from {net} is routed on"),
            evidence: vec![
                format!("net.ipv4.ip_forward = {}", all.unwrap_or(0)),
                format!(
                    "net.ipv4.conf.{bridge}.forwarding = {}",
                    dev.map_or_else(|| "?".into(), |v| v.to_string())
                ),
            ],
            fix: "sysctl -w net.ipv4.ip_forward=1, and keep it in /etc/sysctl.d/ (libvirt turns \
                  it on when it starts a NAT network: something turned it off since)"
                .into(),
        });
    }

    // As the kernel would route a VM's packet to the internet, policy rules included.
    let from_vm = ["from", vm.as_str(), "iif", bridge];
    let mut args = vec![INTERNET];
    args.extend_from_slice(&from_vm);
    let forwarded = route_get(&args)?;
    let rp_refused = forwarded
        .as_ref()
        .err()
        .filter(|e| e.contains("cross-device"))
        .cloned();
    let out = match &forwarded {
        Ok(r) => Ok(r.clone()),
        // Forwarding off or reverse-path refused: the plain lookup still says where it goes.
        Err(_) => route_get(&[INTERNET])?,
    };
    let uplink = match &out {
        Ok(route) => route["dev"].as_str().map(str::to_owned),
        Err(why) => {
            report.findings.push(Finding {
                kind: "no_route",
                cause: format!("VMs on {net} have no route to the internet"),
                evidence: vec![format!("ip route get {INTERNET}: {why}")],
                fix: "check the host's default route (ip route show default)".into(),
            });
            None
        }
    };
    if let (Ok(route), Some(dev)) = (&out, &uplink) {
        if let Some(why) = vpn_device(dev)? {
            report.findings.push(Finding {
                kind: "vpn_default_route",
                cause: format!("the VMs' traffic to the internet goes through {dev}, a VPN"),
                evidence: vec![
                    format!(
                        "ip route get {INTERNET} from {vm} iif {bridge}: {}",
                        describe(route)
                    ),
                    why,
                ],
                fix: format!(
                    "exclude {net} from the VPN (split tunnelling, or the client's \"allow local \
                     network\" option); or route it around the VPN: ip rule add from {net} \
                     lookup 100, with the physical uplink's default route in table 100"
                ),
            });
        }
    }

    // Replies to the VMs must leave through the bridge.
    let back = route_get(&[vm.as_str()])?;
    let back_dev = back
        .as_ref()
        .ok()
        .and_then(|r| r["dev"].as_str().map(str::to_owned));
    let misrouted = back_dev.as_deref().is_some_and(|d| d != bridge);
    if let (true, Ok(route)) = (misrouted, &back) {
        report.findings.push(Finding {
            kind: "vm_route_captured",
            cause: format!(
                "traffic to the VMs on {net} leaves through {}, not {bridge}",
                back_dev.as_deref().unwrap_or("?")
            ),
            evidence: vec![format!("ip route get {vm}: {}", describe(route))],
            fix: format!(
                "remove the route that covers {net} (ip route show match {vm}), or exclude \
                 {net} from the VPN"
            ),
        });
    }

    let strict = |v: Option<u64>| v == Some(1);
    let rp_all = ipv4_sysctl("conf/all/rp_filter");
    let rp_dev = ipv4_sysctl(&format!("conf/{bridge}/rp_filter"));
    // The kernel applies the larger of the two; 1 is strict, 2 loose.
    let effective = rp_all.max(rp_dev);
    if strict(effective) && (misrouted || rp_refused.is_some()) {
        let mut evidence = vec![format!(
            "net.ipv4.conf.all.rp_filter = {}, net.ipv4.conf.{bridge}.rp_filter = {}",
            rp_all.unwrap_or(0),
            rp_dev.unwrap_or(0)
        )];
        if let Some(e) = &rp_refused {
            evidence.push(format!(
                "ip route get {INTERNET} from {vm} iif {bridge}: {e}"
            ));
        }
        if let Some(d) = back_dev.as_deref().filter(|_| misrouted) {
            evidence.push(format!(
                "the route back to {vm} is via {d}, so packets from {vm} arriving on {bridge} \
                 fail the strict check"
            ));
        }
        report.findings.push(Finding {
            kind: "rp_filter",
            cause: format!("strict reverse-path filtering drops the VMs' packets on {bridge}"),
            evidence,
            fix: format!(
                "sysctl -w net.ipv4.conf.{bridge}.rp_filter=2 (loose), and keep it in \
                 /etc/sysctl.d/"
            ),
        });
    }
    Ok(uplink)
}
