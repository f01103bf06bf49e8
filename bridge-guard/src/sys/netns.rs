//! The network namespace this process runs in.

use std::{io, os::unix::fs::MetadataExt as _};

/// The inode number of the current network namespace: the kernel's `net->ns.inum`.
pub fn current_inode() -> io::Result<u32> {
    let ino = std::fs::metadata("/proc/self/ns/net")?.ino();
    u32::try_from(ino).map_err(|_| io::Error::other(format!("netns inode {ino} exceeds 32 bits")))
}
