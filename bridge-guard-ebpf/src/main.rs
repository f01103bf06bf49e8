//! bridge-guard's kernel side: hooks on bridge port-state, membership and STP changes, all
//! feeding the `EVENTS` ring buffer with `bridge_guard_common::Event` records; and MAC flapping
//! between bridge ports (loop detection), feeding `FDB_EVENTS`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod fdb;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
