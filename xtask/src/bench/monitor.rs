//! Outage measurement from timestamped link notifications.
//!
//! A thread inside the lab's host namespace subscribes to RTNLGRP_LINK (AF_UNSPEC link
//! messages and the bridge's AF_BRIDGE port-state messages), keeps a model of the lab, and
//! stamps each datagram with CLOCK_MONOTONIC right after `recv()` returns. After each one it
//! decides whether the lab is healthy: the bridge exists, is admin-up with carrier, and every
//! VM port is enslaved to it and forwarding. Nothing is polled.
//!
//! Carrier: the kernel reports a bridge's carrier change through linkwatch, which may batch it
//! up to a second later, although the carrier bit itself is set synchronously before the port
//! state notification that caused it. So when a notification leaves everything healthy but the
//! last reported carrier, the thread asks the kernel once (RTM_GETLINK on the bridge) and, if
//! the carrier is there, counts the lab healthy as of that notification.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Sender},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkPayload};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage, link::LinkMessage};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use super::rtnl::{self, LinkView, PortState, Rtnl, monotonic_ns};

/// One VM port as the monitor last saw it.
#[derive(Clone, Debug)]
pub struct PortView {
    pub name: String,
    pub exists: bool,
    /// Enslaved to the lab bridge.
    pub attached: bool,
    pub state: Option<PortState>,
}

#[derive(Clone, Debug)]
pub struct BridgeView {
    pub ifindex: u32,
    pub up: bool,
    pub carrier: bool,
    /// Kernel STP on, where the last message about the bridge said.
    pub stp_on: Option<bool>,
}

/// The lab as of one notification.
#[derive(Clone, Debug)]
pub struct LabView {
    pub bridge: Option<BridgeView>,
    pub ports: Vec<PortView>,
}

impl LabView {
    /// Why the lab is not healthy, or `None`.
    pub fn problem(&self, bridge: &str) -> Option<String> {
        let Some(br) = &self.bridge else {
            return Some(format!("{bridge} does not exist"));
        };
        if !br.up {
            return Some(format!("{bridge} is down"));
        }
        for p in &self.ports {
            if !p.exists {
                return Some(format!("{} does not exist", p.name));
            }
            if !p.attached {
                return Some(format!("{} is detached from {bridge}", p.name));
            }
            if p.state != Some(PortState::Forwarding) {
                return Some(format!(
                    "{} is {}",
                    p.name,
                    p.state.map_or("without a state", PortState::name)
                ));
            }
        }
        if !br.carrier {
            return Some(format!("{bridge} has no carrier"));
        }
        None
    }
}

/// The lab after one notification datagram.
#[derive(Clone, Debug)]
pub struct Sample {
    /// CLOCK_MONOTONIC right after the datagram was received.
    pub t_ns: u64,
    pub view: LabView,
    pub problem: Option<String>,
    /// The carrier came from an RTM_GETLINK made for this notification (see the module doc).
    pub carrier_queried: bool,
    /// Notifications were lost (ENOBUFS) before this one and the model was rebuilt from a dump.
    pub overrun: bool,
}

impl Sample {
    pub fn healthy(&self) -> bool {
        self.problem.is_none()
    }
}

/// Something that happened: a link notification, or a line of guard output.
pub enum Activity {
    Link(Box<Sample>),
    Guard { line: String },
}

/// The model the thread keeps: every link of the namespace by ifindex.
pub(super) struct Model {
    bridge: String,
    ports: Vec<String>,
    links: HashMap<u32, LinkView>,
}

impl Model {
    pub(super) fn new(bridge: &str, ports: Vec<String>) -> Self {
        Self {
            bridge: bridge.to_owned(),
            ports,
            links: HashMap::new(),
        }
    }

    /// Applies every link message of a datagram of notifications.
    pub(super) fn apply_datagram(&mut self, data: &[u8]) {
        for m in rtnl::messages(data) {
            if let NetlinkPayload::InnerMessage(msg) = m.payload {
                self.apply(&msg);
            }
        }
    }

    pub(super) fn apply(&mut self, msg: &RouteNetlinkMessage) {
        match msg {
            RouteNetlinkMessage::NewLink(l)
                if l.header.interface_family == AddressFamily::Bridge =>
            {
                if let (Some(state), Some(link)) = (
                    rtnl::bridge_port_state(l),
                    self.links.get_mut(&l.header.index),
                ) {
                    link.port_state = Some(state);
                }
            }
            RouteNetlinkMessage::NewLink(l) => self.apply_link(l),
            RouteNetlinkMessage::DelLink(l)
                if l.header.interface_family == AddressFamily::Bridge =>
            {
                if let Some(link) = self.links.get_mut(&l.header.index) {
                    link.port_state = None;
                }
            }
            RouteNetlinkMessage::DelLink(l) => {
                self.links.remove(&l.header.index);
            }
            _ => {}
        }
    }

    fn apply_link(&mut self, l: &LinkMessage) {
        let mut v = rtnl::link_view(l);
        let old = self.links.get(&v.ifindex);
        if v.port_state.is_none() && v.master.is_some() && old.is_some_and(|o| o.master == v.master)
        {
            v.port_state = old.and_then(|o| o.port_state);
        }
        if v.master.is_none() {
            v.port_state = None;
        }
        self.links.insert(v.ifindex, v);
    }

    pub(super) fn view(&self) -> LabView {
        let by_name: HashMap<&str, &LinkView> =
            self.links.values().map(|l| (l.name.as_str(), l)).collect();
        let bridge = by_name
            .get(self.bridge.as_str())
            .filter(|b| b.is_bridge)
            .copied();
        LabView {
            bridge: bridge.map(|b| BridgeView {
                ifindex: b.ifindex,
                up: b.admin_up,
                carrier: b.carrier,
                stp_on: b.stp_on,
            }),
            ports: self
                .ports
                .iter()
                .map(|name| {
                    let l = by_name.get(name.as_str());
                    PortView {
                        name: name.clone(),
                        exists: l.is_some(),
                        attached: l
                            .is_some_and(|l| bridge.is_some_and(|b| l.master == Some(b.ifindex))),
                        state: l.and_then(|l| l.port_state),
                    }
                })
                .collect(),
        }
    }
}

/// Dumps every link into the model through `sock` (which may also carry notifications: they
/// are applied in order too).
pub(super) fn dump(sock: &Socket, model: &mut Model, seq: u32) -> Result<()> {
    let req = rtnl::encode(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
    );
    sock.send(&req, 0)
        .context("sending the link dump request")?;
    loop {
        let data = match rtnl::recv(sock) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("reading the link dump"),
        };
        for m in rtnl::messages(&data) {
            match m.payload {
                NetlinkPayload::Done(_) if m.header.sequence_number == seq => return Ok(()),
                NetlinkPayload::Error(e) if m.header.sequence_number == seq => {
                    bail!("the link dump failed: {e:?}")
                }
                NetlinkPayload::InnerMessage(msg) => model.apply(&msg),
                _ => {}
            }
        }
    }
}

/// What one receive on a subscribed socket brought.
pub(super) enum Received {
    /// A datagram of notifications, not yet applied.
    Datagram(Vec<u8>),
    /// Nothing within the socket's receive timeout.
    Nothing,
    /// Notifications were lost (ENOBUFS): the model was rebuilt from a dump.
    Resynced,
}

/// Receives the next datagram on `sock`; after a loss, rebuilds `model` from a dump (with
/// request number `seq`, bumped).
pub(super) fn receive(sock: &Socket, model: &mut Model, seq: &mut u32) -> Result<Received> {
    match rtnl::recv(sock) {
        Ok(d) => Ok(Received::Datagram(d)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(Received::Nothing)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
            *seq += 1;
            dump(sock, model, *seq)?;
            Ok(Received::Resynced)
        }
        Err(e) => Err(e).context("reading link notifications"),
    }
}

/// The notification thread's work: runs until `stop`.
fn watch(
    sock: &Socket,
    query: &mut Rtnl,
    model: &mut Model,
    tx: &Sender<Activity>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut seq = 1;
    let mut overrun = false;
    while !stop.load(Ordering::Relaxed) {
        let data = match receive(sock, model, &mut seq)? {
            Received::Datagram(d) => d,
            Received::Nothing => continue,
            Received::Resynced => {
                overrun = true;
                continue;
            }
        };
        let t_ns = monotonic_ns();
        model.apply_datagram(&data);
        let view = model.view();
        let mut problem = view.problem(&model.bridge);
        let mut carrier_queried = false;
        if problem.is_some() && view.bridge.as_ref().is_some_and(|b| !b.carrier) {
            // Healthy but for the carrier last reported: ask (see the module doc).
            let mut without_carrier = view.clone();
            if let Some(b) = without_carrier.bridge.as_mut() {
                b.carrier = true;
            }
            if without_carrier.problem(&model.bridge).is_none() {
                let bridge = model.bridge.clone();
                if let Some(now) = query.get(&bridge)? {
                    carrier_queried = true;
                    if now.carrier {
                        problem = None;
                        if let Some(l) = model.links.get_mut(&now.ifindex) {
                            l.carrier = true;
                        }
                    }
                }
            }
        }
        let sample = Sample {
            t_ns,
            view,
            problem,
            carrier_queried,
            overrun: std::mem::take(&mut overrun),
        };
        if tx.send(Activity::Link(Box::new(sample))).is_err() {
            break;
        }
    }
    Ok(())
}

/// A socket of the calling thread's namespace subscribed to RTNLGRP_LINK, with a receive buffer
/// no burst of these labs overruns.
pub(super) fn subscribe() -> Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
    sock.bind_auto().context("binding the netlink socket")?;
    rtnl::force_rcvbuf(&sock, 32 << 20)?;
    sock.add_membership(rtnl::RTNLGRP_LINK)
        .context("subscribing to RTNLGRP_LINK")?;
    Ok(sock)
}

/// Starts the notification thread in namespace `ns`, watching `bridge` and VM `ports`: every
/// datagram becomes a [`Sample`] on `tx`. Returns once its first dump is in, with the flag that
/// stops it.
pub fn spawn(
    ns: &str,
    bridge: &str,
    ports: Vec<String>,
    tx: Sender<Activity>,
) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ns_owned, thread_tx, thread_stop) = (ns.to_owned(), tx, Arc::clone(&stop));
    let mut model = Model::new(bridge, ports);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("link-monitor".into())
        .spawn(move || {
            let setup = (|| -> Result<(Socket, Rtnl)> {
                crate::lab::enter_netns(&ns_owned)?;
                // Timestamps taken when notifications arrive, not when a CPU frees up.
                if !super::sched::realtime() {
                    eprintln!(
                        "bench: the link monitor could not get real-time priority; its \
                         timestamps include scheduling delays"
                    );
                }
                let sock = subscribe()?;
                let mut q = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
                q.bind_auto().context("binding the netlink socket")?;
                dump(&sock, &mut model, 1)?;
                // Receives give up now and then, so a stop request is seen.
                rtnl::set_recv_timeout(&sock, Duration::from_millis(100))?;
                Ok((sock, Rtnl::from_socket(q)))
            })();
            let (sock, mut query) = match setup {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let view = model.view();
            let problem = view.problem(&model.bridge);
            let _ = thread_tx.send(Activity::Link(Box::new(Sample {
                t_ns: monotonic_ns(),
                view,
                problem,
                carrier_queried: false,
                overrun: false,
            })));
            let _ = ready_tx.send(Ok(()));
            if let Err(e) = watch(&sock, &mut query, &mut model, &thread_tx, &thread_stop) {
                eprintln!("bench: the link monitor stopped: {e:#}");
            }
        })
        .context("starting the link monitor")?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the link monitor did not start")??;
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, attached: bool, state: Option<PortState>) -> PortView {
        PortView {
            name: name.to_owned(),
            exists: true,
            attached,
            state,
        }
    }

    #[test]
    fn health_needs_an_up_bridge_with_carrier_and_every_port_forwarding() {
        let mut v = LabView {
            bridge: Some(BridgeView {
                ifindex: 1,
                up: true,
                carrier: true,
                stp_on: Some(false),
            }),
            ports: vec![
                port("vnet0", true, Some(PortState::Forwarding)),
                port("vnet1", true, Some(PortState::Forwarding)),
            ],
        };
        assert_eq!(v.problem("br0"), None);
        v.ports[1].state = Some(PortState::Listening);
        assert_eq!(v.problem("br0").as_deref(), Some("vnet1 is listening"));
        v.ports[1] = port("vnet1", false, None);
        assert_eq!(
            v.problem("br0").as_deref(),
            Some("vnet1 is detached from br0")
        );
        v.ports[1] = port("vnet1", true, Some(PortState::Forwarding));
        if let Some(b) = v.bridge.as_mut() {
            b.carrier = false;
        }
        assert_eq!(v.problem("br0").as_deref(), Some("br0 has no carrier"));
        v.bridge = None;
        assert_eq!(v.problem("br0").as_deref(), Some("br0 does not exist"));
    }
}
