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

/// How long an apt call waits for another apt or dpkg (other engineers' installs, unattended
/// upgrades) to let go of the lock, instead of failing at once.
const LOCK_TIMEOUT: &str = "DPkg::Lock::Timeout=600";

/// Where a kernel package comes from: the host's own apt sources, or a Debian suite the host
/// does not use, kept in a private apt tree under the tools directory that serves
/// `apt-cache` and `apt-get download` only: the host's sources and package state stay as
/// they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Archive {
    Host,
    /// Debian 11 and its security suite (where newer 5.10 kernels land).
    Bullseye,
}

const BULLSEYE_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";

impl Archive {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Host => "the host's apt sources",
            Self::Bullseye => "Debian bullseye (a private apt tree, for downloads only)",
        }
    }

    /// The private tree's directory name and `sources.list` (`None`: the host's own).
    fn private(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Host => None,
            Self::Bullseye => Some(("bullseye", BULLSEYE_SOURCES)),
        }
    }
}

/// apt, with `apt-get update` run at most once per archive and xtask run, and only when
/// something has to come from that archive.
pub struct Apt {
    tools: PathBuf,
    updated: Vec<Archive>,
}

impl Apt {
    pub fn new(tools: &Path) -> Self {
        Self {
            tools: tools.to_path_buf(),
            updated: Vec::new(),
        }
    }

    fn private_root(&self, dir: &str) -> PathBuf {
        self.tools.join("apt").join(dir)
    }

    /// `program` (apt-get, apt-cache) pointed at `archive`: for a private one, its own sources,
    /// lists, caches and an empty package status, so nothing of the host's apt is read or
    /// written.
    pub fn command(&self, archive: Archive, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(["-q", "-o", LOCK_TIMEOUT]);
        if let Some((dir, _)) = archive.private() {
            let root = self.private_root(dir);
            let opt = |k: &str, sub: &str| format!("{k}={}", root.join(sub).display());
            for o in [
                opt("Dir::Etc::SourceList", "sources.list"),
                opt("Dir::Etc::SourceParts", "sources.list.d"),
                opt("Dir::Etc::Preferences", "preferences"),
                opt("Dir::Etc::PreferencesParts", "preferences.d"),
                opt("Dir::State::Lists", "lists"),
                opt("Dir::State::Status", "status"),
                opt("Dir::Cache", "cache"),
                // apt's sandbox user cannot write into root's tools directory.
                "APT::Sandbox::User=root".to_owned(),
                "Acquire::Languages=none".to_owned(),
            ] {
                cmd.args(["-o", &o]);
            }
        }
        cmd
    }

    /// Lays out a private archive's tree (idempotent).
    fn prepare(&self, archive: Archive) -> Result<()> {
        let Some((dir, sources)) = archive.private() else {
            return Ok(());
        };
        let root = self.private_root(dir);
        for sub in [
            "sources.list.d",
            "preferences.d",
            "lists/partial",
            "cache/archives/partial",
        ] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        std::fs::write(root.join("sources.list"), sources)?;
        for empty in ["status", "preferences"] {
            if !root.join(empty).is_file() {
                std::fs::write(root.join(empty), "")?;
            }
        }
        Ok(())
    }

    pub fn updated(&self, archive: Archive) -> bool {
        self.updated.contains(&archive)
    }

    pub fn update_once(&mut self, archive: Archive) -> Result<()> {
        if self.updated(archive) {
            return Ok(());
        }
        self.prepare(archive)?;
        step(&format!("apt-get update ({})", archive.describe()));
        crate::run(self.command(archive, "apt-get").arg("update")).with_context(|| {
            format!(
                "apt-get update failed for {}: vmtest needs Debian's package archive \
                 (deb.debian.org or a mirror) for qemu, kmod, busybox-static and the kernels",
                archive.describe()
            )
        })?;
        self.updated.push(archive);
        Ok(())
    }

    /// `apt-cache ARGS` against `archive`; its output. A private archive never updated yet has
    /// no lists: that reads as "knows nothing", not as an error.
    pub fn cache(&self, archive: Archive, args: &[&str]) -> Result<String> {
        self.prepare(archive)?;
        output(self.command(archive, "apt-cache").args(args))
    }

    pub fn install(&mut self, packages: &[&str]) -> Result<()> {
        self.update_once(Archive::Host)?;
        step(&format!("apt-get install {}", packages.join(" ")));
        crate::run(
            self.command(Archive::Host, "apt-get")
                .args(["install", "-y", "--no-install-recommends"])
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
