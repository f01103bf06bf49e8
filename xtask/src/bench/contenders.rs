//! The contenders: bridge-guard, the oracle (the least any guard could do), the shell guard
//! users write today, and no guard at all.

use std::{
    path::Path,
    process::Stdio,
    sync::mpsc::{self, Sender},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    faults::Fault, monitor::Activity, observer::Observer, oracle::Oracle, rtnl::Rtnl, stats,
};
use crate::lab::{NetNs, Proc, TempDir, read_lines};

/// The fix script of the shell guard, modelled on the first user's `fix-vm-network.sh`
/// (/work/shared/first-user-notes.md): STP off, re-attach every detached `vnet*`, bridge up.
///
/// Each step checks first. Without the check on STP it never stops: `ip link set br0 type
/// bridge stp_state 0` sends a link notification even when STP is already off, which runs the
/// fix again. (That is what a script written without this check does.)
pub const FIX_SCRIPT: &str = r#"#!/bin/sh
# fix-vm-network.sh: keep br0 forwarding for the VMs.
BR=br0
# 1. STP off (it holds ports in listening/learning and the bridge in NO-CARRIER)
if [ -e /sys/class/net/$BR/bridge/stp_state ] &&
   [ "$(cat /sys/class/net/$BR/bridge/stp_state)" != 0 ]; then
    ip link set $BR type bridge stp_state 0
fi
# 2. re-attach every VM tap that lost its master
for dev in /sys/class/net/vnet*; do
    [ -e "$dev" ] || continue
    [ -e "$dev/master" ] || ip link set "${dev##*/}" master $BR
done
# 3. bridge up
ip link set $BR up
"#;

/// [`FIX_SCRIPT`] for `bridge`.
fn fix_script(bridge: &str) -> String {
    FIX_SCRIPT.replace("BR=br0", &format!("BR={bridge}"))
}

/// The monitor loop that runs the fix on every link or route notification (`@FIX@` is the
/// script's path). It prints a line after each fix, so the bench sees when it is busy.
pub const MONITOR_LOOP: &str = r#"ip monitor link route | while read -r line; do
    sh @FIX@ >/dev/null 2>&1
    echo "fixed after: $line"
done"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// `bridge-guard run`
    BridgeGuard,
    /// A raw-netlink thread told the fault class in advance: the least any guard could do
    Oracle,
    /// An `ip monitor` loop around a fix script, as users write today
    Shell,
    /// No guard at all
    None,
}

impl Contender {
    pub const ALL: [Self; 4] = [Self::BridgeGuard, Self::Oracle, Self::Shell, Self::None];

    pub fn key(self) -> &'static str {
        match self {
            Self::BridgeGuard => "bridge-guard",
            Self::Oracle => "oracle",
            Self::Shell => "shell",
            Self::None => "none",
        }
    }
}

/// A running contender (nothing runs for `None`).
pub struct Running {
    pub contender: Contender,
    proc: Option<Proc>,
    oracle: Option<Oracle>,
    /// `host:port` of bridge-guard's metrics.
    pub metrics: Option<String>,
    pub ready_line: String,
    _state: Option<TempDir>,
}

/// Starts `bridge-guard ARGS` in `ns` with stderr read line by line; returns once its
/// "ready:" line came (up to 60 s). Later lines go to `sink`, stamped.
pub fn spawn_agent(
    ns: &NetNs,
    bin: &Path,
    args: &[&str],
    sink: Sender<Activity>,
) -> Result<(Proc, String, Vec<String>)> {
    spawn(ns, bin, args, sink, None)
}

/// As [`spawn_agent`], with stdout lines (`watch`'s events) to `events`.
pub fn spawn_agent_with_stdout(
    ns: &NetNs,
    bin: &Path,
    args: &[&str],
    sink: Sender<Activity>,
    events: Sender<Activity>,
) -> Result<(Proc, String, Vec<String>)> {
    spawn(ns, bin, args, sink, Some(events))
}

fn spawn(
    ns: &NetNs,
    bin: &Path,
    args: &[&str],
    sink: Sender<Activity>,
    events: Option<Sender<Activity>>,
) -> Result<(Proc, String, Vec<String>)> {
    let mut proc = Proc::spawn(
        ns.command(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(if events.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped()),
    )?;
    if let Some(events) = events {
        let stdout = proc.child.stdout.take().context("no stdout")?;
        read_lines(stdout, move |line| {
            events.send(Activity::Guard { line }).is_ok()
        });
    }
    let stderr = proc.child.stderr.take().context("no stderr")?;
    let (start_tx, start_rx) = mpsc::channel();
    let mut starting = Some(start_tx);
    read_lines(stderr, move |line| {
        if let Some(tx) = &starting {
            let ready = line.contains("ready:");
            let _ = tx.send(line);
            if ready {
                starting = None;
            }
            return true;
        }
        sink.send(Activity::Guard { line }).is_ok()
    });
    let mut startup = Vec::new();
    loop {
        match start_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("ready:") => return Ok((proc, line, startup)),
            Ok(line) => startup.push(line),
            Err(_) => bail!(
                "bridge-guard did not get ready ({:?}); its output:\n{}",
                proc.child.try_wait(),
                startup.join("\n")
            ),
        }
    }
}

/// `bridge-guard run` as the bench runs it, guarding `bridge`, with its state in `state_dir`
/// and `extra` arguments (`--agent-arg`) last.
pub fn run_args(bridge: &str, state_dir: &str, extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        "--bridge",
        bridge,
        "--port-pattern",
        "vnet*",
        "--metrics",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--state-dir",
        state_dir,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.extend_from_slice(extra);
    v
}

/// `host:port` from the readiness line's "metrics on http://HOST:PORT/metrics".
pub fn metrics_addr(ready: &str) -> Option<String> {
    let rest = ready.split("metrics on http://").nth(1)?;
    Some(rest.split('/').next()?.to_owned())
}

impl Running {
    /// Starts `contender` in the lab's host namespace, guarding `bridge` with VM `ports`,
    /// and waits until it is ready.
    pub fn start(
        contender: Contender,
        (ns, bridge, ports): (&NetNs, &str, &[String]),
        (bin, extra): (&Path, &[String]),
        obs: &mut Observer,
        host: &mut Rtnl,
        tmp: &TempDir,
    ) -> Result<Self> {
        let nothing = Self {
            contender,
            proc: None,
            oracle: None,
            metrics: None,
            ready_line: String::new(),
            _state: None,
        };
        match contender {
            Contender::None => Ok(nothing),
            Contender::Oracle => Ok(Self {
                oracle: Some(Oracle::start(&ns.name, bridge, ports.to_vec())?),
                ready_line: "oracle following notifications".to_owned(),
                ..nothing
            }),
            Contender::BridgeGuard => {
                let state = TempDir::on_tmpfs("bgb", &format!("state-{}", ns.name))?;
                let dir = state.path.to_string_lossy().into_owned();
                let args = run_args(bridge, &dir, extra);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (proc, ready_line, _) = spawn_agent(ns, bin, &args, obs.sender())?;
                Ok(Self {
                    metrics: metrics_addr(&ready_line),
                    proc: Some(proc),
                    ready_line,
                    _state: Some(state),
                    ..nothing
                })
            }
            Contender::Shell => {
                let fix = tmp.path.join("fix-vm-network.sh");
                std::fs::write(&fix, fix_script(bridge))
                    .with_context(|| format!("writing {}", fix.display()))?;
                let script = MONITOR_LOOP.replace("@FIX@", &fix.to_string_lossy());
                let mut proc = Proc::spawn(
                    ns.command("sh")
                        .args(["-c", &script])
                        .stdin(Stdio::null())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null()),
                )?;
                let stdout = proc.child.stdout.take().context("no stdout")?;
                let sink = obs.sender();
                read_lines(stdout, move |line| {
                    sink.send(Activity::Guard { line }).is_ok()
                });
                // Ready once `ip monitor` is subscribed: poke with a harmless notification (STP
                // off again) until the loop answers.
                let mut ready = false;
                for _ in 0..50 {
                    host.set_stp(bridge, false)?;
                    if obs.wait_guard_line(Duration::from_millis(200))? {
                        ready = true;
                        break;
                    }
                }
                if !ready {
                    bail!("the shell guard never answered a link notification");
                }
                Ok(Self {
                    proc: Some(proc),
                    ready_line: "ip monitor loop answering".to_owned(),
                    ..nothing
                })
            }
        }
    }

    /// Tells the contender which fault comes next, if it is one that is told (the oracle).
    pub fn arm(&self, fault: Fault) {
        if let Some(o) = &self.oracle {
            o.arm(fault);
        }
    }

    /// Repairs the oracle sent and requests of them the kernel refused.
    pub fn oracle_tally(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let t = &self.oracle.as_ref()?.tally;
        Some((t.repairs.load(Relaxed), t.refused.load(Relaxed)))
    }

    /// CPU used so far, in ms: the agent's utime+stime; the oracle thread's; for the shell
    /// guard, every process of its group with the fix scripts it waited for.
    pub fn cpu_ms(&self) -> Option<f64> {
        if let Some(o) = &self.oracle {
            return o.cpu_ms();
        }
        let p = self.proc.as_ref()?;
        match self.contender {
            Contender::BridgeGuard => stats::cpu_ms(p.pid()),
            _ => Some(stats::group_cpu_ms(&p.group_pids())),
        }
    }

    /// Peak resident memory in KiB: the agent's VmHWM; for the shell guard the sum over its
    /// long-lived processes.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.rss_kib("VmHWM")
    }

    /// Resident memory now in KiB (VmRSS), counted as [`Self::peak_rss_kib`].
    pub fn rss_now_kib(&self) -> Option<u64> {
        self.rss_kib("VmRSS")
    }

    fn rss_kib(&self, field: &str) -> Option<u64> {
        let p = self.proc.as_ref()?;
        match self.contender {
            Contender::BridgeGuard => stats::status_kib(p.pid(), field),
            _ => Some(
                p.group_pids()
                    .iter()
                    .filter_map(|pid| stats::status_kib(*pid, field))
                    .sum(),
            ),
        }
    }
}
