//! `bridge-guard check-config FILE`: validate a configuration without running anything.

use std::path::PathBuf;

use crate::config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check, e.g. /etc/bridge-guard/config.toml.
    file: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let s = config::load(&args.file, true)?;
    println!("{}: ok", args.file.display());
    if s.guards.is_empty() {
        println!("  no [bridges.NAME] tables: `run` will need --bridge NAME");
    }
    for g in &s.guards {
        let p = &g.policy;
        let on: Vec<&str> = [
            ("stp_off", p.stp_off),
            ("force_forwarding", p.force_forwarding),
            ("reattach", p.reattach),
            ("keep_up", p.keep_up),
            ("allow_unsafe", p.allow_unsafe),
        ]
        .iter()
        .filter(|(_, v)| *v)
        .map(|(k, _)| *k)
        .collect();
        let ports = if p.port_patterns.is_empty() {
            "-".to_owned()
        } else {
            p.port_patterns.join(" ")
        };
        println!("  guard {}: {}; ports {ports}", g.bridge, on.join(", "));
    }
    if s.observe {
        println!("  observe-only: nothing will be repaired");
    }
    if let Some(m) = s.metrics {
        println!("  metrics on http://{m}/metrics");
    }
    Ok(())
}
