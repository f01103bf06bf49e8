//! The systemd notification protocol (sd_notify): READY, STATUS, RELOADING, WATCHDOG and
//! STOPPING sent as datagrams to `$NOTIFY_SOCKET`, and the watchdog interval from
//! `$WATCHDOG_USEC`.

use std::{
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    time::Duration,
};

#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier systemd asked for, if any (`NOTIFY_SOCKET`: a path, or `@name` for an
    /// abstract socket).
    pub fn from_env() -> io::Result<Option<Self>> {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let target = target.to_string_lossy().into_owned();
        let addr = match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(&target)?,
        };
        Ok(Some(Self {
            socket: UnixDatagram::unbound()?,
            addr,
        }))
    }

    /// Sends newline-separated `KEY=value` assignments.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={status}"))
    }

    /// `STATUS=`: the one line `systemctl status` shows.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={status}"))
    }

    /// `RELOADING=1` with the time the reload began, as `Type=notify-reload` requires
    /// (systemd matches it against the SIGHUP it sent); follow it with [`Notifier::ready`].
    pub fn reloading(&self) -> io::Result<()> {
        let usec = crate::sys::clock::monotonic_ns() / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, if it is meant for this process
/// (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_string_lossy().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("bg-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            socket: UnixDatagram::unbound().expect("socket"),
            addr: SocketAddr::from_pathname(&path).expect("addr"),
        };
        n.ready("guarding br0").expect("send");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=guarding br0");
        let before = crate::sys::clock::monotonic_ns() / 1000;
        n.reloading().expect("send");
        let len = listener.recv(&mut buf).expect("recv");
        let msg = std::str::from_utf8(&buf[..len]).expect("UTF-8");
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("not a reload notification: {msg}"));
        assert!(
            (before..=crate::sys::clock::monotonic_ns() / 1000).contains(&usec),
            "MONOTONIC_USEC is CLOCK_MONOTONIC now: {usec} vs {before}"
        );
        n.status("guarding br0: 1/1 forwarding").expect("send");
        let len = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"STATUS=guarding br0: 1/1 forwarding");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
