//! `cargo xtask demo`: idgate end to end, narrated, with nothing else installed. A client
//! namespace talks over veth to an "API" namespace where a sample API listens on tcp/8000, the
//! built-in dev IdP issues tokens, and the idgate daemon (in-process) protects the port: a login
//! over HTTPS opens it for one identity, the policy refuses another, an admin revokes the first.
//! Everything it creates is removed on exit, also on Ctrl-C.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use hyper::Method;
use idgate::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    devidp::{DevIdp, DevIdpConfig, Options},
};
use idgate_tests::{
    daemon::Daemon,
    idp::TestCa,
    netns::{CLI_V4, NetNs, Pair, SRV_V4},
};
use serde_json::Value;

const API_PORT: u16 = 8000;
const ENDPOINT_PORT: u16 = 8443;
const IDP_PORT: u16 = 9400;
const METRICS: &str = "127.0.0.1:9464";
/// Bob's own address on the client veth, so alice keeps hers (one user per address).
const BOB_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// The dev IdP example's audience.
const AUDIENCE: &str = "api://idgate";

fn main() -> Result<()> {
    // Readable output: the daemon's log lines only for warnings, unless the user asked for more.
    // The dev IdP's start-up warning is said in the narration instead.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: single-threaded here, before any thread reads the environment.
        unsafe { std::env::set_var("RUST_LOG", "warn,idgate::devidp=error") };
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let result = demo(&interrupted);
    // Everything `demo` made (namespaces, veth, programs, daemon, servers, files) is owned by
    // guards it dropped on every path by now.
    if interrupted.load(Ordering::SeqCst) {
        println!(
            "\ninterrupted: daemon stopped, namespaces and files removed, nothing left behind"
        );
        return Ok(());
    }
    if result.is_ok() {
        println!("\ndone: daemon stopped, programs detached, namespaces and files removed");
    }
    result
}

fn step(interrupted: &AtomicBool, title: &str) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n== {title}");
    Ok(())
}

fn demo(interrupted: &AtomicBool) -> Result<()> {
    step(interrupted, "setting up")?;
    // Declared first, dropped last: every thread and program below is gone before the
    // namespaces are deleted.
    let net = Pair::new()?;
    net.cli
        .ip(&["addr", "add", &format!("{BOB_V4}/24"), "dev", &net.cli_if])?;
    println!(
        "   namespace {} (the API host)  {SRV_V4} on {}",
        net.srv.name(),
        net.srv_if
    );
    println!(
        "   namespace {} (the client)    {CLI_V4} (alice), {BOB_V4} (bob) on {}",
        net.cli.name(),
        net.cli_if
    );

    let ca = TestCa::new()?;
    let _api = ApiServer::start(&net.srv, SocketAddr::new(SRV_V4.into(), API_PORT))?;
    println!("   sample API on {SRV_V4}:{API_PORT}: answers {{\"hello\":\"from the API\"}}");

    let idp = DevIdpThread::start(&net.srv)?;
    println!(
        "   dev IdP (idgate's built-in, DEVELOPMENT ONLY: plain HTTP, keys in memory) at {}",
        idp.issuer
    );
    println!("     clients from agent/devidp.example.toml: alice (engineering), bob (contractors)");
    println!(
        "     it listens on the API host's loopback, which the client cannot reach: the demo plays\n     \
         the client's token helper and fetches tokens from a thread inside the API namespace"
    );

    // On veth, idgate's RST (native XDP_TX) only reaches a peer that runs an XDP program itself
    // (see the README); a real NIC needs nothing. A data plane with no services passes all.
    let mut peer = Dataplane::load(LoadOptions::default()).context("loading the peer program")?;
    net.cli
        .run_in(|| peer.attach(&net.cli_if, AttachMode::XdpNative))
        .context("attaching the pass-all program to the client's veth")?;
    println!(
        "   a pass-all XDP program on the client's veth: on veth, idgate's native-XDP RSTs only \
         reach\n     a peer that runs XDP itself (see the README); a physical NIC needs nothing"
    );

    let socket = ca.dir().join("admin.sock");
    let audit_path = ca.dir().join("audit.jsonl");
    let cert = ca.server_cert("endpoint", SRV_V4.into())?;
    let toml = config(
        &net,
        &idp.issuer,
        &cert.cert,
        &cert.key,
        &socket,
        &audit_path,
    );
    let started = Instant::now();
    let daemon = Daemon::start(&net.srv, &toml)?;
    println!(
        "   idgate running in {} ms: native XDP on {}, tcp/{API_PORT} protected (action reset),",
        started.elapsed().as_millis(),
        net.srv_if
    );
    println!(
        "     session endpoint https://{SRV_V4}:{ENDPOINT_PORT} (throw-away CA), metrics on {METRICS},"
    );
    println!("     policy: group engineering → allow; group contractors → drop; default drop");
    println!("     audit stream → {}", audit_path.display());
    let mut audit = AuditTail::new(audit_path);
    audit.show(|_| false, Duration::ZERO);

    let client = Client {
        ns: &net.cli,
        ca_pem: ca.ca_pem(),
    };

    step(
        interrupted,
        "1. alice's machine has no session: the API is closed",
    )?;
    client.try_api("alice", CLI_V4);
    audit.show(|v| v["event"] == "flow", Duration::from_secs(2));

    step(
        interrupted,
        "2. alice gets a token (client credentials) and logs in (POST /v1/sessions over HTTPS)",
    )?;
    let alice_token = idp.token(&net.srv, "alice", "alice-dev-secret")?;
    println!("   token: {} bytes, JWT (at+jwt, ES256)", alice_token.len());
    let (status, body) = client.login(CLI_V4, &alice_token)?;
    print_login(status, &body);
    audit.show(|v| v["event"] == "login", Duration::from_secs(3));

    step(interrupted, "3. the API answers alice")?;
    client.try_api("alice", CLI_V4);
    audit.show(|_| false, Duration::from_millis(300));

    step(
        interrupted,
        "4. bob (group contractors) logs in from 192.0.2.3: refused, stays blocked",
    )?;
    let bob_token = idp.token(&net.srv, "bob", "bob-dev-secret")?;
    let (status, body) = client.login(BOB_V4, &bob_token)?;
    print_login(status, &body);
    client.try_api("bob", BOB_V4);
    println!(
        "   (one user per address: had bob logged in from alice's address, her session there would\n   \
         have been replaced; from his own address, alice keeps hers)"
    );
    client.try_api("alice", CLI_V4);
    audit.show(
        |v| v["event"] == "login" && v["srcuser"] == "bob",
        Duration::from_secs(3),
    );

    step(
        interrupted,
        "5. an admin revokes alice (admin socket: DELETE /v1/sessions?user=alice)",
    )?;
    let (status, body) = daemon.admin(Method::DELETE, "/v1/sessions?user=alice")?;
    println!("   admin → {status} {body}");
    audit.show(|v| v["event"] == "session-end", Duration::from_secs(3));

    step(interrupted, "6. alice is blocked again")?;
    client.try_api("alice", CLI_V4);
    audit.show(|v| v["event"] == "flow", Duration::from_secs(2));

    step(
        interrupted,
        "metrics (http://127.0.0.1:9464/metrics in the API namespace)",
    )?;
    let scrape = http_get(&net.srv, METRICS.parse()?, None)?.1;
    for line in scrape.lines().filter(|l| {
        l.starts_with("idgate_logins_total")
            || (l.starts_with("idgate_packets_total{service=\"api\"") && !l.ends_with(" 0"))
            || l.starts_with("idgate_active_sessions")
    }) {
        println!("   {line}");
    }

    step(interrupted, "cleaning up")?;
    daemon.stop().context("stopping idgate")?;
    drop(peer);
    drop(idp);
    Ok(())
}

/// The daemon's configuration.
fn config(
    net: &Pair,
    issuer: &str,
    cert: &Path,
    key: &Path,
    socket: &Path,
    audit: &Path,
) -> String {
    format!(
        r#"
[dataplane]
interfaces = [{{ name = "{iface}", mode = "xdp-native" }}]
pin_dir = ""

[[services]]
name = "api"
protocol = "tcp"
port = {API_PORT}
action = "reset"

[[issuers]]
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
allow_http = true
group_claims = [{{ path = "groups" }}]

[session_endpoint]
listen = "{SRV_V4}:{ENDPOINT_PORT}"
tls_cert = "{cert}"
tls_key = "{key}"

[admin]
socket = "{socket}"
metrics = "{METRICS}"

[audit]
output = "file"
path = "{audit}"

[policy]
default = "drop"

[[policy.rules]]
name = "engineering-api"
sources = ["group:engineering"]
services = ["api"]
action = "allow"
max_session_lifetime = "30m"

[[policy.rules]]
name = "no-contractors"
sources = ["group:contractors"]
services = ["api"]
action = "drop"
"#,
        iface = net.srv_if,
        cert = cert.display(),
        key = key.display(),
        socket = socket.display(),
        audit = audit.display(),
    )
}

fn print_login(status: u16, body: &Value) {
    let svc = &body["services"][0];
    println!(
        "   session endpoint → {status}: user {} groups {} source {}, {} by rule {} (action {}), expires {}",
        body["user"].as_str().unwrap_or("?"),
        body["groups"],
        body["source"].as_str().unwrap_or("?"),
        svc["decision"].as_str().unwrap_or("?"),
        svc["rule"]["name"].as_str().unwrap_or("(default)"),
        svc["action"].as_str().unwrap_or("?"),
        body["expires_at"].as_str().unwrap_or("never (no session)"),
    );
}

/// The client namespace's view.
struct Client<'a> {
    ns: &'a NetNs,
    ca_pem: String,
}

impl Client<'_> {
    /// GET / on the API from `from`; says what happened.
    fn try_api(&self, who: &str, from: Ipv4Addr) {
        let addr = SocketAddr::new(SRV_V4.into(), API_PORT);
        let started = Instant::now();
        let outcome = http_get(self.ns, addr, Some(from.into()));
        let ms = started.elapsed().as_millis();
        match outcome {
            Ok((status, body)) => println!(
                "   {who} ({from}) → {addr}: HTTP {status} {} ({ms} ms) — the API answered",
                body.trim()
            ),
            Err(e) => {
                let refused = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                if refused {
                    println!(
                        "   {who} ({from}) → {addr}: connection refused after {ms} ms — blocked \
                         (idgate answered the SYN with a RST)"
                    );
                } else {
                    println!("   {who} ({from}) → {addr}: {e:#} after {ms} ms — blocked");
                }
            }
        }
    }

    /// POST /v1/sessions from `from`, trusting only the demo's CA.
    fn login(&self, from: Ipv4Addr, token: &str) -> Result<(u16, Value)> {
        let url = format!("https://{SRV_V4}:{ENDPOINT_PORT}/v1/sessions");
        let ca = self.ca_pem.clone();
        self.ns.run_in(move || -> Result<(u16, Value)> {
            let client = reqwest::blocking::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
                .local_address(IpAddr::V4(from))
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()?;
            let resp = client
                .post(url.as_str())
                .bearer_auth(token)
                .send()
                .context("calling the session endpoint")?;
            let status = resp.status().as_u16();
            let body = serde_json::from_slice(&resp.bytes()?).context("the answer is not JSON")?;
            Ok((status, body))
        })
    }
}

/// One HTTP/1.0 GET / from a thread in `ns` (from the source address `from`, if given).
fn http_get(ns: &NetNs, addr: SocketAddr, from: Option<IpAddr>) -> Result<(u16, String)> {
    let path = if from.is_some() { "/" } else { "/metrics" };
    ns.run_in(|| -> Result<(u16, String)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let socket = tokio::net::TcpSocket::new_v4()?;
            if let Some(from) = from {
                socket.bind(SocketAddr::new(from, 0))?;
            }
            let mut s = tokio::time::timeout(Duration::from_secs(2), socket.connect(addr))
                .await
                .map_err(|_| anyhow!("no answer within 2 s"))??;
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
                .await?;
            let mut text = String::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
                .await
                .map_err(|_| anyhow!("no answer within 5 s"))??;
            let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no status")?;
            Ok((status, body.to_owned()))
        })
    })
}

/// The sample API: answers every request with a JSON greeting; stops on drop.
struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ApiServer {
    fn start(ns: &NetNs, addr: SocketAddr) -> Result<ApiServer> {
        let listener = ns
            .run_in(|| TcpListener::bind(addr))
            .with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        // Read the request head (small; one or a few reads).
                        let mut req = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                            match c.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let body = "{\"hello\":\"from the API\"}\n";
                        let _ = write!(
                            c,
                            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(ApiServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The dev IdP on its own runtime, on a thread in the API namespace; stops on drop.
struct DevIdpThread {
    issuer: String,
    token_endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DevIdpThread {
    fn start(ns: &NetNs) -> Result<DevIdpThread> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(String, String), String>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn_in(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let options = Options {
                    listen: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), IDP_PORT),
                    ..Options::default()
                };
                match DevIdp::start(DevIdpConfig::example(), options).await {
                    Ok(idp) => {
                        let _ = ready_tx.send(Ok((idp.issuer().to_owned(), idp.token_endpoint())));
                        let _ = stopped.await;
                        idp.shutdown().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            });
        });
        let mut guard = DevIdpThread {
            issuer: String::new(),
            token_endpoint: String::new(),
            stop: Some(stop),
            thread: Some(thread),
        };
        let (issuer, token_endpoint) = ready_rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| anyhow!("the dev IdP did not start"))?
            .map_err(|e| anyhow!("the dev IdP: {e}"))?;
        guard.issuer = issuer;
        guard.token_endpoint = token_endpoint;
        Ok(guard)
    }

    /// An access token by the client credentials grant (HTTP Basic), fetched from inside the API
    /// namespace (the IdP is on its loopback).
    fn token(&self, ns: &NetNs, client_id: &str, secret: &str) -> Result<String> {
        let url = &self.token_endpoint;
        ns.run_in(|| -> Result<String> {
            let client = reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()?;
            let resp = client
                .post(url.as_str())
                .basic_auth(client_id, Some(secret))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials")
                .send()
                .context("calling the dev IdP's token endpoint")?;
            let status = resp.status();
            let body: Value = serde_json::from_slice(&resp.bytes()?)?;
            if !status.is_success() {
                bail!("token endpoint: {status} {body}");
            }
            body["access_token"]
                .as_str()
                .map(str::to_owned)
                .context("no access_token in the answer")
        })
    }
}

impl Drop for DevIdpThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Follows the audit file: prints lines not shown yet.
struct AuditTail {
    path: PathBuf,
    shown: usize,
}

impl AuditTail {
    fn new(path: PathBuf) -> AuditTail {
        AuditTail { path, shown: 0 }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to `within`) for a new line satisfying `expect`, lets stragglers arrive, and
    /// prints every new line: the time, the event, then the other fields as compact JSON.
    fn show(&mut self, expect: impl Fn(&Value) -> bool, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && !self.lines().iter().skip(self.shown).any(&expect) {
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(200));
        let lines = self.lines();
        for mut v in lines.into_iter().skip(self.shown) {
            self.shown += 1;
            let time = v["time"]
                .as_str()
                .unwrap_or("")
                .get(11..23)
                .unwrap_or("")
                .to_owned();
            let event = v["event"].as_str().unwrap_or("?").to_owned();
            if let Some(o) = v.as_object_mut() {
                o.remove("time");
                o.remove("event");
            }
            println!("   audit {time} {event:<16} {v}");
        }
    }
}
