//! `bridge-guard status` as an unprivileged user against the real agent: it shows the bridges,
//! reads `--config` like `run`, and its exit code follows their health, refusals, and whether
//! the agent is running (judged by the state file's heartbeat).

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use integration_tests::{Agent, PREFIX, VmLab, VmLabChecks as _, agent_bin, skip_unless_root};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// `bridge-guard status ARGS` as user nobody: (exit code, stdout, stderr).
fn status_as_nobody(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(agent_bin())
        .arg("status")
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .context("running status as nobody")?;
    Ok((
        out.status.code().context("status was killed")?,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn dir_arg(agent: &Agent) -> String {
    agent.state_dir.to_string_lossy().into_owned()
}

#[test]
fn status_as_nobody_shows_the_bridges_and_exits_by_their_health() -> Result<()> {
    if skip_unless_root("status_as_nobody_shows_the_bridges_and_exits_by_their_health") {
        return Ok(());
    }
    let lab = VmLab::new(PREFIX, "status", 1)?;
    // --no-keep-up: a bridge set down stays down, so "unhealthy" lasts long enough to see.
    let agent = Agent::run(&lab.host, &["--bridge", "br0", "--no-keep-up"])?;
    lab.wait_healthy(WAIT)?;
    // Healthy as soon as the port forwards: the bridge's carrier came on with it, although
    // the kernel tells of that up to a second later (linkwatch).
    agent.wait_status("every port forwarding", WAIT, |s| {
        s["bridges"][0]["ports"][0]["state"] == "forwarding"
    })?;
    let dir = dir_arg(&agent);

    let mode = std::fs::metadata(agent.state_dir.join("status.json"))?;
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777 == 0o644,
        "the state file is not 0644"
    );
    let (code, out, err) = status_as_nobody(&["--state-dir", &dir])?;
    ensure!(code == 0, "healthy, yet exit {code}:\n{out}{err}");
    ensure!(out.contains("br0: healthy"), "{out}");
    ensure!(out.contains("vnet0") && out.contains("forwarding"), "{out}");

    // --config, as `run` reads it: its state_dir.
    let config = std::env::temp_dir().join(format!("{}-status.toml", lab.host.name));
    std::fs::write(&config, format!("state_dir = \"{dir}\"\n"))?;
    let (code, out, _) = status_as_nobody(&["--config", &config.to_string_lossy()])?;
    ensure!(
        code == 0 && out.contains("br0: healthy"),
        "via --config: {code}\n{out}"
    );
    let (code, _, err) = status_as_nobody(&["--config", "/nonexistent/bg.toml"])?;
    ensure!(code == 78, "a missing --config file: exit {code}: {err}");
    let _ = std::fs::remove_file(&config);

    // The heartbeat: the file is rewritten though nothing changes.
    let before = agent.status()?["updated_unix_ns"].as_u64().unwrap_or(0);
    agent.wait_status("a heartbeat", Duration::from_secs(15), |s| {
        s["updated_unix_ns"].as_u64().unwrap_or(0) > before
    })?;

    lab.host.ip("link set br0 down")?;
    agent.wait_status("br0 down", WAIT, |s| s["bridges"][0]["admin_up"] == false)?;
    let (code, out, _) = status_as_nobody(&["--state-dir", &dir])?;
    ensure!(code == 1, "br0 is down, yet exit {code}:\n{out}");
    ensure!(out.contains("br0 is administratively down"), "{out}");
    let (code, out, _) = status_as_nobody(&["-j", "--state-dir", &dir])?;
    let v: Value = serde_json::from_str(&out)?;
    ensure!(
        code == 1 && v["verdict"] == "unhealthy" && v["exit_code"] == 1,
        "{v:#}"
    );
    lab.host.ip("link set br0 up")?;

    // A tunnel port: repairs could make a loop, so the agent refuses the bridge.
    lab.host
        .ip("link add vx0 type vxlan id 42 dstport 4789 local 198.18.1.1")?;
    lab.host.ip("link set vx0 master br0")?;
    agent.wait_status("a refusal", WAIT, |s| {
        s["bridges"][0]["refusals"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    })?;
    let (code, out, _) = status_as_nobody(&["--state-dir", &dir])?;
    ensure!(code == 4, "refused, yet exit {code}:\n{out}");
    ensure!(out.contains("REFUSED") && out.contains("refused:"), "{out}");
    Ok(())
}

#[test]
fn a_missing_or_stale_state_file_means_the_agent_is_not_running() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("bgt-{}-stale-state", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let arg = dir.to_string_lossy().into_owned();
    let run = |args: &[&str]| -> Result<(i32, String, String)> {
        if unsafe { libc::geteuid() } == 0 {
            status_as_nobody(args)
        } else {
            let out = Command::new(agent_bin())
                .arg("status")
                .args(args)
                .output()?;
            Ok((
                out.status.code().context("killed")?,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    };
    let (code, _, err) = run(&["--state-dir", &arg])?;
    ensure!(code == 3 && err.contains("no agent state"), "{code}: {err}");

    // Written a minute ago by an agent with a 5 s heartbeat: it stopped long since, whatever
    // its pid is now (here: ours, which is alive).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let state = serde_json::json!({
        "pid": std::process::id(),
        "updated_unix_ns": now - 60_000_000_000,
        "heartbeat_secs": 5,
        "hooks": "netlink only",
        "observe": false,
        "bridges": [],
    });
    write_world_readable(&dir.join("status.json"), &state.to_string())?;
    let (code, out, _) = run(&["--state-dir", &arg])?;
    ensure!(code == 3, "a stale state, yet exit {code}:\n{out}");
    ensure!(out.contains("NOT running"), "{out}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn write_world_readable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}
