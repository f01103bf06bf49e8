//! Facts about the process and the machine: capabilities, network namespace, clocks, symbols.

pub mod caps;
pub mod clock;
pub mod kallsyms;
pub mod last_hour;
pub mod netns;
pub mod notify;
