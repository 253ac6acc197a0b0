//! User-ID: the XML against a real parser and pan-os-python, the tracker and queue rules, and the
//! pusher end to end against a local HTTPS receiver (real TLS, a CA made at run time) fed by a
//! real session manager.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::aws_lc_rs::default_provider,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use super::{
    queue::Pending,
    tracker::{Event, Tracker, timeout_minutes, timeout_seconds},
    xml::{Op, check_response, uid_message},
    *,
};
use crate::{
    config::TagConfig,
    dataplane::{DataplaneError, ServiceId, Session},
    policy::{Action, MatchedRule, ServiceDecision},
    session::{
        Catalog, NewIdentity, Now, ServiceInfo, SessionManager, SessionStore, audit::AuditLog,
    },
};

const USER: &str = "CORP\\al\"ice & <bob>";
const OTHER: &str = "o'brien";
const KEY: &str = "LUFRPT1-s3cr3t+key/with=chars&more";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// XML, read back with a real parser

/// An element: name, attributes, trimmed text, children in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    name: String,
    attrs: BTreeMap<String, String>,
    text: String,
    children: Vec<Node>,
}

fn node(n: roxmltree::Node<'_, '_>) -> Node {
    Node {
        name: n.tag_name().name().to_owned(),
        attrs: n
            .attributes()
            .map(|a| (a.name().to_owned(), a.value().to_owned()))
            .collect(),
        text: n
            .children()
            .filter(|c| c.is_text())
            .filter_map(|c| c.text())
            .collect::<String>()
            .trim()
            .to_owned(),
        children: n.children().filter(|c| c.is_element()).map(node).collect(),
    }
}

fn parse(xml: &str) -> Node {
    let doc = roxmltree::Document::parse(xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    node(doc.root_element())
}

/// One entry of a parsed uid-message: (section, user, ip, timeout, tags with their timeouts).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    section: String,
    user: String,
    ip: Option<String>,
    timeout: Option<String>,
    tags: Vec<(String, Option<String>)>,
}

fn entries(msg: &Node) -> Vec<Entry> {
    assert_eq!(msg.name, "uid-message");
    let names: Vec<&str> = msg.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["version", "type", "payload"]);
    assert_eq!(msg.children[1].text, "update");
    let mut out = Vec::new();
    for section in &msg.children[2].children {
        for e in &section.children {
            assert_eq!(e.name, "entry");
            let user = e
                .attrs
                .get("name")
                .or_else(|| e.attrs.get("user"))
                .cloned()
                .unwrap();
            let tags = e
                .children
                .iter()
                .flat_map(|t| &t.children)
                .map(|m| (m.text.clone(), m.attrs.get("timeout").cloned()))
                .collect();
            out.push(Entry {
                section: section.name.clone(),
                user,
                ip: e.attrs.get("ip").cloned(),
                timeout: e.attrs.get("timeout").cloned(),
                tags,
            });
        }
    }
    out
}

#[test]
fn uid_messages_escape_names_and_carry_every_section() {
    let msg = uid_message(&[
        Op::Login {
            user: USER.into(),
            ip: ip("10.1.1.1"),
            timeout_min: 60,
        },
        Op::Logout {
            user: "a\tb\nc\u{1}d".into(),
            ip: ip("2001:db8::7"),
        },
        Op::Tag {
            user: OTHER.into(),
            tags: vec!["x&y".into(), "<z>".into()],
            timeout_s: 90,
        },
        Op::Untag {
            user: OTHER.into(),
            tags: vec!["old".into()],
        },
    ]);
    let e = entries(&parse(&msg));
    assert_eq!(
        e,
        [
            Entry {
                section: "login".into(),
                user: USER.into(),
                ip: Some("10.1.1.1".into()),
                timeout: Some("60".into()),
                tags: vec![],
            },
            Entry {
                section: "logout".into(),
                user: "a\tb\nc\u{FFFD}d".into(),
                ip: Some("2001:db8::7".into()),
                timeout: None,
                tags: vec![],
            },
            Entry {
                section: "register-user".into(),
                user: OTHER.into(),
                ip: None,
                timeout: None,
                tags: vec![
                    ("x&y".into(), Some("90".into())),
                    ("<z>".into(), Some("90".into()))
                ],
            },
            Entry {
                section: "unregister-user".into(),
                user: OTHER.into(),
                ip: None,
                timeout: None,
                tags: vec![("old".into(), None)],
            },
        ]
    );
}

#[test]
fn responses_success_error_and_harmless_duplicates() {
    assert_eq!(
        check_response("<response status=\"success\"><result/></response>"),
        Ok(())
    );
    assert_eq!(
        check_response("<?xml version=\"1.0\"?>\n<response status = 'success' />"),
        Ok(())
    );
    assert!(check_response("<response status=\"unauth\" code=\"16\"/>").is_err());
    assert!(check_response("<result status=\"success\"/>").is_err());
    let e = check_response(
        "<response status=\"error\" code=\"403\"><result><msg>Invalid credential</msg></result></response>",
    )
    .unwrap_err();
    assert!(
        e.contains("error") && e.contains("Invalid credential"),
        "{e}"
    );
    assert!(check_response("<html>proxy error</html>").is_err());
    assert_eq!(
        check_response(
            "<response status=\"error\"><msg><line><uid-response><payload><register-user>\
             user tag idgate-web already exists, ignore</register-user></payload></uid-response>\
             </line></msg></response>"
        ),
        Ok(())
    );
}

/// The venv `cargo xtask setup` creates, with pan-os-python in it.
fn venv_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("target/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it creates the venv with pan-os-python that \
         this test holds idgate's User-ID XML to)",
        python.display()
    );
    python
}

#[test]
fn xml_matches_what_pan_os_python_sends_for_the_same_calls() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/assets/userid/expected.py");
    let out = std::process::Command::new(venv_python())
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: HashMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();
    let login = Op::Login {
        user: USER.into(),
        ip: ip("10.1.1.1"),
        timeout_min: 60,
    };
    let tags = || vec!["idgate-web".to_owned(), "idgate-ops".to_owned()];
    let tag = Op::Tag {
        user: USER.into(),
        tags: tags(),
        timeout_s: 3600,
    };
    let untag = Op::Untag {
        user: OTHER.into(),
        tags: vec!["idgate-web".into()],
    };
    let ours: [(&str, Vec<Op>); 5] = [
        ("login", vec![login.clone()]),
        (
            "logout",
            vec![Op::Logout {
                user: USER.into(),
                ip: ip("10.1.1.1"),
            }],
        ),
        ("tag_user", vec![tag.clone()]),
        ("untag_user", vec![untag.clone()]),
        (
            "batch",
            vec![
                login,
                Op::Login {
                    user: OTHER.into(),
                    ip: ip("2001:db8::7"),
                    timeout_min: 1,
                },
                Op::Logout {
                    user: USER.into(),
                    ip: ip("10.1.1.2"),
                },
                tag,
                untag,
            ],
        ),
    ];
    assert_eq!(expected.len(), ours.len());
    for (name, ops) in ours {
        let theirs = parse(&expected[name]);
        assert_eq!(parse(&uid_message(&ops)), theirs, "case {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tracker and queue

fn granted(ipa: &str, user: &str, service: u32, left: Duration, now: SystemTime) -> Event {
    Event::Granted {
        ip: ip(ipa),
        user: user.into(),
        groups: vec!["web".into(), "ops".into(), "web".into()],
        service,
        expires_at: now + left,
    }
}

fn ended(ipa: &str, user: &str, service: u32) -> Event {
    Event::Ended {
        ip: ip(ipa),
        user: user.into(),
        service,
    }
}

#[test]
fn timeouts_round_up_and_never_reach_zero() {
    assert_eq!(timeout_minutes(Duration::ZERO), 1);
    assert_eq!(timeout_minutes(Duration::from_millis(1)), 1);
    assert_eq!(timeout_minutes(Duration::from_secs(60)), 1);
    assert_eq!(timeout_minutes(Duration::from_millis(60_001)), 2);
    assert_eq!(timeout_minutes(Duration::from_secs(3600)), 60);
    assert_eq!(timeout_minutes(Duration::from_secs(90 * 86_400)), 43_200);
    assert_eq!(timeout_seconds(Duration::ZERO), 1);
    assert_eq!(timeout_seconds(Duration::from_millis(1500)), 2);
    assert_eq!(timeout_seconds(Duration::from_secs(90 * 86_400)), 2_592_000);
}

#[test]
fn tracker_maps_an_address_until_its_last_session_ends() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut t = Tracker::new(None);
    let hour = Duration::from_secs(3600);
    assert_eq!(
        t.apply(granted("10.0.0.1", "alice", 1, hour, now), now),
        [Op::Login {
            user: "alice".into(),
            ip: ip("10.0.0.1"),
            timeout_min: 60
        }]
    );
    // A second service lasting longer: the mapping follows the longest.
    assert_eq!(
        t.apply(granted("10.0.0.1", "alice", 2, 2 * hour, now), now),
        [Op::Login {
            user: "alice".into(),
            ip: ip("10.0.0.1"),
            timeout_min: 120
        }]
    );
    assert_eq!(t.apply(ended("10.0.0.1", "alice", 2), now), []);
    // Another user's end at the address, or an unknown address: nothing.
    assert_eq!(t.apply(ended("10.0.0.1", "bob", 1), now), []);
    assert_eq!(t.apply(ended("10.0.0.9", "alice", 1), now), []);
    assert_eq!(
        t.apply(ended("10.0.0.1", "alice", 1), now),
        [Op::Logout {
            user: "alice".into(),
            ip: ip("10.0.0.1")
        }]
    );
    assert_eq!(t.addresses(), 0);
}

#[test]
fn tracker_tags_users_while_any_address_is_mapped() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut t = Tracker::new(Some(TagConfig {
        prefix: "idgate-".into(),
    }));
    let tags = vec!["idgate-ops".to_owned(), "idgate-web".to_owned()];
    let ops = t.apply(
        granted("10.0.0.1", "alice", 1, Duration::from_secs(600), now),
        now,
    );
    assert_eq!(
        ops[1],
        Op::Tag {
            user: "alice".into(),
            tags: tags.clone(),
            timeout_s: 600
        }
    );
    t.apply(
        granted("10.0.0.2", "alice", 1, Duration::from_secs(600), now),
        now,
    );
    // One address logs out: the tags stay for the other.
    assert_eq!(t.apply(ended("10.0.0.1", "alice", 1), now).len(), 1);
    // Bob takes the other address over: alice's last address is gone, and her tags with it.
    let ops = t.apply(
        granted("10.0.0.2", "bob", 1, Duration::from_secs(60), now),
        now,
    );
    assert_eq!(
        ops,
        [
            Op::Untag {
                user: "alice".into(),
                tags: tags.clone()
            },
            Op::Login {
                user: "bob".into(),
                ip: ip("10.0.0.2"),
                timeout_min: 1
            },
            Op::Tag {
                user: "bob".into(),
                tags: tags.clone(),
                timeout_s: 60
            },
        ]
    );
}

#[test]
fn pending_coalesces_per_address_and_drops_the_oldest_when_full() {
    let login = |a: &str, u: &str| Op::Login {
        user: u.into(),
        ip: ip(a),
        timeout_min: 5,
    };
    let logout = |a: &str, u: &str| Op::Logout {
        user: u.into(),
        ip: ip(a),
    };
    let mut p = Pending::new(3);
    assert_eq!(p.push(login("10.0.0.1", "a")), 0);
    assert_eq!(p.push(login("10.0.0.2", "b")), 0);
    // The latest state of 10.0.0.1 replaces the waiting login, in place.
    assert_eq!(p.push(logout("10.0.0.1", "a")), 0);
    assert_eq!(p.len(), 2);
    assert_eq!(p.push(login("10.0.0.3", "c")), 0);
    assert_eq!(p.push(login("10.0.0.4", "d")), 1);
    let taken = p.take(2);
    assert_eq!(taken, [login("10.0.0.2", "b"), login("10.0.0.3", "c")]);
    // A newer update for .2 arrived while the batch failed: only .3 goes back, first.
    p.push(logout("10.0.0.2", "b"));
    assert_eq!(p.requeue(taken), 0);
    assert_eq!(
        p.take(10),
        [
            login("10.0.0.3", "c"),
            login("10.0.0.4", "d"),
            logout("10.0.0.2", "b")
        ]
    );
    assert!(p.is_empty());
}

// ---------------------------------------------------------------------------------------------
// End to end: a session manager, the pusher, and an HTTPS receiver

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Success,
    /// `<response status="error">`.
    ApiError,
    /// HTTP 500.
    ServerError,
    /// Never answers.
    Stall,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    uri: String,
    method: String,
    content_type: String,
    form: HashMap<String, String>,
    entries: Vec<Entry>,
}

/// A PAN-OS stand-in on 127.0.0.1 over TLS, with a certificate from a CA made here.
struct Receiver {
    addr: SocketAddr,
    dir: PathBuf,
    requests: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(ip("127.0.0.1")));
        let cert = params.signed_by(&key, &ca).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "idgate-userid-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("key"), format!("{KEY}\n")).unwrap();

        let tls = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(Mode::Success));
        let (r, m) = (requests.clone(), mode.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, r, m) = (acceptor.clone(), r.clone(), m.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| answer(req, r.clone(), m.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            dir,
            requests,
            mode,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }

    /// Every entry of every request answered with success, in order.
    fn delivered(&self) -> Vec<Entry> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.entries)
            .collect()
    }

    fn settings(&self, tags: Option<TagConfig>, queue_size: usize, timeout: Duration) -> Settings {
        let fw = Firewall::with_key_file(
            &self.url(),
            &self.dir.join("key"),
            Some(&self.dir.join("ca.pem")),
            Some("vsys1".into()),
            timeout,
        )
        .unwrap();
        Settings {
            firewalls: vec![fw],
            tags,
            batch_size: 100,
            queue_size,
            flush_interval: Duration::from_millis(50),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        }
    }
}

/// Moves the file's modification time forward a second, so that the change is seen even
/// where the file system's timestamps are coarse.
fn bump_mtime(path: &Path) {
    let f = std::fs::File::options().append(true).open(path).unwrap();
    let t = f.metadata().unwrap().modified().unwrap() + Duration::from_secs(1);
    f.set_modified(t).unwrap();
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn answer(
    req: Request<Incoming>,
    requests: Arc<Mutex<Vec<Received>>>,
    mode: Arc<Mutex<Mode>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let uri = req.uri().to_string();
    let method = req.method().to_string();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let m = *mode.lock().unwrap();
    let (status, text) = match m {
        Mode::Stall => std::future::pending().await,
        Mode::ServerError => (500, "<html>internal error</html>".to_owned()),
        Mode::ApiError => (
            200,
            "<response status=\"error\"><msg><line>User-ID service unavailable</line></msg></response>"
                .to_owned(),
        ),
        Mode::Success => {
            let entries = entries(&parse(form.get("cmd").map_or("", String::as_str)));
            requests.lock().unwrap().push(Received {
                uri,
                method,
                content_type,
                form: form.clone(),
                entries,
            });
            (
                200,
                "<response status=\"success\"><result><uid-response><version>2.0</version>\
                 </uid-response></result></response>"
                    .to_owned(),
            )
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    Ok(r)
}

/// Waits (with a deadline) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A data plane that keeps sessions in memory.
#[derive(Default)]
struct MemStore(BTreeMap<(IpAddr, ServiceId), Session>);

impl SessionStore for MemStore {
    fn upsert_sessions(&mut self, sessions: &[Session]) -> Result<(), DataplaneError> {
        for s in sessions {
            self.0.insert((s.source, s.service), *s);
        }
        Ok(())
    }
    fn remove_sessions(&mut self, keys: &[(IpAddr, ServiceId)]) -> Result<usize, DataplaneError> {
        Ok(keys.iter().filter(|k| self.0.remove(k).is_some()).count())
    }
    fn sessions(&self) -> Result<Vec<Session>, DataplaneError> {
        Ok(self.0.values().copied().collect())
    }
}

fn sid(n: u32) -> ServiceId {
    ServiceId::new(n).unwrap()
}

fn manager(audit: AuditLog) -> SessionManager {
    let catalog = Catalog::new((1..=2).map(|i| ServiceInfo {
        id: sid(i),
        name: format!("svc{i}"),
        protocol: crate::dataplane::Protocol::Tcp,
        port: 8000 + i as u16,
    }));
    let mut m = SessionManager::new(
        Box::<MemStore>::default(),
        Arc::new(catalog),
        1000,
        Duration::from_secs(12 * 3600),
    );
    m.set_audit(audit);
    m
}

fn allow(service: u32, lifetime: Duration) -> ServiceDecision {
    ServiceDecision {
        service_id: sid(service),
        service: format!("svc{service}"),
        action: Action::Allow,
        rule: Some(MatchedRule {
            id: 1,
            name: "users".into(),
        }),
        needs_session: true,
        max_session_lifetime: Some(lifetime),
        idle_timeout: None,
        log: true,
    }
}

fn who(user: &str) -> NewIdentity {
    NewIdentity {
        issuer: "https://idp.example".into(),
        subject: format!("sub-{user}"),
        user: user.into(),
        groups: vec!["web".into(), "ops".into()],
    }
}

/// A pusher observing a fresh audit log, and a manager recording to it.
fn pushing(settings: Settings) -> (UserIdPusher, SessionManager) {
    let pusher = UserIdPusher::start(settings);
    let audit = AuditLog::default();
    assert!(audit.set_observer(pusher.observer()));
    (pusher, manager(audit))
}

fn entry(section: &str, user: &str, ipa: &str, timeout: Option<&str>) -> Entry {
    Entry {
        section: section.into(),
        user: user.into(),
        ip: Some(ipa.into()),
        timeout: timeout.map(str::to_owned),
        tags: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_become_logins_and_logouts_over_https() {
    let rx = Receiver::start().await;
    let (pusher, mut m) = pushing(rx.settings(None, 1000, Duration::from_secs(10)));
    let token_exp = SystemTime::now() + Duration::from_secs(24 * 3600);
    let hour = Duration::from_secs(3600);

    m.login(ip("10.0.0.1"), who(USER), token_exp, &[allow(1, hour)])
        .unwrap();
    eventually("the login", || rx.delivered().len() == 1).await;
    assert_eq!(
        rx.delivered(),
        [entry("login", USER, "10.0.0.1", Some("60"))]
    );
    let r = &rx.requests()[0];
    // The key travels in the form body, never in the URL.
    assert_eq!((r.method.as_str(), r.uri.as_str()), ("POST", "/api/"));
    assert!(!r.uri.contains("key") && !r.uri.contains("s3cr3t"));
    assert_eq!(r.content_type, "application/x-www-form-urlencoded");
    assert_eq!(r.form["type"], "user-id");
    assert_eq!(r.form["key"], KEY);
    assert_eq!(r.form["vsys"], "vsys1");

    // A refresh with a longer rule: a new login with the new timeout.
    m.login(
        ip("10.0.0.1"),
        who(USER),
        token_exp,
        &[allow(1, 2 * hour), allow(2, hour)],
    )
    .unwrap();
    eventually("the refresh", || rx.delivered().len() == 2).await;
    assert_eq!(
        rx.delivered()[1],
        entry("login", USER, "10.0.0.1", Some("120"))
    );

    // Logout, revocation and expiry each end an address's mapping.
    m.login(ip("10.0.0.2"), who(OTHER), token_exp, &[allow(1, hour)])
        .unwrap();
    m.login(ip("10.0.0.3"), who("carol"), token_exp, &[allow(1, hour)])
        .unwrap();
    eventually("two more logins", || rx.delivered().len() == 4).await;
    m.logout(ip("10.0.0.1")).unwrap();
    m.revoke_user(OTHER).unwrap();
    let later = Now::current();
    m.sweep_at(Now {
        wall: later.wall + 2 * hour,
        mono: crate::dataplane::Expiry::from_ns(later.mono.as_ns() + 2 * 3_600_000_000_000),
    });
    eventually("three logouts", || rx.delivered().len() == 7).await;
    let mut logouts = rx.delivered()[4..].to_vec();
    logouts.sort_by(|a, b| a.ip.cmp(&b.ip));
    assert_eq!(
        logouts,
        [
            entry("logout", USER, "10.0.0.1", None),
            entry("logout", OTHER, "10.0.0.2", None),
            entry("logout", "carol", "10.0.0.3", None),
        ]
    );
    // A rotated key file is read again before the next request; an empty one is refused and
    // the key in force stays.
    std::fs::write(rx.dir.join("key"), "rotated-key\n").unwrap();
    bump_mtime(&rx.dir.join("key"));
    m.login(ip("10.0.0.4"), who("dave"), token_exp, &[allow(1, hour)])
        .unwrap();
    eventually("a login with the new key", || rx.delivered().len() == 8).await;
    assert_eq!(rx.requests().last().unwrap().form["key"], "rotated-key");
    std::fs::write(rx.dir.join("key"), "").unwrap();
    bump_mtime(&rx.dir.join("key"));
    m.logout(ip("10.0.0.4")).unwrap();
    eventually("a logout with the kept key", || rx.delivered().len() == 9).await;
    assert_eq!(rx.requests().last().unwrap().form["key"], "rotated-key");
    for r in rx.requests() {
        assert!(!r.uri.contains("key"), "{}", r.uri);
    }

    // The receiver records a request before its answer reaches the pusher's counters.
    let counted = rx.requests().len() as u64;
    eventually("the answers to be counted", || {
        pusher.stats().snapshot()[0].requests_ok == counted
    })
    .await;
    let stats = pusher.stats().snapshot();
    assert_eq!(stats[0].updates_sent, 9);
    assert_eq!(stats[0].requests_failed, 0);
    assert_eq!(stats[0].requests_ok as usize, rx.requests().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_under_rules_that_do_not_log_are_pushed_too() {
    let rx = Receiver::start().await;
    let (_pusher, mut m) = pushing(rx.settings(None, 1000, Duration::from_secs(10)));
    let mut quiet = allow(1, Duration::from_secs(3600));
    quiet.log = false;
    let token_exp = SystemTime::now() + Duration::from_secs(7200);
    m.login(ip("10.0.0.9"), who(USER), token_exp, &[quiet])
        .unwrap();
    eventually("the unlogged rule's login", || rx.delivered().len() == 1).await;
    assert_eq!(
        rx.delivered(),
        [entry("login", USER, "10.0.0.9", Some("60"))]
    );
    m.logout(ip("10.0.0.9")).unwrap();
    eventually("its logout", || rx.delivered().len() == 2).await;
    assert_eq!(rx.delivered()[1], entry("logout", USER, "10.0.0.9", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_follow_groups_when_enabled() {
    let rx = Receiver::start().await;
    let tags = Some(TagConfig {
        prefix: "idgate-".into(),
    });
    let (_pusher, mut m) = pushing(rx.settings(tags, 1000, Duration::from_secs(10)));
    let token_exp = SystemTime::now() + Duration::from_secs(3600);
    m.login(
        ip("10.0.0.1"),
        who(USER),
        token_exp,
        &[allow(1, Duration::from_secs(1800))],
    )
    .unwrap();
    eventually("login and tags", || rx.delivered().len() == 2).await;
    let d = rx.delivered();
    assert_eq!(d[0], entry("login", USER, "10.0.0.1", Some("30")));
    assert_eq!(d[1].section, "register-user");
    assert_eq!(d[1].user, USER);
    let names: Vec<&str> = d[1].tags.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(names, ["idgate-ops", "idgate-web"]);
    // Timeouts in seconds, matching the session (1800 s, a little less by now).
    for (_, timeout) in &d[1].tags {
        let t: u64 = timeout.as_deref().unwrap().parse().unwrap();
        assert!((1700..=1800).contains(&t), "{t}");
    }
    m.logout(ip("10.0.0.1")).unwrap();
    eventually("logout and untag", || rx.delivered().len() == 4).await;
    let d = rx.delivered();
    assert_eq!(d[2], entry("logout", USER, "10.0.0.1", None));
    assert_eq!(d[3].section, "unregister-user");
    assert_eq!(d[3].tags.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_until_the_firewall_takes_them() {
    let rx = Receiver::start().await;
    rx.set_mode(Mode::ApiError);
    let (pusher, mut m) = pushing(rx.settings(None, 1000, Duration::from_secs(10)));
    let token_exp = SystemTime::now() + Duration::from_secs(3600);
    let stats = pusher.stats();
    m.login(
        ip("10.0.0.1"),
        who("alice"),
        token_exp,
        &[allow(1, Duration::from_secs(600))],
    )
    .unwrap();
    eventually("failed requests", || {
        stats.snapshot()[0].requests_failed >= 2
    })
    .await;
    rx.set_mode(Mode::ServerError);
    let failed = stats.snapshot()[0].requests_failed;
    eventually("an HTTP 500 failure", || {
        stats.snapshot()[0].requests_failed > failed + 1
    })
    .await;
    // Meanwhile the user logged out (the retried update is the latest state only) and two
    // others logged in: all three wait together, so one request carries them (batching).
    m.logout(ip("10.0.0.1")).unwrap();
    for (a, u) in [("10.0.0.2", "bob"), ("10.0.0.3", "carol")] {
        m.login(
            ip(a),
            who(u),
            token_exp,
            &[allow(1, Duration::from_secs(600))],
        )
        .unwrap();
    }
    eventually("the three updates to be queued", || {
        stats.snapshot()[0].queued == 3
    })
    .await;
    assert!(rx.delivered().is_empty());
    rx.set_mode(Mode::Success);
    eventually("delivery", || !rx.delivered().is_empty()).await;
    assert_eq!(rx.requests().len(), 1);
    let mut got = rx.delivered();
    got.sort_by(|a, b| a.ip.cmp(&b.ip));
    assert_eq!(
        got,
        [
            entry("logout", "alice", "10.0.0.1", None),
            entry("login", "bob", "10.0.0.2", Some("10")),
            entry("login", "carol", "10.0.0.3", Some("10")),
        ]
    );
    // The receiver records a request before its answer reaches the pusher's counters.
    eventually("the answer to be counted", || {
        stats.snapshot()[0].requests_ok == 1
    })
    .await;
    let s = stats.snapshot()[0];
    assert_eq!(
        (s.requests_ok, s.updates_sent, s.updates_dropped),
        (1, 3, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_firewall_never_holds_up_logins_and_drops_are_counted() {
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Stall);
    // A long request timeout: the sender hangs on its first request for the whole test.
    let (pusher, mut m) = pushing(rx.settings(None, 8, Duration::from_secs(300)));
    let stats = pusher.stats();
    let token_exp = SystemTime::now() + Duration::from_secs(3600);
    m.login(
        ip("10.0.0.1"),
        who("first"),
        token_exp,
        &[allow(1, Duration::from_secs(600))],
    )
    .unwrap();
    eventually("the first request to be in flight", || {
        stats.snapshot()[0].queued == 0 && pusher.sink.tx.capacity() == 8
    })
    .await;
    for i in 0..500u32 {
        let a = IpAddr::from([10, 1, (i / 250) as u8, (i % 250) as u8]);
        m.login(
            a,
            who(&format!("u{i}")),
            token_exp,
            &[allow(1, Duration::from_secs(600))],
        )
        .unwrap();
    }
    eventually("drops to be counted", || {
        let s = stats.snapshot()[0];
        s.updates_dropped + stats.events_dropped() >= 500 - 8 && s.queued == 8
    })
    .await;
    assert_eq!(stats.snapshot()[0].updates_sent, 0);
    assert_eq!(m.table().entries(), 501);
}

#[test]
fn key_files_must_hold_one_line_and_are_never_printed() {
    let dir = std::env::temp_dir().join(format!("idgate-userid-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key");
    std::fs::write(&path, "  abc123  \n").unwrap();
    let key = read_key("https://fw", &path).unwrap();
    assert!(!format!("{key:?}").contains("abc123"));
    std::fs::write(&path, "\n").unwrap();
    assert!(matches!(
        read_key("https://fw", &path),
        Err(UserIdError::KeyFormat { .. })
    ));
    std::fs::write(&path, "a\nb\n").unwrap();
    assert!(read_key("https://fw", &path).is_err());
    let missing = read_key("https://fw", &dir.join("missing")).unwrap_err();
    assert!(missing.to_string().contains("missing"), "{missing}");
    let bad_ca = Firewall::new("https://fw", key, Some(&path), None, Duration::from_secs(1));
    assert!(matches!(bad_ca, Err(UserIdError::CaParse { .. })));
    let _ = std::fs::remove_dir_all(&dir);
}
