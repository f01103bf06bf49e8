//! A real libvirt for the integration tests: [`netlab::libvirt`]'s lab, with namespaces under
//! [`PREFIX`] (see [`lab`]), and the rule for when the tests can have one.

pub use netlab::libvirt::{LibvirtLab, Network, Tap, with_log};

use crate::PREFIX;

/// A libvirt lab in a namespace `bgt-<pid>-<n>-<tag>`.
pub fn lab(tag: &str) -> anyhow::Result<LibvirtLab> {
    LibvirtLab::new(PREFIX, tag)
}

/// `true` (after printing why) when this machine lacks what a libvirt lab needs, or when it
/// is one of the VM matrix's guests: qemu under TCG inside a TCG guest is far too slow, and
/// what these tests prove does not depend on the kernel's hook tiers.
pub fn skip_unless_libvirt(test: &str) -> bool {
    if crate::skip_unless_root(test) {
        return true;
    }
    let env = std::env::var("BRIDGE_GUARD_ENV").ok();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if env.as_deref().is_some_and(|e| e != "host") || cmdline.contains("virtme") {
        crate::skip(
            test,
            crate::Need::Host,
            "the libvirt lab runs on the host only (this is a VM matrix guest)",
        );
        return true;
    }
    let missing = netlab::libvirt::missing_programs();
    if let Some(first) = missing.first() {
        crate::skip(
            test,
            crate::Need::Tool(first),
            format_args!(
                "needs libvirt ({} not found); `cargo xtask test` installs it",
                missing.join(", ")
            ),
        );
        return true;
    }
    false
}
