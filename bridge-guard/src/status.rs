//! The agent's published state, written atomically to `<state dir>/status.json` whenever it
//! changes and at least every heartbeat, and read back by `bridge-guard status`.
//!
//! The file is 0644 and holds nothing secret (names, states, counts), so `status` works for
//! any user. Whether the agent still runs is judged by the file's timestamp against the
//! heartbeat it was written with, not by its pid: another user, or another pid namespace,
//! may not see the agent's process.

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

pub use crate::sys::color::Style;

pub const FILE: &str = "status.json";

/// A state file older than this many heartbeats was left by an agent that is not running.
pub const STALE_HEARTBEATS: u64 = 3;

fn default_heartbeat() -> u64 {
    5
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pid: u32,
    pub updated_unix_ns: u64,
    /// The agent rewrites the file at least this often (seconds).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    pub hooks: String,
    pub observe: bool,
    pub bridges: Vec<BridgeStatus>,
    /// How many entries the agent keeps in each of its tables (memory checks).
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BridgeStatus {
    pub name: String,
    pub present: bool,
    pub admin_up: bool,
    pub carrier: bool,
    /// `off`, `kernel`, `user`, or empty when unknown.
    pub stp: String,
    pub refusals: Vec<String>,
    pub repairs: u64,
    pub ports: Vec<PortStatus>,
    /// Repairs someone keeps undoing.
    #[serde(default)]
    pub fights: Vec<FightStatus>,
}

/// A repair that keeps being undone, and by whom.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FightStatus {
    /// The repair's kind (`stp_off`, `reattach`, `force_forwarding`, `bridge_up`).
    pub action: String,
    /// Who undid it last, e.g. `NetworkManager[812]`, where eBPF knows it.
    pub actor: Option<String>,
    /// How many times it was undone.
    pub count: u64,
    pub last_unix_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PortStatus {
    pub name: String,
    pub state: String,
    pub since_unix_ns: u64,
    /// `kernel` (eBPF timestamp) or `netlink` (receive time).
    pub clock: String,
    /// Who made the last change, where known.
    pub actor: Option<String>,
    /// Duration of the last completed episode of not forwarding, in nanoseconds.
    pub last_outage_ns: Option<u64>,
    /// Time in each state during that episode, in nanoseconds.
    #[serde(default)]
    pub last_episode: Option<std::collections::BTreeMap<String, u64>>,
    /// Time in each state since the agent started, in nanoseconds.
    #[serde(default)]
    pub time_in_ns: std::collections::BTreeMap<String, u64>,
}

/// What `bridge-guard status` concludes about the guarded bridges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every guarded bridge exists, is up with carrier, and every port forwards.
    Healthy,
    /// A guarded bridge is missing, down, without carrier, or has a port not forwarding.
    Unhealthy,
    /// The agent refuses to repair a bridge (a loop or an owner it could fight).
    Refused,
    /// No agent state, or a state file older than [`STALE_HEARTBEATS`] heartbeats.
    NotRunning,
}

impl Verdict {
    /// The exit code `status` ends with (documented in its `--help` and the README).
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Healthy => 0,
            Self::Unhealthy => 1,
            Self::NotRunning => 3,
            Self::Refused => 4,
        }
    }
}

impl BridgeStatus {
    /// What is wrong with the bridge now, one line each; empty when healthy.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.present {
            out.push(format!("{} does not exist", self.name));
            return out;
        }
        if !self.admin_up {
            out.push(format!("{} is administratively down", self.name));
        }
        if !self.carrier {
            out.push(format!(
                "{} has no carrier: none of its ports forwards",
                self.name
            ));
        }
        for p in &self.ports {
            if p.state != "forwarding" {
                out.push(format!("{} is {}, not forwarding", p.name, p.state));
            }
        }
        out
    }
}

/// The change that stops `actor` undoing `action` on `bridge` for good.
pub fn lasting_fix(actor: Option<&str>, action: &str, bridge: &str) -> String {
    // eBPF names tasks by their 15-character `comm`: "systemd-network" is systemd-networkd.
    let comm = actor.map(|a| a.split('[').next().unwrap_or(a));
    let stp = action == "stp_off";
    match comm {
        Some(c) if c.starts_with("NetworkManager") || c == "nmcli" => {
            if stp {
                format!(
                    "nmcli connection modify {bridge} bridge.stp no (the profile that owns                      {bridge}: nmcli -g GENERAL.CONNECTION device show {bridge}), then                      nmcli connection up {bridge}"
                )
            } else {
                format!(
                    "let NetworkManager leave {bridge} alone: nmcli device set {bridge} managed no"
                )
            }
        }
        Some(c) if c.starts_with("libvirtd") || c.starts_with("virtnetworkd") || c == "virsh" => {
            format!(
                "in the libvirt network that owns {bridge} (virsh net-edit NETWORK), write                  <bridge name='{bridge}' stp='off' delay='0'/>, then virsh net-destroy and                  net-start it"
            )
        }
        Some(c) if c.starts_with("systemd-network") || c == "networkctl" => format!(
            "put STP=no under [Bridge] in the .netdev that creates {bridge}, then networkctl              reload"
        ),
        Some(c) => format!(
            "find out why {c} changes {bridge} ({action} keeps being undone) and stop it there;              bridge-guard repairs it each time meanwhile"
        ),
        None => format!(
            "{action} keeps being undone by a process eBPF could not name (netlink only):              `bridge-guard watch --bridge {bridge}` on a kernel with eBPF names it"
        ),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no agent state in {dir}: is `bridge-guard run` running (with the same --state-dir)?")]
    Missing { dir: String },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an agent state file")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Status {
    /// Writes the state file (0644: `status` is for every user).
    pub fn write(&self, dir: &Path) -> Result<(), StatusError> {
        let path = dir.join(FILE);
        let err = |source| StatusError::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::sys::fs::write_atomically(&path, &text).map_err(err)
    }

    pub fn read(dir: &Path) -> Result<Self, StatusError> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StatusError::Missing {
                    dir: dir.display().to_string(),
                }
            } else {
                StatusError::Read {
                    path: path.display().to_string(),
                    source,
                }
            }
        })?;
        serde_json::from_str(&text).map_err(|source| StatusError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Whether the file is older than [`STALE_HEARTBEATS`] heartbeats: its agent stopped.
    pub fn stale(&self, now_unix_ns: u64) -> bool {
        let limit = STALE_HEARTBEATS * self.heartbeat_secs.max(1) * 1_000_000_000;
        now_unix_ns.saturating_sub(self.updated_unix_ns) > limit
    }

    /// What `status` concludes, and so its exit code.
    pub fn verdict(&self, now_unix_ns: u64) -> Verdict {
        if self.stale(now_unix_ns) {
            Verdict::NotRunning
        } else if self.bridges.iter().any(|b| !b.refusals.is_empty()) {
            Verdict::Refused
        } else if self.bridges.iter().any(|b| !b.problems().is_empty()) {
            Verdict::Unhealthy
        } else {
            Verdict::Healthy
        }
    }

    /// The human-readable report `bridge-guard status` prints.
    pub fn render(&self, now_unix_ns: u64, style: &Style) -> String {
        let ago = |t: u64| format_duration(now_unix_ns.saturating_sub(t));
        let mut out = String::new();
        let alive = if self.stale(now_unix_ns) {
            style.bad(&format!(
                "NOT running: its state was last written {} ago",
                ago(self.updated_unix_ns)
            ))
        } else {
            style.good("running")
        };
        let _ = writeln!(
            out,
            "agent pid {} {alive}; hooks: {}{}",
            self.pid,
            self.hooks,
            if self.observe { "; observe-only" } else { "" }
        );
        for b in &self.bridges {
            let problems = b.problems();
            let health = if !b.refusals.is_empty() {
                style.bad("REFUSED")
            } else if problems.is_empty() {
                style.good("healthy")
            } else {
                style.bad("NOT healthy")
            };
            if !b.present {
                let _ = writeln!(out, "\n{}: {health}: not present", b.name);
                continue;
            }
            let _ = writeln!(
                out,
                "\n{}: {health}; {}, carrier {}, stp {}, {} repairs",
                b.name,
                if b.admin_up { "up" } else { "DOWN" },
                if b.carrier { "yes" } else { "NO" },
                if b.stp.is_empty() { "?" } else { &b.stp },
                b.repairs
            );
            for p in &problems {
                let _ = writeln!(out, "  {} {p}", style.bad("!"));
            }
            for r in &b.refusals {
                let _ = writeln!(out, "  refused: {r}");
            }
            for f in &b.fights {
                let who = f.actor.as_deref().unwrap_or("someone (unknown)");
                let _ = writeln!(
                    out,
                    "  fight: {who} undid {} {} times (last {} ago)",
                    f.action,
                    f.count,
                    ago(f.last_unix_ns)
                );
                let _ = writeln!(
                    out,
                    "    lasting fix: {}",
                    lasting_fix(f.actor.as_deref(), &f.action, &b.name)
                );
            }
            let _ = writeln!(
                out,
                "  {:<16} {:<11} {:>12}  {:<8} {:<14} last outage",
                "port", "state", "for", "clock", "by"
            );
            for p in &b.ports {
                let _ = writeln!(
                    out,
                    "  {:<16} {} {:>12}  {:<8} {:<14} {}",
                    p.name,
                    // Padded before it is painted: escape codes have no width.
                    if p.state == "forwarding" {
                        format!("{:<11}", p.state)
                    } else {
                        style.bad(&format!("{:<11}", p.state))
                    },
                    ago(p.since_unix_ns),
                    p.clock,
                    p.actor.as_deref().unwrap_or("-"),
                    p.last_outage_ns
                        .map_or_else(|| "-".to_owned(), format_duration)
                );
                if let Some(ep) = &p.last_episode {
                    let parts: Vec<String> = ep
                        .iter()
                        .map(|(s, ns)| format!("{s} {}", format_duration(*ns)))
                        .collect();
                    let _ = writeln!(out, "  {:<16} last outage: {}", "", parts.join(", "));
                }
            }
        }
        out
    }
}

/// `1.234 s`, `12.3 ms`, `45 µs`.
pub fn format_duration(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let f = ns as f64;
    if ns >= 1_000_000_000 {
        format!("{:.3} s", f / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.1} ms", f / 1e6)
    } else {
        format!("{} µs", ns / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_renders() {
        let dir = std::env::temp_dir().join(format!("bg-status-{}", std::process::id()));
        let status = Status {
            pid: std::process::id(),
            updated_unix_ns: 10,
            heartbeat_secs: 5,
            hooks: "port-state=tracepoint".into(),
            observe: false,
            tables: [("model.links".to_owned(), 3)].into(),
            bridges: vec![BridgeStatus {
                name: "br0".into(),
                present: true,
                admin_up: true,
                carrier: true,
                stp: "off".into(),
                refusals: vec!["vnet1 moved to br1: not pulling it back".into()],
                repairs: 2,
                ports: vec![PortStatus {
                    name: "vnet0".into(),
                    state: "forwarding".into(),
                    since_unix_ns: 1_000_000_000,
                    clock: "kernel".into(),
                    actor: Some("ip[42]".into()),
                    last_outage_ns: Some(850_000),
                    last_episode: Some([("listening".to_owned(), 850_000)].into()),
                    time_in_ns: [("forwarding".to_owned(), 2_500_000_000)].into(),
                }],
                fights: vec![FightStatus {
                    action: "stp_off".into(),
                    actor: Some("NetworkManager[812]".into()),
                    count: 7,
                    last_unix_ns: 3_000_000_000,
                }],
            }],
        };
        status.write(&dir).expect("writes");
        assert_eq!(Status::read(&dir).expect("reads"), status);
        let text = status.render(3_500_000_000, &Style::default());
        assert!(text.contains("running"), "{text}");
        assert!(
            text.contains("NetworkManager[812] undid stp_off 7 times"),
            "{text}"
        );
        assert!(
            text.contains("nmcli connection modify br0 bridge.stp no"),
            "{text}"
        );
        assert_eq!(
            status.verdict(3_500_000_000),
            Verdict::Refused,
            "it has a refusal"
        );
        assert!(text.contains("refused: vnet1 moved to br1"), "{text}");
        let row = text
            .lines()
            .find(|l| l.contains("vnet0"))
            .expect("port row");
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cols[..6],
            ["vnet0", "forwarding", "2.500", "s", "kernel", "ip[42]"],
            "{text}"
        );
        assert!(text.contains("850 µs"), "{text}");
        assert!(text.contains("last outage: listening 850 µs"), "{text}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(matches!(
            Status::read(&dir),
            Err(StatusError::Missing { .. })
        ));
    }

    fn bridge(name: &str, ports: &[(&str, &str)]) -> BridgeStatus {
        BridgeStatus {
            name: name.into(),
            present: true,
            admin_up: true,
            carrier: true,
            stp: "off".into(),
            refusals: vec![],
            repairs: 0,
            ports: ports
                .iter()
                .map(|(p, state)| PortStatus {
                    name: (*p).into(),
                    state: (*state).into(),
                    since_unix_ns: 0,
                    clock: "netlink".into(),
                    actor: None,
                    last_outage_ns: None,
                    last_episode: None,
                    time_in_ns: Default::default(),
                })
                .collect(),
            fights: vec![],
        }
    }

    #[test]
    fn the_verdict_follows_health_refusals_and_the_heartbeat() {
        const S: u64 = 1_000_000_000;
        let mut st = Status {
            pid: 1,
            updated_unix_ns: 100 * S,
            heartbeat_secs: 5,
            hooks: String::new(),
            observe: false,
            bridges: vec![bridge("br0", &[("vnet0", "forwarding")])],
            tables: Default::default(),
        };
        assert_eq!(st.verdict(101 * S), Verdict::Healthy);
        assert_eq!(
            st.verdict(115 * S),
            Verdict::Healthy,
            "3 heartbeats is not stale yet"
        );
        assert_eq!(st.verdict(116 * S), Verdict::NotRunning);
        st.bridges.push(bridge("br1", &[("vnet1", "listening")]));
        assert_eq!(st.verdict(101 * S), Verdict::Unhealthy);
        assert_eq!(
            st.bridges[1].problems(),
            ["vnet1 is listening, not forwarding"]
        );
        st.bridges[0].refusals.push("eth0 is a physical NIC".into());
        assert_eq!(st.verdict(101 * S), Verdict::Refused);
        st.bridges[0].present = false;
        assert_eq!(st.bridges[0].problems(), ["br0 does not exist"]);
        let codes: Vec<u8> = [
            Verdict::Healthy,
            Verdict::Unhealthy,
            Verdict::NotRunning,
            Verdict::Refused,
        ]
        .map(Verdict::exit_code)
        .into();
        assert_eq!(codes, [0, 1, 3, 4]);
        // A file written by an agent that predates the heartbeat field: the default applies.
        let old: Status = serde_json::from_str(
            r#"{"pid":1,"updated_unix_ns":0,"hooks":"","observe":false,"bridges":[]}"#,
        )
        .expect("old files parse");
        assert_eq!(old.heartbeat_secs, 5);
    }

    #[test]
    fn lasting_fixes_name_the_owner_s_own_setting() {
        let fix = |actor| lasting_fix(actor, "stp_off", "virbr0");
        assert!(
            fix(Some("NetworkManager[812]"))
                .starts_with("nmcli connection modify virbr0 bridge.stp no")
        );
        assert!(
            fix(Some("libvirtd[1200]")).contains("<bridge name='virbr0' stp='off' delay='0'/>")
        );
        assert!(fix(Some("systemd-network[300]")).contains("STP=no"));
        assert!(fix(Some("brctl[9]")).contains("brctl"));
        assert!(fix(None).contains("could not name"));
        assert!(lasting_fix(Some("NetworkManager[1]"), "reattach", "br0").contains("managed no"));
    }
}
