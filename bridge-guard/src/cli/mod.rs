//! The command line: one file per subcommand. This is the edge where library errors become
//! messages for people (anyhow).

mod doctor;
mod fix;
mod guard_args;
mod run;
mod status;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps Linux bridges that carry VM traffic forwarding, and accounts for every outage.
///
/// bridge-guard hooks the kernel's bridge port-state and membership changes with eBPF and
/// reports them as they happen, with kernel timestamps and the process responsible.
///
/// Start with `bridge-guard doctor` to see what this kernel allows, `bridge-guard watch` to see
/// bridge events live, then `bridge-guard run --bridge virbr0` to guard a bridge. Needs root
/// (or CAP_BPF + CAP_PERFMON, and CAP_NET_ADMIN to repair).
#[derive(Debug, Parser)]
#[command(name = "bridge-guard", version, propagate_version = true)]
pub struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Guard bridges: keep them up, STP off, every port forwarding and every member attached,
    /// repairing each fault as soon as the kernel reports it.
    ///
    /// Example: `bridge-guard run --bridge virbr0 --port-pattern 'vnet*'`.
    Run(run::Args),
    /// Repair one bridge once and exit: the replacement for a fix script.
    ///
    /// Example: `bridge-guard fix virbr0 --port-pattern 'vnet*'`.
    Fix(fix::Args),
    /// Show what the running agent knows: each guarded bridge and port, its state and since
    /// when, STP, carrier, repairs and refusals.
    Status(status::Args),
    /// Print bridge events as the kernel makes them: port states, joins, leaves, STP changes.
    ///
    /// Example: `bridge-guard watch` prints lines like
    /// `12:00:01.000042 virbr0 vnet0 blocking -> listening (tracepoint, by ip[1234])`.
    Watch(watch::Args),
    /// Report what this kernel allows: BTF, offsets, capabilities, and the hook tier chosen for
    /// each observation, with the reason better tiers failed. Always exits 0.
    Doctor(doctor::Args),
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bridge-guard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Fix(args) => fix::run(args).await,
            Command::Status(args) => status::run(&args),
            Command::Watch(args) => watch::run(args).await,
            Command::Doctor(args) => doctor::run(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bridge-guard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `contents` to `path` atomically, so a reader never sees half a file.
pub(crate) fn write_atomically(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
