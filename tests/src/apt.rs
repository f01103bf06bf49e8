//! Test tools from Debian's archive, installed when missing: with apt, waiting for another
//! user's dpkg lock rather than failing on it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, PoisonError},
};

use anyhow::{Context as _, Result, bail};

/// Serialises installs from tests running in parallel in this process.
static APT: Mutex<()> = Mutex::new(());

pub use netlab::which;

fn apt_get(args: &[&str], cwd: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.args(["-o", "DPkg::Lock::Timeout=600", "-q"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    netlab::run(&mut cmd).map(drop)
}

/// Runs `apt-get ARGS`, and if that fails, `apt-get update` and once more (a fresh machine's
/// package lists may be missing or stale).
fn apt_get_retrying(args: &[&str], cwd: Option<&Path>) -> Result<()> {
    if apt_get(args, cwd).is_ok() {
        return Ok(());
    }
    apt_get(&["update"], None).context("apt-get update failed: is Debian's archive reachable?")?;
    apt_get(args, cwd)
}

/// The path of `program`, installing Debian's `package` with apt first when it is missing.
pub fn ensure(program: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = which(program) {
        return Ok(p);
    }
    let _one = APT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = which(program) {
        return Ok(p);
    }
    if which("apt-get").is_none() {
        bail!("this test needs `{program}` (Debian package {package}) and there is no apt-get");
    }
    eprintln!("installing {package} for `{program}` with apt-get");
    apt_get_retrying(&["install", "-y", "--no-install-recommends", package], None).with_context(
        || format!("cannot install {package}, which this test needs for `{program}`"),
    )?;
    which(program).with_context(|| format!("{package} is installed but `{program}` is not there"))
}

/// `promtool`: on PATH, or from Debian's `prometheus` package unpacked under `target/` (not
/// installed: that would start a Prometheus server on the machine).
pub fn promtool() -> Result<PathBuf> {
    if let Some(p) = which("promtool") {
        return Ok(p);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/prometheus");
    let bin = dir.join("usr/bin/promtool");
    let _one = APT.lock().unwrap_or_else(PoisonError::into_inner);
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "fetching Debian's prometheus package for promtool into {}",
        dir.display()
    );
    apt_get_retrying(&["download", "prometheus"], Some(&dir))
        .context("cannot download Debian's prometheus package, which has promtool")?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    netlab::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
    anyhow::ensure!(bin.is_file(), "{} has no usr/bin/promtool", deb.display());
    Ok(bin)
}
