//! Socket options set on raw file descriptors (packet and netlink sockets the agent owns).

use std::{io, os::fd::RawFd};

/// `setsockopt(fd, level, name, v)`, with `v`'s size as the option's length.
pub fn set<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    let len = libc::socklen_t::try_from(size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `v` points to a live value of the size passed.
    let r = unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(v).cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
