//! Labs for `bench` and `demo`: the namespaces of [`netlab`], plus child processes and
//! directories, all removed when dropped and also when the run is interrupted (SIGINT, SIGTERM,
//! SIGHUP).
//!
//! Namespace prefixes are `bgb` for the bench and `bgd` for the demo (the tests use `bgt`), so
//! several runs can share a machine, and those of runs that died without cleaning up are swept
//! away by the next one.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};
pub use netlab::{NetNs, VmLab, enter_netns, http_get, in_netns, read_lines};

/// The namespace prefixes of `bench` and `demo`: each sweeps the other's dead runs too.
const PREFIXES: [&str; 2] = ["bgb", "bgd"];

/// What must go when the run ends or is interrupted, besides netlab's namespaces.
struct Registry {
    /// Process groups (each child leads its own).
    groups: Vec<i32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    groups: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kills every registered process group and deletes every lab namespace and registered
/// directory.
fn clean_everything(reg: &mut Registry) {
    for pgid in reg.groups.drain(..) {
        // SAFETY: signalling a process group we created; a stale id fails harmlessly.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    netlab::delete_all_before_exit();
    for dir in reg.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Routes SIGINT, SIGTERM and SIGHUP to a thread that removes the lab and exits with 130.
///
/// Must be called before any other thread is started: the signals are blocked in the calling
/// thread, and threads inherit that mask, so only the cleanup thread ever receives them.
/// (Child processes do not inherit it: `std::process` resets the mask before `exec`.)
///
/// Also sweeps away the namespaces of dead bench and demo runs.
pub fn install_signal_cleanup(who: &'static str) -> Result<()> {
    for prefix in PREFIXES {
        netlab::sweep_stale(prefix);
    }
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    };
    // SAFETY: `set` is a valid, initialised signal set.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!(
            "cannot block SIGINT/SIGTERM: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            eprintln!("\n{who}: interrupted (signal {sig}): removing the lab");
            // Held until exit, so nothing new is registered (and created) meanwhile.
            let mut reg = registry();
            clean_everything(&mut reg);
            std::process::exit(130);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// A temporary directory removed on drop (and on interruption).
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str, tag: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), prefix, tag)
    }

    /// On tmpfs (`/dev/shm`) where there is one: where an agent's state goes, as `/run` is
    /// tmpfs on the machines it runs on.
    pub fn on_tmpfs(prefix: &str, tag: &str) -> Result<Self> {
        let shm = Path::new("/dev/shm");
        Self::new_in(
            if shm.is_dir() { shm } else { Path::new("/run") },
            prefix,
            tag,
        )
    }

    fn new_in(base: &Path, prefix: &str, tag: &str) -> Result<Self> {
        let path = base.join(format!("{prefix}-{}-{tag}", std::process::id()));
        registry().dirs.push(path.clone());
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        registry().dirs.retain(|d| *d != self.path);
    }
}

/// A child process leading its own process group: the whole group is killed on drop (and on
/// interruption), so pipelines such as the shell guard go with it.
pub struct Proc {
    pub child: Child,
    pgid: i32,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        cmd.process_group(0);
        // Registered under the lock before the child exists, so an interruption cannot miss it.
        let mut reg = registry();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let pgid = i32::try_from(child.id()).context("pid out of range")?;
        reg.groups.push(pgid);
        Ok(Self { child, pgid })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every live process of the group (the child and what it started).
    pub fn group_pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                crate::bench::stats::proc_stat(*pid)
                    .is_some_and(|s| i64::from(s.pgrp) == i64::from(self.pgid))
            })
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this child leads.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        registry().groups.retain(|g| *g != self.pgid);
    }
}
