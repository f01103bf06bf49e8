//! What the host needs to boot kernels: Debian packages (qemu, kmod, a static busybox) and
//! virtme-ng in its own virtualenv under the tools directory. Everything is checked first and
//! installed only when missing, so a second run touches neither apt nor PyPI.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{output, step};

/// The virtme-ng release this was tried with. Newer ones change flags and guest behaviour, so
/// moving it is a deliberate act (the venv directory is named after it).
pub const VIRTME_NG_VERSION: &str = "1.42";

/// Debian packages the VMs need, and why.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "the virtual machine"),
    ("kmod", "depmod on the host, modprobe in the guest"),
    (
        "busybox-static",
        "virtme-ng's initramfs (Debian kernels have virtio and 9p as modules)",
    ),
    (
        "file",
        "virtme-ng reads the kernel version from the image with it",
    ),
    ("iproute2", "`ip netns` and bridges in the tests"),
];

/// apt, with `apt-get update` run at most once per xtask run and only when something has to
/// come from the archive.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    pub fn updated(&self) -> bool {
        self.updated
    }

    pub fn update_once(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        step("apt-get update");
        crate::run(Command::new("apt-get").args(["update", "-q"])).context(
            "apt-get update failed: vmtest needs Debian's package archive (deb.debian.org or \
             a mirror) for qemu, kmod, busybox-static and the kernels",
        )?;
        self.updated = true;
        Ok(())
    }

    pub fn install(&mut self, packages: &[&str]) -> Result<()> {
        self.update_once()?;
        step(&format!("apt-get install {}", packages.join(" ")));
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("cannot install {} with apt-get", packages.join(" ")))
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

/// Refuses hosts that cannot run the rest: not root, no apt, not amd64.
pub fn check() -> Result<()> {
    if !crate::is_root() {
        bail!(
            "vmtest needs root: it installs packages, links kernel modules into /lib/modules \
             and runs the tests as root in the guest. Run `sudo -E cargo xtask vmtest`"
        );
    }
    let arch = output(Command::new("dpkg").arg("--print-architecture")).context(
        "vmtest needs a Debian-based host (dpkg and apt-get): the kernels come from Debian's \
         archive",
    )?;
    if arch.trim() != "amd64" {
        bail!(
            "vmtest boots Debian's amd64 kernels and this host is {}",
            arch.trim()
        );
    }
    Ok(())
}

/// Installs the Debian packages that are missing.
pub fn ensure_packages(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(p, _)| !installed(p))
        .map(|&(p, _)| p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        step(&format!("need {p}: {why}"));
    }
    apt.install(&missing)
}

/// virtme-ng in `<tools>/virtme-ng-<version>`; returns the venv's `bin` directory, which must
/// go on PATH because `vng` runs `virtme-run` by name.
pub fn ensure_virtme_ng(tools: &Path, apt: &mut Apt) -> Result<PathBuf> {
    let venv = tools.join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let bin = venv.join("bin");
    // Written last: a venv without it is a half-done install from an interrupted run.
    let stamp = venv.join(".installed");
    if stamp.is_file() && bin.join("vng").is_file() {
        return Ok(bin);
    }
    step(&format!(
        "installing virtme-ng {VIRTME_NG_VERSION} (PyPI) into {}",
        venv.display()
    ));
    let _ = std::fs::remove_dir_all(&venv);
    create_venv(&venv, apt)?;
    crate::run(Command::new(bin.join("pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))
    .with_context(|| {
        format!(
            "pip install virtme-ng=={VIRTME_NG_VERSION} failed: it needs PyPI and Python >= 3.10"
        )
    })?;
    std::fs::write(&stamp, VIRTME_NG_VERSION)?;
    Ok(bin)
}

/// `python3 -m venv`, installing Debian's python3-venv (ensurepip) when the stock Python
/// lacks it.
fn create_venv(venv: &Path, apt: &mut Apt) -> Result<()> {
    let make = || {
        Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if make() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(venv);
    apt.install(&["python3", "python3-venv"])?;
    if !make() {
        bail!(
            "`python3 -m venv {}` fails even with python3-venv installed",
            venv.display()
        );
    }
    Ok(())
}
