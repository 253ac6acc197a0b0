//! The `idgate` command against a running agent: `status`, `sessions list|revoke` and `whois`
//! (tables and `--output json`) over the admin socket, and the exit codes scripts rely on: 3 when
//! no agent answers, 4 when the socket refuses this user, 5 when whois finds nobody.
//!
//! The binary is `target/<profile>/idgate` next to this test's executable: `cargo test
//! --workspace` (and `cargo xtask test`) build it. The daemon itself runs in-process
//! ([`Daemon::start`]), in the server namespace of a [`Pair`].
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{net::SocketAddr, os::unix::fs::PermissionsExt as _, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use idgate_tests::{
    daemon::{Daemon, ENDPOINT, Hello, PROTECTED, config},
    idp::{Issuer, TestCa, TestIdp},
    netns::{Pair, unique_id},
    run::require_root,
};
use serde_json::Value;

use idgate_tests::binary::{idgate, idgate_bin, show};

/// Runs idgate and parses its stdout as JSON; fails unless it exits 0.
fn idgate_json(args: &[&str]) -> Result<Value> {
    let o = idgate(args);
    ensure!(o.status.success(), "idgate {args:?}: {}", show(&o));
    serde_json::from_slice(&o.stdout).with_context(|| format!("idgate {args:?}: {}", show(&o)))
}

/// Logs in from the client namespace with `token`; returns the endpoint's status.
fn login(pair: &Pair, ca_pem: &str, token: &str) -> Result<u16> {
    let url = format!("https://{}:{ENDPOINT}/v1/sessions", Pair::srv_addr(false));
    pair.cli.run_in(|| -> Result<u16> {
        let client = reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(client
            .post(&url)
            .bearer_auth(token)
            .send()?
            .status()
            .as_u16())
    })
}

/// Connects to the protected port from the client namespace and reads the greeting.
fn reach(pair: &Pair) -> bool {
    use std::io::Read as _;
    let addr = SocketAddr::new(Pair::srv_addr(false), PROTECTED);
    pair.cli.run_in(|| {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).is_ok() && &buf == b"hello\n"
    })
}

#[test]
fn status_sessions_and_whois_against_a_running_agent() {
    require_root();
    scenario().unwrap_or_else(|e| panic!("{e:#}"));
}

fn scenario() -> Result<()> {
    let pair = Pair::new()?;
    let ca = TestCa::new()?;
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca)?;
    let _hello = Hello::start(&pair.srv, SocketAddr::new(srv, PROTECTED))?;
    let cert = ca.server_cert("endpoint", srv)?;
    let socket = ca
        .dir()
        .join(format!("run-{}", unique_id()))
        .join("admin.sock");
    let daemon = Daemon::start(&pair.srv, &config(&pair, &idp, &cert, &socket))?;
    let sock = daemon
        .admin_socket()
        .to_str()
        .context("socket path")?
        .to_owned();
    let sock = sock.as_str();

    let token = pair
        .srv
        .run_in(|| idp.mint("alice", &["web"], Duration::from_secs(300)))?;
    ensure!(login(&pair, &ca.ca_pem(), &token)? == 200, "alice's login");
    let mut reached = false;
    for _ in 0..50 {
        if reach(&pair) {
            reached = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(reached, "port {PROTECTED} not open after the login");

    // status: the interface and how it is attached, the program, one session, the counters.
    let status = idgate_json(&["status", "--socket", sock, "--output", "json"])?;
    let iface = &status["interfaces"][0];
    ensure!(iface["name"] == pair.srv_if.as_str(), "{status:#}");
    ensure!(
        matches!(iface["mode"].as_str(), Some("xdp-native" | "xdp-generic")),
        "{status:#}"
    );
    ensure!(iface["program_id"].as_u64() > Some(0), "{status:#}");
    ensure!(status["sessions"] == 1, "{status:#}");
    ensure!(status["capacity"].as_u64() > Some(0), "{status:#}");
    let fastapi = status["counters"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["service"] == "fastapi"))
        .with_context(|| format!("no counters for fastapi: {status:#}"))?;
    ensure!(
        fastapi["reasons"]["session"]["packets"].as_u64() > Some(0),
        "{status:#}"
    );
    ensure!(
        fastapi["reasons"]["session"]["bytes"].as_u64() > Some(0),
        "{status:#}"
    );
    ensure!(
        status["issuers"][0]["keys"].as_u64() > Some(0),
        "{status:#}"
    );
    // The table names the same things.
    let o = idgate(&["status", "--socket", sock]);
    let table = String::from_utf8_lossy(&o.stdout);
    ensure!(o.status.success(), "{}", show(&o));
    ensure!(
        table.contains(&pair.srv_if) && table.contains("fastapi"),
        "{table}"
    );

    // sessions list
    let list = idgate_json(&["sessions", "list", "--socket", sock, "--output", "json"])?;
    let cli_addr = Pair::cli_addr(false).to_string();
    ensure!(list["count"] == 1, "{list:#}");
    ensure!(
        list["sessions"][0]["source"] == cli_addr.as_str(),
        "{list:#}"
    );
    ensure!(list["sessions"][0]["user"] == "alice", "{list:#}");
    let o = idgate(&["sessions", "list", "--socket", sock]);
    ensure!(
        String::from_utf8_lossy(&o.stdout).contains("alice"),
        "{}",
        show(&o)
    );

    // whois: the user; nobody behind another address is exit 5.
    let who = idgate_json(&["whois", &cli_addr, "--socket", sock, "--output", "json"])?;
    ensure!(who["user"] == "alice", "{who:#}");
    let o = idgate(&["whois", "192.0.2.99", "--socket", sock]);
    ensure!(o.status.code() == Some(5), "{}", show(&o));

    // revoke by user: gone, and the port closes.
    let o = idgate(&["sessions", "revoke", "--user", "alice", "--socket", sock]);
    ensure!(o.status.success(), "{}", show(&o));
    let list = idgate_json(&["sessions", "list", "--socket", sock, "--output", "json"])?;
    ensure!(list["count"] == 0, "{list:#}");
    let o = idgate(&["whois", &cli_addr, "--socket", sock]);
    ensure!(o.status.code() == Some(5), "{}", show(&o));

    daemon.stop()?;
    // The agent stopped: its socket is gone, exit 3.
    let o = idgate(&["status", "--socket", sock]);
    ensure!(o.status.code() == Some(3), "{}", show(&o));
    Ok(())
}

#[test]
fn no_agent_is_exit_3() {
    let missing = std::env::temp_dir().join(format!("idgate-cli-none-{}.sock", unique_id()));
    for args in [
        &["status"][..],
        &["sessions", "list"],
        &["whois", "192.0.2.7"],
        &["reload"],
    ] {
        let mut all = args.to_vec();
        all.extend(["--socket", missing.to_str().unwrap()]);
        let o = idgate(&all);
        assert_eq!(o.status.code(), Some(3), "{all:?}: {}", show(&o));
    }
}

/// A root-owned socket with mode 0600, asked by `nobody`: exit 4.
#[test]
fn a_socket_this_user_may_not_use_is_exit_4() {
    require_root();
    let dir = std::env::temp_dir().join(format!("idgate-cli-perm-{}", unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy nobody may run (the build tree may not be reachable for it).
    let bin = dir.join("idgate");
    std::fs::copy(idgate_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("admin.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();

    let o = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&bin)
        .args(["status", "--socket", socket.to_str().unwrap()])
        .output()
        .expect("running setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
}

#[test]
fn completions_and_usage_errors() {
    let o = idgate(&["completions", "bash"]);
    assert!(o.status.success(), "{}", show(&o));
    let script = String::from_utf8_lossy(&o.stdout);
    assert!(
        script.contains("idgate") && script.contains("complete"),
        "{script}"
    );
    let o = idgate(&["status", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(64), "{}", show(&o));
    let o = idgate(&["--help"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Exit codes:"),
        "{}",
        show(&o)
    );
}
