//! Development tasks: `cargo xtask setup | build | run | test`.
//!
//! Every task installs what it needs first (`setup` is idempotent and quick when all is there),
//! so a fresh machine needs nothing but rustup and cargo.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// bridge-guard's development tasks.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain: nightly with rust-src, and bpf-linker built against the
    /// nightly's own LLVM. Idempotent.
    Setup,
    /// Build the agent with its eBPF programs.
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Build and run the agent as root: `cargo xtask run -- doctor`. Without arguments it runs
    /// `watch`.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for bridge-guard.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, and the root-only namespace integration tests against the
    /// real kernel and the real agent.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
}

/// Where cargo puts build output: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir), // a relative value is relative to the workspace
        None => workspace_root().join("target"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    // The agent's build script must not quietly drop the eBPF programs under xtask.
    cmd.env("BRIDGE_GUARD_REQUIRE_EBPF", "1");
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

fn build(release: bool) -> Result<PathBuf> {
    setup::ensure()?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", "bridge-guard"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir()
        .join(if release { "release" } else { "debug" })
        .join("bridge-guard"))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure(),
        Task::Build { release } => build(release).map(drop),
        Task::Run { release, args } => {
            let bin = build(release)?;
            let args = if args.is_empty() {
                vec!["watch".to_owned()]
            } else {
                args
            };
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                eprintln!("xtask: bridge-guard needs root; running it with sudo");
                let mut c = Command::new("sudo");
                c.arg("-E").arg(&bin);
                c
            };
            run(cmd.args(&args))
        }
        Task::Test { filter } => {
            if !is_root() {
                bail!(
                    "the test suite needs root: it creates network namespaces and loads eBPF \
                     programs. Run `sudo -E cargo xtask test`"
                );
            }
            setup::ensure_test_tools()?;
            let bin = build(false)?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--no-fail-fast"])
                .env("BRIDGE_GUARD_BIN", &bin);
            if let Some(f) = filter {
                cmd.arg(f);
            }
            run(&mut cmd)
        }
    }
}
