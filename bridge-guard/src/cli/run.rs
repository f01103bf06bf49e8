//! `bridge-guard run`: guard bridges until stopped.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use super::guard_args::{PolicyArgs, bridge_name};
use crate::{
    agent::{Agent, Config},
    config::Settings,
    exposition,
    sys::{caps::Caps, notify},
};

/// `CAP_NET_ADMIN`, from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, clap::Args)]
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

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<()> {
    let guards = args.policy.guards(&args.bridges, &settings)?;
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
    }
    eprintln!("bridge-guard: ready: {status}");
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    agent.run(shutdown).await?;
    if let Some(n) = &notifier {
        let _ = n.send("STOPPING=1");
    }
    tracing::info!("stopped");
    Ok(())
}
