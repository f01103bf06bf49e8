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
