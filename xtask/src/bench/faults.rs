//! The faults, injected in-process through rtnetlink, and the bench's own restore between them.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    observer::Observer,
    rtnl::{PortState, Rtnl, monotonic_ns},
};
use crate::lab::VmLab;

/// A VM lab with a request socket in the host namespace and one in each VM.
pub struct BenchLab {
    pub lab: VmLab,
    pub host: Rtnl,
    pub guests: Vec<Rtnl>,
}

impl BenchLab {
    pub fn new(prefix: &str, tag: &str, vms: usize) -> Result<Self> {
        let lab = VmLab::new(prefix, tag, vms)?;
        let host = Rtnl::open(&lab.host.name)?;
        let guests = lab
            .vms
            .iter()
            .map(|vm| Rtnl::open(&vm.name))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { lab, host, guests })
    }

    pub fn bridge(&self) -> &str {
        &self.lab.bridge
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Kernel STP re-enabled, then a VM port flaps (down, up).
    StpFlap,
    /// A VM port detached from the bridge (`nomaster`).
    Detach,
    /// The bridge set administratively down.
    BridgeDown,
    /// Kernel STP re-enabled, then the guest end of a VM's veth flaps.
    StpGuestFlap,
    /// The bridge deleted and recreated under the same name (STP on, down), ports left out.
    Recreate,
}

impl Fault {
    pub const ALL: [Self; 5] = [
        Self::StpFlap,
        Self::Detach,
        Self::BridgeDown,
        Self::StpGuestFlap,
        Self::Recreate,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::StpFlap => "stp-flap",
            Self::Detach => "detach",
            Self::BridgeDown => "bridge-down",
            Self::StpGuestFlap => "stp-guest-flap",
            Self::Recreate => "recreate",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Self::StpFlap => "STP re-enabled, then a VM port flaps",
            Self::Detach => "a VM port detached (nomaster)",
            Self::BridgeDown => "the bridge set down",
            Self::StpGuestFlap => "STP re-enabled, then a guest end flaps",
            Self::Recreate => "the bridge deleted and recreated (STP on), ports left out",
        }
    }
}

/// How long a guest end may take to show as down at the bridge.
const NOTICE: Duration = Duration::from_secs(2);

/// Waits until the monitor shows each of `ports` disabled (or gone from the bridge).
///
/// A guest end set down and up again within microseconds is invisible to the bridge: the
/// carrier change reaches it through linkwatch, which by then finds the carrier back and leaves
/// the port alone. A guest link flap that the bridge notices is the fault, so the guest end
/// comes back up only once the port was seen disabled.
pub fn wait_ports_down(obs: &mut Observer, ports: &[String]) -> Result<()> {
    obs.peek_until(NOTICE, |s| {
        ports.iter().all(|name| {
            s.view
                .ports
                .iter()
                .any(|p| p.name == *name && p.state.is_none_or(|st| st == PortState::Disabled))
        })
    })
    .with_context(|| format!("waiting for {} to go down at the bridge", ports.join(", ")))
}

/// When a fault was injected (CLOCK_MONOTONIC).
#[derive(Clone, Copy, Debug)]
pub struct Injected {
    /// Right before its first request was sent: where the outage starts.
    pub t0: u64,
    /// Right before its last request was sent (the port or guest end coming back up, the
    /// bridge recreated).
    pub last: u64,
}

/// Injects `fault` (repetition `rep` picks the VM).
pub fn inject(
    lab: &mut BenchLab,
    obs: &mut Observer,
    fault: Fault,
    rep: usize,
) -> Result<Injected> {
    let n = lab.guests.len();
    let vm = rep % n;
    let port = format!("vnet{vm}");
    let bridge = lab.lab.bridge.clone();
    // Not preempted between the timestamp and the request.
    let _rt = super::sched::Realtime::new();
    let t0 = monotonic_ns();
    let mut last = t0;
    match fault {
        Fault::StpFlap => {
            lab.host.set_stp(&bridge, true)?;
            lab.host.set_up(&port, false)?;
            last = monotonic_ns();
            lab.host.set_up(&port, true)?;
        }
        Fault::Detach => lab.host.set_master(&port, None)?,
        Fault::BridgeDown => lab.host.set_up(&bridge, false)?,
        Fault::StpGuestFlap => {
            lab.host.set_stp(&bridge, true)?;
            let guest = lab.guests.get_mut(vm).context("no such VM")?;
            guest.set_up("eth0", false)?;
            wait_ports_down(obs, std::slice::from_ref(&port))?;
            let guest = lab.guests.get_mut(vm).context("no such VM")?;
            last = monotonic_ns();
            guest.set_up("eth0", true)?;
        }
        Fault::Recreate => {
            lab.host.del(&bridge)?;
            last = monotonic_ns();
            lab.host.add_bridge(&bridge, true, 200)?;
        }
    }
    Ok(Injected { t0, last })
}

/// The bench's own repair between faults (never measured): bridge present, STP off (or back
/// on with `stp_on`), every port attached and up, the bridge up, every port forwarding.
pub fn restore(lab: &mut BenchLab, stp_on: bool) -> Result<()> {
    let bridge = lab.lab.bridge.clone();
    if lab.host.get(&bridge)?.is_none() {
        lab.host.add_bridge(&bridge, false, 200)?;
    }
    lab.host.set_stp(&bridge, false)?;
    let br = lab
        .host
        .get(&bridge)?
        .context("the lab bridge vanished while being restored")?;
    for guest in &mut lab.guests {
        if guest.get("eth0")?.is_some_and(|l| !l.admin_up) {
            guest.set_up("eth0", true)?;
        }
    }
    let ports = lab.lab.ports();
    for p in &ports {
        let Some(v) = lab.host.get(p)? else {
            continue;
        };
        if v.master != Some(br.ifindex) {
            lab.host.set_master(p, Some(br.ifindex))?;
        }
        if !v.admin_up {
            lab.host.set_up(p, true)?;
        }
    }
    if !br.admin_up {
        lab.host.set_up(&bridge, true)?;
    }
    for p in &ports {
        let stuck = lab.host.get(p)?.is_some_and(|v| {
            v.admin_up && v.carrier && v.port_state.is_some_and(|s| s != PortState::Forwarding)
        });
        if stuck {
            // Refused (ENETDOWN) while the port is not yet operationally up; with STP off it
            // then comes up forwarding by itself.
            let _ = lab.host.set_forwarding(p);
        }
    }
    if stp_on {
        lab.host.set_stp(&bridge, true)?;
    }
    Ok(())
}
