//! Helpers for bridge-guard's integration tests: network-namespace labs that clean up after
//! themselves, and the real agent as a child process whose events tests wait on.
//!
//! Rules the helpers enforce: every namespace is created here, named `bgt-<pid>-<n>-<tag>`, and
//! deleted on drop (also on panic); nothing touches the host's own namespace; waiting is on
//! readiness lines and events with a bound, never on sleeps.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Prefix of every namespace the tests create.
pub const PREFIX: &str = "bgt-";

/// `true` (after printing why) when the test cannot run here and must skip.
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {test}: needs root (network namespaces, eBPF); run `cargo xtask test`");
        return true;
    }
    false
}

/// The agent binary: `$BRIDGE_GUARD_BIN` (set by `cargo xtask test`), else the debug build.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("BRIDGE_GUARD_BIN") {
        return PathBuf::from(bin);
    }
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/bridge-guard");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes namespaces left by test processes that no longer exist (killed before cleanup).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A network namespace owned by one test; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_stale);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> <args>` (whitespace-separated).
    pub fn ip(&self, args: &str) -> Result<String> {
        run(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// The namespace's inode: what the kernel reports as `net->ns.inum`.
    pub fn inode(&self) -> Result<u32> {
        let ino = std::fs::metadata(format!("/run/netns/{}", self.name))?.ino();
        Ok(u32::try_from(ino)?)
    }

    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&format!("-j link show dev {dev}"))?;
        let v: Value = serde_json::from_str(&out)?;
        v[0]["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("no ifindex for {dev} in {out}"))
    }

    /// A bridge with kernel STP on and the shortest forward delay the kernel allows (2 s), up.
    pub fn stp_bridge(&self, name: &str) -> Result<()> {
        self.ip(&format!(
            "link add {name} type bridge stp_state 1 forward_delay 200"
        ))?;
        self.ip(&format!("link set {name} up"))?;
        Ok(())
    }

    /// A veth pair `port`/`peer` with `port` enslaved to `bridge`, both ends up: a VM's tap as
    /// seen from the bridge, with the guest end kept in this namespace.
    pub fn veth_port(&self, bridge: &str, port: &str, peer: &str) -> Result<()> {
        self.ip(&format!("link add {port} type veth peer name {peer}"))?;
        self.ip(&format!("link set {port} master {bridge}"))?;
        self.ip(&format!("link set {port} up"))?;
        self.ip(&format!("link set {peer} up"))?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The real agent running `watch --json` in a namespace; killed on drop.
pub struct Agent {
    child: Child,
    events: Receiver<Value>,
    /// Every event received so far, in order.
    pub seen: Vec<Value>,
    /// The readiness line.
    pub ready: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `bridge-guard watch --json ARGS` in `ns` and waits (up to 60 s) until it says it
    /// is ready, i.e. every hook is attached.
    pub fn watch(ns: &NetNs, args: &[&str]) -> Result<Self> {
        let mut child = ns
            .command(agent_bin())
            .args(["watch", "--json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning bridge-guard watch")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (ev_tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if ev_tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("agent printed a non-JSON line ({e}): {line}"),
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let log_writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready:") {
                    let _ = ready_tx.send(line.clone());
                }
                if let Ok(mut l) = log_writer.lock() {
                    l.push(line);
                }
            }
        });
        let mut agent = Self {
            child,
            events,
            seen: Vec::new(),
            ready: String::new(),
            stderr: log,
        };
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => agent.ready = line,
            Err(_) => bail!(
                "agent did not become ready; status {:?}; stderr:\n{}",
                agent.child.try_wait(),
                agent.stderr_text()
            ),
        }
        Ok(agent)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The tier the agent chose for `hook`, from its readiness line (`hook=tier ...`).
    pub fn tier(&self, hook: &str) -> Option<String> {
        let key = format!("{hook}=");
        self.ready
            .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
            .find_map(|w| w.strip_prefix(&key).map(str::to_owned))
    }

    /// Waits up to `timeout` for an event matching `pred`, keeping every event in `seen`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "timed out after {timeout:?} waiting for {what}; events seen:\n{}\nagent stderr:\n{}",
                    self.seen
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.stderr_text()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "agent exited while waiting for {what}; stderr:\n{}",
                    self.stderr_text()
                ),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `true` when `ev` is a port-state event for `port` entering `state`.
pub fn is_port_state(ev: &Value, port: &str, state: &str) -> bool {
    ev["kind"] == "port_state" && ev["port"] == port && ev["new"] == state
}
