//! Link notifications that say nothing new, told apart before they are parsed.
//!
//! The kernel sends a link's full state on every request that touches it, changed or not: a
//! tool re-applying a setting flat out (a fighter re-enabling STP tens of thousands of times a
//! second) floods the agent with copies of one message. Parsing each costs microseconds; a
//! fingerprint of the raw message, less what changes without meaning anything (counters,
//! timers), tells a copy in a fraction of that. A message whose fingerprint is the link's last
//! one is skipped: it would leave the model as it is.
//!
//! Only what is known to be noise is left out of the fingerprint, so an attribute it does not
//! know can only make a copy look new (parsed, as before), never a change look like a copy.

use std::{collections::HashMap, hash::BuildHasher as _, hash::Hasher as _};

use foldhash::fast::FixedState;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const AF_UNSPEC: u8 = 0;
const AF_BRIDGE: u8 = 7;
/// `NLA_TYPE_MASK`: the attribute type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

// Top-level link attributes (`linux/if_link.h`).
const IFLA_STATS: u16 = 7;
const IFLA_PROTINFO: u16 = 12;
const IFLA_LINKINFO: u16 = 18;
const IFLA_STATS64: u16 = 23;
const IFLA_AF_SPEC: u16 = 26;
// Inside IFLA_LINKINFO.
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_INFO_SLAVE_KIND: u16 = 4;
const IFLA_INFO_SLAVE_DATA: u16 = 5;
/// A bridge's running timers (`IFLA_BR_HELLO_TIMER` … `IFLA_BR_GC_TIMER`).
const BRIDGE_TIMERS: std::ops::RangeInclusive<u16> = 16..=19;
/// A bridge port's running timers (`IFLA_BRPORT_MESSAGE_AGE_TIMER` … `HOLD_TIMER`).
const PORT_TIMERS: std::ops::RangeInclusive<u16> = 21..=23;

/// The last fingerprint of each link's notifications, per message type and family.
#[derive(Debug, Default)]
pub struct Unchanged {
    last: HashMap<(u16, u8, i32), u64, FixedState>,
    /// Copies skipped so far.
    pub skipped: u64,
    /// Copies skipped per link since the last [`Unchanged::count_afresh`].
    by_link: HashMap<i32, u64, FixedState>,
}

impl Unchanged {
    /// Whether `msg` (one whole netlink message) only repeats the last one about its link.
    /// Notes it as the last otherwise; a deletion forgets the link.
    pub fn repeats(&mut self, msg: &[u8]) -> bool {
        let Some((kind, family, index)) = header(msg) else {
            return false;
        };
        if kind == RTM_DELLINK {
            self.last.retain(|(_, _, i), _| *i != index);
            return false;
        }
        if kind != RTM_NEWLINK {
            return false;
        }
        let print = fingerprint(msg, family);
        if self.last.insert((kind, family, index), print) == Some(print) {
            self.skipped += 1;
            *self.by_link.entry(index).or_default() += 1;
            return true;
        }
        false
    }

    /// Links with at least `least` copies skipped since the last [`Unchanged::count_afresh`],
    /// with their count.
    pub fn copied_links(&self, least: u64) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.by_link
            .iter()
            .filter(move |(_, n)| **n >= least)
            .filter_map(|(i, n)| Some((u32::try_from(*i).ok()?, *n)))
    }

    /// Starts the per-link copy counts again.
    pub fn count_afresh(&mut self) {
        self.by_link.clear();
    }

    /// Forgets what link `ifindex` said last: its next message is news whatever it says (its
    /// messages were not all seen).
    pub fn forget_link(&mut self, ifindex: u32) {
        let Ok(index) = i32::try_from(ifindex) else {
            return;
        };
        self.last.retain(|(_, _, i), _| *i != index);
    }

    /// Forgets every fingerprint: after lost notifications (or a dump), the last one seen may
    /// no longer be the kernel's state, and a message like it is news again.
    pub fn forget(&mut self) {
        self.last.clear();
        self.last.shrink_to(64);
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// `(nlmsg_type, ifi_family, ifi_index)` of a link message.
fn header(msg: &[u8]) -> Option<(u16, u8, i32)> {
    let kind = u16::from_ne_bytes(msg.get(4..6)?.try_into().ok()?);
    let family = *msg.get(NLMSG_HDRLEN)?;
    let index = i32::from_ne_bytes(
        msg.get(NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8)?
            .try_into()
            .ok()?,
    );
    Some((kind, family, index))
}

fn fingerprint(msg: &[u8], family: u8) -> u64 {
    let mut h = FixedState::with_seed(0x6272_6964_6765).build_hasher();
    // ifinfomsg less `ifi_change` (which bits this message is about, not the state).
    h.write(msg.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 12).unwrap_or_default());
    let attrs = msg.get(NLMSG_HDRLEN + IFINFOMSG_LEN..).unwrap_or_default();
    for (kind, nla) in nlas(attrs) {
        match kind {
            IFLA_STATS | IFLA_STATS64 => {}
            // AF_UNSPEC's per-protocol part: IPv6 counters and cache timestamps.
            IFLA_AF_SPEC if family == AF_UNSPEC => {}
            IFLA_LINKINFO => link_info(&mut h, nla),
            IFLA_PROTINFO if family == AF_BRIDGE => without(&mut h, nla, &PORT_TIMERS),
            _ => h.write(nla),
        }
    }
    h.finish()
}

/// IFLA_LINKINFO, less a bridge's or a bridge port's timers.
fn link_info(h: &mut impl std::hash::Hasher, nest: &[u8]) {
    let (mut kind, mut port_kind) = (&[][..], &[][..]);
    for (t, nla) in nlas(payload(nest)) {
        match t {
            IFLA_INFO_KIND => kind = payload(nla),
            IFLA_INFO_SLAVE_KIND => port_kind = payload(nla),
            IFLA_INFO_DATA if kind.starts_with(b"bridge\0") => {
                without(h, nla, &BRIDGE_TIMERS);
                continue;
            }
            IFLA_INFO_SLAVE_DATA if port_kind.starts_with(b"bridge\0") => {
                without(h, nla, &PORT_TIMERS);
                continue;
            }
            _ => {}
        }
        h.write(nla);
    }
}

/// A nest's attributes into `h`, less those whose type is in `skip`.
fn without(h: &mut impl std::hash::Hasher, nest: &[u8], skip: &std::ops::RangeInclusive<u16>) {
    h.write(nest.get(..4).unwrap_or_default());
    for (t, nla) in nlas(payload(nest)) {
        if !skip.contains(&t) {
            h.write(nla);
        }
    }
}

/// An attribute's value (past its 4-byte header).
fn payload(nla: &[u8]) -> &[u8] {
    nla.get(4..).unwrap_or_default()
}

/// `(type, whole attribute)` of each attribute in `buf`; stops at the first malformed one.
fn nlas(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(buf.get(..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(buf.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        let nla = buf.get(..len).filter(|_| len >= 4)?;
        buf = buf.get((len + 3) & !3..).unwrap_or_default();
        Some((kind, nla))
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + value.len()).expect("a short attribute");
        let mut out = [len.to_ne_bytes(), kind.to_ne_bytes()].concat();
        out.extend_from_slice(value);
        out.resize((out.len() + 3) & !3, 0);
        out
    }

    /// An RTM_NEWLINK of bridge `index` with STP `stp`, its hello timer at `timer` and its
    /// counters at `packets`.
    pub(in crate::sources) fn bridge(
        index: i32,
        stp: u32,
        timer: u64,
        packets: u64,
        change: u32,
    ) -> Vec<u8> {
        let data = [
            nla(2, &stp.to_ne_bytes()),    // IFLA_BR_STP_STATE
            nla(16, &timer.to_ne_bytes()), // IFLA_BR_HELLO_TIMER
        ]
        .concat();
        let info = [
            nla(IFLA_INFO_KIND, b"bridge\0"),
            nla(0x8000 | IFLA_INFO_DATA, &data),
        ]
        .concat();
        let attrs = [
            nla(3, b"br0\0"), // IFLA_IFNAME
            nla(IFLA_STATS64, &packets.to_ne_bytes()),
            nla(0x8000 | IFLA_LINKINFO, &info),
        ]
        .concat();
        let mut ifi = vec![AF_UNSPEC, 0, 1, 0];
        ifi.extend_from_slice(&index.to_ne_bytes());
        ifi.extend_from_slice(&0x1043u32.to_ne_bytes());
        ifi.extend_from_slice(&change.to_ne_bytes());
        let len = u32::try_from(NLMSG_HDRLEN + ifi.len() + attrs.len()).expect("a short message");
        let mut msg = len.to_ne_bytes().to_vec();
        msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend(ifi);
        msg.extend(attrs);
        msg
    }

    #[test]
    fn copies_are_told_apart_from_changes() {
        let mut u = Unchanged::default();
        assert!(!u.repeats(&bridge(7, 1, 0, 0, 0)), "first word of a link");
        // Counters, timers and the change mask moved: the same state.
        assert!(u.repeats(&bridge(7, 1, 250, 99, u32::MAX)));
        assert!(
            !u.repeats(&bridge(7, 0, 250, 99, 0)),
            "STP turned off is news"
        );
        assert!(!u.repeats(&bridge(8, 0, 250, 99, 0)), "another link");
        assert!(u.repeats(&bridge(7, 0, 0, 0, 0)));
        assert_eq!(u.skipped, 2);
        assert_eq!(
            u.copied_links(2).collect::<Vec<_>>(),
            [(7, 2)],
            "both copies were of 7"
        );
        assert_eq!(u.copied_links(3).count(), 0);
        u.count_afresh();
        assert_eq!(u.copied_links(1).count(), 0);
        u.forget_link(8);
        assert!(!u.repeats(&bridge(8, 0, 250, 99, 0)), "8 forgotten: news");
        assert!(u.repeats(&bridge(7, 0, 0, 0, 0)), "7 still remembered");
        // Deleted: a link of that index later is new.
        let mut del = bridge(7, 0, 0, 0, 0);
        del[4..6].copy_from_slice(&RTM_DELLINK.to_ne_bytes());
        assert!(!u.repeats(&del));
        assert!(!u.repeats(&bridge(7, 0, 0, 0, 0)));
        // After a loss, nothing is a copy.
        u.forget();
        assert!(!u.repeats(&bridge(7, 0, 0, 0, 0)));
        assert_eq!(u.len(), 1);
        assert_eq!(u.skipped, 3);
    }

    #[test]
    fn a_malformed_message_is_never_a_copy() {
        let mut u = Unchanged::default();
        assert!(!u.repeats(&[0; 8]));
        assert!(!u.repeats(&[0; 8]));
        let mut short = bridge(7, 1, 0, 0, 0);
        short.truncate(40);
        assert!(!u.repeats(&short));
    }
}
