//! The kernel BTF aya is handed to load fentry, fexit and tp_btf programs, cut down to the
//! names it looks up there.
//!
//! aya finds such a program's target by name in a parsed `Btf`: the function (`FUNC`), or the
//! tracepoint's `btf_trace_<name>` typedef. The kernel takes only the id it finds. A full
//! parse of vmlinux BTF cost ~19 MiB at peak (~72 bytes per type, for ~130,000 types) for a
//! dozen look-ups; it was the agent's peak memory. Our own reader (`btf`) finds the ids, and
//! the `Btf` handed over holds each target at its vmlinux id, with a placeholder (a `void *`)
//! at every id before the last one. aya gets the same ids, or the same "not found".

use std::path::Path;

use aya::{Btf, Endianness};

use super::{
    btf::{KIND_FUNC, KIND_PTR, KIND_TYPEDEF, MAGIC, RawBtf},
    hooks::{self, Prog},
};

#[derive(Debug, thiserror::Error)]
pub enum AttachBtfError {
    #[error("cannot read {path}'s BTF: {source}")]
    Read {
        path: String,
        #[source]
        source: super::btf::BtfError,
    },
    #[error("cannot hand the targets' ids over to aya")]
    Build(#[source] aya::BtfError),
}

/// What aya looks up for the hooks' programs: `(kind, name)`.
fn lookups() -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = hooks::every_prog()
        .filter_map(|p| match p {
            Prog::FEntry(_, f) | Prog::FExit(_, f) => Some((KIND_FUNC, f.to_owned())),
            Prog::TpBtf(_, tp) => Some((KIND_TYPEDEF, format!("btf_trace_{tp}"))),
            Prog::KProbe(..) | Prog::RawTp(..) => None,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The hooks' targets found in `vmlinux` (a raw BTF file), each at its id, as an aya `Btf`.
pub fn read(vmlinux: &Path) -> Result<Btf, AttachBtfError> {
    let wanted = lookups();
    let found: Vec<(u32, u32, &str)> = {
        let raw = RawBtf::read(vmlinux, None).map_err(|source| AttachBtfError::Read {
            path: vmlinux.display().to_string(),
            source,
        })?;
        let keys: Vec<(u32, &str)> = wanted.iter().map(|(k, n)| (*k, n.as_str())).collect();
        raw.first_ids(&keys)
            .into_iter()
            .zip(&wanted)
            .filter_map(|(id, (k, n))| Some((id?, *k, n.as_str())))
            .collect()
        // The raw file (~6 MiB) goes here, before the blob is made.
    };
    Btf::parse(&blob(found), Endianness::default()).map_err(AttachBtfError::Build)
}

/// A raw BTF with each `(id, kind, name)` at its id, every other id up to the last a `void *`.
fn blob(mut found: Vec<(u32, u32, &str)>) -> Vec<u8> {
    found.sort_unstable();
    let mut strings = vec![0u8];
    let mut types: Vec<u32> = Vec::new();
    let mut next = 1;
    for (id, kind, name) in found {
        if id < next {
            continue;
        }
        while next < id {
            types.extend([0, KIND_PTR << 24, 0]);
            next += 1;
        }
        let name_off = u32::try_from(strings.len()).unwrap_or(0);
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
        // Its type (a FUNC's prototype, a typedef's target) is left 0: aya looks only at kind
        // and name, and the kernel checks the target against its own BTF.
        types.extend([name_off, kind << 24, 0]);
        next += 1;
    }
    let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let (Ok(type_len), Ok(str_len)) = (
        u32::try_from(type_bytes.len()),
        u32::try_from(strings.len()),
    ) else {
        return Vec::new();
    };
    let mut d = Vec::with_capacity(24 + type_bytes.len() + strings.len());
    d.extend(MAGIC.to_ne_bytes());
    d.extend([1u8, 0]);
    for v in [24u32, 0, type_len, type_len, str_len] {
        d.extend(v.to_ne_bytes());
    }
    d.extend(type_bytes);
    d.extend(strings);
    d
}

#[cfg(test)]
mod tests {
    use aya_obj::btf::BtfKind;

    use super::*;

    /// On this kernel, every target aya looks up has the id a full parse of vmlinux gives it,
    /// and one vmlinux lacks (a module's function) is missing from both.
    #[test]
    fn aya_finds_the_ids_a_full_parse_gives() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!(
                "SKIP aya_finds_the_ids_a_full_parse_gives: no {}",
                path.display()
            );
            return;
        }
        let cut = read(path).expect("cut down");
        let full = Btf::parse_file(path, Endianness::default()).expect("full parse");
        let mut found = 0;
        for (kind, name) in lookups() {
            let kind = if kind == KIND_FUNC {
                BtfKind::Func
            } else {
                BtfKind::Typedef
            };
            let a = cut.id_by_type_name_kind(&name, kind).ok();
            let b = full.id_by_type_name_kind(&name, kind).ok();
            assert_eq!(a, b, "{name}");
            found += usize::from(a.is_some());
        }
        assert!(found > 0, "no target found in this kernel's BTF");
    }

    #[test]
    fn placeholders_keep_ids_and_unknown_names_stay_unknown() {
        let found = vec![(5, KIND_FUNC, "f"), (3, KIND_TYPEDEF, "btf_trace_t")];
        let btf = Btf::parse(&blob(found), Endianness::default()).expect("parses");
        assert_eq!(btf.id_by_type_name_kind("f", BtfKind::Func).ok(), Some(5));
        assert_eq!(
            btf.id_by_type_name_kind("btf_trace_t", BtfKind::Typedef)
                .ok(),
            Some(3)
        );
        assert!(btf.id_by_type_name_kind("g", BtfKind::Func).is_err());
    }
}
