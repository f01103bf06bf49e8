//! Bridge events from netlink alone, for `watch` where eBPF is unavailable: port states,
//! joins, leaves and STP changes, told apart by comparing each notification with the link as
//! it was. No kernel timestamps and no actors: netlink carries neither.

use std::{collections::BTreeMap, fmt};

use serde::Serialize;

use super::netlink::{LinkKind, LinkSnapshot, NetlinkEvent};
use crate::event::Change;

/// One bridge event, as netlink told it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LinkChange {
    pub bridge: String,
    /// Empty for bridge-wide events (STP).
    pub port: String,
    #[serde(flatten)]
    pub change: Change,
}

impl fmt::Display for LinkChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.change.describe(f, &self.bridge, &self.port)?;
        f.write_str(" (netlink)")
    }
}

/// The links as last seen, to tell what each notification changed.
#[derive(Debug, Default)]
pub struct LinkWatch {
    links: BTreeMap<u32, LinkSnapshot>,
}

impl LinkWatch {
    /// Starts from a dump of every link.
    pub fn new(dump: Vec<LinkSnapshot>) -> Self {
        Self {
            links: dump.into_iter().map(|l| (l.ifindex, l)).collect(),
        }
    }

    fn bridge_name(&self, ifindex: Option<u32>) -> Option<String> {
        self.links
            .get(&ifindex?)
            .filter(|l| l.kind == LinkKind::Bridge)
            .map(|l| l.name.clone())
    }

    /// What `ev` changed on bridges.
    pub fn apply(&mut self, ev: NetlinkEvent) -> Vec<LinkChange> {
        let mut out = Vec::new();
        match ev {
            NetlinkEvent::Link(new) => {
                let old = self.links.get(&new.ifindex).cloned();
                let was = old.as_ref().and_then(|o| self.bridge_name(o.master));
                let is = self.bridge_name(new.master);
                let change = |bridge: &str, change| LinkChange {
                    bridge: bridge.to_owned(),
                    port: new.name.clone(),
                    change,
                };
                if was != is {
                    out.extend(was.as_deref().map(|b| change(b, Change::Leave)));
                    out.extend(is.as_deref().map(|b| change(b, Change::Join)));
                }
                let old_state = old
                    .as_ref()
                    .and_then(|o| o.port_state)
                    .filter(|_| was == is);
                if let (Some(b), Some(state)) = (&is, new.port_state) {
                    if old_state != Some(state) {
                        out.push(change(
                            b,
                            Change::PortState {
                                old: old_state,
                                new: Some(state),
                            },
                        ));
                    }
                }
                let old_stp = old.as_ref().and_then(|o| o.stp);
                if new.kind == LinkKind::Bridge && new.stp.is_some() && old_stp != new.stp {
                    out.push(LinkChange {
                        bridge: new.name.clone(),
                        port: String::new(),
                        change: Change::Stp {
                            old: old_stp,
                            new: new.stp,
                        },
                    });
                }
                self.links.insert(new.ifindex, new);
            }
            NetlinkEvent::PortState {
                ifindex,
                master,
                state,
            } => {
                let bridge = self.bridge_name(
                    master.or_else(|| self.links.get(&ifindex).and_then(|l| l.master)),
                );
                if let (Some(bridge), Some(link)) = (bridge, self.links.get_mut(&ifindex)) {
                    if link.port_state != Some(state) {
                        out.push(LinkChange {
                            bridge,
                            port: link.name.clone(),
                            change: Change::PortState {
                                old: link.port_state,
                                new: Some(state),
                            },
                        });
                        link.port_state = Some(state);
                    }
                }
            }
            NetlinkEvent::Removed { ifindex, name } => {
                if let Some(old) = self.links.remove(&ifindex) {
                    if let Some(bridge) = self.bridge_name(old.master) {
                        out.push(LinkChange {
                            bridge,
                            port: name,
                            change: Change::Leave,
                        });
                    }
                }
            }
            NetlinkEvent::Overrun => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{PortState, StpMode};

    fn link(ifindex: u32, name: &str, kind: LinkKind, master: Option<u32>) -> LinkSnapshot {
        LinkSnapshot {
            ifindex,
            name: name.into(),
            kind,
            master,
            admin_up: true,
            carrier: true,
            oper_up: true,
            lower: None,
            switchdev: false,
            port_state: None,
            stp: None,
        }
    }

    #[test]
    fn tells_joins_states_leaves_and_stp_apart() {
        let mut br = link(7, "br0", LinkKind::Bridge, None);
        br.stp = Some(StpMode::Kernel);
        let mut w = LinkWatch::new(vec![br.clone(), link(9, "vnet0", LinkKind::Veth, None)]);
        let mut port = link(9, "vnet0", LinkKind::Veth, Some(7));
        port.port_state = Some(PortState::Listening);
        let got = w.apply(NetlinkEvent::Link(port.clone()));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].change, Change::Join);
        assert_eq!(got[1].to_string(), "br0 vnet0 ? -> listening (netlink)");
        // The same state again (AF_BRIDGE after AF_UNSPEC) is no news.
        assert!(
            w.apply(NetlinkEvent::PortState {
                ifindex: 9,
                master: Some(7),
                state: PortState::Listening
            })
            .is_empty()
        );
        let got = w.apply(NetlinkEvent::PortState {
            ifindex: 9,
            master: None,
            state: PortState::Forwarding,
        });
        assert_eq!(
            got[0].to_string(),
            "br0 vnet0 listening -> forwarding (netlink)"
        );
        br.stp = Some(StpMode::Off);
        assert_eq!(
            w.apply(NetlinkEvent::Link(br))[0].to_string(),
            "br0 stp kernel -> off (netlink)"
        );
        let got = w.apply(NetlinkEvent::Removed {
            ifindex: 9,
            name: "vnet0".into(),
        });
        assert_eq!(got[0].to_string(), "br0 vnet0 left (netlink)");
    }
}
