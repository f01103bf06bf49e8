//! The oracle contender: the least a guard could do. A thread in the lab namespace, told the
//! fault class before each injection, follows link notifications and, on the first one that
//! shows the fault in a form a repair can act on, sends that class's one right repair, all its
//! requests in one datagram, and nothing else (no checks, no retries, no logs).
//!
//! Its outage is the floor any guard on netlink notifications can reach on this machine:
//! bridge-guard's outage ÷ the oracle's is the agent's own overhead. The thread runs at normal
//! priority, as the agent does.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use super::{
    faults::Fault,
    monitor::{self, LabView, Model, Received},
    rtnl::{self, PortState, Request, Rtnl},
};

/// What the oracle did, shared with the bench.
#[derive(Default)]
pub struct Tally {
    /// Repairs sent (one per fault it saw).
    pub repairs: AtomicU64,
    /// Requests the kernel refused.
    pub refused: AtomicU64,
    /// The thread's id, for its CPU time in `/proc`.
    pub tid: AtomicU64,
}

/// The running oracle; stopped on drop.
pub struct Oracle {
    arm: Sender<Fault>,
    stop: Arc<AtomicBool>,
    pub tally: Arc<Tally>,
    thread: Option<JoinHandle<()>>,
}

/// The repair for `fault` once `view` shows it, or `None` while it does not (yet).
/// `armed_bridge` is the bridge's ifindex when the oracle was armed: a recreated bridge is the
/// one with another.
pub fn repair(
    fault: Fault,
    view: &LabView,
    bridge: &str,
    armed_bridge: Option<u32>,
) -> Option<Vec<Request>> {
    let br = view.bridge.as_ref()?;
    match fault {
        Fault::StpFlap | Fault::StpGuestFlap => {
            // A port walking STP's timers: STP off first (forcing is refused while it is on).
            let stuck: Vec<&str> = view
                .ports
                .iter()
                .filter(|p| {
                    p.attached
                        && matches!(
                            p.state,
                            Some(PortState::Listening | PortState::Learning | PortState::Blocking)
                        )
                })
                .map(|p| p.name.as_str())
                .collect();
            if stuck.is_empty() {
                return None;
            }
            let mut v = vec![Request::set_stp(bridge, false)];
            v.extend(stuck.into_iter().map(Request::set_forwarding));
            Some(v)
        }
        Fault::Detach => {
            let v: Vec<Request> = view
                .ports
                .iter()
                .filter(|p| p.exists && !p.attached)
                .map(|p| Request::set_master(&p.name, Some(br.ifindex)))
                .collect();
            (!v.is_empty()).then_some(v)
        }
        Fault::BridgeDown => (!br.up).then(|| vec![Request::set_up(bridge, true)]),
        Fault::Recreate => {
            if armed_bridge == Some(br.ifindex) {
                return None;
            }
            // STP off before the ports join, so that they join forwarding; up last.
            let mut v = vec![Request::set_stp(bridge, false)];
            v.extend(
                view.ports
                    .iter()
                    .filter(|p| p.exists && !p.attached)
                    .map(|p| Request::set_master(&p.name, Some(br.ifindex))),
            );
            v.push(Request::set_up(bridge, true));
            Some(v)
        }
    }
}

/// The fault the oracle waits for.
struct Armed {
    fault: Fault,
    /// The bridge when it was armed (a recreated one has another ifindex).
    bridge_ifindex: Option<u32>,
    /// The model still shows the previous fault: nothing is sent until it stops doing so.
    stale: bool,
}

impl Armed {
    /// Armed for `fault` with the lab as the model shows it now.
    fn new(fault: Fault, view: &LabView, bridge: &str) -> Self {
        let bridge_ifindex = view.bridge.as_ref().map(|b| b.ifindex);
        Self {
            fault,
            bridge_ifindex,
            stale: repair(fault, view, bridge, bridge_ifindex).is_some(),
        }
    }

    /// The repair to send now that a notification left the lab as `view`, if it is due.
    fn step(&mut self, view: &LabView, bridge: &str) -> Option<Vec<Request>> {
        let wanted = repair(self.fault, view, bridge, self.bridge_ifindex);
        if self.stale {
            self.stale = wanted.is_some();
            return None;
        }
        wanted
    }
}

/// The thread's work until `stop`.
fn serve(
    sock: &Socket,
    req: &mut Rtnl,
    model: &mut Model,
    bridge: &str,
    arms: &Receiver<Fault>,
    stop: &AtomicBool,
    tally: &Tally,
) -> Result<()> {
    let mut armed: Option<Armed> = None;
    let mut seq = 1;
    while !stop.load(Ordering::Relaxed) {
        let got = monitor::receive(sock, model, &mut seq)?;
        // Arming is sent before the injection, so it is here before the fault's notification
        // is applied: the bridge recorded is the one before the fault. (After a loss the dump
        // may show the fault already; that is rare enough to cost the oracle a fault.)
        while let Ok(fault) = arms.try_recv() {
            armed = Some(Armed::new(fault, &model.view(), bridge));
        }
        let Received::Datagram(data) = got else {
            continue;
        };
        model.apply_datagram(&data);
        let Some(a) = armed.as_mut() else {
            continue;
        };
        let fault = a.fault;
        if let Some(requests) = a.step(&model.view(), bridge) {
            armed = None;
            let whats: Vec<String> = requests.iter().map(|r| r.what().to_owned()).collect();
            let acks = req.batch(requests)?;
            tally.repairs.fetch_add(1, Ordering::Relaxed);
            for (what, errno) in whats.iter().zip(&acks) {
                let Some(errno) = errno else { continue };
                // The first refusal says why; the tally counts the rest.
                if tally.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!(
                        "bench: the kernel refused the oracle's `{what}` ({}) on {}",
                        std::io::Error::from_raw_os_error(*errno),
                        fault.key()
                    );
                }
            }
        }
    }
    Ok(())
}

impl Oracle {
    /// Starts the oracle in namespace `ns` for `bridge` and its VM `ports`; returns once it
    /// follows notifications.
    pub fn start(ns: &str, bridge: &str, ports: Vec<String>) -> Result<Self> {
        let (arm, arms) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (ns, bridge) = (ns.to_owned(), bridge.to_owned());
        let (thread_stop, thread_tally) = (Arc::clone(&stop), Arc::clone(&tally));
        let thread = std::thread::Builder::new()
            .name("oracle".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                thread_tally
                    .tid
                    .store(u64::try_from(tid).unwrap_or(0), Ordering::Relaxed);
                let mut model = Model::new(&bridge, ports);
                let setup = (|| -> Result<(Socket, Rtnl)> {
                    crate::lab::enter_netns(&ns)?;
                    let sock = monitor::subscribe()?;
                    let mut q = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
                    q.bind_auto().context("binding the netlink socket")?;
                    monitor::dump(&sock, &mut model, 1)?;
                    rtnl::set_recv_timeout(&sock, Duration::from_millis(100))?;
                    Ok((sock, Rtnl::from_socket(q)))
                })();
                let (sock, mut req) = match setup {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if let Err(e) = serve(
                    &sock,
                    &mut req,
                    &mut model,
                    &bridge,
                    &arms,
                    &thread_stop,
                    &thread_tally,
                ) {
                    eprintln!("bench: the oracle stopped: {e:#}");
                }
            })
            .context("starting the oracle")?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the oracle did not start")??;
        Ok(Self {
            arm,
            stop,
            tally,
            thread: Some(thread),
        })
    }

    /// Tells the oracle which fault comes next; call right before injecting it.
    pub fn arm(&self, fault: Fault) {
        let _ = self.arm.send(fault);
    }

    /// CPU time of the oracle's thread so far, in ms.
    pub fn cpu_ms(&self) -> Option<f64> {
        let tid = u32::try_from(self.tally.tid.load(Ordering::Relaxed)).ok()?;
        super::stats::cpu_ms(tid)
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::monitor::{BridgeView, PortView};

    fn lab(up: bool, ifindex: u32, ports: &[(bool, Option<PortState>)]) -> LabView {
        LabView {
            bridge: Some(BridgeView {
                ifindex,
                up,
                carrier: up,
                stp_on: Some(true),
            }),
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, (attached, state))| PortView {
                    name: format!("vnet{i}"),
                    exists: true,
                    attached: *attached,
                    state: *state,
                })
                .collect(),
        }
    }

    fn whats(r: Option<Vec<Request>>) -> Vec<String> {
        r.unwrap_or_default()
            .iter()
            .map(|r| r.what().to_owned())
            .collect()
    }

    const FWD: (bool, Option<PortState>) = (true, Some(PortState::Forwarding));

    #[test]
    fn stp_faults_wait_for_a_port_walking_the_timers_then_turn_stp_off_before_forcing() {
        let down = lab(true, 7, &[FWD, (true, Some(PortState::Disabled))]);
        assert!(repair(Fault::StpFlap, &down, "br0", Some(7)).is_none());
        let listening = lab(true, 7, &[FWD, (true, Some(PortState::Listening))]);
        assert_eq!(
            whats(repair(Fault::StpGuestFlap, &listening, "br0", Some(7))),
            [
                "ip link set br0 type bridge stp_state 0",
                "ip link set vnet1 type bridge_slave state forwarding"
            ]
        );
    }

    #[test]
    fn detach_and_bridge_down_repair_only_what_is_broken() {
        let healthy = lab(true, 7, &[FWD, FWD]);
        for f in Fault::ALL {
            assert!(repair(f, &healthy, "br0", Some(7)).is_none(), "{f:?}");
        }
        let detached = lab(true, 7, &[FWD, (false, None)]);
        assert_eq!(
            whats(repair(Fault::Detach, &detached, "br0", Some(7))),
            ["ip link set vnet1 master 7"]
        );
        assert_eq!(
            whats(repair(
                Fault::BridgeDown,
                &lab(false, 7, &[FWD]),
                "br0",
                Some(7)
            )),
            ["ip link set br0 up"]
        );
    }

    #[test]
    fn a_fault_still_showing_from_the_last_repair_is_not_taken_for_the_next() {
        let listening = lab(true, 7, &[FWD, (true, Some(PortState::Listening))]);
        let healthy = lab(true, 7, &[FWD, FWD]);
        // Armed while the model still shows the previous flap, before its repair came in.
        let mut a = Armed::new(Fault::StpFlap, &listening, "br0");
        assert!(a.step(&listening, "br0").is_none());
        assert!(a.step(&healthy, "br0").is_none());
        assert!(a.step(&listening, "br0").is_some());
        // Armed on a healthy lab: the first sight of the fault is acted on.
        let mut b = Armed::new(Fault::StpFlap, &healthy, "br0");
        assert!(b.step(&listening, "br0").is_some());
    }

    #[test]
    fn recreate_acts_on_the_new_bridge_only() {
        // The old bridge losing its ports while it is deleted is not yet the new one.
        let going = lab(true, 7, &[(false, None), (false, None)]);
        assert!(repair(Fault::Recreate, &going, "br0", Some(7)).is_none());
        let new = lab(false, 9, &[(false, None), (false, None)]);
        assert_eq!(
            whats(repair(Fault::Recreate, &new, "br0", Some(7))),
            [
                "ip link set br0 type bridge stp_state 0",
                "ip link set vnet0 master 9",
                "ip link set vnet1 master 9",
                "ip link set br0 up"
            ]
        );
        let gone = LabView {
            bridge: None,
            ports: Vec::new(),
        };
        assert!(repair(Fault::Recreate, &gone, "br0", Some(7)).is_none());
    }
}
