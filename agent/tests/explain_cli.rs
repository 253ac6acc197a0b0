//! `idgate policy explain --token`: a real token from `idgate dev-idp` is verified against the
//! configured issuer (keys fetched over HTTP) and explained per service, without any data plane.

mod common;

use std::process::{Command, Stdio};

use common::{DEADLINE, IDGATE, Running, ready_lines};

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/devidp.example.toml");

fn start_dev_idp() -> (Running, String) {
    let mut child = Running(
        Command::new(IDGATE)
            .args(["dev-idp", "--listen", "127.0.0.1:0", "--config", CLIENTS])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting idgate dev-idp"),
    );
    let rx = ready_lines(&mut child.0);
    let issuer = rx.recv_timeout(DEADLINE).expect("a READY line");
    (child, issuer)
}

async fn token(issuer: &str, client: &str, secret: &str) -> String {
    let body = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{issuer}/token"))
        .basic_auth(client, Some(secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    body["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned()
}

fn config(issuer: &str) -> String {
    format!(
        r#"
[dataplane]
interfaces = [{{ name = "eth0" }}]

[[services]]
name = "api"
protocol = "tcp"
port = 8000

[[issuers]]
issuer = "{issuer}"
audiences = ["api://idgate"]
algorithms = ["ES256"]
allow_http = true
require_typ_at_jwt = true
group_claims = [{{ path = "groups" }}]

[session_endpoint]
listen = "127.0.0.1:8443"

[policy]
default = "drop"

[[policy.rules]]
name = "engineers"
sources = ["group:engineering"]
services = ["api"]
action = "allow"
"#
    )
}

/// Runs `policy explain --token` and returns (exit code, stdout, stderr).
fn explain(dir: &std::path::Path, issuer: &str, token_text: &str) -> (i32, String, String) {
    let config_path = dir.join("idgate.toml");
    std::fs::write(&config_path, config(issuer)).unwrap();
    let token_path = dir.join("token");
    std::fs::write(&token_path, token_text).unwrap();
    let out = Command::new(IDGATE)
        .args(["policy", "explain", "--config"])
        .arg(&config_path)
        .arg("--token")
        .arg(&token_path)
        .args(["--source", "192.0.2.2", "--output", "json"])
        .output()
        .expect("running idgate policy explain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_verified_token_is_explained_per_service() {
    let (_idp, issuer) = start_dev_idp();
    let dir = std::env::temp_dir().join(format!("idgate-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // alice is in `engineering`: the rule matches.
    let alice = token(&issuer, "alice", "alice-dev-secret").await;
    let (code, stdout, stderr) = explain(&dir, &issuer, &alice);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("\"engineers\""), "{stdout}");
    assert!(
        stdout.contains("alice"),
        "the explanation names the user: {stdout}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON output");
    assert!(
        json.to_string().contains("\"matched\""),
        "the engineers rule is reported as matched: {json}"
    );

    // bob is not: the default decides, and the rule is reported as not matching.
    let bob = token(&issuer, "bob", "bob-dev-secret").await;
    let (code, stdout, stderr) = explain(&dir, &issuer, &bob);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_ne!(stdout, "", "an explanation for bob");
    assert!(
        stdout.contains("bob") && !stdout.contains("\"alice\""),
        "{stdout}"
    );

    // A tampered token is refused with its reason, and nothing is explained.
    let mut tampered = alice.clone();
    tampered.pop();
    tampered.push(if alice.ends_with('A') { 'B' } else { 'A' });
    let (code, stdout, stderr) = explain(&dir, &issuer, &tampered);
    assert_eq!(code, 65, "a refused token is bad input; stderr: {stderr}");
    assert!(
        stderr.contains("bad_signature") || stderr.contains("malformed"),
        "{stderr}"
    );
    assert_eq!(stdout, "");
    let _ = std::fs::remove_dir_all(&dir);
}
