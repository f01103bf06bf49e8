//! `bridge-guard status`: what the running agent knows about each guarded bridge and port,
//! and whether they are healthy, as an exit code scripts and monitoring can use.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;

use crate::{
    config,
    status::{Status, StatusError, Style, Verdict},
    sys::color::ColorChoice,
};

/// Exit codes, as `--help` and the README document them.
const EXIT_CODES: &str = "Exit status:
  0  every guarded bridge is healthy: it exists, is up with carrier, and every port forwards
  1  a guarded bridge is not healthy (the report says what is wrong)
  3  the agent is not running: no state file, or one older than 3 heartbeats (15 s)
  4  the agent refuses to repair a bridge (a loop or an owner it could fight; see `refused:`)
  5  the state file exists but cannot be read
 78  the configuration is invalid";

/// Ends `status` with `code`, after its report is printed.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub u8);

#[derive(Debug, clap::Args)]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// Print the agent's state as JSON, with `verdict` and `exit_code` added.
    #[arg(short = 'j', long)]
    json: bool,
    /// The configuration `run` uses, for its state_dir [default: /etc/bridge-guard/config.toml,
    /// if readable].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent's state directory (its --state-dir) [default: the configuration's state_dir,
    /// else /run/bridge-guard].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Colour the report.
    #[arg(long, value_enum, default_value_t, value_name = "WHEN")]
    color: ColorChoice,
}

fn now_unix_ns() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(0)
}

/// The state directory: the flag, else the configuration's. The default configuration may be
/// unreadable for unprivileged users (it is root's): then the default directory is used.
fn state_dir(args: &Args) -> Result<PathBuf, Exit> {
    if let Some(dir) = &args.state_dir {
        return Ok(dir.clone());
    }
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    match config::load(&path, explicit) {
        Ok(s) => Ok(s.state_dir),
        Err(config::ConfigError::Read { source, .. })
            if !explicit && source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            let dir = config::Settings::default().state_dir;
            eprintln!(
                "bridge-guard: note: cannot read {} ({source}); looking for the agent's state in \
                 {} (give --state-dir or --config otherwise)",
                path.display(),
                dir.display()
            );
            Ok(dir)
        }
        Err(e) => {
            eprintln!("bridge-guard: error: {}", crate::error_chain(&e));
            Err(Exit(78))
        }
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let dir = state_dir(args)?;
    let now = now_unix_ns();
    let status = match Status::read(&dir) {
        Ok(s) => s,
        Err(e @ StatusError::Missing { .. }) => {
            eprintln!("bridge-guard: {e}");
            return Err(Exit(Verdict::NotRunning.exit_code()).into());
        }
        Err(e) => {
            eprintln!("bridge-guard: error: {}", crate::error_chain(&e));
            return Err(Exit(5).into());
        }
    };
    let verdict = status.verdict(now);
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = serde_json::to_value(&status)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "verdict".into(),
                format!("{verdict:?}").to_lowercase().into(),
            );
            obj.insert("exit_code".into(), verdict.exit_code().into());
        }
        writeln!(out, "{v:#}")?;
    } else {
        write!(out, "{}", status.render(now, &Style::stdout(args.color)))?;
    }
    out.flush().context("writing the report")?;
    match verdict.exit_code() {
        0 => Ok(()),
        code => Err(Exit(code).into()),
    }
}
