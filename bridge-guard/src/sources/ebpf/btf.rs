//! Just enough of a BTF reader to find struct member offsets: the raw file, and where each
//! type record starts. vmlinux BTF is ~6 MiB; a full parse into typed objects (btf-rs) costs
//! some 50 MiB at peak for a dozen look-ups done once at start-up.
//!
//! Format: `include/uapi/linux/btf.h` and Documentation/bpf/btf.rst. A split BTF (a module's)
//! continues its base's type ids and string offsets.

use std::path::Path;

pub const MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;

const KIND_INT: u32 = 1;
pub const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
pub const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
pub const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("not BTF (bad magic or a header shorter than {HEADER_MIN} bytes)")]
    NotBtf,
    #[error("its {section} section runs past the end of the file")]
    Truncated { section: &'static str },
    #[error("type {id} has kind {kind}, which this reader does not know")]
    UnknownKind { id: u32, kind: u32 },
}

/// One BTF file, indexed.
pub struct RawBtf {
    data: Vec<u8>,
    /// Byte offset in `data` of each type record, for ids `first_id..`.
    types: Vec<usize>,
    strings: std::ops::Range<usize>,
    /// The first type id and string offset this file defines (non-zero for a split BTF).
    first_id: u32,
    first_str: u32,
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

/// A type record, as the reader needs it.
#[derive(Clone, Copy)]
struct Ty {
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size_or_type`: the referenced type for modifiers and typedefs.
    type_id: u32,
}

impl RawBtf {
    /// Reads vmlinux's BTF (`base` = `None`) or a module's split BTF on top of `base`.
    pub fn read(path: &Path, base: Option<&RawBtf>) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(BtfError::Read)?;
        Self::parse(data, base)
    }

    pub fn parse(data: Vec<u8>, base: Option<&RawBtf>) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .ok_or(BtfError::NotBtf)?;
        if magic != MAGIC || data.len() < HEADER_MIN {
            return Err(BtfError::NotBtf);
        }
        let field = |i: usize| u32_at(&data, 4 + 4 * i).map(|v| v as usize);
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (field(0), field(1), field(2), field(3), field(4))
        else {
            return Err(BtfError::NotBtf);
        };
        let types_at = hdr_len + type_off;
        let types_end = types_at + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types_end > data.len() {
            return Err(BtfError::Truncated { section: "type" });
        }
        if strings.end > data.len() {
            return Err(BtfError::Truncated { section: "string" });
        }
        let (first_id, first_str) = match base {
            Some(b) => (b.next_id(), b.first_str + b.strings.len() as u32),
            None => (1, 0),
        };
        let mut types = Vec::new();
        let mut at = types_at;
        while at + 12 <= types_end {
            let info = u32_at(&data, at + 4).unwrap_or(0);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => {
                    return Err(BtfError::UnknownKind {
                        id: first_id + types.len() as u32,
                        kind,
                    });
                }
            };
            types.push(at);
            at += 12 + extra;
        }
        if at != types_end {
            return Err(BtfError::Truncated { section: "type" });
        }
        Ok(Self {
            data,
            types,
            strings,
            first_id,
            first_str,
        })
    }

    fn next_id(&self) -> u32 {
        self.first_id + self.types.len() as u32
    }

    /// The id of the first type of each `(kind, name)` in `wanted`, if this file has one: a
    /// single pass over its types.
    pub fn first_ids(&self, wanted: &[(u32, &str)]) -> Vec<Option<u32>> {
        let mut ids = vec![None; wanted.len()];
        let set = BtfSet::new(vec![self]);
        for (i, &at) in self.types.iter().enumerate() {
            let (Some(name_off), Some(info)) = (u32_at(&self.data, at), u32_at(&self.data, at + 4))
            else {
                continue;
            };
            let kind = (info >> 24) & 0x1f;
            if !wanted.iter().any(|&(k, _)| k == kind) {
                continue;
            }
            let name = set.name(name_off);
            for (slot, &(k, n)) in ids.iter_mut().zip(wanted) {
                if slot.is_none() && k == kind && n == name {
                    *slot = Some(self.first_id + i as u32);
                }
            }
        }
        ids
    }
}

/// vmlinux's BTF, and a module's split on top of it.
pub struct BtfSet<'a> {
    files: Vec<&'a RawBtf>,
}

impl<'a> BtfSet<'a> {
    pub fn new(files: Vec<&'a RawBtf>) -> Self {
        Self { files }
    }

    fn ty(&self, id: u32) -> Option<Ty> {
        let f = self
            .files
            .iter()
            .find(|f| id >= f.first_id && id < f.next_id())?;
        let at = *f.types.get((id - f.first_id) as usize)?;
        let info = u32_at(&f.data, at + 4)?;
        Some(Ty {
            at,
            name_off: u32_at(&f.data, at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 != 0,
            type_id: u32_at(&f.data, at + 8)?,
        })
    }

    /// The file type `id` lives in.
    fn file_of(&self, id: u32) -> Option<&'a RawBtf> {
        self.files
            .iter()
            .copied()
            .find(|f| id >= f.first_id && id < f.next_id())
    }

    fn name(&self, off: u32) -> &'a str {
        let Some(f) = self.files.iter().rev().find(|f| off >= f.first_str) else {
            return "";
        };
        let start = f.strings.start + (off - f.first_str) as usize;
        let Some(bytes) = f.data.get(start..f.strings.end) else {
            return "";
        };
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or("")
    }

    /// Strips typedefs and qualifiers down to the underlying type.
    fn underlying(&self, mut id: u32) -> Option<(u32, Ty)> {
        for _ in 0..16 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.type_id;
                }
                _ => return Some((id, t)),
            }
        }
        None
    }

    /// The first struct named `name` with members (not a forward declaration).
    fn find_struct(&self, name: &str) -> Option<u32> {
        self.files.iter().find_map(|f| {
            (0..f.types.len() as u32)
                .map(|i| f.first_id + i)
                .find(|&id| {
                    self.ty(id).is_some_and(|t| {
                        t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name
                    })
                })
        })
    }

    /// Bit offset and type id of member `name` in type `id`, searching anonymous members
    /// recursively, as C does.
    fn find_member(&self, id: u32, name: &str, depth: u8) -> Option<(u32, u32)> {
        let (id, t) = self.underlying(id)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        let f = self.file_of(id)?;
        for i in 0..t.vlen {
            let m = t.at + 12 + 12 * i;
            let (m_name, m_type, m_off) = (
                u32_at(&f.data, m)?,
                u32_at(&f.data, m + 4)?,
                u32_at(&f.data, m + 8)?,
            );
            // With kind_flag, the top 8 bits are a bitfield's size.
            let bits = if t.kind_flag {
                m_off & 0x00ff_ffff
            } else {
                m_off
            };
            let member_name = self.name(m_name);
            if member_name == name {
                return Some((bits, m_type));
            }
            if member_name.is_empty() && depth < 8 {
                if let Some((inner, ty)) = self.find_member(m_type, name, depth + 1) {
                    return Some((bits + inner, ty));
                }
            }
        }
        None
    }

    /// Byte offset of `path` (dot-separated members) inside struct `strukt`. `None` when any
    /// step is missing or the field does not start on a byte boundary.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Option<u32> {
        let mut current = self.find_struct(strukt)?;
        let mut bits = 0u32;
        for step in path.split('.') {
            let (off, ty) = self.find_member(current, step, 0)?;
            bits += off;
            current = ty;
        }
        bits.is_multiple_of(8).then_some(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF by hand: `struct s { int a; union { int b; }; struct t c; }`,
    /// `struct t { int x; int y; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0c\0t\0x\0y\0int\0".to_vec();
        let off = |name: &str| -> u32 {
            let pat = format!("\0{name}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .map_or(0, |p| (p + 1) as u32)
        };
        let mut types: Vec<u32> = Vec::new();
        // 1: int
        types.extend([off("int"), KIND_INT << 24, 4, 32]);
        // 2: struct t { int x @0; int y @32 }
        types.extend([off("t"), KIND_STRUCT << 24 | 2, 8]);
        types.extend([off("x"), 1, 0, off("y"), 1, 32]);
        // 3: union { int b }
        types.extend([0, KIND_UNION << 24 | 1, 4, off("b"), 1, 0]);
        // 4: const struct t
        types.extend([0, KIND_CONST << 24, 2]);
        // 5: struct s { int a @0; union @32; const t c @64 }
        types.extend([off("s"), KIND_STRUCT << 24 | 3, 16]);
        types.extend([off("a"), 1, 0, 0, 3, 32, off("c"), 4, 64]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut d = Vec::new();
        d.extend(MAGIC.to_ne_bytes());
        d.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            d.extend(v.to_ne_bytes());
        }
        d.extend(type_bytes);
        d.extend(strings);
        d
    }

    #[test]
    fn members_anonymous_members_and_paths() {
        let raw = RawBtf::parse(sample(), None).expect("parses");
        let btf = BtfSet::new(vec![&raw]);
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(
            btf.member_offset("s", "b"),
            Some(4),
            "inside the anonymous union"
        );
        assert_eq!(btf.member_offset("s", "c.y"), Some(12), "through a const");
        assert_eq!(btf.member_offset("s", "nope"), None);
        assert_eq!(btf.member_offset("nope", "a"), None);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            RawBtf::parse(vec![0; 64], None),
            Err(BtfError::NotBtf)
        ));
        let mut d = sample();
        d.truncate(40);
        assert!(matches!(
            RawBtf::parse(d, None),
            Err(BtfError::Truncated { .. })
        ));
    }
}
