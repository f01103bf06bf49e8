//! The command line: one file per subcommand. This is the edge where library errors become
//! messages for people (anyhow).

mod check_config;
mod completions;
mod doctor;
mod fix;
mod guard_args;
mod manpage;
mod run;
mod status;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError, LogFormat, Settings};

/// sysexits' `EX_CONFIG`: the configuration (file or flags) is wrong. The unit's
/// `RestartPreventExitStatus=78` keeps a typo from becoming a restart loop.
pub const EX_CONFIG: u8 = 78;

/// `--version`: whether the eBPF programs are embedded, with their size and SHA-256 (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (eBPF programs ",
    env!("BRIDGE_GUARD_EBPF_INFO"),
    ")"
);

/// Marks an error found in the configuration rather than in the system, so that it exits with
/// [`EX_CONFIG`]. Used as anyhow context where the check is not a [`ConfigError`].
#[derive(Debug)]
pub struct InvalidConfig;

impl std::fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid configuration")
    }
}

/// The exit status for an error: [`EX_CONFIG`] for the configuration's, 1 for the rest.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<InvalidConfig>().is_some() {
        EX_CONFIG
    } else {
        1
    }
}

/// Keeps Linux bridges that carry VM traffic forwarding, and accounts for every outage.
///
/// bridge-guard hooks the kernel's bridge port-state and membership changes with eBPF and
/// reports them as they happen, with kernel timestamps and the process responsible.
///
/// Start with `bridge-guard doctor` to see what this kernel allows, `bridge-guard watch` to see
/// bridge events live, then `bridge-guard run --bridge virbr0` to guard a bridge. Needs root
/// (or CAP_BPF + CAP_PERFMON, and CAP_NET_ADMIN to repair).
///
/// Exit status: 0 on success; 78 (EX_CONFIG) when the configuration file or the flags are
/// wrong, so that systemd does not restart it in a loop; 1 for any other error
/// (`check-config` exits 1 for a bad file: the check ran fine).
#[derive(Debug, Parser)]
#[command(name = "bridge-guard", version = VERSION, propagate_version = true)]
pub struct Cli {
    /// Log level for diagnostics (error, warn, info, debug, trace) [default: info, or the
    /// configuration's log_level]; RUST_LOG overrides.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// How diagnostics are written: text on stderr, one JSON object per line on stderr, or
    /// straight to the systemd journal (native protocol, with structured fields)
    /// [default: text, or the configuration's log_format].
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
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
    /// Check a configuration file (default /etc/bridge-guard/config.toml) without running
    /// anything: every error with file:line:column and a hint; exits 1 if there is any.
    CheckConfig(check_config::Args),
    /// Show what the running agent knows: each guarded bridge and port, its state and since
    /// when, STP, carrier, repairs, refusals, and who keeps undoing repairs with the lasting
    /// fix; exits 0 only when every guarded bridge is healthy. Works for any user.
    Status(status::Args),
    /// Print bridge events as the kernel makes them: port states, joins, leaves, STP changes.
    ///
    /// Example: `bridge-guard watch` prints lines like
    /// `12:00:01.000042 virbr0 vnet0 blocking -> listening (tracepoint, by ip[1234])`.
    Watch(watch::Args),
    /// Report what this kernel allows: BTF, offsets, capabilities, and the hook tier chosen for
    /// each observation, with the reason better tiers failed. Always exits 0.
    ///
    /// `doctor --path virbr0` instead checks what stops virbr0's VM traffic beyond layer 2:
    /// a VPN's default route, firewall drops, strict rp_filter, forwarding off, no DHCP/DNS.
    Doctor(doctor::Args),
    /// Print a shell completion script.
    ///
    /// Example: `bridge-guard completions bash > /etc/bash_completion.d/bridge-guard`, or
    /// `bridge-guard completions fish > ~/.config/fish/completions/bridge-guard.fish`.
    Completions(completions::Args),
    /// Write the manual pages: bridge-guard.8 and one page per subcommand.
    ///
    /// Example: `bridge-guard manpage /usr/local/share/man/man8 && mandb`. The release tarball
    /// (`cargo xtask dist`) ships them already.
    Manpage(manpage::Args),
}

fn init_logging(level: &str, format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .map_err(|e| anyhow::anyhow!("--log-level {level}: {e}").context(InvalidConfig))?;
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
            // Fields under their own names (`journalctl PORT=vnet0`), not tracing-journald's
            // default `F_PORT`; info is syslog's info (6), not notice (5).
            let priorities = tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            };
            registry
                .with(
                    layer
                        .with_field_prefix(None)
                        .with_priority_mappings(priorities)
                        .with_syslog_identifier("bridge-guard".into()),
                )
                .init();
        }
    }
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The configuration can say how to log, so it is read before logging starts.
    let config_path = match &cli.command {
        Command::Run(a) => Some(a.policy.config_path()),
        Command::Fix(a) => Some(a.policy.config_path()),
        _ => None,
    };
    let settings = match config_path.map(|(path, explicit)| config::load(&path, explicit)) {
        None => Settings::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            eprintln!("bridge-guard: error: {}", crate::error_chain(&e));
            return ExitCode::from(EX_CONFIG);
        }
    };
    let level = cli
        .log_level
        .clone()
        .or_else(|| settings.log_level.clone())
        .unwrap_or_else(|| "info".into());
    let format = cli
        .log_format
        .or(settings.log_format)
        .unwrap_or(LogFormat::Text);
    if let Err(e) = init_logging(&level, format) {
        eprintln!("bridge-guard: error: {e:#}");
        // A bad log level is the configuration's; an unreachable journal is the system's.
        return ExitCode::from(exit_code(&e));
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
    // check-config reports the file's errors as its result, not as its own failure.
    let checking = matches!(cli.command, Command::CheckConfig(_));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args, settings).await,
            Command::Fix(args) => fix::run(args, settings).await,
            Command::CheckConfig(args) => check_config::run(&args),
            Command::Status(args) => status::run(&args),
            Command::Watch(args) => watch::run(args).await,
            Command::Doctor(args) => doctor::run(&args),
            Command::Completions(args) => completions::run(&args),
            Command::Manpage(args) => manpage::run(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // ops: a report already printed, ending with its documented exit status.
        Err(e) if e.downcast_ref::<status::Exit>().is_some() => {
            ExitCode::from(e.downcast_ref::<status::Exit>().map_or(1, |x| x.0))
        }
        Err(e) => {
            eprintln!("bridge-guard: error: {e:#}");
            ExitCode::from(if checking { 1 } else { exit_code(&e) })
        }
    }
}

/// Writes `contents` to `path` atomically, so a reader never sees half a file.
pub(crate) fn write_atomically(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    crate::sys::fs::write_atomically(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_says_whether_the_ebpf_object_is_embedded() {
        let rest = VERSION
            .strip_prefix(concat!(env!("CARGO_PKG_VERSION"), " (eBPF programs "))
            .unwrap_or_else(|| panic!("{VERSION}"));
        if let Some(info) = rest.strip_prefix("embedded: ") {
            let (bytes, rest) = info.split_once(" bytes, sha256 ").expect(VERSION);
            assert!(bytes.parse::<u64>().is_ok_and(|n| n > 0), "{VERSION}");
            let hash: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            assert_eq!(hash.len(), 64, "a SHA-256 in hex: {VERSION}");
        } else {
            assert!(rest.starts_with("not embedded: "), "{VERSION}");
        }
        assert!(VERSION.ends_with(')'), "{VERSION}");
    }

    #[test]
    fn configuration_errors_exit_78_and_others_1() {
        let located = ConfigError::Invalid(config::Located {
            path: "/etc/bridge-guard/config.toml".into(),
            line: 1,
            column: 1,
            message: "unknown field".into(),
            hint: "remove it".into(),
        });
        assert_eq!(exit_code(&anyhow::Error::from(located)), EX_CONFIG);
        let wrapped = anyhow::anyhow!("no bridge to guard").context(InvalidConfig);
        assert_eq!(exit_code(&wrapped.context("starting")), EX_CONFIG);
        assert_eq!(exit_code(&anyhow::anyhow!("netlink closed")), 1);
    }
}
