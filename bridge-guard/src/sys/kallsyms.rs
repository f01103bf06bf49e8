//! Kernel symbol addresses from `/proc/kallsyms` (real addresses need root or CAP_SYSLOG).

use std::{
    io::{self, BufRead as _, BufReader},
    path::Path,
};

/// A kernel symbol: its address and the module it lives in (`None`: built into vmlinux).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    pub module: Option<String>,
}

/// The address of the text symbol `name` in the kallsyms-format file at `path`, or `None` when
/// it is missing or shown as zero (addresses hidden from this process).
pub fn lookup(path: &Path, name: &str) -> io::Result<Option<u64>> {
    Ok(find(path, name)?.map(|s| s.addr))
}

/// Like [`lookup`], with the owning module.
pub fn find(path: &Path, name: &str) -> io::Result<Option<Symbol>> {
    let file = std::fs::File::open(path)?;
    for line in BufReader::new(file).lines() {
        let line = line?;
        let mut fields = line.split_ascii_whitespace();
        let (Some(addr), Some(_kind), Some(sym)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if sym == name {
            let module = fields
                .next()
                .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_owned());
            return Ok(u64::from_str_radix(addr, 16)
                .ok()
                .filter(|&a| a != 0)
                .map(|addr| Symbol { addr, module }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exact_names_only() {
        let dir = std::env::temp_dir().join(format!("bg-kallsyms-{}", std::process::id()));
        std::fs::write(
            &dir,
            "ffffffff8215cfd0 T br_set_state\nffffffff81245300 t br_set_state.cold\n\
             0000000000000000 t hidden_sym\nffffffff8215f260 t br_forward_delay_timer_expired\t[bridge]\n",
        )
        .expect("write");
        assert_eq!(
            lookup(&dir, "br_set_state").expect("read"),
            Some(0xffff_ffff_8215_cfd0)
        );
        assert_eq!(
            lookup(&dir, "br_forward_delay_timer_expired").expect("read"),
            Some(0xffff_ffff_8215_f260)
        );
        assert_eq!(
            find(&dir, "br_forward_delay_timer_expired")
                .expect("read")
                .and_then(|s| s.module),
            Some("bridge".to_owned())
        );
        assert_eq!(
            find(&dir, "br_set_state")
                .expect("read")
                .and_then(|s| s.module),
            None
        );
        assert_eq!(lookup(&dir, "hidden_sym").expect("read"), None);
        assert_eq!(lookup(&dir, "br_set").expect("read"), None);
        std::fs::remove_file(dir).expect("cleanup");
    }
}
