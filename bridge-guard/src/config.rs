//! The configuration file (TOML, default `/etc/bridge-guard/config.toml`).
//!
//! Unknown keys, wrong types and impossible values are errors at start, each with
//! `file:line:column` and a hint; command-line flags override what the file says.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::planner::{Guard, Policy};

pub const DEFAULT_PATH: &str = "/etc/bridge-guard/config.toml";
const EXAMPLE: &str = "packaging/config.example.toml in the source tree is an annotated example";

/// How diagnostics are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
    Journald,
}

/// The file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub observe: Option<bool>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub summary_interval_secs: Option<Spanned<u64>>,
    pub reconcile_interval_secs: Option<Spanned<u64>>,
    pub metrics: Option<Spanned<String>>,
    pub metrics_textfile: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub libvirt_dir: Option<PathBuf>,
    pub ebpf: Option<bool>,
    /// Refuse to start, rather than run observe-only, without the privileges to repair.
    pub require_repair: Option<bool>,
    #[serde(default)]
    pub bridges: BTreeMap<Spanned<String>, BridgeFile>,
}

/// One `[bridges.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeFile {
    pub stp_off: Option<bool>,
    pub force_forwarding: Option<bool>,
    pub reattach: Option<bool>,
    pub keep_up: Option<bool>,
    pub allow_unsafe: Option<bool>,
    pub loop_protect: Option<bool>,
    #[serde(default)]
    pub ports: Vec<Spanned<String>>,
}

/// Where in which file, and what to do about it.
#[derive(Debug, PartialEq, Eq)]
pub struct Located {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}\n  hint: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message,
            self.hint
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(Located),
    #[error("cannot read the configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// 1-based line and column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn at(
        &self,
        span: Range<usize>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError::Invalid(Located {
            path: self.path.to_owned(),
            line,
            column,
            message: message.into(),
            hint: hint.into(),
        })
    }
}

/// A hint for a syntax or type error, from serde's message.
fn hint_for(message: &str) -> String {
    if message.contains("unknown field") {
        format!("remove or correct the key; {EXAMPLE}")
    } else if message.contains("unknown variant") {
        "use one of the values listed".to_owned()
    } else if message.contains("invalid type") {
        format!("check the value's type (true/false, a number, a \"string\", [a list]); {EXAMPLE}")
    } else {
        format!("this is not valid TOML here; {EXAMPLE}")
    }
}

/// The settings the agent runs with: the file's, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub guards: Vec<Guard>,
    pub observe: bool,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub summary_interval_secs: u64,
    pub reconcile_interval_secs: u64,
    pub metrics: Option<SocketAddr>,
    pub metrics_textfile: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub libvirt_dir: PathBuf,
    pub ebpf: bool,
    pub require_repair: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            guards: Vec::new(),
            observe: false,
            log_format: None,
            log_level: None,
            summary_interval_secs: 600,
            reconcile_interval_secs: 60,
            metrics: None,
            metrics_textfile: None,
            state_dir: PathBuf::from("/run/bridge-guard"),
            libvirt_dir: PathBuf::from("/run/libvirt/qemu"),
            ebpf: true,
            require_repair: false,
        }
    }
}

impl Settings {
    /// The guard for `bridge`: as configured, or with the default policy.
    pub fn guard_for(&self, bridge: &str) -> Guard {
        self.guards
            .iter()
            .find(|g| g.bridge == bridge)
            .cloned()
            .unwrap_or_else(|| Guard {
                bridge: bridge.to_owned(),
                policy: Policy::default(),
            })
    }
}

/// A valid interface name: 1-15 bytes, no '/', no whitespace, not "." or "..".
pub fn check_ifname(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.contains('/')
        && !s.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{s}' is not an interface name: 1 to 15 characters, no '/' and no spaces (e.g. virbr0)"
        ))
    }
}

fn interval(
    src: &Source<'_>,
    v: Option<&Spanned<u64>>,
    key: &str,
    default: u64,
) -> Result<u64, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let secs = *v.get_ref();
    if secs == 0 || secs > 7 * 86_400 {
        return Err(src.at(
            v.span(),
            format!("{key} = {secs} is impossible"),
            "use a number of seconds from 1 to 604800 (a week)",
        ));
    }
    Ok(secs)
}

/// Parses and validates configuration text read from `path`.
pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let src = Source { path, text };
    let file: File = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        src.at(span, e.message().trim().to_owned(), hint_for(e.message()))
    })?;
    let d = Settings::default();
    let metrics = match &file.metrics {
        None => None,
        Some(m) => Some(crate::exposition::parse_addr(m.get_ref()).map_err(|msg| {
            src.at(
                m.span(),
                format!("metrics = {msg}"),
                "write \"127.0.0.1:19469\", or leave it out to serve no metrics",
            )
        })?),
    };
    let mut guards = Vec::new();
    for (name, b) in &file.bridges {
        check_ifname(name.get_ref()).map_err(|msg| {
            src.at(
                name.span(),
                format!("[bridges.{}]: {msg}", name.get_ref()),
                "name a bridge as `ip link` shows it",
            )
        })?;
        let mut patterns = Vec::new();
        for p in &b.ports {
            let pat = p.get_ref();
            if pat.is_empty()
                || pat.len() > 15
                || pat.contains('/')
                || pat.chars().any(char::is_whitespace)
            {
                return Err(src.at(
                    p.span(),
                    format!("ports: '{pat}' can match no interface name"),
                    "use an interface name or a glob with * and ?, e.g. \"vnet*\"",
                ));
            }
            patterns.push(pat.clone());
        }
        let dp = Policy::default();
        guards.push(Guard {
            bridge: name.get_ref().clone(),
            policy: Policy {
                stp_off: b.stp_off.unwrap_or(dp.stp_off),
                force_forwarding: b.force_forwarding.unwrap_or(dp.force_forwarding),
                reattach: b.reattach.unwrap_or(dp.reattach),
                keep_up: b.keep_up.unwrap_or(dp.keep_up),
                allow_unsafe: b.allow_unsafe.unwrap_or(dp.allow_unsafe),
                port_patterns: patterns,
                loop_protect: b.loop_protect.unwrap_or(dp.loop_protect),
            },
        });
    }
    Ok(Settings {
        guards,
        observe: file.observe.unwrap_or(d.observe),
        log_format: file.log_format,
        log_level: file.log_level,
        summary_interval_secs: interval(
            &src,
            file.summary_interval_secs.as_ref(),
            "summary_interval_secs",
            d.summary_interval_secs,
        )?,
        reconcile_interval_secs: interval(
            &src,
            file.reconcile_interval_secs.as_ref(),
            "reconcile_interval_secs",
            d.reconcile_interval_secs,
        )?,
        metrics,
        metrics_textfile: file.metrics_textfile,
        state_dir: file.state_dir.unwrap_or(d.state_dir),
        libvirt_dir: file.libvirt_dir.unwrap_or(d.libvirt_dir),
        ebpf: file.ebpf.unwrap_or(d.ebpf),
        require_repair: file.require_repair.unwrap_or(d.require_repair),
    })
}

/// Loads `path`. A missing file at the default path means "no file"; anywhere else it is an
/// error (it was asked for).
pub fn load(path: &Path, explicit: bool) -> Result<Settings, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Settings::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> Located {
        match parse(Path::new("/etc/bg.toml"), text) {
            Err(ConfigError::Invalid(l)) => l,
            other => panic!("expected an error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_shipped_example_is_valid_and_means_what_it_says() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.example.toml");
        let text = std::fs::read_to_string(&path).expect("example exists");
        let s = parse(&path, &text).expect("example parses");
        assert_eq!(s.guards.len(), 1);
        assert_eq!(s.guards[0].bridge, "virbr0");
        assert_eq!(s.guards[0].policy.port_patterns, ["vnet*"]);
        assert!(s.guards[0].policy.stp_off && !s.guards[0].policy.allow_unsafe);
        assert!(s.guards[0].policy.loop_protect);
        assert_eq!(s.metrics, Some(SocketAddr::from(([127, 0, 0, 1], 19469))));
    }

    #[test]
    fn a_good_file() {
        let s = parse(
            Path::new("x"),
            "observe = true\nlog_format = \"json\"\nsummary_interval_secs = 30\nmetrics = \"9000\"\n\
             [bridges.br0]\nstp_off = false\nports = [\"tap?\"]\n[bridges.virbr0]\nloop_protect = false\n",
        )
        .expect("parses");
        assert!(s.observe);
        assert_eq!(s.log_format, Some(LogFormat::Json));
        assert_eq!(s.summary_interval_secs, 30);
        assert_eq!(s.reconcile_interval_secs, 60, "default kept");
        assert_eq!(s.guards.len(), 2);
        assert!(!s.guards[0].policy.stp_off);
        assert!(s.guards[1].policy.stp_off, "defaults per bridge");
        assert!(s.guards[0].policy.loop_protect && !s.guards[1].policy.loop_protect);
    }

    #[test]
    fn unknown_keys_point_at_the_key() {
        let e = err("observe = true\n\n[bridges.br0]\n  stp_of = true\n");
        assert_eq!((e.line, e.column), (4, 3), "{e}");
        assert!(e.message.contains("unknown field `stp_of`"), "{e}");
        assert!(e.message.contains("stp_off"), "lists the valid keys: {e}");
        assert!(e.to_string().starts_with("/etc/bg.toml:4:3: "), "{e}");
    }

    #[test]
    fn wrong_types_point_at_the_value() {
        let e = err("observe = \"yes\"\n");
        assert_eq!((e.line, e.column), (1, 11), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");
        assert!(e.hint.contains("true/false"), "{e}");
        let e = err("log_format = \"xml\"\n");
        assert!(e.message.contains("unknown variant `xml`"), "{e}");
    }

    #[test]
    fn impossible_values_point_at_the_value_with_a_hint() {
        let e = err("reconcile_interval_secs = 0\n");
        assert_eq!((e.line, e.column), (1, 27), "{e}");
        assert!(e.hint.contains("1 to 604800"), "{e}");
        let e = err("\n[bridges.\"has space\"]\n");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("not an interface name"), "{e}");
        let e = err("metrics = \"localhost\"\n");
        assert!(e.message.contains("not PORT or ADDRESS:PORT"), "{e}");
        let e = err("[bridges.br0]\nports = [\"vnet*\", \"\"]\n");
        assert_eq!((e.line, e.column), (2, 19), "{e}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = err("observe = true\nbridges = [\n");
        assert_eq!((e.line, e.column), (2, 12), "{e}");
        assert!(e.message.contains("unclosed array"), "{e}");
    }

    #[test]
    fn a_missing_default_file_is_no_file_but_an_explicit_one_is_an_error() {
        let missing = Path::new("/nonexistent/bridge-guard.toml");
        assert_eq!(load(missing, false).expect("defaults"), Settings::default());
        assert!(matches!(load(missing, true), Err(ConfigError::Read { .. })));
    }
}
