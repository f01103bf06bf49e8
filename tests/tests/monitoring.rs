//! The shipped monitoring content: the alert rules pass `promtool check rules` and their own
//! unit tests (`promtool test rules`), and the Grafana dashboard is valid JSON whose queries
//! name only metrics the agent serves (checked in `exposition::render`'s unit tests).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, ensure};
use integration_tests::apt;

fn monitoring() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

fn promtool(args: &[&str]) -> Result<String> {
    let bin = apt::promtool().context(
        "promtool is missing and cannot be had: install Debian's `prometheus` package, or put \
         promtool on PATH",
    )?;
    let out = Command::new(&bin)
        .args(args)
        .current_dir(monitoring())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn the_alert_rules_pass_promtool_check() -> Result<()> {
    let out = promtool(&["check", "rules", "alerts.yml"])?;
    ensure!(out.contains("SUCCESS"), "{out}");
    eprintln!("{out}");
    Ok(())
}

#[test]
fn the_alert_rules_pass_their_unit_tests() -> Result<()> {
    let out = promtool(&["test", "rules", "alerts.test.yml"])?;
    ensure!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

#[test]
fn the_dashboard_is_a_grafana_dashboard() -> Result<()> {
    let text = std::fs::read_to_string(monitoring().join("dashboard.json"))?;
    let d: serde_json::Value = serde_json::from_str(&text).context("dashboard.json")?;
    ensure!(
        d["title"].is_string() && d["uid"].is_string(),
        "no title or uid"
    );
    let panels = d["panels"].as_array().context("no panels")?;
    ensure!(panels.len() >= 6, "only {} panels", panels.len());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array();
        ensure!(
            targets.is_some_and(|t| t.iter().all(|t| t["expr"].is_string())),
            "panel {} has no queries",
            p["title"]
        );
    }
    Ok(())
}
