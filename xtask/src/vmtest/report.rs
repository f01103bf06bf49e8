//! What each VM left in its directory, read back on the host: whether it booted, the doctor's
//! report and chosen hook tiers, every test's verdict (parsed from libtest's text output), the
//! skips by requirement and the fault storm's results, printed per kernel and as final tables
//! across kernels.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use super::{
    guest::{self, Boot, TestBin},
    kernel::Kernel,
    skips::{self, Skip},
    storm::{self, StormReport},
};

/// Lines of console or test output quoted when something went wrong.
const TAIL_LINES: usize = 40;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed,
    Ignored,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "FAILED",
            Self::Ignored => "ignored",
        }
    }
}

pub struct TestResult {
    /// `<binary>::<test name>`.
    pub name: String,
    pub status: Status,
    /// For failures: the test's captured output, or why the binary gave no verdict.
    pub detail: String,
}

/// Everything learnt from one kernel's VM.
pub struct KernelReport {
    pub kernel: Kernel,
    pub out: PathBuf,
    pub elapsed: Duration,
    pub booted: bool,
    /// Reasons the run as a whole is broken (no boot, timeout, modprobe, ip netns).
    pub problems: Vec<String>,
    pub doctor: String,
    /// `(hook, tier)` from `doctor --json`, or why they are unknown.
    pub hooks: Result<Vec<(String, String)>, String>,
    pub tests: Vec<TestResult>,
    /// The skips the tests printed (visible with --show-output).
    pub skips: Vec<Skip>,
    /// `BRIDGE_GUARD_EXPECT` in this guest.
    pub expect: String,
    /// The fault storm's results (`None`: not run), or why they are missing.
    pub storm: Option<Result<StormReport, String>>,
    /// Guest kernel panics the run was resumed after (console excerpts).
    pub panics: Vec<String>,
}

impl KernelReport {
    pub fn failures(&self) -> usize {
        self.problems.len() + self.failed().count() + self.storm_problems().len()
    }

    /// Why the storm failed: it gave no results, or its claims do not hold.
    pub fn storm_problems(&self) -> Vec<String> {
        match &self.storm {
            None => Vec::new(),
            Some(Err(e)) => vec![e.clone()],
            Some(Ok(r)) => r.problems(),
        }
    }

    fn failed(&self) -> impl Iterator<Item = &TestResult> {
        self.tests.iter().filter(|t| t.status == Status::Failed)
    }

    fn count(&self, status: Status) -> usize {
        self.tests.iter().filter(|t| t.status == status).count()
    }

    fn hooks_cell(&self) -> String {
        match &self.hooks {
            Ok(h) => h
                .iter()
                .map(|(hook, tier)| format!("{hook}={tier}"))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("unknown ({e})"),
        }
    }
}

fn read(out: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(out.join(name)).ok()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// `Some(code)` of a `<step>.rc` file the guest wrote.
fn exit_code(out: &Path, step: &str) -> Option<String> {
    read(out, &format!("{step}.rc")).map(|s| s.trim().to_owned())
}

/// The `(hook, tier)` pairs of `doctor --json`'s `.ebpf.hooks[]`.
fn hook_tiers(json: &str) -> Result<Vec<(String, String)>, String> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| format!("doctor --json is not JSON: {e}"))?;
    let ebpf = v.get("ebpf").ok_or("no .ebpf in doctor --json")?;
    if ebpf["loaded"] == false {
        let why = ebpf["error"].as_str().unwrap_or("?");
        return Err(format!("eBPF not loaded: {why}"));
    }
    let field = |h: &Value, k: &str| h[k].as_str().unwrap_or("?").to_owned();
    Ok(ebpf["hooks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|h| (field(h, "hook"), field(h, "tier")))
        .collect())
}

/// The `---- NAME stdout ----` block libtest prints for a failed test.
fn failure_output(log: &str, name: &str) -> String {
    let header = format!("---- {name} stdout ----");
    log.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.starts_with("---- ") && l.trim() != "failures:")
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// Verdicts from libtest's `test NAME ... ok|FAILED|ignored` lines.
pub fn parse_libtest(binary: &str, log: &str) -> Vec<TestResult> {
    log.lines()
        .filter_map(|line| {
            let (name, verdict) = line.strip_prefix("test ")?.split_once(" ... ")?;
            let status = match verdict.split([',', ' ']).next()? {
                "ok" => Status::Ok,
                "FAILED" => Status::Failed,
                "ignored" => Status::Ignored,
                _ => return None,
            };
            let detail = if status == Status::Failed {
                failure_output(log, name)
            } else {
                String::new()
            };
            Some(TestResult {
                name: format!("{binary}::{name}"),
                status,
                detail,
            })
        })
        .collect()
}

/// The verdicts of one test binary, plus a failure for the binary itself when it gave a bad
/// exit code without any failed test (crash, guest-side timeout 124/137, VM died under it).
fn binary_results(out: &Path, bin: &TestBin) -> Vec<TestResult> {
    let log = read(out, &format!("test-{}.log", bin.name)).unwrap_or_default();
    let mut results = parse_libtest(&bin.name, &log);
    let rc = exit_code(out, &format!("test-{}", bin.name));
    let bad = match rc.as_deref() {
        Some("0") => None,
        Some(code) => Some(format!("exited with {code} (124/137: guest-side timeout)")),
        None => Some("did not finish (the VM stopped under it)".to_owned()),
    };
    let verdict_given = results.iter().any(|r| r.status == Status::Failed);
    if let Some(why) = bad.filter(|_| !verdict_given) {
        results.push(TestResult {
            name: format!("{} (binary)", bin.name),
            status: Status::Failed,
            detail: format!("{why}; last output:\n{}", tail(&log)),
        });
    }
    results
}

/// Problems that make the whole run on this kernel suspect.
fn problems(out: &Path, boot: &Boot) -> Vec<String> {
    let console = || tail(&read(out, "console.log").unwrap_or_default());
    let ended = match boot.timed_out {
        Some(t) => format!("killed after the {t:?} timeout"),
        None => format!("vng ended with {}", boot.status),
    };
    if read(out, "booted").is_none() {
        return vec![format!(
            "did not boot ({ended}); console tail:\n{}",
            console()
        )];
    }
    let mut p = Vec::new();
    if read(out, "done").is_none() {
        p.push(format!(
            "the guest stopped before the end ({ended}); console tail:\n{}",
            console()
        ));
    }
    for (step, what) in [
        ("modprobe", "modprobe bridge"),
        ("tun", "modprobe tun"),
        ("netns", "ip netns add/del"),
    ] {
        if let Some(rc) = exit_code(out, step).filter(|rc| rc != "0") {
            let log = read(out, &format!("{step}.log")).unwrap_or_default();
            p.push(format!("{what} failed ({rc}): {}", log.trim()));
        }
    }
    p
}

/// The storm's report, `None` when the guest did not run it, or why it gave none or failed.
fn storm_result(out: &Path) -> Option<Result<StormReport, String>> {
    let rc = exit_code(out, "storm")?;
    let log = || tail(&read(out, "storm.log").unwrap_or_default());
    Some(match storm::read(out) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(format!(
            "the fault storm wrote no results (exit {rc}); its log:\n{}",
            log()
        )),
        Err(e) => Err(format!("{e:#}")),
    })
}

/// Reads back what the guest left in `out`.
pub fn collect(
    kernel: Kernel,
    out: &Path,
    bins: &[TestBin],
    boot: &Boot,
    panics: Vec<String>,
) -> KernelReport {
    let booted = read(out, "booted").is_some();
    let mut doctor = read(out, "doctor.log").unwrap_or_else(|| "(doctor did not run)".into());
    if let Some(rc) = exit_code(out, "doctor").filter(|rc| rc != "0") {
        doctor.push_str(&format!("\n(doctor exited with {rc})"));
    }
    let hooks = read(out, "doctor.json")
        .ok_or_else(|| "doctor --json did not run".to_owned())
        .and_then(|j| hook_tiers(&j));
    let tests = if booted {
        bins.iter()
            .filter(|b| guest::runs_in_guest(b))
            .flat_map(|b| binary_results(out, b))
            .collect()
    } else {
        Vec::new()
    };
    let logs: String = bins
        .iter()
        .filter_map(|b| read(out, &format!("test-{}.log", b.name)))
        .collect::<Vec<_>>()
        .join("\n");
    let storm = booted.then(|| storm_result(out)).flatten();
    KernelReport {
        skips: skips::collect(&logs),
        expect: guest::expectations(&kernel),
        storm,
        panics,
        problems: problems(out, boot),
        kernel,
        out: out.to_path_buf(),
        elapsed: boot.elapsed,
        booted,
        doctor,
        hooks,
        tests,
    }
}

/// One kernel's section: doctor verbatim, hook tiers, tests, failures with their output.
pub fn print_kernel(r: &KernelReport) {
    let k = &r.kernel;
    println!(
        "\n## {} ({} {}): {:.1} s",
        k.release,
        k.package,
        k.version,
        r.elapsed.as_secs_f64()
    );
    println!("logs: {}", r.out.display());
    for p in &r.problems {
        println!("PROBLEM: {p}");
    }
    for p in &r.panics {
        println!(
            "WARNING: the guest kernel panicked; the run was resumed in a new boot after the \
             steps it had finished. Console:\n```\n{p}\n```"
        );
    }
    if !r.booted {
        return;
    }
    println!("hook tiers: {}", r.hooks_cell());
    println!(
        "\n`bridge-guard doctor`:\n```\n{}\n```",
        r.doctor.trim_end()
    );
    println!("\n| test | result |\n|---|---|");
    for t in &r.tests {
        println!("| {} | {} |", t.name, t.status.as_str());
    }
    print!("\n{}", skips::tally(&k.release, &r.expect, &r.skips));
    if let Some(Ok(storm)) = &r.storm {
        println!(
            "\nfault storm, eBPF against --no-ebpf:\n{}",
            storm::table(std::slice::from_ref(storm))
        );
    }
    for p in r.storm_problems() {
        println!("STORM PROBLEM: {p}");
    }
    for t in r.failed() {
        println!(
            "\n### FAILED {} on {}\n```\n{}\n```",
            t.name, k.release, t.detail
        );
    }
}

/// The final tables: one row per kernel, then one row per test with a column per kernel.
pub fn print_summary(reports: &[KernelReport], total: Duration) {
    println!(
        "\n## vmtest summary ({:.1} s in all)\n",
        total.as_secs_f64()
    );
    println!(
        "| kernel | booted | time | hook tiers | passed | failed | ignored | skipped (by requirement) | problems | guest panics resumed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        println!(
            "| {} | {} | {:.1} s | {} | {} | {} | {} | {} ({}) | {} | {} |",
            r.kernel.release,
            if r.booted { "yes" } else { "NO" },
            r.elapsed.as_secs_f64(),
            r.hooks_cell(),
            r.count(Status::Ok),
            r.count(Status::Failed),
            r.count(Status::Ignored),
            r.skips.len(),
            skips::by_need(&r.skips),
            r.problems.len() + r.storm_problems().len(),
            r.panics.len(),
        );
    }
    println!("\nNot run in the guests (the host runs them):");
    for (bin, why) in guest::HOST_ONLY {
        println!("- {bin}: {why}");
    }
    let storms = storms(reports);
    if !storms.is_empty() {
        println!(
            "\n### fault storm: eBPF against netlink alone\n\n{}",
            storm::table(&storms)
        );
    }
    let mut names: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.tests.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let header: Vec<&str> = reports.iter().map(|r| r.kernel.release.as_str()).collect();
    println!("\n| test | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(reports.len()));
    for name in names {
        let cells: Vec<&str> = reports
            .iter()
            .map(|r| {
                r.tests
                    .iter()
                    .find(|t| t.name == name)
                    .map_or("-", |t| t.status.as_str())
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}

/// The storm reports the kernels produced.
pub fn storms(reports: &[KernelReport]) -> Vec<StormReport> {
    reports
        .iter()
        .filter_map(|r| r.storm.as_ref()?.as_ref().ok().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Status, failure_output, hook_tiers, parse_libtest};

    const LOG: &str = "\nrunning 3 tests\ntest a ... ok\ntest b ... FAILED\n\
        test c ... ignored, needs root\n\nfailures:\n\n---- b stdout ----\nthread 'b' panicked\n\
        boom\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed; 1 ignored\n";

    #[test]
    fn reads_libtest_verdicts_and_failure_output() {
        let r = parse_libtest("watch", LOG);
        let got: Vec<_> = r.iter().map(|t| (t.name.as_str(), t.status)).collect();
        assert!(
            got == [
                ("watch::a", Status::Ok),
                ("watch::b", Status::Failed),
                ("watch::c", Status::Ignored)
            ]
        );
        assert_eq!(failure_output(LOG, "b"), "thread 'b' panicked\nboom");
    }

    #[test]
    fn reads_hook_tiers_from_doctor_json() {
        let json = r#"{"ebpf": {"loaded": true, "hooks": [
            {"hook": "port-state", "tier": "kprobe", "failures": []},
            {"hook": "join", "tier": "fentry", "failures": []}]}}"#;
        assert_eq!(
            hook_tiers(json),
            Ok(vec![
                ("port-state".into(), "kprobe".into()),
                ("join".into(), "fentry".into())
            ])
        );
        let failed = r#"{"ebpf": {"loaded": false, "error": "EPERM"}}"#;
        assert_eq!(hook_tiers(failed), Err("eBPF not loaded: EPERM".into()));
    }
}
