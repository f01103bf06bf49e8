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
    collections::{BTreeMap, VecDeque},
    io,
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::io::unix::AsyncFd;

use super::{
    muffle,
    netlink::{NetlinkError, NetlinkEvent, decode, grow_rx_buffer},
    unchanged::Unchanged,
};

/// `RTNLGRP_LINK` from `linux/rtnetlink.h`.
const RTNLGRP_LINK: u32 = 1;
/// One datagram at most: the kernel sends notifications up to a page (or 8 KiB) each, dump
/// parts up to 32 KiB; nothing larger comes on this socket.
const DATAGRAM: usize = 64 * 1024;
/// Datagrams taken per read (`recvmmsg`): a flood costs a system call per batch, not per
/// message. The buffer's pages that no message reached are never touched, so never resident.
const BATCH: usize = 16;
/// Copies (see [`Unchanged`]) in a [`FLOOD_WINDOW`] that make a flood: 10,000 a second, far
/// above any real churn and well below a tool re-applying a setting flat out (37,000 a second
/// from the bench's fighter on 2 cores). Faults back to back, each repaired before the next
/// (the bench's storm: a bridge set down ~1000 times a second), send a few thousand: at 2000
/// a second they counted as a flood, and its paced repairs made their p99 21 ms, not 2 ms.
const FLOOD_COPIES: u64 = 1000;
pub const FLOOD_WINDOW: Duration = Duration::from_millis(100);
/// During a flood of copies, the socket is read in batches this far apart instead of once
/// per message: a real change behind the copies waits at most this long, and a flat-out
/// fighter costs a read per batch rather than a wakeup per message.
const FLOOD_PAUSE: Duration = Duration::from_millis(1);
/// Copies of one link in a flood's window that get it muffled (`muffle`), flood or not: 3,000
/// a second on one link. The storm's copies are spread over its links; a fighter's all fall on
/// the link it fights over, and a shell fighter (`ip -batch`) on a loaded 2-core machine sends
/// 5,000-13,000 a second, short of the [`FLOOD_COPIES`] rate.
const LINK_FLOOD_COPIES: u64 = 300;
/// How long a link stays muffled before its notifications are read again. If the flood goes
/// on, the link is muffled again after another [`LINK_FLOOD_COPIES`] (a few ms of a
/// fighter's) and held twice as long, up to [`MUFFLE_HOLD_MAX`]: a long fight costs its
/// copies a few ms every few seconds. When the flood is over, news comes as before.
const MUFFLE_HOLD: Duration = Duration::from_secs(1);
const MUFFLE_HOLD_MAX: Duration = Duration::from_secs(8);
/// A link muffled again this soon after its release is still in the same flood.
const SAME_FLOOD: Duration = Duration::from_millis(500);

/// A muffled link: since when, and for how long.
#[derive(Clone, Copy, Debug)]
struct Muffled {
    since: tokio::time::Instant,
    hold: Duration,
}

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
    /// When a flood last paused reads.
    flooded_at: Option<tokio::time::Instant>,
    /// Links muffled; `None`: muffling is off (not asked for, or the kernel refused the
    /// filter).
    muffled: Option<BTreeMap<u32, Muffled>>,
    /// Links released lately, as they were when released: muffled again soon, held longer.
    released: BTreeMap<u32, Muffled>,
    /// Floods that began since the last [`Notifications::take_floods`]: link, copies.
    floods: Vec<(u32, u64)>,
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
        Self::over(socket)
    }

    /// Notifications read from `socket`, made non-blocking.
    fn over(socket: Socket) -> Result<Self, NetlinkError> {
        socket
            .set_non_blocking(true)
            .map_err(NetlinkError::Socket)?;
        // SAFETY: the Socket owns its fd and keeps it open, unchanged, until it is dropped
        // together with the AsyncFd.
        let socket =
            unsafe { AsyncFd::register(socket) }.map_err(|e| NetlinkError::Socket(e.into()))?;
        Ok(Self {
            socket,
            buf: vec![0; BATCH * DATAGRAM],
            pending: VecDeque::new(),
            unchanged: Unchanged::default(),
            window: tokio::time::Instant::now(),
            skipped_before: 0,
            paused_until: None,
            flooded_at: None,
            muffled: None,
            released: BTreeMap::new(),
            floods: Vec::new(),
        })
    }

    /// Muffles links whose notifications flood with copies from now on: the kernel drops
    /// their new-link messages, and the caller polls them ([`Notifications::muffled`]) and
    /// releases them ([`Notifications::release_due`]). Tried first: without socket filters
    /// (a sandbox that forbids them), copies are read and skipped as before.
    pub fn muffle_floods(&mut self) {
        let fd = self.socket.as_raw_fd();
        match muffle::set(fd, &[0]).and_then(|()| muffle::set(fd, &[])) {
            Ok(()) => {
                tracing::info!(
                    "notification floods: a link's copies are dropped in the kernel (socket filter)"
                );
                self.muffled = Some(BTreeMap::new());
            }
            Err(e) => tracing::info!(
                "notification floods: copies are read and skipped (no socket filter: {e})"
            ),
        }
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

    /// The socket is empty: during a flood of copies, the next read waits a little, and the
    /// links the copies are of get muffled.
    fn drained(&mut self) {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.window) >= FLOOD_WINDOW {
            self.window = now;
            self.skipped_before = self.unchanged.skipped;
            self.unchanged.count_afresh();
        } else if self.unchanged.skipped - self.skipped_before >= FLOOD_COPIES {
            self.paused_until = Some(now + FLOOD_PAUSE);
            self.flooded_at = Some(now);
            self.muffle_flooding(now);
        } else if self.muffled.is_some()
            && self
                .unchanged
                .copied_links(LINK_FLOOD_COPIES)
                .next()
                .is_some()
        {
            self.muffle_flooding(now);
        }
    }

    fn muffle_flooding(&mut self, now: tokio::time::Instant) {
        let Some(muffled) = self.muffled.as_mut() else {
            return;
        };
        let before = muffled.len();
        self.released
            .retain(|_, m| now.duration_since(m.since + m.hold) < SAME_FLOOD);
        for (ifindex, copies) in self.unchanged.copied_links(LINK_FLOOD_COPIES) {
            if muffled.len() >= muffle::MAX_LINKS || muffled.contains_key(&ifindex) {
                continue;
            }
            let hold = match self.released.remove(&ifindex) {
                Some(m) => (m.hold * 2).min(MUFFLE_HOLD_MAX),
                None => {
                    self.floods.push((ifindex, copies));
                    MUFFLE_HOLD
                }
            };
            muffled.insert(ifindex, Muffled { since: now, hold });
        }
        if muffled.len() != before {
            tracing::debug!(links = ?muffled.keys(), "muffling links whose notifications flood with copies");
            self.refilter();
        }
    }

    /// Puts the filter in line with the muffled links; if the kernel refuses, muffling ends.
    fn refilter(&mut self) {
        let Some(muffled) = self.muffled.as_ref() else {
            return;
        };
        let links: Vec<u32> = muffled.keys().copied().collect();
        if let Err(e) = muffle::set(self.socket.as_raw_fd(), &links) {
            tracing::warn!(
                "cannot filter notification floods any longer ({e}): copies are read and skipped"
            );
            let _ = muffle::set(self.socket.as_raw_fd(), &[]);
            for &l in &links {
                self.unchanged.forget_link(l);
            }
            self.muffled = None;
        }
    }

    /// Links whose notifications began to flood since the last call (not those muffled again
    /// in the same flood), with the copies that made it one: each is told once per flood.
    pub fn take_floods(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.floods)
    }

    /// The links muffled now: their changes are told by no notification but their deletion.
    pub fn muffled(&self) -> impl Iterator<Item = u32> + '_ {
        self.muffled.iter().flat_map(BTreeMap::keys).copied()
    }

    /// When the next muffled link is due for release.
    pub fn next_release(&self) -> Option<tokio::time::Instant> {
        self.muffled
            .as_ref()?
            .values()
            .map(|m| m.since + m.hold)
            .min()
    }

    /// Releases the links muffled for their hold: their notifications come again from now on,
    /// and what changed while they were muffled is the caller's to fetch, once, now.
    pub fn release_due(&mut self, now: tokio::time::Instant) -> Vec<u32> {
        let Some(muffled) = self.muffled.as_mut() else {
            return Vec::new();
        };
        let due: Vec<u32> = muffled
            .iter()
            .filter(|(_, m)| now.duration_since(m.since) >= m.hold)
            .map(|(l, _)| *l)
            .collect();
        if due.is_empty() {
            return due;
        }
        for l in &due {
            if let Some(m) = muffled.remove(l) {
                self.released.insert(*l, m);
            }
            // Its messages were not all seen: the next one is news.
            self.unchanged.forget_link(*l);
        }
        self.refilter();
        due
    }

    /// A muffled link deleted (deletions pass the filter) is released at once: no flood of it
    /// is left to slow fights elsewhere, and its filter slot is free.
    fn taken(&mut self, ev: &NetlinkEvent) {
        let NetlinkEvent::Removed { ifindex, .. } = ev else {
            return;
        };
        self.released.remove(ifindex);
        if self
            .muffled
            .as_mut()
            .is_some_and(|m| m.remove(ifindex).is_some())
        {
            self.refilter();
        }
    }

    /// Whether a tool floods a link with copies now: a link is muffled for them. Without
    /// muffling, whether copies paused a read within the last [`FLOOD_WINDOW`]. Copies spread
    /// over links (faults back to back: each port's change re-sends the bridge too) are no
    /// fighter, and must not slow the repairs of those faults.
    pub fn flooding(&self) -> bool {
        match &self.muffled {
            Some(m) => !m.is_empty(),
            None => self.flooded_at.is_some_and(|t| t.elapsed() < FLOOD_WINDOW),
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
                self.taken(&ev);
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

    /// The next notification already queued, without waiting (copies are read past). Emptying
    /// the socket counts for flood detection as in [`Notifications::recv`]: during a fight
    /// the agent reads most notifications here, woken by its repairs' answers.
    pub fn try_recv(&mut self) -> io::Result<Option<NetlinkEvent>> {
        while self.pending.is_empty() {
            match self.read() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained();
                    return Ok(None);
                }
                r => r?,
            }
        }
        let ev = self.pending.pop_front();
        if let Some(ev) = &ev {
            self.taken(ev);
        }
        Ok(ev)
    }
}

/// Reads what is queued, up to [`BATCH`] datagrams, and decodes their messages into `out`; a
/// lost notification (ENOBUFS, or a datagram cut short) is an [`NetlinkEvent::Overrun`].
fn read(
    fd: RawFd,
    buf: &mut [u8],
    out: &mut VecDeque<NetlinkEvent>,
    unchanged: &mut Unchanged,
) -> io::Result<()> {
    // SAFETY: all-zero iovecs and mmsghdrs are valid (null pointers, zero lengths).
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for ((slot, v), h) in buf.chunks_exact_mut(DATAGRAM).zip(&mut iov).zip(&mut hdrs) {
        v.iov_base = slot.as_mut_ptr().cast();
        v.iov_len = slot.len();
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
    }
    let slots = u32::try_from(buf.len() / DATAGRAM).unwrap_or(0);
    // SAFETY: each header points at its own iovec, each iovec at its own part of `buf`, all
    // alive and unaliased for the call; the kernel writes only within them.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            slots,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
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
    let n = usize::try_from(n).unwrap_or(0);
    // Where each message is trimmed before parsing, one buffer for the whole batch.
    let mut scratch = Vec::new();
    for (slot, h) in buf.chunks_exact(DATAGRAM).zip(&hdrs).take(n) {
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            // Cut short, so lost: a dump has it.
            unchanged.forget();
            out.push_back(NetlinkEvent::Overrun);
            continue;
        }
        let len = usize::try_from(h.msg_len).unwrap_or(0).min(slot.len());
        decode_datagram(&slot[..len], out, unchanged, &mut scratch);
    }
    Ok(())
}

/// Decodes one datagram's messages into `out`, skipping copies.
fn decode_datagram(
    mut rest: &[u8],
    out: &mut VecDeque<NetlinkEvent>,
    unchanged: &mut Unchanged,
    scratch: &mut Vec<u8>,
) {
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
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(super::trim::trim(
            &rest[..len],
            scratch,
        )) {
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
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd};

    use super::*;
    use crate::sources::unchanged::tests::bridge;

    /// A datagram socket pair: what one end sends, the other reads as it would netlink's.
    pub(in crate::sources) fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both were just opened and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, datagram: &[u8]) {
        // SAFETY: `datagram` is valid for its length.
        let n = unsafe { libc::send(fd.as_raw_fd(), datagram.as_ptr().cast(), datagram.len(), 0) };
        assert_eq!(usize::try_from(n).ok(), Some(datagram.len()));
    }

    /// A real netlink socket in the test's namespace (subscribing changes nothing), its filter
    /// set by the kernel.
    #[tokio::test]
    async fn a_muffled_link_deleted_is_released_at_once() {
        let mut n = Notifications::open().expect("a notification socket");
        n.muffle_floods();
        assert!(n.muffled.is_some(), "this kernel takes socket filters");
        let now = tokio::time::Instant::now();
        if let Some(m) = n.muffled.as_mut() {
            m.insert(
                7,
                Muffled {
                    since: now,
                    hold: MUFFLE_HOLD,
                },
            );
            m.insert(
                8,
                Muffled {
                    since: now,
                    hold: MUFFLE_HOLD,
                },
            );
        }
        n.refilter();
        assert!(n.flooding());
        n.taken(&NetlinkEvent::Removed {
            ifindex: 7,
            name: "br0".into(),
        });
        assert_eq!(n.muffled().collect::<Vec<_>>(), [8]);
        assert_eq!(n.next_release(), Some(now + MUFFLE_HOLD));
        n.taken(&NetlinkEvent::Removed {
            ifindex: 8,
            name: "br1".into(),
        });
        assert!(
            !n.flooding(),
            "no muffled link left: fights go at full pace"
        );
        assert!(n.muffled.is_some(), "muffling still on for the next flood");
    }

    /// During a fight the agent takes its notifications between repairs, without waiting
    /// (`try_recv`): copies read that way make a flood and get their link muffled as well.
    #[tokio::test(start_paused = true)]
    async fn copies_taken_without_waiting_make_a_flood() {
        let (tx, rx) = pair();
        // SAFETY: `rx` is an open socket, owned by the Socket from now on.
        let socket = unsafe { Socket::from_raw_fd(rx.into_raw_fd()) };
        let mut n = Notifications::over(socket).expect("notifications over a socket pair");
        n.muffle_floods();
        assert!(n.muffled.is_some(), "this kernel takes socket filters");
        let copy = bridge(7, 1, 0, 0, 0);
        let mut news = 0;
        // Time stands still: all of it within one flood window.
        for _ in 0..=FLOOD_COPIES / BATCH as u64 {
            for _ in 0..BATCH {
                send(&tx, &copy);
            }
            while n.try_recv().expect("reads").is_some() {
                news += 1;
            }
        }
        assert_eq!(news, 1, "the first message is news, the rest copies");
        assert_eq!(n.take_floods().first().map(|f| f.0), Some(7));
        assert_eq!(n.muffled().collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn reads_a_batch_per_call_and_a_datagram_cut_short_is_a_loss() {
        let (tx, rx) = pair();
        let copy = bridge(7, 1, 0, 0, 0);
        for _ in 0..BATCH + 4 {
            send(&tx, &copy);
        }
        let mut buf = vec![0; BATCH * DATAGRAM];
        let (mut out, mut unchanged) = (VecDeque::new(), Unchanged::default());
        read(rx.as_raw_fd(), &mut buf, &mut out, &mut unchanged).expect("a batch");
        assert_eq!(
            unchanged.skipped,
            BATCH as u64 - 1,
            "one call, a whole batch"
        );
        read(rx.as_raw_fd(), &mut buf, &mut out, &mut unchanged).expect("the rest");
        assert_eq!(unchanged.skipped, BATCH as u64 + 3);
        let e = read(rx.as_raw_fd(), &mut buf, &mut out, &mut unchanged).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(out.len(), 1, "the first is news, the rest copies: {out:?}");
        out.clear();

        send(&tx, &vec![0; DATAGRAM + 1]);
        read(rx.as_raw_fd(), &mut buf, &mut out, &mut unchanged).expect("cut short");
        assert_eq!(out.pop_front(), Some(NetlinkEvent::Overrun));
        assert_eq!(unchanged.len(), 0, "what was remembered may be stale now");
    }
}
