//! Where the agent learns what the kernel does: eBPF hooks (and, with the repair issue, netlink).

pub mod ebpf;
pub mod link_watch;
pub mod muffle;
pub mod netlink;
pub mod notifications;
pub mod trim;
pub mod unchanged;
