//! The frames loop protection sends and listens for: its own probe, and STP BPDUs.
//!
//! A probe is an Ethernet frame of the experimental ethertype 0x88b5 (IEEE 802 "local
//! experimental"), from a locally administered MAC of this agent's own, carrying a magic, this
//! agent's random nonce and where it was sent. Only a probe with our nonce counts: another
//! agent's (another host, another namespace) is ignored. Its destination is the bridge's own MAC:
//! a bridge delivers frames for its own address locally and never floods them, so a probe that
//! comes back through a loop stops at the bridge instead of circling, while the device that
//! closes the loop (a guest's bridge, a switch) floods it as unknown unicast.

use crate::sources::netlink::BridgeIdent;

/// IEEE 802 local experimental ethertype 1.
pub const ETHERTYPE: u16 = 0x88b5;
/// First payload word of our probes.
pub const MAGIC: u32 = u32::from_be_bytes(*b"BGlp");
/// The STP/RSTP BPDU destination (802.1D bridge group address).
pub const STP_GROUP: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x00];
/// Ethernet's minimum frame without FCS.
pub const PROBE_LEN: usize = 60;
/// How much of a frame the socket filter keeps: a BPDU and a probe both fit.
pub const SNAP_LEN: u32 = 128;

/// What a probe says about where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub nonce: u64,
    /// The bridge and port it was sent out of.
    pub bridge_ifindex: u32,
    pub port_ifindex: u32,
    pub seq: u32,
    /// CLOCK_MONOTONIC when it was sent.
    pub sent_ns: u64,
}

/// A received BPDU, as far as it matters here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bpdu {
    /// 0x00 configuration, 0x02 RST, 0x80 topology change notification.
    pub kind: u8,
    pub root: Option<BridgeIdent>,
    /// The bridge that sent it.
    pub bridge: Option<BridgeIdent>,
    /// The sending bridge's port id (priority and number).
    pub port_id: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    Probe(Probe),
    Bpdu(Bpdu),
}

/// The probe to send out of a port: `dst` is the bridge's MAC, `src` the agent's probe MAC.
pub fn probe(dst: [u8; 6], src: [u8; 6], p: &Probe) -> [u8; PROBE_LEN] {
    let mut f = [0u8; PROBE_LEN];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&MAGIC.to_be_bytes());
    f[18..26].copy_from_slice(&p.nonce.to_be_bytes());
    f[26..30].copy_from_slice(&p.bridge_ifindex.to_be_bytes());
    f[30..34].copy_from_slice(&p.port_ifindex.to_be_bytes());
    f[34..38].copy_from_slice(&p.seq.to_be_bytes());
    f[38..46].copy_from_slice(&p.sent_ns.to_be_bytes());
    f
}

fn be<const N: usize>(f: &[u8], at: usize) -> Option<[u8; N]> {
    f.get(at..at + N)?.try_into().ok()
}

fn bridge_ident(f: &[u8], at: usize) -> Option<BridgeIdent> {
    let raw: [u8; 8] = be(f, at)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&raw[2..]);
    Some(BridgeIdent {
        priority: u16::from_be_bytes([raw[0], raw[1]]),
        mac,
    })
}

/// Decodes a frame the socket filter let through; `None` for anything else.
pub fn parse(f: &[u8]) -> Option<Frame> {
    let ethertype = u16::from_be_bytes(be(f, 12)?);
    if ethertype == ETHERTYPE {
        if u32::from_be_bytes(be(f, 14)?) != MAGIC {
            return None;
        }
        return Some(Frame::Probe(Probe {
            nonce: u64::from_be_bytes(be(f, 18)?),
            bridge_ifindex: u32::from_be_bytes(be(f, 26)?),
            port_ifindex: u32::from_be_bytes(be(f, 30)?),
            seq: u32::from_be_bytes(be(f, 34)?),
            sent_ns: u64::from_be_bytes(be(f, 38)?),
        }));
    }
    if f.get(..6)? != STP_GROUP {
        return None;
    }
    // 802.3 length, then LLC DSAP/SSAP 0x42 (spanning tree), control 0x03, protocol id 0. What
    // follows is decoded where present; any frame to the group address counts as a BPDU.
    let stp_llc = f.get(14..17) == Some(&[0x42, 0x42, 0x03]);
    let kind = if stp_llc { f.get(20).copied() } else { None };
    let config = matches!(kind, Some(0x00 | 0x02));
    Some(Frame::Bpdu(Bpdu {
        kind: kind.unwrap_or(0xff),
        root: config.then(|| bridge_ident(f, 22)).flatten(),
        bridge: config.then(|| bridge_ident(f, 34)).flatten(),
        port_id: config
            .then(|| be::<2>(f, 42).map(u16::from_be_bytes))
            .flatten(),
    }))
}

/// The classic BPF program each port socket runs in the kernel: keep received (not outgoing)
/// frames that are our probes (ethertype and magic) or go to the STP group address; drop the
/// rest before it is queued, so ordinary traffic costs one filter run and no copy.
pub fn socket_filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k, jt, jf| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    #[expect(clippy::cast_sign_loss, reason = "SKF_AD_OFF is negative by design")]
    let pkttype = (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32;
    let group_hi = u32::from_be_bytes([STP_GROUP[0], STP_GROUP[1], STP_GROUP[2], STP_GROUP[3]]);
    let group_lo = u32::from(u16::from_be_bytes([STP_GROUP[4], STP_GROUP[5]]));
    vec![
        /* 0 */ stmt(LD_W_ABS, pkttype),
        /* 1 */ jump(u32::from(libc::PACKET_OUTGOING), 9, 0),
        /* 2 */ stmt(LD_H_ABS, 12),
        /* 3 */ jump(u32::from(ETHERTYPE), 0, 2),
        /* 4 */ stmt(LD_W_ABS, 14),
        /* 5 */ jump(MAGIC, 4, 5),
        /* 6 */ stmt(LD_W_ABS, 0),
        /* 7 */ jump(group_hi, 0, 3),
        /* 8 */ stmt(LD_H_ABS, 4),
        /* 9 */ jump(group_lo, 0, 1),
        /* 10 */ stmt(RET_K, SNAP_LEN),
        /* 11 */ stmt(RET_K, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_round_trips() {
        let p = Probe {
            nonce: 0x0102_0304_0506_0708,
            bridge_ifindex: 7,
            port_ifindex: 9,
            seq: 42,
            sent_ns: 123_456_789,
        };
        let f = probe([0x52, 0x54, 0, 1, 2, 3], [2, 1, 2, 3, 4, 5], &p);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(parse(&f), Some(Frame::Probe(p)));
        let mut other = f;
        other[14] ^= 1;
        assert_eq!(parse(&other), None, "a wrong magic is not ours");
        assert_eq!(parse(&f[..20]), None, "short frames are ignored");
    }

    #[test]
    fn decodes_a_configuration_bpdu() {
        // dst, src, length, LLC 42 42 03, protocol 0, version 0, type 0, flags, root id,
        // root path cost, bridge id, port id 0x8002, message age...
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&STP_GROUP);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 9, 9, 9]);
        f[12..14].copy_from_slice(&38u16.to_be_bytes());
        f[14..17].copy_from_slice(&[0x42, 0x42, 0x03]);
        f[22..30].copy_from_slice(&[0x80, 0x00, 0x52, 0x54, 0, 1, 1, 1]);
        f[34..42].copy_from_slice(&[0x80, 0x00, 0x52, 0x54, 0, 9, 9, 9]);
        f[42..44].copy_from_slice(&0x8002u16.to_be_bytes());
        let Some(Frame::Bpdu(b)) = parse(&f) else {
            panic!("not a BPDU: {:?}", parse(&f));
        };
        assert_eq!(b.kind, 0);
        assert_eq!(
            b.root.map(|r| r.to_string()).as_deref(),
            Some("8000.525400010101")
        );
        assert_eq!(
            b.bridge.map(|r| r.to_string()).as_deref(),
            Some("8000.525400090909")
        );
        assert_eq!(b.port_id, Some(0x8002));
        // A topology change notification carries no ids, and still counts.
        f[20] = 0x80;
        assert!(matches!(
            parse(&f),
            Some(Frame::Bpdu(Bpdu {
                kind: 0x80,
                bridge: None,
                ..
            }))
        ));
    }

    #[test]
    fn the_filter_jumps_stay_inside_the_program() {
        let prog = socket_filter();
        for (i, ins) in prog.iter().enumerate() {
            if ins.code == (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16 {
                let far = i + 1 + usize::from(ins.jt.max(ins.jf));
                assert!(far < prog.len(), "instruction {i} jumps out");
            }
        }
        assert_eq!(prog[10].k, SNAP_LEN);
        assert_eq!(prog[11].k, 0);
    }
}
