//! The `idgate` binary of this build, for suites that drive it as a user would.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// `target/<profile>/idgate`, the calling test executable being `target/<profile>/deps/<name>`.
pub fn idgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("idgate"))
        .expect("target/<profile>");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p idgate` (or `cargo test --workspace`) first",
        bin.display()
    );
    bin
}

/// Runs `idgate args…` to completion (without `RUST_LOG`, so its output is the default).
pub fn idgate(args: &[&str]) -> Output {
    Command::new(idgate_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running idgate")
}

/// Exit code and both streams, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
