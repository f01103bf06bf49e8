//! Rebuild the programs when the linker changes: building them depends on `bpf-linker`, a binary
//! cargo cannot track as a dependency.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
