//! `bridge-guard watch`: attach, then print one line per kernel event.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    accounting::Accounting,
    event::{Change, KernelEvent, PortState},
    model::{Clock, Transition},
    sources::ebpf::{Options, Probes, ring},
    status::format_duration,
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

/// How long a port was in its previous state, and the episode a return to forwarding ends.
#[derive(Default)]
struct Timing {
    in_from_ns: Option<u64>,
    episode: Option<crate::accounting::Episode>,
}

/// Feeds port-state events into accounting (kernel clock) to time each state and episode.
fn time_event(acc: &mut Accounting, ev: &KernelEvent) -> Timing {
    let Change::PortState {
        new: Some(new),
        old,
    } = ev.change
    else {
        return Timing::default();
    };
    let key = format!("{}/{}", ev.netns, ev.port);
    let known = acc.ports.get(&key).map(|p| (p.state, p.since));
    acc.on_transition(&Transition {
        bridge: ev.bridge.clone(),
        port: key.clone(),
        from: known.map(|(s, _)| s).or(old),
        to: new,
        at: ev.ktime_ns,
        clock: Clock::Kernel,
        in_from_ns: None,
        outage_ns: None,
        actor: Some(ev.actor.clone()),
    });
    let port = acc.ports.get(&key);
    Timing {
        in_from_ns: known.map(|(_, since)| ev.ktime_ns.saturating_sub(since)),
        episode: port
            .and_then(|p| p.last_episode.clone())
            .filter(|e| new == PortState::Forwarding && e.end == Some(ev.ktime_ns)),
    }
}

fn text_suffix(t: &Timing) -> String {
    let mut out = String::new();
    if let Some(ns) = t.in_from_ns {
        out.push_str(&format!(" after {}", format_duration(ns)));
    }
    if let Some(ep) = &t.episode {
        let parts: Vec<String> = ep
            .per_state_ns
            .iter()
            .map(|(s, ns)| format!("{s} {}", format_duration(*ns)))
            .collect();
        out.push_str(&format!(
            "; not forwarding for {} ({})",
            format_duration(ep.duration_ns(0)),
            parts.join(", ")
        ));
    }
    out
}

fn json_line(ev: &KernelEvent, timing: &Timing, received_ns: u64) -> anyhow::Result<String> {
    let mut value = serde_json::to_value(ev)?;
    if let Some(obj) = value.as_object_mut() {
        // CLOCK_MONOTONIC when the batch was read: with ktime_ns, the kernel-to-userspace delay.
        obj.insert("received_ktime_ns".into(), received_ns.into());
        if let Some(ns) = timing.in_from_ns {
            obj.insert("in_from_ns".into(), ns.into());
        }
        if let Some(ep) = &timing.episode {
            obj.insert(
                "episode".into(),
                serde_json::json!({
                    "duration_ns": ep.duration_ns(0),
                    "per_state_ns": ep.per_state_ns,
                }),
            );
        }
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
    let mut acc = Accounting::default();
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            r = stream.next_batch(&mut batch, ring::BATCH) => r.context("reading the ring buffer")?,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let received_ns = clock::monotonic_ns();
        let mut out = stdout.lock();
        for ev in batch.drain(..) {
            let Ok(ev) = ev.inspect_err(|e| tracing::warn!("undecodable event: {e}")) else {
                continue;
            };
            let timing = time_event(&mut acc, &ev);
            match ev {
                ev if args.json => writeln!(out, "{}", json_line(&ev, &timing, received_ns)?)?,
                ev => writeln!(
                    out,
                    "{} {ev}{}",
                    clock::format_time_of_day(clock::wall_time(ev.ktime_ns)),
                    text_suffix(&timing)
                )?,
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
