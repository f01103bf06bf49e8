//! A real libvirt in a lab: Debian's libvirtd with its qemu and network drivers, dnsmasq and
//! qemu, in a private network namespace and a private mount namespace. Shared by the
//! integration tests and the bench.
//!
//! libvirt's directories (`/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`,
//! `/var/cache/libvirt`, `/etc/libvirt`) are bind-mounted from the lab's own temporary
//! directory inside that mount namespace, and so are `/etc/passwd` and `/etc/group` (copies that
//! add the `libvirt-qemu` user libvirtd insists on), so the host's libvirt, if any, is never
//! touched. Clients reach the lab's daemon through its socket (`virsh -c ...?socket=`), and the
//! agent reads the lab's run directory ([`LibvirtLab::run_dir`]). Dropping the lab kills every
//! process in its namespace (libvirtd, qemu, dnsmasq) — which also ends the mount namespace —
//! and removes the directory, also on failure.
//!
//! Guests are `<domain type='qemu'>` under TCG with 64 MiB, no kernel and no disk: the BIOS finds
//! nothing to boot and idles, and qemu holds its taps, which is all a lab needs. Hot-plugged
//! interfaces are USB NICs, whose unplug needs no guest to acknowledge it.

use std::{
    io::{ErrorKind, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{NetNs, wait_on_links, which};

/// How long libvirtd may take to say it is ready, and each `virsh` call to finish.
const DAEMON_READY: Duration = Duration::from_secs(30);

/// The programs a lab needs; `cargo xtask test` installs their packages.
pub const PROGRAMS: &[&str] = &[
    "libvirtd",
    "virsh",
    "qemu-system-x86_64",
    "dnsmasq",
    "iptables",
];

/// The [`PROGRAMS`] not found on `PATH` (or in /usr/sbin, /sbin).
pub fn missing_programs() -> Vec<&'static str> {
    PROGRAMS
        .iter()
        .copied()
        .filter(|p| which(p).is_none())
        .collect()
}

/// libvirt's directories, bind-mounted from the lab's own (name under the lab root, mount point).
const DIRS: &[(&str, &str)] = &[
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("etc", "/etc/libvirt"),
];

/// libvirtd's own settings: only root may connect, no logging daemon.
const LIBVIRTD_CONF: &str = r#"unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"#;

/// qemu as root without cgroups, security drivers or private /dev: nothing here to confine,
/// and nothing else to set up. virtlogd is not running, hence `stdio_handler`.
const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"#;

/// A libvirt network: its name, bridge and /24 in 198.18.0.0/15.
#[derive(Clone, Debug)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    /// The third octet of its 198.18.x.0/24.
    pub subnet: u8,
}

impl Network {
    pub fn new(name: &str, bridge: &str, subnet: u8) -> Self {
        Self {
            name: name.into(),
            bridge: bridge.into(),
            subnet,
        }
    }

    /// As a new user's `default` network: STP on with libvirt's `delay='0'` (the kernel makes
    /// that 2 s), a host address and DHCP (so dnsmasq runs, as it does for them).
    fn xml(&self) -> String {
        let (n, b, s) = (&self.name, &self.bridge, self.subnet);
        format!(
            "<network>\n  <name>{n}</name>\n  <bridge name='{b}' stp='on' delay='0'/>\n  \
             <ip address='198.18.{s}.1' netmask='255.255.255.0'>\n    \
             <dhcp><range start='198.18.{s}.2' end='198.18.{s}.254'/></dhcp>\n  </ip>\n\
             </network>\n"
        )
    }
}

/// A guest's interface as `virsh domiflist` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tap {
    /// The tap on the host, e.g. `vnet0`.
    pub dev: String,
    /// The network (or bridge) libvirt plugged it into.
    pub source: String,
    pub mac: String,
}

/// libvirtd in its own network and mount namespace; everything in it is killed on drop.
pub struct LibvirtLab {
    pub ns: NetNs,
    root: PathBuf,
    libvirtd: Child,
    socket: PathBuf,
}

impl LibvirtLab {
    /// Starts libvirtd in a new namespace `<prefix>-<pid>-<n>-<tag>` and waits until it is
    /// ready (its sd_notify `READY=1`, sent once its drivers are up).
    pub fn new(prefix: &str, tag: &str) -> Result<Self> {
        let ns = NetNs::new(prefix, tag)?;
        let root = std::env::temp_dir().join(format!("{}-libvirt", ns.name));
        let _ = std::fs::remove_dir_all(&root);
        for (dir, _) in DIRS {
            std::fs::create_dir_all(root.join(dir))?;
        }
        std::fs::write(root.join("etc/libvirtd.conf"), LIBVIRTD_CONF)?;
        std::fs::write(root.join("etc/qemu.conf"), QEMU_CONF)?;
        // libvirtd looks its qemu user up before it reads qemu.conf's `user`.
        for (file, line) in [
            (
                "passwd",
                "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin",
            ),
            ("group", "libvirt-qemu:x:64055:"),
        ] {
            let mut text = std::fs::read_to_string(Path::new("/etc").join(file))?;
            if !text.lines().any(|l| l.starts_with("libvirt-qemu:")) {
                text.push_str(line);
                text.push('\n');
            }
            std::fs::write(root.join(file), text)?;
        }
        let mut script = String::from("set -e\n");
        for (dir, mount) in DIRS {
            // Mount points only; what the host keeps there stays hidden and untouched.
            script.push_str(&format!(
                "mkdir -p {mount}\nmount --bind {} {mount}\n",
                root.join(dir).display()
            ));
        }
        for file in ["passwd", "group"] {
            script.push_str(&format!(
                "mount --bind {} /etc/{file}\n",
                root.join(file).display()
            ));
        }
        // Its pid file too: the default, /run/libvirtd.pid, is the host's.
        script.push_str(&format!(
            "exec libvirtd --pid-file {}\n",
            root.join("libvirtd.pid").display()
        ));

        let notify_path = root.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).context("binding the sd_notify socket")?;
        // Short reads, so that a daemon that died is noticed at once rather than at the bound.
        notify.set_read_timeout(Some(Duration::from_millis(100)))?;
        let log = std::fs::File::create(root.join("libvirtd.log"))?;
        let libvirtd = ns
            .command("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting libvirtd")?;
        let lab = Self {
            socket: root.join("run/libvirt-sock"),
            ns,
            root,
            libvirtd,
        };
        let deadline = Instant::now() + DAEMON_READY;
        let mut buf = [0u8; 4096];
        let mut lab = lab;
        loop {
            match notify.recv(&mut buf) {
                Ok(n) if buf[..n].split(|b| *b == b'\n').any(|l| l == b"READY=1") => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("reading libvirtd's sd_notify socket"),
            }
            if let Some(status) = lab.libvirtd.try_wait()? {
                bail!(
                    "libvirtd exited ({status}) before it was ready; its log:\n{}",
                    lab.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "libvirtd not ready after {DAEMON_READY:?}; its log:\n{}",
                lab.log()
            );
        }
        Ok(lab)
    }

    /// libvirt's run directory as the agent sees it (`/run/libvirt` inside the lab): pass it
    /// as `--libvirt-dir`.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// libvirtd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("libvirtd.log")).unwrap_or_default()
    }

    /// Runs `virsh ARGS` against the lab's daemon; its stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let uri = format!("qemu:///system?socket={}", self.socket.display());
        crate::run(Command::new("virsh").args(["-q", "-c", &uri]).args(args))
    }

    /// Runs `virsh ARGS` with `xml` in a file as its last argument.
    fn virsh_xml(&self, args: &[&str], name: &str, xml: &str) -> Result<String> {
        let path = self.root.join(format!("{name}.xml"));
        std::fs::File::create(&path)?.write_all(xml.as_bytes())?;
        let path = path.to_string_lossy().into_owned();
        let mut all = args.to_vec();
        all.push(&path);
        self.virsh(&all)
    }

    /// Defines and starts `net`.
    pub fn start_network(&self, net: &Network) -> Result<()> {
        self.virsh_xml(&["net-define"], &format!("net-{}", net.name), &net.xml())?;
        self.virsh(&["net-start", &net.name])?;
        Ok(())
    }

    /// Defines and starts guest `name` with one interface on each of `networks`; its taps.
    pub fn start_guest(&self, name: &str, networks: &[&str]) -> Result<Vec<Tap>> {
        let interfaces: String = networks
            .iter()
            .map(|n| {
                format!(
                    "    <interface type='network'><source network='{n}'/>\
                     <model type='e1000'/><rom enabled='no'/></interface>\n"
                )
            })
            .collect();
        let xml = format!(
            "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  \
             <vcpu>1</vcpu>\n  <features><acpi/></features>\n  \
             <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <devices>\n    \
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\n{interfaces}    \
             <video><model type='none'/></video>\n    <memballoon model='none'/>\n  \
             </devices>\n</domain>\n"
        );
        self.virsh_xml(&["define"], &format!("dom-{name}"), &xml)?;
        self.virsh(&["start", name])?;
        self.taps(name)
    }

    /// Hot-plugs a USB NIC on `network` into running guest `name`; the new tap.
    pub fn attach_interface(&self, name: &str, network: &str) -> Result<Tap> {
        let before = self.taps(name)?;
        let xml = format!(
            "<interface type='network'><source network='{network}'/>\
             <model type='usb-net'/></interface>\n"
        );
        self.virsh_xml(&["attach-device", name, "--live"], "hotplug", &xml)?;
        self.taps(name)?
            .into_iter()
            .find(|t| !before.contains(t))
            .context("no new tap after attach-device")
    }

    /// Unplugs the interface with `mac` from running guest `name`.
    pub fn detach_interface(&self, name: &str, mac: &str) -> Result<()> {
        self.virsh(&["detach-interface", name, "network", "--mac", mac, "--live"])
            .map(drop)
    }

    /// The taps of running guest `name`.
    pub fn taps(&self, name: &str) -> Result<Vec<Tap>> {
        let out = self.virsh(&["domiflist", name])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 5 && f[0] != "-").then(|| Tap {
                    dev: f[0].to_owned(),
                    source: f[2].to_owned(),
                    mac: f[4].to_owned(),
                })
            })
            .collect())
    }

    /// `virsh net-destroy NAME` then `net-start NAME`, as libvirt users restart a network;
    /// how long `net-start` took.
    pub fn recreate_network(&self, name: &str) -> Result<Duration> {
        self.virsh(&["net-destroy", name])?;
        let t = Instant::now();
        self.virsh(&["net-start", name])?;
        Ok(t.elapsed())
    }

    /// Why `dev` is not enslaved to `bridge` and forwarding, or `None` when it is.
    pub fn not_forwarding(&self, dev: &str, bridge: &str) -> Result<Option<String>> {
        let links: Value = serde_json::from_str(&self.ns.ip("-j -d link show")?)?;
        let find = |name: &str| {
            links
                .as_array()
                .and_then(|a| a.iter().find(|l| l["ifname"] == name))
        };
        let Some(port) = find(dev) else {
            return Ok(Some(format!("{dev} does not exist")));
        };
        if port["master"] != bridge {
            return Ok(Some(format!("{dev} master is {}", port["master"])));
        }
        let state = &port["linkinfo"]["info_slave_data"]["state"];
        if state != "forwarding" {
            return Ok(Some(format!("{dev} is {state}")));
        }
        Ok(None)
    }

    /// Waits until `dev` is on `bridge` and forwarding, re-checking on every link notification.
    pub fn wait_forwarding(&self, dev: &str, bridge: &str, timeout: Duration) -> Result<()> {
        wait_on_links(
            &self.ns,
            &format!("{dev} to forward on {bridge}"),
            timeout,
            || self.not_forwarding(dev, bridge),
        )
    }

    /// Waits until link `dev` is gone, re-checking on every link notification.
    pub fn wait_gone(&self, dev: &str, timeout: Duration) -> Result<()> {
        wait_on_links(&self.ns, &format!("{dev} to be gone"), timeout, || {
            Ok(self
                .ns
                .ip(&format!("-j link show dev {dev}"))
                .is_ok()
                .then(|| format!("{dev} still exists")))
        })
    }
}

impl Drop for LibvirtLab {
    fn drop(&mut self) {
        // Every process in the namespace was started by this lab (libvirtd, and its qemu and
        // dnsmasq children) or by the test (an agent): end them all, by pid.
        let pids = crate::run(Command::new("ip").args(["netns", "pids", &self.ns.name]))
            .unwrap_or_default();
        for pid in pids
            .lines()
            .filter_map(|p| p.trim().parse::<libc::pid_t>().ok())
        {
            kill_and_wait(pid);
        }
        let _ = self.libvirtd.kill();
        let _ = self.libvirtd.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// SIGKILLs `pid` and waits (bounded) until it is gone, through a pidfd: qemu and dnsmasq are
/// not our children, so there is nothing to `wait` on.
fn kill_and_wait(pid: libc::pid_t) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: plain kill(2) of a process in the lab's own namespace.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let Ok(fd) = i32::try_from(fd) else { return };
    if fd < 0 {
        return; // already gone
    }
    // SAFETY: a pidfd we own; closed right after.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd. A pidfd is readable once the process exited.
    unsafe { libc::poll(&mut pfd, 1, 5_000) };
}

/// Fails with libvirtd's log when `r` failed.
pub fn with_log<T>(lab: &LibvirtLab, r: Result<T>) -> Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => bail!("{e:#}\nlibvirtd log:\n{}", lab.log()),
    }
}
