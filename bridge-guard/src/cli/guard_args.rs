//! Command-line options shared by `run` and `fix`: which bridges, and what to repair.

use std::path::PathBuf;

use crate::planner::{Guard, Policy};

#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Do not turn kernel STP off (ports cannot be forced to forwarding while it is on).
    #[arg(long)]
    pub no_stp_off: bool,
    /// Do not force oper-up ports that are not forwarding to forwarding.
    #[arg(long)]
    pub no_force_forwarding: bool,
    /// Do not re-attach detached member ports.
    #[arg(long)]
    pub no_reattach: bool,
    /// Do not set a guarded bridge back up when it is set down.
    #[arg(long)]
    pub no_keep_up: bool,
    /// Repair BRIDGE even though it has a physical NIC, tunnel, bond, switchdev port or
    /// user-space STP, where repairs could create a loop or fight its owner. Repeatable.
    #[arg(long, value_name = "BRIDGE")]
    pub allow_unsafe: Vec<String>,
    /// Ports whose names match GLOB (`*`, `?`) always belong to the guarded bridges, e.g.
    /// `vnet*`. Repeatable.
    #[arg(long, value_name = "GLOB")]
    pub port_pattern: Vec<String>,
    /// Where libvirt keeps live domain XML, read for which taps belong to which bridge.
    #[arg(long, value_name = "DIR", default_value = "/run/libvirt/qemu")]
    pub libvirt_dir: PathBuf,
}

/// A valid interface name: 1-15 bytes, no '/', no whitespace, not "." or "..".
pub fn bridge_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(char::is_whitespace);
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' is not an interface name: 1 to 15 characters, no '/' and no spaces (e.g. virbr0)"
        ))
    }
}

impl PolicyArgs {
    pub fn guards(&self, bridges: &[String]) -> anyhow::Result<Vec<Guard>> {
        for b in &self.allow_unsafe {
            anyhow::ensure!(
                bridges.contains(b),
                "--allow-unsafe {b}: {b} is not one of the guarded bridges ({})",
                bridges.join(", ")
            );
        }
        Ok(bridges
            .iter()
            .map(|b| Guard {
                bridge: b.clone(),
                policy: Policy {
                    stp_off: !self.no_stp_off,
                    force_forwarding: !self.no_force_forwarding,
                    reattach: !self.no_reattach,
                    keep_up: !self.no_keep_up,
                    allow_unsafe: self.allow_unsafe.contains(b),
                    port_patterns: self.port_pattern.clone(),
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_are_checked() {
        assert_eq!(bridge_name("virbr0"), Ok("virbr0".to_owned()));
        for bad in ["", "a/b", "has space", "sixteen-chars-xx", ".."] {
            let err = bridge_name(bad).expect_err(bad);
            assert!(err.contains("not an interface name"), "{err}");
        }
    }
}
