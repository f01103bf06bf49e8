//! Kernel events, decoded from ring-buffer records into typed values.
//!
//! Records are read with `read_unaligned` from whatever bytes the ring buffer hands over: the
//! buffer makes no alignment promise we want to rely on, and a short record is an error, not
//! undefined behaviour.

use std::fmt;

use bridge_guard_common::{self as common, Event};
use serde::Serialize;

/// A bridge port's STP state (`BR_STATE_*`), plus the states the agent adds around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortState {
    Disabled,
    Listening,
    Learning,
    Forwarding,
    Blocking,
    /// Not a member of the bridge (any more).
    Detached,
}

impl PortState {
    pub const ALL: [Self; 6] = [
        Self::Disabled,
        Self::Listening,
        Self::Learning,
        Self::Forwarding,
        Self::Blocking,
        Self::Detached,
    ];

    /// Decodes a kernel `BR_STATE_*` value; `None` for unknown values.
    pub fn from_kernel(raw: u8) -> Option<Self> {
        match raw {
            common::state::DISABLED => Some(Self::Disabled),
            common::state::LISTENING => Some(Self::Listening),
            common::state::LEARNING => Some(Self::Learning),
            common::state::FORWARDING => Some(Self::Forwarding),
            common::state::BLOCKING => Some(Self::Blocking),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Listening => "listening",
            Self::Learning => "learning",
            Self::Forwarding => "forwarding",
            Self::Blocking => "blocking",
            Self::Detached => "detached",
        }
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bridge's spanning-tree mode (`IFLA_BR_STP_STATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StpMode {
    Off,
    Kernel,
    User,
}

impl StpMode {
    pub fn from_kernel(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Off),
            1 => Some(Self::Kernel),
            2 => Some(Self::User),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Kernel => "kernel",
            Self::User => "user",
        }
    }
}

impl fmt::Display for StpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kernel hook that produced an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Fexit,
    Fentry,
    Kretprobe,
    Kprobe,
    TimerStart,
    TimerExpire,
    TimerCancel,
}

impl Hook {
    fn from_raw(raw: u8) -> Option<Self> {
        use common::hook;
        match raw {
            hook::FEXIT => Some(Self::Fexit),
            hook::FENTRY => Some(Self::Fentry),
            hook::KRETPROBE => Some(Self::Kretprobe),
            hook::KPROBE => Some(Self::Kprobe),
            hook::TIMER_START => Some(Self::TimerStart),
            hook::TIMER_EXPIRE => Some(Self::TimerExpire),
            hook::TIMER_CANCEL => Some(Self::TimerCancel),
            _ => None,
        }
    }

    /// The hook tier, as `doctor` and the logs name it.
    pub fn tier(self) -> &'static str {
        match self {
            Self::Fexit | Self::Fentry => "fentry",
            Self::Kretprobe | Self::Kprobe => "kprobe",
            Self::TimerStart | Self::TimerExpire | Self::TimerCancel => "tracepoint",
        }
    }
}

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    PortState {
        old: Option<PortState>,
        new: Option<PortState>,
    },
    Join,
    Leave,
    Stp {
        old: Option<StpMode>,
        new: Option<StpMode>,
    },
}

/// Who made the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Actor {
    /// The bridge's STP forward-delay timer (softirq), not a task.
    StpTimer,
    Task {
        comm: String,
        pid: u32,
    },
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StpTimer => f.write_str("stp timer"),
            Self::Task { comm, pid } => write!(f, "{comm}[{pid}]"),
        }
    }
}

/// One decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelEvent {
    /// CLOCK_MONOTONIC nanoseconds, from the kernel.
    pub ktime_ns: u64,
    pub netns: u32,
    pub bridge: String,
    pub bridge_ifindex: u32,
    /// Empty for bridge-wide events.
    pub port: String,
    pub port_ifindex: u32,
    #[serde(flatten)]
    pub change: Change,
    pub actor: Actor,
    pub hook: Hook,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring buffer record is {len} bytes, expected {expected}")]
    Size { len: usize, expected: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown hook id {0}")]
    Hook(u8),
}

/// A NUL-terminated kernel name; invalid UTF-8 is replaced rather than rejected.
fn name(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl KernelEvent {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < Event::SIZE {
            return Err(DecodeError::Size {
                len: bytes.len(),
                expected: Event::SIZE,
            });
        }
        // SAFETY: the length is checked above; `Event` is plain old data (every bit pattern is
        // valid) and `read_unaligned` makes no alignment assumption.
        let raw = unsafe { bytes.as_ptr().cast::<Event>().read_unaligned() };
        Self::from_raw(&raw)
    }

    pub fn from_raw(raw: &Event) -> Result<Self, DecodeError> {
        let change = match raw.kind {
            common::kind::PORT_STATE => Change::PortState {
                old: PortState::from_kernel(raw.old_state),
                new: PortState::from_kernel(raw.new_state),
            },
            common::kind::JOIN => Change::Join,
            common::kind::LEAVE => Change::Leave,
            common::kind::STP => Change::Stp {
                old: StpMode::from_kernel(raw.old_state.into()),
                new: StpMode::from_kernel(raw.new_state.into()),
            },
            other => return Err(DecodeError::Kind(other)),
        };
        let hook = Hook::from_raw(raw.hook).ok_or(DecodeError::Hook(raw.hook))?;
        let actor = if raw.flags & common::flags::FROM_TIMER != 0 {
            Actor::StpTimer
        } else {
            Actor::Task {
                comm: name(&raw.comm),
                pid: raw.pid,
            }
        };
        Ok(Self {
            ktime_ns: raw.ktime_ns,
            netns: raw.netns,
            bridge: name(&raw.bridge_name),
            bridge_ifindex: raw.bridge_ifindex,
            port: name(&raw.port_name),
            port_ifindex: raw.port_ifindex,
            change,
            actor,
            hook,
        })
    }
}

fn or_unknown<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

/// The one-line human form used by `watch`: `virbr0 vnet0 blocking -> listening (tracepoint, by ip[1234])`.
impl Change {
    /// `br0 vnet0 listening -> learning`, `br0 vnet0 joined`, `br0 stp kernel -> off`.
    pub fn describe(&self, f: &mut fmt::Formatter<'_>, bridge: &str, port: &str) -> fmt::Result {
        match *self {
            Self::PortState { old, new } => write!(
                f,
                "{bridge} {port} {} -> {}",
                or_unknown(old),
                or_unknown(new)
            ),
            Self::Join => write!(f, "{bridge} {port} joined"),
            Self::Leave => write!(f, "{bridge} {port} left"),
            Self::Stp { old, new } => {
                write!(f, "{bridge} stp {} -> {}", or_unknown(old), or_unknown(new))
            }
        }
    }
}

impl fmt::Display for KernelEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.change.describe(f, &self.bridge, &self.port)?;
        write!(f, " ({}, by {})", self.hook.tier(), self.actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        let mut ev = Event::zeroed();
        ev.ktime_ns = 123_456_789;
        ev.netns = 4_026_532_000;
        ev.bridge_ifindex = 7;
        ev.port_ifindex = 9;
        ev.pid = 1234;
        ev.kind = common::kind::PORT_STATE;
        ev.hook = common::hook::TIMER_START;
        ev.old_state = common::state::BLOCKING;
        ev.new_state = common::state::LISTENING;
        ev.bridge_name[..6].copy_from_slice(b"virbr0");
        ev.port_name[..5].copy_from_slice(b"vnet0");
        ev.comm[..2].copy_from_slice(b"ip");
        ev
    }

    fn bytes_of(ev: &Event) -> Vec<u8> {
        // SAFETY: `Event` is plain old data without padding.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), Event::SIZE) }
            .to_vec()
    }

    #[test]
    fn decodes_from_unaligned_bytes() {
        let ev = sample();
        // Offset the record by one byte so it cannot be 8-byte aligned.
        let mut buf = [0u8; Event::SIZE + 1];
        buf[1..].copy_from_slice(&bytes_of(&ev));
        let decoded = KernelEvent::decode(&buf[1..]).expect("decodes");
        assert_eq!(decoded.ktime_ns, 123_456_789);
        assert_eq!(decoded.netns, 4_026_532_000);
        assert_eq!(decoded.bridge, "virbr0");
        assert_eq!(decoded.port, "vnet0");
        assert_eq!((decoded.bridge_ifindex, decoded.port_ifindex), (7, 9));
        assert_eq!(
            decoded.change,
            Change::PortState {
                old: Some(PortState::Blocking),
                new: Some(PortState::Listening)
            }
        );
        assert_eq!(
            decoded.actor,
            Actor::Task {
                comm: "ip".into(),
                pid: 1234
            }
        );
        assert_eq!(
            decoded.to_string(),
            "virbr0 vnet0 blocking -> listening (tracepoint, by ip[1234])"
        );
    }

    #[test]
    fn rejects_short_records() {
        let ev = sample();
        let bytes = bytes_of(&ev);
        assert_eq!(
            KernelEvent::decode(&bytes[..Event::SIZE - 1]),
            Err(DecodeError::Size {
                len: Event::SIZE - 1,
                expected: Event::SIZE
            })
        );
    }

    #[test]
    fn rejects_unknown_kind_and_hook() {
        let mut ev = sample();
        ev.kind = 200;
        assert_eq!(
            KernelEvent::decode(&bytes_of(&ev)),
            Err(DecodeError::Kind(200))
        );
        let mut ev = sample();
        ev.hook = 99;
        assert_eq!(
            KernelEvent::decode(&bytes_of(&ev)),
            Err(DecodeError::Hook(99))
        );
    }

    #[test]
    fn timer_events_name_the_timer_and_unknown_states_show_as_question_marks() {
        let mut ev = sample();
        ev.flags = common::flags::FROM_TIMER;
        ev.old_state = common::state::UNKNOWN;
        ev.new_state = common::state::LEARNING;
        ev.hook = common::hook::TIMER_EXPIRE;
        let decoded = KernelEvent::decode(&bytes_of(&ev)).expect("decodes");
        assert_eq!(decoded.actor, Actor::StpTimer);
        assert_eq!(
            decoded.to_string(),
            "virbr0 vnet0 ? -> learning (tracepoint, by stp timer)"
        );
    }

    #[test]
    fn names_without_nul_use_all_sixteen_bytes() {
        assert_eq!(name(b"abcdefghijklmnop"), "abcdefghijklmnop");
    }

    #[test]
    fn json_has_every_field() {
        let decoded = KernelEvent::decode(&bytes_of(&sample())).expect("decodes");
        let v = serde_json::to_value(&decoded).expect("serializes");
        for key in [
            "ktime_ns",
            "netns",
            "bridge",
            "bridge_ifindex",
            "port",
            "port_ifindex",
            "kind",
            "old",
            "new",
            "actor",
            "hook",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {v}");
        }
        assert_eq!(v["kind"], "port_state");
        assert_eq!(v["old"], "blocking");
        assert_eq!(v["actor"]["comm"], "ip");
    }
}
