//! User-ID end to end: the daemon in the server namespace, configured with one firewall (a
//! PAN-OS stand-in on the namespace's loopback, HTTPS with a certificate from the test CA), maps
//! the client's address to its user on login and removes the mapping on logout and revocation.
//! The stand-in reads the form with a URL decoder and the `uid-message` with Python's XML parser
//! (tests/assets/userid/entries.py, in the venv `cargo xtask setup` makes).
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use idgate_tests::{
    daemon::{Daemon, ENDPOINT, config},
    idp::{Issuer, TestCa, TestIdp},
    netns::{NetNs, Pair, unique_id},
    run::require_root,
};
use serde_json::Value;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::aws_lc_rs::default_provider,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

/// Upper bound of any poll.
const DEADLINE: Duration = Duration::from_secs(15);
/// The firewall's API key, as the key file holds it.
const KEY: &str = "LUFRPT1-test+key/=&";

/// One entry of a uid-message: section, user, ip, timeout, tags.
type Entry = (String, String, Option<String>, Option<String>, Vec<String>);

/// One request the stand-in got: its URI, form fields and entries
/// `(section, user, ip, timeout, tags)`.
#[derive(Clone, Debug)]
struct Received {
    uri: String,
    form: HashMap<String, String>,
    entries: Vec<Entry>,
}

/// The PAN-OS stand-in: answers success to every request and records it. Stops on drop.
struct Firewall {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (it creates the venv)",
        p.display()
    );
    p
}

/// The entries of a uid-message, read by Python's XML parser.
fn parse_uid_message(xml: &str) -> Result<Vec<Entry>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/userid/entries.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(xml.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{} refused {xml:?}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

impl Firewall {
    fn start(ns: &NetNs, ca: &TestCa) -> Result<Firewall> {
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let cert = ca.server_cert(&format!("fw-{}", unique_id()), addr.ip())?;
        let tls = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
            )?;
        let listener = ns.run_in(|| std::net::TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let g = got.clone();
        let thread = thread::Builder::new()
            .name("test-firewall".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let accept = async {
                        loop {
                            let Ok((tcp, _)) = listener.accept().await else {
                                continue;
                            };
                            let (acceptor, g) = (acceptor.clone(), g.clone());
                            tokio::spawn(async move {
                                let Ok(tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                let svc = service_fn(move |req| answer(req, g.clone()));
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(tls), svc)
                                    .await;
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Firewall {
            addr,
            got,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every entry received so far, in order.
    fn entries(&self) -> Vec<Entry> {
        self.received()
            .into_iter()
            .flat_map(|r| r.entries)
            .collect()
    }

    /// Waits until `n` entries arrived.
    fn wait_entries(&self, n: usize, what: &str) -> Result<()> {
        let start = Instant::now();
        while self.entries().len() < n {
            if start.elapsed() > DEADLINE {
                bail!("{what}: the firewall got {:?}", self.entries());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// An `application/x-www-form-urlencoded` body (`+` is a space, `%XX` a byte).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    fn decode(s: &[u8]) -> String {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => {
                    let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut kv = p.splitn(2, |b| *b == b'=');
            let k = decode(kv.next().unwrap_or_default());
            let v = decode(kv.next().unwrap_or_default());
            (k, v)
        })
        .collect()
}

async fn answer(
    req: Request<Incoming>,
    got: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let uri = req.uri().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: HashMap<String, String> = parse_form(&body);
    let cmd = form.get("cmd").cloned().unwrap_or_default();
    let parsed = tokio::task::spawn_blocking(move || parse_uid_message(&cmd))
        .await
        .expect("parser thread");
    let text = match parsed {
        Ok(entries) => {
            got.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Received { uri, form, entries });
            "<response status=\"success\"><result/></response>".to_owned()
        }
        Err(e) => format!("<response status=\"error\"><msg>{e}</msg></response>"),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// `method /v1/sessions` with `token` from the client namespace, over HTTPS trusting only the CA.
fn session_call(
    ns: &NetNs,
    ca_pem: &str,
    method: reqwest::Method,
    token: &str,
) -> Result<(u16, Value)> {
    let url = format!("https://{}:{ENDPOINT}/v1/sessions", Pair::srv_addr(false));
    ns.run_in(|| -> Result<(u16, Value)> {
        let client = reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let resp = client.request(method, &url).bearer_auth(token).send()?;
        let status = resp.status().as_u16();
        let body: Value = serde_json::from_slice(&resp.bytes()?).context("not JSON")?;
        Ok((status, body))
    })
}

fn entry(section: &str, user: &str, ip: &str, timeout: Option<&str>) -> Entry {
    (
        section.into(),
        user.into(),
        Some(ip.into()),
        timeout.map(str::to_owned),
        Vec::new(),
    )
}

#[test]
fn logins_logouts_and_revocations_reach_the_firewall() {
    require_root();
    let pair = Pair::new().expect("namespaces");
    let ca = TestCa::new().expect("test CA");
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca).expect("test IdP");
    scenario(&pair, &ca, &idp).unwrap_or_else(|e| panic!("{e:#}"));
}

fn scenario(pair: &Pair, ca: &TestCa, idp: &TestIdp) -> Result<()> {
    let fw = Firewall::start(&pair.srv, ca)?;
    let cert = ca.server_cert("endpoint", Pair::srv_addr(false))?;
    let socket = ca
        .dir()
        .join(format!("run-{}", unique_id()))
        .join("admin.sock");
    let key_file = ca.dir().join(format!("fw-{}.key", unique_id()));
    std::fs::write(&key_file, format!("{KEY}\n"))?;
    let toml = config(pair, idp, &cert, &socket)
        + &format!(
            "\n[userid]\nflush_interval = \"0s\"\nregister_tags = \"idgate-\"\n\n\
             [[userid.firewalls]]\nurl = \"https://{}\"\napi_key_file = \"{}\"\nca_file = \"{}\"\n",
            fw.addr,
            key_file.display(),
            ca.ca_file().display()
        );
    let daemon = Daemon::start(&pair.srv, &toml)?;
    let cli = Pair::cli_addr(false).to_string();
    let ca_pem = ca.ca_pem();
    let mint = |user: &str, ttl: u64| {
        pair.srv
            .run_in(|| idp.mint(user, &["web"], Duration::from_secs(ttl)))
    };

    // Login: the token lives 10 minutes, less than the rule's 30: the mapping's timeout is 10.
    let alice = mint("alice", 600)?;
    let (status, body) = session_call(&pair.cli, &ca_pem, reqwest::Method::POST, &alice)?;
    ensure!(status == 200, "login: {status} {body}");
    fw.wait_entries(2, "alice's login")?;
    let got = fw.entries();
    ensure!(
        got[0] == entry("login", "alice", &cli, Some("10")),
        "{got:?}"
    );
    ensure!(
        got[1].0 == "register-user" && got[1].1 == "alice" && got[1].4 == ["idgate-web"],
        "{got:?}"
    );
    let first = &fw.received()[0];
    ensure!(first.uri == "/api/", "request URI {:?}", first.uri);
    ensure!(
        first.form.get("key").map(String::as_str) == Some(KEY),
        "{:?}",
        first.form
    );
    ensure!(first.form.get("type").map(String::as_str) == Some("user-id"));

    // Logout from the client: the mapping and the tags go.
    let (status, body) = session_call(&pair.cli, &ca_pem, reqwest::Method::DELETE, &alice)?;
    ensure!(status == 200, "logout: {status} {body}");
    fw.wait_entries(4, "alice's logout")?;
    let got = fw.entries();
    ensure!(got[2] == entry("logout", "alice", &cli, None), "{got:?}");
    ensure!(
        got[3].0 == "unregister-user" && got[3].1 == "alice",
        "{got:?}"
    );

    // A revocation by the administrator.
    let bob = mint("bob", 3600)?;
    let (status, body) = session_call(&pair.cli, &ca_pem, reqwest::Method::POST, &bob)?;
    ensure!(status == 200, "bob's login: {status} {body}");
    fw.wait_entries(6, "bob's login")?;
    ensure!(
        fw.entries()[4] == entry("login", "bob", &cli, Some("30")),
        "{:?}",
        fw.entries()
    );
    let (status, body) = daemon.admin(Method::DELETE, "/v1/sessions?user=bob")?;
    ensure!(status == 200, "revoke: {status} {body}");
    fw.wait_entries(8, "bob's revocation")?;
    ensure!(
        fw.entries()[6] == entry("logout", "bob", &cli, None),
        "{:?}",
        fw.entries()
    );
    daemon.stop()?;
    Ok(())
}
