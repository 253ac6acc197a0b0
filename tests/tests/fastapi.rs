//! The Python client (clients/python) end to end: idgate's daemon protects tcp/8000 in the server
//! namespace, a real FastAPI app (clients/python/e2e/app.py) is served there by uvicorn and asks
//! the daemon's admin socket who its peers are, and the client namespace logs in with a token
//! from the test IdP and runs pytest (clients/python/e2e) against the app.
//!
//! Also runs the client's unit tests (clients/python/tests), so that `cargo xtask test` covers
//! them. Both use the virtualenv `cargo xtask setup` makes (target/venv).
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hyper::Method;
use idgate_tests::{
    daemon::{Daemon, ENDPOINT, PROTECTED, config},
    idp::{Issuer as _, TestCa, TestIdp},
    netns::{NetNs, Pair, unique_id},
    run::require_root,
};
use serde_json::Value;

/// A connect that gets no answer within this counts as blocked (the service drops).
const BLOCKED_WAIT: Duration = Duration::from_millis(400);
/// Upper bound of any poll; uvicorn's start-up (imports) is the slowest thing waited for.
const DEADLINE: Duration = Duration::from_secs(30);
/// The service and rule [`config`] names.
const SERVICE: &str = "fastapi";
const RULE: &str = "web-users";

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The virtualenv's interpreter, with the client and its test dependencies installed.
fn python() -> Result<PathBuf> {
    let python = repo().join("target/venv/bin/python");
    ensure!(
        python.is_file(),
        "{} is missing: `cargo xtask setup` makes the Python client's virtualenv",
        python.display()
    );
    Ok(python)
}

/// A Python command that leaves no caches in the source tree.
fn python_cmd(python: &Path) -> Command {
    let mut cmd = Command::new(python);
    cmd.env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("IDGATE_WHOIS_SOCKET")
        .env_remove("IDGATE_SERVICE");
    cmd
}

/// stdout and stderr of a finished command, for failure messages.
fn output_text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The "N passed" count of pytest's summary; fails unless all of them passed and some ran.
fn pytest_passed(out: &Output) -> Result<u32> {
    let text = output_text(out);
    ensure!(
        out.status.success(),
        "pytest failed ({}):\n{text}",
        out.status
    );
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.contains(" passed"))
        .map(str::to_owned)
        .with_context(|| format!("no pytest summary:\n{text}"))?;
    let passed = summary
        .split(" passed")
        .next()
        .and_then(|head| head.split_whitespace().next_back())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unreadable summary {summary:?}"))?;
    ensure!(passed > 0, "pytest ran nothing:\n{text}");
    Ok(passed)
}

#[test]
fn the_python_clients_unit_tests_pass() {
    let python = python().unwrap_or_else(|e| panic!("{e:#}"));
    let out = python_cmd(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(repo().join("clients/python"))
        .stdin(Stdio::null())
        .output()
        .expect("running pytest");
    let passed = pytest_passed(&out).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("clients/python unit tests: {passed} passed");
}

/// uvicorn serving the sample app inside a namespace; killed on drop.
struct Uvicorn {
    child: Child,
    log: PathBuf,
}

impl Uvicorn {
    /// Starts `e2e/app.py` on every address of `ns`, port `port`, asking the agent at `socket`
    /// as service `SERVICE`. uvicorn's defaults otherwise, proxy headers included: it believes
    /// `X-Forwarded-For` from loopback, which the client must not let name a peer.
    fn start(ns: &NetNs, python: &Path, port: u16, socket: &Path, log: PathBuf) -> Result<Uvicorn> {
        let out = File::create(&log).with_context(|| log.display().to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(python)
            .args(["-m", "uvicorn", "app:app", "--app-dir"])
            .arg(repo().join("clients/python/e2e"))
            .args(["--host", "0.0.0.0", "--port"])
            .arg(port.to_string())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("IDGATE_WHOIS_SOCKET", socket)
            .env("IDGATE_SERVICE", SERVICE)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting uvicorn")?;
        // `ip netns exec` execs (no fork), so the child is uvicorn itself: drop kills it.
        Ok(Uvicorn { child, log })
    }

    /// uvicorn's output so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the app answers `/healthz` from inside `ns`.
    fn wait_ready(&mut self, ns: &NetNs, addr: SocketAddr) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("uvicorn exited ({status}):\n{}", self.log());
            }
            if matches!(http_get(ns, addr, "/healthz", ""), Ok((200, _))) {
                return Ok(());
            }
            if start.elapsed() > DEADLINE {
                bail!("uvicorn not ready within {DEADLINE:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Uvicorn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.0 GET from a thread in `ns`, with `headers` (each ending in CRLF): status
/// and body.
fn http_get(ns: &NetNs, addr: SocketAddr, path: &str, headers: &str) -> Result<(u16, String)> {
    ns.run_in(|| -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n")?;
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

/// Whether a TCP connect to `addr` from `ns` succeeds before [`BLOCKED_WAIT`].
fn connects(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run_in(|| TcpStream::connect_timeout(&addr, BLOCKED_WAIT).is_ok())
}

/// Polls `check` until it holds; fails with `what` after [`DEADLINE`].
fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > DEADLINE {
            bail!("{what}: not within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Presents `token` to the session endpoint from the client namespace, trusting only `ca_pem`.
fn login(ns: &NetNs, server: IpAddr, ca_pem: &str, token: &str) -> Result<(u16, Value)> {
    let url = format!("https://{server}:{ENDPOINT}/v1/sessions");
    ns.run_in(|| -> Result<(u16, Value)> {
        // Built on this thread (in the client namespace), so its connections are made there.
        let client = reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let resp = client
            .post(&url)
            .bearer_auth(token)
            .send()
            .context("calling the session endpoint")?;
        let status = resp.status().as_u16();
        let body = serde_json::from_slice(&resp.bytes()?).context("the answer is not JSON")?;
        Ok((status, body))
    })
}

#[test]
fn a_fastapi_app_behind_idgate_sees_its_peers_identity() {
    require_root();
    scenario().unwrap_or_else(|e| panic!("{e:#}"));
}

fn scenario() -> Result<()> {
    let python = python()?;
    let pair = Pair::new()?;
    let ca = TestCa::new()?;
    let srv = Pair::srv_addr(false);
    let cli = Pair::cli_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca)?;
    let cert = ca.server_cert("endpoint", srv)?;
    let socket = ca
        .dir()
        .join(format!("run-{}", unique_id()))
        .join("admin.sock");
    let daemon = Daemon::start(&pair.srv, &config(&pair, &idp, &cert, &socket))?;

    // The app asks the read-only whois socket beside the admin socket: open to every local user
    // (0666 in a 0755 directory), whois and nothing else.
    let whois = daemon.admin_socket().with_file_name("whois.sock");
    let mode = |p: &Path| -> Result<u32> { Ok(fs::metadata(p)?.permissions().mode() & 0o777) };
    ensure!(
        mode(&whois)? == 0o666,
        "whois socket mode {:o}",
        mode(&whois)?
    );
    ensure!(mode(daemon.admin_socket())? == 0o660, "admin socket mode");
    let parent = whois.parent().context("no parent")?;
    ensure!(
        mode(parent)? == 0o755,
        "socket directory mode {:o}",
        mode(parent)?
    );
    for (method, path) in [
        (Method::DELETE, "/v1/sessions?user=alice"),
        (Method::GET, "/v1/sessions"),
        (Method::GET, "/v1/status"),
        (Method::POST, "/v1/reload"),
    ] {
        let (status, body) = admin_request(&whois, method.clone(), path)?;
        ensure!(
            status == 403 && body["reason"] == "whois_only",
            "{method} {path} on the whois socket: {status} {body}"
        );
    }
    let (status, _) = admin_request(&whois, Method::GET, &format!("/v1/whois/{cli}"))?;
    ensure!(status == 404, "whois before any login: {status}");

    let app = SocketAddr::new(srv, PROTECTED);
    let local = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PROTECTED);
    let mut uvicorn = Uvicorn::start(
        &pair.srv,
        &python,
        PROTECTED,
        &whois,
        ca.dir().join("uvicorn.log"),
    )?;
    uvicorn.wait_ready(&pair.srv, local)?;

    // Before any login the app is out of the client's reach.
    ensure!(
        !connects(&pair.cli, app),
        "port {PROTECTED} reachable before any login"
    );

    let token = pair
        .srv
        .run_in(|| idp.mint("alice", &["web", "staff"], Duration::from_secs(300)))?;
    let (status, body) = login(&pair.cli, srv, &ca.ca_pem(), &token)?;
    ensure!(status == 200, "alice's login: {status} {body}");
    wait_for("the app reachable after the login", || {
        connects(&pair.cli, app)
    })?;

    // The client's side, as a FastAPI developer would test it: pytest from the client namespace.
    let out = Command::new("ip")
        .args(["netns", "exec", pair.cli.name()])
        .arg(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "e2e"])
        .current_dir(repo().join("clients/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("IDGATE_E2E_URL", format!("http://{app}"))
        .env("IDGATE_E2E_USER", "alice")
        .env("IDGATE_E2E_GROUPS", "web,staff")
        .env("IDGATE_E2E_ISSUER", idp.issuer())
        .env("IDGATE_E2E_SERVICE", SERVICE)
        .env("IDGATE_E2E_RULE", RULE)
        .env("IDGATE_E2E_ADDRESS", cli.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running pytest in the client namespace")?;
    let passed = pytest_passed(&out).with_context(|| format!("uvicorn:\n{}", uvicorn.log()))?;
    ensure!(passed == 3, "expected 3 e2e tests:\n{}", output_text(&out));

    // The same from here, independently of the Python client under test.
    let (status, me) = http_get(&pair.cli, app, "/me", "")?;
    ensure!(status == 200, "/me: {status} {me}");
    let me: Value = serde_json::from_str(&me)?;
    ensure!(me["user"] == "alice" && me["rule"] == RULE, "{me}");
    ensure!(http_get(&pair.cli, app, "/ops", "")?.0 == 403, "/ops");

    // A local process naming alice's address in a proxy header (which uvicorn believes from
    // loopback) does not become alice; without the header it is nobody.
    let forged = format!("X-Forwarded-For: {cli}\r\n");
    let (status, body) = http_get(&pair.srv, local, "/me", &forged)?;
    ensure!(status == 403, "forged X-Forwarded-For: {status} {body}");
    ensure!(body.contains("direct peers only"), "{body}");
    let (status, body) = http_get(&pair.srv, local, "/me", "")?;
    ensure!(status == 401, "from loopback: {status} {body}");

    // With the agent gone (and its programs detached), the app says so instead of guessing.
    daemon.stop()?;
    let mut last = None;
    wait_for("503 from /me once the agent stopped", || {
        last = http_get(&pair.cli, app, "/me", "").ok();
        last.as_ref().is_some_and(|(s, _)| *s == 503)
    })
    .with_context(|| format!("last answer: {last:?}"))?;
    let (_, body) = last.context("no answer")?;
    let body: Value = serde_json::from_str(&body)?;
    ensure!(
        body["detail"] == "idgate agent unreachable: no socket",
        "{body}"
    );
    ensure!(
        uvicorn.log().contains("is idgate running?"),
        "uvicorn's log does not say why:\n{}",
        uvicorn.log()
    );
    Ok(())
}

/// One request to an agent socket, from this process.
fn admin_request(socket: &Path, method: Method, path: &str) -> Result<(u16, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(idgate::api::client::request(socket, method, path))
        .context("request on an agent socket")
}
