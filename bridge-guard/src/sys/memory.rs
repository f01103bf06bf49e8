//! Handing freed heap back to the system.

/// Returns freed heap to the system after start-up's one-off peak (BTF parsing): glibc keeps
/// freed memory in its arenas otherwise, and the agent's idle RSS would stay at its peak.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Large allocations (from 128 KiB) get pages of their own from the kernel, always: a freed
/// one goes back at once, and a growing one is moved by remapping, not copying. glibc
/// otherwise raises this threshold to the largest block freed (a BTF file's ~6 MiB), and
/// start-up's BTF work that follows grows its vectors on the heap: each doubling copied, old
/// and new resident together (7 MiB more peak at start-up, measured).
pub fn map_large_allocations() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
