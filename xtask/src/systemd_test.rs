//! The container root for `tests/tests/systemd.rs`: a minimal Debian (bookworm: systemd 252)
//! made by debootstrap, booted with systemd-nspawn so that the shipped unit runs under a real
//! systemd as PID 1 (this machine's own PID 1 is not systemd).
//!
//! Built once into `<tools>/nspawn/` and kept: about two minutes and 250 MB, from Debian's
//! archive. Containers boot it with `--volatile=overlay`, so it stays as built.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

/// Tells the tests where the root is; they skip, saying why, without it.
pub const ROOT_ENV: &str = "BRIDGE_GUARD_NSPAWN_ROOT";

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the tests need inside: systemd as init, its journal, D-Bus for systemctl, `ip`, and
/// procps for the unit's `ExecReload=/bin/kill` (installed on any standard Debian).
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2,procps";

/// The cached root, built first if missing.
pub fn ensure_root() -> Result<PathBuf> {
    let dir = crate::setup::tools_dir()?.join("nspawn");
    let root = dir.join(format!("debian-{SUITE}"));
    // Written last, naming what is in the root: a root without it is half-made, and one with
    // other packages is out of date; either is built again.
    let stamp = dir.join(format!("debian-{SUITE}.ok"));
    let contents = format!("{SUITE} {PACKAGES}\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == contents)
        && root.join("usr/lib/systemd/systemd").is_file()
    {
        return Ok(root);
    }
    eprintln!(
        "xtask: building the systemd test container's root ({SUITE}, debootstrap from {MIRROR} \
         into {}; about two minutes, once)",
        root.display()
    );
    let partial = dir.join(format!("debian-{SUITE}.partial"));
    for old in [&partial, &root] {
        if old.exists() {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
            .arg(&partial)
            .arg(MIRROR),
    )
    .with_context(|| {
        format!("debootstrap failed: check that {MIRROR} is reachable (the tests need it once)")
    })?;
    std::fs::rename(&partial, &root)
        .with_context(|| format!("moving {} into place", partial.display()))?;
    std::fs::write(&stamp, contents)?;
    Ok(root)
}
