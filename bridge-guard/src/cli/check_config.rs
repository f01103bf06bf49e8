//! `bridge-guard check-config [FILE]`: validate a configuration without running anything.

use std::path::PathBuf;

use serde_json::json;

use crate::config::{self, ConfigError, Settings};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check.
    #[arg(value_name = "FILE", default_value = config::DEFAULT_PATH)]
    file: PathBuf,
    /// Print the result as JSON: the settings as the agent would run with them, or the error
    /// with its line, column and hint.
    #[arg(short = 'j', long)]
    json: bool,
}

fn settings_json(file: &std::path::Path, s: &Settings) -> serde_json::Value {
    json!({
        "file": file,
        "ok": true,
        "guards": s.guards.iter().map(|g| {
            let p = &g.policy;
            json!({
                "bridge": g.bridge,
                "stp_off": p.stp_off,
                "force_forwarding": p.force_forwarding,
                "reattach": p.reattach,
                "keep_up": p.keep_up,
                "allow_unsafe": p.allow_unsafe,
                "ports": p.port_patterns,
            })
        }).collect::<Vec<_>>(),
        "observe": s.observe,
        "require_repair": s.require_repair,
        "ebpf": s.ebpf,
        "metrics": s.metrics.map(|m| m.to_string()),
        "metrics_textfile": s.metrics_textfile,
        "state_dir": s.state_dir,
        "libvirt_dir": s.libvirt_dir,
        "summary_interval_secs": s.summary_interval_secs,
        "reconcile_interval_secs": s.reconcile_interval_secs,
    })
}

fn error_json(file: &std::path::Path, e: &ConfigError) -> serde_json::Value {
    let error = match e {
        ConfigError::Invalid(l) => json!({
            "line": l.line,
            "column": l.column,
            "message": l.message,
            "hint": l.hint,
        }),
        ConfigError::Read { .. } => json!({ "message": crate::error_chain(e) }),
    };
    json!({ "file": file, "ok": false, "error": error })
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let loaded = config::load(&args.file, true);
    if args.json {
        return match loaded {
            Ok(s) => {
                println!("{:#}", settings_json(&args.file, &s));
                Ok(())
            }
            Err(e) => {
                println!("{:#}", error_json(&args.file, &e));
                Err(super::status::Exit(1).into())
            }
        };
    }
    let s = loaded?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_says_what_the_agent_would_run_with_or_where_the_error_is() {
        let path = std::path::Path::new("/etc/bg.toml");
        let s = config::parse(path, "[bridges.virbr0]\nports = [\"vnet*\"]\n").expect("parses");
        let v = settings_json(path, &s);
        assert_eq!(v["ok"], true);
        assert_eq!(v["guards"][0]["bridge"], "virbr0");
        assert_eq!(v["guards"][0]["ports"][0], "vnet*");
        assert_eq!(v["state_dir"], "/run/bridge-guard");
        let e = config::parse(path, "observe = 1\n").expect_err("bad type");
        let v = error_json(path, &e);
        assert_eq!(
            (v["ok"].clone(), v["error"]["line"].clone()),
            (json!(false), json!(1))
        );
        assert!(
            v["error"]["hint"]
                .as_str()
                .is_some_and(|h| h.contains("true/false"))
        );
    }
}
