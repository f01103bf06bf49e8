//! One VM: the script the guest runs, and `vng` booting a kernel over the host's root
//! filesystem, bounded by a timeout and echoing the guest's progress lines as they come.
//!
//! Results travel through files, not the console: the guest writes every log and exit code
//! into a per-kernel directory shared read-write (`--rwdir`). The console mixes kernel messages
//! into the output, and `vng`'s own exit code is always 255 on these hosts: without udev in
//! the guest there is no `/dev/virtio-ports/virtme.ret` for the script's status.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead as _, BufReader, PipeReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{kernel::Kernel, step};
use crate::lab::Proc;

/// Prefix of the lines the guest script prints for the host to show live.
const PROGRESS: &str = "vmtest-guest: ";
/// Guest-side bound for `doctor`, and for each test binary (the tests bound their own waits;
/// this catches a binary that hangs outside them).
const DOCTOR_SECS: u32 = 300;
const TEST_BINARY_SECS: u32 = 900;
const STORM_SECS: u32 = 900;
const GUEST_MEMORY: &str = "2G";
/// Host directories the guest gets a private writable overlay of, beyond virtme-ng's own
/// (/etc, /usr, /var, /tmp, ...): the shared root is read-only, and nix in the guest tries to
/// remount a read-only /nix/store writable, which 9p refuses (EINVAL).
const EXTRA_OVERLAYS: &[&str] = &["/nix"];

/// An integration test binary (one `tests/tests/*.rs`).
pub struct TestBin {
    pub name: String,
    pub path: PathBuf,
}

/// What runs in the guest: the agent, the test binaries and xtask (for the fault storm), all
/// built on the host.
pub struct Build {
    pub agent: PathBuf,
    pub xtask: PathBuf,
    pub tests: Vec<TestBin>,
}

/// Test binaries that do not run in the guests, and why: they need what only the host has, or
/// prove nothing that depends on the kernel, and would only slow the guests (TCG) down.
/// Every other binary runs there, including ones added later.
pub const HOST_ONLY: &[(&str, &str)] = &[
    (
        "libvirt",
        "runs libvirtd with its own qemu guests: nested TCG inside a TCG guest",
    ),
    ("systemd", "boots systemd in a container of its own"),
    (
        "monitoring",
        "promtool on the shipped alert rules and dashboard: no kernel involved",
    ),
    (
        "metrics",
        "the metrics server's limits (file descriptors, slow clients): user space, the same on \
         every kernel",
    ),
    (
        "status",
        "the status command reading the agent's state file: user space",
    ),
    (
        "doctor_path",
        "doctor --path reads routes, firewall rules and sysctls through user-space tools (ip, \
         nft, iptables, dnsmasq): the same logic on every kernel, and 90-190 s per guest under \
         emulation",
    ),
    (
        "churn",
        "the agent's own bounds under floods and 10,000 taps (rates, queues, memory): the \
         guests' fault storm covers back-to-back faults on each kernel, and emulation is too \
         slow for churn at any size that proves something",
    ),
];

/// Requirements (`integration_tests::Need`) every guest meets, so a test that skips on one of
/// them fails there: root, the tools `cargo xtask test` installs (the guest shares the host's
/// root filesystem), bridge as a module, and a kprobe-or-better tier for every hook. Each
/// series adds its own (`kernel::Series::expect`).
const GUEST_EXPECT: &[&str] = &[
    "root",
    "tool-*",
    "bridge-module",
    "kprobe-port-state",
    "kprobe-join",
    "kprobe-leave",
    "kprobe-stp",
];

/// `BRIDGE_GUARD_EXPECT` for `k`'s guest.
pub fn expectations(k: &Kernel) -> String {
    GUEST_EXPECT
        .iter()
        .chain(k.series.expect)
        .copied()
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether `bin` runs in the guests (see [`HOST_ONLY`]).
pub fn runs_in_guest(bin: &TestBin) -> bool {
    !HOST_ONLY.iter().any(|(name, _)| *name == bin.name)
}

/// How the VM ended, seen from the host.
pub struct Boot {
    pub elapsed: Duration,
    pub status: ExitStatus,
    pub timed_out: Option<Duration>,
}

/// `'…'` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn quote_path(p: &Path) -> String {
    sh_quote(&p.to_string_lossy())
}

/// The guest script. Every step leaves `<step>.log` and `<step>.rc` in `out`; `booted` comes
/// first and `done` last, so the host can tell "never booted" from "died half-way".
pub fn script(out: &Path, k: &Kernel, build: &Build, opts: &super::Options) -> String {
    let mut s = String::new();
    let agent = quote_path(&build.agent);
    let _ = write!(
        s,
        r#"#!/bin/sh
# Written by `cargo xtask vmtest`; runs as root inside the guest.
set -u
out={out}
note() {{ echo "{PROGRESS}$*"; }}
note "booted $(uname -r)"
uname -r > "$out/booted"
export NO_COLOR=1 BRIDGE_GUARD_BIN={agent} BRIDGE_GUARD_ENV={env} BRIDGE_GUARD_EXPECT={expect}
note "modprobe bridge"
modprobe bridge > "$out/modprobe.log" 2>&1; echo $? > "$out/modprobe.rc"
# tun is a module here and nothing made /dev/net/tun (a distribution boot creates it with
# `kmod static-nodes`, and opening it loads the module); `ip tuntap` in the tests needs it.
modprobe tun > "$out/tun.log" 2>&1; echo $? > "$out/tun.rc"
# The tests make namespaces with ip netns, which needs a writable /run/netns.
{{ ip netns add vmtest-probe && ip netns del vmtest-probe; }} > "$out/netns.log" 2>&1
echo $? > "$out/netns.rc"
# Steps a previous boot of this guest finished (it was resumed after a kernel panic) are
# not run again; each step's .rc file is written last.
if [ ! -e "$out/doctor-json.rc" ]; then
note "bridge-guard doctor"
timeout -k 10 {DOCTOR_SECS} {agent} doctor > "$out/doctor.log" 2>&1; echo $? > "$out/doctor.rc"
timeout -k 10 {DOCTOR_SECS} {agent} doctor --json > "$out/doctor.json" 2> "$out/doctor-json.log"
echo $? > "$out/doctor-json.rc"
fi
"#,
        out = quote_path(out),
        env = sh_quote(&k.release),
        expect = sh_quote(&expectations(k)),
    );
    let filter = opts
        .filter
        .as_deref()
        .map(|f| format!(" {}", sh_quote(f)))
        .unwrap_or_default();
    for t in build.tests.iter().filter(|t| runs_in_guest(t)) {
        let name = &t.name;
        let _ = write!(
            s,
            r#"if [ ! -e "$out/test-{name}.rc" ]; then
note "test binary {name}"
timeout -k 10 {TEST_BINARY_SECS} {bin}{filter} --show-output > "$out/test-{name}.log" 2>&1
echo $? > "$out/test-{name}.rc"
note "{name}: $(grep '^test result' "$out/test-{name}.log" || echo "exit $(cat "$out/test-{name}.rc")")"
fi
"#,
            bin = quote_path(&t.path),
        );
    }
    if opts.storm {
        let _ = write!(
            s,
            r#"if [ ! -e "$out/storm.rc" ]; then
note "fault storm, with eBPF and with --no-ebpf"
timeout -k 10 {STORM_SECS} {xtask} vmtest-storm --agent {agent} --out "$out/storm.json" > "$out/storm.log" 2>&1
echo $? > "$out/storm.rc"
note "storm: $(tail -n 1 "$out/storm.log")"
fi
"#,
            xtask = quote_path(&build.xtask),
        );
    }
    s.push_str("touch \"$out/done\"\nnote done\n");
    s
}

/// `vng` for one kernel. `--force-9p`: bookworm's qemu ships the old C virtiofsd, whose
/// arguments virtme-ng no longer speaks; it would retry it before falling back to 9p anyway.
/// `--verbose`: without it the console goes to /dev/null, and so does the script's output.
fn vng_command(vng_bin: &Path, k: &Kernel, out: &Path) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![vng_bin.to_path_buf()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(vng_bin.join("vng"));
    cmd.current_dir(crate::workspace_root())
        .env("PATH", std::env::join_paths(dirs).unwrap_or(path))
        .args(["-r", &k.release, "--disable-kvm", "--force-9p"])
        .args(["--user", "root", "--verbose", "--memory", GUEST_MEMORY])
        // One vCPU: with several, TCG can run a stale int3 from the kernel's live patching of
        // tracepoint sites (text_poke_bp), which our tp_btf programs trigger on every
        // attach/detach; seen once as an int3 oops in call_timer_fn on 6.12.
        .args(["--cpus", "1"])
        .arg(format!("--rwdir={}", out.display()))
        .args(
            EXTRA_OVERLAYS
                .iter()
                .filter(|d| Path::new(d).is_dir())
                .map(|d| format!("--overlay-rwdir={d}")),
        )
        .arg("--")
        .arg(format!("sh {}", quote_path(&out.join("run.sh"))));
    cmd
}

/// Copies the console into `console.log` and shows the guest's progress lines.
fn stream_console(console: PipeReader, log: &mut File, label: &str) {
    let mut reader = BufReader::new(console);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let _ = log.write_all(&line);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if let Some(rest) = text.strip_prefix(PROGRESS) {
            step(&format!("[{label}] {rest}"));
        } else if text.contains("Kernel panic") {
            step(&format!("[{label}] {text}"));
        }
        line.clear();
    }
}

/// Kills the whole process group of `vng` (virtme-run, qemu): they were started by us, in a
/// group of their own.
fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory effects; the group is the one we created for vng.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// Boots `k` with the script at `<out>/run.sh`; returns when the VM is gone or `timeout`
/// passed (then it is killed).
pub fn boot(vng_bin: &Path, k: &Kernel, out: &Path, timeout: Duration) -> Result<Boot> {
    let mut log = File::create(out.join("console.log"))?;
    let (reader, writer) = std::io::pipe()?;
    let mut cmd = vng_command(vng_bin, k, out);
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let started = Instant::now();
    // A group of its own (virtme-run, qemu), killed when it is dropped and when xtask is
    // interrupted (`lab::install_signal_cleanup`): no guest outlives the run.
    let mut vm = Proc::spawn(&mut cmd)?;
    // The Command keeps copies of the pipe's write end; the console reader sees EOF only once
    // every copy is closed.
    drop(cmd);
    let pid = vm.pid();
    let label = k.release.clone();
    let console = std::thread::spawn(move || stream_console(reader, &mut log, &label));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.child.wait());
        // Whatever vng left running in its group goes with it.
        drop(vm);
    });
    let (status, timed_out) = match rx.recv_timeout(timeout) {
        Ok(status) => (status?, None),
        Err(_) => {
            step(&format!(
                "[{}] no result after {timeout:?}: killing the VM",
                k.release
            ));
            kill_group(pid);
            (rx.recv().context("vng waiter vanished")??, Some(timeout))
        }
    };
    let _ = console.join();
    Ok(Boot {
        elapsed: started.elapsed(),
        status,
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
