//! `cargo xtask vmtest`: the agent and the integration tests on Debian's distribution kernels
//! (bullseye's 5.10, bookworm's 6.1 and the archive's 6.12), where bridge is a module, kprobes
//! exist and fentry works: everything the development machine's own kernel cannot show.
//!
//! Each kernel boots under qemu with software emulation (KVM hangs guests on these hosts)
//! through virtme-ng, over the host's root filesystem, so the binaries built here run there
//! by their host paths. The steps, each skipped when already done:
//!
//! 1. host packages (qemu, kmod, static busybox) via apt, virtme-ng via pip in a venv;
//! 2. the newest kernel package of each series: `apt-get download` (bullseye's from a private
//!    apt tree, never the host's sources), `dpkg -x` into `<tools>/kernels/`, modules linked
//!    into `/lib/modules/<release>`, `depmod`;
//! 3. the agent, the test binaries and this xtask, built on the host;
//! 4. per kernel, one VM, [`PARALLEL`] at a time with one vCPU each: `modprobe bridge`,
//!    `bridge-guard doctor`, every integration test binary, then the fault storm with and
//!    without eBPF (`storm`); results land in `target/vmtest/<release>/`;
//! 5. a report per kernel (with its skips by requirement) and a table across kernels; any
//!    failure makes the run fail.

mod guest;
mod host;
mod kernel;
mod report;
pub mod skips;
pub mod storm;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

// Submodules call `super::output`.
use crate::setup::output;

use self::{
    guest::{Build, TestBin},
    kernel::Kernel,
    report::KernelReport,
};

/// Guests booted at once. Each has one vCPU (see `guest`), and the machines this runs on have
/// two cores: two guests keep both busy without making either wait for a core.
const PARALLEL: usize = 2;

/// The package whose `tests/*.rs` binaries run in the VMs.
const TEST_PACKAGE: &str = "integration-tests";

pub struct Options {
    /// Only kernels whose series or release contains this.
    pub kernel: Option<String>,
    /// Passed to the test binaries as their name filter.
    pub filter: Option<String>,
    /// Go on with the next kernel after one fails.
    pub keep_going: bool,
    /// Bound on one VM, boot to power-off.
    pub timeout: Duration,
    /// Run the fault storm (eBPF against netlink alone) after the tests.
    pub storm: bool,
    /// Write the storm's results into docs/benchmarks.md when every kernel gave them.
    pub docs: bool,
    /// A release agent already built (`cargo xtask test` passes the one `dist` built
    /// offline: the guests then run the shipped binary, and CI builds it once).
    pub agent: Option<PathBuf>,
}

fn step(what: &str) {
    eprintln!("vmtest: {what}");
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    host::check()?;
    // Before any thread: Ctrl-C or SIGTERM then kills the guests too.
    crate::lab::install_signal_cleanup("vmtest")?;
    let tools = crate::setup::tools_dir()?;
    let mut apt = host::Apt::new(&tools);
    host::ensure_packages(&mut apt)?;
    let vng = host::ensure_virtme_ng(&tools, &mut apt)?;
    let kernels = prepare_kernels(&tools, &mut apt, opts.kernel.as_deref())?;
    let build = build_all(opts.agent.as_deref())?;
    step(&format!(
        "ready after {:.1} s; {} kernel(s), {PARALLEL} at a time",
        started.elapsed().as_secs_f64(),
        kernels.len()
    ));
    let mut reports = run_kernels(&vng, kernels, &build, opts)?;
    reports.sort_by_key(|r| {
        kernel::SERIES
            .iter()
            .position(|s| s.name == r.kernel.series.name)
    });
    report::print_summary(&reports, started.elapsed());
    write_docs(&reports, opts)?;
    let failures: usize = reports.iter().map(KernelReport::failures).sum();
    if failures > 0 {
        bail!("{failures} failure(s) across the kernels; see the report above");
    }
    Ok(())
}

/// The storm's results into docs/benchmarks.md, from a run over every series only, so the
/// section always compares the whole matrix.
fn write_docs(reports: &[KernelReport], opts: &Options) -> Result<()> {
    let storms = report::storms(reports);
    if !opts.docs || opts.kernel.is_some() || storms.len() != kernel::SERIES.len() {
        return Ok(());
    }
    let docs = crate::workspace_root().join("docs/benchmarks.md");
    let date = output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let when = format!("{}, {} kernels", date.trim(), storms.len());
    storm::write_docs(&docs, &storms, &when)?;
    step(&format!(
        "wrote the fault storm's results into {}",
        docs.display()
    ));
    Ok(())
}

/// Resolves, fetches and installs the selected kernels.
fn prepare_kernels(tools: &Path, apt: &mut host::Apt, filter: Option<&str>) -> Result<Vec<Kernel>> {
    let mut kernels = Vec::new();
    for series in kernel::SERIES {
        let resolved = kernel::resolve(apt, series);
        let release = resolved.as_ref().ok().map(|k| k.release.as_str());
        if !kernel::selected(filter, series.name, release) {
            continue;
        }
        let mut k = resolved?;
        let installed = kernel::fetch(tools, apt, &mut k)?;
        kernel::link_modules(&k, &installed)?;
        kernels.push(k);
    }
    if kernels.is_empty() {
        bail!(
            "--kernel {} matches none of the series {}",
            filter.unwrap_or_default(),
            kernel::series_names()
        );
    }
    Ok(kernels)
}

/// The agent (`cargo xtask build --release`) and the integration test binaries.
///
/// The optimised agent: under TCG an unoptimised one spends most of every start-up parsing
/// the kernel's BTF (tens of seconds per agent, and every test starts one), and the storm's
/// times would measure the debug build's decoding rather than the path from fault to repair.
fn build_all(agent: Option<&Path>) -> Result<Build> {
    let agent = match agent {
        Some(a) => {
            step(&format!(
                "the agent: {} (release); building the test binaries",
                a.display()
            ));
            a.to_path_buf()
        }
        None => {
            step("building the agent (release) and the test binaries");
            crate::build(true)?
        }
    };
    let out = crate::cargo()
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed: {}", out.status);
    }
    let tests = test_binaries(&String::from_utf8_lossy(&out.stdout))?;
    if tests.is_empty() {
        bail!("cargo built no test binary of the {TEST_PACKAGE} package");
    }
    // The guest runs the fault storm with this very xtask.
    let xtask = std::env::current_exe().context("cannot find xtask's own binary")?;
    snapshot(&Build {
        agent,
        xtask,
        tests,
    })
}

/// Copies the binaries into `<target>/vmtest/bin/`: others build in this workspace while the
/// VMs run (for many minutes), and every kernel must run the same agent and tests.
fn snapshot(build: &Build) -> Result<Build> {
    let dir = crate::target_dir().join("vmtest/bin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = |from: &Path, name: &str| -> Result<PathBuf> {
        let to = dir.join(name);
        std::fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(to)
    };
    let agent = copy(&build.agent, "bridge-guard")?;
    let xtask = copy(&build.xtask, "xtask")?;
    let tests = build
        .tests
        .iter()
        .map(|t| {
            Ok(TestBin {
                name: t.name.clone(),
                path: copy(&t.path, &format!("test-{}", t.name))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Build {
        agent,
        xtask,
        tests,
    })
}

/// A package's name from a cargo package id: `path+file:///…/tests#integration-tests@0.1.0`,
/// `path+file:///…/xtask#0.1.0` (the name is the directory), or the older
/// `integration-tests 0.1.0 (path+file:///…)`.
fn package_name(id: &str) -> Option<&str> {
    match id.split_once('#') {
        Some((url, fragment)) => match fragment.split_once('@') {
            Some((name, _)) => Some(name),
            None => url.rsplit('/').next(),
        },
        None => id.split_whitespace().next(),
    }
}

/// The `test` targets of [`TEST_PACKAGE`] among cargo's JSON messages.
fn test_binaries(messages: &str) -> Result<Vec<TestBin>> {
    let mut bins = Vec::new();
    for line in messages.lines().filter(|l| l.contains("compiler-artifact")) {
        let msg: Value = serde_json::from_str(line)
            .with_context(|| format!("reading cargo's message {line}"))?;
        let target = &msg["target"];
        let is_test = target["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        let ours = msg["package_id"].as_str().and_then(package_name) == Some(TEST_PACKAGE);
        let (Some(name), Some(exe)) = (target["name"].as_str(), msg["executable"].as_str()) else {
            continue;
        };
        if ours && is_test {
            bins.push(TestBin {
                name: name.to_owned(),
                path: exe.into(),
            });
        }
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    bins.dedup_by(|a, b| a.name == b.name);
    Ok(bins)
}

/// Boots the kernels [`PARALLEL`] at a time, printing each one's report as it ends. With
/// `--fail-fast`, no new guest starts after a failing one (those running finish).
fn run_kernels(
    vng: &Path,
    kernels: Vec<Kernel>,
    build: &Build,
    opts: &Options,
) -> Result<Vec<KernelReport>> {
    let mut queue = kernels.into_iter();
    let mut reports = Vec::new();
    let mut failed = false;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        let mut running = 0;
        loop {
            while running < PARALLEL && !failed {
                let Some(k) = queue.next() else { break };
                let tx = tx.clone();
                scope.spawn(move || {
                    let _ = tx.send(run_kernel(vng, k, build, opts));
                });
                running += 1;
            }
            if running == 0 {
                break;
            }
            let r = rx.recv().context("a guest's thread vanished")??;
            running -= 1;
            report::print_kernel(&r);
            if r.failures() > 0 && !opts.keep_going && !failed {
                step("no further kernel after this failure (--fail-fast)");
                failed = true;
            }
            reports.push(r);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(reports)
}

/// Boots of one guest at most. A guest kernel that panics before the end is booted once more
/// and resumes after the steps it finished: TCG has been seen to corrupt a guest (a double
/// fault inside the slab allocator, in a process and path nowhere near bridge-guard's
/// programs), once in a few runs. The panic stays in the report, with its console.
const BOOTS: usize = 2;

/// The lines of a guest console that tell what the panic was.
fn panic_excerpt(console: &str) -> Option<String> {
    if !console.contains("Kernel panic") {
        return None;
    }
    let lines: Vec<&str> = console.lines().collect();
    let start = lines
        .iter()
        .position(|l| {
            ["Oops", "BUG:", "PANIC", "Kernel panic"]
                .iter()
                .any(|m| l.contains(m))
        })
        .unwrap_or(0);
    Some(
        lines[start..]
            .iter()
            .take(16)
            .copied()
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// One VM for `k`, in a fresh `<target>/vmtest/<release>/`.
fn run_kernel(vng: &Path, k: Kernel, build: &Build, opts: &Options) -> Result<KernelReport> {
    let out = crate::target_dir().join("vmtest").join(&k.release);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("run.sh"), guest::script(&out, &k, build, opts))?;
    let console = out.join("console.log");
    let mut panics = Vec::new();
    let mut elapsed = Duration::ZERO;
    let boot = loop {
        step(&format!(
            "[{}] booting under qemu (TCG); console in {}",
            k.release,
            console.display()
        ));
        let boot = guest::boot(vng, &k, &out, opts.timeout)?;
        elapsed += boot.elapsed;
        step(&format!(
            "[{}] VM gone after {:.1} s",
            k.release,
            boot.elapsed.as_secs_f64()
        ));
        let unfinished = !out.join("done").exists() && boot.timed_out.is_none();
        let excerpt = unfinished
            .then(|| std::fs::read_to_string(&console).ok())
            .flatten()
            .and_then(|c| panic_excerpt(&c));
        match excerpt {
            Some(excerpt) if panics.len() + 1 < BOOTS => {
                let kept = out.join(format!("console-panic-{}.log", panics.len() + 1));
                std::fs::rename(&console, &kept)
                    .with_context(|| format!("keeping {}", kept.display()))?;
                step(&format!(
                    "[{}] the guest kernel panicked (console kept in {}): booting again to \
                     resume after the finished steps",
                    k.release,
                    kept.display()
                ));
                panics.push(excerpt);
            }
            _ => break boot,
        }
    };
    let boot = guest::Boot { elapsed, ..boot };
    Ok(report::collect(k, &out, &build.tests, &boot, panics))
}

#[cfg(test)]
mod tests {
    use super::{package_name, panic_excerpt, test_binaries};

    #[test]
    fn a_panic_is_quoted_from_its_first_line() {
        let console = "[1] boot\n[2] traps: PANIC: double fault\n[3] RIP: x\n[4] Kernel panic - not syncing\n";
        let e = panic_excerpt(console).expect("a panic");
        assert!(e.starts_with("[2] traps: PANIC"), "{e}");
        assert!(e.ends_with("not syncing"), "{e}");
        assert!(panic_excerpt("[1] boot\n[2] done\n").is_none());
    }

    #[test]
    fn reads_package_names_in_every_id_format() {
        let new = "path+file:///w/tests#integration-tests@0.1.0";
        assert_eq!(package_name(new), Some("integration-tests"));
        assert_eq!(package_name("path+file:///w/xtask#0.1.0"), Some("xtask"));
        let old = "integration-tests 0.1.0 (path+file:///w/tests)";
        assert_eq!(package_name(old), Some("integration-tests"));
    }

    #[test]
    fn picks_the_test_targets_of_the_integration_package() -> anyhow::Result<()> {
        let messages = [
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#integration-tests@0.1.0","target":{"kind":["test"],"name":"watch"},"executable":"/w/target/debug/deps/watch-1"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#integration-tests@0.1.0","target":{"kind":["lib"],"name":"integration_tests"},"executable":"/w/target/debug/deps/it-2"}"#,
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w/bridge-guard#0.1.0","target":{"kind":["test"],"name":"cli"},"executable":"/w/target/debug/deps/cli-3"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        let bins = test_binaries(&messages)?;
        assert_eq!(bins.len(), 1);
        assert_eq!(bins[0].name, "watch");
        assert_eq!(bins[0].path.to_str(), Some("/w/target/debug/deps/watch-1"));
        Ok(())
    }
}
