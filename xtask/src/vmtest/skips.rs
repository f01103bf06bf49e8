//! Skips that count: the `SKIP <test>: <reason> [needs <requirement>]` lines tests print
//! (`integration_tests::skip`), read back from an environment's test output and tallied by
//! requirement, so a skipped test is never mistaken for a passed one.
//!
//! Which requirements an environment must meet travels to the tests in `BRIDGE_GUARD_EXPECT`
//! (a test that skips on one of them fails there); this side only counts and shows.

use std::{collections::BTreeMap, fmt::Write as _};

/// `BRIDGE_GUARD_EXPECT` on the host under `cargo xtask test`: it runs as root, installs the
/// tools the tests use first, and its kernel (PLATFORM.md) attaches the tracepoint tier.
pub const HOST_EXPECT: &str = "root,tool-*,tracepoint-port-state";

/// One skip line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    pub test: String,
    pub reason: String,
    /// `None` for a line that names no requirement (a test not using the helper).
    pub need: Option<String>,
}

/// Reads a `SKIP ...` line; libtest may print it after other text on the same line.
pub fn parse(line: &str) -> Option<Skip> {
    let rest = &line[line.find("SKIP ")? + 5..];
    let (test, reason) = rest.split_once(": ")?;
    let reason = reason.trim_end();
    let (reason, need) = match reason.rsplit_once(" [needs ") {
        Some((r, n)) => match n.strip_suffix(']') {
            Some(n) => (r, Some(n.to_owned())),
            None => (reason, None),
        },
        None => (reason, None),
    };
    Some(Skip {
        test: test.trim().to_owned(),
        reason: reason.to_owned(),
        need,
    })
}

/// Every skip in `text`, each test once (libtest can show a test's output twice).
pub fn collect(text: &str) -> Vec<Skip> {
    let mut skips: Vec<Skip> = text.lines().filter_map(parse).collect();
    skips.sort_by(|a, b| (&a.test, &a.reason).cmp(&(&b.test, &b.reason)));
    skips.dedup();
    skips
}

/// Skips by requirement, e.g. `bridge-module 2, root 1`.
pub fn by_need(skips: &[Skip]) -> String {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for s in skips {
        *n.entry(s.need.as_deref().unwrap_or("unnamed")).or_default() += 1;
    }
    if n.is_empty() {
        return "none".to_owned();
    }
    n.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tally for one environment: a count per requirement, then each skip.
pub fn tally(env: &str, expect: &str, skips: &[Skip]) -> String {
    let mut s = format!(
        "skips on {env}: {} (by requirement: {}); expected to run here: {}\n",
        skips.len(),
        by_need(skips),
        if expect.is_empty() { "-" } else { expect }
    );
    for k in skips {
        let _ = writeln!(
            s,
            "  SKIP {}: {} [needs {}]",
            k.test,
            k.reason,
            k.need.as_deref().unwrap_or("?")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::{by_need, collect, parse};

    #[test]
    fn reads_skip_lines_with_and_without_a_requirement() {
        let s = parse("SKIP t1: bridge is built in [needs bridge-module]").expect("skip");
        assert_eq!(
            (s.test.as_str(), s.reason.as_str(), s.need.as_deref()),
            ("t1", "bridge is built in", Some("bridge-module"))
        );
        let s = parse("test x ... SKIP t2: no nix-instantiate").expect("skip");
        assert_eq!((s.test.as_str(), s.need), ("t2", None));
        assert!(parse("test a ... ok").is_none());
    }

    #[test]
    fn tallies_each_test_once_by_requirement() {
        let text = "SKIP a: x [needs root]\nSKIP b: y [needs root]\nSKIP a: x [needs root]\n\
                    SKIP c: z [needs kprobe-join]\nSKIP d: w\n";
        let skips = collect(text);
        assert_eq!(skips.len(), 4);
        assert_eq!(by_need(&skips), "kprobe-join 1, root 2, unnamed 1");
        assert_eq!(by_need(&[]), "none");
    }
}
