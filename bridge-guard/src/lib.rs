//! bridge-guard: keeps Linux bridges that carry VM traffic forwarding, and accounts for every
//! second a port spends not forwarding.
//!
//! Data flow: `sources` (eBPF ring buffer, netlink) decode kernel changes into `event`s; the CLI
//! subcommands in `cli` wire them together.

pub mod accounting;
pub mod actuator;
pub mod agent;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod event;
pub mod exposition;
pub mod membership;
pub mod model;
pub mod path_check;
pub mod planner;
pub mod rate;
pub mod sources;
pub mod status;
pub mod sys;

/// `err: cause: cause` on one line, for logs and user-facing messages.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
