//! The block of docs/benchmarks.md that `cargo xtask vmtest` writes (the VM matrix's eBPF vs
//! netlink results): the bench regenerates everything else and keeps that block as it was.

pub const BEGIN: &str = "<!-- vmtest:begin -->";
pub const END: &str = "<!-- vmtest:end -->";

/// The empty block a fresh document carries.
pub fn empty_block() -> String {
    format!("{BEGIN}\n{END}")
}

/// `text`'s block from its begin marker to the end of its end marker, if it has both in order.
fn block(text: &str) -> Option<&str> {
    let start = text.find(BEGIN)?;
    let end = start + text[start..].find(END)? + END.len();
    text.get(start..end)
}

/// `new` with its vmtest block replaced by `old`'s, when the old document had one; `new` as
/// it is otherwise (a new document carries an empty block).
pub fn keep_vmtest_block(old: Option<&str>, new: &str) -> String {
    match (old.and_then(block), block(new)) {
        (Some(kept), Some(fresh)) => new.replacen(fresh, kept, 1),
        _ => new.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(block: &str) -> String {
        format!(
            "# Benchmarks\n\nnew numbers\n\n## Kernel matrix\n\n{block}\n\n## The shell guard\n"
        )
    }

    #[test]
    fn the_vm_matrix_block_survives_regeneration() {
        let kept = format!("{BEGIN}\n| kernel | tier |\n|---|---|\n| 6.1 | kprobe |\n{END}");
        let old = format!("# Benchmarks\n\nold numbers\n\n{kept}\ntrailer\n");
        let out = keep_vmtest_block(Some(&old), &doc(&empty_block()));
        assert_eq!(out, doc(&kept));
        assert!(!out.contains("old numbers"));
    }

    #[test]
    fn a_document_without_markers_gets_the_empty_block() {
        let fresh = doc(&empty_block());
        assert_eq!(keep_vmtest_block(None, &fresh), fresh);
        assert_eq!(keep_vmtest_block(Some("# old, no markers"), &fresh), fresh);
        // Markers out of order or half there are not a block: nothing is taken from them.
        let broken = format!("{END} stray {BEGIN} unterminated");
        assert_eq!(keep_vmtest_block(Some(&broken), &fresh), fresh);
    }
}
