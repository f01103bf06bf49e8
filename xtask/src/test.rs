//! `cargo xtask test`: every layer of the suite, each timed, so a slow CI run says where its
//! time went.
//!
//! 1. the test tools (apt) and the agent's debug build;
//! 2. the Debian root the systemd tests boot (debootstrap, cached);
//! 3. `cargo test --workspace` on the host, with a tally of skips by requirement;
//! 4. the offline release build (`dist`), CI's proof that a sandboxed build works;
//! 5. the VM matrix.
//!
//! Every layer runs even if an earlier one failed (one report of everything that broke), but
//! for the set-up steps the rest depends on.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{cargo, dist, setup, systemd_test, vmtest};

/// How long each stage took, and whether it passed.
#[derive(Default)]
struct Stages(Vec<(&'static str, Duration, bool)>);

impl Stages {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("xtask: == {name}");
        let start = Instant::now();
        let r = f();
        let took = start.elapsed();
        eprintln!(
            "xtask: == {name}: {} in {}",
            if r.is_ok() { "done" } else { "FAILED" },
            minutes(took)
        );
        self.0.push((name, took, r.is_ok()));
        r
    }

    fn print(&self) {
        let total: Duration = self.0.iter().map(|(_, d, _)| *d).sum();
        eprintln!("\nxtask: time by stage");
        for (name, took, ok) in &self.0 {
            let verdict = if *ok { "ok" } else { "FAILED" };
            eprintln!("  {name:<28} {:>9}  {verdict}", minutes(*took));
        }
        eprintln!("  {:<28} {:>9}", "total", minutes(total));
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

pub fn run(filter: Option<String>, no_vm: bool) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the test suite needs root: it creates network namespaces and loads eBPF \
             programs. Run `sudo -E cargo xtask test`"
        );
    }
    let mut stages = Stages::default();
    let result = stages_run(&mut stages, filter, no_vm);
    stages.print();
    result
}

fn stages_run(stages: &mut Stages, filter: Option<String>, no_vm: bool) -> Result<()> {
    stages.time("test tools", setup::ensure_test_tools)?;
    let bin = stages.time("agent build", || crate::build(false))?;
    let container_root = stages.time("container root", systemd_test::ensure_root)?;

    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .env("BRIDGE_GUARD_BIN", &bin)
        .env(systemd_test::ROOT_ENV, &container_root)
        .env("BRIDGE_GUARD_ENV", "host")
        .env("BRIDGE_GUARD_EXPECT", vmtest::skips::HOST_EXPECT);
    if let Some(f) = &filter {
        cmd.arg(f);
    }
    // Output of passing tests too: a test that skips says why, and that must show.
    cmd.args(["--", "--show-output"]);
    let host = stages.time("host tests", || crate::run_tallying_skips(&mut cmd));

    // Not for a filtered run, which asked for some tests only.
    let dist = if filter.is_none() {
        stages.time("offline release build", dist::run).map(Some)
    } else {
        eprintln!("xtask: a filter was given: skipping `cargo xtask dist`");
        Ok(None)
    };
    // The guests run the binary `dist` built; without one, the matrix builds its own.
    let agent = dist.as_ref().ok().cloned().flatten();
    let vm = if no_vm {
        eprintln!("xtask: --no-vm: skipping the VM matrix");
        Ok(())
    } else {
        stages.time("VM matrix", || {
            vmtest::run(&vmtest::Options {
                kernel: None,
                docs: filter.is_none(),
                filter,
                keep_going: true,
                timeout: Duration::from_secs(1800),
                storm: true,
                agent,
            })
        })
    };
    let failed: Vec<String> = [
        ("host tests", host),
        ("cargo xtask dist", dist.map(drop)),
        ("VM matrix", vm),
    ]
    .into_iter()
    .filter_map(|(what, r)| r.err().map(|e| format!("{what} failed: {e:#}")))
    .collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}
