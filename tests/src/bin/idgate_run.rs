//! `idgate run` as a binary of this crate, so that integration tests get it built by the same
//! `cargo test` (as `CARGO_BIN_EXE_idgate-run`) and can run the real daemon in a process of its
//! own: with reduced capabilities as another user (tests/tests/capabilities.rs), or under
//! `$NOTIFY_SOCKET`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "idgate-run")]
struct Cli {
    #[command(flatten)]
    run: idgate::runtime::cli::RunArgs,
}

fn main() {
    std::process::exit(idgate::runtime::cli::run(Cli::parse().run));
}
