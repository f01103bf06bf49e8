//! Link notifications on a socket of their own (RTNLGRP_LINK), read by the agent itself.
//!
//! Requests (repairs, dumps) go through another socket, so that their answers never queue
//! behind a flood of notifications. The queue is the kernel's receive buffer and nothing else:
//! a flood the agent cannot keep up with overflows it, which the kernel reports (ENOBUFS) and
//! the agent answers with a dump, instead of memory growing with the flood in user space.
//!
//! Order still holds where it matters: the kernel queues a change's notification on this
//! socket while it handles the request that made it, before it sends that request's answer on
//! the other. So once an answer is in, reading this socket until it is empty shows the
//! request's effect.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

use super::{
    netlink::{NetlinkError, NetlinkEvent, decode, grow_rx_buffer},
    unchanged::Unchanged,
};

/// `RTNLGRP_LINK` from `linux/rtnetlink.h`.
const RTNLGRP_LINK: u32 = 1;
/// One datagram at most: the kernel sends notifications up to a page (or 8 KiB) each, dump
/// parts up to 32 KiB; nothing larger comes on this socket.
const DATAGRAM: usize = 64 * 1024;
/// Copies (see [`Unchanged`]) in a [`FLOOD_WINDOW`] that make a flood: 2000 a second, far
/// above any real churn and far below a tool re-applying a setting flat out.
const FLOOD_COPIES: u64 = 200;
const FLOOD_WINDOW: Duration = Duration::from_millis(100);
/// During a flood of copies, the socket is read in batches this far apart instead of once
/// per message: a real change behind the copies waits at most this long, and a flat-out
/// fighter costs a read per batch rather than a wakeup per message.
const FLOOD_PAUSE: Duration = Duration::from_millis(1);

/// A subscribed link-notification socket.
pub struct Notifications {
    socket: AsyncFd<Socket>,
    buf: Vec<u8>,
    /// Decoded from the last datagram, not yet taken.
    pending: VecDeque<NetlinkEvent>,
    unchanged: Unchanged,
    /// When the flood window began, and how many copies had been skipped by then.
    window: tokio::time::Instant,
    skipped_before: u64,
    /// In a flood: no read before this.
    paused_until: Option<tokio::time::Instant>,
}

impl Notifications {
    /// Opens and subscribes a socket in this process's network namespace. Must be called
    /// inside a tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        grow_rx_buffer(&mut socket);
        socket
            .add_membership(RTNLGRP_LINK)
            .map_err(NetlinkError::Subscribe)?;
        socket
            .set_non_blocking(true)
            .map_err(NetlinkError::Socket)?;
        // SAFETY: the Socket owns its fd and keeps it open, unchanged, until it is dropped
        // together with the AsyncFd.
        let socket =
            unsafe { AsyncFd::register(socket) }.map_err(|e| NetlinkError::Socket(e.into()))?;
        Ok(Self {
            socket,
            buf: vec![0; DATAGRAM],
            pending: VecDeque::new(),
            unchanged: Unchanged::default(),
            window: tokio::time::Instant::now(),
            skipped_before: 0,
            paused_until: None,
        })
    }

    /// Forgets what the last notifications said (after a dump): a message like one of them is
    /// news again.
    pub fn forget_seen(&mut self) {
        self.unchanged.forget();
    }

    /// Links whose last notification is remembered, for memory checks.
    pub fn remembered(&self) -> usize {
        self.unchanged.len()
    }

    /// The socket is empty: during a flood of copies, the next read waits a little.
    fn drained(&mut self) {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.window) >= FLOOD_WINDOW {
            self.window = now;
            self.skipped_before = self.unchanged.skipped;
        } else if self.unchanged.skipped - self.skipped_before >= FLOOD_COPIES {
            self.paused_until = Some(now + FLOOD_PAUSE);
        }
    }

    fn read(&mut self) -> io::Result<()> {
        read(
            self.socket.as_raw_fd(),
            &mut self.buf,
            &mut self.pending,
            &mut self.unchanged,
        )
    }

    /// The next notification the model needs, waiting for one. Cancel-safe: nothing is read
    /// but between the wait and the return.
    pub async fn recv(&mut self) -> io::Result<NetlinkEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            if let Some(until) = self.paused_until {
                tokio::time::sleep_until(until).await;
                self.paused_until = None;
            }
            let mut ready = self.socket.readable().await?;
            let r = read(
                ready.get_ref().as_raw_fd(),
                &mut self.buf,
                &mut self.pending,
                &mut self.unchanged,
            );
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    drop(ready);
                    self.drained();
                }
                r => r?,
            }
        }
    }

    /// The next notification already queued, without waiting (copies are read past).
    pub fn try_recv(&mut self) -> io::Result<Option<NetlinkEvent>> {
        while self.pending.is_empty() {
            match self.read() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                r => r?,
            }
        }
        Ok(self.pending.pop_front())
    }
}

/// Reads one datagram and decodes its messages into `out`; a lost notification (ENOBUFS) is
/// an [`NetlinkEvent::Overrun`].
fn read(
    fd: RawFd,
    buf: &mut [u8],
    out: &mut VecDeque<NetlinkEvent>,
    unchanged: &mut Unchanged,
) -> io::Result<()> {
    // SAFETY: `buf` is valid for `buf.len()` bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOBUFS) {
            // Lost news: the last message of a link may no longer be its state.
            unchanged.forget();
            out.push_back(NetlinkEvent::Overrun);
            return Ok(());
        }
        return Err(e);
    }
    let n = usize::try_from(n).unwrap_or(0).min(buf.len());
    let mut rest = &buf[..n];
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            tracing::warn!(
                len,
                left = rest.len(),
                "malformed netlink notification: skipped"
            );
            break;
        }
        if unchanged.repeats(&rest[..len]) {
            rest = rest.get((len + 3) & !3..).unwrap_or_default();
            continue;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) {
            Ok(msg) => match &msg.payload {
                NetlinkPayload::Overrun(_) => out.push_back(NetlinkEvent::Overrun),
                _ => out.extend(decode(&msg)),
            },
            // A message this parser does not know is no link the model needs; if it was one,
            // the next dump has it.
            Err(e) => tracing::debug!("undecodable netlink notification: {e}"),
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let step = (len + 3) & !3;
        rest = rest.get(step..).unwrap_or_default();
    }
    Ok(())
}
