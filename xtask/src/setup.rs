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
    // Debian's python3 has no ensurepip without it, so `python3 -m venv` fails.
    "python3-venv",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The Node.js OpenID provider the identity tests run against (tests/assets/oidc).
const OIDC_ASSETS: &str = "tests/assets/oidc";
/// Written into node_modules after `npm ci`: a copy of the lockfile it installed. `npm ci` starts
/// by deleting node_modules, so an interrupted install leaves no stamp behind.
const OIDC_STAMP: &str = "node_modules/.idgate-installed-lockfile";
/// The Python client (clients/python) and its test dependencies go into this virtualenv.
const VENV: &str = "target/venv";
/// The Python client's directory.
const PYTHON_CLIENT: &str = "clients/python";
/// Written into the virtualenv after both installs succeeded: what they installed from.
const VENV_STAMP: &str = ".idgate-installed";

pub fn run(root: &Path) -> Result<()> {
    rust_src(root)?;
    nightly_clippy()?;
    apt_packages()?;
    bpf_linker()?;
    python_client(root)?;
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

/// The virtualenv with the Python client (editable) and its pinned test dependencies, skipped
/// while its stamp matches the requirements and the project file. The stamp is removed before
/// and written after the installs, so an interrupted one is redone.
fn python_client(root: &Path) -> Result<()> {
    let client = root.join(PYTHON_CLIENT);
    let mut wanted = Vec::new();
    for file in ["requirements-dev.txt", "pyproject.toml"] {
        let text = std::fs::read(client.join(file))
            .with_context(|| format!("reading {PYTHON_CLIENT}/{file}"))?;
        wanted.extend_from_slice(format!("== {file}\n").as_bytes());
        wanted.extend_from_slice(&text);
    }
    let venv = root.join(VENV);
    let python = venv.join("bin/python");
    let stamp = venv.join(VENV_STAMP);
    if python.is_file() && std::fs::read(&stamp).is_ok_and(|done| done == wanted) {
        return Ok(());
    }
    if !python.is_file() {
        step(
            &format!("python3 -m venv {VENV}"),
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        )
        .context("python3 with its venv module is needed for the Python client's tests")?;
    }
    if let Err(e) = std::fs::remove_file(&stamp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(e).with_context(|| format!("removing {}", stamp.display()));
    }
    let pip = |args: &[&str]| {
        let mut cmd = Command::new(&python);
        cmd.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(args)
        .current_dir(root);
        cmd
    };
    step(
        &format!("pip install -r {PYTHON_CLIENT}/requirements-dev.txt"),
        &mut pip(&["-r", &format!("{PYTHON_CLIENT}/requirements-dev.txt")]),
    )?;
    // Editable: the tests import the client from its sources, so an edit needs no reinstall.
    step(
        &format!("pip install -e {PYTHON_CLIENT}"),
        &mut pip(&["-e", PYTHON_CLIENT]),
    )?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))
}
