//! `bridge-guard watch`: attach, then print one line per kernel event; on netlink alone
//! (saying so) where eBPF is unavailable.

use std::{io::Write as _, path::PathBuf};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    accounting::Accounting,
    event::{Actor, Change, KernelEvent, PortState},
    model::{Clock, Transition},
    planner::glob_match,
    sources::{
        ebpf::{Options, Probes, ring},
        link_watch::{LinkChange, LinkWatch},
        netlink::{Netlink, NetlinkEvent},
    },
    status::format_duration,
    sys::{clock, netns},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object per line, with every field of the event.
    #[arg(short = 'j', long)]
    json: bool,
    /// Report bridges in every network namespace, not only the one bridge-guard runs in
    /// (needs eBPF).
    #[arg(long)]
    all_netns: bool,
    /// Once every hook is attached, write the hook summary to this file (for scripts and tests:
    /// wait for the file instead of sleeping).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Times in UTC (`12:00:01.000042Z`) instead of local time with its offset
    /// (`13:00:01.000042+01:00`).
    #[arg(long)]
    utc: bool,
    /// Only events of this bridge (repeatable).
    #[arg(long = "bridge", value_name = "NAME")]
    bridges: Vec<String>,
    /// Only events of ports matching GLOB (`*`, `?`; repeatable), e.g. `--port 'vnet*'`.
    #[arg(long = "port", value_name = "GLOB")]
    ports: Vec<String>,
    /// Watch netlink alone, without the eBPF hooks (no kernel timestamps, no actors).
    #[arg(long)]
    no_ebpf: bool,
}

impl Args {
    /// Whether an event of `port` on `bridge` passes `--bridge` and `--port`.
    fn wants(&self, bridge: &str, port: &str) -> bool {
        (self.bridges.is_empty() || self.bridges.iter().any(|b| b == bridge))
            && (self.ports.is_empty() || self.ports.iter().any(|p| glob_match(p, port)))
    }

    fn time(&self, t: std::time::SystemTime) -> String {
        clock::format_time_with_offset(t, self.utc)
    }
}

/// How long a port was in its previous state, and the episode a return to forwarding ends.
#[derive(Default)]
struct Timing {
    in_from_ns: Option<u64>,
    episode: Option<crate::accounting::Episode>,
}

/// One change to time: which port, what happened, when, on which clock.
struct Timed<'a> {
    key: String,
    bridge: &'a str,
    change: Change,
    at: u64,
    clock: Clock,
    actor: Option<Actor>,
}

/// Feeds port-state changes into accounting to time each state and episode.
fn time_change(acc: &mut Accounting, c: Timed<'_>) -> Timing {
    let Change::PortState {
        new: Some(new),
        old,
    } = c.change
    else {
        return Timing::default();
    };
    let known = acc.ports.get(&c.key).map(|p| (p.state, p.since));
    acc.on_transition(&Transition {
        bridge: c.bridge.to_owned(),
        port: c.key.clone(),
        from: known.map(|(s, _)| s).or(old),
        to: new,
        at: c.at,
        clock: c.clock,
        in_from_ns: None,
        outage_ns: None,
        actor: c.actor,
    });
    let port = acc.ports.get(&c.key);
    Timing {
        in_from_ns: known.map(|(_, since)| c.at.saturating_sub(since)),
        episode: port
            .and_then(|p| p.last_episode.clone())
            .filter(|e| new == PortState::Forwarding && e.end == Some(c.at)),
    }
}

fn time_event(acc: &mut Accounting, ev: &KernelEvent) -> Timing {
    time_change(
        acc,
        Timed {
            key: format!("{}/{}", ev.netns, ev.port),
            bridge: &ev.bridge,
            change: ev.change,
            at: ev.ktime_ns,
            clock: Clock::Kernel,
            actor: Some(ev.actor.clone()),
        },
    )
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

/// An event as one JSON object, with the timing and the wall-clock time added.
fn json_line(
    ev: &impl serde::Serialize,
    ktime_ns: u64,
    tier: &str,
    timing: &Timing,
    received_ns: u64,
) -> anyhow::Result<String> {
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
        let wall = clock::wall_time(ktime_ns)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        obj.insert(
            "time_unix_ns".into(),
            u64::try_from(wall.as_nanos()).unwrap_or(0).into(),
        );
        obj.insert("tier".into(), tier.into());
    }
    Ok(value.to_string())
}

fn ready(args: &Args, summary: &str, what: &str) -> anyhow::Result<()> {
    if let Some(path) = &args.ready_file {
        super::write_atomically(path, &format!("{summary}\n"))
            .with_context(|| format!("writing the ready file {}", path.display()))?;
    }
    eprintln!("bridge-guard: ready: watching {what} ({summary})");
    Ok(())
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
    let attached = if args.no_ebpf {
        Err("--no-ebpf".to_owned())
    } else {
        Probes::attach(&opts)
            .and_then(|mut p| p.events().map(|s| (p, s)))
            .map_err(|e| crate::error_chain(&e))
    };
    let (probes, mut stream) = match attached {
        Ok(ps) => ps,
        Err(why) if !args.all_netns => {
            eprintln!(
                "bridge-guard: eBPF unavailable ({why}): watching netlink alone, without kernel \
                 timestamps or actors"
            );
            return watch_netlink(&args).await;
        }
        Err(why) => bail!("--all-netns needs the eBPF hooks, which are unavailable: {why}"),
    };
    let summary = probes.summary();
    ready(
        &args,
        &summary,
        &match netns {
            Some(ino) => format!("network namespace {ino}"),
            None => "every network namespace".to_owned(),
        },
    )?;

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
            if !args.wants(&ev.bridge, &ev.port) {
                continue;
            }
            let timing = time_event(&mut acc, &ev);
            if args.json {
                let line = json_line(&ev, ev.ktime_ns, ev.hook.tier(), &timing, received_ns)?;
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{} {ev}{}",
                    args.time(clock::wall_time(ev.ktime_ns)),
                    text_suffix(&timing)
                )?;
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

/// `watch` on netlink alone: link notifications compared with the links as they were.
async fn watch_netlink(args: &Args) -> anyhow::Result<()> {
    let mut nl = Netlink::open().context("opening netlink")?;
    let mut links = LinkWatch::new(nl.dump().await.context("dumping the links")?);
    let ino = netns::current_inode().context("reading this process's network namespace")?;
    ready(args, "netlink only", &format!("network namespace {ino}"))?;
    let mut term = signal(SignalKind::terminate())?;
    let mut acc = Accounting::default();
    let stdout = std::io::stdout();
    loop {
        let ev = tokio::select! {
            ev = nl.notifications.recv() => ev.context("reading link notifications")?,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        if ev == NetlinkEvent::Overrun {
            tracing::warn!("netlink notifications were lost (ENOBUFS): starting over from a dump");
            links = LinkWatch::new(nl.dump().await.context("dumping the links")?);
            continue;
        }
        // Netlink has no timestamps: receive time is the best there is.
        let at = clock::monotonic_ns();
        let mut out = stdout.lock();
        for c in links.apply(ev) {
            if !args.wants(&c.bridge, &c.port) {
                continue;
            }
            let timing = netlink_timing(&mut acc, &c, at);
            if args.json {
                writeln!(out, "{}", json_line(&c, at, "netlink", &timing, at)?)?;
            } else {
                writeln!(
                    out,
                    "{} {c}{}",
                    args.time(clock::wall_time(at)),
                    text_suffix(&timing)
                )?;
            }
        }
        out.flush()?;
    }
    Ok(())
}

fn netlink_timing(acc: &mut Accounting, c: &LinkChange, at: u64) -> Timing {
    time_change(
        acc,
        Timed {
            key: c.port.clone(),
            bridge: &c.bridge,
            change: c.change,
            at,
            clock: Clock::Netlink,
            actor: None,
        },
    )
}
