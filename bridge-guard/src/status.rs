//! The agent's published state, written atomically to `<state dir>/status.json` whenever it
//! changes, and read back by `bridge-guard status`.

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

pub const FILE: &str = "status.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pid: u32,
    pub updated_unix_ns: u64,
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
    /// Repairs something keeps undoing, while it lasts.
    #[serde(default)]
    pub fights: Vec<FightStatus>,
}

/// A repair something keeps undoing (a fight), as `status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FightStatus {
    /// What keeps being repaired, e.g. `turn STP off on virbr0`.
    pub action: String,
    /// Who undid it last, where eBPF knows (e.g. `NetworkManager[812]`).
    pub actor: Option<String>,
    /// Repairs made during the fight so far.
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
    pub fn write(&self, dir: &Path) -> Result<(), StatusError> {
        let path = dir.join(FILE);
        let err = |source| StatusError::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        crate::cli::write_atomically(&path, &text).map_err(err)
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

    /// Whether the agent that wrote this is still running.
    pub fn agent_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// The human-readable table `bridge-guard status` prints.
    pub fn render(&self, now_unix_ns: u64) -> String {
        let ago = |t: u64| format_duration(now_unix_ns.saturating_sub(t));
        let mut out = String::new();
        let alive = if self.agent_alive() {
            "running"
        } else {
            "NOT running (state is stale)"
        };
        let _ = writeln!(
            out,
            "agent pid {} {alive}; hooks: {}{}",
            self.pid,
            self.hooks,
            if self.observe { "; observe-only" } else { "" }
        );
        for b in &self.bridges {
            if !b.present {
                let _ = writeln!(out, "\n{}: not present", b.name);
                continue;
            }
            let _ = writeln!(
                out,
                "\n{}: {}, carrier {}, stp {}, {} repairs",
                b.name,
                if b.admin_up { "up" } else { "DOWN" },
                if b.carrier { "yes" } else { "NO" },
                if b.stp.is_empty() { "?" } else { &b.stp },
                b.repairs
            );
            for r in &b.refusals {
                let _ = writeln!(out, "  refused: {r}");
            }
            for f in &b.fights {
                let _ = writeln!(
                    out,
                    "  fight: {} undone again and again (by {}): repaired {} times, last {} ago",
                    f.action,
                    f.actor.as_deref().unwrap_or("unknown"),
                    f.count,
                    ago(f.last_unix_ns)
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
                    "  {:<16} {:<11} {:>12}  {:<8} {:<14} {}",
                    p.name,
                    p.state,
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
                    action: "turn STP off on br0".into(),
                    actor: Some("NetworkManager[812]".into()),
                    count: 240,
                    last_unix_ns: 3_000_000_000,
                }],
            }],
        };
        status.write(&dir).expect("writes");
        assert_eq!(Status::read(&dir).expect("reads"), status);
        let text = status.render(3_500_000_000);
        assert!(text.contains("running"), "{text}");
        assert!(text.contains("refused: vnet1 moved to br1"), "{text}");
        assert!(
            text.contains("fight: turn STP off on br0 undone again and again (by NetworkManager[812]): repaired 240 times, last 500.0 ms ago"),
            "{text}"
        );
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
}
