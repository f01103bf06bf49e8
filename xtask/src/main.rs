//! Development tasks: `cargo xtask setup | build | run | test`.
//!
//! Every task installs what it needs first (`setup` is idempotent and quick when all is there),
//! so a fresh machine needs nothing but rustup and cargo.

mod bench;
mod demo;
mod dist;
mod lab;
mod setup;
mod systemd_test;
mod test;
mod vmtest;

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
    /// Install the eBPF toolchain: the nightly pinned in bridge-guard-ebpf/rust-toolchain.toml
    /// with rust-src, and bpf-linker built against that nightly's own LLVM (their LLVM majors
    /// are checked to match). Idempotent.
    Setup,
    /// Build the agent with its eBPF programs.
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Build and run the agent as root: `cargo xtask run -- run --bridge virbr0`,
    /// `cargo xtask run -- doctor`. Without arguments it runs the first-run demo (see `demo`):
    /// a lab that shows what goes wrong without a guard, and the same faults with bridge-guard.
    Run {
        #[arg(long)]
        release: bool,
        /// Arguments for bridge-guard.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, the root-only namespace integration tests against the
    /// real kernel and the real agent (with the unit under a real systemd in a container),
    /// then the offline release build (`dist`) and the VM matrix.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Skip the VM matrix (Debian kernels under qemu): host tests only, in about a minute.
        #[arg(long)]
        no_vm: bool,
    },
    /// Build the release tarball offline, as a distribution would:
    /// target/dist/bridge-guard-VERSION-ARCH-linux.tar.gz.
    ///
    /// Vendors every crate the build needs (the workspace's, and the standard library's that
    /// `-Z build-std=core` needs for the eBPF programs) into target/dist/vendor, then builds the
    /// release binary in a network namespace of its own with crates.io replaced by that
    /// directory. The archive holds bin/bridge-guard (eBPF embedded, or the task fails), the
    /// systemd unit, the annotated configuration, man pages, bash/zsh/fish completions, the
    /// monitoring rules and dashboard when monitoring/ exists, and the licences. Needs root (or
    /// user namespaces) for the network namespace, and the network once to fill the vendor
    /// directory. Several minutes the first time; the build directory target/dist/target is
    /// kept for the next run.
    Dist,
    /// Benchmark bridge-guard against the least any guard could do (an oracle told the fault
    /// in advance), the shell guard users write today (an `ip monitor` loop around a fix
    /// script) and no guard, in a network-namespace lab.
    ///
    /// Storm (every fault class back to back), a fighter re-enabling STP flat out, a guest that
    /// bridges its two NICs (a loop), paced faults on labs of N VMs, and the agent's pipeline
    /// alone (idle CPU, zero-loss event rate, kernel-to-user delay). Faults are injected
    /// through in-process rtnetlink into a lab bridge with kernel STP on; outages are measured
    /// from timestamped link notifications. Targets are shown met or missed.
    ///
    /// Writes a markdown table, JSON and an SVG chart to --out, and docs/benchmarks.md (keeping
    /// the VM matrix's block) with the machine's details. Builds the agent with
    /// `cargo xtask build --release` and itself with optimisations first. Needs root. The
    /// default run takes about 25 minutes on 2 cores (it prints its estimate); `--quick` about
    /// 3. Ctrl-C removes the lab. `--help` (not `-h`) explains modes, method and targets.
    Bench(Box<bench::Args>),
    /// The first-run demo: a lab bridge with kernel STP on and two VM namespaces goes through
    /// the same faults with no guard (ports stuck in listening, the bridge NO-CARRIER or down,
    /// a tap left detached: shown with `ip`/`bridge` output and timed) and then with
    /// bridge-guard (each repaired in about a millisecond, and the VMs still talk). Needs root;
    /// takes about half a minute; Ctrl-C removes the lab.
    Demo {
        /// Build the agent with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Boot Debian's distribution kernels (bullseye's 5.10, bookworm's 6.1 and the archive's
    /// 6.12) under qemu and run `bridge-guard doctor`, the integration tests and the fault storm
    /// inside each one.
    ///
    /// The host kernel refuses kprobes and fentry and has bridge built in; these kernels allow
    /// both and load bridge as a module, so this is where the better hook tiers, module BTF and
    /// (5.10) the memlock limit get exercised. Guests boot with virtme-ng over the host's root
    /// filesystem, under software emulation (TCG: KVM hangs guests here), two at a time with
    /// one vCPU each. Each guest then runs the same fault storm against the agent with eBPF and
    /// with --no-ebpf (see docs/benchmarks.md). A test that skips on a requirement the guest
    /// must meet (root, bridge as a module, kprobe-or-better hooks, fentry where the series
    /// has it) fails. Needs root, and Debian's archive and PyPI the first time: it installs
    /// qemu-system-x86, kmod, busybox-static and virtme-ng itself, caches the kernels in
    /// <tools>/kernels (bullseye's through a private apt tree under <tools>/apt, never the
    /// host's sources) and links their modules into /lib/modules. Results and the console log
    /// of each VM are kept in target/vmtest/<release>/. Fails if any test fails, a kernel does
    /// not boot, or the storm's claims do not hold.
    Vmtest {
        /// Only this kernel: `5.10`, `6.1` or `6.12` for a series, or any part of a release
        /// such as `6.1.0-56` or `6.12.117`.
        #[arg(long)]
        kernel: Option<String>,
        /// Only tests whose name contains this (passed to the test binaries).
        #[arg(long)]
        filter: Option<String>,
        /// Go on with the next kernel after one fails (the default).
        #[arg(long, overrides_with = "fail_fast")]
        keep_going: bool,
        /// Stop after the first kernel with a failure.
        #[arg(long, overrides_with = "keep_going")]
        fail_fast: bool,
        /// Give up on a VM (and kill it) after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
        timeout: u64,
        /// Do not run the fault storm (eBPF against --no-ebpf) in the guests.
        #[arg(long)]
        no_storm: bool,
        /// Do not write the storm's results into docs/benchmarks.md (written only by runs over
        /// every kernel).
        #[arg(long)]
        no_docs: bool,
    },
    /// Inside a vmtest guest: the fault storm against the agent with eBPF and with --no-ebpf.
    #[command(hide = true)]
    VmtestStorm(vmtest::storm::Args),
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

pub(crate) fn cargo() -> Command {
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

/// Runs the host's `cargo test`, echoing its output, then prints the host's skips by
/// requirement (tests print them with `--show-output`).
pub(crate) fn run_tallying_skips(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut text = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait()?;
    print!(
        "\n{}",
        vmtest::skips::tally(
            "host",
            vmtest::skips::HOST_EXPECT,
            &vmtest::skips::collect(&text)
        )
    );
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn build(release: bool) -> Result<PathBuf> {
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
            if args.is_empty() {
                return demo::run(release);
            }
            let bin = build(release)?;
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
        Task::Test { filter, no_vm } => test::run(filter, no_vm),
        Task::Dist => dist::run().map(drop),
        Task::Bench(args) => bench::run(&args),
        Task::Demo { release } => demo::run(release),
        Task::Vmtest {
            kernel,
            filter,
            fail_fast,
            timeout,
            no_storm,
            no_docs,
            ..
        } => vmtest::run(&vmtest::Options {
            docs: !no_docs && filter.is_none(),
            kernel,
            filter,
            keep_going: !fail_fast,
            timeout: std::time::Duration::from_secs(timeout),
            storm: !no_storm,
            agent: None,
        }),
        Task::VmtestStorm(args) => vmtest::storm::run(&args),
    }
}
