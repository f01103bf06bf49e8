//! Loop formation (issue 10): a guest that bridges its two NICs makes a loop through the
//! guarded bridge, and with STP off nothing in the kernel stops it.
//!
//! The lab: the usual VMs on `br0`, plus a "loop VM" namespace whose two veths are `vnetA` and
//! `vnetB` on `br0` (STP off, both forwarding, guarded by the agent like any tap). Inside it,
//! bridge `gbr` (STP off) holds the first NIC. The loop forms when the guest enslaves its
//! second NIC to `gbr`; one broadcast from VM 0 then circulates. Measured: the time from that
//! request to the first notification showing `vnetA` or `vnetB` out of forwarding (or off the
//! bridge), and the frames that came back out of the loop VM (`vnetA` + `vnetB` rx packets)
//! until then.
//!
//! A loop with STP off makes hundreds of thousands of packets per second and would drown the
//! machine, so a thread of the bench (SCHED_FIFO) watches the counters every millisecond and
//! ends the loop itself, by taking the second NIC off `gbr` and deleting `gbr`, once the loop
//! has lasted `wait` or made `packet_cap` frames, whichever comes first, and in any case once the
//! measurement is over. Everything stays inside the lab's namespaces; dropping them removes
//! the links too.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::{
    contenders::Contender,
    faults::BenchLab,
    rtnl::{PortState, Rtnl, monotonic_ns},
    stats::human_ns,
    watched::WatchedLab,
};
use crate::lab::{NetNs, TempDir, in_netns};

/// The loop VM's two ports on the guarded bridge.
const LOOP_PORTS: [&str; 2] = ["vnetA", "vnetB"];
/// How long the breaker keeps the loop after the agent blocked it: to see the block hold.
const TAIL: Duration = Duration::from_millis(200);

pub struct Plan {
    pub vms: usize,
    pub wait: Duration,
    pub packet_cap: u64,
    pub quiet: Duration,
}

/// What one loop did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoopRun {
    pub vms: usize,
    pub wait_s: f64,
    pub packet_cap: u64,
    /// From the guest's enslaving request to the first notification showing a loop port out of
    /// forwarding; `None`: not before the loop ended.
    pub blocked_after_ns: Option<u64>,
    /// Which port and how (`vnetB blocking`, `vnetA detached`).
    pub blocked: Option<String>,
    /// Frames out of the loop VM from the loop's creation to the first counter reading at or
    /// after the block.
    pub packets_before_block: Option<u64>,
    /// Frames out of the loop VM from its creation until the loop ended.
    pub packets_total: u64,
    /// Who ended the loop: the agent, or the bench at its time or packet cap.
    pub ended_by: String,
    /// From the loop's creation to its end (the agent's block, or the bench's teardown).
    pub lasted_ns: u64,
    /// From the bench's cut to the guest bridge deleted (the detach waits for an RCU grace
    /// period).
    #[serde(default)]
    pub teardown_ns: u64,
    #[serde(default)]
    pub idle_rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
}

impl LoopRun {
    pub fn summary(&self) -> String {
        match (&self.blocked, self.blocked_after_ns) {
            (Some(how), Some(ns)) => format!(
                "{how} {} after the loop formed, {} frames through the loop before",
                human_ns(ns),
                self.packets_before_block
                    .map_or_else(|| "?".to_owned(), |p| p.to_string())
            ),
            _ => format!(
                "not blocked within {}: {}, {} frames through the loop",
                human_ns(self.lasted_ns),
                self.ended_by,
                self.packets_total
            ),
        }
    }
}

/// Why the breaker stopped the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The main thread said the measurement is over.
    Told,
    TimeCap,
    PacketCap,
}

/// What the breaker thread saw.
struct Breaker {
    /// CLOCK_MONOTONIC right before the loop-making request.
    t_loop: u64,
    /// (CLOCK_MONOTONIC, frames out of the loop VM since the loop formed), every millisecond.
    samples: Vec<(u64, u64)>,
    ended: Ended,
    /// When the loop was cut (the second NIC's port disabled).
    t_end: u64,
    /// From the cut to the guest bridge gone.
    teardown_ns: u64,
}

/// Frames the loop VM has sent into `br0` so far: rx of both its ports.
fn loop_frames(host: &mut Rtnl) -> Result<u64> {
    let mut total = 0;
    for p in LOOP_PORTS {
        total += host
            .get(p)?
            .with_context(|| format!("{p} vanished during the loop"))?
            .rx_packets;
    }
    Ok(total)
}

/// Builds the loop VM: `vnetA`/`vnetB` on `br0`, `gbr` inside holding `eth0`; `eth1` up, loose.
fn build(lab: &BenchLab, vm: &NetNs) -> Result<()> {
    let mut host = vec![];
    for (i, p) in LOOP_PORTS.iter().enumerate() {
        host.push(format!(
            "link add {p} type veth peer name eth{i} netns {}",
            vm.name
        ));
        host.push(format!("link set {p} master {}", lab.bridge()));
        host.push(format!("link set {p} up"));
    }
    lab.lab.host.ip_batch(&host)?;
    vm.ip_batch(&[
        "link add gbr type bridge stp_state 0".to_owned(),
        "link set eth0 master gbr".to_owned(),
        "link set eth0 up".to_owned(),
        "link set eth1 up".to_owned(),
        "link set gbr up".to_owned(),
    ])
}

/// Ends the loop: the second NIC's port on the guest bridge disabled, which takes effect at
/// once, then (the storm over) the NIC off the bridge and the bridge deleted. Returns when the
/// loop was cut, and how long the teardown took after that.
fn end_loop(guest: &mut Rtnl) -> Result<(u64, u64)> {
    let cut = guest.set_disabled("eth1");
    let mut t = monotonic_ns();
    // Detaching waits for an RCU grace period: quick once nothing circulates, and the way to
    // cut the loop if disabling the port was refused.
    let detached = guest.set_master("eth1", None);
    if cut.is_err() {
        t = monotonic_ns();
    }
    let deleted = guest.del("gbr");
    if let (Err(c), Err(d)) = (&cut, &detached) {
        bail!("cannot end the guest loop: {c:#}; {d:#}");
    }
    deleted?;
    Ok((t, monotonic_ns() - t))
}

/// The breaker's thread: makes the loop, sends one broadcast into it, watches the counters and
/// ends the loop at a cap or when told.
fn breaker(
    (mut host, mut guest): (Rtnl, Rtnl),
    broadcast: &std::net::UdpSocket,
    (wait, cap): (Duration, u64),
    told: &AtomicBool,
    started: &mpsc::Sender<u64>,
) -> Result<Breaker> {
    let _rt = super::sched::Realtime::new();
    let gbr = guest
        .get("gbr")?
        .context("the loop VM has no bridge")?
        .ifindex;
    let base = loop_frames(&mut host)?;
    let t_loop = monotonic_ns();
    guest.set_master("eth1", Some(gbr))?;
    let _ = started.send(t_loop);
    // One frame to circulate, besides whatever the guests send.
    let sent = broadcast.send_to(b"loop", "198.18.0.255:9");
    let mut samples = Vec::new();
    let wait_ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
    let ended = loop {
        let frames = match loop_frames(&mut host) {
            Ok(f) => f.saturating_sub(base),
            Err(e) => {
                // Blind: end the loop before anything else.
                end_loop(&mut guest)?;
                return Err(e.context("reading the loop ports' counters"));
            }
        };
        let now = monotonic_ns();
        samples.push((now, frames));
        if told.load(Ordering::Relaxed) {
            break Ended::Told;
        }
        if frames >= cap {
            break Ended::PacketCap;
        }
        if now - t_loop >= wait_ns {
            break Ended::TimeCap;
        }
        // The cap's resolution: a millisecond of a loop is at most some hundreds of frames.
        std::thread::sleep(Duration::from_millis(1));
    };
    let (t_end, teardown_ns) = end_loop(&mut guest)?;
    if let Ok(f) = loop_frames(&mut host) {
        samples.push((monotonic_ns(), f.saturating_sub(base)));
    }
    sent.context("sending the broadcast into the loop")?;
    Ok(Breaker {
        t_loop,
        samples,
        ended,
        t_end,
        teardown_ns,
    })
}

/// Runs the loop once against bridge-guard (`bin` with `extra` arguments).
pub fn run(
    plan: &Plan,
    (bin, extra): (&std::path::Path, &[String]),
    tmp: &TempDir,
    progress: &dyn Fn(&str),
) -> Result<LoopRun> {
    progress(&format!(
        "bench: loop: building the lab ({} VMs and a VM bridging its two NICs)",
        plan.vms
    ));
    let vm = NetNs::new("bgb", "loopvm")?;
    let mut w = WatchedLab::new("loop", plan.vms, plan.quiet, |lab| {
        build(lab, &vm)?;
        Ok(LOOP_PORTS.iter().map(|p| (*p).to_owned()).collect())
    })?;
    let running = w.start(Contender::BridgeGuard, (bin, extra), tmp)?;
    let idle_rss_kib = running.rss_now_kib();

    let sockets = (Rtnl::open(&w.lab.lab.host.name)?, Rtnl::open(&vm.name)?);
    let sender = w.lab.lab.vms.first().context("the loop lab has no VM")?;
    let broadcast = in_netns(&sender.name, || {
        let s = std::net::UdpSocket::bind("198.18.0.1:0")?;
        s.set_broadcast(true)?;
        Ok(s)
    })?;
    let told = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = mpsc::channel();
    let (wait, cap) = (plan.wait, plan.packet_cap);
    let thread_told = Arc::clone(&told);
    progress(&format!(
        "bench: loop: the guest enslaves its second NIC; waiting up to {:.1} s or {cap} frames for the agent to block it",
        wait.as_secs_f64()
    ));
    let handle = std::thread::Builder::new()
        .name("loop-breaker".into())
        .spawn(move || breaker(sockets, &broadcast, (wait, cap), &thread_told, &started_tx))
        .context("starting the loop breaker")?;
    let Ok(t_loop) = started_rx.recv_timeout(Duration::from_secs(10)) else {
        told.store(true, Ordering::Relaxed);
        let why = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the loop breaker panicked"))?
            .err()
            .map_or_else(|| "no reason".to_owned(), |e| format!("{e:#}"));
        bail!("the loop was not made: {why}");
    };
    let out = |s: &super::monitor::Sample| {
        s.view.ports.iter().find_map(|p| {
            if !LOOP_PORTS.contains(&p.name.as_str()) {
                return None;
            }
            if !p.exists || !p.attached {
                Some(format!("{} off the bridge", p.name))
            } else if p.state != Some(PortState::Forwarding) {
                Some(format!(
                    "{} {}",
                    p.name,
                    p.state.map_or("without a state", PortState::name)
                ))
            } else {
                None
            }
        })
    };
    let hit = w
        .obs
        .wait_for(wait + TAIL, |s| s.t_ns >= t_loop && out(s).is_some());
    if hit.as_ref().is_ok_and(Option::is_some) {
        std::thread::sleep(TAIL);
    }
    told.store(true, Ordering::Relaxed);
    let b = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the loop breaker panicked"))??;
    let hit = hit?;
    let blocked_at = hit.as_ref().map(|s| s.t_ns);
    let packets_total = b.samples.last().map_or(0, |s| s.1);
    let run = LoopRun {
        vms: plan.vms,
        wait_s: wait.as_secs_f64(),
        packet_cap: cap,
        blocked_after_ns: blocked_at.map(|t| t - b.t_loop),
        blocked: hit.as_ref().and_then(out),
        packets_before_block: blocked_at.and_then(|t| {
            b.samples
                .iter()
                .find(|(at, _)| *at >= t)
                .or(b.samples.last())
                .map(|s| s.1)
        }),
        packets_total,
        ended_by: match (blocked_at, b.ended) {
            (Some(_), _) => "the agent".to_owned(),
            (None, Ended::PacketCap) => format!("the bench at its cap of {cap} frames"),
            (None, Ended::TimeCap | Ended::Told) => {
                format!("the bench at its time cap of {:.1} s", wait.as_secs_f64())
            }
        },
        lasted_ns: blocked_at.unwrap_or(b.t_end).saturating_sub(b.t_loop),
        teardown_ns: b.teardown_ns,
        idle_rss_kib,
        peak_rss_kib: running.peak_rss_kib(),
    };
    progress(&format!(
        "bench: loop: {}; the bench's teardown took {}",
        run.summary(),
        human_ns(run.teardown_ns)
    ));
    drop(running);
    Ok(run)
}
