//! `cargo xtask vmtest`: the agent and the integration tests on Debian's distribution kernels
//! (bookworm's 6.1 and the archive's 6.12), where bridge is a module, kprobes exist and fentry
//! works: everything the development machine's own kernel cannot show.
//!
//! Each kernel boots under qemu with software emulation (KVM hangs guests on these hosts)
//! through virtme-ng, over the host's root filesystem, so the binaries built here run there
//! by their host paths. The steps, each skipped when already done:
//!
//! 1. host packages (qemu, kmod, static busybox) via apt, virtme-ng via pip in a venv;
//! 2. the newest kernel package of each series: `apt-get download`, `dpkg -x` into
//!    `<tools>/kernels/`, modules linked into `/lib/modules/<release>`, `depmod`;
//! 3. the agent and the test binaries, built on the host;
//! 4. per kernel, one VM: `modprobe bridge`, `bridge-guard doctor`, every integration test
//!    binary; results land in `target/vmtest/<release>/`;
//! 5. a report per kernel and a table across kernels; any failure makes the run fail.

mod guest;
mod host;
mod json;
mod kernel;
mod report;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

// Submodules call `super::output`.
use crate::setup::output;

use self::{
    guest::{Build, TestBin},
    json::Value,
    kernel::Kernel,
    report::KernelReport,
};

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
}

fn step(what: &str) {
    eprintln!("vmtest: {what}");
}

pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    host::check()?;
    let tools = crate::setup::tools_dir()?;
    let mut apt = host::Apt::default();
    host::ensure_packages(&mut apt)?;
    let vng = host::ensure_virtme_ng(&tools, &mut apt)?;
    let kernels = prepare_kernels(&tools, &mut apt, opts.kernel.as_deref())?;
    let build = build_all()?;
    step(&format!(
        "ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let mut reports = Vec::new();
    for k in kernels {
        let r = run_kernel(&vng, k, &build, opts)?;
        report::print_kernel(&r);
        let failed = r.failures() > 0;
        reports.push(r);
        if failed && !opts.keep_going {
            step("stopping after the first failing kernel (--fail-fast)");
            break;
        }
    }
    report::print_summary(&reports, started.elapsed());
    let failures: usize = reports.iter().map(KernelReport::failures).sum();
    if failures > 0 {
        bail!("{failures} failure(s) across the kernels; see the report above");
    }
    Ok(())
}

/// Resolves, fetches and installs the selected kernels.
fn prepare_kernels(tools: &Path, apt: &mut host::Apt, filter: Option<&str>) -> Result<Vec<Kernel>> {
    let mut kernels = Vec::new();
    for &series in kernel::SERIES {
        let resolved = kernel::resolve(apt, series);
        let release = resolved.as_ref().ok().map(|k| k.release.as_str());
        if !kernel::selected(filter, series, release) {
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
            kernel::SERIES.join(", ")
        );
    }
    Ok(kernels)
}

/// The agent (`cargo xtask build`'s debug build) and the integration test binaries.
fn build_all() -> Result<Build> {
    step("building the agent and the test binaries");
    let agent = crate::build(false)?;
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
    snapshot(&Build { agent, tests })
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
    Ok(Build { agent, tests })
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

fn str_at(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str)
}

/// The `test` targets of [`TEST_PACKAGE`] among cargo's JSON messages.
fn test_binaries(messages: &str) -> Result<Vec<TestBin>> {
    let mut bins = Vec::new();
    for line in messages.lines().filter(|l| l.contains("compiler-artifact")) {
        let msg = Value::parse(line).with_context(|| format!("reading cargo's message {line}"))?;
        let target = msg.get("target");
        let is_test = target
            .and_then(|t| t.get("kind"))
            .is_some_and(|k| k.items().iter().any(|k| k.as_str() == Some("test")));
        let ours = str_at(msg.get("package_id")).and_then(package_name) == Some(TEST_PACKAGE);
        let (Some(name), Some(exe)) = (
            str_at(target.and_then(|t| t.get("name"))),
            str_at(msg.get("executable")),
        ) else {
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

/// One VM for `k`, in a fresh `<target>/vmtest/<release>/`.
fn run_kernel(vng: &Path, k: Kernel, build: &Build, opts: &Options) -> Result<KernelReport> {
    let out = crate::target_dir().join("vmtest").join(&k.release);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("run.sh"),
        guest::script(&out, build, opts.filter.as_deref()),
    )?;
    step(&format!(
        "[{}] booting under qemu (TCG); console in {}",
        k.release,
        out.join("console.log").display()
    ));
    let boot = guest::boot(vng, &k, &out, opts.timeout)?;
    step(&format!(
        "[{}] VM gone after {:.1} s",
        k.release,
        boot.elapsed.as_secs_f64()
    ));
    Ok(report::collect(k, &out, &build.tests, &boot))
}

#[cfg(test)]
mod tests {
    use super::{package_name, test_binaries};

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
