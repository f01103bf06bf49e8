//! `bridge-guard doctor --path` in namespace labs that reproduce each thing that stops VM
//! traffic beyond layer 2: a VPN's default route, nftables and iptables drops, strict
//! rp_filter, forwarding off, no DHCP/DNS server. A healthy lab reports nothing.

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use integration_tests::{NetNs, PREFIX, agent_bin, apt, skip_unless_root};
use serde_json::Value;

/// A host namespace with bridge br0 (198.18.0.254/24, STP off) and one VM on it, an uplink to
/// an "ISP" namespace that holds the default gateway, forwarding on, loose rp_filter, and
/// optionally dnsmasq serving DHCP and DNS on br0.
struct PathLab {
    host: NetNs,
    _vm: NetNs,
    _isp: NetNs,
    dnsmasq: Option<Child>,
}

impl Drop for PathLab {
    fn drop(&mut self) {
        if let Some(d) = &mut self.dnsmasq {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl PathLab {
    fn new(tag: &str, dnsmasq: bool) -> Result<Self> {
        let host = NetNs::new(PREFIX, tag)?;
        let vm = NetNs::new(PREFIX, &format!("{tag}vm"))?;
        let isp = NetNs::new(PREFIX, &format!("{tag}isp"))?;
        host.ip_batch(&[
            "link add br0 type bridge stp_state 0".into(),
            "link set br0 up".into(),
            "addr add 198.18.0.254/24 dev br0".into(),
            format!("link add vnet0 type veth peer name eth0 netns {}", vm.name),
            "link set vnet0 master br0".into(),
            "link set vnet0 up".into(),
            format!(
                "link add uplink0 type veth peer name wan0 netns {}",
                isp.name
            ),
            "link set uplink0 up".into(),
            "addr add 198.19.0.2/24 dev uplink0".into(),
            "route add default via 198.19.0.1".into(),
        ])?;
        vm.ip_batch(&[
            "addr add 198.18.0.1/24 dev eth0".into(),
            "link set eth0 up".into(),
            "route add default via 198.18.0.254".into(),
        ])?;
        isp.ip_batch(&[
            "addr add 198.19.0.1/24 dev wan0".into(),
            "link set wan0 up".into(),
        ])?;
        let lab = Self {
            host,
            _vm: vm,
            _isp: isp,
            dnsmasq: None,
        };
        lab.sysctl("net.ipv4.ip_forward=1")?;
        lab.sysctl("net.ipv4.conf.all.rp_filter=2")?;
        lab.sysctl("net.ipv4.conf.br0.rp_filter=2")?;
        if dnsmasq {
            return lab.with_dnsmasq();
        }
        Ok(lab)
    }

    fn sysctl(&self, assignment: &str) -> Result<()> {
        netlab::run(self.host.command("sysctl").args(["-qw", assignment])).map(drop)
    }

    fn sh(&self, program: &str, args: &[&str]) -> Result<()> {
        netlab::run(self.host.command(program).args(args)).map(drop)
    }

    /// dnsmasq on br0, as libvirt runs it; waits for its start-up line (it binds its sockets
    /// before it logs, as root, so they exist by then).
    fn with_dnsmasq(mut self) -> Result<Self> {
        let bin = apt::ensure("dnsmasq", "dnsmasq-base")?;
        let leases = std::env::temp_dir().join(format!("{}.leases", self.host.name));
        let mut child = self
            .host
            .command(bin)
            .args([
                "--keep-in-foreground",
                "--log-facility=-",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--pid-file",
                "--bind-interfaces",
                "--interface=br0",
                "--except-interface=lo",
                "--listen-address=198.18.0.254",
                "--dhcp-range=198.18.0.10,198.18.0.100,12h",
            ])
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dnsmasq")?;
        let stderr = child.stderr.take().context("no stderr")?;
        self.dnsmasq = Some(child);
        let (tx, rx) = mpsc::channel();
        netlab::read_lines(stderr, move |line| tx.send(line).is_ok());
        let mut seen = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .with_context(|| format!("dnsmasq did not start: {seen:?}"))?;
            if line.contains("DHCP, IP range") {
                return Ok(self);
            }
            seen.push(line);
        }
    }

    /// A VPN's tunnel device, up, with an address.
    fn tun(&self) -> Result<()> {
        self.host.ip_batch(&[
            "tuntap add dev tun0 mode tun".into(),
            "link set tun0 up".into(),
            "addr add 198.18.9.2/24 dev tun0".into(),
        ])
    }

    /// `doctor --path br0 -j` in the lab: (exit code, the finding kinds, the report).
    fn doctor(&self) -> Result<(i32, BTreeSet<String>, Value)> {
        let out = self
            .host
            .command(agent_bin())
            .args(["doctor", "--path", "br0", "-j"])
            .output()?;
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "doctor printed no JSON: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let kinds = report["findings"]
            .as_array()
            .context("no findings list")?
            .iter()
            .filter_map(|f| f["kind"].as_str().map(str::to_owned))
            .collect();
        Ok((out.status.code().unwrap_or(-1), kinds, report))
    }

    /// Runs doctor and checks it found exactly `kinds`, each with evidence and a fix.
    fn expect(&self, kinds: &[&str]) -> Result<Value> {
        let (code, found, report) = self.doctor()?;
        let want: BTreeSet<String> = kinds.iter().map(|k| (*k).to_owned()).collect();
        ensure!(
            found == want,
            "found {found:?}, expected {want:?}:\n{report:#}"
        );
        ensure!(
            code == i32::from(!kinds.is_empty()),
            "exit {code} with {} findings",
            kinds.len()
        );
        for f in report["findings"].as_array().into_iter().flatten() {
            ensure!(
                f["evidence"].as_array().is_some_and(|e| !e.is_empty())
                    && f["fix"].as_str().is_some_and(|s| !s.is_empty()),
                "a finding without evidence or fix: {f:#}"
            );
        }
        Ok(report)
    }
}

fn skip(test: &str) -> bool {
    skip_unless_root(test)
}

#[test]
fn a_healthy_lab_reports_nothing() -> Result<()> {
    if skip("a_healthy_lab_reports_nothing") {
        return Ok(());
    }
    let lab = PathLab::new("pathok", true)?;
    let report = lab.expect(&[])?;
    let summary = report["summary"].as_str().unwrap_or("");
    ensure!(
        summary.contains("br0: up") && summary.contains("vnet0 forwarding"),
        "{report:#}"
    );
    // The text report says so too.
    let out = lab
        .host
        .command(agent_bin())
        .args(["doctor", "--path", "br0", "--color=never"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("nothing found"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_vpn_taking_the_default_route_is_named() -> Result<()> {
    if skip("a_vpn_taking_the_default_route_is_named") {
        return Ok(());
    }
    let lab = PathLab::new("pathvpn", true)?;
    lab.tun()?;
    lab.host.ip("route replace default dev tun0")?;
    let report = lab.expect(&["vpn_default_route"])?;
    ensure!(
        report.to_string().contains("tun0 is a tun device"),
        "{report:#}"
    );
    Ok(())
}

#[test]
fn an_nftables_kill_switch_is_named() -> Result<()> {
    if skip("an_nftables_kill_switch_is_named") {
        return Ok(());
    }
    let nft = apt::ensure("nft", "nftables")?;
    let lab = PathLab::new("pathnft", true)?;
    let mut child = lab
        .host
        .command(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(
            b"table inet killswitch {\n chain forward_filter {\n  type filter hook forward priority 0; policy drop;\n  oifname \"tun0\" accept\n }\n}\n",
        )?;
    ensure!(child.wait()?.success(), "nft -f failed");
    let report = lab.expect(&["firewall_drop"])?;
    ensure!(report.to_string().contains("policy is drop"), "{report:#}");
    Ok(())
}

#[test]
fn an_iptables_drop_is_named() -> Result<()> {
    if skip("an_iptables_drop_is_named") {
        return Ok(());
    }
    apt::ensure("iptables", "iptables")?;
    let lab = PathLab::new("pathipt", true)?;
    lab.sh(
        "iptables",
        &[
            "-A", "FORWARD", "-i", "br0", "!", "-o", "tun0", "-j", "DROP",
        ],
    )?;
    lab.expect(&["firewall_drop"])?;
    Ok(())
}

#[test]
fn strict_rp_filter_with_a_captured_route_is_named() -> Result<()> {
    if skip("strict_rp_filter_with_a_captured_route_is_named") {
        return Ok(());
    }
    let lab = PathLab::new("pathrp", true)?;
    lab.tun()?;
    // A VPN pushing a route that covers part of the VMs' subnet.
    lab.host.ip("route add 198.18.0.0/25 dev tun0")?;
    lab.sysctl("net.ipv4.conf.all.rp_filter=1")?;
    lab.sysctl("net.ipv4.conf.br0.rp_filter=1")?;
    lab.expect(&["rp_filter", "vm_route_captured"])?;
    // Loose, the same routes are only the captured route.
    lab.sysctl("net.ipv4.conf.all.rp_filter=2")?;
    lab.sysctl("net.ipv4.conf.br0.rp_filter=2")?;
    lab.expect(&["vm_route_captured"])?;
    Ok(())
}

#[test]
fn forwarding_off_is_named() -> Result<()> {
    if skip("forwarding_off_is_named") {
        return Ok(());
    }
    let lab = PathLab::new("pathfwd", true)?;
    lab.sysctl("net.ipv4.ip_forward=0")?;
    lab.expect(&["ip_forward"])?;
    Ok(())
}

#[test]
fn no_dhcp_or_dns_server_on_the_bridge_is_named() -> Result<()> {
    if skip("no_dhcp_or_dns_server_on_the_bridge_is_named") {
        return Ok(());
    }
    let lab = PathLab::new("pathdns", false)?;
    let report = lab.expect(&["dhcp_dns"])?;
    ensure!(report.to_string().contains("DHCP (udp 67)"), "{report:#}");
    Ok(())
}

#[test]
fn a_missing_bridge_and_a_stuck_port_are_named_first() -> Result<()> {
    if skip("a_missing_bridge_and_a_stuck_port_are_named_first") {
        return Ok(());
    }
    let lab = PathLab::new("pathl2", true)?;
    let out = lab
        .host
        .command(agent_bin())
        .args(["doctor", "--path", "nosuchbr", "-j"])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["findings"][0]["kind"] == "bridge_missing", "{v:#}");
    lab.sh("bridge", &["link", "set", "dev", "vnet0", "state", "1"])?;
    lab.expect(&["port_not_forwarding", "bridge_no_carrier"])
        .or_else(|_| lab.expect(&["port_not_forwarding"]))?;
    Ok(())
}

#[test]
fn doctor_path_changes_nothing() -> Result<()> {
    if skip("doctor_path_changes_nothing") {
        return Ok(());
    }
    let lab = PathLab::new("pathro", true)?;
    let snapshot = |lab: &PathLab| -> Result<String> {
        // Brief forms without the operational state: the detailed one shows the bridge's
        // timers, which tick, and operstate lags carrier by up to a second (linkwatch).
        let mut s: String = lab
            .host
            .ip("-br link show")?
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split_whitespace().collect();
                if f.len() > 1 {
                    f.remove(1);
                }
                f.join(" ") + "\n"
            })
            .collect();
        s += &netlab::run(lab.host.command("bridge").args(["link", "show"]))?;
        s += &lab.host.ip("route show table all")?;
        s += &lab.host.ip("rule show")?;
        s += &netlab::run(
            lab.host
                .command("sysctl")
                .args(["net.ipv4.ip_forward", "net.ipv4.conf.br0.rp_filter"]),
        )?;
        Ok(s)
    };
    let before = snapshot(&lab)?;
    lab.doctor()?;
    let after = snapshot(&lab)?;
    ensure!(
        after == before,
        "doctor --path changed the lab:\n{before}\n---\n{after}"
    );
    Ok(())
}
