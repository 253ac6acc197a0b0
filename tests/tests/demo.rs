//! `cargo xtask demo` as a test: the demo binary runs end to end, narrates the key moments, and
//! leaves no namespace behind.
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use idgate_tests::run::require_root;

#[test]
fn the_demo_runs_end_to_end_and_cleans_up() {
    require_root();
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_idgate-demo"))
        .env("RUST_LOG", "warn,idgate::devidp=error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{all}",
        out.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        started.elapsed()
    );

    // The key moments, in order.
    let moments = [
        "== 1.",
        "alice (192.0.2.2) → 192.0.2.1:8000: connection refused",
        "== 2.",
        "session endpoint → 200: user alice",
        " login ",
        "\"srcuser\":\"alice\"",
        "== 3.",
        "HTTP 200 {\"hello\":\"from the API\"}",
        "== 4.",
        "session endpoint → 403: user bob",
        "bob (192.0.2.3) → 192.0.2.1:8000: connection refused",
        "== 5.",
        "admin → 200",
        "\"session_end_reason\":\"revoked\"",
        "== 6.",
        "alice (192.0.2.2) → 192.0.2.1:8000: connection refused",
        "idgate_logins_total{result=\"ok\",reason=\"allowed\"} 1",
        "done:",
    ];
    let mut rest = stdout.as_ref();
    for m in moments {
        let at = rest.find(m).unwrap_or_else(|| {
            panic!("{m:?} missing (or out of order) in the demo's output:\n{all}")
        });
        rest = &rest[at + m.len()..];
    }

    // Nothing left behind: the demo's namespaces are named idg-<its pid>-….
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    let prefix = format!("idg-{pid}-");
    assert!(
        !list.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left behind:\n{list}"
    );
}
