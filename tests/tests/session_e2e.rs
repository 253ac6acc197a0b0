//! End to end through the session layer: idgate's daemon in the server namespace (native XDP on
//! its veth, a protected tcp/8000 with `drop`, the HTTPS session endpoint on 8443, the admin
//! socket), an IdP serving its keys over HTTPS in the same namespace, and a client namespace
//! that presents tokens and tries the protected port.
//!
//! The scenario takes any [`Issuer`]: [`TestIdp`] here; a real provider can run the same flow
//! through an adapter.
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hyper::Method;
use idgate_tests::{
    daemon::{Daemon, ENDPOINT, Hello, PROTECTED, config},
    idp::{Issuer, TestCa, TestIdp, now_secs},
    netns::{NetNs, Pair, unique_id},
    oidc::OidcIssuer,
    run::require_root,
};
use serde_json::Value;

/// A connect that gets no answer within this counts as blocked (the service drops).
const BLOCKED_WAIT: Duration = Duration::from_millis(400);
/// Upper bound of any poll.
const DEADLINE: Duration = Duration::from_secs(10);
/// The daemon's metrics address, on the server namespace's loopback.
const METRICS: &str = "127.0.0.1:9464";

/// One plain HTTP/1.0 GET from a thread in `ns`: status and body.
fn http_get(ns: &NetNs, addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::Write as _;
    let addr: SocketAddr = addr.parse()?;
    ns.run_in(|| -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status")?;
        Ok((status, body.to_owned()))
    })
}

/// The value of one series (`name{labels}` exactly as exposed) in a scrape.
fn series(scrape: &str, name: &str) -> Result<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no series {name} in\n{scrape}"))?
        .parse()
        .context("not a number")
}

/// Every line of the audit file, each parsed as a JSON object.
fn audit_lines(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}"))?;
            ensure!(v.is_object(), "not an object: {l}");
            ensure!(v["time"].is_string() && v["event"].is_string(), "{l}");
            Ok(v)
        })
        .collect()
}

/// Waits until a line of the audit file satisfies `pred`; returns it.
fn wait_audit_line(
    path: &std::path::Path,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    loop {
        if let Some(v) = audit_lines(path)?.into_iter().find(|v| pred(v)) {
            return Ok(v);
        }
        if start.elapsed() > DEADLINE {
            bail!("no audit line {what} in {}", path.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The client's view: the protected port and the session endpoint, from the client namespace.
struct Client<'a> {
    ns: &'a NetNs,
    server: IpAddr,
    ca_pem: String,
}

impl Client<'_> {
    /// Whether the protected port answers now.
    fn reaches(&self) -> bool {
        let addr = SocketAddr::new(self.server, PROTECTED);
        self.ns.run_in(|| {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, BLOCKED_WAIT) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 6];
            s.read_exact(&mut buf).is_ok() && &buf == b"hello\n"
        })
    }

    /// Polls until the protected port is (`open`) or is not reachable; returns when it was seen.
    fn wait_reach(&self, open: bool, what: &str) -> Result<Instant> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if self.reaches() == open {
                return Ok(Instant::now());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{what}: port {PROTECTED} still {}",
            if open { "blocked" } else { "open" }
        )
    }

    /// One call to the session endpoint over HTTPS, trusting only the test CA.
    fn call(&self, method: reqwest::Method, token: Option<&str>) -> Result<(u16, Value)> {
        let url = format!("https://{}:{ENDPOINT}/v1/sessions", self.server);
        let ca = self.ca_pem.clone();
        self.ns.run_in(move || -> Result<(u16, Value)> {
            // Built on this thread (in the client namespace), so its connections are made there.
            let client = reqwest::blocking::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()?;
            let mut req = client.request(method, &url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().context("calling the session endpoint")?;
            let status = resp.status().as_u16();
            let body: Value =
                serde_json::from_slice(&resp.bytes()?).context("the answer is not JSON")?;
            Ok((status, body))
        })
    }

    fn login(&self, token: &str) -> Result<(u16, Value)> {
        self.call(reqwest::Method::POST, Some(token))
    }
}

#[test]
fn tokens_open_and_close_the_protected_port() {
    require_root();
    let pair = Pair::new().expect("namespaces");
    let ca = TestCa::new().expect("test CA");
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca).expect("test IdP");
    scenario(&pair, &ca, &idp).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The same flow against a real, independent OpenID provider (npm `oidc-provider` 9), run inside
/// the server namespace: JWT access tokens by client credentials, groups claim, key rotation.
#[test]
fn oidc_provider_tokens_open_and_close_the_protected_port() {
    require_root();
    let pair = Pair::new().expect("namespaces");
    let ca = TestCa::new().expect("test CA");
    let idp = OidcIssuer::start(
        "127.0.0.1:0",
        Some(pair.srv.name()),
        &[("alice", &["web"]), ("bob", &["sales"])],
    )
    .expect("oidc-provider");
    scenario(&pair, &ca, &idp).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The whole flow, for any issuer.
fn scenario(pair: &Pair, ca: &TestCa, idp: &dyn Issuer) -> Result<()> {
    let srv = Pair::srv_addr(false);
    let cli_addr = Pair::cli_addr(false);
    let _hello = Hello::start(&pair.srv, SocketAddr::new(srv, PROTECTED))?;
    let cert = ca.server_cert("endpoint", srv)?;
    let socket = ca
        .dir()
        .join(format!("run-{}", unique_id()))
        .join("admin.sock");
    let client = Client {
        ns: &pair.cli,
        server: srv,
        ca_pem: ca.ca_pem(),
    };
    let mint = |user: &str, groups: &[&str], ttl: u64| {
        pair.srv
            .run_in(|| idp.mint(user, groups, Duration::from_secs(ttl)))
    };

    // Metrics on the server namespace's loopback, the audit stream to a file.
    let audit_file = ca.dir().join(format!("audit-{}.jsonl", unique_id()));
    let toml = config(pair, idp, &cert, &socket).replacen(
        "[admin]\n",
        &format!("[admin]\nmetrics = \"{METRICS}\"\n"),
        1,
    ) + &format!(
        "\n[audit]\noutput = \"file\"\npath = \"{}\"\n",
        audit_file.display()
    );
    let started = Instant::now();
    let daemon = Daemon::start(&pair.srv, &toml)?;
    eprintln!("daemon ready in {:?}", started.elapsed());
    let mode = std::fs::metadata(daemon.admin_socket())?.permissions();
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o660,
        "admin socket mode {:o}",
        std::os::unix::fs::PermissionsExt::mode(&mode)
    );

    // Closed without a session.
    ensure!(!client.reaches(), "port {PROTECTED} open before any token");

    // A token with an allowed group opens it, and the answer names the user and the rule.
    let alice = mint("alice", &["web"], 300)?;
    let (status, body) = client.login(&alice)?;
    ensure!(status == 200, "alice: {status} {body}");
    ensure!(body["user"] == "alice", "{body}");
    ensure!(body["issuer"] == idp.issuer(), "{body}");
    ensure!(body["source"] == cli_addr.to_string(), "{body}");
    ensure!(body["services"][0]["rule"]["name"] == "web-users", "{body}");
    ensure!(body["services"][0]["decision"] == "allow", "{body}");
    ensure!(body["expires_at"].is_string(), "{body}");
    client.wait_reach(true, "after alice's login")?;
    daemon.wait_audit("of alice's login", DEADLINE, |r| {
        r.get("event").map(String::as_str) == Some("login")
            && r.get("srcuser").map(String::as_str) == Some("alice")
            && r.get("action").map(String::as_str) == Some("allow")
    })?;

    // Metrics: live, ready, the login, the session and the packets it let through.
    ensure!(http_get(&pair.srv, METRICS, "/live")?.0 == 200, "/live");
    ensure!(http_get(&pair.srv, METRICS, "/ready")?.0 == 200, "/ready");
    let (status, scrape) = http_get(&pair.srv, METRICS, "/metrics")?;
    ensure!(status == 200, "/metrics: {status}");
    ensure!(
        series(
            &scrape,
            r#"idgate_logins_total{result="ok",reason="allowed"}"#
        )? >= 1.0,
        "{scrape}"
    );
    ensure!(
        series(&scrape, "idgate_active_sessions")? == 1.0,
        "{scrape}"
    );
    ensure!(
        series(
            &scrape,
            r#"idgate_packets_total{service="fastapi",reason="session"}"#
        )? > 0.0,
        "{scrape}"
    );
    ensure!(
        series(
            &scrape,
            r#"idgate_bytes_total{service="fastapi",reason="session"}"#
        )? > 0.0,
        "{scrape}"
    );
    ensure!(
        series(&scrape, r#"idgate_reloads_total{result="ok"}"#)? == 0.0,
        "{scrape}"
    );
    ensure!(
        scrape.contains(&format!(
            "idgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{scrape}"
    );
    ensure!(!scrape.contains("alice"), "a user in the metrics: {scrape}");

    // The audit stream: the login, field by field.
    let login = wait_audit_line(&audit_file, "of alice's login", |v| {
        v["event"] == "login" && v["srcuser"] == "alice"
    })?;
    ensure!(login["src"] == cli_addr.to_string(), "{login}");
    ensure!(login["issuer"] == idp.issuer(), "{login}");
    ensure!(login["groups"] == serde_json::json!(["web"]), "{login}");
    ensure!(login["app"] == "fastapi", "{login}");
    ensure!(login["proto"] == "tcp", "{login}");
    ensure!(login["dport"] == PROTECTED, "{login}");
    ensure!(login["action"] == "allow", "{login}");
    ensure!(login["rule"] == "web-users", "{login}");
    ensure!(
        login["rule_id"].as_u64().is_some_and(|id| id > 0),
        "{login}"
    );
    ensure!(login["identity_id"].as_u64().is_some(), "{login}");
    ensure!(
        login["expires"].as_str().is_some_and(|e| e.ends_with('Z')),
        "{login}"
    );
    ensure!(
        login["time"]
            .as_str()
            .is_some_and(|t| t.len() == 24 && t.ends_with('Z')),
        "{login}"
    );

    // A token whose groups the policy refuses: 403, and the address is no longer alice's.
    let bob = mint("bob", &["sales"], 300)?;
    let (status, body) = client.login(&bob)?;
    ensure!(status == 403, "bob: {status} {body}");
    ensure!(body["services"][0]["decision"] == "deny", "{body}");
    ensure!(body["replaced"]["user"] == "alice", "{body}");
    client.wait_reach(false, "after bob's refused login")?;
    daemon.wait_audit("of alice being replaced", DEADLINE, |r| {
        r.get("event").map(String::as_str) == Some("identity-replaced")
            && r.get("previous_user").map(String::as_str) == Some("alice")
    })?;

    // A bad token changes nothing and gets a challenge.
    let (status, body) = client.login("not.a.token")?;
    ensure!(status == 401, "garbage: {status} {body}");
    ensure!(!client.reaches(), "open after a bad token");

    // Logout closes it again.
    let (status, _) = client.login(&alice)?;
    ensure!(status == 200);
    client.wait_reach(true, "after alice's second login")?;
    let (status, body) = client.call(reqwest::Method::DELETE, Some(&alice))?;
    ensure!(status == 200, "logout: {status} {body}");
    ensure!(body["removed"]["sessions"] == 1, "{body}");
    client.wait_reach(false, "after logout")?;
    let end = wait_audit_line(&audit_file, "of the logout", |v| {
        v["event"] == "session-end" && v["session_end_reason"] == "logout"
    })?;
    ensure!(end["src"] == cli_addr.to_string(), "{end}");
    ensure!(end["srcuser"] == "alice", "{end}");
    ensure!(end["issuer"] == idp.issuer(), "{end}");
    ensure!(end["app"] == "fastapi", "{end}");
    ensure!(end["proto"] == "tcp", "{end}");
    ensure!(end["dport"] == PROTECTED, "{end}");
    ensure!(end["rule"] == "web-users", "{end}");
    ensure!(end["rule_id"] == login["rule_id"], "{end}");
    ensure!(end["identity_id"].as_u64().is_some(), "{end}");
    let failed = wait_audit_line(&audit_file, "of the bad token", |v| {
        v["event"] == "login-failed"
    })?;
    ensure!(
        failed["src"] == cli_addr.to_string() && failed["status"] == 401,
        "{failed}"
    );
    ensure!(failed["reason"].is_string(), "{failed}");
    let mode = std::fs::metadata(&audit_file)?.permissions();
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o640,
        "audit file mode {:o}",
        std::os::unix::fs::PermissionsExt::mode(&mode)
    );

    // A token that expires in a few seconds stops working then, with no further call.
    let exp = now_secs() + 3;
    let short = mint("alice", &["web"], 3)?;
    let (status, body) = client.login(&short)?;
    ensure!(status == 200, "short token: {status} {body}");
    client.wait_reach(true, "with the short token")?;
    let closed_at = client.wait_reach(false, "after the short token's exp")?;
    let closed_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        - closed_at.elapsed().as_secs_f64();
    // The kernel's coarse clock may be a tick early; never a second early.
    ensure!(
        closed_wall >= exp as f64 - 1.0,
        "closed at {closed_wall}, exp {exp}"
    );
    daemon.wait_audit("of the expiry", DEADLINE, |r| {
        r.get("event").map(String::as_str) == Some("session-end")
            && r.get("session_end_reason").map(String::as_str) == Some("expired")
            && r.get("srcuser").map(String::as_str) == Some("alice")
    })?;
    let (status, _) = daemon.admin(Method::GET, &format!("/v1/whois/{cli_addr}"))?;
    ensure!(status == 404, "whois after expiry: {status}");

    // whois names the user; revoking by user closes the port.
    let (status, _) = client.login(&alice)?;
    ensure!(status == 200);
    client.wait_reach(true, "after alice's third login")?;
    let (status, who) = daemon.admin(Method::GET, &format!("/v1/whois/{cli_addr}"))?;
    ensure!(status == 200, "whois: {status} {who}");
    ensure!(who["user"] == "alice", "{who}");
    ensure!(who["groups"][0] == "web", "{who}");
    ensure!(who["services"][0]["rule"]["name"] == "web-users", "{who}");
    let (status, list) = daemon.admin(Method::GET, "/v1/sessions")?;
    ensure!(status == 200 && list["count"] == 1, "{list}");
    let (status, body) = daemon.admin(Method::DELETE, "/v1/sessions?user=alice")?;
    ensure!(status == 200, "revoke: {status} {body}");
    ensure!(body["removed"]["sources"] == 1, "{body}");
    client.wait_reach(false, "after revocation")?;
    daemon.wait_audit("of the revocation", DEADLINE, |r| {
        r.get("session_end_reason").map(String::as_str) == Some("revoked")
    })?;
    // Refused flows reach the audit trail (rate-limited), named by reason.
    daemon.wait_audit("of a refused flow", DEADLINE, |r| {
        r.get("event").map(String::as_str) == Some("flow")
            && r.get("action").map(String::as_str) == Some("deny")
    })?;

    // The IdP rotates its signing key: a token under the new key still opens the port (the
    // daemon fetches the key set again on the unknown kid).
    if pair.srv.run_in(|| idp.rotate_keys())? {
        let rotated = mint("alice", &["web"], 300)?;
        let (status, body) = client.login(&rotated)?;
        ensure!(
            status == 200,
            "token under the rotated key: {status} {body}"
        );
        client.wait_reach(true, "after the login under the rotated key")?;
    }

    // Shutdown detaches (the port is no longer protected) and removes the admin socket.
    let socket_path = daemon.admin_socket().to_owned();
    daemon.stop()?;
    ensure!(!socket_path.exists(), "admin socket left behind");
    // Every line written was one JSON object.
    ensure!(!audit_lines(&audit_file)?.is_empty());
    client.wait_reach(true, "after shutdown (detached)")?;
    Ok(())
}
