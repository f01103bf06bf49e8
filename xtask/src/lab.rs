//! Network-namespace labs for `bench` and `demo`: namespaces and child processes that are
//! removed when dropped and also when the run is interrupted (SIGINT, SIGTERM, SIGHUP).
//!
//! Namespaces are named `<prefix>-<pid>-<n>-<tag>` (`bgb-` for the bench, `bgd-` for the demo),
//! so several runs can share a machine, and those of runs that died without cleaning up are
//! swept away by the next one. Lab addresses come from 198.18.0.0/15 only. Nothing here touches
//! the host's own namespace.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// What must go when the run ends or is interrupted.
struct Registry {
    netns: Vec<String>,
    /// Process groups (each child leads its own).
    groups: Vec<i32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    netns: Vec::new(),
    groups: Vec::new(),
    dirs: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kills every registered process group and deletes every registered namespace and directory.
fn clean_everything(reg: &mut Registry) {
    for pgid in reg.groups.drain(..) {
        // SAFETY: signalling a process group we created; a stale id fails harmlessly.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    for ns in reg.netns.drain(..) {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
    for dir in reg.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Routes SIGINT, SIGTERM and SIGHUP to a thread that removes the lab and exits with 130.
///
/// Must be called before any other thread is started: the signals are blocked in the calling
/// thread, and threads inherit that mask, so only the cleanup thread ever receives them.
/// (Child processes do not inherit it: `std::process` resets the mask before `exec`.)
pub fn install_signal_cleanup(who: &'static str) -> Result<()> {
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

/// Runs `cmd`, failing with its stderr; returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes `<prefix>-<pid>-…` namespaces whose process no longer exists.
fn sweep_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let head = format!("{prefix}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&head)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("lab: removing namespace {name}, left behind by a run that died");
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A network namespace owned by this run; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str, tag: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            sweep_stale("bgb");
            sweep_stale("bgd");
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}-{tag}", std::process::id());
        {
            let mut reg = registry();
            reg.netns.push(name.clone());
            run(Command::new("ip").args(["netns", "add", &name]))?;
        }
        let ns = Self { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> <args>` (whitespace-separated).
    pub fn ip(&self, args: &str) -> Result<String> {
        run(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
    }

    /// Runs several `ip` commands in this namespace through one `ip -batch` process.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start ip -batch")?;
        {
            let mut stdin = child.stdin.take().context("no stdin")?;
            for l in lines {
                writeln!(stdin, "{l}")?;
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ip -n {} -batch failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs it, so
    /// the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        registry().netns.retain(|n| *n != self.name);
    }
}

/// Moves the calling thread into network namespace `name` (each thread has its own).
pub fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening namespace {name}"))?;
    // SAFETY: a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns` and returns its result. Sockets it creates
/// stay in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread in a lab namespace panicked"))?
}

/// A VM lab: namespace `host` with bridge `br0` (kernel STP on, forward delay 2 s, as libvirt
/// and NetworkManager make them), and `n` VM namespaces, each joined by a veth whose bridge end
/// is `vnetN` and whose guest end is `eth0` at 198.18.0.(N+1)/24.
pub struct VmLab {
    pub host: NetNs,
    pub vms: Vec<NetNs>,
    pub bridge: String,
}

impl VmLab {
    pub fn new(prefix: &str, tag: &str, n: usize) -> Result<Self> {
        anyhow::ensure!((1..=250).contains(&n), "a lab has 1 to 250 VMs, not {n}");
        let host = NetNs::new(prefix, tag)?;
        let bridge = "br0".to_owned();
        let mut vms = Vec::new();
        let mut lines = vec![
            format!("link add {bridge} type bridge stp_state 1 forward_delay 200"),
            format!("link set {bridge} up"),
        ];
        for i in 0..n {
            let vm = NetNs::new(prefix, &format!("{tag}vm{i}"))?;
            lines.push(format!(
                "link add vnet{i} type veth peer name eth0 netns {}",
                vm.name
            ));
            lines.push(format!("link set vnet{i} master {bridge}"));
            lines.push(format!("link set vnet{i} up"));
            vms.push(vm);
        }
        host.ip_batch(&lines)?;
        for (i, vm) in vms.iter().enumerate() {
            vm.ip_batch(&[
                format!("addr add {} dev eth0", Self::addr_cidr(i)),
                "link set eth0 up".to_owned(),
            ])?;
        }
        Ok(Self { host, vms, bridge })
    }

    /// The bridge ends, `vnet0`…
    pub fn ports(&self) -> Vec<String> {
        (0..self.vms.len()).map(|i| format!("vnet{i}")).collect()
    }

    fn addr(i: usize) -> String {
        format!("198.18.0.{}", i + 1)
    }

    fn addr_cidr(i: usize) -> String {
        format!("{}/24", Self::addr(i))
    }

    /// Sends a UDP datagram from VM `from` to VM `to` across the bridge and waits up to
    /// `timeout` for it to arrive; how long that took.
    pub fn guests_talk(&self, from: usize, to: usize, timeout: Duration) -> Result<Duration> {
        let (src, dst) = (Self::addr(from), Self::addr(to));
        let receiver_ns = self.vms.get(to).context("no such VM")?.name.clone();
        let sender_ns = self.vms.get(from).context("no such VM")?.name.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let dst_bind = dst.clone();
        let receiver = std::thread::spawn(move || -> Result<String> {
            enter_netns(&receiver_ns)?;
            let sock = std::net::UdpSocket::bind(format!("{dst_bind}:7777"))?;
            sock.set_read_timeout(Some(timeout))?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            let (n, _) = sock
                .recv_from(&mut buf)
                .context("no datagram arrived (the guests cannot talk)")?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the receiver did not start")?;
        let started = Instant::now();
        let sender = std::thread::spawn(move || -> Result<()> {
            enter_netns(&sender_ns)?;
            let sock = std::net::UdpSocket::bind(format!("{src}:0"))?;
            sock.send_to(b"hello", format!("{dst}:7777"))?;
            Ok(())
        });
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        let got = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
        anyhow::ensure!(got == "hello", "unexpected datagram {got:?}");
        Ok(started.elapsed())
    }
}

/// `GET path` from `addr` (`host:port`) inside namespace `ns`; the response body.
pub fn http_get(ns: &str, addr: &str, path: &str) -> Result<String> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    in_netns(ns, move || {
        let mut s =
            std::net::TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP header end")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "HTTP error: {head}");
        Ok(body.to_owned())
    })
}

/// Reads `reader` line by line on a thread, handing each line to `f` until it returns false.
pub fn read_lines(
    reader: impl std::io::Read + Send + 'static,
    mut f: impl FnMut(String) -> bool + Send + 'static,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if !f(line) {
                break;
            }
        }
    });
}
