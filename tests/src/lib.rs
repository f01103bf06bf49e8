//! Helpers for bridge-guard's integration tests: network-namespace labs (from [`netlab`]) and
//! the real agent as a child process whose events tests wait on.
//!
//! Rules the helpers enforce: every namespace is created through [`netlab`] with [`PREFIX`],
//! named `bgt-<pid>-<n>-<tag>`, and deleted on drop (also on panic); nothing touches the host's
//! own namespace; waiting is on readiness lines and events with a bound, never on sleeps.
//!
//! Skips count: a test that cannot run here says so through [`skip`], naming the [`Need`] it
//! lacks. Where the environment must meet that need (`BRIDGE_GUARD_EXPECT`, set per host and
//! per VM kernel by `cargo xtask test` / `vmtest`), the skip fails the test instead.

use std::{
    fmt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netlab::read_lines;
pub use netlab::{NetNs, VmLab, http_get, wait_on_links};

pub mod apt;
pub mod scrape;
use serde_json::Value;

pub mod libvirt;

/// Prefix of every namespace the tests create; distinct from the bench's and the demo's, so
/// that none sweeps the others' namespaces.
pub const PREFIX: &str = "bgt";

/// How long [`VmLab::guests_talk`] waits for its datagram.
pub const TALK: Duration = Duration::from_secs(5);

/// What a test needs that an environment may lack. Its name (`Display`) is what skip lines,
/// `BRIDGE_GUARD_EXPECT` and the runners' tallies use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `root`: network namespaces, eBPF.
    Root,
    /// `tool-<command>`: a command `cargo xtask test` installs.
    Tool(&'static str),
    /// `bridge-module`: bridge is a loadable module, not built in (distribution kernels).
    BridgeModule,
    /// `host`: runs on the host only, not in the VM matrix's guests (where it would be too slow
    /// under emulation and proves nothing about the kernel's hook tiers).
    Host,
    /// `<tier>-<hook>`: the agent's `hook` (`port-state`, `join`, `leave`, `stp`) attached at
    /// `tier` or better (`fentry` > `kprobe` > `tracepoint`).
    Tier {
        hook: &'static str,
        tier: &'static str,
    },
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Root => f.write_str("root"),
            Self::Tool(cmd) => write!(f, "tool-{cmd}"),
            Self::BridgeModule => f.write_str("bridge-module"),
            Self::Host => f.write_str("host"),
            Self::Tier { hook, tier } => write!(f, "{tier}-{hook}"),
        }
    }
}

/// Hook tiers, best first, as the agent names them.
const TIERS: &[&str] = &["fentry", "kprobe", "tracepoint"];

/// Whether `got` is `want` or a better tier.
pub fn tier_at_least(got: &str, want: &str) -> bool {
    match (
        TIERS.iter().position(|t| *t == got),
        TIERS.iter().position(|t| *t == want),
    ) {
        (Some(g), Some(w)) => g <= w,
        _ => false,
    }
}

/// Whether `expect` (a `BRIDGE_GUARD_EXPECT` value: names, comma-separated; a trailing `*`
/// matches any suffix) names `need`.
pub fn expects(expect: &str, need: &Need) -> bool {
    let name = need.to_string();
    expect
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| match e.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == e,
        })
}

/// Skips `test` for lacking `need`: prints `SKIP <test>: <reason> [needs <need>]`, and panics
/// instead when this environment is expected to meet `need` (a skip there is a failure).
pub fn skip(test: &str, need: Need, reason: impl fmt::Display) {
    eprintln!("SKIP {test}: {reason} [needs {need}]");
    let expect = std::env::var("BRIDGE_GUARD_EXPECT").unwrap_or_default();
    let env = std::env::var("BRIDGE_GUARD_ENV").unwrap_or_else(|_| "this environment".into());
    assert!(
        !expects(&expect, &need),
        "{test} must run on {env} (BRIDGE_GUARD_EXPECT={expect} includes {need}), but skipped: {reason}"
    );
}

/// `true` (after printing why) when the test cannot run here and must skip.
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        skip(
            test,
            Need::Root,
            "needs root (network namespaces, eBPF); run `cargo xtask test`",
        );
        return true;
    }
    false
}

/// `true` (after [`skip`]) when `agent` attached `hook` below `tier`: the test, or the part of
/// it that calls this, needs that tier.
pub fn skip_below_tier(test: &str, agent: &Agent, hook: &'static str, tier: &'static str) -> bool {
    let got = agent.tier(hook).unwrap_or_else(|| "none".to_owned());
    if tier_at_least(&got, tier) {
        return false;
    }
    skip(
        test,
        Need::Tier { hook, tier },
        format_args!(
            "{hook} attached at {got}, below {tier}, on this kernel ({})",
            agent.ready
        ),
    );
    true
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

/// What an agent's start waits for: a description, and the log line that ends the wait.
pub type Until<'a> = (&'a str, &'a dyn Fn(&str) -> bool);

/// The readiness line the agent prints once hooks are attached and the first reconcile done.
const READY: Until<'static> = ("the readiness line", &|l: &str| l.contains("ready:"));

/// The real agent as a child process in a namespace; killed on drop.
pub struct Agent {
    child: Child,
    events: Receiver<Value>,
    logs: Receiver<String>,
    /// Every event received so far, in order (`watch --json` only).
    pub seen: Vec<Value>,
    /// Every log line read so far, in order.
    pub log: Vec<String>,
    /// The readiness line.
    pub ready: String,
    /// The agent's state directory (`run` only); removed on drop.
    pub state_dir: PathBuf,
    /// The private libvirt directory [`Agent::run_with`] gave it, if any; removed on drop.
    libvirt_dir: Option<PathBuf>,
}

impl Agent {
    /// Starts `bridge-guard watch --json ARGS` in `ns` and waits until every hook is attached.
    pub fn watch(ns: &NetNs, args: &[&str]) -> Result<Self> {
        let mut all = vec!["watch", "--json"];
        all.extend_from_slice(args);
        Self::spawn(ns, &all)
    }

    /// Starts `bridge-guard run --state-dir <private dir> ARGS` in `ns` and waits until it is
    /// ready: hooks attached and the first reconcile done.
    pub fn run(ns: &NetNs, args: &[&str]) -> Result<Self> {
        Self::run_with(ns, &[], args, &[])
    }

    /// [`Agent::run`] with a wrapper command and environment. The state directory is the same
    /// for every agent run in `ns`, as for a restarted service. Unless `args` name one, the
    /// agent reads libvirt's XML from a private, empty directory (never the host's
    /// /run/libvirt/qemu, so results do not depend on the host's VMs).
    pub fn run_with(
        ns: &NetNs,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::run_inner(ns, wrapper, args, env, READY)
    }

    /// [`Agent::run`] that returns at the first log line matching `until` instead of the
    /// readiness line: e.g. a line the agent logs while starting, to pause it there.
    pub fn run_until(ns: &NetNs, args: &[&str], until: Until<'_>) -> Result<Self> {
        Self::run_inner(ns, &[], args, &[], until)
    }

    fn run_inner(
        ns: &NetNs,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        until: Until<'_>,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-state", ns.name));
        let dir_arg = dir.to_string_lossy().into_owned();
        let libvirt = std::env::temp_dir().join(format!("{}-libvirt", ns.name));
        let libvirt_arg = libvirt.to_string_lossy().into_owned();
        let mut all = vec!["run", "--state-dir", dir_arg.as_str()];
        let names_libvirt = args
            .iter()
            .any(|a| *a == "--libvirt-dir" || a.starts_with("--libvirt-dir="));
        if !names_libvirt {
            std::fs::create_dir_all(&libvirt)
                .with_context(|| format!("creating {}", libvirt.display()))?;
            all.extend(["--libvirt-dir", libvirt_arg.as_str()]);
        }
        all.extend_from_slice(args);
        let mut agent = Self::spawn_inner(ns, wrapper, &all, env, until)?;
        agent.state_dir = dir;
        agent.libvirt_dir = (!names_libvirt).then_some(libvirt);
        Ok(agent)
    }

    /// Starts the agent with `args` in `ns` and waits (up to 60 s) for its readiness line.
    pub fn spawn(ns: &NetNs, args: &[&str]) -> Result<Self> {
        Self::spawn_with(ns, &[], args, &[])
    }

    /// Like [`Agent::spawn`], with a wrapper command (e.g. `setpriv ...`) and environment.
    pub fn spawn_with(
        ns: &NetNs,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn_inner(ns, wrapper, args, env, READY)
    }

    fn spawn_inner(
        ns: &NetNs,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        (what, until): Until<'_>,
    ) -> Result<Self> {
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = ns.command(program);
                c.args(rest).arg(agent_bin());
                c
            }
            None => ns.command(agent_bin()),
        };
        let mut child = cmd
            .args(args)
            .envs(env.iter().copied())
            // `BG_TEST_LOG` (e.g. `info,bridge_guard=debug`) puts more in a failure's log.
            .env(
                "RUST_LOG",
                std::env::var("BG_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning bridge-guard")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (ev_tx, events) = mpsc::channel();
        read_lines(stdout, move |line| {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) => ev_tx.send(v).is_ok(),
                Err(e) => {
                    eprintln!("agent printed a non-JSON line ({e}): {line}");
                    true
                }
            }
        });
        let (log_tx, logs) = mpsc::channel();
        read_lines(stderr, move |line| log_tx.send(line).is_ok());
        let mut agent = Self {
            child,
            events,
            logs,
            seen: Vec::new(),
            log: Vec::new(),
            ready: String::new(),
            state_dir: PathBuf::new(),
            libvirt_dir: None,
        };
        agent.ready = agent.wait_log(what, Duration::from_secs(60), until)?;
        Ok(agent)
    }

    /// Sends SIGTERM and waits for the agent to exit; its exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let status = self.child.wait()?;
        self.drain_log();
        Ok(status)
    }

    /// Stops the agent (SIGSTOP) so that a change lands before it can react: its netlink
    /// socket and ring buffer queue everything meanwhile. Undo with [`Agent::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused agent go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: signalling our own child, which has not been waited for yet.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the agent");
        }
        Ok(())
    }

    /// Kills the agent at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn log_text(&self) -> String {
        self.log.join("\n")
    }

    /// Waits up to `timeout` for a log line matching `pred`, keeping every line in `log`.
    /// Like [`Agent::wait_log`], but a line already read (e.g. while waiting for readiness)
    /// counts too: the agent's log and its readiness line come on two pipes, read by two
    /// threads, so a line logged before "ready" may be read after it.
    pub fn wait_logged(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        if let Some(line) = self.log.iter().find(|l| pred(l)) {
            return Ok(line.clone());
        }
        self.wait_log(what, timeout, pred)
    }

    pub fn wait_log(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "timed out after {timeout:?} waiting for {what}; log:\n{}",
                        self.log_text()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "agent exited ({:?}) while waiting for {what}; log:\n{}",
                    self.child.try_wait(),
                    self.log_text()
                ),
            }
        }
    }

    /// Reads every log line available now without waiting.
    pub fn drain_log(&mut self) -> &[String] {
        while let Ok(line) = self.logs.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// The agent's published state (`run` only).
    pub fn status(&self) -> Result<Value> {
        let out = Command::new(agent_bin())
            .args(["status", "--json", "--state-dir"])
            .arg(&self.state_dir)
            .output()?;
        // Exit 1 or 4 says a bridge is unhealthy or refused: the state is printed all the same.
        anyhow::ensure!(
            matches!(out.status.code(), Some(0 | 1 | 4)),
            "status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until the agent's published state satisfies `pred`: re-read each time the state
    /// file is replaced (inotify on the state directory), so no polling and no sleeping.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        wait_dir_change(
            &self.state_dir,
            &format!("agent state showing {what}"),
            timeout,
            || {
                last = self.status()?;
                Ok((!pred(&last)).then(|| format!("last:\n{last:#}")))
            },
        )?;
        Ok(last)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time the agent used so far (user + system), from `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command (which may hold spaces), from the closing parenthesis.
        let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            Ok(fields.get(i).context("short /proc/PID/stat")?.parse()?)
        };
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
        let total = ticks(11)? + ticks(12)?;
        // SAFETY: sysconf has no failure mode for this name.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Ok(Duration::from_millis(total * 1000 / hz.max(1)))
    }

    /// The agent's resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmRSS")?
            .parse()
            .context("VmRSS is not a number")
    }

    /// The tier the agent chose for `hook`, from its readiness line (`hook=tier ...`).
    pub fn tier(&self, hook: &str) -> Option<String> {
        let key = format!("{hook}=");
        self.ready
            .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ';')
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
                    "timed out after {timeout:?} waiting for {what}; events seen:\n{}\nagent log:\n{}",
                    self.seen
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.drain_log().join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "agent exited while waiting for {what}; log:\n{}",
                    self.drain_log().join("\n")
                ),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.state_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
        if let Some(dir) = &self.libvirt_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until `problem` finds nothing wrong (`None`), checking it again each time a file in
/// `dir` is written or moved into place (inotify), so no polling and no sleeping; fails after
/// `timeout` with the last problem found.
pub fn wait_dir_change(
    dir: &std::path::Path,
    what: &str,
    timeout: Duration,
    mut problem: impl FnMut() -> Result<Option<String>>,
) -> Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain syscalls; the fd is owned right away.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    anyhow::ensure!(
        fd >= 0,
        "inotify_init1: {}",
        std::io::Error::last_os_error()
    );
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid fd and NUL-terminated path.
    let wd = unsafe {
        libc::inotify_add_watch(
            fd.as_raw_fd(),
            path.as_ptr(),
            libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE,
        )
    };
    anyhow::ensure!(
        wd >= 0,
        "inotify_add_watch {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    let deadline = Instant::now() + timeout;
    loop {
        // Checked after the watch exists, so no update can slip between check and wait.
        let Some(why) = problem()? else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "never {what} within {timeout:?}; {why}");
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        let mut buf = [0u8; 4096];
        // SAFETY: drain pending events into a local buffer (non-blocking fd).
        while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

/// `true` when `ev` is a port-state event for `port` entering `state`.
pub fn is_port_state(ev: &Value, port: &str, state: &str) -> bool {
    ev["kind"] == "port_state" && ev["port"] == port && ev["new"] == state
}

/// The checks the scenarios make on a [`VmLab`].
pub trait VmLabChecks: Sized {
    /// Why the lab is not healthy (bridge up with carrier, every vnet port enslaved and
    /// forwarding), or `None` when it is.
    fn unhealthy(&self) -> Result<Option<String>>;

    /// Waits until the lab is healthy, re-checking on every link notification in the host
    /// namespace (`ip monitor`), never on a timer; fails after `timeout`.
    fn wait_healthy(&self, timeout: Duration) -> Result<()>;

    /// Waits until `problem` finds none, re-checking it on every link notification in the host
    /// namespace; fails after `timeout` with the last problem found.
    fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        problem: impl Fn(&Self) -> Result<Option<String>>,
    ) -> Result<()>;

    /// The bridge's `stp_state` (0 off, 1 kernel, 2 user).
    fn stp_state(&self) -> Result<u64>;
}

impl VmLabChecks for VmLab {
    fn unhealthy(&self) -> Result<Option<String>> {
        let links: Value = serde_json::from_str(&self.host.ip("-j -d link show")?)?;
        let links = links.as_array().context("ip -j link show: not an array")?;
        let find = |name: &str| links.iter().find(|l| l["ifname"] == name);
        let br = &self.bridge;
        let Some(flags) = find(br).map(|l| l["flags"].to_string()) else {
            return Ok(Some(format!("{br} does not exist")));
        };
        if !flags.contains("\"UP\"") || !flags.contains("LOWER_UP") {
            return Ok(Some(format!("{br} flags {flags}")));
        }
        for i in 0..self.vms.len() {
            let name = format!("vnet{i}");
            let Some(port) = find(&name) else {
                return Ok(Some(format!("{name} does not exist")));
            };
            if port["master"] != br.as_str() {
                return Ok(Some(format!("{name} master is {}", port["master"])));
            }
            let state = &port["linkinfo"]["info_slave_data"]["state"];
            if state != "forwarding" {
                return Ok(Some(format!("{name} is {state}")));
            }
        }
        Ok(None)
    }

    fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        self.wait_until("healthy", timeout, Self::unhealthy)
    }

    fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        problem: impl Fn(&Self) -> Result<Option<String>>,
    ) -> Result<()> {
        wait_on_links(
            &self.host,
            &format!("the lab to be {what}"),
            timeout,
            || problem(self),
        )
    }

    fn stp_state(&self) -> Result<u64> {
        let v: Value =
            serde_json::from_str(&self.host.ip(&format!("-j -d link show {}", self.bridge))?)?;
        v[0]["linkinfo"]["info_data"]["stp_state"]
            .as_u64()
            .with_context(|| format!("no stp_state in {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{Need, expects, tier_at_least};

    #[test]
    fn expectations_name_requirements_exactly_or_by_prefix() {
        let e = "root,tool-*, kprobe-join";
        assert!(expects(e, &Need::Root));
        assert!(expects(e, &Need::Tool("nix-instantiate")));
        assert!(expects(
            e,
            &Need::Tier {
                hook: "join",
                tier: "kprobe"
            }
        ));
        assert!(!expects(
            e,
            &Need::Tier {
                hook: "join",
                tier: "fentry"
            }
        ));
        assert!(!expects(e, &Need::BridgeModule));
        assert!(!expects("", &Need::Root));
    }

    #[test]
    fn tiers_rank_fentry_over_kprobe_over_tracepoint() {
        assert!(tier_at_least("fentry", "kprobe"));
        assert!(tier_at_least("kprobe", "kprobe"));
        assert!(!tier_at_least("tracepoint", "kprobe"));
        assert!(!tier_at_least("none", "tracepoint"));
    }
}
