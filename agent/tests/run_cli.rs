//! `idgate run`, `idgate sessions` and `idgate whois` as processes, where no root is needed: a
//! configuration is refused before anything is loaded (every error, exit 2), and the admin
//! clients fail clearly without a daemon. The running daemon is covered by the privileged
//! `session_e2e` suite.

use std::process::{Command, Output};

const IDGATE: &str = env!("CARGO_BIN_EXE_idgate");

fn idgate(args: &[&str]) -> Output {
    Command::new(IDGATE)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running idgate")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("idgate-run-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_refuses_a_missing_or_invalid_configuration_with_exit_2() {
    let o = idgate(&["run", "--config", "/nonexistent/idgate.toml"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/idgate.toml"),
        "{}",
        stderr(&o)
    );

    // Two errors in different sections: both are reported.
    let bad = temp_file(
        "bad.toml",
        r#"
[dataplane]
interfaces = [{ name = "eth0", mode = "warp" }]

[[services]]
name = "api"
protocol = "tcp"
port = 8000

[[issuers]]
issuer = "http://idp.example.com"
audiences = ["idgate"]

[session_endpoint]
listen = "127.0.0.1:8443"

[policy]
default = "drop"
"#,
    );
    let o = idgate(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("2 configuration errors"), "{err}");
    assert!(err.contains("dataplane.interfaces[0].mode"), "{err}");
    assert!(err.contains("issuers[0].issuer"), "{err}");
}

#[test]
fn a_bad_log_filter_is_a_usage_error() {
    let o = idgate(&["run", "--log-level", "idgate=[", "--config", "/nonexistent"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
}

#[test]
fn admin_clients_say_when_no_daemon_answers() {
    let socket = std::env::temp_dir().join(format!("idgate-none-{}.sock", std::process::id()));
    let socket = socket.to_str().unwrap();
    // Exit 3: the agent is not running (no socket).
    let o = idgate(&["whois", "192.0.2.7", "--socket", socket]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("is idgate running"), "{}", stderr(&o));
    let o = idgate(&["sessions", "list", "--socket", socket]);
    assert_eq!(o.status.code(), Some(3));
    let o = idgate(&["sessions", "revoke", "--socket", socket]);
    assert_eq!(o.status.code(), Some(64), "revoke needs --source or --user");
}
