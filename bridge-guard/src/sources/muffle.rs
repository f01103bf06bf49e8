//! A link's notifications dropped in the kernel while they flood with copies.
//!
//! Skipping copies in user space (`unchanged`) still pays for each one's delivery: against a
//! tool re-applying a setting flat out (37,000 requests a second), `perf` put 80% of the agent's
//! CPU in the kernel handing it notifications (copying, waking, freeing), not in the agent.
//! A classic BPF socket filter drops a muffled link's `RTM_NEWLINK` before it is queued, in the
//! sender's context: the flood costs the tool that makes it. Deletions still pass, and the
//! agent polls what the filter hides (`agent::polls`).

use std::{io, os::fd::RawFd};

use crate::sys::sockopt;

/// `SO_ATTACH_FILTER` and `SO_DETACH_FILTER` from `asm-generic/socket.h` (libc has them for
/// Android only); the same on every architecture this runs on but PA-RISC.
const SO_ATTACH_FILTER: libc::c_int = 26;
const SO_DETACH_FILTER: libc::c_int = 27;
/// Links muffled at once, at most: each is one instruction, and jump offsets are a byte.
pub const MAX_LINKS: usize = 16;

const RTM_NEWLINK: u16 = 16;
/// `nlmsg_type` and `ifi_index` in a link message: `nlmsghdr` is 16 bytes, `ifi_index` the
/// second word of `ifinfomsg`.
const TYPE_AT: u32 = 4;
const INDEX_AT: u32 = 20;

#[expect(
    clippy::cast_possible_truncation,
    reason = "BPF opcodes fit in 16 bits"
)]
const fn op(code: u32) -> u16 {
    code as u16
}

const fn insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: op(code),
        jt,
        jf,
        k,
    }
}

/// The filter: `RTM_NEWLINK` of one of `links` is dropped, everything else kept whole. cBPF
/// loads are big-endian, the message's fields native: each constant is swapped to match.
fn program(links: &[u32]) -> Vec<libc::sock_filter> {
    use libc::{BPF_ABS, BPF_H, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let n = u8::try_from(links.len().min(MAX_LINKS)).unwrap_or(0);
    let newlink = u32::from(u16::from_be_bytes(RTM_NEWLINK.to_ne_bytes()));
    let mut p = vec![
        insn(BPF_LD | BPF_H | BPF_ABS, 0, 0, TYPE_AT),
        // Not a new-link message: to `keep`, past the index load and the comparisons.
        insn(BPF_JMP | BPF_JEQ | BPF_K, 0, n + 1, newlink),
        insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, INDEX_AT),
    ];
    for (i, &ifindex) in (0..n).zip(links) {
        // A match jumps to `drop`, past the comparisons left and `keep`.
        p.push(insn(
            BPF_JMP | BPF_JEQ | BPF_K,
            n - i,
            0,
            u32::from_be_bytes(ifindex.to_ne_bytes()),
        ));
    }
    p.push(insn(BPF_RET | BPF_K, 0, 0, u32::MAX)); // keep
    p.push(insn(BPF_RET | BPF_K, 0, 0, 0)); // drop
    p
}

/// Drops `links`' new-link messages on socket `fd` from now on (replacing any filter before);
/// none: the socket takes everything again.
pub fn set(fd: RawFd, links: &[u32]) -> io::Result<()> {
    if links.is_empty() {
        // The value is not used, but the kernel reads an int before it looks at the option.
        return match sockopt::set(fd, libc::SOL_SOCKET, SO_DETACH_FILTER, &0 as &libc::c_int) {
            // ENOENT: no filter was on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        };
    }
    let mut prog = program(links);
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).unwrap_or(0),
        filter: prog.as_mut_ptr(),
    };
    // The kernel copies the program, which `fprog` points at, during the call.
    sockopt::set(fd, libc::SOL_SOCKET, SO_ATTACH_FILTER, &fprog)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd as _, OwnedFd};

    use super::*;
    use crate::sources::notifications::tests::pair;

    /// A link message as the kernel lays it out: `nlmsghdr`, then `ifinfomsg`.
    fn message(kind: u16, ifindex: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&32u32.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 4]); // family, pad, type
        m.extend_from_slice(&ifindex.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m
    }

    /// What the receiving end gets, in order: each datagram's (type, index).
    fn received(rx: &OwnedFd) -> Vec<(u16, u32)> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    rx.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(n) = usize::try_from(n) else { break };
            assert_eq!(n, 32, "kept whole");
            got.push((
                u16::from_ne_bytes([buf[4], buf[5]]),
                u32::from_ne_bytes([buf[20], buf[21], buf[22], buf[23]]),
            ));
        }
        got
    }

    /// The kernel's own BPF interpreter runs the program: socket filters work on Unix
    /// datagram sockets as on netlink ones.
    #[test]
    fn drops_only_new_link_messages_of_muffled_links() {
        let (tx, rx) = pair();
        set(rx.as_raw_fd(), &[7, 300]).expect("attach");
        let sent = [
            (16, 7),
            (16, 8),
            (17, 7),
            (16, 300),
            (16, 0x0700_0000),
            (20, 7),
        ];
        for (kind, index) in sent {
            let m = message(kind, index);
            // SAFETY: `m` is valid for its length.
            let n = unsafe { libc::send(tx.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
            assert_eq!(usize::try_from(n).ok(), Some(m.len()));
        }
        assert_eq!(
            received(&rx),
            [(16, 8), (17, 7), (16, 0x0700_0000), (20, 7)],
            "new-link messages of 7 and 300 dropped; deletions, other links, other types kept"
        );

        set(rx.as_raw_fd(), &[]).expect("detach");
        set(rx.as_raw_fd(), &[]).expect("detaching twice is no error");
        let m = message(16, 7);
        // SAFETY: as above.
        unsafe { libc::send(tx.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        assert_eq!(received(&rx), [(16, 7)], "released");
    }

    #[test]
    fn as_many_links_as_allowed_fit_the_jumps() {
        let links: Vec<u32> = (1..=u32::try_from(MAX_LINKS).unwrap_or(0) + 3).collect();
        let p = program(&links);
        assert_eq!(
            p.len(),
            3 + MAX_LINKS + 2,
            "links past the maximum are left out"
        );
        let (tx, rx) = pair();
        set(rx.as_raw_fd(), &links).expect("the kernel's checker takes it");
        for i in [1, 16, 17] {
            let m = message(16, i);
            // SAFETY: as above.
            unsafe { libc::send(tx.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
        }
        assert_eq!(received(&rx), [(16, 17)]);
    }
}
