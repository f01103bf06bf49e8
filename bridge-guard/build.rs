//! Builds the eBPF programs (`bridge-guard-ebpf`) with aya-build and leaves the object in
//! `OUT_DIR/bridge-guard`, where `src/sources/ebpf/mod.rs` embeds it.
//!
//! The kernel side needs nightly + rust-src and `bpf-linker`, which `cargo xtask setup` installs.
//! Without them this script still succeeds with an empty object and a warning, so that
//! `cargo check`, `cargo clippy` and the root-free unit tests work on any machine; the agent then
//! says at start that it has no eBPF programs and runs on netlink alone. `cargo xtask` sets
//! `BRIDGE_GUARD_REQUIRE_EBPF=1`, which turns the missing toolchain into a hard error.
use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

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

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=BRIDGE_GUARD_REQUIRE_EBPF");
    println!("cargo::rerun-if-env-changed=BRIDGE_GUARD_TOOLS");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("bridge-guard");
    let required = env::var_os("BRIDGE_GUARD_REQUIRE_EBPF").is_some_and(|v| v == "1");

    let Some(linker) = find_bpf_linker() else {
        let why = "bpf-linker not found on PATH nor in the bridge-guard tools directory";
        if required {
            bail!("{why}; run `cargo xtask setup` to install it");
        }
        println!("cargo::warning={why}: building without eBPF programs (run `cargo xtask setup`)");
        std::fs::write(&object, []).context("writing the empty eBPF object")?;
        return Ok(());
    };
    println!("cargo::rerun-if-changed={}", linker.display());
    if let Some(dir) = linker.parent() {
        // aya-build runs `cargo +nightly build` for the bpf target, whose linker is `bpf-linker`
        // looked up on PATH: put ours first.
        let path = env::var_os("PATH").unwrap_or_default();
        let joined =
            env::join_paths(std::iter::once(dir.to_path_buf()).chain(env::split_paths(&path)))
                .context("joining PATH")?;
        // SAFETY: build scripts are single-threaded here; nothing else reads the environment.
        unsafe { env::set_var("PATH", joined) };
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = manifest_dir.join("../bridge-guard-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to bridge-guard-ebpf")?;
    // The nested build reads sources the outer cargo does not know about.
    println!(
        "cargo::rerun-if-changed={}",
        manifest_dir.join("../bridge-guard-common/src").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bridge-guard-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (bridge-guard-ebpf); `cargo xtask setup` installs the toolchain")
}
