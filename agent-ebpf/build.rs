use which::which;

/// Rebuilds the programs when `bpf-linker` changes: cargo cannot see that dependency on its own.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
