//! Builds the eBPF programs (`bridge-guard-ebpf`) with aya-build and leaves the object in
//! `OUT_DIR/bridge-guard`, where `src/sources/ebpf/mod.rs` embeds it; describes it (size and
//! SHA-256, or why it is missing) in `BRIDGE_GUARD_EBPF_INFO` for `bridge-guard --version`.
//!
//! The kernel side needs the nightly pinned in `bridge-guard-ebpf/rust-toolchain.toml` (with
//! rust-src) and `bpf-linker`, which `cargo xtask setup` installs. Without them a debug build
//! still succeeds with an empty object and a warning, so that `cargo check`, `cargo clippy` and
//! the root-free unit tests work on any machine; the agent then says at start (and in
//! `--version`) that it has no eBPF programs and runs on netlink alone.
//!
//! Environment:
//! - `BRIDGE_GUARD_EBPF_OBJECT=PATH`: embed this prebuilt eBPF object instead of building one
//!   (for packagers who build it in a step of its own).
//! - `BRIDGE_GUARD_REQUIRE_EBPF=1`: a missing toolchain is an error (`cargo xtask` sets it).
//! - `BRIDGE_GUARD_ALLOW_NO_EBPF=1`: let a release build go without the eBPF programs; without
//!   it a release build that cannot build them fails.
//! - `BRIDGE_GUARD_EBPF_TOOLCHAIN`: the toolchain for the eBPF build instead of the pin.
//! - `BRIDGE_GUARD_TOOLS`: where `cargo xtask setup` installed bpf-linker.
use std::{
    env,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

const OBJECT_ENV: &str = "BRIDGE_GUARD_EBPF_OBJECT";
const REQUIRE_ENV: &str = "BRIDGE_GUARD_REQUIRE_EBPF";
const ALLOW_NONE_ENV: &str = "BRIDGE_GUARD_ALLOW_NO_EBPF";
const TOOLCHAIN_ENV: &str = "BRIDGE_GUARD_EBPF_TOOLCHAIN";
/// `e_machine` of an eBPF ELF object.
const EM_BPF: u16 = 247;

fn tools_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("BRIDGE_GUARD_TOOLS") {
        return Some(PathBuf::from(dir));
    }
    let data = env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))?;
    Some(data.join("bridge-guard"))
}

/// Finds `bpf-linker` on PATH or where `cargo xtask setup` installs it.
fn find_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let installed = tools_dir().map(|d| d.join("bpf-linker/bin"));
    env::split_paths(&path)
        .chain(installed)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

fn flag(name: &str) -> bool {
    env::var_os(name).is_some_and(|v| v == "1")
}

/// The toolchain the programs are built with: the environment's, else the pinned nightly.
fn toolchain(manifest_dir: &Path) -> anyhow::Result<String> {
    if let Some(t) = env::var_os(TOOLCHAIN_ENV) {
        return t
            .into_string()
            .map_err(|t| anyhow::anyhow!("{TOOLCHAIN_ENV}={t:?} is not UTF-8"));
    }
    let file = manifest_dir.join("../bridge-guard-ebpf/rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", file.display());
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let value: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", file.display()))?;
    value
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{}: no [toolchain] channel", file.display()))
}

/// Checks that `bytes` is an eBPF ELF object: a wrong file fails here, not at the agent's start.
fn check_object(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        bail!("{OBJECT_ENV}={}: not an ELF object", path.display());
    }
    // e_machine sits at offset 18, in the object's own byte order (EI_DATA: 1 little, 2 big).
    let machine = match bytes[5] {
        2 => u16::from_be_bytes([bytes[18], bytes[19]]),
        _ => u16::from_le_bytes([bytes[18], bytes[19]]),
    };
    if machine != EM_BPF {
        bail!(
            "{OBJECT_ENV}={}: an ELF object for machine {machine}, not eBPF ({EM_BPF}); give the \
             object built from bridge-guard-ebpf for the bpfel target",
            path.display()
        );
    }
    Ok(())
}

/// What `--version` says about the embedded object.
fn describe(bytes: &[u8], source: &str) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    format!("embedded: {} bytes, sha256 {hex}, {source}", bytes.len())
}

/// No eBPF programs: fine for checks and unit tests, an error where they are required.
fn without_ebpf(object: &Path, why: &str) -> anyhow::Result<()> {
    if flag(REQUIRE_ENV) {
        bail!("{why}; run `cargo xtask setup` to install the eBPF toolchain");
    }
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    if release && !flag(ALLOW_NONE_ENV) {
        bail!(
            "{why}: a release build of bridge-guard must embed its eBPF programs. Run `cargo \
             xtask setup` (or give a prebuilt object in {OBJECT_ENV}=PATH); set \
             {ALLOW_NONE_ENV}=1 to build a netlink-only agent anyway"
        );
    }
    println!("cargo::warning={why}: building without eBPF programs (run `cargo xtask setup`)");
    println!("cargo::rustc-env=BRIDGE_GUARD_EBPF_INFO=not embedded: {why}");
    std::fs::write(object, []).context("writing the empty eBPF object")
}

fn main() -> anyhow::Result<()> {
    for var in [
        OBJECT_ENV,
        REQUIRE_ENV,
        ALLOW_NONE_ENV,
        TOOLCHAIN_ENV,
        "BRIDGE_GUARD_TOOLS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("bridge-guard");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);

    if let Some(prebuilt) = env::var_os(OBJECT_ENV).map(PathBuf::from) {
        println!("cargo::rerun-if-changed={}", prebuilt.display());
        let bytes = std::fs::read(&prebuilt)
            .with_context(|| format!("{OBJECT_ENV}: reading {}", prebuilt.display()))?;
        check_object(&prebuilt, &bytes)?;
        std::fs::write(&object, &bytes).context("copying the prebuilt eBPF object")?;
        let info = describe(&bytes, &format!("prebuilt, from {OBJECT_ENV}"));
        println!("cargo::rustc-env=BRIDGE_GUARD_EBPF_INFO={info}");
        return Ok(());
    }

    let Some(linker) = find_bpf_linker() else {
        return without_ebpf(
            &object,
            "bpf-linker not found on PATH nor in the bridge-guard tools directory",
        );
    };
    println!("cargo::rerun-if-changed={}", linker.display());
    if let Some(dir) = linker.parent() {
        // aya-build runs `cargo build` for the bpf target through rustup, whose linker is
        // `bpf-linker` looked up on PATH: put ours first.
        let path = env::var_os("PATH").unwrap_or_default();
        let joined =
            env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(&path)))
                .context("joining PATH")?;
        // SAFETY: build scripts are single-threaded here; nothing else reads the environment.
        unsafe { env::set_var("PATH", joined) };
    }

    let ebpf_dir = manifest_dir.join("../bridge-guard-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to bridge-guard-ebpf")?;
    // The nested build reads sources the outer cargo does not know about.
    println!(
        "cargo::rerun-if-changed={}",
        manifest_dir.join("../bridge-guard-common/src").display()
    );
    let toolchain = toolchain(&manifest_dir)?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bridge-guard-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF programs (bridge-guard-ebpf) with {toolchain}; `cargo xtask setup` \
             installs the toolchain"
        )
    })?;
    let bytes = std::fs::read(&object).context("reading the built eBPF object")?;
    let info = describe(&bytes, &format!("built with {toolchain}"));
    println!("cargo::rustc-env=BRIDGE_GUARD_EBPF_INFO={info}");
    Ok(())
}
