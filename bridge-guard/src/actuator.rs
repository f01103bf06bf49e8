//! The actuator: the only writer. Applies planned repairs through rtnetlink and returns once
//! the kernel acknowledged each.

use netlink_packet_route::link::{
    BridgePortState, BridgeStpState, InfoBridge, InfoData, InfoKind, LinkAttribute, LinkInfo,
    LinkMessage,
};
use rtnetlink::{Handle, LinkBridgePort, LinkUnspec};

use futures::TryStreamExt as _;

use crate::{
    planner::Action,
    sources::netlink::{LinkSnapshot, snapshot},
};

/// What applying a repair came to.
#[derive(Debug)]
pub enum Applied {
    /// The kernel acknowledged it.
    Done,
    /// Not applied: the kernel's current view, fetched just before, shows it would be wrong.
    Stale(LinkSnapshot),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot {action}")]
pub struct ActuatorError {
    pub action: String,
    #[source]
    pub source: rtnetlink::Error,
}

impl ActuatorError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match &self.source {
            rtnetlink::Error::NetlinkError(e) => Some(-e.raw_code()),
            _ => None,
        }
    }
}

fn stp_off(bridge_ifindex: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = bridge_ifindex;
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Bridge),
        LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::StpState(
            BridgeStpState::Disabled,
        )])),
    ]));
    msg
}

/// Applies one repair and waits for the kernel's acknowledgement.
///
/// A port seen without a master may be between two masters (`ip link set P master OTHER`
/// detaches, notifies, then attaches): enslaving from that view would steal it. So its master
/// is read back from the kernel right before, and a port that has one is left alone.
pub async fn apply(handle: &Handle, action: &Action) -> Result<Applied, ActuatorError> {
    let err = |source| ActuatorError {
        action: action.to_string(),
        source,
    };
    if let Action::Enslave { port_ifindex, .. } = action {
        let current = handle
            .link()
            .get()
            .match_index(*port_ifindex)
            .execute()
            .try_next()
            .await
            .map_err(err)?;
        if let Some(msg) = current {
            let snap = snapshot(&msg);
            if snap.master.is_some() {
                return Ok(Applied::Stale(snap));
            }
        }
    }
    let link = handle.link();
    let result = match action {
        Action::BridgeUp { bridge_ifindex, .. } => {
            link.set(LinkUnspec::new_with_index(*bridge_ifindex).up().build())
                .execute()
                .await
        }
        Action::StpOff { bridge_ifindex, .. } => {
            link.change(stp_off(*bridge_ifindex)).execute().await
        }
        Action::Enslave {
            bridge_ifindex,
            port_ifindex,
            ..
        } => {
            let r = link
                .set(
                    LinkUnspec::new_with_index(*port_ifindex)
                        .controller(*bridge_ifindex)
                        .build(),
                )
                .execute()
                .await;
            // EINVAL when no device has the bridge's ifindex any more: its owner deleted it
            // under the repair (libvirt's net-destroy). The kernel moved on, nothing failed.
            if matches!(&r, Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == libc::EINVAL)
                && get(handle, *bridge_ifindex).await.is_none()
            {
                if let Some(port) = get(handle, *port_ifindex).await {
                    return Ok(Applied::Stale(snapshot(&port)));
                }
            }
            r
        }
        Action::Forward { port_ifindex, .. } => {
            link.set_port(
                LinkBridgePort::new(*port_ifindex)
                    .state(BridgePortState::Forwarding)
                    .build(),
            )
            .execute()
            .await
        }
    };
    result.map(|()| Applied::Done).map_err(err)
}

/// The link with `ifindex` as the kernel has it now; `None` when there is none (or the lookup
/// failed, which the caller treats the same: it only decides how to report a failure).
async fn get(handle: &Handle, ifindex: u32) -> Option<LinkMessage> {
    handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
}
