//! `cargo xtask`: set up the machine, build, test, benchmark and demonstrate idgate.

mod install;
mod setup;

use std::{
    env,
    ffi::OsString,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "idgate's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent; quick when already done).
    Setup,
    /// Build the agent, with its eBPF programs, in release mode.
    Build,
    /// Run every test: unit tests, eBPF verdict tests and the privileged end-to-end suites.
    Test {
        /// Arguments passed on to `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show idgate enforcing a protected port in network namespaces.
    Demo,
    /// Run a benchmark and print its table.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// rustfmt check, and clippy on the userspace crates and on the eBPF crate separately.
    Lint,
    /// Build in release mode and install the binary (/usr/bin/idgate), the systemd unit
    /// (/etc/systemd/system) and the example configuration (/etc/idgate/idgate.toml if absent,
    /// else idgate.toml.example; mode 0640).
    Install {
        /// Install under DIR instead: DIR/bin, DIR/lib/systemd/system, DIR/etc/idgate (the
        /// unit's paths are rewritten to match).
        #[arg(long, value_name = "DIR")]
        prefix: Option<PathBuf>,
    },
    /// Build a Debian package with cargo-deb (installed first if missing) into target/debian/.
    Package,
}

#[derive(Subcommand)]
enum Bench {
    /// ns/packet through BPF_PROG_TEST_RUN: floor, allowed, denied and unprotected paths.
    Verdict {
        /// Fewer sizes and repetitions: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// Token verifications per second against bare jsonwebtoken, and login → first SYN latency.
    Auth {
        /// Fewer repetitions: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// Every comparative benchmark below in one run; writes bench/REPORT.md and its charts.
    All {
        /// A seconds-long version: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// CPU per dropped packet under a SYN flood: idgate vs bare XDP, nftables, iptables.
    Drop {
        /// A seconds-long version: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// An authorized client's requests/s under flood: idgate vs nftables set vs HAProxy.
    Goodput {
        /// A seconds-long version: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// Clean-path tax: requests/s, p99 and iperf3 vs no filter and HAProxy jwt_verify.
    Clean {
        /// A seconds-long version: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// Session install rate, bytes per session and per-packet cost as sessions grow.
    Scale {
        /// A seconds-long version: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
    /// Time from revoke and from token expiry to the first dropped packet.
    Revoke {
        /// A seconds-long version: checks the harness runs, measures little.
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    put_cargo_bin_on_path();
    match cli.task {
        Task::Setup => setup::run(&root),
        Task::Build => {
            setup::run(&root)?;
            cargo(&["build", "--release", "-p", "idgate"])
        }
        Task::Test { args } => {
            setup::run(&root)?;
            require_root("the eBPF and end-to-end suites load programs and create namespaces")?;
            lint(&root)?;
            let mut cmd = vec!["test", "--workspace", "--exclude", "idgate-ebpf"];
            cmd.extend(args.iter().map(String::as_str));
            cargo_test(&cmd)
        }
        Task::Demo => {
            setup::run(&root)?;
            require_root("the demo attaches XDP programs and creates network namespaces")?;
            cargo(&[
                "run",
                "--release",
                "-p",
                "idgate-tests",
                "--bin",
                "idgate-demo",
            ])
        }
        Task::Bench { which } => {
            setup::run(&root)?;
            require_root("benchmarks load BPF programs")?;
            let (bin, suite, smoke) = match which {
                Bench::Verdict { smoke } => ("bench-verdict", None, smoke),
                Bench::Auth { smoke } => ("bench-auth", None, smoke),
                Bench::All { smoke } => ("bench", Some("all"), smoke),
                Bench::Drop { smoke } => ("bench", Some("drop"), smoke),
                Bench::Goodput { smoke } => ("bench", Some("goodput"), smoke),
                Bench::Clean { smoke } => ("bench", Some("clean"), smoke),
                Bench::Scale { smoke } => ("bench", Some("scale"), smoke),
                Bench::Revoke { smoke } => ("bench", Some("revoke"), smoke),
            };
            let mut cmd = vec!["run", "--release", "-p", "idgate-tests", "--bin", bin, "--"];
            cmd.extend(suite);
            if smoke {
                cmd.push("--smoke");
            }
            cargo(&cmd)
        }
        Task::Lint => lint(&root),
        Task::Install { prefix } => {
            setup::run(&root)?;
            install::install(&root, prefix.as_deref())
        }
        Task::Package => {
            setup::run(&root)?;
            install::package()
        }
    }
}

/// rustfmt, then clippy with warnings denied: on the userspace crates, and on the eBPF crate for
/// its own target (it cannot build for the host).
fn lint(root: &Path) -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "idgate-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    run(Command::new("cargo")
        .current_dir(root.join("agent-ebpf"))
        .args([
            "+nightly",
            "clippy",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        ))
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = env::var_os("CARGO_MANIFEST_DIR").context("run this through `cargo xtask`")?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`, which a fresh root shell (CI) may not
/// have on PATH.
fn put_cargo_bin_on_path() {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let Some(bin) = cargo_home.map(|h| h.join("bin")) else {
        return;
    };
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let mut paths = vec![bin];
    paths.extend(env::split_paths(&path));
    if let Ok(joined) = env::join_paths(paths) {
        set_path(joined);
    }
}

#[expect(
    unsafe_code,
    reason = "set_var is unsafe in edition 2024; xtask is single-threaded here"
)]
fn set_path(value: OsString) {
    // SAFETY: called at start-up, before xtask starts any thread.
    unsafe { env::set_var("PATH", value) };
}

fn require_root(why: &str) -> Result<()> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        bail!("run as root: {why}");
    }
    Ok(())
}

/// Runs cargo with the eBPF build required (no silent stub object).
fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo")
        .args(args)
        .env("IDGATE_REQUIRE_EBPF", "1"))
}

/// Runs `cargo test`, passing its output through, and closes with one line summing every test
/// binary's results (cargo prints one "test result" line per binary, the last often for an empty
/// doc-test run).
fn cargo_test(args: &[&str]) -> Result<()> {
    let mut child = Command::new("cargo")
        .args(args)
        .env("IDGATE_REQUIRE_EBPF", "1")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// The number just before `label` in a "test result" line (`ok. 3 passed; 0 failed; …`).
fn count_before(line: &str, label: &str) -> u64 {
    line.find(label)
        .and_then(|end| line[..end].rsplit([' ', '.']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
