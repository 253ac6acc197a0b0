//! `cargo xtask setup`: everything a fresh machine needs, each step skipped when already done.
//! See ../shared/TOOLCHAIN.md for where each piece comes from.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests and demo drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "ethtool",
    "bpftool",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The Node.js OpenID provider the identity tests run against (tests/assets/oidc).
const OIDC_ASSETS: &str = "tests/assets/oidc";
/// Written into node_modules after `npm ci`: a copy of the lockfile it installed. `npm ci` starts
/// by deleting node_modules, so an interrupted install leaves no stamp behind.
const OIDC_STAMP: &str = "node_modules/.idgate-installed-lockfile";

pub fn run(root: &Path) -> Result<()> {
    rust_src(root)?;
    nightly_clippy()?;
    apt_packages()?;
    bpf_linker()?;
    oidc_provider(root)?;
    Ok(())
}

fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("setup: {what}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("setup: {what} failed ({status})");
    }
    Ok(())
}

/// The nightly toolchain's rust-src, for `-Z build-std=core`.
fn rust_src(root: &Path) -> Result<()> {
    let sysroot = quiet(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing: `rustup toolchain install nightly`")?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if library.is_dir() {
        return Ok(());
    }
    let from_rustup = step(
        "rust-src for nightly",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    );
    if from_rustup.is_ok() && library.is_dir() {
        return Ok(());
    }
    // Offline fallback kept by the team beside the repository; it fits one exact nightly.
    let tarball = root.join("../shared/toolchain/rust-src-nightly-2026-05-20.tar.xz");
    if !tarball.is_file() {
        bail!(
            "rust-src for nightly could not be installed, and {} is absent",
            tarball.display()
        );
    }
    let dest = Path::new(sysroot.trim()).join("lib/rustlib/src");
    std::fs::create_dir_all(&dest)?;
    step(
        "rust-src from the team's offline copy",
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dest),
    )?;
    if !library.is_dir() {
        bail!(
            "rust-src extracted but {} is still missing",
            library.display()
        );
    }
    Ok(())
}

/// Clippy for the nightly toolchain, which lints the eBPF crate (`cargo xtask lint`).
fn nightly_clippy() -> Result<()> {
    if quiet(Command::new("cargo").args(["+nightly", "clippy", "--version"])).is_some() {
        return Ok(());
    }
    step(
        "clippy for nightly",
        Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]),
    )
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            quiet(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    step(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker() -> Result<()> {
    let installed = quiet(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if installed {
        return Ok(());
    }
    // LLVM_PREFIX matters: without it the build takes the first llvm-config on PATH (LLVM 14).
    step(
        &format!("cargo install bpf-linker@{BPF_LINKER_VERSION} (LLVM 22, static)"),
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22,llvm-link-static",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

/// `npm ci` for the test OpenID provider, skipped while node_modules was installed from exactly
/// the committed lockfile.
fn oidc_provider(root: &Path) -> Result<()> {
    let dir = root.join(OIDC_ASSETS);
    let lockfile = std::fs::read(dir.join("package-lock.json"))
        .with_context(|| format!("reading {OIDC_ASSETS}/package-lock.json"))?;
    let stamp = dir.join(OIDC_STAMP);
    if std::fs::read(&stamp).is_ok_and(|installed| installed == lockfile) {
        return Ok(());
    }
    if quiet(Command::new("npm").arg("--version")).is_none() {
        bail!(
            "npm is missing: the identity tests run an OpenID provider on Node.js (>= 20.19); \
             install Node.js with npm (e.g. `apt-get install nodejs npm`) and run this again"
        );
    }
    step(
        &format!("npm ci --prefix {OIDC_ASSETS}"),
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir),
    )?;
    std::fs::write(&stamp, &lockfile).with_context(|| format!("writing {}", stamp.display()))
}
