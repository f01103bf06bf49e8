//! `bridge-guard watch`: attach, then print one line per kernel event.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    event::KernelEvent,
    sources::ebpf::{Options, Probes},
    sys::{clock, netns},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object per line, with every field of the event.
    #[arg(long)]
    json: bool,
    /// Report bridges in every network namespace, not only the one bridge-guard runs in.
    #[arg(long)]
    all_netns: bool,
    /// Once every hook is attached, write the hook summary to this file (for scripts and tests:
    /// wait for the file instead of sleeping).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

fn json_line(ev: &KernelEvent) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(ev)?;
    if let Some(obj) = value.as_object_mut() {
        let wall = clock::wall_time(ev.ktime_ns)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        obj.insert(
            "time_unix_ns".into(),
            u64::try_from(wall.as_nanos()).unwrap_or(0).into(),
        );
        obj.insert("tier".into(), ev.hook.tier().into());
    }
    Ok(value.to_string())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let netns = if args.all_netns {
        None
    } else {
        Some(netns::current_inode().context("reading this process's network namespace")?)
    };
    let opts = Options {
        netns,
        ..Options::default()
    };
    let mut probes = Probes::attach(&opts).context("attaching the eBPF hooks")?;
    let mut stream = probes.events()?;
    let summary = probes.summary();
    if let Some(path) = &args.ready_file {
        super::write_atomically(path, &format!("{summary}\n"))
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    eprintln!(
        "bridge-guard: ready: watching {} ({summary})",
        match netns {
            Some(ino) => format!("network namespace {ino}"),
            None => "every network namespace".to_owned(),
        }
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut batch = Vec::new();
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            r = stream.next_batch(&mut batch) => r.context("reading the ring buffer")?,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let mut out = stdout.lock();
        for ev in batch.drain(..) {
            match ev {
                Ok(ev) if args.json => writeln!(out, "{}", json_line(&ev)?)?,
                Ok(ev) => writeln!(
                    out,
                    "{} {ev}",
                    clock::format_time_of_day(clock::wall_time(ev.ktime_ns))
                )?,
                Err(e) => tracing::warn!("undecodable event: {e}"),
            }
        }
        out.flush()?;
    }
    let lost = stream.lost();
    if lost > 0 {
        tracing::warn!(lost, "events lost because the ring buffer was full");
    }
    Ok(())
}
