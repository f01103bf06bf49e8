//! `bridge-guard run`: guard bridges until stopped.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::guard_args::{PolicyArgs, bridge_name};
use crate::{
    agent::{Agent, Config},
    exposition,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A bridge to guard (repeatable), e.g. `--bridge virbr0`. Only these are touched, and only
    /// in bridge-guard's own network namespace.
    #[arg(long = "bridge", value_name = "NAME", required = true, value_parser = bridge_name)]
    bridges: Vec<String>,
    /// Repair nothing; log what would be repaired and account for every outage.
    #[arg(long)]
    observe: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Seconds between full reconciles from a kernel dump (the backstop for anything missed).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    reconcile_interval: u64,
    /// Use netlink alone, without the eBPF hooks.
    #[arg(long)]
    no_ebpf: bool,
    /// Where the agent publishes its state for `bridge-guard status`.
    #[arg(long, value_name = "DIR", default_value = "/run/bridge-guard")]
    state_dir: PathBuf,
    /// Once hooks are attached and the first reconcile is done, write the hook summary here.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Serve Prometheus metrics on PORT (127.0.0.1) or ADDRESS:PORT, e.g. `--metrics 9558`.
    /// Off unless given; it is unauthenticated, so keep it on loopback unless you mean it.
    #[arg(long, value_name = "ADDR", value_parser = exposition::parse_addr)]
    metrics: Option<SocketAddr>,
    /// Also keep the metrics in this file, for node_exporter's textfile collector
    /// (e.g. /var/lib/node_exporter/textfile/bridge-guard.prom).
    #[arg(long, value_name = "PATH")]
    metrics_textfile: Option<PathBuf>,
    /// Seconds between per-port summary log lines (also logged at shutdown).
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    summary_interval: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let guards = args.policy.guards(&args.bridges)?;
    // Bound first: a bad address is a start-up error, before anything is attached.
    let listener = match args.metrics {
        Some(addr) => Some(exposition::bind(addr).await?),
        None => None,
    };
    let mut agent = Agent::start(Config {
        guards,
        observe: args.observe,
        reconcile_every: Duration::from_secs(args.reconcile_interval),
        libvirt_dir: args.policy.libvirt_dir.clone(),
        state_dir: args.state_dir.clone(),
        ebpf: !args.no_ebpf,
        summary_every: Duration::from_secs(args.summary_interval),
        metrics_textfile: args.metrics_textfile.clone(),
    })?;
    let metrics = match listener {
        Some(l) => {
            let addr = l.local_addr()?;
            tokio::spawn(exposition::serve(l, agent.accounting()));
            format!("; metrics on http://{addr}/metrics")
        }
        None => String::new(),
    };
    agent.resync().await.context("first reconcile")?;
    agent.publish();
    let summary = agent.hooks_summary();
    if let Some(path) = &args.ready_file {
        super::write_atomically(path, &format!("{summary}\n"))
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    eprintln!(
        "bridge-guard: ready: guarding {} ({summary}{}{metrics})",
        args.bridges.join(", "),
        if args.observe { "; observe-only" } else { "" }
    );
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    agent.run(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
