//! The actuator: the only writer. Applies planned repairs through rtnetlink and returns once
//! the kernel acknowledged each.

use netlink_packet_route::link::{
    BridgePortState, BridgeStpState, InfoBridge, InfoData, InfoKind, LinkAttribute, LinkInfo,
    LinkMessage,
};
use rtnetlink::{Handle, LinkBridgePort, LinkUnspec};

use std::time::Duration;

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

/// How long one repair may wait for the kernel's answer before it is abandoned.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("cannot {action}")]
    Kernel {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot {action}: no answer from the kernel within {after:?}")]
    Timeout { action: String, after: Duration },
}

impl ActuatorError {
    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => Some(-e.raw_code()),
            _ => None,
        }
    }

    pub fn timed_out(&self) -> bool {
        matches!(self, Self::Timeout { .. })
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
///
/// Bounded by [`REQUEST_TIMEOUT`]: an unanswered request is abandoned with
/// [`ActuatorError::Timeout`].
pub async fn apply(handle: &Handle, action: &Action) -> Result<Applied, ActuatorError> {
    tokio::time::timeout(REQUEST_TIMEOUT, apply_unbounded(handle, action))
        .await
        .unwrap_or_else(|_| {
            Err(ActuatorError::Timeout {
                action: action.to_string(),
                after: REQUEST_TIMEOUT,
            })
        })
}

async fn apply_unbounded(handle: &Handle, action: &Action) -> Result<Applied, ActuatorError> {
    let err = |source| ActuatorError::Kernel {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_nobody_answers_times_out() {
        // A real rtnetlink connection whose I/O task never runs: the request is queued and
        // never answered, as with a kernel that does not reply.
        let (_conn, handle, _notifications) = rtnetlink::new_connection().expect("netlink socket");
        let action = Action::BridgeUp {
            bridge: "br0".into(),
            bridge_ifindex: 1,
        };
        let started = std::time::Instant::now();
        let e = apply(&handle, &action).await.expect_err("no answer");
        assert!(e.timed_out(), "{e}");
        let waited = started.elapsed();
        assert!(waited >= REQUEST_TIMEOUT, "{waited:?}");
        assert!(waited < REQUEST_TIMEOUT * 3, "{waited:?}");
    }
}
