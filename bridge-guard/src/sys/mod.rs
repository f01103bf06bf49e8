//! Facts about the process and the machine: capabilities, network namespace, clocks, symbols,
//! resource use; and files written for other processes to read.

pub mod caps;
pub mod clock;
pub mod color;
pub mod fs;
pub mod kallsyms;
pub mod last_hour;
pub mod memory;
pub mod netns;
pub mod notify;
pub mod process;
pub mod sockopt;
