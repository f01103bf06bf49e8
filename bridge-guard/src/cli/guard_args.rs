//! Command-line options shared by `run` and `fix`: which bridges, and what to repair. They
//! override the configuration file.

use std::path::PathBuf;

use crate::{config, planner::Guard};

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
    /// `vnet*`. Repeatable; added to the configuration's `ports`.
    #[arg(long, value_name = "GLOB")]
    pub port_pattern: Vec<String>,
    /// libvirt's run directory (`/run/libvirt`) or its `qemu` subdirectory: live domain XML
    /// (`qemu/*.xml`) and active networks' status (`network/*.xml`) say which tap belongs to
    /// which bridge [default: /run/libvirt/qemu].
    #[arg(long, value_name = "DIR")]
    pub libvirt_dir: Option<PathBuf>,
    /// The configuration file [default: /etc/bridge-guard/config.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `clap` value parser for interface names.
pub fn bridge_name(s: &str) -> Result<String, String> {
    config::check_ifname(s).map(|()| s.to_owned())
}

impl PolicyArgs {
    /// The configuration file to read, and whether it was asked for by name.
    pub fn config_path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(config::DEFAULT_PATH), false),
        }
    }

    /// The guards: the command line's bridges (else the file's), with the file's policy for
    /// each and the command line's flags on top.
    pub fn guards(
        &self,
        bridges: &[String],
        settings: &config::Settings,
    ) -> anyhow::Result<Vec<Guard>> {
        let mut guards: Vec<Guard> = if bridges.is_empty() {
            settings.guards.clone()
        } else {
            bridges.iter().map(|b| settings.guard_for(b)).collect()
        };
        anyhow::ensure!(
            !guards.is_empty(),
            "no bridge to guard: give --bridge NAME, or list bridges as [bridges.NAME] in {}",
            self.config_path().0.display()
        );
        let names: Vec<&str> = guards.iter().map(|g| g.bridge.as_str()).collect();
        for b in &self.allow_unsafe {
            anyhow::ensure!(
                names.contains(&b.as_str()),
                "--allow-unsafe {b}: {b} is not one of the guarded bridges ({})",
                names.join(", ")
            );
        }
        for g in &mut guards {
            let p = &mut g.policy;
            p.stp_off &= !self.no_stp_off;
            p.force_forwarding &= !self.no_force_forwarding;
            p.reattach &= !self.no_reattach;
            p.keep_up &= !self.no_keep_up;
            p.allow_unsafe |= self.allow_unsafe.contains(&g.bridge);
            p.port_patterns.extend(self.port_pattern.iter().cloned());
        }
        Ok(guards)
    }

    pub fn libvirt_dir(&self, settings: &config::Settings) -> PathBuf {
        self.libvirt_dir
            .clone()
            .unwrap_or_else(|| settings.libvirt_dir.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Policy;

    fn args() -> PolicyArgs {
        PolicyArgs {
            no_stp_off: false,
            no_force_forwarding: false,
            no_reattach: false,
            no_keep_up: false,
            allow_unsafe: vec![],
            port_pattern: vec![],
            libvirt_dir: None,
            config: None,
        }
    }

    #[test]
    fn bridge_names_are_checked() {
        assert_eq!(bridge_name("virbr0"), Ok("virbr0".to_owned()));
        for bad in ["", "a/b", "has space", "sixteen-chars-xx", ".."] {
            let err = bridge_name(bad).expect_err(bad);
            assert!(err.contains("not an interface name"), "{err}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let mut settings = config::Settings::default();
        settings.guards.push(Guard {
            bridge: "virbr0".into(),
            policy: Policy {
                port_patterns: vec!["vnet*".into()],
                ..Policy::default()
            },
        });
        let mut a = args();
        assert_eq!(
            a.guards(&[], &settings).expect("file bridges"),
            settings.guards
        );
        a.no_stp_off = true;
        a.port_pattern = vec!["tap*".into()];
        let g = a
            .guards(&["virbr0".into(), "br1".into()], &settings)
            .expect("cli bridges");
        assert_eq!(g.len(), 2);
        assert!(!g[0].policy.stp_off && !g[1].policy.stp_off);
        assert_eq!(g[0].policy.port_patterns, ["vnet*", "tap*"]);
        assert_eq!(g[1].policy.port_patterns, ["tap*"]);
        let none = args()
            .guards(&[], &config::Settings::default())
            .expect_err("nothing to guard");
        assert!(none.to_string().contains("no bridge to guard"), "{none}");
    }
}
