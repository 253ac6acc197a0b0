//! `cargo xtask install [--prefix DIR]` and `cargo xtask package` (a Debian package, cargo-deb).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

/// The systemd unit, relative to the workspace root.
pub const UNIT: &str = "packaging/idgate.service";
/// The annotated example configuration, relative to the workspace root.
pub const EXAMPLE_CONFIG: &str = "agent/idgate.example.toml";
/// cargo-deb, pinned: 3.8.0 declares rust-version 1.85 and builds with our 1.95.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Where `install` puts things.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// The binary's directory.
    pub bin_dir: PathBuf,
    /// The unit's directory.
    pub unit_dir: PathBuf,
    /// The configuration's directory.
    pub config_dir: PathBuf,
}

impl Layout {
    /// Without a prefix: /usr/bin, /etc/systemd/system, /etc/idgate. With one: PREFIX/bin,
    /// PREFIX/lib/systemd/system, PREFIX/etc/idgate.
    pub fn new(prefix: Option<&Path>) -> Layout {
        match prefix {
            None => Layout {
                bin_dir: "/usr/bin".into(),
                unit_dir: "/etc/systemd/system".into(),
                config_dir: "/etc/idgate".into(),
            },
            Some(p) => Layout {
                bin_dir: p.join("bin"),
                unit_dir: p.join("lib/systemd/system"),
                config_dir: p.join("etc/idgate"),
            },
        }
    }
}

/// Installs `binary`, the unit and the example configuration from `root` (the workspace) into
/// `layout`; returns one line per file written. The unit's paths (/usr/bin/idgate,
/// /etc/idgate/) are rewritten to the layout's. The configuration is installed as idgate.toml
/// only if there is none, else as idgate.toml.example; mode 0640 either way.
pub fn install_files(root: &Path, binary: &Path, layout: &Layout) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for dir in [&layout.bin_dir, &layout.unit_dir, &layout.config_dir] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    let bin = layout.bin_dir.join("idgate");
    // Copy then rename: replacing a running binary in place fails (ETXTBSY).
    let staged = layout.bin_dir.join(".idgate.new");
    fs::copy(binary, &staged).with_context(|| format!("copying {}", binary.display()))?;
    set_mode(&staged, 0o755)?;
    fs::rename(&staged, &bin).with_context(|| format!("installing {}", bin.display()))?;
    done.push(format!("{} (0755)", bin.display()));

    let unit_src =
        fs::read_to_string(root.join(UNIT)).with_context(|| format!("reading {UNIT}"))?;
    let unit = unit_src
        .replace("/usr/bin/idgate", path_str(&bin)?)
        .replace(
            "/etc/idgate/",
            &format!("{}/", path_str(&layout.config_dir)?),
        );
    let unit_path = layout.unit_dir.join("idgate.service");
    write(&unit_path, unit.as_bytes(), 0o644)?;
    done.push(format!("{} (0644)", unit_path.display()));

    let example =
        fs::read(root.join(EXAMPLE_CONFIG)).with_context(|| format!("reading {EXAMPLE_CONFIG}"))?;
    let config = layout.config_dir.join("idgate.toml");
    let target = if config.exists() {
        layout.config_dir.join("idgate.toml.example")
    } else {
        config
    };
    write(&target, &example, 0o640)?;
    done.push(format!("{} (0640)", target.display()));
    Ok(done)
}

/// `cargo xtask install`: a release build, then [`install_files`]; systemd reloads its units
/// when it runs (a system install only).
pub fn install(root: &Path, prefix: Option<&Path>) -> Result<()> {
    crate::cargo(&["build", "--release", "-p", "idgate"])?;
    let layout = Layout::new(prefix);
    for line in install_files(root, &root.join("target/release/idgate"), &layout)? {
        println!("installed {line}");
    }
    if prefix.is_none() && Path::new("/run/systemd/system").is_dir() {
        crate::run(Command::new("systemctl").arg("daemon-reload"))?;
        println!(
            "systemd reloaded: edit /etc/idgate/idgate.toml, then `systemctl enable --now idgate`"
        );
    }
    Ok(())
}

/// `cargo xtask package`: installs cargo-deb if missing, then builds the .deb (release build,
/// eBPF programs required) into target/debian/.
pub fn package() -> Result<()> {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        crate::run(Command::new("cargo").args([
            "install",
            &format!("cargo-deb@{CARGO_DEB_VERSION}"),
            "--locked",
        ]))?;
    }
    crate::cargo(&["deb", "-p", "idgate"])
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_into_a_prefix_and_keeps_an_existing_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let prefix = std::env::temp_dir().join(format!("idgate-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&prefix);
        let fake_bin = prefix.join("built-idgate");
        fs::create_dir_all(&prefix).unwrap();
        fs::write(&fake_bin, b"#!/bin/sh\n").unwrap();
        let layout = Layout::new(Some(&prefix));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;

        let lines = install_files(root, &fake_bin, &layout).unwrap();
        assert_eq!(lines.len(), 3);
        let bin = prefix.join("bin/idgate");
        assert_eq!(mode(&bin), 0o755);
        let unit = fs::read_to_string(prefix.join("lib/systemd/system/idgate.service")).unwrap();
        let exec = format!(
            "ExecStart={} run --config {}/etc/idgate/idgate.toml",
            bin.display(),
            prefix.display()
        );
        assert!(unit.contains(&exec), "{unit}");
        assert!(!unit.contains("/usr/bin/idgate"));
        let config = prefix.join("etc/idgate/idgate.toml");
        assert_eq!(mode(&config), 0o640);
        assert!(!prefix.join("etc/idgate/idgate.toml.example").exists());

        // A second install keeps the edited configuration and writes the example beside it.
        fs::write(&config, "# edited\n").unwrap();
        install_files(root, &fake_bin, &layout).unwrap();
        assert_eq!(fs::read_to_string(&config).unwrap(), "# edited\n");
        let example = prefix.join("etc/idgate/idgate.toml.example");
        assert_eq!(mode(&example), 0o640);
        assert_eq!(
            fs::read(&example).unwrap(),
            fs::read(root.join(EXAMPLE_CONFIG)).unwrap()
        );
        fs::remove_dir_all(&prefix).unwrap();
    }

    #[test]
    fn system_layout() {
        assert_eq!(
            Layout::new(None),
            Layout {
                bin_dir: "/usr/bin".into(),
                unit_dir: "/etc/systemd/system".into(),
                config_dir: "/etc/idgate".into(),
            }
        );
    }
}
