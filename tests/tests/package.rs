//! The Debian package installs, enables and goes away cleanly.
//!
//! The test builds the package the way a user does (`cargo xtask package`: a release build with
//! the eBPF programs, then cargo-deb, installed first if missing), inspects it with `dpkg-deb`,
//! installs it for real with `dpkg -i`, then removes it (`dpkg -r`) and purges it
//! (`dpkg --purge`), checking the system after each step:
//!
//! - the archive holds the binary, the unit, the configuration as a 0640 conffile, the docs, and
//!   the maintainer scripts of packaging/debian/ byte for byte;
//! - once installed, `dpkg` reports it installed, `/usr/bin/idgate version` runs with its eBPF
//!   programs embedded, the unit and the configuration are the repository's files, the shipped
//!   configuration passes `idgate check-config`, the service is enabled (the WantedBy= symlink,
//!   as `deb-systemd-helper` and `systemctl is-enabled` see it) and not started;
//! - installing it again (an upgrade's path through the scripts) keeps an edited conffile and the
//!   enablement;
//! - removal takes the binary, the unit and the docs, keeps the edited conffile and masks the
//!   vanished unit; purge leaves no file, symlink, mask or deb-systemd-helper record behind.
//!
//! systemd is not PID 1 where this runs (CI containers, VMs booted without it): enabling must
//! then still work, which is what an image build or a chroot install relies on. Starting the
//! service is left to a host with systemd; the unit itself is checked in systemd_unit.rs.
//!
//! Needs root, dpkg and the build toolchain (`cargo xtask setup`), and changes the machine: it
//! refuses to run over an idgate installed some other way (`cargo xtask install`), purges a
//! previously installed idgate package first, and purges its own even when an assertion fails.
//! Building the release package takes a few minutes.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail, ensure};
use idgate_tests::run::require_root;

const PACKAGE: &str = "idgate";
const BIN: &str = "/usr/bin/idgate";
const UNIT: &str = "/lib/systemd/system/idgate.service";
const CONFIG: &str = "/etc/idgate/idgate.toml";
const CONFIG_DIR: &str = "/etc/idgate";
/// The symlink enabling the unit (its [Install] section says WantedBy=multi-user.target).
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/idgate.service";
/// Where a mask of the unit would be.
const MASK: &str = "/etc/systemd/system/idgate.service";
/// deb-systemd-helper's records of what it enabled and masked.
const DSH_STATE: [&str; 2] = [
    "/var/lib/systemd/deb-systemd-helper-enabled",
    "/var/lib/systemd/deb-systemd-helper-masked",
];
const DOCS: [&str; 3] = [
    "/usr/share/doc/idgate/README.md",
    "/usr/share/doc/idgate/examples/idgate.toml",
    "/usr/share/doc/idgate/copyright",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

fn repo_file(rel: &str) -> Vec<u8> {
    let path = root().join(rel);
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn show(cmd: &Command, o: &Output) -> String {
    format!(
        "{cmd:?}: {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `program args`, stdin closed, and returns its output whatever its exit status.
fn output(program: &str, args: &[&str]) -> Result<(Output, String)> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .env("DEBIAN_FRONTEND", "noninteractive");
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    let shown = show(&cmd, &out);
    Ok((out, shown))
}

/// Runs `program args` and returns its stdout; fails unless it exits 0.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let (out, shown) = output(program, args)?;
    ensure!(out.status.success(), "{shown}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// dpkg's idea of the package: `Some("install ok installed 0.1.0")`, or `None` when it knows
/// nothing of it (never installed, or purged).
fn dpkg_status() -> Result<Option<String>> {
    let (out, shown) = output(
        "dpkg-query",
        &["--show", "--showformat=${Status} ${Version}", PACKAGE],
    )?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()));
    }
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("no packages found matching"),
        "{shown}"
    );
    Ok(None)
}

/// Whether anything (a file, a directory, a symlink, dangling or not) is at `path`.
fn present(path: &str) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn mode(path: &str) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

/// Purges the package when dropped unless disarmed: nothing stays installed if the test fails.
struct PurgeOnDrop {
    armed: bool,
}

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if self.armed {
            match output("dpkg", &["--purge", PACKAGE]) {
                Ok((out, _)) if out.status.success() => {}
                Ok((_, shown)) => eprintln!("cleanup failed, purge idgate by hand: {shown}"),
                Err(e) => eprintln!("cleanup failed, purge idgate by hand: {e:#}"),
            }
        }
    }
}

/// `cargo xtask package` from the workspace root; returns the .deb it wrote.
fn build_package() -> Result<PathBuf> {
    let started = SystemTime::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["xtask", "package"])
        .current_dir(root())
        .stdin(Stdio::null());
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{}", show(&cmd, &out));

    // cargo-deb writes into <target dir>/debian, the target dir being cargo's (CARGO_TARGET_DIR
    // or build.target-dir included): ask cargo where that is.
    let meta = run(
        &cargo,
        &[
            "metadata",
            "--format-version=1",
            "--no-deps",
            "--manifest-path",
            root().join("Cargo.toml").to_str().context("a UTF-8 path")?,
        ],
    )?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("cargo metadata's JSON")?;
    let debian = Path::new(
        meta["target_directory"]
            .as_str()
            .context("cargo metadata: no target_directory")?,
    )
    .join("debian");
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(&debian).with_context(|| format!("listing {}", debian.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("idgate_") && name.ends_with(".deb") {
            let mtime = fs::metadata(&path)?.modified()?;
            if newest.as_ref().is_none_or(|(t, _)| mtime > *t) {
                newest = Some((mtime, path));
            }
        }
    }
    let Some((mtime, deb)) = newest else {
        bail!("no idgate_*.deb in {}", debian.display());
    };
    ensure!(
        mtime >= started,
        "{} predates the build: cargo xtask package wrote no new package",
        deb.display()
    );
    Ok(deb)
}

/// `dpkg-deb -c`: each path in the archive (without the leading "."), with its mode string
/// and owner.
fn contents(deb: &str) -> Result<Vec<(String, String, String)>> {
    Ok(run("dpkg-deb", &["--contents", deb])?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let path = f.get(5)?.strip_prefix('.')?.trim_end_matches('/');
            Some((path.to_owned(), f[0].to_owned(), f[1].to_owned()))
        })
        .collect())
}

fn inspect(deb: &str) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let fields = run(
        "dpkg-deb",
        &[
            "--field",
            deb,
            "Package",
            "Version",
            "Architecture",
            "Depends",
        ],
    )?;
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("Package"), PACKAGE, "{fields}");
    let deb_version = field("Version");
    assert!(
        deb_version == version || deb_version.starts_with(&format!("{version}-")),
        "the package's version {deb_version:?} is not the workspace's {version}"
    );
    let arch = run("dpkg", &["--print-architecture"])?;
    assert_eq!(field("Architecture"), arch.trim(), "{fields}");
    // $auto: the binary's shared libraries.
    assert!(field("Depends").contains("libc6"), "{fields}");

    let files = contents(deb)?;
    let entry = |path: &str| {
        files
            .iter()
            .find(|(p, _, _)| p == path)
            .unwrap_or_else(|| panic!("{path} is not in the package: {files:#?}"))
    };
    for (path, perms) in [
        (BIN, "-rwxr-xr-x"),
        (UNIT, "-rw-r--r--"),
        (CONFIG, "-rw-r-----"),
        (DOCS[0], "-rw-r--r--"),
        (DOCS[1], "-rw-r--r--"),
        (DOCS[2], "-rw-r--r--"),
    ] {
        let (_, p, owner) = entry(path);
        assert_eq!(p, perms, "{path}'s mode");
        // cargo-deb writes numeric owners, dpkg-deb -b names.
        assert!(
            owner == "0/0" || owner == "root/root",
            "{path}'s owner: {owner}"
        );
    }
    // Nothing outside the expected trees (no stray build artefacts).
    for (path, _, _) in &files {
        assert!(
            [
                "/usr/bin",
                "/lib/systemd/system",
                "/etc/idgate",
                "/usr/share/doc/idgate"
            ]
            .iter()
            .any(|top| path.starts_with(top) || top.starts_with(path.as_str())),
            "unexpected {path} in the package"
        );
    }

    let conffiles = run("dpkg-deb", &["--info", deb, "conffiles"])?;
    assert_eq!(
        conffiles.lines().map(str::trim).collect::<Vec<_>>(),
        [CONFIG],
        "conffiles"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let shipped = run("dpkg-deb", &["--info", deb, script])?;
        assert_eq!(
            shipped.as_bytes(),
            repo_file(&format!("packaging/debian/{script}")),
            "the package's {script} is not packaging/debian/{script}"
        );
    }
    Ok(())
}

/// Runs dpkg, which must succeed without a warning: the only lines on its standard error may be
/// deb-systemd-helper's notes of the symlinks it made or removed (`expected` prefixes).
fn dpkg_cleanly(args: &[&str], expected: &[&str]) -> Result<()> {
    let (out, shown) = output("dpkg", args)?;
    ensure!(out.status.success(), "{shown}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        ensure!(
            expected.iter().any(|p| line.starts_with(p)),
            "unexpected line on dpkg's stderr: {line:?}\n{shown}"
        );
    }
    Ok(())
}

/// Whether a process runs /usr/bin/idgate (the unit's ExecStart=).
fn installed_binary_running() -> bool {
    fs::read_dir("/proc").is_ok_and(|dir| {
        dir.flatten()
            .any(|e| fs::read_link(e.path().join("exe")).is_ok_and(|exe| exe == Path::new(BIN)))
    })
}

/// Paths under `dir` (recursively, symlinks not followed) whose name mentions idgate.
fn idgate_entries(dir: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_name().to_string_lossy().contains("idgate") {
                found.push(path.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

fn check_installed() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let status = dpkg_status()?.context("dpkg knows nothing of idgate after dpkg -i")?;
    assert!(
        status.starts_with(&format!("install ok installed {version}")),
        "dpkg status: {status}"
    );
    let listed = run("dpkg", &["--listfiles", PACKAGE])?;
    for path in [BIN, UNIT, CONFIG] {
        assert!(
            listed.lines().any(|l| l == path),
            "dpkg -L lacks {path}:\n{listed}"
        );
    }

    // The installed binary runs, and is the release build with its programs.
    let out = run(BIN, &["version"])?;
    assert_eq!(
        out.trim(),
        format!("idgate {version} (eBPF programs embedded)"),
        "{BIN} version"
    );
    assert_eq!(mode(BIN), 0o755);

    assert_eq!(
        fs::read(UNIT)?,
        repo_file("packaging/idgate.service"),
        "{UNIT}"
    );
    assert_eq!(mode(UNIT), 0o644);

    // The configuration: the annotated example, readable by root only, and valid as shipped
    // (its TLS paths are only checked when `idgate run` starts).
    assert_eq!(
        fs::read(CONFIG)?,
        repo_file("agent/idgate.example.toml"),
        "{CONFIG}"
    );
    let meta = fs::metadata(CONFIG)?;
    assert_eq!(mode(CONFIG), 0o640, "{CONFIG}");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "{CONFIG}'s owner");
    let (out, shown) = output(BIN, &["check-config", "--config", CONFIG])?;
    assert_eq!(
        out.status.code(),
        Some(idgate::exit::OK),
        "the shipped configuration: {shown}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "configuration OK\n");
    for doc in DOCS {
        assert!(present(doc), "{doc} missing");
    }

    // Enabled: the WantedBy= symlink to the installed unit, as systemd at the next boot and
    // deb-systemd-helper (what postinst enables with) see it.
    let link = fs::read_link(WANTS).with_context(|| format!("{WANTS}: the unit is not enabled"))?;
    assert_eq!(
        fs::canonicalize(WANTS)?,
        fs::canonicalize(UNIT)?,
        "{WANTS} -> {}",
        link.display()
    );
    // deb-systemd-helper only answers maintainer scripts; this query changes nothing.
    let mut cmd = Command::new("deb-systemd-helper");
    cmd.args(["is-enabled", "idgate.service"])
        .env("DPKG_MAINTSCRIPT_PACKAGE", PACKAGE)
        .stdin(Stdio::null());
    let out = cmd.output().context("starting deb-systemd-helper")?;
    assert!(out.status.success(), "{}", show(&cmd, &out));
    let (out, shown) = output("systemctl", &["is-enabled", "idgate.service"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "enabled",
        "{shown}"
    );
    assert!(
        !present(MASK),
        "{MASK} exists: the unit is masked or shadowed"
    );

    // Enabled, not started.
    assert!(!installed_binary_running(), "{BIN} was started");
    Ok(())
}

/// After `dpkg -r`; `config` is what the conffile held.
fn check_removed(config: &[u8]) -> Result<()> {
    let status = dpkg_status()?.context("dpkg forgot idgate on dpkg -r")?;
    assert!(
        status.starts_with("deinstall ok config-files"),
        "dpkg status after dpkg -r: {status}"
    );
    for path in [BIN, UNIT] {
        assert!(!present(path), "{path} left after dpkg -r");
    }
    for doc in DOCS {
        assert!(!present(doc), "{doc} left after dpkg -r");
    }
    // The conffile stays until purge.
    assert_eq!(fs::read(CONFIG)?, config, "{CONFIG} after dpkg -r");
    // The unit file is gone: masked, so that the enablement kept for a reinstall points nowhere.
    assert_eq!(
        fs::read_link(MASK).with_context(|| format!("{MASK}: the removed unit is not masked"))?,
        Path::new("/dev/null")
    );
    Ok(())
}

fn check_purged() -> Result<()> {
    assert_eq!(dpkg_status()?, None, "dpkg still knows idgate after purge");
    let (out, _) = output("dpkg", &["--status", PACKAGE])?;
    assert!(!out.status.success(), "dpkg -s idgate succeeds after purge");
    for path in [
        BIN,
        UNIT,
        CONFIG,
        CONFIG_DIR,
        WANTS,
        MASK,
        "/usr/share/doc/idgate",
    ] {
        assert!(!present(path), "{path} left after purge");
    }
    for dir in ["/etc/systemd", DSH_STATE[0], DSH_STATE[1]] {
        let left = idgate_entries(dir);
        assert!(left.is_empty(), "left after purge under {dir}: {left:?}");
    }
    Ok(())
}

#[test]
fn package_installs_enables_and_purges_cleanly() -> Result<()> {
    require_root();

    // A previous package goes; an idgate installed some other way is not ours to delete.
    if dpkg_status()?.is_some() {
        run("dpkg", &["--purge", PACKAGE])?;
    }
    for path in [BIN, UNIT, CONFIG, WANTS, MASK] {
        ensure!(
            !present(path),
            "{path} exists but belongs to no idgate package (`cargo xtask install`?): remove \
             it first, this test installs and purges the package"
        );
    }

    let deb = build_package()?;
    let deb = deb.to_str().context("a UTF-8 path")?;
    inspect(deb)?;

    let mut guard = PurgeOnDrop { armed: true };
    dpkg_cleanly(&["--install", deb], &[&format!("Created symlink {WANTS} ")])?;
    check_installed()?;

    // Installing over itself (what an upgrade does: prerm upgrade, postinst configure with the
    // old version) keeps an administrator's edit of the conffile, and the enablement.
    let mut edited = fs::read(CONFIG)?;
    edited.extend_from_slice(b"\n# edited by tests/tests/package.rs\n");
    fs::write(CONFIG, &edited)?;
    dpkg_cleanly(&["--install", deb], &[])?;
    assert_eq!(fs::read(CONFIG)?, edited, "{CONFIG} after reinstalling");
    assert_eq!(mode(CONFIG), 0o640, "{CONFIG} after reinstalling");
    assert_eq!(fs::canonicalize(WANTS)?, fs::canonicalize(UNIT)?, "{WANTS}");
    assert!(!installed_binary_running(), "{BIN} was started");

    dpkg_cleanly(
        &["--remove", PACKAGE],
        &[&format!("Created symlink {MASK} ")],
    )?;
    check_removed(&edited)?;

    dpkg_cleanly(&["--purge", PACKAGE], &["Removed "])?;
    guard.armed = false;
    check_purged()
}
