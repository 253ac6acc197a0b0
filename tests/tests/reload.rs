//! Configuration reload end to end: the daemon in the server namespace started from a file, two
//! clients (two addresses in the client namespace) logged in with different groups; the file is
//! rewritten so that only one group is still allowed and reloaded (admin API, then a real SIGHUP
//! to this process, whose handler the daemon installed); then broken files are refused and
//! change nothing.
//!
//! Its own test binary (so its own process): the SIGHUP reaches only this daemon.
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hyper::Method;
use idgate_tests::{
    daemon::{Daemon, ENDPOINT, Hello, PROTECTED, config},
    idp::{Issuer, TestCa, TestIdp},
    netns::{NetNs, Pair, unique_id},
    run::require_root,
};
use serde_json::{Value, json};

const BLOCKED_WAIT: Duration = Duration::from_millis(400);
const DEADLINE: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:9464";
/// The second client's address, added to the client's veth.
const CLI2_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);

/// A TCP connection from `src` (bound first) to `dst`, within `timeout`; `None` if refused,
/// dropped or timed out.
fn connect_from(src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    let SocketAddr::V4(dst) = dst else {
        return None;
    };
    let sockaddr = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns (closed on every path, or
    // handed to the TcpStream).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // On Linux, SO_SNDTIMEO bounds connect() too.
        let ok = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) == 0
            && {
                let a = sockaddr(src, 0);
                libc::bind(fd, (&raw const a).cast(), len) == 0
            }
            && {
                let a = sockaddr(*dst.ip(), dst.port());
                libc::connect(fd, (&raw const a).cast(), len) == 0
            };
        if !ok {
            libc::close(fd);
            return None;
        }
        Some(TcpStream::from_raw_fd(fd))
    }
}

struct Client<'a> {
    ns: &'a NetNs,
    addr: Ipv4Addr,
    ca_pem: String,
}

impl Client<'_> {
    fn reaches(&self) -> bool {
        let dst = SocketAddr::new(Pair::srv_addr(false), PROTECTED);
        self.ns.run_in(|| {
            let Some(mut s) = connect_from(self.addr, dst, BLOCKED_WAIT) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 6];
            s.read_exact(&mut buf).is_ok() && &buf == b"hello\n"
        })
    }

    fn wait_reach(&self, open: bool, what: &str) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if self.reaches() == open {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{what}: {} still {} port {PROTECTED}",
            self.addr,
            if open { "blocked from" } else { "reaches" }
        )
    }

    fn login(&self, token: &str) -> Result<(u16, Value)> {
        let url = format!("https://{}:{ENDPOINT}/v1/sessions", Pair::srv_addr(false));
        let (ca, local) = (self.ca_pem.clone(), self.addr);
        self.ns.run_in(move || -> Result<(u16, Value)> {
            let client = reqwest::blocking::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())?])
                .no_proxy()
                .local_address(IpAddr::V4(local))
                .timeout(Duration::from_secs(10))
                .build()?;
            let resp = client.post(&url).bearer_auth(token).send()?;
            let status = resp.status().as_u16();
            Ok((status, serde_json::from_slice(&resp.bytes()?)?))
        })
    }
}

/// One plain HTTP/1.0 GET of the metrics from the server namespace.
fn scrape(ns: &NetNs) -> Result<String> {
    use std::io::Write as _;
    let addr: SocketAddr = METRICS.parse()?;
    ns.run_in(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
}

fn series(scrape: &str, name: &str) -> Result<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no series {name} in\n{scrape}"))?
        .parse()
        .context("not a number")
}

fn reloads(ns: &NetNs, result: &str) -> Result<f64> {
    series(
        &scrape(ns)?,
        &format!("idgate_reloads_total{{result=\"{result}\"}}"),
    )
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn reload_revokes_exactly_what_the_new_policy_refuses() {
    require_root();
    let pair = Pair::new().expect("namespaces");
    let ca = TestCa::new().expect("test CA");
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca).expect("test IdP");
    scenario(&pair, &ca, &idp).unwrap_or_else(|e| panic!("{e:#}"));
}

fn scenario(pair: &Pair, ca: &TestCa, idp: &dyn Issuer) -> Result<()> {
    let srv = Pair::srv_addr(false);
    pair.cli
        .ip(&["addr", "add", &format!("{CLI2_V4}/24"), "dev", &pair.cli_if])?;
    let _hello = Hello::start(&pair.srv, SocketAddr::new(srv, PROTECTED))?;
    let cert = ca.server_cert("endpoint", srv)?;
    let run = ca.dir().join(format!("reload-{}", unique_id()));
    std::fs::create_dir_all(&run)?;
    let socket = run.join("admin.sock");
    let audit_file = run.join("audit.jsonl");
    let base = config(pair, idp, &cert, &socket).replacen(
        "[admin]\n",
        &format!("[admin]\nmetrics = \"{METRICS}\"\n"),
        1,
    ) + &format!(
        "\n[audit]\noutput = \"file\"\npath = \"{}\"\n",
        audit_file.display()
    );
    ensure!(base.contains(r#"sources = ["group:web"]"#), "{base}");
    let both = base.replace(
        r#"sources = ["group:web"]"#,
        r#"sources = ["group:web", "group:ops"]"#,
    );
    let ops_only = base.replace(r#"sources = ["group:web"]"#, r#"sources = ["group:ops"]"#);
    let path = run.join("idgate.toml");
    std::fs::write(&path, &both)?;
    let daemon = Daemon::start_with_file(&pair.srv, &path)?;

    let alice = Client {
        ns: &pair.cli,
        addr: match Pair::cli_addr(false) {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => bail!("the client's v4 address"),
        },
        ca_pem: ca.ca_pem(),
    };
    let bob = Client {
        ns: &pair.cli,
        addr: CLI2_V4,
        ca_pem: ca.ca_pem(),
    };
    ensure!(!alice.reaches() && !bob.reaches(), "open before any token");
    let mint = |user: &str, groups: &[&str]| {
        pair.srv
            .run_in(|| idp.mint(user, groups, Duration::from_secs(600)))
    };
    let (status, body) = alice.login(&mint("alice", &["web"])?)?;
    ensure!(status == 200, "alice: {status} {body}");
    ensure!(body["source"] == alice.addr.to_string(), "{body}");
    let (status, body) = bob.login(&mint("bob", &["ops"])?)?;
    ensure!(status == 200, "bob: {status} {body}");
    ensure!(body["source"] == bob.addr.to_string(), "{body}");
    alice.wait_reach(true, "after alice's login")?;
    bob.wait_reach(true, "after bob's login")?;

    // Only group ops from now on: alice's session is revoked, bob's stays.
    std::fs::write(&path, &ops_only)?;
    let (status, report) = daemon.admin(Method::POST, "/v1/reload")?;
    ensure!(status == 200, "reload: {status} {report}");
    ensure!(report["sessions"]["revoked"] == 1, "{report}");
    ensure!(report["sessions"]["sources_ended"] == 1, "{report}");
    alice.wait_reach(false, "after the reload")?;
    ensure!(bob.reaches(), "bob lost his session in the reload");
    let (status, _) = daemon.admin(Method::GET, &format!("/v1/whois/{}", alice.addr))?;
    ensure!(status == 404, "alice still in the table: {status}");
    let (status, who) = daemon.admin(Method::GET, &format!("/v1/whois/{}", bob.addr))?;
    ensure!(status == 200 && who["user"] == "bob", "{status} {who}");
    let start = Instant::now();
    loop {
        let ends: Vec<Value> = audit_lines(&audit_file)
            .into_iter()
            .filter(|v| v["event"] == "session-end")
            .collect();
        if let [end] = ends.as_slice()
            && end["srcuser"] == "alice"
            && end["session_end_reason"] == "policy-changed"
            && end["src"] == alice.addr.to_string()
        {
            break;
        }
        ensure!(
            start.elapsed() < DEADLINE,
            "expected exactly alice's session-end (policy-changed), got {ends:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // A new login of alice's follows the new policy.
    let (status, body) = alice.login(&mint("alice", &["web"])?)?;
    ensure!(status == 403, "alice after the reload: {status} {body}");
    ensure!(!alice.reaches(), "alice open after a refused login");
    ensure!(reloads(&pair.srv, "ok")? == 1.0, "reload not counted");

    // SIGHUP (the daemon's handler is this process's): a shorter rule lifetime caps bob's session.
    let (_, who) = daemon.admin(Method::GET, &format!("/v1/whois/{}", bob.addr))?;
    let before = who["services"][0]["expires_at"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    std::fs::write(
        &path,
        ops_only.replace(
            r#"max_session_lifetime = "30m""#,
            r#"max_session_lifetime = "5m""#,
        ),
    )?;
    // SAFETY: signalling our own process; the daemon's Tokio handler receives it.
    ensure!(
        unsafe { libc::kill(libc::getpid(), libc::SIGHUP) } == 0,
        "kill"
    );
    let start = Instant::now();
    while reloads(&pair.srv, "ok")? < 2.0 {
        ensure!(start.elapsed() < DEADLINE, "SIGHUP did not reload");
        thread::sleep(Duration::from_millis(50));
    }
    let (_, who) = daemon.admin(Method::GET, &format!("/v1/whois/{}", bob.addr))?;
    let expires = who["services"][0]["expires_at"].as_str().unwrap_or("");
    ensure!(
        !expires.is_empty() && expires < before.as_str(),
        "not capped: {before} -> {who}"
    );
    ensure!(bob.reaches(), "bob lost his session in the SIGHUP reload");

    // A syntax error, then semantic errors: refused, every error reported, nothing changes.
    std::fs::write(&path, "[policy\ndefault = ")?;
    let (status, body) = daemon.admin(Method::POST, "/v1/reload")?;
    ensure!(status == 422, "broken syntax: {status} {body}");
    ensure!(body["error"] == "reload_failed", "{body}");
    ensure!(
        body["errors"].as_array().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    let semantic = ops_only
        .replace(&format!("port = {PROTECTED}"), "port = 0")
        .replace(r#"services = ["fastapi"]"#, r#"services = ["nope"]"#);
    std::fs::write(&path, semantic)?;
    let (status, body) = daemon.admin(Method::POST, "/v1/reload")?;
    ensure!(status == 422, "semantic errors: {status} {body}");
    let errors = body["errors"].as_array().cloned().unwrap_or_default();
    ensure!(errors.len() >= 2, "every error reported: {body}");
    ensure!(
        errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains("port")))
            && errors
                .iter()
                .any(|e| e.as_str().is_some_and(|e| e.contains("nope"))),
        "{body}"
    );
    // A setting that needs a restart.
    std::fs::write(
        &path,
        ops_only.replace(&format!(":{ENDPOINT}\""), ":9443\""),
    )?;
    let (status, body) = daemon.admin(Method::POST, "/v1/reload")?;
    ensure!(status == 422, "listen change: {status} {body}");
    ensure!(body.to_string().contains("restart"), "{body}");

    ensure!(bob.reaches(), "bob lost his session in a refused reload");
    ensure!(!alice.reaches(), "alice open after a refused reload");
    let (status, who) = daemon.admin(Method::GET, &format!("/v1/whois/{}", bob.addr))?;
    ensure!(
        status == 200 && who["services"][0]["expires_at"] == expires,
        "{status} {who}"
    );
    ensure!(reloads(&pair.srv, "failed")? == 3.0, "failed reloads");
    ensure!(reloads(&pair.srv, "ok")? == 2.0, "ok reloads");
    // Each reload is in the audit stream: who asked, what it did, why it was refused.
    let reloads: Vec<Value> = audit_lines(&audit_file)
        .into_iter()
        .filter(|v| v["event"] == "config-reload")
        .collect();
    let summary: Vec<(String, String, u64)> = reloads
        .iter()
        .map(|v| {
            (
                v["trigger"].as_str().unwrap_or("?").to_owned(),
                v["result"].as_str().unwrap_or("?").to_owned(),
                v["sessions_revoked"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    let expected = [
        ("admin", "applied", 1),
        ("sighup", "applied", 0),
        ("admin", "refused", 0),
        ("admin", "refused", 0),
        ("admin", "refused", 0),
    ]
    .map(|(t, r, n)| (t.to_owned(), r.to_owned(), n));
    ensure!(summary == expected, "config-reload records: {reloads:?}");
    ensure!(
        reloads
            .iter()
            .all(|v| v["path"] == path.display().to_string()),
        "{reloads:?}"
    );
    ensure!(
        reloads[4]["errors"].to_string().contains("restart") && reloads[1]["errors"] == json!([]),
        "{reloads:?}"
    );
    daemon.stop()?;
    Ok(())
}
