//! The session endpoint and the admin API, request by request, against a real verifier (the
//! identity tests' IdP on 127.0.0.1) and a fake data plane: no root, no sockets for the API.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};

use super::{App, HttpResponse, Limits, admin, endpoint};
use crate::{
    config::Config,
    dataplane::{DataplaneError, ServiceId, Session},
    identity::{
        Verifier,
        tests::support::{TestIdp, TestKey, now_secs},
    },
    session::{Catalog, FailureLimiter, SessionManager, SessionStore},
    wiring,
};

/// The fake data plane's map, shared with the test.
type Map = Arc<Mutex<BTreeMap<(IpAddr, ServiceId), Session>>>;

struct FakeStore(Map);

impl SessionStore for FakeStore {
    fn upsert_sessions(&mut self, sessions: &[Session]) -> Result<(), DataplaneError> {
        let mut m = self.0.lock().unwrap();
        for s in sessions {
            m.insert((s.source, s.service), *s);
        }
        Ok(())
    }
    fn remove_sessions(&mut self, keys: &[(IpAddr, ServiceId)]) -> Result<usize, DataplaneError> {
        let mut m = self.0.lock().unwrap();
        Ok(keys.iter().filter(|k| m.remove(k).is_some()).count())
    }
    fn sessions(&self) -> Result<Vec<Session>, DataplaneError> {
        Ok(self.0.lock().unwrap().values().copied().collect())
    }
}

struct World {
    idp: TestIdp,
    key: TestKey,
    app: App,
    map: Map,
}

const CLIENT: &str = "192.0.2.7";
const PROXY: &str = "10.0.0.5";

fn config(issuer: &str) -> Config {
    Config::parse(&config_toml(issuer)).unwrap().0
}

fn config_toml(issuer: &str) -> String {
    format!(
        r#"
[dataplane]
interfaces = [{{ name = "eth0" }}]
max_session_lifetime = "2h"

[[services]]
name = "web"
protocol = "tcp"
port = 8000

[[services]]
name = "ssh"
protocol = "tcp"
port = 22

[[issuers]]
issuer = "{issuer}"
audiences = ["idgate"]
allow_http = true
group_claims = [{{ path = "groups" }}]

[session_endpoint]
listen = "127.0.0.1:8443"
trusted_proxies = ["10.0.0.0/24"]
failed_attempts_per_minute = 1
failed_attempts_burst = 3

[policy]
default = "drop"

[[policy.rules]]
name = "web-users"
sources = ["group:web"]
services = ["web"]
action = "allow"
max_session_lifetime = "1h"
"#
    )
}

async fn world() -> World {
    let key = TestKey::rsa("k1");
    let idp = TestIdp::start(&[&key]).await;
    let (app, map) = app_for(&idp, true).await;
    World { idp, key, app, map }
}

async fn app_for(idp: &TestIdp, fetch_keys: bool) -> (App, Map) {
    let config = config(&idp.issuer);
    let verifier = Verifier::new(wiring::all_issuer_settings(&config.issuers).unwrap()).unwrap();
    if fetch_keys {
        for (_, r) in verifier.refresh_all().await {
            r.unwrap();
        }
    }
    let map = Map::default();
    let catalog = Arc::new(Catalog::from_config(&config));
    let ep = &config.session_endpoint;
    let app = App {
        verifier: verifier.into(),
        policy: config.policy().into(),
        catalog: catalog.clone().into(),
        sessions: Mutex::new(SessionManager::new(
            Box::new(FakeStore(map.clone())),
            catalog,
            100,
            config.dataplane.max_session_lifetime,
        )),
        limiter: Mutex::new(FailureLimiter::new(
            ep.failed_attempts_per_minute,
            ep.failed_attempts_burst,
            1000,
        )),
        trusted_proxies: ep.trusted_proxies.clone(),
        limits: Limits::for_tokens(16 * 1024),
        metrics: Default::default(),
        audit: Default::default(),
        reload: tokio::sync::Mutex::new(crate::runtime::reload::ReloadState {
            config: Some(config.clone()),
            ..Default::default()
        }),
    };
    (app, map)
}

impl World {
    fn token(&self, user: &str, groups: &[&str], lifetime: u64) -> String {
        let now = now_secs();
        self.key.token(&json!({
            "iss": self.idp.issuer,
            "aud": "idgate",
            "sub": user,
            "groups": groups,
            "iat": now,
            "exp": now + lifetime,
        }))
    }

    async fn call(
        &self,
        req: Request<Full<Bytes>>,
        peer: &str,
    ) -> (StatusCode, Value, HttpResponse) {
        let peer = SocketAddr::new(peer.parse().unwrap(), 40000);
        let resp = endpoint::handle(&self.app, peer, req).await;
        decode(resp).await
    }

    async fn login(&self, token: &str, peer: &str) -> (StatusCode, Value, HttpResponse) {
        self.call(req(Method::POST, Some(token), &[]), peer).await
    }

    async fn admin(&self, method: Method, path: &str) -> (StatusCode, Value) {
        let r = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let (status, body, _) = decode(admin::handle(&self.app, r)).await;
        (status, body)
    }

    fn keys(&self) -> Vec<(IpAddr, u32, u32)> {
        self.map
            .lock()
            .unwrap()
            .values()
            .map(|s| (s.source, s.service.get(), s.rule_id))
            .collect()
    }
}

fn req(method: Method, token: Option<&str>, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri("/v1/sessions");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

async fn decode(resp: HttpResponse) -> (StatusCode, Value, HttpResponse) {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value: Value = serde_json::from_slice(&bytes).unwrap();
    let head = hyper::Response::from_parts(parts, Full::new(Bytes::new()));
    (status, value, head)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn header<'r>(r: &'r HttpResponse, name: &str) -> &'r str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

#[tokio::test]
async fn a_valid_token_opens_the_allowed_services() {
    let w = world().await;
    let token = w.token("alice", &["web", "other"], 300);
    let (status, body, _) = w.login(&token, CLIENT).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"], "alice");
    assert_eq!(body["issuer"], w.idp.issuer);
    assert_eq!(body["groups"], json!(["web", "other"]));
    assert_eq!(body["source"], CLIENT);
    let services = body["services"].as_array().unwrap();
    assert_eq!(services.len(), 2);
    assert_eq!(services[0]["service"], "web");
    assert_eq!(services[0]["decision"], "allow");
    assert_eq!(services[0]["port"], 8000);
    assert_eq!(services[0]["rule"], json!({"id": 1, "name": "web-users"}));
    assert_eq!(services[0]["session"], true);
    assert_eq!(services[1]["service"], "ssh");
    assert_eq!(services[1]["decision"], "deny");
    assert_eq!(services[1]["action"], "drop");
    assert_eq!(services[1]["rule"], Value::Null);
    // The session ends with the token (300 s), before the rule's hour.
    let exp = body["expires_at"].as_str().unwrap();
    assert_eq!(exp, body["token_expires_at"].as_str().unwrap());
    assert!(exp.ends_with('Z') && exp.len() == 20, "{exp}");
    assert_eq!(w.keys(), [(ip(CLIENT), 1, 1)]);

    // whois names her; the list has her.
    let (status, who) = w.admin(Method::GET, "/v1/whois/192.0.2.7").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["user"], "alice");
    assert_eq!(who["services"][0]["rule"]["name"], "web-users");
    let (_, list) = w.admin(Method::GET, "/v1/sessions").await;
    assert_eq!(list["count"], 1);
    let (status, _) = w.admin(Method::GET, "/v1/whois/192.0.2.99").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = w.admin(Method::GET, "/v1/whois/not-an-ip").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_valid_token_the_policy_refuses_gets_403_and_changes_nothing() {
    let w = world().await;
    let (status, body, _) = w.login(&w.token("bob", &["sales"], 300), CLIENT).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "no_service_allowed");
    assert_eq!(body["user"], "bob");
    assert_eq!(body["services"][0]["decision"], "deny");
    assert_eq!(body["expires_at"], Value::Null);
    assert!(w.keys().is_empty());
}

#[tokio::test]
async fn bad_tokens_get_401_with_a_challenge_and_change_nothing() {
    let w = world().await;
    let (status, body, head) = w.call(req(Method::POST, None, &[]), CLIENT).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "missing_token");
    assert_eq!(header(&head, "www-authenticate"), "Bearer realm=\"idgate\"");

    // Flip one character in the middle of the signature.
    let token = w.token("alice", &["web"], 300);
    let at = token.len() - 20;
    let flipped = if &token[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
    let (status, body, head) = w.login(&forged, CLIENT).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(body["reason"], "bad_signature");
    assert!(header(&head, "www-authenticate").contains("error=\"invalid_token\""));

    let (status, body, _) = w.login(&w.token("alice", &["web"], 0), "192.0.2.8").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["reason"], "expired");
    assert!(w.keys().is_empty());
}

#[tokio::test]
async fn failed_attempts_are_limited_per_source() {
    let w = world().await;
    for _ in 0..3 {
        let (status, _, _) = w.login("garbage", CLIENT).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body, head) = w.login(&w.token("alice", &["web"], 300), CLIENT).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["reason"], "rate_limited");
    assert!(header(&head, "retry-after").parse::<u64>().unwrap() >= 1);
    assert!(w.keys().is_empty(), "even a valid token waits");
    // Another source is not affected; successes cost nothing.
    for _ in 0..5 {
        let (status, _, _) = w.login(&w.token("carol", &["web"], 300), "192.0.2.8").await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let w = world().await;
    let token = w.token("alice", &["web"], 300);
    let fwd = |v: &'static str| req(Method::POST, Some(&token), &[("x-forwarded-for", v)]);
    let (status, body, _) = w.call(fwd("203.0.113.9, 192.0.2.50"), PROXY).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "192.0.2.50");
    // From an untrusted peer the header is ignored.
    let (_, body, _) = w.call(fwd("192.0.2.51"), "192.0.2.60").await;
    assert_eq!(body["source"], "192.0.2.60");
    // A trusted proxy sending garbage is refused.
    let (status, body, _) = w.call(fwd("192.0.2.1, bogus"), PROXY).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["reason"], "bad_forwarded_for");
    let mut keys: Vec<_> = w.keys().into_iter().map(|k| k.0).collect();
    keys.sort();
    assert_eq!(keys, [ip("192.0.2.50"), ip("192.0.2.60")]);
}

#[tokio::test]
async fn malformed_and_oversized_requests() {
    let w = world().await;
    let token = w.token("alice", &["web"], 300);
    let mut two = req(Method::POST, Some(&token), &[]);
    two.headers_mut()
        .append("authorization", "Bearer x".parse().unwrap());
    let (status, body, _) = w.call(two, CLIENT).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["reason"], "duplicate_authorization");

    let big = "x".repeat(30 * 1024);
    let (status, body, _) = w
        .call(
            req(Method::POST, Some(&token), &[("x-padding", &big)]),
            "192.0.2.8",
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["reason"], "headers_too_large");

    let mut upload = req(Method::POST, Some(&token), &[]);
    *upload.body_mut() = Full::new(Bytes::from(vec![b'{'; 10_000]));
    let (status, body, _) = w.call(upload, "192.0.2.9").await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["reason"], "body_too_large");

    let (status, _, head) = w.call(req(Method::GET, Some(&token), &[]), CLIENT).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&head, "allow"), "POST, DELETE");
    let mut other = req(Method::POST, Some(&token), &[]);
    *other.uri_mut() = "/v2/other".parse().unwrap();
    let (status, _, _) = w.call(other, CLIENT).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(w.keys().is_empty());
}

#[tokio::test]
async fn an_unreachable_idp_gives_503() {
    let key = TestKey::rsa("k1");
    let mut idp = TestIdp::start(&[&key]).await;
    let (app, map) = app_for(&idp, false).await;
    idp.stop().await;
    let w = World { idp, key, app, map };
    let (status, body, head) = w.login(&w.token("alice", &["web"], 300), CLIENT).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["reason"], "idp_unavailable");
    assert!(head.headers().contains_key("retry-after"));
    // Not the client's fault: no failure is counted.
    assert!(w.app.limiter().is_empty());
}

#[tokio::test]
async fn replacement_refresh_and_logout() {
    let w = world().await;
    let (status, _, _) = w.login(&w.token("alice", &["web"], 300), CLIENT).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = w.login(&w.token("dave", &["web"], 600), CLIENT).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["replaced"],
        json!({"user": "alice", "issuer": w.idp.issuer})
    );
    let (_, who) = w.admin(Method::GET, "/v1/whois/192.0.2.7").await;
    assert_eq!(who["user"], "dave");

    // Logout needs a valid token.
    let (status, _, _) = w
        .call(req(Method::DELETE, Some("garbage"), &[]), CLIENT)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(w.keys().len(), 1);
    let token = w.token("dave", &["web"], 600);
    let (status, body, _) = w.call(req(Method::DELETE, Some(&token), &[]), CLIENT).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["removed"], json!({"sources": 1, "sessions": 1}));
    assert!(w.keys().is_empty());
}

#[tokio::test]
async fn admin_revokes_by_user_and_source() {
    let w = world().await;
    for src in ["192.0.2.1", "192.0.2.2"] {
        w.login(&w.token("alice", &["web"], 300), src).await;
    }
    w.login(&w.token("bob", &["web"], 300), "2001:db8::b").await;
    let (status, body) = w.admin(Method::DELETE, "/v1/sessions?user=alice").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["removed"], json!({"sources": 2, "sessions": 2}));
    let (status, body) = w
        .admin(Method::DELETE, "/v1/sessions?source=2001%3Adb8%3A%3Ab")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["removed"]["sources"], 1);
    assert!(w.keys().is_empty());
    for bad in [
        "/v1/sessions",
        "/v1/sessions?source=x",
        "/v1/sessions?user=a&source=1.2.3.4",
    ] {
        let (status, _) = w.admin(Method::DELETE, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, body) = w.admin(Method::GET, "/v1/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["issuers"][0]["keys"], 1);
    assert_eq!(body["sources"], 0);
}

#[tokio::test]
async fn tls_config_loads_pem_files() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("idgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = crate::config::TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    super::tls::server_config(&files).unwrap();
    std::fs::write(&files.key, "not a key").unwrap();
    let e = super::tls::server_config(&files).unwrap_err().to_string();
    assert!(e.contains("key"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = Duration::ZERO;
}

fn reloaded_config(toml: &str) -> Config {
    Config::parse(toml).unwrap_or_else(|e| panic!("{e}")).0
}

#[tokio::test]
async fn reload_revokes_what_the_new_policy_refuses_and_caps_the_rest() {
    let w = world().await;
    let (status, _, _) = w.login(&w.token("alice", &["web"], 3000), CLIENT).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = w
        .login(&w.token("bob", &["web", "ops"], 3000), "192.0.2.8")
        .await;
    assert_eq!(status, StatusCode::OK);
    let audit_path =
        std::env::temp_dir().join(format!("idgate-reload-audit-{}", std::process::id()));
    let _ = std::fs::remove_file(&audit_path);
    let audit = crate::session::audit::AuditLog::open(&crate::config::AuditConfig::File(
        audit_path.clone(),
    ))
    .unwrap();
    w.app.sessions().set_audit(audit);

    // Only group ops from now on, and at most 10 minutes; the rule also moves to id 2.
    let toml = config_toml(&w.idp.issuer)
        .replace(r#"sources = ["group:web"]"#, r#"sources = ["group:ops"]"#)
        .replace(r#"max_session_lifetime = "1h""#, r#"max_session_lifetime = "10m""#)
        .replace(
            "[[policy.rules]]\nname = \"web-users\"",
            "[[policy.rules]]\nname = \"off\"\nenabled = false\nservices = [\"ssh\"]\naction = \"allow\"\n\n[[policy.rules]]\nname = \"ops-web\"",
        );
    let report = crate::runtime::reload::reload(&w.app, reloaded_config(&toml))
        .await
        .unwrap();
    assert_eq!(report.sessions.revoked, 1);
    assert_eq!(report.sessions.sources_ended, 1);
    assert_eq!(report.sessions.updated, 1);
    assert!(!report.issuers_changed);
    assert_eq!(w.keys(), [(ip("192.0.2.8"), 1, 2)]);
    let (status, _) = w.admin(Method::GET, "/v1/whois/192.0.2.7").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, bob) = w.admin(Method::GET, "/v1/whois/192.0.2.8").await;
    assert_eq!(
        bob["services"][0]["rule"],
        json!({"id": 2, "name": "ops-web"})
    );
    let expires = w
        .app
        .sessions()
        .table()
        .get(ip("192.0.2.8"))
        .unwrap()
        .grants[&ServiceId::new(1).unwrap()]
        .expires_at;
    let left = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(600), "{left:?}");
    assert!(left > Duration::from_secs(590), "{left:?}");
    let records: Vec<Value> = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    std::fs::remove_file(&audit_path).unwrap();
    let ends: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "session-end")
        .collect();
    assert_eq!(ends.len(), 1, "{records:?}");
    assert_eq!(ends[0]["session_end_reason"], "policy-changed");
    assert_eq!(ends[0]["srcuser"], "alice");
    // New logins follow the new policy.
    let (status, _, _) = w.login(&w.token("alice", &["web"], 3000), CLIENT).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(w.app.metrics.reloads(), 1);
    assert_eq!(w.app.metrics.reloads_failed(), 0);
}

#[tokio::test]
async fn a_refused_reload_changes_nothing() {
    let w = world().await;
    let (status, _, _) = w.login(&w.token("alice", &["web"], 3000), CLIENT).await;
    assert_eq!(status, StatusCode::OK);
    let before = w.keys();

    // Settings that need a restart: every one is named, nothing else is applied.
    let toml = config_toml(&w.idp.issuer)
        .replace("name = \"eth0\"", "name = \"eth1\"")
        .replace("127.0.0.1:8443", "127.0.0.1:9443")
        .replace(r#"sources = ["group:web"]"#, r#"sources = ["group:ops"]"#);
    let e = crate::runtime::reload::reload(&w.app, reloaded_config(&toml))
        .await
        .unwrap_err();
    assert_eq!(e.errors.len(), 2, "{e}");
    assert!(e.errors[0].contains("dataplane.interfaces") && e.errors[0].contains("restart"));
    assert!(e.errors[1].contains("session_endpoint.listen"));
    assert_eq!(w.keys(), before);
    let (status, _, _) = w
        .login(&w.token("carol", &["web"], 3000), "192.0.2.9")
        .await;
    assert_eq!(status, StatusCode::OK, "the old policy is still in force");

    // The admin API: no file to re-read here; then a file with a syntax error and one with
    // semantic errors (every error reported).
    let (status, body, _) = decode(admin::reload(&w.app, &Method::POST).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"], "reload_failed");
    let dir = std::env::temp_dir().join(format!("idgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("idgate.toml");
    w.app.reload.lock().await.path = Some(path.clone());
    std::fs::write(&path, "[policy\n").unwrap();
    let (status, body, _) = decode(admin::reload(&w.app, &Method::POST).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(!body["errors"].as_array().unwrap().is_empty());
    let semantic = config_toml(&w.idp.issuer)
        .replace("port = 22", "port = 0")
        .replace(r#"services = ["web"]"#, r#"services = ["nope"]"#);
    std::fs::write(&path, semantic).unwrap();
    let (status, body, _) = decode(admin::reload(&w.app, &Method::POST).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["errors"].as_array().unwrap().len() >= 2, "{body}");
    let (status, _, _) = decode(admin::reload(&w.app, &Method::GET).await).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(w.app.metrics.reloads(), 0);
    assert_eq!(w.app.metrics.reloads_failed(), 4);
    assert_eq!(w.keys().len(), 2);

    // The same file, fixed: applied.
    std::fs::write(&path, config_toml(&w.idp.issuer)).unwrap();
    let (status, body, _) = decode(admin::reload(&w.app, &Method::POST).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sessions"]["revoked"], 0);
    assert_eq!(w.app.metrics.reloads(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
