//! The eBPF toolchain: a pinned, dated nightly + rust-src (for `-Z build-std=core`), and
//! `bpf-linker` built against that nightly's own LLVM, because the registry's default LLVM may
//! not match rustc's.
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

/// Where the eBPF toolchain is pinned, relative to the workspace root.
pub const TOOLCHAIN_FILE: &str = "bridge-guard-ebpf/rust-toolchain.toml";

/// Overrides the pin (packagers with their own nightly); bridge-guard/build.rs reads it too.
pub const TOOLCHAIN_ENV: &str = "BRIDGE_GUARD_EBPF_TOOLCHAIN";

/// The toolchain the eBPF programs are built with: `$BRIDGE_GUARD_EBPF_TOOLCHAIN`, else the dated
/// nightly pinned in `bridge-guard-ebpf/rust-toolchain.toml`.
pub fn ebpf_toolchain() -> Result<String> {
    if let Some(t) = std::env::var_os(TOOLCHAIN_ENV) {
        return t
            .into_string()
            .map_err(|t| anyhow::anyhow!("{TOOLCHAIN_ENV}={t:?} is not UTF-8"));
    }
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
    }
    let path = crate::workspace_root().join(TOOLCHAIN_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: File = toml::from_str(&text)
        .with_context(|| format!("{}: no [toolchain] channel", path.display()))?;
    Ok(file.toolchain.channel)
}

/// Installs the pinned nightly with rust-src unless present.
fn ensure_nightly(toolchain: &str) -> Result<()> {
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!(
            "rustup is not installed: the eBPF programs need a nightly Rust toolchain managed by \
             rustup. Install rustup (https://rustup.rs or your distribution's `rustup` package) \
             and run `cargo xtask setup` again"
        );
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    // `rustup toolchain list` names toolchains with their host triple appended.
    if !toolchains
        .lines()
        .any(|l| l == toolchain || l.starts_with(&format!("{toolchain}-")))
    {
        step(&format!(
            "installing the eBPF toolchain {toolchain} (pinned in {TOOLCHAIN_FILE})"
        ));
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            toolchain,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .with_context(|| {
            format!(
                "installing {toolchain} failed; check that rustup can reach its distribution \
                 server, or set {TOOLCHAIN_ENV} to a nightly you have (its LLVM must match \
                 bpf-linker's)"
            )
        })?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!(
            "adding rust-src to {toolchain} (needed for -Z build-std=core)"
        ));
        crate::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }
    Ok(())
}

/// The toolchain's sysroot and LLVM major version.
pub fn toolchain_llvm(toolchain: &str) -> Result<(PathBuf, u32)> {
    let plus = format!("+{toolchain}");
    let sysroot = output(Command::new("rustc").args([&plus, "--print", "sysroot"]))?;
    let version = output(Command::new("rustc").args([&plus, "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("`rustc {plus} -vV` does not say its LLVM version"))?;
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

/// The LLVM shared library `binary` is linked against, and its major version: read from the
/// dynamic string table, where the library's soname (`libLLVM.so.22.1-rust-...`, or a system
/// `libLLVM-21.so` / `libLLVM.so.21.1`) sits as a NUL-terminated string.
pub fn linked_llvm(binary: &Path) -> Result<(String, u32)> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let sonames = bytes
        .split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter(|s| s.starts_with("libLLVM"));
    for soname in sonames {
        let rest = soname
            .strip_prefix("libLLVM.so.")
            .or_else(|| soname.strip_prefix("libLLVM-"));
        let digits: String = rest
            .unwrap_or_default()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(major) = digits.parse() {
            return Ok((soname.to_owned(), major));
        }
    }
    bail!(
        "{} is not linked against a shared libLLVM: cannot tell its LLVM version",
        binary.display()
    )
}

/// Builds bpf-linker against the toolchain's LLVM unless a matching one is installed, and
/// checks that the one installed links the toolchain's LLVM major.
fn ensure_bpf_linker(toolchain: &str) -> Result<()> {
    let tools = tools_dir()?;
    let (sysroot, major) = toolchain_llvm(toolchain)?;
    let libllvm = find_libllvm(&sysroot)?;
    let prefix = tools.join(format!("llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("creating {}", prefix.display()))?;
    // `libLLVM.so` is what bpf-linker's build links; the soname is what the binary loads at
    // run time through its rpath, so that it also runs outside `rustup run`. Re-pointed every
    // time: a toolchain update moves the real file.
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for link in [
        prefix.join("lib/libLLVM.so"),
        prefix.join("lib").join(soname),
    ] {
        if std::fs::read_link(&link).ok().as_deref() != Some(libllvm.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&libllvm, &link)
                .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
        }
    }

    let root = tools.join("bpf-linker");
    let binary = root.join("bin/bpf-linker");
    let stamp = root.join("llvm-major");
    let stamped = std::fs::read_to_string(&stamp).ok();
    if !(binary.is_file() && stamped.as_deref().map(str::trim) == Some(&major.to_string())) {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against {toolchain}'s LLVM {major} \
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
                 feature of bpf-linker {BPF_LINKER_VERSION}; if that feature does not exist, \
                 {toolchain}'s LLVM is newer than bpf-linker supports: pin an older nightly in \
                 {TOOLCHAIN_FILE}"
            );
        }
        std::fs::write(&stamp, major.to_string())?;
    }
    let (linked, linked_major) = linked_llvm(&binary)?;
    if linked_major != major {
        bail!(
            "LLVM mismatch: {} links {linked} (LLVM {linked_major}), but {toolchain} uses LLVM \
             {major}; the eBPF objects would not link. Delete {} and run `cargo xtask setup` to \
             rebuild it, or pin a nightly with LLVM {linked_major} in {TOOLCHAIN_FILE}",
            binary.display(),
            root.display()
        );
    }
    Ok(())
}

/// Makes sure the eBPF toolchain is there; quick when it is.
pub fn ensure() -> Result<()> {
    let toolchain = ebpf_toolchain()?;
    ensure_nightly(&toolchain)?;
    ensure_bpf_linker(&toolchain)
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
    // The unit under a real systemd: a debootstrap'd Debian booted by systemd-nspawn.
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_toolchain_is_a_dated_nightly() {
        let pin = ebpf_toolchain().expect("the pin file parses");
        let date = pin.strip_prefix("nightly-").expect("a nightly");
        let parts: Vec<&str> = date.split('-').collect();
        assert!(
            parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
            "a dated nightly, YYYY-MM-DD: {pin}"
        );
    }

    #[test]
    fn the_linked_llvm_is_read_from_the_soname() {
        let dir = std::env::temp_dir().join(format!("xtask-llvm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for (bytes, want) in [
            (
                &b"\x7fELF...\0libc.so.6\0libLLVM.so.22.1-rust-1.97.0-nightly\0GLIBC_2.2.5\0"[..],
                Some(22),
            ),
            (&b"\x7fELF\0libLLVM-21.so\0"[..], Some(21)),
            (&b"\x7fELF\0libLLVMSupport.a\0libc.so.6\0"[..], None),
        ] {
            let bin = dir.join("bpf-linker");
            std::fs::write(&bin, bytes).expect("write");
            assert_eq!(linked_llvm(&bin).ok().map(|(_, m)| m), want);
        }
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
