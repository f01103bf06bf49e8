//! `bridge-guard run`: guard bridges until stopped; SIGHUP re-reads the configuration.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    InvalidConfig,
    guard_args::{PolicyArgs, bridge_name},
};
use crate::{
    agent::{Agent, Config, Reload},
    config::{self, Settings},
    exposition,
    planner::Guard,
    sys::{caps::Caps, notify},
};

/// `CAP_NET_ADMIN`, from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A bridge to guard (repeatable), e.g. `--bridge virbr0`; replaces the configuration's
    /// list. Only these are touched, and only in bridge-guard's own network namespace.
    #[arg(long = "bridge", value_name = "NAME", value_parser = bridge_name)]
    bridges: Vec<String>,
    /// Repair nothing; log what would be repaired and account for every outage.
    #[arg(long)]
    observe: bool,
    /// Refuse to start without the privileges to repair (CAP_NET_ADMIN), instead of running
    /// observe-only with a warning.
    #[arg(long)]
    require_repair: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Seconds between full reconciles from a kernel dump (the backstop for anything missed)
    /// [default: 60].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    reconcile_interval: Option<u64>,
    /// Use netlink alone, without the eBPF hooks.
    #[arg(long)]
    no_ebpf: bool,
    /// Where the agent publishes its state for `bridge-guard status` [default: /run/bridge-guard].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Once hooks are attached and the first reconcile is done, write the hook summary here.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Serve Prometheus metrics on PORT (127.0.0.1) or ADDRESS:PORT; `--metrics` alone serves
    /// on 127.0.0.1:19469. Off unless given; it is unauthenticated, so keep it on loopback
    /// unless you mean it.
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = exposition::parse_addr,
        num_args = 0..=1,
        default_missing_value = exposition::DEFAULT_ADDR
    )]
    metrics: Option<SocketAddr>,
    /// Also keep the metrics in this file, for node_exporter's textfile collector
    /// (e.g. /var/lib/node_exporter/textfile/bridge-guard.prom).
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// Seconds between per-port summary log lines (also logged at shutdown) [default: 600].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    summary_interval: Option<u64>,
}

/// What the command line and the configuration say to guard, and whether to repair: worked
/// out at start and again on every reload.
fn policy(args: &Args, settings: &Settings) -> anyhow::Result<(Vec<Guard>, bool)> {
    let guards = args
        .policy
        .guards(&args.bridges, settings)
        .context(InvalidConfig)?;
    let mut observe = args.observe || settings.observe;
    let require_repair = args.require_repair || settings.require_repair;
    let can_repair = Caps::current().is_ok_and(|c| c.has(CAP_NET_ADMIN));
    if !observe && !can_repair {
        if require_repair {
            bail!(
                "repair needs CAP_NET_ADMIN, which this process lacks (run as root, or grant it in the unit); without require_repair it would run observe-only"
            );
        }
        tracing::warn!(
            "no CAP_NET_ADMIN: running observe-only, nothing will be repaired (grant CAP_NET_ADMIN to repair)"
        );
        observe = true;
    }
    Ok((guards, observe))
}

/// The configuration keys a reload cannot apply, because they were used once at start: the
/// ones that differ between `old` and `new`.
fn needs_restart(old: &Settings, new: &Settings) -> Vec<&'static str> {
    [
        ("metrics", old.metrics != new.metrics),
        (
            "metrics_textfile",
            old.metrics_textfile != new.metrics_textfile,
        ),
        ("state_dir", old.state_dir != new.state_dir),
        ("ebpf", old.ebpf != new.ebpf),
        ("log_format", old.log_format != new.log_format),
        ("log_level", old.log_level != new.log_level),
        (
            "reconcile_interval_secs",
            old.reconcile_interval_secs != new.reconcile_interval_secs,
        ),
        (
            "summary_interval_secs",
            old.summary_interval_secs != new.summary_interval_secs,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// Handles SIGHUP until the agent stops: re-reads the configuration and hands the agent what it
/// can apply without dropping its hooks. A file that does not load leaves everything as it was.
async fn reload_on_hangup(
    mut hup: tokio::signal::unix::Signal,
    args: Args,
    mut settings: Settings,
    reloads: tokio::sync::mpsc::Sender<Reload>,
    notifier: Option<Arc<notify::Notifier>>,
) {
    let (path, explicit) = args.policy.config_path();
    while hup.recv().await.is_some() {
        if let Some(n) = &notifier {
            let _ = n.reloading();
        }
        let outcome = match config::load(&path, explicit)
            .map_err(anyhow::Error::from)
            .and_then(|new| Ok((policy(&args, &new)?, new)))
        {
            Ok(((guards, observe), new)) => {
                let later = needs_restart(&settings, &new);
                if !later.is_empty() {
                    tracing::warn!(
                        "reload: {} changed in {} and take effect at the next restart",
                        later.join(", "),
                        path.display()
                    );
                }
                let names: Vec<&str> = guards.iter().map(|g| g.bridge.as_str()).collect();
                tracing::info!(
                    "reload: configuration from {} applied: guarding {}{}",
                    path.display(),
                    names.join(", "),
                    if observe { " (observe-only)" } else { "" }
                );
                let (done, applied) = tokio::sync::oneshot::channel();
                let libvirt_dir = args.policy.libvirt_dir(&new);
                settings = new;
                let sent = reloads
                    .send(Reload {
                        guards,
                        observe,
                        libvirt_dir,
                        done,
                    })
                    .await;
                if sent.is_err() {
                    break; // the agent has stopped
                }
                applied.await.unwrap_or_default()
            }
            Err(e) => {
                tracing::error!(
                    "reload: {e:#}; still running with the configuration loaded before"
                );
                format!("reload failed, previous configuration kept: {e:#}")
            }
        };
        if let Some(n) = &notifier {
            // READY=1 ends the reload for systemd (Type=notify-reload waits for it).
            if let Err(e) = n.ready(&outcome) {
                tracing::warn!("cannot tell systemd the reload is done: {e}");
            }
        }
    }
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<()> {
    let (guards, observe) = policy(&args, &settings)?;
    // Bound first: a bad address is a start-up error, before anything is attached.
    let listener = match args.metrics.or(settings.metrics) {
        Some(addr) => Some(exposition::bind(addr)?),
        None => None,
    };
    let notifier = notify::Notifier::from_env()
        .context("NOTIFY_SOCKET is set but unusable")?
        .map(Arc::new);
    let names: Vec<String> = guards.iter().map(|g| g.bridge.clone()).collect();
    let mut agent = Agent::start(Config {
        guards,
        observe,
        reconcile_every: Duration::from_secs(
            args.reconcile_interval
                .unwrap_or(settings.reconcile_interval_secs),
        ),
        libvirt_dir: args.policy.libvirt_dir(&settings),
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| settings.state_dir.clone()),
        ebpf: !args.no_ebpf && settings.ebpf,
        summary_every: Duration::from_secs(
            args.summary_interval
                .unwrap_or(settings.summary_interval_secs),
        ),
        metrics_textfile: args
            .metrics_textfile
            .clone()
            .or_else(|| settings.metrics_textfile.clone()),
        watchdog: notifier.clone().zip(notify::watchdog_interval()),
    })?;
    agent.start_up().await.context("first reconcile")?;
    // Handled from before READY: systemd may send SIGHUP as soon as the unit is active, and
    // SIGHUP's default action would end the agent.
    let hup = signal(SignalKind::hangup())?;
    let reloads = tokio::spawn(reload_on_hangup(
        hup,
        args.clone(),
        settings.clone(),
        agent.reloads(),
        notifier.clone(),
    ));
    let metrics = match listener {
        Some(l) => {
            // Its own thread: a scrape never waits for a repair, nor a repair for a scrape.
            let addr = exposition::server::spawn(
                l,
                agent.accounting(),
                exposition::server::Limits::default(),
            )?;
            format!("; metrics on http://{addr}/metrics")
        }
        None => String::new(),
    };
    let status = format!(
        "guarding {} ({}{}{metrics})",
        names.join(", "),
        agent.hooks_summary(),
        if observe { "; observe-only" } else { "" }
    );
    if let Some(path) = &args.ready_file {
        super::write_atomically(path, &format!("{}\n", agent.hooks_summary()))
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    if let Some(n) = &notifier {
        n.ready(&status).context("telling systemd we are ready")?;
        // READY's status said what was attached (also in the log); from here on STATUS= says
        // how the bridges are doing.
        agent.report_status_to(Arc::clone(n));
    }
    eprintln!("bridge-guard: ready: {status}");
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let result = agent.run(shutdown).await;
    reloads.abort();
    result?;
    if let Some(n) = &notifier {
        let _ = n.send("STOPPING=1");
    }
    tracing::info!("stopped");
    Ok(())
}
