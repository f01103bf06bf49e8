//! Running in production: the configuration file, the systemd notification protocol, restarts
//! and missing privileges. The shipped unit under a real systemd, and its and the Nix files'
//! static checks, are in `systemd.rs`.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    Agent, PREFIX, TALK, VmLab, VmLabChecks as _, agent_bin, skip_unless_root,
};

const HEAL: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A file in a directory of its own (the name matters: systemd reads a unit's name from it),
/// both removed on drop.
struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempFile {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn temp_file(name: &str, text: &str) -> anyhow::Result<TempFile> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("bgt-{}-{n}-files", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(TempFile(path))
}

#[test]
fn check_config_accepts_the_example_and_locates_every_kind_of_error() -> anyhow::Result<()> {
    let example = repo().join("packaging/config.example.toml");
    let out = Command::new(agent_bin())
        .arg("check-config")
        .arg(&example)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("guard virbr0: stp_off, force_forwarding, reattach, keep_up; ports vnet*"),
        "{stdout}"
    );

    for (name, text, at, says) in [
        (
            "unknown.toml",
            "observe = false\n[bridges.virbr0]\nstp = false\n",
            ":3:1: ",
            "unknown field `stp`",
        ),
        (
            "type.toml",
            "[bridges.virbr0]\nkeep_up = \"yes\"\n",
            ":2:11: ",
            "invalid type",
        ),
        (
            "impossible.toml",
            "summary_interval_secs = 0\n",
            ":1:25: ",
            "is impossible",
        ),
        (
            "name.toml",
            "[bridges.\"vir/br0\"]\n",
            ":1:10: ",
            "not an interface name",
        ),
    ] {
        let path = temp_file(name, text)?;
        let out = Command::new(agent_bin())
            .arg("check-config")
            .arg(&path)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("{}{at}", path.display())),
            "{name} not located at {at}: {err}"
        );
        assert!(err.contains(says), "{name}: {err}");
        assert!(err.contains("hint: "), "{name} has no hint: {err}");
    }
    let out = Command::new(agent_bin())
        .args(["check-config", "/nonexistent/bg.toml"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read the configuration /nonexistent/bg.toml")
    );
    Ok(())
}

#[test]
fn the_config_file_drives_the_agent_and_flags_override_it() -> anyhow::Result<()> {
    if skip_unless_root("the_config_file_drives_the_agent_and_flags_override_it") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "conf", 1)?;
    let config = temp_file(
        &format!("{}.toml", lab.host.name),
        "observe = true\nlog_format = \"json\"\n[bridges.br0]\nports = [\"vnet*\"]\n",
    )?;
    let config_arg = config.to_string_lossy().into_owned();
    // From the file: the bridge, observe-only, JSON logs.
    let agent = Agent::run(&lab.host, &["--config", &config_arg])?;
    assert!(
        agent.ready.contains("guarding br0") && agent.ready.contains("observe-only"),
        "{}",
        agent.ready
    );
    assert!(
        agent.log.iter().any(|l| l.starts_with('{')),
        "logs are JSON: {}",
        agent.log_text()
    );
    drop(agent);
    // Flags win: text logs and another bridge name (absent here: nothing to do, still ready).
    let agent = Agent::run(
        &lab.host,
        &[
            "--config",
            &config_arg,
            "--log-format",
            "text",
            "--bridge",
            "br9",
        ],
    )?;
    assert!(agent.ready.contains("guarding br9"), "{}", agent.ready);
    assert!(
        !agent.log.iter().any(|l| l.starts_with('{')),
        "{}",
        agent.log_text()
    );
    Ok(())
}

/// Reads datagrams from `sock` until one satisfies `pred` or `timeout` passes.
fn wait_datagram(
    sock: &UnixDatagram,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            !left.is_zero(),
            "no matching datagram within {timeout:?}; got {seen:?}"
        );
        sock.set_read_timeout(Some(left))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if pred(&msg) {
                    return Ok(msg);
                }
                seen.push(msg);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[test]
fn sd_notify_ready_status_watchdog_and_stopping() -> anyhow::Result<()> {
    if skip_unless_root("sd_notify_ready_status_watchdog_and_stopping") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "notify", 1)?;
    let path = std::env::temp_dir().join(format!("{}.notify", lab.host.name));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path)?;
    let path_arg = path.to_string_lossy().into_owned();
    // 200 ms watchdog: the agent must ping every 100 ms.
    let mut agent = Agent::run_with(
        &lab.host,
        &[],
        &["--bridge", "br0"],
        &[("NOTIFY_SOCKET", &path_arg), ("WATCHDOG_USEC", "200000")],
    )?;
    let ready = wait_datagram(&sock, HEAL, |m| m.contains("READY=1"))?;
    assert!(
        ready.contains("STATUS=guarding br0 (port-state="),
        "{ready}"
    );
    // READY came after the first reconcile: the lab is already repaired.
    assert!(
        lab.unhealthy()?.is_none(),
        "READY before the first repair pass"
    );
    // Then STATUS= says how the bridge is doing.
    wait_datagram(&sock, Duration::from_secs(5), |m| {
        m.starts_with("STATUS=guarding br0: ") && m.contains("/1 forwarding, ")
    })?;
    for _ in 0..3 {
        wait_datagram(&sock, Duration::from_secs(5), |m| m == "WATCHDOG=1")?;
    }
    let status = agent.terminate()?;
    assert!(status.success(), "{status}: {}", agent.log_text());
    wait_datagram(&sock, Duration::from_secs(5), |m| m == "STOPPING=1")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[test]
fn a_restart_in_the_middle_of_an_outage_still_repairs_it() -> anyhow::Result<()> {
    if skip_unless_root("a_restart_in_the_middle_of_an_outage_still_repairs_it") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "restart", 2)?;
    let mut first = Agent::run(&lab.host, &["--bridge", "br0"])?;
    lab.wait_healthy(HEAL)?;
    first.kill()?; // a crash: no clean shutdown
    // The outage begins while no agent runs.
    lab.host.ip("link set br0 type bridge stp_state 1")?;
    lab.host.ip("link set vnet1 nomaster")?;
    lab.host.ip("link set br0 down")?;
    assert!(lab.unhealthy()?.is_some());
    // No --port-pattern: vnet1's membership comes from what the first agent published.
    let mut second = Agent::run(&lab.host, &["--bridge", "br0"])?;
    lab.wait_healthy(HEAL)?;
    assert_eq!(lab.stp_state()?, 0);
    // Repaired in the first pass, before or after the readiness line.
    let reattached = "repaired: re-attach vnet1 to br0";
    if !second.log_text().contains(reattached) {
        second.wait_log("re-attach", HEAL, |l| l.contains(reattached))?;
    }
    lab.guests_talk(0, 1, TALK)?;
    drop(first);
    Ok(())
}

#[test]
fn without_cap_net_admin_it_observes_or_refuses_when_repair_is_required() -> anyhow::Result<()> {
    if skip_unless_root("without_cap_net_admin_it_observes_or_refuses_when_repair_is_required") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "nocap", 1)?;
    let drop_net_admin = [
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
    ];
    let mut agent = Agent::run_with(&lab.host, &drop_net_admin, &["--bridge", "br0"], &[])?;
    assert!(agent.ready.contains("observe-only"), "{}", agent.ready);
    agent.wait_logged(
        "the log line no CAP_NET_ADMIN: running observe-only",
        HEAL,
        |l| l.contains("no CAP_NET_ADMIN: running observe-only"),
    )?;
    assert_eq!(lab.stp_state()?, 1, "nothing repaired");
    drop(agent);

    let out = lab
        .host
        .command("setpriv")
        .args(["--bounding-set=-net_admin", "--inh-caps=-net_admin"])
        .arg(agent_bin())
        .args(["run", "--bridge", "br0", "--require-repair", "--state-dir"])
        .arg(std::env::temp_dir().join(format!("{}-req", lab.host.name)))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("repair needs CAP_NET_ADMIN"), "{err}");
    Ok(())
}

#[test]
fn without_cap_bpf_it_runs_on_netlink_alone_and_still_repairs() -> anyhow::Result<()> {
    if skip_unless_root("without_cap_bpf_it_runs_on_netlink_alone_and_still_repairs") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "nobpf", 1)?;
    let no_bpf = [
        "setpriv",
        "--bounding-set=-bpf,-perfmon,-sys_admin",
        "--inh-caps=-bpf,-perfmon,-sys_admin",
    ];
    let mut agent = Agent::run_with(&lab.host, &no_bpf, &["--bridge", "br0"], &[])?;
    assert!(agent.ready.contains("netlink only"), "{}", agent.ready);
    agent.wait_logged("the log line running on netlink alone", HEAL, |l| {
        l.contains("running on netlink alone")
    })?;
    lab.wait_healthy(HEAL)?;
    lab.host.ip("link set br0 down")?;
    agent.wait_log("bridge up", HEAL, |l| l.contains("repaired: set br0 up"))?;
    lab.wait_healthy(HEAL)
}
