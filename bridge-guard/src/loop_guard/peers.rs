//! Where a port leads when it leads into another network namespace: a veth's peer, a vlan's or
//! macvlan's lower device. Netlink names such a device by the namespace id this namespace
//! knows it by (`IFLA_LINK_NETNSID`), and lets this socket query that namespace with
//! `IFLA_TARGET_NETNSID`: the peer, its master, and that bridge's other ports, judged by kind.
//!
//! Other namespaces send no notifications here, so what is found is kept until the port
//! changes, and looked at again on every full reconcile (off the repair path: a reconcile dumps
//! everything anyway).

use std::{collections::BTreeMap, time::Duration};

use rtnetlink::Handle;

use super::hazards::{Remote, bridge_hazard, kind_hazard};
use crate::sources::netlink::{self, LinkKind, LinkSnapshot};

/// What was found, per port ifindex, with what it was found for (netns id, remote ifindex).
#[derive(Default)]
pub struct Peers {
    found: BTreeMap<u32, ((i32, u32), Option<String>)>,
}

/// How long a look into another namespace may take before it counts as a hazard.
const LOOK_TIMEOUT: Duration = Duration::from_secs(1);

impl Peers {
    /// What `port` must be looked up for, if it leads into another namespace and what was found
    /// (if anything) was for another device: `(netns id, remote ifindex)`.
    pub fn needs(&self, port: &LinkSnapshot) -> Option<(i32, u32)> {
        if !matches!(port.kind, LinkKind::Veth | LinkKind::Stacked(_)) {
            return None;
        }
        let key = (port.link_netnsid?, port.lower?);
        let known = self
            .found
            .get(&port.ifindex)
            .is_some_and(|(k, _)| *k == key);
        (!known).then_some(key)
    }

    /// Records what a look found.
    pub fn insert(&mut self, ifindex: u32, key: (i32, u32), verdict: Option<String>) {
        self.found.insert(ifindex, (key, verdict));
    }

    /// Looks at every port in `ports` that leads into another namespace, again, and forgets
    /// ports not among them: a full reconcile's part, off the repair path.
    pub async fn refresh_all(&mut self, handle: &Handle, ports: Vec<LinkSnapshot>) {
        let present: std::collections::BTreeSet<u32> = ports.iter().map(|p| p.ifindex).collect();
        self.found.retain(|i, _| present.contains(i));
        for p in ports {
            let (Some(nsid), Some(lower)) = (p.link_netnsid, p.lower) else {
                continue;
            };
            if !matches!(p.kind, LinkKind::Veth | LinkKind::Stacked(_)) {
                continue;
            }
            let verdict = look(handle.clone(), p.clone(), nsid, lower).await;
            self.insert(p.ifindex, (nsid, lower), verdict);
        }
    }

    /// What the planner needs.
    pub fn remote(&self) -> Remote {
        self.found
            .iter()
            .map(|(i, (_, v))| (*i, v.clone()))
            .collect()
    }
}

/// A hazard where `port` leads in namespace `nsid` (as device `lower` there), or `None` if it
/// is safe. Bounded by [`LOOK_TIMEOUT`]: no answer counts as a hazard.
pub async fn look(handle: Handle, port: LinkSnapshot, nsid: i32, lower: u32) -> Option<String> {
    let verdict = tokio::time::timeout(LOOK_TIMEOUT, look_into(&handle, &port, nsid, lower)).await;
    let verdict = verdict.unwrap_or_else(|_| {
        Some(format!(
            "no answer within {LOOK_TIMEOUT:?} on where {} leads (namespace {nsid})",
            port.name
        ))
    });
    if let Some(why) = &verdict {
        tracing::debug!(port = %port.name, "beyond this namespace: {why}");
    }
    verdict
}

async fn look_into(handle: &Handle, port: &LinkSnapshot, nsid: i32, lower: u32) -> Option<String> {
    let name = &port.name;
    let far = match netlink::link_in(handle, Some(nsid), lower).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Some(format!(
                "{name} leads to device {lower} in namespace {nsid}, which is gone"
            ));
        }
        Err(e) => {
            return Some(format!(
                "cannot see where {name} leads (device {lower} in namespace {nsid}): {}",
                crate::error_chain(&e)
            ));
        }
    };
    if let LinkKind::Stacked(kind) = &port.kind {
        return kind_hazard(&far).map(|h| {
            format!(
                "{name} is a {kind} on {} in namespace {nsid}: {h}",
                far.name
            )
        });
    }
    let Some(master) = far.master else {
        return None; // An endpoint: a container's or a VM namespace's own interface.
    };
    let m = match netlink::link_in(handle, Some(nsid), master).await {
        Ok(Some(m)) => m,
        Ok(None) => return None, // Its master went away meanwhile: an endpoint now.
        Err(e) => {
            return Some(format!(
                "cannot see {name}'s peer's master in namespace {nsid}: {}",
                crate::error_chain(&e)
            ));
        }
    };
    if m.kind != LinkKind::Bridge {
        return kind_hazard(&m).map(|h| {
            format!(
                "{name}'s peer {} (namespace {nsid}) is enslaved to {}: {h}",
                far.name, m.name
            )
        });
    }
    match netlink::ports_in(handle, nsid, master).await {
        Ok(ports) => bridge_hazard(ports.iter().filter(|p| p.ifindex != far.ifindex)).map(|h| {
            format!(
                "{name}'s peer {} (namespace {nsid}) is on {}, where {h}",
                far.name, m.name
            )
        }),
        Err(e) => Some(format!(
            "cannot list the ports of {} in namespace {nsid} behind {name}: {}",
            m.name,
            crate::error_chain(&e)
        )),
    }
}
