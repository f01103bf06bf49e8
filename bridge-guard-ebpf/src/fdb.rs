//! Loop detection in the kernel: the bridge's `br_fdb_update` tracepoint fires when a MAC
//! address is learned on a port or moves to another one. In a layer-2 loop every flooded frame
//! comes back on the loop's ports, so its source address moves again and again within
//! microseconds. This program counts moves per (bridge, VLAN, MAC) in an LRU map and reports an
//! address that flaps ([`fdb::FLAP_MOVES`] moves within [`fdb::FLAP_WINDOW_NS`]), at most once
//! per [`fdb::REPORT_EVERY_NS`] per address, and counts afresh after each report, so a storm
//! costs a few reports, not one per frame.
//!
//! Two entry points over one function: tp_btf where the kernel has BTF for the tracepoint,
//! raw_tracepoint otherwise. Both get the tracepoint's arguments: `(struct net_bridge *br,
//! struct net_bridge_port *source, const unsigned char *addr, u16 vid, ...)`.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use bridge_guard_common::{FdbFlap, fdb};

use crate::programs::{offsets, read, watched};

#[map]
static FDB_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// `fdb::counter::*`, per CPU.
#[map]
static FDB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fdb::counter::LEN, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Key {
    netns: u32,
    bridge_ifindex: u32,
    vid: u16,
    mac: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Seen {
    window_start: u64,
    reported: u64,
    port_ifindex: u32,
    moves: u32,
}

/// Where each address was last learned, and how often it moved lately.
#[map]
static FDB_SEEN: LruHashMap<Key, Seen> = LruHashMap::with_max_entries(fdb::TRACKED, 0);

#[inline(always)]
fn count(which: u32) {
    if let Some(c) = FDB_COUNTERS.get_ptr_mut(which) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn on_fdb_update(br: u64, source: u64, addr: u64, vid: u16) {
    // Entries for the bridge itself have no source port: nothing can flap there.
    if source == 0 {
        return;
    }
    let o = offsets();
    let br_dev = read::<u64>(br, o.br_dev).unwrap_or(0);
    let port_dev = read::<u64>(source, o.port_dev).unwrap_or(0);
    let net = read::<u64>(br_dev, o.dev_net).unwrap_or(0);
    let (Some(netns), Some(bridge_ifindex), Some(port_ifindex)) = (
        read::<u32>(net, o.net_inum),
        read::<u32>(br_dev, o.dev_ifindex),
        read::<u32>(port_dev, o.dev_ifindex),
    ) else {
        count(fdb::counter::READ_FAILED);
        return;
    };
    if !watched(netns) {
        return;
    }
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    let Ok(mac) = (unsafe { bpf_probe_read_kernel(addr as *const [u8; 6]) }) else {
        count(fdb::counter::READ_FAILED);
        return;
    };
    let key = Key {
        netns,
        bridge_ifindex,
        vid,
        mac,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(seen) = FDB_SEEN.get_ptr_mut(&key) else {
        let first = Seen {
            window_start: now,
            reported: 0,
            port_ifindex,
            moves: 0,
        };
        let _ = FDB_SEEN.insert(&key, &first, 0);
        return;
    };
    // SAFETY: a valid map value pointer; concurrent updates from other CPUs only make the count
    // approximate, which the threshold tolerates.
    let seen = unsafe { &mut *seen };
    let prev = seen.port_ifindex;
    if prev == port_ifindex {
        return; // Not a move: the entry changed otherwise (flags).
    }
    seen.port_ifindex = port_ifindex;
    if now.wrapping_sub(seen.window_start) > fdb::FLAP_WINDOW_NS {
        seen.window_start = now;
        seen.moves = 1;
    } else {
        seen.moves += 1;
    }
    if seen.moves < fdb::FLAP_MOVES || now.wrapping_sub(seen.reported) < fdb::REPORT_EVERY_NS {
        return;
    }
    seen.reported = now;
    let moves = seen.moves;
    // Counted afresh: frames still in flight when the loop is cut move an address once or
    // twice more, which must not read as a second loop.
    seen.window_start = now;
    seen.moves = 0;
    let flap = FdbFlap {
        ktime_ns: now,
        netns,
        bridge_ifindex,
        port_ifindex,
        prev_ifindex: prev,
        moves,
        vid,
        mac,
        _reserved: [0; 4],
    };
    if FDB_EVENTS.output::<FdbFlap>(&flap, 0).is_err() {
        count(fdb::counter::LOST);
    }
}

#[btf_tracepoint(function = "br_fdb_update")]
pub fn fdb_update_btf(ctx: BtfTracePointContext) -> u32 {
    on_fdb_update(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<u64>(2),
        ctx.arg::<u64>(3) as u16,
    );
    0
}

#[raw_tracepoint(tracepoint = "br_fdb_update")]
pub fn fdb_update_raw(ctx: RawTracePointContext) -> i32 {
    on_fdb_update(
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<u64>(2),
        ctx.arg::<u64>(3) as u16,
    );
    0
}
