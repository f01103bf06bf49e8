//! The eBPF toolchain: nightly + rust-src (for `-Z build-std=core`), and `bpf-linker` built
//! against the nightly's own LLVM, because the registry's default LLVM may not match rustc's.
//!
//! Everything goes into one persistent tools directory (`$BRIDGE_GUARD_TOOLS`, else
//! `$XDG_DATA_HOME/bridge-guard`, else `~/.local/share/bridge-guard`), which the agent's
//! build script also searches. bpf-linker keeps an rpath into `<tools>/llvm-N/lib`, so that
//! directory must stay.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const BPF_LINKER_VERSION: &str = "^0.13";

pub fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BRIDGE_GUARD_TOOLS") {
        return Ok(PathBuf::from(dir));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .context("neither BRIDGE_GUARD_TOOLS, XDG_DATA_HOME nor HOME is set")?;
    Ok(data.join("bridge-guard"))
}

/// Runs `cmd` and returns its stdout; its stderr in the error if it fails.
pub(crate) use netlab::run as output;

fn step(what: &str) {
    eprintln!("setup: {what}");
}

/// Installs nightly with rust-src unless present.
fn ensure_nightly() -> Result<()> {
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!(
            "rustup is not installed: the eBPF programs need a nightly Rust toolchain managed by \
             rustup. Install rustup (https://rustup.rs or your distribution's `rustup` package) \
             and run `cargo xtask setup` again"
        );
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (rustup toolchain install nightly)");
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .context(
            "installing nightly failed; check that rustup can reach its distribution server",
        )?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to nightly (needed for -Z build-std=core)");
        crate::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The nightly's sysroot and LLVM major version.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("`rustc +nightly -vV` does not say its LLVM version")?;
    Ok((PathBuf::from(sysroot.trim()), major))
}

/// The real shared object `libLLVM.so.<major>.<minor>-rust-...` (its `libLLVM-N-rust-*.so`
/// sibling is a linker script that bpf-linker's build cannot use).
fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("libLLVM.so.") {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library; install a \
         bpf-linker matching its LLVM by hand and put it on PATH",
        lib.display()
    )
}

/// Builds bpf-linker against the nightly's LLVM unless a matching one is installed.
fn ensure_bpf_linker() -> Result<()> {
    let tools = tools_dir()?;
    let (sysroot, major) = nightly_llvm()?;
    let libllvm = find_libllvm(&sysroot)?;
    let prefix = tools.join(format!("llvm-{major}"));
    let link = prefix.join("lib/libLLVM.so");
    std::fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("creating {}", prefix.display()))?;
    // Re-point the link every time: a nightly update moves the real file.
    if std::fs::read_link(&link).ok().as_deref() != Some(libllvm.as_path()) {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    }

    let root = tools.join("bpf-linker");
    let binary = root.join("bin/bpf-linker");
    let stamp = root.join("llvm-major");
    let stamped = std::fs::read_to_string(&stamp).ok();
    if binary.is_file() && stamped.as_deref().map(str::trim) == Some(&major.to_string()) {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} \
         (about a minute, once)"
    ));
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cannot start cargo install")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed ({status}). It needs crates.io and the `llvm-{major}` \
             feature of bpf-linker {BPF_LINKER_VERSION}; if that feature does not exist, this \
             nightly's LLVM is newer than bpf-linker supports: pin an older nightly"
        );
    }
    std::fs::write(&stamp, major.to_string())?;
    Ok(())
}

/// Makes sure the eBPF toolchain is there; quick when it is.
pub fn ensure() -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()
}

/// Commands the integration tests use, and the Debian package providing each.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("setpriv", "util-linux"),
    ("systemd-analyze", "systemd"),
    ("nix-instantiate", "nix-bin"),
    // The libvirt lab (tests/src/libvirt.rs): Debian's libvirt with its qemu and network
    // drivers, which run dnsmasq and iptables for a network, and qemu for the guests.
    ("libvirtd", "libvirt-daemon"),
    ("virsh", "libvirt-clients"),
    ("dnsmasq", "dnsmasq-base"),
    ("iptables", "iptables"),
    ("qemu-system-x86_64", "qemu-system-x86"),
];

/// Files that tell a package is installed where no command does.
const TEST_FILES: &[(&str, &str)] = &[(
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",
    "libvirt-daemon-driver-qemu",
)];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        // libvirtd and iptables live in sbin, which a user's PATH may lack.
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(program).is_file())
}

/// Installs, with apt, the commands the tests need and this machine lacks.
pub fn ensure_test_tools() -> Result<()> {
    let mut missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.extend(
        TEST_FILES
            .iter()
            .filter(|(file, _)| !Path::new(file).exists())
            .map(|(_, pkg)| *pkg),
    );
    if missing.is_empty() {
        return Ok(());
    }
    if !on_path("apt-get") {
        bail!(
            "the tests need these packages, and there is no apt-get to install them: {}",
            missing.join(" ")
        );
    }
    step(&format!("installing test tools: {}", missing.join(" ")));
    // Other engineers' and CI's apt runs may hold the lock: wait for it rather than fail.
    let lock = ["-o", "DPkg::Lock::Timeout=600"];
    crate::run(Command::new("apt-get").args(lock).arg("update").arg("-q"))
        .context("apt-get update failed: check that the Debian archive is reachable")?;
    crate::run(
        Command::new("apt-get")
            .args(lock)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {} failed", missing.join(" ")))
}
