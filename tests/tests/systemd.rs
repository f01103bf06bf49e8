//! The shipped unit under a real systemd as PID 1, and the unit's and Nix files' static checks.
//!
//! This machine's own PID 1 is not systemd, so each test boots a container: systemd-nspawn on
//! the Debian root `cargo xtask test` builds (`$BRIDGE_GUARD_NSPAWN_ROOT`, bookworm: systemd
//! 252), `--volatile=overlay` so the root stays as built, joined to a lab's network namespace
//! (made by netlab, removed on drop). Inside, `packaging/systemd/bridge-guard.service` runs as
//! shipped (bind-mounted, not copied), with the agent under test as /usr/bin/bridge-guard and
//! /etc/bridge-guard a directory of the test's. Commands run in the container through
//! `nsenter` into its init's namespaces.
//!
//! What the container adds to the host, and why: CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON and
//! CAP_SYSLOG in its bounding set and `bpf`/`perf_event_open` in its seccomp filter (nspawn
//! drops them by default; a host's systemd has them), and the host's tracefs at
//! /sys/kernel/tracing (a host's systemd mounts it at boot; a container's does not).
//!
//! Waits are on readiness: nspawn's READY=1 (the container finished booting), `systemctl
//! start` returning (Type=notify: after the agent's READY=1), link notifications in the lab and
//! changes to the agent's state directory, each bounded.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use integration_tests::{
    Need, PREFIX, VmLab, VmLabChecks as _, agent_bin, skip, skip_unless_root, wait_dir_change,
};
use serde_json::Value;

/// Set by `cargo xtask test`: the Debian root to boot.
const ROOT_ENV: &str = "BRIDGE_GUARD_NSPAWN_ROOT";
const UNIT: &str = "bridge-guard.service";
const HEAL: Duration = Duration::from_secs(20);
/// Booting the container: a few seconds, more on a loaded machine.
const BOOT: Duration = Duration::from_secs(120);
/// The unit's WatchdogSec= is 10 s; then RestartSec=1s and the new agent's start.
const WATCHDOG_RESTART: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The container root, or `None` after saying why the test cannot run here.
fn container_root(test: &str) -> Option<PathBuf> {
    if skip_unless_root(test) {
        return None;
    }
    // The container root is `cargo xtask test`'s to build, like the tools it installs.
    let root_need = Need::Tool("nspawn-root");
    let Some(root) = std::env::var_os(ROOT_ENV).map(PathBuf::from) else {
        skip(
            test,
            root_need,
            format_args!("no {ROOT_ENV}; `cargo xtask test` builds the container root and sets it"),
        );
        return None;
    };
    if !root.join("usr/lib/systemd/systemd").is_file() {
        skip(
            test,
            root_need,
            format_args!("{} holds no systemd", root.display()),
        );
        return None;
    }
    if let Some(missing) = ["systemd-nspawn", "nsenter"]
        .into_iter()
        .find(|p| which(p).is_none())
    {
        skip(
            test,
            Need::Tool(missing),
            "no systemd-nspawn or nsenter (cargo xtask test installs them)",
        );
        return None;
    }
    Some(root)
}

/// A file path of this test process's own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!("bgt-{}-{n}-{tag}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A booted container running systemd, in the lab's host namespace; killed on drop.
struct Container {
    nspawn: Child,
    /// The container's init, as the host sees it.
    leader: u32,
    /// The host directory mounted as the container's /etc/bridge-guard.
    etc: Scratch,
    _notify: Scratch,
    log: Scratch,
    /// The lab whose namespace the container runs in; dropped after the container is gone.
    lab: VmLab,
}

impl Container {
    /// For `test`: a lab of `vms` VMs (namespaces tagged `tag`) and the root booted in its host
    /// namespace with `config` as /etc/bridge-guard/config.toml, once systemd says the boot is
    /// done; `None` when the test cannot run here.
    fn for_test(test: &str, tag: &str, vms: usize, config: &str) -> Result<Option<Self>> {
        let Some(root) = container_root(test) else {
            return Ok(None);
        };
        let lab = VmLab::new(PREFIX, tag, vms)?;
        Self::boot(&root, lab, config).map(Some)
    }

    fn boot(root: &Path, lab: VmLab, config: &str) -> Result<Self> {
        let etc = Scratch::new("etc");
        std::fs::create_dir_all(&etc.0)?;
        std::fs::write(etc.0.join("config.toml"), config)?;
        let notify = Scratch::new("notify");
        let sock = UnixDatagram::bind(&notify.0).context("binding nspawn's notify socket")?;
        let log = Scratch::new("nspawn.log");
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--directory")
            .arg(root)
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
            ])
            .arg(format!("--machine={}", lab.host.name))
            .args(["--notify-ready=yes", "--console=pipe"])
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                lab.host.name
            ))
            .arg("--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON,CAP_SYSLOG")
            .arg("--system-call-filter=bpf perf_event_open")
            .arg(format!(
                "--bind-ro={}:/usr/bin/bridge-guard",
                agent_bin().display()
            ))
            .arg(format!(
                "--bind-ro={}:/etc/systemd/system/{UNIT}",
                repo().join("packaging/systemd").join(UNIT).display()
            ))
            .arg(format!("--bind={}:/etc/bridge-guard", etc.0.display()));
        if Path::new("/sys/kernel/tracing/events").is_dir() {
            cmd.arg("--bind-ro=/sys/kernel/tracing");
        }
        let mut nspawn = cmd
            .env("NOTIFY_SOCKET", &notify.0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log.0)?)
            .stderr(std::fs::File::create(&log.0)?)
            .spawn()
            .context("starting systemd-nspawn")?;
        // nspawn says READY=1 when the container's systemd has finished booting, and names
        // the container's init in X_NSPAWN_LEADER_PID; in either order.
        let deadline = Instant::now() + BOOT;
        let (mut ready, mut leader) = (false, None);
        let mut buf = [0u8; 4096];
        while !(ready && leader.is_some()) {
            if let Some(status) = nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({status}) during boot:\n{}",
                    std::fs::read_to_string(&log.0).unwrap_or_default()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                bail!("the container did not finish booting within {BOOT:?}");
            }
            // Short reads so that an nspawn that dies is noticed.
            sock.set_read_timeout(Some(left.min(Duration::from_secs(1))))?;
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let msg = String::from_utf8_lossy(&buf[..n]);
            for line in msg.lines() {
                ready |= line == "READY=1";
                if let Some(pid) = line.strip_prefix("X_NSPAWN_LEADER_PID=") {
                    leader = pid.parse().ok();
                }
            }
        }
        let leader = leader.context("no leader pid")?;
        Ok(Self {
            nspawn,
            leader,
            etc,
            _notify: notify,
            log,
            lab,
        })
    }

    /// Runs `args` in the container (all of its init's namespaces).
    fn exec(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut child = Command::new("nsenter")
            .arg(format!("--target={}", self.leader))
            .args(["--all", "--"])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("nsenter {args:?}"))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            pipe.write_all(text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs `args` in the container; their stdout, or an error with their stderr.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.exec(args, None)?;
        ensure!(
            out.status.success(),
            "{args:?} in the container failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `systemctl show -p PROP --value UNIT`.
    fn show(&self, unit: &str, prop: &str) -> Result<String> {
        Ok(self
            .run(&["systemctl", "show", "-p", prop, "--value", unit])?
            .trim()
            .to_owned())
    }

    fn main_pid(&self) -> Result<u32> {
        let pid: u32 = self.show(UNIT, "MainPID")?.parse()?;
        ensure!(pid != 0, "{UNIT} has no main process");
        Ok(pid)
    }

    /// The unit's journal since the container booted, one message per line.
    fn journal(&self, unit: &str) -> Result<String> {
        self.run(&["journalctl", "-b", "-u", unit, "-o", "cat", "--no-pager"])
    }

    /// How many BPF links the process holds (in the container's pid namespace): each
    /// attached hook is one.
    fn bpf_links(&self, pid: u32) -> Result<usize> {
        let fdinfo = self.run(&["sh", "-c", &format!("cat /proc/{pid}/fdinfo/*")])?;
        Ok(fdinfo
            .lines()
            .filter(|l| l.starts_with("link_type:"))
            .count())
    }

    /// Writes the container's /etc/bridge-guard/config.toml.
    fn write_config(&self, text: &str) -> Result<()> {
        Ok(std::fs::write(self.etc.0.join("config.toml"), text)?)
    }

    /// The agent's state directory, /run/bridge-guard, as the host sees it.
    fn state_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run/bridge-guard", self.leader))
    }

    /// Waits until `check` finds nothing wrong, re-checking each time the agent publishes its
    /// state (STATUS= is sent before the state file is written, and systemd reads
    /// notifications before D-Bus calls).
    fn wait_published(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Self) -> Result<Option<String>>,
    ) -> Result<()> {
        wait_dir_change(&self.state_dir(), what, timeout, || check(self))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log.0).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Killing the init ends the whole container (its pid namespace); nspawn then unmounts
        // and exits.
        if let Ok(pid) = libc::pid_t::try_from(self.leader) {
            // SAFETY: signalling the container's init, which we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.nspawn.wait();
    }
}

/// A guard on `br0` and nothing else: no port patterns, no libvirt, so that every member the
/// agent knows it learned by seeing it enslaved.
fn config(extra: &str) -> String {
    format!("{extra}\n[bridges.br0]\n")
}

fn start(c: &Container) -> Result<()> {
    c.run(&["systemctl", "start", UNIT]).with_context(|| {
        format!(
            "{UNIT} did not start:\n{}\n{}",
            c.journal(UNIT).unwrap_or_default(),
            c.log_text()
        )
    })?;
    Ok(())
}

#[test]
fn ready_comes_after_the_hooks_attach_and_the_first_repair() -> Result<()> {
    let test = "ready_comes_after_the_hooks_attach_and_the_first_repair";
    let Some(c) = Container::for_test(test, "sdready", 2, &config(""))? else {
        return Ok(());
    };
    let lab = &c.lab;
    // Kernel STP is on and the ports are still listening: only a repair makes them forward.
    ensure!(lab.unhealthy()?.is_some(), "the lab starts out broken");
    // Type=notify: `systemctl start` returns once the agent has said READY=1.
    start(&c)?;
    let pid = c.main_pid()?;
    assert_eq!(c.show(UNIT, "ActiveState")?, "active");
    assert!(
        lab.unhealthy()?.is_none(),
        "READY before the first repair pass: {:?}",
        lab.unhealthy()?
    );
    let journal = c.journal(UNIT)?;
    let ready = journal
        .lines()
        .find(|l| l.contains("bridge-guard: ready: guarding br0"))
        .with_context(|| format!("no readiness line:\n{journal}"))?;
    // Each hook on an eBPF tier is BPF links the agent already holds; a hook left to netlink
    // (`none`) needs none.
    let ebpf_hooks = ready
        .split([' ', '(', ')', ';'])
        .filter(|w| w.contains('=') && !w.ends_with("=netlink") && !w.ends_with("=none"))
        .count();
    let links = c.bpf_links(pid)?;
    assert!(
        (ebpf_hooks == 0) == (links == 0),
        "READY says {ready:?} but the agent holds {links} BPF links"
    );
    if ebpf_hooks == 0 {
        skip(
            &format!("{test} (hooks part)"),
            Need::Tier {
                hook: "port-state",
                tier: "tracepoint",
            },
            format_args!("no eBPF hook attaches on this kernel: {ready}"),
        );
    }
    // From then on STATUS= says how the bridge is doing.
    c.wait_published("showing both ports forwarding in STATUS=", HEAL, |c| {
        let status = c.show(UNIT, "StatusText")?;
        Ok((!status.starts_with("guarding br0: 2/2 forwarding, ")
            || !status.contains(" in the last hour"))
        .then_some(status))
    })?;
    Ok(())
}

#[test]
fn the_watchdog_restarts_a_stopped_agent_and_a_restart_keeps_the_learned_taps() -> Result<()> {
    let test = "the_watchdog_restarts_a_stopped_agent_and_a_restart_keeps_the_learned_taps";
    let Some(c) = Container::for_test(test, "sdwatch", 2, &config(""))? else {
        return Ok(());
    };
    let lab = &c.lab;
    start(&c)?;
    lab.wait_healthy(HEAL)?;
    let first = c.main_pid()?;
    // The agent has published vnet1 as a member of br0 (it learned it: no pattern names it).
    c.wait_published("publishing vnet1", HEAL, |c| {
        let state = std::fs::read_to_string(c.state_dir().join("status.json")).unwrap_or_default();
        Ok((!state.contains("\"vnet1\"")).then(|| format!("state: {state}")))
    })?;

    // Stopped, it cannot ping the watchdog nor see vnet1 leave.
    c.run(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=SIGSTOP",
        UNIT,
    ])?;
    lab.host.ip("link set vnet1 nomaster")?;
    // Healthy again only once a new agent has taken vnet1 from the state file the stopped
    // one left in /run/bridge-guard, and re-attached it.
    lab.wait_healthy(WATCHDOG_RESTART)
        .with_context(|| c.journal(UNIT).unwrap_or_default())?;
    let second = c.main_pid()?;
    assert_ne!(first, second, "a new agent");
    assert_eq!(c.show(UNIT, "NRestarts")?, "1");
    let journal = c.journal(UNIT)?;
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert!(
        journal.contains("repaired: re-attach vnet1 to br0"),
        "{journal}"
    );

    // `systemctl restart` keeps /run/bridge-guard (RuntimeDirectoryPreserve=restart); a stop
    // removes it.
    c.run(&["touch", "/run/bridge-guard/kept-by-restart"])?;
    c.run(&["systemctl", "restart", UNIT])?;
    assert_ne!(c.main_pid()?, second);
    c.run(&["test", "-e", "/run/bridge-guard/kept-by-restart"])
        .context("systemctl restart removed /run/bridge-guard")?;
    c.run(&["systemctl", "stop", UNIT])?;
    c.run(&["test", "!", "-e", "/run/bridge-guard"])
        .context("systemctl stop left /run/bridge-guard")?;
    Ok(())
}

/// The shipped unit turned into a one-shot `doctor --json`: every sandboxing line as shipped.
fn doctor_unit(shipped: &str) -> Result<String> {
    // Lines about running a daemon, which a one-shot cannot have.
    const DAEMON: &[&str] = &[
        "NotifyAccess=",
        "ExecReload=",
        "WatchdogSec=",
        "Restart=",
        "RestartSec=",
        "RestartPreventExitStatus=",
        "RuntimeDirectoryPreserve=",
    ];
    let mut out = String::new();
    let mut dropped = 0;
    for line in shipped.lines() {
        if line == "Type=notify" {
            out.push_str(
                "Type=oneshot\nStandardOutput=truncate:/run/bg-doctor.json\nStandardError=journal\n",
            );
        } else if line.starts_with("ExecStart=") {
            out.push_str("ExecStart=/usr/bin/bridge-guard doctor --json\n");
        } else if DAEMON.iter().any(|d| line.starts_with(d)) {
            dropped += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    ensure!(
        dropped == DAEMON.len() && out.contains("Type=oneshot") && out.contains("doctor --json"),
        "the shipped unit changed shape: adjust doctor_unit"
    );
    Ok(out)
}

/// What decides the hook tiers, from `doctor --json`.
fn tiers(doctor: &Value) -> Value {
    serde_json::json!({
        "hooks": doctor["ebpf"]["hooks"]
            .as_array()
            .map(|hooks| hooks.iter().map(|h| (h["hook"].clone(), h["tier"].clone())).collect::<Vec<_>>()),
        "loaded": doctor["ebpf"]["loaded"],
        "programs": doctor["programs"],
        "timer_context": doctor["ebpf"]["timer_context"],
        "fd_timer_fn": doctor["fd_timer_fn"].is_string(),
        "btf": doctor["btf"]["sources"],
    })
}

#[test]
fn the_hardened_unit_leaves_the_hook_tiers_as_they_are_outside_it() -> Result<()> {
    let test = "the_hardened_unit_leaves_the_hook_tiers_as_they_are_outside_it";
    let Some(c) = Container::for_test(test, "sddoctor", 1, &config(""))? else {
        return Ok(());
    };
    let outside = c
        .lab
        .host
        .command(agent_bin())
        .args(["doctor", "--json"])
        .output()?;
    ensure!(outside.status.success(), "doctor failed outside");
    let outside: Value = serde_json::from_slice(&outside.stdout)?;

    let shipped = std::fs::read_to_string(repo().join("packaging/systemd").join(UNIT))?;
    let out = c.exec(
        &["sh", "-c", "cat > /etc/systemd/system/bg-doctor.service"],
        Some(&doctor_unit(&shipped)?),
    )?;
    ensure!(out.status.success(), "writing the doctor unit failed");
    c.run(&["systemctl", "daemon-reload"])?;
    c.run(&["systemctl", "start", "bg-doctor.service"])
        .with_context(|| c.journal("bg-doctor.service").unwrap_or_default())?;
    let inside: Value = serde_json::from_str(&c.run(&["cat", "/run/bg-doctor.json"])?)?;
    assert_eq!(
        tiers(&inside),
        tiers(&outside),
        "the unit's sandbox changes what the agent can hook; inside:\n{inside:#}"
    );
    // Inside the unit only the unit's capabilities are there: the sandbox really applied.
    assert_eq!(inside["capabilities"]["CAP_SYS_ADMIN"], false, "{inside:#}");
    assert_eq!(inside["capabilities"]["CAP_BPF"], true, "{inside:#}");
    Ok(())
}

#[test]
fn a_bad_config_stops_the_unit_with_78_and_no_restart_loop() -> Result<()> {
    let test = "a_bad_config_stops_the_unit_with_78_and_no_restart_loop";
    let Some(c) = Container::for_test(test, "sdbad", 1, "[bridges.br0]\nstp = false\n")? else {
        return Ok(());
    };
    let started = c.exec(&["systemctl", "start", UNIT], None)?;
    assert!(!started.status.success(), "a bad configuration started");
    assert_eq!(c.show(UNIT, "ExecMainStatus")?, "78");
    assert_eq!(c.show(UNIT, "Result")?, "exit-code");
    // `failed`, not `auto-restart`: no restart is scheduled, now or later.
    assert_eq!(c.show(UNIT, "ActiveState")?, "failed");
    assert_eq!(c.show(UNIT, "SubState")?, "failed");
    assert_eq!(c.show(UNIT, "NRestarts")?, "0");
    let journal = c.journal(UNIT)?;
    assert!(
        journal.contains("/etc/bridge-guard/config.toml:2:1: unknown field `stp`"),
        "the journal says where: {journal}"
    );
    Ok(())
}

#[test]
fn systemctl_reload_applies_a_config_change_without_dropping_the_hooks() -> Result<()> {
    let test = "systemctl_reload_applies_a_config_change_without_dropping_the_hooks";
    let Some(c) = Container::for_test(test, "sdreload", 2, &config("observe = true"))? else {
        return Ok(());
    };
    let lab = &c.lab;
    start(&c)?;
    let pid = c.main_pid()?;
    let links = c.bpf_links(pid)?;
    assert_eq!(lab.stp_state()?, 1, "observe-only repairs nothing");
    c.write_config(&config("observe = false"))?;
    c.run(&["systemctl", "reload", UNIT])?;
    lab.wait_healthy(HEAL)
        .with_context(|| c.journal(UNIT).unwrap_or_default())?;
    assert_eq!(c.main_pid()?, pid, "reloaded in place, not restarted");
    assert_eq!(c.show(UNIT, "NRestarts")?, "0");
    assert_eq!(c.bpf_links(pid)?, links, "the hooks stayed attached");
    let journal = c.journal(UNIT)?;
    assert!(
        journal.contains("reload: configuration from /etc/bridge-guard/config.toml applied"),
        "{journal}"
    );
    c.wait_published("leaving observe-only in STATUS=", HEAL, |c| {
        let status = c.show(UNIT, "StatusText")?;
        Ok(
            (status.contains("observe-only") || !status.contains("2/2 forwarding"))
                .then_some(status),
        )
    })?;

    // A broken file on reload keeps the agent running as it was.
    c.write_config("[bridges.br0\n")?;
    c.run(&["systemctl", "reload", UNIT])?;
    lab.host.ip("link set br0 down")?;
    lab.wait_healthy(HEAL)
        .with_context(|| c.journal(UNIT).unwrap_or_default())?;
    assert_eq!(c.main_pid()?, pid);
    assert_eq!(c.show(UNIT, "ActiveState")?, "active");

    // Structured journal fields under their own names, at syslog's info priority.
    let entries = c.run(&[
        "journalctl",
        "-b",
        "-u",
        UNIT,
        "PORT=vnet1",
        "-o",
        "json",
        "--no-pager",
    ])?;
    let entries: Vec<Value> = entries
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let transition = entries
        .iter()
        .find(|e| e["MESSAGE"] == "port state")
        .with_context(|| format!("no `port state` entry for PORT=vnet1: {entries:?}"))?;
    assert_eq!(transition["BRIDGE"], "br0", "{transition}");
    assert_eq!(
        transition["PRIORITY"], "6",
        "info is syslog's info: {transition}"
    );
    assert!(transition.get("F_PORT").is_none(), "{transition}");
    Ok(())
}

#[test]
fn the_systemd_unit_verifies_clean_and_says_what_it_must() -> Result<()> {
    let unit = std::fs::read_to_string(repo().join("packaging/systemd").join(UNIT))?;
    let lines: Vec<&str> = unit.lines().collect();
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Before=network-pre.target",
        "Wants=network-pre.target",
        "WatchdogSec=10s",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "RuntimeDirectory=bridge-guard",
        "RuntimeDirectoryPreserve=restart",
        "LimitMEMLOCK=infinity",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF CAP_PERFMON CAP_SYSLOG",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_BPF CAP_PERFMON CAP_SYSLOG",
    ] {
        assert!(lines.contains(&want), "the unit lacks `{want}`");
    }
    assert!(lines.iter().any(|l| l.starts_with("OOMScoreAdjust=-")));
    for unwanted in [
        "After=network-pre.target",
        "CAP_SYS_RESOURCE",
        "ProtectKernelTunables=yes",
    ] {
        assert!(
            !lines
                .iter()
                .any(|l| !l.starts_with('#') && l.contains(unwanted)),
            "the unit has `{unwanted}`"
        );
    }
    let Some(analyze) = which("systemd-analyze") else {
        skip(
            "the_systemd_unit_verifies_clean_and_says_what_it_must",
            Need::Tool("systemd-analyze"),
            "no systemd-analyze (cargo xtask test installs it)",
        );
        return Ok(());
    };
    // verify checks that ExecStart exists and that `man` finds the Documentation= pages:
    // point it at the binary under test and at the pages it generates.
    let dir = Scratch::new("verify");
    let man = dir.0.join("man");
    let out = Command::new(agent_bin())
        .arg("manpage")
        .arg(man.join("man8"))
        .output()?;
    ensure!(out.status.success(), "manpage failed: {out:?}");
    std::fs::write(
        dir.0.join(UNIT),
        unit.replace("/usr/bin/bridge-guard", &agent_bin().to_string_lossy()),
    )?;
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.0.join(UNIT))
        .env("MANPATH", &man)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.trim().is_empty(), "systemd-analyze verify warns: {err}");
    Ok(())
}

/// Fails unless the repository's `file` contains each of `wants`.
fn assert_contains(file: &str, wants: &[&str]) -> Result<()> {
    let text = std::fs::read_to_string(repo().join(file))?;
    for want in wants {
        ensure!(text.contains(want), "{file} lacks {want}");
    }
    Ok(())
}

#[test]
fn the_nix_files_parse_and_the_module_follows_nixpkgs() -> Result<()> {
    let Some(nix) = which("nix-instantiate") else {
        skip(
            "the_nix_files_parse_and_the_module_follows_nixpkgs",
            Need::Tool("nix-instantiate"),
            "no nix-instantiate (cargo xtask test installs nix-bin)",
        );
        return Ok(());
    };
    for file in ["flake.nix", "nix/module.nix", "nix/package.nix"] {
        let out = Command::new(&nix)
            .arg("--parse")
            .arg(repo().join(file))
            .output()?;
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_contains(
        "nix/module.nix",
        &[
            "lib.mkEnableOption",
            "lib.mkPackageOption",
            "freeformType = settingsFormat.type",
            "systemd.packages = [ cfg.package ]",
            "check-config",
            "openFirewall",
            "ReadWritePaths",
            "notify-reload",
            "19469",
        ],
    )?;
    assert_contains(
        "nix/package.nix",
        &[
            "lib.fileset",
            "library/Cargo.lock",
            "meta",
            "BRIDGE_GUARD_REQUIRE_EBPF",
        ],
    )?;
    assert_contains(
        "flake.nix",
        &[
            "packages",
            "overlays.default",
            "nixosModules.default",
            "checks",
        ],
    )?;
    Ok(())
}
