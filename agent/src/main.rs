//! The `idgate` command line: a thin layer over the library's modules.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "idgate", about = "Identity-aware host firewall", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version and whether this build carries its eBPF programs.
    Version,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Version => {
            println!(
                "idgate {} (eBPF programs {})",
                env!("CARGO_PKG_VERSION"),
                if idgate::dataplane::has_programs() {
                    "embedded"
                } else {
                    "missing: built without bpf-linker"
                }
            );
            Ok(())
        }
    }
}
