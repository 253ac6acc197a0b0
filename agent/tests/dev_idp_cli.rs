//! `idgate dev-idp` as a process: the warning, the `READY` line, tokens that idgate's verifier
//! accepts, a clean exit on SIGTERM, and a refused clients file.

mod common;

use std::{
    io::Read as _,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use common::{DEADLINE, IDGATE, Running, ready_lines};
use idgate::identity::{IssuerSettings, Verifier};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/devidp.example.toml");

#[tokio::test]
async fn serves_tokens_the_verifier_accepts_and_stops_on_sigterm() {
    let mut child = Running(
        Command::new(IDGATE)
            .args(["dev-idp", "--listen", "127.0.0.1:0", "--config", EXAMPLE])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting idgate"),
    );
    let rx = ready_lines(&mut child.0);
    let mut stderr = child.0.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let issuer = rx.recv_timeout(DEADLINE).expect("a READY line");
    assert!(issuer.starts_with("http://127.0.0.1:"), "{issuer}");
    assert!(
        !issuer.ends_with(":0"),
        "the issuer names the real port: {issuer}"
    );

    let body = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{issuer}/token"))
        .basic_auth("alice", Some("alice-dev-secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = body["access_token"].as_str().expect("an access token");
    let mut settings = IssuerSettings::new(&issuer, ["api://idgate"]);
    settings.require_typ_at_jwt = true;
    let verifier = Verifier::new([settings]).unwrap();
    for (_, result) in verifier.refresh_all().await {
        result.unwrap();
    }
    let verified = verifier.verify(token).await.unwrap();
    assert_eq!(verified.user, "alice");
    assert_eq!(verified.groups, ["engineering", "ssh-users"]);

    // SAFETY: a plain system call to our own child, not yet waited for.
    let rc = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let stderr = stderr.join().unwrap();
    assert!(stderr.contains("DEVELOPMENT identity provider"), "{stderr}");
    assert!(
        stderr.contains("issued an access token"),
        "logged: {stderr}"
    );
}

#[test]
fn a_clients_file_with_an_unknown_key_is_refused() {
    let path = std::env::temp_dir().join(format!("idgate-devidp-bad-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        r#"
        [[clients]]
        client_id = "x"
        client_secret = "y"
        audience = "a"
        colour = "red"
        "#,
    )
    .unwrap();
    let out = Command::new(IDGATE)
        .args(["dev-idp", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(idgate::exit::CONFIG), "{stderr}");
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is served");
}
