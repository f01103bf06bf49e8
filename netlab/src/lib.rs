//! Network-namespace labs shared by the integration tests and `cargo xtask bench`/`demo`:
//! namespaces deleted on drop, a VM lab around a kernel-STP bridge, and ways to act inside a
//! namespace from this process.
//!
//! Namespaces are named `<prefix>-<pid>-<n>-<tag>`. Each user has its own prefix (`bgt` for
//! the tests, `bgb` for the bench, `bgd` for the demo), so that several runs can share a
//! machine and sweeping the namespaces of dead runs never deletes another user's. Lab
//! addresses come from 198.18.0.0/15 only. Nothing here touches the host's own namespace.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

pub mod libvirt;

/// Namespaces this process created and has not deleted yet, for [`delete_all_before_exit`].
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<String>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Deletes every namespace this process still owns, for a process about to exit on a signal.
/// Creating or dropping a namespace blocks from then on, so none is made after the sweep.
pub fn delete_all_before_exit() {
    let mut live = live();
    for ns in live.drain(..) {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    }
    // Held until the process exits.
    std::mem::forget(live);
}

/// Runs `cmd`, failing with its stderr; returns its stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        // On a line of its own: apt's and rustup's run to several lines.
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pid in a namespace name `<prefix>-<pid>-…`, if it is one of `prefix`'s.
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Deletes `<prefix>-<pid>-…` namespaces whose process no longer exists (killed before it
/// could clean up). [`NetNs::new`] does this once per prefix.
pub fn sweep_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name, prefix) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("netlab: removing namespace {name}, left behind by a process that died");
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Sweeps `prefix` the first time this process uses it; later callers wait for that sweep.
fn sweep_once(prefix: &str) {
    static SWEPT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut swept = SWEPT.lock().unwrap_or_else(PoisonError::into_inner);
    if !swept.iter().any(|p| p == prefix) {
        sweep_stale(prefix);
        swept.push(prefix.to_owned());
    }
}

/// `ip` lines that add bridge `name` with kernel STP on and the shortest forward delay the
/// kernel allows (2 s, as libvirt and NetworkManager make them), and set it up.
fn stp_bridge_lines(name: &str) -> [String; 2] {
    [
        format!("link add {name} type bridge stp_state 1 forward_delay 200"),
        format!("link set {name} up"),
    ]
}

/// A network namespace owned by this process; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<n>-<tag>` with `lo` up. `prefix` has no `-`, so that it
    /// never matches another user's names.
    pub fn new(prefix: &str, tag: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        ensure!(
            !prefix.is_empty() && !prefix.contains('-'),
            "namespace prefix {prefix:?} must be non-empty and without '-'"
        );
        sweep_once(prefix);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}-{tag}", std::process::id());
        {
            // Registered before it exists, so that an interruption cannot miss it.
            let mut live = live();
            live.push(name.clone());
            if let Err(e) = run(Command::new("ip").args(["netns", "add", &name])) {
                live.retain(|n| *n != name);
                return Err(e);
            }
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

    /// The namespace's inode: what the kernel reports as `net->ns.inum`.
    pub fn inode(&self) -> Result<u32> {
        let ino = std::fs::metadata(format!("/run/netns/{}", self.name))?.ino();
        Ok(u32::try_from(ino)?)
    }

    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&format!("-j link show dev {dev}"))?;
        let v: Value = serde_json::from_str(&out)?;
        v[0]["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("no ifindex for {dev} in {out}"))
    }

    /// A bridge with kernel STP on and forward delay 2 s, up.
    pub fn stp_bridge(&self, name: &str) -> Result<()> {
        self.ip_batch(&stp_bridge_lines(name))
    }

    /// A veth pair `port`/`peer` with `port` enslaved to `bridge`, both ends up: a VM's tap as
    /// seen from the bridge, with the guest end kept in this namespace.
    pub fn veth_port(&self, bridge: &str, port: &str, peer: &str) -> Result<()> {
        self.ip_batch(&[
            format!("link add {port} type veth peer name {peer}"),
            format!("link set {port} master {bridge}"),
            format!("link set {port} up"),
            format!("link set {peer} up"),
        ])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        live().retain(|n| *n != self.name);
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

/// A VM lab: namespace `host` with bridge `br0` (kernel STP on, forward delay 2 s), and `n`
/// VM namespaces, each joined by a veth whose bridge end is `vnetN` and whose guest end is
/// `eth0` at 198.18.0.(N+1)/24.
pub struct VmLab {
    pub host: NetNs,
    pub vms: Vec<NetNs>,
    pub bridge: String,
}

impl VmLab {
    /// Namespaces are named as by [`NetNs::new`]: `tag` for the host, `<tag>vmN` for the VMs.
    pub fn new(prefix: &str, tag: &str, n: usize) -> Result<Self> {
        ensure!(n <= 250, "a lab has at most 250 VMs, not {n}");
        let host = NetNs::new(prefix, tag)?;
        let bridge = "br0".to_owned();
        let mut vms = Vec::new();
        let mut lines = stp_bridge_lines(&bridge).to_vec();
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
                format!("addr add {}/24 dev eth0", Self::addr(i)),
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
        in_netns(&sender_ns, move || {
            let sock = std::net::UdpSocket::bind(format!("{src}:0"))?;
            sock.send_to(b"hello", format!("{dst}:7777"))?;
            Ok(())
        })?;
        let got = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
        ensure!(got == "hello", "unexpected datagram {got:?}");
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
        ok_body(&resp)
    })
}

/// The body of a `200` HTTP/1.1 response.
fn ok_body(resp: &str) -> Result<String> {
    let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP header end")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "HTTP error: {head}");
    Ok(body.to_owned())
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

/// Waits until `problem` finds none, re-checking it on every link notification in `ns`
/// (`ip monitor link`), never on a timer; fails after `timeout` with the last problem found.
pub fn wait_on_links(
    ns: &NetNs,
    what: &str,
    timeout: Duration,
    mut problem: impl FnMut() -> Result<Option<String>>,
) -> Result<()> {
    let mut monitor = Command::new("ip")
        .args(["-n", &ns.name, "monitor", "link"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ip monitor")?;
    let stdout = monitor.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    read_lines(stdout, move |line| tx.send(line).is_ok());
    let deadline = Instant::now() + timeout;
    let result = loop {
        // Checked after the monitor started, so no change can slip between check and wait.
        let why = match problem() {
            Ok(None) => break Ok(()),
            Ok(Some(why)) => why,
            Err(e) => break Err(e),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if rx.recv_timeout(left).is_err() {
            break Err(anyhow::anyhow!(
                "timed out after {timeout:?} waiting for {what}: {why}"
            ));
        }
    };
    let _ = monitor.kill();
    let _ = monitor.wait();
    result
}

/// `program` on PATH (or in /usr/sbin, /sbin, which root's PATH may lack), if it is there.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_needs_the_exact_prefix() {
        assert_eq!(owner_pid("bgt-123-0-watch", "bgt"), Some(123));
        assert_eq!(owner_pid("bgt-123-0-watch", "bg"), None);
        assert_eq!(owner_pid("bgb-123-0-n4", "bgt"), None);
        assert_eq!(owner_pid("bgt-x-0-watch", "bgt"), None);
        assert_eq!(owner_pid("bgt", "bgt"), None);
    }

    #[test]
    fn prefixes_with_a_dash_are_refused_before_anything_is_made() {
        assert!(NetNs::new("bg-t", "x").is_err());
        assert!(NetNs::new("", "x").is_err());
        assert!(VmLab::new("bgt", "x", 251).is_err());
    }

    #[test]
    fn run_reports_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .err()
            .map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("oops")));
        assert_eq!(
            run(Command::new("sh").args(["-c", "echo hi"])).ok(),
            Some("hi\n".to_owned())
        );
    }

    #[test]
    fn ok_body_wants_a_200() {
        assert_eq!(
            ok_body("HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody").ok(),
            Some("body".to_owned())
        );
        assert!(ok_body("HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(ok_body("HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn read_lines_stops_when_told() {
        let (tx, rx) = mpsc::channel();
        read_lines(std::io::Cursor::new("a\nb\nc\n"), move |l| {
            let go_on = l != "b";
            tx.send(l).is_ok() && go_on
        });
        let got: Vec<String> = rx.iter().collect();
        assert_eq!(got, ["a", "b"]);
    }
}
