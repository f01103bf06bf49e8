//! One AF_PACKET socket per guarded port, and one epoll set over them that tokio waits on.
//!
//! A socket bound to one device with ETH_P_ALL hangs off that device's own tap list, so only
//! that port's traffic reaches it, and it sees each received frame before the bridge does:
//! also on a port the bridge holds out of forwarding, which is how a held-down port is re-probed
//! without letting the loop forward. The classic BPF filter ([`super::frame::socket_filter`])
//! keeps only our probes and BPDUs; `PACKET_IGNORE_OUTGOING` spares the kernel the copy of every
//! frame the port transmits. Sending on the socket puts a frame straight on the port's wire,
//! past the bridge and its port state.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        OnceLock,
        mpsc::{SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

use crate::sys::sockopt::set as set_option;

use super::frame;

/// `PACKET_IGNORE_OUTGOING` (Linux 4.20), not in the libc crate.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `PACKET_STATISTICS`: drops since the last read.
const PACKET_STATISTICS: libc::c_int = 6;

/// A frame received on a port.
#[derive(Clone, Debug)]
pub struct Received {
    pub ifindex: u32,
    pub frame: Vec<u8>,
}

pub struct Sockets {
    epoll: AsyncFd<OwnedFd>,
    ports: BTreeMap<u32, OwnedFd>,
    /// Sockets of links that were ports and may be again (detached, or without carrier), out
    /// of the epoll set, with when they were parked: see [`PARK_FOR`].
    parked: BTreeMap<u32, (OwnedFd, Instant)>,
    /// Ports whose socket could not be opened, and why (each failure is logged once).
    failed: BTreeMap<u32, String>,
}

/// How long the socket of a port that left (detached, or lost its carrier) stays open for its
/// return. Closing one waits for an RCU grace period (see [`close_later`]): faults back to
/// back (a tap detached 120 times a second) closed faster than the closer could, its queue
/// filled, and each close in place stood the agent still for 15 ms before the re-attach's
/// answer. A socket parked is one the port takes back at no cost.
const PARK_FOR: Duration = Duration::from_secs(10);
/// Sockets parked at most: the oldest is closed first (thousands of taps deleted).
const MAX_PARKED: usize = 64;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A filtered packet socket on `ifindex`.
fn open(ifindex: u32) -> io::Result<OwnedFd> {
    // Protocol 0 until bound: no frame is queued before the filter is in place.
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut filter = frame::socket_filter();
    let prog = libc::sock_fprog {
        len: u16::try_from(filter.len()).unwrap_or(u16::MAX),
        filter: filter.as_mut_ptr(),
    };
    set_option(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &prog,
    )?;
    // Older kernels lack it; the filter drops outgoing frames there too, after a copy.
    let _ = set_option(
        fd.as_raw_fd(),
        libc::SOL_PACKET,
        PACKET_IGNORE_OUTGOING,
        &1 as &libc::c_int,
    );
    let ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: a valid sockaddr_ll of the size passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Closes a packet socket off the event loop. Closing one waits for an RCU grace period
/// (`packet_release` calls `synchronize_net`): milliseconds the agent would stand still for,
/// right when a port has left its bridge and its re-attach is due (measured: a detached port
/// back in 6-7 ms instead of 1.2 ms). A full queue closes in place: fds stay bounded.
fn close_later(fd: OwnedFd) {
    static CLOSER: OnceLock<Option<SyncSender<OwnedFd>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<OwnedFd>(256);
        std::thread::Builder::new()
            .name("socket-closer".into())
            .stack_size(64 * 1024)
            .spawn(move || rx.into_iter().for_each(drop))
            .map_err(|e| tracing::debug!("no closer thread, closing in place: {e}"))
            .ok()
            .map(|_| tx)
    });
    match closer {
        Some(tx) => {
            // Full, or the thread is gone: the fd comes back and closes here.
            if let Err(TrySendError::Full(fd) | TrySendError::Disconnected(fd)) = tx.try_send(fd) {
                drop(fd);
            }
        }
        None => drop(fd),
    }
}

impl Sockets {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned right away.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a fresh fd nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open until both drop.
        let epoll = unsafe { AsyncFd::register(ep) }?;
        Ok(Self {
            epoll,
            ports: BTreeMap::new(),
            parked: BTreeMap::new(),
            failed: BTreeMap::new(),
        })
    }

    /// Opens sockets for ports in `wanted` that have none (or takes back their parked one),
    /// and parks those of ports not in it; a parked socket of a link that no longer `exists`,
    /// or parked too long, is closed.
    pub fn sync(&mut self, wanted: &BTreeSet<u32>, exists: impl Fn(u32) -> bool) {
        let now = Instant::now();
        let left: Vec<u32> = self
            .ports
            .keys()
            .filter(|i| !wanted.contains(i))
            .copied()
            .collect();
        for i in left {
            if let Some(fd) = self.ports.remove(&i) {
                self.park(i, fd, now);
            }
        }
        let done: Vec<u32> = self
            .parked
            .iter()
            .filter(|(i, (_, at))| !exists(**i) || now.duration_since(*at) >= PARK_FOR)
            .map(|(i, _)| *i)
            .collect();
        for i in done {
            if let Some((fd, _)) = self.parked.remove(&i) {
                close_later(fd);
            }
        }
        self.failed.retain(|i, _| wanted.contains(i));
        for &ifindex in wanted {
            if self.ports.contains_key(&ifindex) || self.failed.contains_key(&ifindex) {
                continue;
            }
            let reopened = self.parked.remove(&ifindex).map(|(fd, _)| {
                // What it queued while parked is from before: a port back is probed afresh.
                discard_queued(fd.as_raw_fd());
                Ok(fd)
            });
            match reopened.unwrap_or_else(|| open(ifindex)).and_then(|fd| {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: u64::from(ifindex),
                };
                // SAFETY: valid epoll and socket fds and event. Closing the socket later
                // removes it from the set.
                cvt(unsafe {
                    libc::epoll_ctl(
                        self.epoll.get_ref().as_raw_fd(),
                        libc::EPOLL_CTL_ADD,
                        fd.as_raw_fd(),
                        &raw mut ev,
                    )
                })?;
                Ok(fd)
            }) {
                Ok(fd) => {
                    self.ports.insert(ifindex, fd);
                }
                // Gone before its socket was bound: nothing to watch, nothing to say.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    tracing::debug!(ifindex, "port gone before loop protection could watch it");
                }
                // The port vanished meanwhile (ENODEV), or packet sockets are refused
                // (no CAP_NET_RAW): loop protection cannot watch it.
                Err(e) => {
                    tracing::warn!(
                        ifindex,
                        "loop protection cannot watch this port (packet socket: {e})"
                    );
                    let hint = if e.raw_os_error() == Some(libc::EPERM) {
                        ", needs CAP_NET_RAW"
                    } else {
                        ""
                    };
                    self.failed
                        .insert(ifindex, format!("packet socket: {e}{hint}"));
                }
            }
        }
    }

    /// Takes `fd` (port `ifindex`'s) out of the epoll set and keeps it for the port's return.
    fn park(&mut self, ifindex: u32, fd: OwnedFd, now: Instant) {
        // SAFETY: valid epoll and socket fds; a null event is allowed for EPOLL_CTL_DEL.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
        if r != 0 {
            close_later(fd);
            return;
        }
        if self.parked.len() >= MAX_PARKED {
            let oldest = self
                .parked
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(i, _)| *i);
            if let Some((old, _)) = oldest.and_then(|i| self.parked.remove(&i)) {
                close_later(old);
            }
        }
        self.parked.insert(ifindex, (fd, now));
    }

    /// Sockets parked now, for memory checks.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Why `ifindex` has no socket, if opening one failed.
    pub fn failure(&self, ifindex: u32) -> Option<&str> {
        self.failed.get(&ifindex).map(String::as_str)
    }

    /// Whether `ifindex` has a socket.
    pub fn watching(&self, ifindex: u32) -> bool {
        self.ports.contains_key(&ifindex)
    }

    /// Puts `frame` on the wire of port `ifindex`.
    pub fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        let fd = self
            .ports
            .get(&ifindex)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no socket on this port"))?;
        // SAFETY: a valid fd and buffer.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until a port socket has a frame, then reads every frame queued into `out`.
    pub async fn recv(&self, out: &mut Vec<Received>) -> io::Result<()> {
        let mut guard = self.epoll.readable().await?;
        self.drain(out);
        guard.clear_ready();
        Ok(())
    }

    /// Reads every frame queued now into `out`, without waiting.
    pub fn drain(&self, out: &mut Vec<Received>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        loop {
            // SAFETY: a valid epoll fd and event buffer; zero timeout.
            let n = unsafe {
                libc::epoll_wait(self.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), 32, 0)
            };
            let Ok(n) = usize::try_from(n) else { return };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let ifindex = u32::try_from(ev.u64).unwrap_or(0);
                if let Some(fd) = self.ports.get(&ifindex) {
                    read_all(fd.as_raw_fd(), ifindex, out);
                }
            }
        }
    }

    /// Frames the kernel dropped because a socket's queue was full, summed over ports, since
    /// the last call (a storm of BPDUs can do that; the first one is what counts).
    pub fn take_drops(&self) -> u64 {
        self.ports
            .values()
            .map(|fd| {
                let mut st = [0u32; 2];
                let mut len = size_of::<[u32; 2]>() as libc::socklen_t;
                // SAFETY: struct tpacket_stats is two u32s; the buffer and length match.
                let r = unsafe {
                    libc::getsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_PACKET,
                        PACKET_STATISTICS,
                        st.as_mut_ptr().cast(),
                        &raw mut len,
                    )
                };
                if r == 0 { u64::from(st[1]) } else { 0 }
            })
            .sum()
    }
}

/// Frames read from one socket per wakeup: a storm of BPDUs must not keep the agent here. The
/// socket stays readable (level-triggered), so the rest is read on the next turn.
const READ_BATCH: usize = 256;

/// Reads and drops every frame queued on `fd`.
fn discard_queued(fd: RawFd) {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: a valid fd and buffer; MSG_TRUNC drops the rest of a longer frame.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return;
        }
    }
}

fn read_all(fd: RawFd, ifindex: u32, out: &mut Vec<Received>) {
    let mut buf = [0u8; frame::SNAP_LEN as usize];
    for _ in 0..READ_BATCH {
        // SAFETY: a valid fd and buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        let Ok(n) = usize::try_from(n) else { return };
        out.push(Received {
            ifindex,
            frame: buf[..n.min(buf.len())].to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback in the test's own namespace: a socket bound to it changes nothing on it.
    const LO: u32 = 1;

    #[tokio::test]
    async fn a_port_that_leaves_keeps_its_socket_for_its_return() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: packet sockets need CAP_NET_RAW (run as root)");
            return;
        }
        let mut s = Sockets::new().expect("an epoll set");
        let port = BTreeSet::from([LO]);
        s.sync(&port, |_| true);
        assert!(s.watching(LO), "{:?}", s.failure(LO));
        let fd = s.ports[&LO].as_raw_fd();

        s.sync(&BTreeSet::new(), |_| true);
        assert!(!s.watching(LO));
        assert_eq!(s.parked(), 1, "detached: parked, not closed");

        s.sync(&port, |_| true);
        assert!(s.watching(LO));
        assert_eq!(s.ports[&LO].as_raw_fd(), fd, "back: the same socket");
        assert_eq!(s.parked(), 0);
        // Back in the epoll set: reading it does not fail.
        let mut out = Vec::new();
        s.drain(&mut out);

        s.sync(&BTreeSet::new(), |_| true);
        s.sync(&BTreeSet::new(), |_| false);
        assert_eq!(s.parked(), 0, "the link is gone: closed");
    }
}
