//! Kernel struct field offsets, resolved from BTF at start-up.
//!
//! Field offsets in `struct net_bridge_port` and friends differ between kernel versions and
//! configurations, so they are read from the running kernel's BTF (vmlinux, plus the bridge
//! module's split BTF where bridge is a module) and handed to the programs. A field BTF lacks
//! stays `ABSENT` and the programs skip it.

use std::path::{Path, PathBuf};

use bridge_guard_common::{ABSENT, Offsets};

use super::btf::{BtfError, BtfSet, RawBtf};

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("no kernel BTF at {path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    NoVmlinux { path: PathBuf },
    #[error("cannot read BTF {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: BtfError,
    },
}

/// One field the programs read: `(struct, dotted member path)`.
struct Field {
    name: &'static str,
    strukt: &'static str,
    path: &'static str,
    set: fn(&mut Offsets, u32),
}

const FIELDS: &[Field] = &[
    Field {
        name: "net_bridge_port.br",
        strukt: "net_bridge_port",
        path: "br",
        set: |o, v| o.port_br = v,
    },
    Field {
        name: "net_bridge_port.dev",
        strukt: "net_bridge_port",
        path: "dev",
        set: |o, v| o.port_dev = v,
    },
    Field {
        name: "net_bridge_port.state",
        strukt: "net_bridge_port",
        path: "state",
        set: |o, v| o.port_state = v,
    },
    Field {
        name: "net_bridge_port.forward_delay_timer",
        strukt: "net_bridge_port",
        path: "forward_delay_timer",
        set: |o, v| o.port_fd_timer = v,
    },
    Field {
        name: "net_bridge.dev",
        strukt: "net_bridge",
        path: "dev",
        set: |o, v| o.br_dev = v,
    },
    Field {
        name: "net_bridge.stp_enabled",
        strukt: "net_bridge",
        path: "stp_enabled",
        set: |o, v| o.br_stp_enabled = v,
    },
    Field {
        name: "net_device.name",
        strukt: "net_device",
        path: "name",
        set: |o, v| o.dev_name = v,
    },
    Field {
        name: "net_device.ifindex",
        strukt: "net_device",
        path: "ifindex",
        set: |o, v| o.dev_ifindex = v,
    },
    Field {
        name: "net_device.nd_net.net",
        strukt: "net_device",
        path: "nd_net.net",
        set: |o, v| o.dev_net = v,
    },
    Field {
        name: "net_device.priv_flags",
        strukt: "net_device",
        path: "priv_flags",
        set: |o, v| o.dev_priv_flags = v,
    },
    Field {
        name: "net.ns.inum",
        strukt: "net",
        path: "ns.inum",
        set: |o, v| o.net_inum = v,
    },
    Field {
        name: "timer_list.function",
        strukt: "timer_list",
        path: "function",
        set: |o, v| o.timer_function = v,
    },
];

/// The outcome of resolution: the offsets, which fields are missing, and the BTF files used.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub offsets: Offsets,
    pub absent: Vec<&'static str>,
    pub sources: Vec<PathBuf>,
}

impl Resolved {
    /// Every field absent: for running without BTF.
    pub fn none() -> Self {
        Self {
            offsets: Offsets::ABSENT,
            absent: FIELDS.iter().map(|f| f.name).collect(),
            sources: Vec::new(),
        }
    }
}

fn parse(path: &Path, base: Option<&RawBtf>) -> Result<RawBtf, OffsetError> {
    RawBtf::read(path, base).map_err(|source| OffsetError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Resolves every field from the BTF under `btf_dir` (normally `/sys/kernel/btf`).
pub fn resolve(btf_dir: &Path) -> Result<Resolved, OffsetError> {
    let vmlinux_path = btf_dir.join("vmlinux");
    if !vmlinux_path.exists() {
        return Err(OffsetError::NoVmlinux { path: vmlinux_path });
    }
    let vmlinux = parse(&vmlinux_path, None)?;
    let mut sources = vec![vmlinux_path];
    // Where bridge is a module its private structs may only be in the module's split BTF.
    let module_path = btf_dir.join("bridge");
    let module = if module_path.exists() {
        let btf = parse(&module_path, Some(&vmlinux))?;
        sources.push(module_path);
        Some(btf)
    } else {
        None
    };
    let btf = BtfSet::new(std::iter::once(&vmlinux).chain(module.as_ref()).collect());
    let mut offsets = Offsets::ABSENT;
    let mut absent = Vec::new();
    for field in FIELDS {
        match btf.member_offset(field.strukt, field.path) {
            Some(off) => (field.set)(&mut offsets, off),
            None => absent.push(field.name),
        }
    }
    Ok(Resolved {
        offsets,
        absent,
        sources,
    })
}

/// Offsets in `o` as `(field name, value)`, for `doctor`.
pub fn describe(o: &Offsets) -> Vec<(&'static str, Option<u32>)> {
    let values = [
        o.port_br,
        o.port_dev,
        o.port_state,
        o.port_fd_timer,
        o.br_dev,
        o.br_stp_enabled,
        o.dev_name,
        o.dev_ifindex,
        o.dev_net,
        o.dev_priv_flags,
        o.net_inum,
        o.timer_function,
    ];
    FIELDS
        .iter()
        .zip(values)
        .map(|(f, v)| (f.name, (v != ABSENT).then_some(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BTF_DIR: &str = "/sys/kernel/btf";

    /// The kernel's BTF, or `None` after the skip line for `test`.
    fn vmlinux(test: &str) -> Option<RawBtf> {
        let path = Path::new(BTF_DIR).join("vmlinux");
        if !path.exists() {
            eprintln!(
                "SKIP {test}: no {} on this kernel [needs btf]",
                path.display()
            );
            return None;
        }
        Some(RawBtf::read(&path, None).expect("vmlinux BTF parses"))
    }

    fn member_offset(raw: &RawBtf, strukt: &str, path: &str) -> Option<u32> {
        BtfSet::new(vec![raw]).member_offset(strukt, path)
    }

    #[test]
    fn resolves_every_field_on_this_kernel() {
        if vmlinux("resolves_every_field_on_this_kernel").is_none() {
            return;
        }
        let resolved = resolve(Path::new(BTF_DIR)).expect("resolves");
        assert!(resolved.absent.is_empty(), "absent: {:?}", resolved.absent);
        let o = resolved.offsets;
        // Facts that hold on every kernel since the fields were introduced: the first members
        // of these structs, and sizes that bound the others.
        assert_eq!(o.port_br, 0, "net_bridge_port.br is the first member");
        assert_eq!(o.port_dev, 8, "net_bridge_port.dev follows br");
        assert_eq!(
            o.timer_function, 24,
            "timer_list: hlist_node (16), expires (8), function"
        );
        assert_ne!(o.dev_name, o.dev_ifindex);
        assert!(o.port_state > o.port_dev && o.port_fd_timer > o.port_state);
    }

    #[test]
    fn anonymous_members_and_paths_resolve() {
        let Some(btf) = vmlinux("anonymous_members_and_paths_resolve") else {
            return;
        };
        // priv_flags sits inside an anonymous union/struct on current kernels; ns.inum and
        // nd_net.net are two-step paths.
        assert!(member_offset(&btf, "net_device", "priv_flags").is_some());
        let ns = member_offset(&btf, "net", "ns").expect("net.ns");
        let inum = member_offset(&btf, "ns_common", "inum").expect("ns_common.inum");
        assert_eq!(member_offset(&btf, "net", "ns.inum"), Some(ns + inum));
        assert_eq!(
            member_offset(&btf, "net_device", "nd_net.net"),
            member_offset(&btf, "net_device", "nd_net")
        );
    }

    #[test]
    fn missing_members_and_structs_are_none() {
        let Some(btf) = vmlinux("missing_members_and_structs_are_none") else {
            return;
        };
        assert_eq!(
            member_offset(&btf, "net_bridge_port", "no_such_field"),
            None
        );
        assert_eq!(
            member_offset(&btf, "no_such_struct_bridge_guard", "x"),
            None
        );
    }

    #[test]
    fn missing_btf_dir_is_a_clear_error() {
        let err = resolve(Path::new("/nonexistent/btf")).expect_err("fails");
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
