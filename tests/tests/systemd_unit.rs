//! The systemd unit (packaging/idgate.service): `systemd-analyze verify` accepts it, and the exit
//! code its `RestartPreventExitStatus=` names is the one `idgate run` gives a broken
//! configuration.
//!
//! systemd is not PID 1 where these tests run (CI containers, VMs booted without it), so the unit
//! cannot be started: `systemd-analyze verify` (which parses the unit and checks that every
//! `Exec*=` binary exists) is all that can run. It is not skipped: a missing systemd-analyze is a
//! failure. Starting the unit, READY=1 and the watchdog under a real systemd are left to a host
//! with systemd as PID 1; the notification protocol itself is tested against the real daemon in
//! capabilities.rs.

use std::{fs, path::Path, process::Command};

const UNIT: &str = include_str!("../../packaging/idgate.service");

fn unit_value<'a>(key: &str) -> &'a str {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key}= missing from the unit"))
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let dir = std::env::temp_dir().join(format!("idgate-unit-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("a temp dir");
    // The binary at /usr/bin/idgate is not installed here: point the unit at the built one.
    let bin = env!("CARGO_BIN_EXE_idgate-run");
    let unit = UNIT.replace("/usr/bin/idgate", bin);
    assert_ne!(unit, UNIT, "the unit names /usr/bin/idgate");
    let path = dir.join("idgate.service");
    fs::write(&path, unit).expect("writing the unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd's tools) must be installed");
    fs::remove_dir_all(&dir).expect("removing the temp dir");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn unit_settings() {
    assert_eq!(unit_value("Type"), "notify");
    assert_eq!(
        unit_value("ExecStart"),
        "/usr/bin/idgate run --config /etc/idgate/idgate.toml"
    );
    assert_eq!(unit_value("Restart"), "on-failure");
    assert_eq!(
        unit_value("RestartPreventExitStatus"),
        idgate::exit::CONFIG.to_string()
    );
    // The set capabilities.rs measures as the minimum.
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert_eq!(unit_value(key), "CAP_BPF CAP_NET_ADMIN CAP_PERFMON");
    }
}

/// `RestartPreventExitStatus=2` relies on this: a configuration error exits 2, so systemd does
/// not restart into the same error.
#[test]
fn a_broken_configuration_exits_with_the_config_code() {
    let dir = std::env::temp_dir().join(format!("idgate-badconf-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("a temp dir");
    let config = dir.join("idgate.toml");
    fs::write(&config, "[dataplane]\nno_such_key = 1\n").expect("writing");
    let missing = dir.join("missing.toml");
    for path in [config.as_path(), missing.as_path()] {
        let status = run(path);
        assert_eq!(status, Some(idgate::exit::CONFIG), "{}", path.display());
    }
    fs::remove_dir_all(&dir).expect("removing the temp dir");
}

fn run(config: &Path) -> Option<i32> {
    Command::new(env!("CARGO_BIN_EXE_idgate-run"))
        .arg("--config")
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("running idgate-run")
        .status
        .code()
}
