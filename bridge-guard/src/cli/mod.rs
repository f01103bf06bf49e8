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
    /// How diagnostics are written: text on stderr, one JSON object per line on stderr, or
    /// straight to the systemd journal (native protocol, with structured fields).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
    Journald,
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .map_err(|e| anyhow::anyhow!("--log-level {level}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .init(),
        LogFormat::Journald => {
            let layer = tracing_journald::layer().map_err(|e| {
                anyhow::anyhow!(
                    "--log-format journald: cannot reach the journal ({e}); is systemd-journald \
                     running? Use --log-format text to log to stderr"
                )
            })?;
            registry
                .with(layer.with_syslog_identifier("bridge-guard".into()))
                .init();
        }
    }
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log_level, cli.log_format) {
        eprintln!("bridge-guard: error: {e:#}");
        return ExitCode::FAILURE;
    }
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
