//! Restart-safe enforcement with a real process: the agent (`idgate run`, as this crate's
//! `idgate-run` binary) runs in the server namespace with a pin directory; a client logs in over
//! the session endpoint and keeps connecting to the protected port, while an unauthenticated
//! client (a second address on the client's veth) keeps trying. The agent is killed with SIGKILL
//! and started again with the same configuration: the authenticated client never loses its
//! session, the unauthenticated one never gets through, neither while no agent runs nor across
//! the restart. The restarted agent adopts the session under its owner (from the session
//! journal): whois names the user, `sessions list` shows it, and a revoke closes the port. A
//! restart with a policy that no longer allows the user removes the surviving session at start.
//! At the end the agent stops on SIGTERM and `idgate::dataplane::cleanup` detaches everything and
//! removes the pins.
//!
//! Needs root and `nsenter` (util-linux). `nsenter --net`, not `ip netns exec`: the latter
//! remounts /sys, hiding the bpffs at /sys/fs/bpf.

use std::{
    fs,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hyper::Method;
use idgate_tests::{
    daemon::{ENDPOINT, Hello, PROTECTED, config},
    idp::{Issuer as _, TestCa, TestIdp},
    netns::{NetNs, Pair, unique_id},
    run::require_root,
};
use serde_json::Value;

/// The unauthenticated client's address, a second one on the client's veth.
const UNAUTH_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// A connect without an answer within this counts as blocked (the service drops).
const BLOCKED_WAIT: Duration = Duration::from_millis(200);
/// An authenticated connection gets this long (connect, then the greeting).
const GENEROUS: Duration = Duration::from_secs(3);
/// Upper bound of the agent's start and of any poll.
const DEADLINE: Duration = Duration::from_secs(15);

/// Connects to the protected port from `from` (`None`: the default source) and reads the
/// greeting; `Ok` only if both work.
fn fetch(from: Option<Ipv4Addr>, timeout: Duration) -> Result<()> {
    let to = SocketAddr::new(Pair::srv_addr(false), PROTECTED);
    let mut conn: TcpStream = match from {
        None => TcpStream::connect_timeout(&to, timeout)?,
        Some(ip) => {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
            s.connect_timeout(&to.into(), timeout)?;
            s.into()
        }
    };
    conn.set_read_timeout(Some(GENEROUS))?;
    let mut buf = [0u8; 6];
    conn.read_exact(&mut buf)?;
    ensure!(&buf == b"hello\n", "wrong greeting {buf:?}");
    Ok(())
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The agent as a child process in the server namespace; killed (SIGKILL) on drop if still
/// running.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `idgate-run --config <config>` in `ns`, logging to `log`, and waits until its admin
    /// socket answers with every issuer's keys fetched.
    fn start(ns: &NetNs, config: &Path, socket: &Path, log: PathBuf) -> Result<Agent> {
        let stderr = fs::File::create(&log).context("the agent's log file")?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name()))
            .arg(env!("CARGO_BIN_EXE_idgate-run"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting nsenter/idgate-run")?;
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "the agent exited during start-up ({status}):\n{}",
                    agent.log()
                );
            }
            if let Ok((200, status)) = admin(socket, Method::GET, "/v1/status") {
                let issuers = status["issuers"].as_array().cloned().unwrap_or_default();
                if !issuers.is_empty() && issuers.iter().all(|i| i["keys"].as_u64() > Some(0)) {
                    return Ok(agent);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent was not ready within {DEADLINE:?}:\n{}",
                    agent.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits for the process to end.
    fn signal(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: a plain system call; the child is not reaped yet, so the pid is still ours.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pin directory under /sys/fs/bpf, cleaned up (detached and removed) on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = idgate::dataplane::cleanup(&self.0) {
            eprintln!("warning: cleaning up {}: {e}", self.0.display());
        }
    }
}

/// One admin API call over the socket: status and JSON answer.
fn admin(socket: &Path, method: Method, path: &str) -> Result<(u16, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(idgate::api::client::request(socket, method, path))
        .context("admin request")
}

/// `POST /v1/sessions` with `token` from the client namespace, over HTTPS trusting only the CA.
fn login(ns: &NetNs, ca_pem: &str, token: &str) -> Result<(u16, Value)> {
    let url = format!("https://{}:{ENDPOINT}/v1/sessions", Pair::srv_addr(false));
    ns.run_in(|| -> Result<(u16, Value)> {
        let client = reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let resp = client.post(&url).bearer_auth(token).send()?;
        let status = resp.status().as_u16();
        let body: Value = serde_json::from_slice(&resp.bytes()?).context("not JSON")?;
        Ok((status, body))
    })
}

/// The two client loops: authenticated connects (each must succeed) and unauthenticated ones
/// from [`UNAUTH_V4`] (each must fail).
struct Loops {
    stop: Arc<AtomicBool>,
    /// Authenticated attempts, and those that failed.
    auth: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    /// Unauthenticated attempts, and those that got through.
    unauth: Arc<AtomicUsize>,
    leaked: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Loops {
    fn start(ns: &NetNs) -> Loops {
        let stop = Arc::new(AtomicBool::new(false));
        let [auth, failed, unauth, leaked]: [Arc<AtomicUsize>; 4] = Default::default();
        let mut threads = Vec::new();
        {
            let (stop, attempts, bad) = (stop.clone(), auth.clone(), failed.clone());
            threads.push(ns.spawn_in(move || {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = fetch(None, GENEROUS) {
                        eprintln!("authenticated connection failed: {e:#}");
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        for _ in 0..2 {
            let (stop, attempts, bad) = (stop.clone(), unauth.clone(), leaked.clone());
            threads.push(ns.spawn_in(move || {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if fetch(Some(UNAUTH_V4), BLOCKED_WAIT).is_ok() {
                        eprintln!("an unauthenticated connection got through");
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Loops {
            stop,
            auth,
            failed,
            unauth,
            leaked,
            threads,
        }
    }

    /// Stops the loops; returns (authenticated attempts, failed, unauthenticated attempts,
    /// leaked).
    fn finish(mut self) -> (usize, usize, usize, usize) {
        self.stop();
        (
            self.auth.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.unauth.load(Ordering::Relaxed),
            self.leaked.load(Ordering::Relaxed),
        )
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("warning: a client loop panicked");
            }
        }
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn sigkill_and_restart_keep_the_session_and_keep_others_out() {
    require_root();
    let pair = Pair::new().expect("namespaces");
    pair.cli
        .ip(&[
            "addr",
            "add",
            &format!("{UNAUTH_V4}/24"),
            "dev",
            &pair.cli_if,
        ])
        .expect("the unauthenticated client's address");
    let ca = TestCa::new().expect("test CA");
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca).expect("test IdP");
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/idgate-restart-proc-{}-{}",
        std::process::id(),
        unique_id()
    )));
    scenario(&pair, &ca, &idp, &pins).unwrap_or_else(|e| panic!("{e:#}"));
}

fn scenario(pair: &Pair, ca: &TestCa, idp: &TestIdp, pins: &PinDir) -> Result<()> {
    let srv = Pair::srv_addr(false);
    let _hello = Hello::start(&pair.srv, SocketAddr::new(srv, PROTECTED))?;
    let cert = ca.server_cert("endpoint", srv)?;
    let socket = ca.dir().join("admin.sock");
    let journal = ca.dir().join("state/sessions.jsonl");
    let toml = config(pair, idp, &cert, &socket).replacen(
        "pin_dir = \"\"",
        &format!(
            "pin_dir = \"{}\"\nsession_state = \"{}\"",
            pins.0.display(),
            journal.display()
        ),
        1,
    );
    ensure!(toml.contains(&pins.0.display().to_string()), "{toml}");
    let config_file = ca.dir().join("idgate.toml");
    fs::write(&config_file, toml)?;
    let cli = &pair.cli;
    let auth_ok = || cli.run_in(|| fetch(None, GENEROUS));
    let unauth_ok = || cli.run_in(|| fetch(Some(UNAUTH_V4), BLOCKED_WAIT));

    // First run: closed for both clients, then the login opens it for one.
    let mut first = Agent::start(&pair.srv, &config_file, &socket, ca.dir().join("run1.log"))?;
    ensure!(
        unauth_ok().is_err(),
        "open before any login (second address)"
    );
    ensure!(
        cli.run_in(|| fetch(None, BLOCKED_WAIT)).is_err(),
        "open before the login"
    );
    let token = pair
        .srv
        .run_in(|| idp.mint("alice", &["web"], Duration::from_secs(600)))?;
    let (status, body) = login(cli, &ca.ca_pem(), &token)?;
    ensure!(status == 200, "login: {status} {body}");
    ensure!(
        body["source"] == Pair::cli_addr(false).to_string(),
        "{body}"
    );
    let start = Instant::now();
    while auth_ok().is_err() {
        ensure!(
            start.elapsed() < DEADLINE,
            "the login did not open the port"
        );
        thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        unauth_ok().is_err(),
        "the login opened the port for another address"
    );

    // The loops run through the kill, the time without an agent and the restart.
    let loops = Loops::start(cli);
    thread::sleep(Duration::from_millis(500));
    let killed = first.signal(libc::SIGKILL)?;
    ensure!(!killed.success(), "SIGKILL: {killed}");
    let killed_at = Instant::now();
    // No agent: enforcement and the session stay, pinned.
    ensure!(pins.0.exists(), "the pins went with the agent");
    ensure!(
        unauth_ok().is_err(),
        "an unauthenticated connection got through while no agent ran"
    );
    auth_ok().context("the session while no agent ran")?;
    thread::sleep(Duration::from_millis(700));
    let dead_for = killed_at.elapsed();

    // Second run, same configuration.
    let restarted = Instant::now();
    let mut second = Agent::start(&pair.srv, &config_file, &socket, ca.dir().join("run2.log"))?;
    let ready_in = restarted.elapsed();
    // Past at least two sweeps of the new agent, which must keep the surviving session.
    thread::sleep(Duration::from_millis(2500));
    let (auth, failed, unauth, leaked) = loops.finish();
    eprintln!(
        "agent dead for {dead_for:?}, restarted and ready in {ready_in:?}; \
         authenticated: {auth} attempts, {failed} failed; \
         unauthenticated: {unauth} attempts, {leaked} got through"
    );
    ensure!(
        auth > 10 && unauth > 10,
        "too few attempts ({auth}, {unauth})"
    );
    ensure!(
        failed == 0,
        "{failed} of {auth} authenticated connections failed"
    );
    ensure!(
        leaked == 0,
        "{leaked} of {unauth} unauthenticated connections got through"
    );

    // The session is still there after the restart, adopted under its owner: connects keep
    // working, whois names the user, the list shows it.
    auth_ok().context("the session after the restart")?;
    ensure!(
        unauth_ok().is_err(),
        "open for another address after restart"
    );
    let log = strip_ansi(&second.log());
    ensure!(
        log.lines().any(|l| l.contains("sessions adopted")
            && l.contains("sessions=1")
            && l.contains("revoked_by_policy=0")),
        "the new agent did not report adopting the session:\n{log}"
    );
    let whois_path = format!("/v1/whois/{}", Pair::cli_addr(false));
    let (status, whois) = admin(&socket, Method::GET, &whois_path)?;
    ensure!(status == 200, "whois after restart: {status} {whois}");
    ensure!(
        whois["user"] == "alice" && whois["groups"] == serde_json::json!(["web"]),
        "whois after restart: {whois}"
    );
    ensure!(
        whois["services"][0]["rule"]["name"] == "web-users",
        "{whois}"
    );
    let (_, list) = admin(&socket, Method::GET, "/v1/sessions")?;
    ensure!(list["count"] == 1, "sessions after restart: {list}");

    // An adopted session can be revoked: the port closes for it.
    let (status, revoked) = admin(
        &socket,
        Method::DELETE,
        &format!("/v1/sessions?source={}", Pair::cli_addr(false)),
    )?;
    ensure!(
        status == 200 && revoked["removed"]["sessions"] == 1,
        "revoke: {status} {revoked}"
    );
    ensure!(
        cli.run_in(|| fetch(None, BLOCKED_WAIT)).is_err(),
        "open after the adopted session was revoked"
    );
    let (status, _) = admin(&socket, Method::GET, &whois_path)?;
    ensure!(status == 404, "whois after revoke: {status}");

    // A restart under a policy that no longer allows the user: the surviving session goes at
    // start, before the new agent is ready.
    let (status, body) = login(cli, &ca.ca_pem(), &token)?;
    ensure!(status == 200, "second login: {status} {body}");
    auth_ok().context("the second login")?;
    let stopped = second.signal(libc::SIGTERM)?;
    ensure!(stopped.success(), "exit on SIGTERM: {stopped}");
    auth_ok().context("the session while no agent ran (second time)")?;
    let stricter = fs::read_to_string(&config_file)?
        .replace("sources = [\"group:web\"]", "sources = [\"group:admins\"]");
    ensure!(stricter.contains("group:admins"), "{stricter}");
    fs::write(&config_file, stricter)?;
    let mut third = Agent::start(&pair.srv, &config_file, &socket, ca.dir().join("run3.log"))?;
    ensure!(
        cli.run_in(|| fetch(None, BLOCKED_WAIT)).is_err(),
        "a session the new policy refuses survived the restart"
    );
    let log = strip_ansi(&third.log());
    ensure!(
        log.lines()
            .any(|l| l.contains("sessions adopted") && l.contains("revoked_by_policy=1")),
        "the restarted agent did not report revoking the session:\n{log}"
    );
    let (_, list) = admin(&socket, Method::GET, "/v1/sessions")?;
    ensure!(
        list["count"] == 0,
        "sessions after a stricter restart: {list}"
    );

    // SIGTERM: a clean stop, enforcement stays pinned; then cleanup detaches and removes it.
    let stopped = third.signal(libc::SIGTERM)?;
    ensure!(stopped.success(), "exit on SIGTERM: {stopped}");
    ensure!(unauth_ok().is_err(), "open after SIGTERM (pins must stay)");
    let detached = idgate::dataplane::cleanup(&pins.0)?;
    ensure!(
        detached.iter().any(|d| d.starts_with(&pair.srv_if)),
        "cleanup detached {detached:?}"
    );
    ensure!(!pins.0.exists(), "the pin directory is still there");
    ensure!(
        unauth_ok().is_ok(),
        "still closed for the second address after cleanup"
    );
    Ok(())
}
