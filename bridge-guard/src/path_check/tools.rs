//! The read-only commands the path checks ask: `ip -j`, `nft -j`, `iptables-save`.

use std::process::Command;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run `{tool}` (is iproute2 installed?)")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("`{command}` printed something other than JSON")]
    Json {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Runs `tool ARGS`: its stdout, `Ok(None)` when the tool is not installed.
pub fn run(tool: &str, args: &[&str]) -> Result<Option<String>, ToolError> {
    let out = match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ToolError::Spawn {
                tool: tool.to_owned(),
                source,
            });
        }
    };
    if !out.status.success() {
        return Err(ToolError::Failed {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// `ip -j ARGS`, as a list of objects.
pub fn ip_json(args: &[&str]) -> Result<Vec<Value>, ToolError> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let command = || format!("ip {}", all.join(" "));
    let text = run("ip", &all)?.ok_or_else(|| ToolError::Spawn {
        tool: "ip".into(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(&text).map_err(|source| ToolError::Json {
        command: command(),
        source,
    })?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// A link's kind (`bridge`, `tun`, `wireguard`...) from `ip -j -d link`.
pub fn link_kind(link: &Value) -> Option<String> {
    link["linkinfo"]["info_kind"].as_str().map(str::to_owned)
}

/// Reads a sysctl under `/proc/sys/net/ipv4/` (of this network namespace).
pub fn ipv4_sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}
