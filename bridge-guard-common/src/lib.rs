//! Types shared by bridge-guard's eBPF programs and its agent.
//!
//! Everything here crosses the kernel/user boundary, so every struct is `#[repr(C)]`, made of
//! fixed-width fields only (no `bool`, no enums), and laid out without implicit padding: the
//! size assertions below fail the build if a field change introduces any.
#![no_std]

/// Sentinel for a kernel struct offset that BTF could not resolve. Programs that need an absent
/// offset skip the read instead of guessing.
pub const ABSENT: u32 = u32::MAX;

/// Bridge port states, as `BR_STATE_*` in `include/uapi/linux/if_bridge.h`.
pub mod state {
    pub const DISABLED: u8 = 0;
    pub const LISTENING: u8 = 1;
    pub const LEARNING: u8 = 2;
    pub const FORWARDING: u8 = 3;
    pub const BLOCKING: u8 = 4;
    /// Not known: an old state nobody observed, or a field whose offset is absent.
    pub const UNKNOWN: u8 = 0xff;
}

/// What an [`Event`] reports.
pub mod kind {
    /// A bridge port's STP state changed. `old_state`/`new_state` are `state::*`.
    pub const PORT_STATE: u8 = 1;
    /// A device became a bridge port (upper-device link succeeded).
    pub const JOIN: u8 = 2;
    /// A device stopped being a bridge port (upper-device unlink).
    pub const LEAVE: u8 = 3;
    /// A bridge's STP mode changed. `old_state`/`new_state` are 0 off, 1 kernel, 2 user STP.
    pub const STP: u8 = 4;
}

/// Which kernel hook produced an [`Event`].
pub mod hook {
    pub const FEXIT: u8 = 1;
    pub const FENTRY: u8 = 2;
    pub const KRETPROBE: u8 = 3;
    pub const KPROBE: u8 = 4;
    /// `timer:timer_start` on a port's forward-delay timer.
    pub const TIMER_START: u8 = 5;
    /// `timer:timer_expire_exit` on a port's forward-delay timer.
    pub const TIMER_EXPIRE: u8 = 6;
    /// `timer:timer_cancel` on a port's forward-delay timer.
    pub const TIMER_CANCEL: u8 = 7;
}

/// Flags in [`Event::flags`].
pub mod flags {
    /// The event happened in the STP forward-delay timer, not on behalf of a task: `pid` and
    /// `comm` are zero.
    pub const FROM_TIMER: u8 = 1;
}

/// Indexes into the `SETTINGS` array map, written by the agent after it picked its hooks.
pub mod settings {
    /// Non-zero: the forward-delay timer tracepoints report port-state changes (the tracepoint
    /// tier). Zero: they only mark timer context for the better tiers.
    pub const TIMER_TIER: u32 = 0;
    pub const LEN: u32 = 1;
}

/// One observation from the kernel, as written to the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ktime_ns: u64,
    /// Inode number of the port's (or bridge's) network namespace.
    pub netns: u32,
    pub bridge_ifindex: u32,
    /// Zero for bridge-wide events (`kind::STP`).
    pub port_ifindex: u32,
    /// Thread-group id of the current task; zero with `flags::FROM_TIMER`.
    pub pid: u32,
    pub kind: u8,
    pub hook: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub flags: u8,
    pub _reserved: [u8; 3],
    pub port_name: [u8; 16],
    pub bridge_name: [u8; 16],
    pub comm: [u8; 16],
}

impl Event {
    /// The size of one ring-buffer record.
    pub const SIZE: usize = size_of::<Self>();

    pub const fn zeroed() -> Self {
        Self {
            ktime_ns: 0,
            netns: 0,
            bridge_ifindex: 0,
            port_ifindex: 0,
            pid: 0,
            kind: 0,
            hook: 0,
            old_state: state::UNKNOWN,
            new_state: state::UNKNOWN,
            flags: 0,
            _reserved: [0; 3],
            port_name: [0; 16],
            bridge_name: [0; 16],
            comm: [0; 16],
        }
    }
}

/// Byte offsets of the kernel struct fields the programs read, resolved from BTF at start-up
/// and handed to the programs as the `OFFSETS` global. `ABSENT` marks a field BTF lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `net_bridge_port.br`
    pub port_br: u32,
    /// `net_bridge_port.dev`
    pub port_dev: u32,
    /// `net_bridge_port.state` (u8)
    pub port_state: u32,
    /// `net_bridge_port.forward_delay_timer`
    pub port_fd_timer: u32,
    /// `net_bridge.dev`
    pub br_dev: u32,
    /// `net_bridge.stp_enabled` (enum, 4 bytes)
    pub br_stp_enabled: u32,
    /// `net_device.name`
    pub dev_name: u32,
    /// `net_device.ifindex`
    pub dev_ifindex: u32,
    /// `net_device.nd_net.net`
    pub dev_net: u32,
    /// `net_device.priv_flags` (byte offset of the 32-bit word holding it)
    pub dev_priv_flags: u32,
    /// `net.ns.inum`
    pub net_inum: u32,
    /// `timer_list.function`
    pub timer_function: u32,
}

impl Offsets {
    /// Every field absent: what the programs see when nothing was resolved.
    pub const ABSENT: Self = Self {
        port_br: ABSENT,
        port_dev: ABSENT,
        port_state: ABSENT,
        port_fd_timer: ABSENT,
        br_dev: ABSENT,
        br_stp_enabled: ABSENT,
        dev_name: ABSENT,
        dev_ifindex: ABSENT,
        dev_net: ABSENT,
        dev_priv_flags: ABSENT,
        net_inum: ABSENT,
        timer_function: ABSENT,
    };
}

/// `IFF_EBRIDGE` in `net_device.priv_flags`: the device is a bridge.
pub const IFF_EBRIDGE: u32 = 1 << 1;

/// MAC flapping, as the `br_fdb_update` program judges it. A MAC address that moves between
/// ports of one bridge [`fdb::FLAP_MOVES`] times within [`fdb::FLAP_WINDOW_NS`] is reported (at
/// most once per [`fdb::REPORT_EVERY_NS`] per address): in a layer-2 loop every frame comes
/// back on the loop's ports, so its source address moves at once and again and again, while a
/// VM that migrates or a bond that fails over moves an address once.
pub mod fdb {
    pub const FLAP_MOVES: u32 = 3;
    pub const FLAP_WINDOW_NS: u64 = 1_000_000_000;
    pub const REPORT_EVERY_NS: u64 = 50_000_000;
    /// Addresses tracked (LRU: the least recently moved are forgotten first).
    pub const TRACKED: u32 = 16_384;
    /// Indexes into the `FDB_COUNTERS` per-CPU array.
    pub mod counter {
        /// Reports that did not fit in `FDB_EVENTS`.
        pub const LOST: u32 = 0;
        /// Updates the program could not judge: a kernel read failed.
        pub const READ_FAILED: u32 = 1;
        pub const LEN: u32 = 2;
    }
}

/// One MAC address flapping between two ports of a bridge, as written to `FDB_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbFlap {
    /// `bpf_ktime_get_ns()` of the move that crossed the threshold.
    pub ktime_ns: u64,
    /// Inode number of the bridge's network namespace.
    pub netns: u32,
    pub bridge_ifindex: u32,
    /// Where the address was just learned.
    pub port_ifindex: u32,
    /// Where it was learned before.
    pub prev_ifindex: u32,
    /// Moves within the current window.
    pub moves: u32,
    pub vid: u16,
    pub mac: [u8; 6],
    pub _reserved: [u8; 4],
}

impl FdbFlap {
    pub const SIZE: usize = size_of::<Self>();
}

// No implicit padding: the sum of the fields must be the size of the struct.
const _: () = assert!(Event::SIZE == 8 + 4 * 4 + 5 + 3 + 16 * 3);
const _: () = assert!(size_of::<Offsets>() == 12 * 4);
const _: () = assert!(FdbFlap::SIZE == 8 + 5 * 4 + 2 + 6 + 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are `#[repr(C)]`, made only of integers and integer arrays, with no padding
    // (asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Offsets {}
    unsafe impl aya::Pod for super::FdbFlap {}
}
