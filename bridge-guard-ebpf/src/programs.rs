//! The programs. Each hook has a thin entry point per tier (fentry/fexit, kprobe/kretprobe,
//! tracepoint) over shared `on_*` functions, so every tier reports the same event.
//!
//! Kernel struct fields are read with `bpf_probe_read_kernel` at offsets the agent resolved
//! from BTF (`OFFSETS`); an `ABSENT` offset makes the read fail and the field stay unknown.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use bridge_guard_common::{
    ABSENT, Event, IFF_EBRIDGE, Offsets, flags, hook, kind, settings, state,
};

/// Field offsets, set by the agent at load time.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::ABSENT;
/// Address of `br_forward_delay_timer_expired`, from kallsyms; zero when unknown.
#[unsafe(no_mangle)]
static FD_TIMER_FN: u64 = 0;
/// Network-namespace inode to report; zero reports every namespace.
#[unsafe(no_mangle)]
static NETNS_FILTER: u32 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Events that did not fit in `EVENTS`, per CPU.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Runtime switches written by the agent (`settings::*`).
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(settings::LEN, 0);

/// Entry-probe state for the matching exit probe, keyed by (pid_tgid, which function).
#[map]
static PENDING: HashMap<[u64; 2], [u64; 2]> = HashMap::with_max_entries(1024, 0);

/// The forward-delay timer running on this CPU (zero outside one) and the port state it found,
/// so that state changes made from the timer are attributed to it, not to whichever task the
/// softirq interrupted.
#[map]
static IN_TIMER: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Last port state the timer tier reported, keyed by port address.
#[map]
static PORT_LAST: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

const FN_SET_STATE: u64 = 1;
const FN_LINK: u64 = 2;
const FN_STP: u64 = 3;

#[inline(always)]
pub(crate) fn offsets() -> Offsets {
    // SAFETY: a plain read of a global the loader rewrote; volatile so the compiler does not
    // fold in the compile-time default.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub(crate) fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T).ok() }
}

#[inline(always)]
fn read_name(dev: u64, off: u32, dst: &mut [u8; 16]) {
    if dev == 0 || off == ABSENT {
        return;
    }
    // SAFETY: as in `read`.
    let _ = unsafe { bpf_probe_read_kernel_buf((dev + u64::from(off)) as *const u8, dst) };
}

/// Fills ifindex, name and netns of `dev` into the port (or, with `bridge`, bridge) fields.
#[inline(always)]
fn fill_dev(ev: &mut Event, o: &Offsets, dev: u64, bridge: bool) {
    let ifindex = read::<u32>(dev, o.dev_ifindex).unwrap_or(0);
    if bridge {
        ev.bridge_ifindex = ifindex;
        read_name(dev, o.dev_name, &mut ev.bridge_name);
    } else {
        ev.port_ifindex = ifindex;
        read_name(dev, o.dev_name, &mut ev.port_name);
    }
    if ev.netns == 0 {
        let net = read::<u64>(dev, o.dev_net).unwrap_or(0);
        ev.netns = read::<u32>(net, o.net_inum).unwrap_or(0);
    }
}

#[inline(always)]
fn timer_context() -> bool {
    IN_TIMER.get(0).is_some_and(|t| t[0] != 0)
}

/// Whether events from network namespace `netns` are reported.
#[inline(always)]
pub(crate) fn watched(netns: u32) -> bool {
    // SAFETY: plain read of a loader-set global, as in `offsets`.
    let filter = unsafe { core::ptr::read_volatile(&NETNS_FILTER) };
    filter == 0 || netns == filter
}

/// Stamps and sends `ev`, unless it belongs to a network namespace the agent does not watch.
#[inline(always)]
fn emit(ev: &mut Event, from_timer: bool) {
    if !watched(ev.netns) {
        return;
    }
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    if from_timer {
        ev.flags |= flags::FROM_TIMER;
    } else {
        ev.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        ev.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    if EVENTS.output::<Event>(&*ev, 0).is_err()
        && let Some(lost) = LOST.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *lost += 1 };
    }
}

#[inline(always)]
fn port_event(port: u64, old: u8, new: u8, hook_id: u8, from_timer: bool) {
    let o = offsets();
    let mut ev = Event::zeroed();
    ev.kind = kind::PORT_STATE;
    ev.hook = hook_id;
    ev.old_state = old;
    ev.new_state = new;
    let dev = read::<u64>(port, o.port_dev).unwrap_or(0);
    fill_dev(&mut ev, &o, dev, false);
    let br = read::<u64>(port, o.port_br).unwrap_or(0);
    let br_dev = read::<u64>(br, o.br_dev).unwrap_or(0);
    fill_dev(&mut ev, &o, br_dev, true);
    emit(&mut ev, from_timer);
}

#[inline(always)]
fn port_state(port: u64) -> u8 {
    read::<u8>(port, offsets().port_state).unwrap_or(state::UNKNOWN)
}

#[inline(always)]
fn pending_key(func: u64) -> [u64; 2] {
    [bpf_get_current_pid_tgid(), func]
}

#[inline(always)]
fn stash(func: u64, a: u64, b: u64) {
    let _ = PENDING.insert(pending_key(func), [a, b], 0);
}

#[inline(always)]
fn unstash(func: u64) -> Option<[u64; 2]> {
    let key = pending_key(func);
    // SAFETY: the value is copied out before the entry is removed.
    let value = unsafe { PENDING.get(key) }.copied();
    let _ = PENDING.remove(key);
    value
}

// ---- br_set_state(struct net_bridge_port *p, unsigned int state) ----

#[inline(always)]
fn on_set_state_entry(port: u64) {
    stash(FN_SET_STATE, port, u64::from(port_state(port)));
}

/// Reports the state in effect after the call: MRP-aware ports may ignore the request.
#[inline(always)]
fn on_set_state_exit(hook_id: u8) {
    let Some([port, old]) = unstash(FN_SET_STATE) else {
        return;
    };
    let new = port_state(port);
    if u64::from(new) != old {
        port_event(port, old as u8, new, hook_id, timer_context());
    }
}

#[fentry(function = "br_set_state")]
pub fn set_state_fentry(ctx: FEntryContext) -> u32 {
    on_set_state_entry(ctx.arg::<u64>(0));
    0
}

#[fexit(function = "br_set_state")]
pub fn set_state_fexit(_ctx: FExitContext) -> u32 {
    on_set_state_exit(hook::FEXIT);
    0
}

#[kprobe]
pub fn set_state_kprobe(ctx: ProbeContext) -> u32 {
    on_set_state_entry(ctx.arg::<u64>(0).unwrap_or(0));
    0
}

#[kretprobe]
pub fn set_state_kretprobe(_ctx: RetProbeContext) -> u32 {
    on_set_state_exit(hook::KRETPROBE);
    0
}

// ---- membership: netdev_master_upper_dev_link(dev, upper_dev, ...), netdev_upper_dev_unlink(dev, upper_dev) ----

#[inline(always)]
fn is_bridge(dev: u64) -> bool {
    read::<u32>(dev, offsets().dev_priv_flags).is_some_and(|f| f & IFF_EBRIDGE != 0)
}

#[inline(always)]
fn membership_event(dev: u64, upper: u64, kind_id: u8, hook_id: u8) {
    if !is_bridge(upper) {
        return;
    }
    let o = offsets();
    let mut ev = Event::zeroed();
    ev.kind = kind_id;
    ev.hook = hook_id;
    fill_dev(&mut ev, &o, dev, false);
    fill_dev(&mut ev, &o, upper, true);
    emit(&mut ev, false);
}

#[fexit(function = "netdev_master_upper_dev_link")]
pub fn link_fexit(ctx: FExitContext) -> u32 {
    // Arguments 0..5, then the return value.
    if ctx.arg::<i64>(5) as i32 == 0 {
        membership_event(ctx.arg(0), ctx.arg(1), kind::JOIN, hook::FEXIT);
    }
    0
}

#[kprobe]
pub fn link_kprobe(ctx: ProbeContext) -> u32 {
    stash(
        FN_LINK,
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
    );
    0
}

#[kretprobe]
pub fn link_kretprobe(ctx: RetProbeContext) -> u32 {
    if let Some([dev, upper]) = unstash(FN_LINK)
        && ctx.ret::<i64>() as i32 == 0
    {
        membership_event(dev, upper, kind::JOIN, hook::KRETPROBE);
    }
    0
}

#[fentry(function = "netdev_upper_dev_unlink")]
pub fn unlink_fentry(ctx: FEntryContext) -> u32 {
    membership_event(ctx.arg(0), ctx.arg(1), kind::LEAVE, hook::FENTRY);
    0
}

#[kprobe]
pub fn unlink_kprobe(ctx: ProbeContext) -> u32 {
    membership_event(
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
        kind::LEAVE,
        hook::KPROBE,
    );
    0
}

// ---- br_stp_set_enabled(struct net_bridge *br, unsigned long val, extack) ----

#[inline(always)]
fn stp_mode(br: u64) -> u64 {
    read::<u32>(br, offsets().br_stp_enabled).map_or(u64::from(state::UNKNOWN), u64::from)
}

#[inline(always)]
fn on_stp_exit(hook_id: u8) {
    let Some([br, old]) = unstash(FN_STP) else {
        return;
    };
    let new = stp_mode(br);
    if new == old {
        return;
    }
    let o = offsets();
    let mut ev = Event::zeroed();
    ev.kind = kind::STP;
    ev.hook = hook_id;
    ev.old_state = old as u8;
    ev.new_state = new as u8;
    let br_dev = read::<u64>(br, o.br_dev).unwrap_or(0);
    fill_dev(&mut ev, &o, br_dev, true);
    emit(&mut ev, false);
}

#[fentry(function = "br_stp_set_enabled")]
pub fn stp_fentry(ctx: FEntryContext) -> u32 {
    let br = ctx.arg::<u64>(0);
    stash(FN_STP, br, stp_mode(br));
    0
}

#[fexit(function = "br_stp_set_enabled")]
pub fn stp_fexit(_ctx: FExitContext) -> u32 {
    on_stp_exit(hook::FEXIT);
    0
}

#[kprobe]
pub fn stp_kprobe(ctx: ProbeContext) -> u32 {
    let br = ctx.arg::<u64>(0).unwrap_or(0);
    stash(FN_STP, br, stp_mode(br));
    0
}

#[kretprobe]
pub fn stp_kretprobe(_ctx: RetProbeContext) -> u32 {
    on_stp_exit(hook::KRETPROBE);
    0
}

// ---- tracepoint tier: the STP forward-delay timer of each port ----
//
// A port enters listening only from blocking (br_make_forwarding), and the timer is armed right
// after; each expiry moves listening -> learning -> forwarding; a cancel while pending means the
// port was blocked or disabled. So these four tracepoints see every timer-driven transition.

/// The port owning `timer` if it is a forward-delay timer, else `None`.
#[inline(always)]
fn fd_timer_port(timer: u64) -> Option<u64> {
    // SAFETY: plain read of a loader-set global, as in `offsets`.
    let target = unsafe { core::ptr::read_volatile(&FD_TIMER_FN) };
    let o = offsets();
    if target == 0 || o.port_fd_timer == ABSENT || timer < u64::from(o.port_fd_timer) {
        return None;
    }
    let function = read::<u64>(timer, o.timer_function)?;
    (function == target).then(|| timer - u64::from(o.port_fd_timer))
}

#[inline(always)]
fn timer_tier() -> bool {
    SETTINGS.get(settings::TIMER_TIER).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn timer_report(port: u64, old: u8, new: u8, hook_id: u8, from_timer: bool) {
    let _ = PORT_LAST.insert(port, new, 0);
    if timer_tier() {
        port_event(port, old, new, hook_id, from_timer);
    }
}

#[btf_tracepoint(function = "timer_start")]
pub fn timer_start(ctx: BtfTracePointContext) -> u32 {
    let timer = ctx.arg::<u64>(0);
    let Some(port) = fd_timer_port(timer) else {
        return 0;
    };
    // Re-armed by its own expiry (listening -> learning): timer_expire_exit reports that.
    if IN_TIMER.get(0).is_some_and(|t| t[0] == timer) {
        return 0;
    }
    let new = port_state(port);
    let old = match new {
        state::LISTENING => state::BLOCKING,
        state::LEARNING => state::LISTENING,
        _ => state::UNKNOWN,
    };
    timer_report(port, old, new, hook::TIMER_START, false);
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: BtfTracePointContext) -> u32 {
    let timer = ctx.arg::<u64>(0);
    if let Some(port) = fd_timer_port(timer) {
        let _ = IN_TIMER.set(0, [timer, u64::from(port_state(port))], 0);
    }
    0
}

#[btf_tracepoint(function = "timer_expire_exit")]
pub fn timer_expire_exit(ctx: BtfTracePointContext) -> u32 {
    let timer = ctx.arg::<u64>(0);
    let Some([running, old]) = IN_TIMER.get(0).copied() else {
        return 0;
    };
    if running == 0 || running != timer {
        return 0;
    }
    let _ = IN_TIMER.set(0, [0, 0], 0);
    if let Some(port) = fd_timer_port(timer) {
        let new = port_state(port);
        if u64::from(new) != old {
            timer_report(port, old as u8, new, hook::TIMER_EXPIRE, true);
        }
    }
    0
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel(ctx: BtfTracePointContext) -> u32 {
    let Some(port) = fd_timer_port(ctx.arg::<u64>(0)) else {
        return 0;
    };
    let new = port_state(port);
    // SAFETY: the value is copied out at once.
    let old = unsafe { PORT_LAST.get(port) }
        .copied()
        .unwrap_or(state::UNKNOWN);
    if new != old {
        timer_report(port, old, new, hook::TIMER_CANCEL, false);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_probe_read_kernel and the tracing program types require it.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
