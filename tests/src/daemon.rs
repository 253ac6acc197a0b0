//! idgate's daemon in-process: [`idgate::runtime::run`] on a thread inside a network namespace
//! (its runtime's threads, and so its sockets and its interface lookups, are in that namespace),
//! with its audit records captured for the test to check.
//!
//! In-process rather than the `idgate` binary: a test of another package cannot rely on that
//! binary being built and current. `main.rs` adds only argument parsing, config loading and the
//! signal future around the same [`idgate::runtime::run`].

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use hyper::Method;
use idgate::config::Config;
use serde_json::Value;
use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::{
    idp::{Issuer, ServerCert},
    netns::{NetNs, Pair},
};

/// How long start-up (load, attach, first key fetch) may take.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// One audit record: its fields as text (`message` included).
pub type AuditRecord = BTreeMap<String, String>;

static AUDIT: Mutex<Vec<AuditRecord>> = Mutex::new(Vec::new());

/// Every audit record (target `idgate::audit`) seen so far in this process.
pub fn audit_records() -> Vec<AuditRecord> {
    AUDIT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The field naming the thread that emitted a record: tests running daemons in parallel tell
/// theirs apart by it.
const THREAD_FIELD: &str = "_thread";

/// Waits until an audit record satisfies `pred`; returns it.
pub fn wait_audit(
    what: &str,
    within: Duration,
    pred: impl Fn(&AuditRecord) -> bool,
) -> Result<AuditRecord> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = audit_records().into_iter().find(|r| pred(r)) {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            bail!("no audit record {what} within {within:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Installs (once per process) a subscriber that captures audit records and writes every log
/// line to the test's output (`RUST_LOG`, default `info`).
pub fn install_log_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_ansi(false)
                    .with_filter(filter),
            )
            .with(AuditCapture)
            .try_init();
    });
}

struct AuditCapture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for AuditCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != idgate::session::audit::TARGET {
            return;
        }
        let mut fields = Fields(BTreeMap::new());
        event.record(&mut fields);
        if let Some(name) = thread::current().name() {
            fields.0.insert(THREAD_FIELD.to_owned(), name.to_owned());
        }
        AUDIT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fields.0);
    }
}

struct Fields(AuditRecord);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// The daemon, running in a namespace; stopped (and joined) on drop.
pub struct Daemon {
    /// Name of the threads it runs on (see [`Daemon::wait_audit`]).
    threads: String,
    admin_socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<Result<(), String>>>,
}

impl Daemon {
    /// Validates `config_toml`, starts the daemon inside `ns`, and waits until its admin socket
    /// answers and every issuer's keys are fetched.
    pub fn start(ns: &NetNs, config_toml: &str) -> Result<Daemon> {
        Daemon::start_inner(ns, config_toml, None)
    }

    /// [`Daemon::start`] with the configuration in the file at `path`, which reloads (SIGHUP,
    /// `POST /v1/reload`) read again.
    pub fn start_with_file(ns: &NetNs, path: &Path) -> Result<Daemon> {
        let toml = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        Daemon::start_inner(ns, &toml, Some(path.to_owned()))
    }

    fn start_inner(ns: &NetNs, config_toml: &str, path: Option<PathBuf>) -> Result<Daemon> {
        install_log_capture();
        let (config, warnings) =
            Config::parse(config_toml).map_err(|e| anyhow!("test configuration: {e}"))?;
        for w in warnings {
            eprintln!("configuration warning: {w}");
        }
        let admin_socket = config.admin.socket.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // The same name as the thread `spawn_in` makes, so every record it emits carries it.
        let threads = format!("in-{}", ns.name());
        let worker_name = threads.clone();
        let thread = ns.spawn_in(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(worker_name)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(idgate::runtime::run_from(config, path, async {
                let _ = stopped.await;
            }))
            .map_err(|e| e.to_string())
        });
        let mut daemon = Daemon {
            threads,
            admin_socket,
            stop: Some(stop),
            thread: Some(thread),
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let result = self.join();
                bail!("idgate stopped during start-up: {result:?}");
            }
            if let Ok((200, status)) = self.admin(Method::GET, "/v1/status") {
                let issuers = status["issuers"].as_array().cloned().unwrap_or_default();
                if !issuers.is_empty() && issuers.iter().all(|i| i["keys"].as_u64() > Some(0)) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("idgate was not ready within {START_DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until an audit record of this daemon (not of one another test runs in parallel)
    /// satisfies `pred`; returns it.
    pub fn wait_audit(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&AuditRecord) -> bool,
    ) -> Result<AuditRecord> {
        wait_audit(what, within, |r| {
            r.get(THREAD_FIELD) == Some(&self.threads) && pred(r)
        })
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// One admin API call: status and JSON answer.
    pub fn admin(&self, method: Method, path: &str) -> Result<(u16, Value)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(idgate::api::client::request(
            &self.admin_socket,
            method,
            path,
        ))
        .context("admin request")
    }

    /// Stops the daemon (as SIGTERM would) and returns how `run` ended.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.join().map_err(|e| anyhow!(e))
    }

    fn join(&mut self) -> Result<(), String> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err("the daemon thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Err(e) = self.join() {
            eprintln!("idgate ended with an error: {e}");
        }
    }
}

/// The protected port of [`config`].
pub const PROTECTED: u16 = 8000;
/// The session endpoint's port in [`config`].
pub const ENDPOINT: u16 = 8443;

/// A TCP server answering `hello\n` to every connection; stops on drop.
pub struct Hello {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Hello {
    /// Listens on `addr` inside `ns` and answers until dropped.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Result<Hello> {
        let listener = ns.run_in(|| TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        use std::io::Write as _;
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(b"hello\n");
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Hello {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The daemon's configuration for a [`Pair`]: native XDP on the server's veth, tcp/[`PROTECTED`]
/// protected with `drop`, the session endpoint on [`ENDPOINT`], one rule allowing group `web`.
pub fn config(pair: &Pair, issuer: &dyn Issuer, cert: &ServerCert, socket: &Path) -> String {
    format!(
        r#"
[dataplane]
interfaces = [{{ name = "{iface}", mode = "xdp" }}]
max_session_lifetime = "1h"
pin_dir = ""

[[services]]
name = "fastapi"
protocol = "tcp"
port = {PROTECTED}
action = "drop"

{issuer}
[session_endpoint]
listen = "{srv}:{ENDPOINT}"
tls_cert = "{cert}"
tls_key = "{key}"

[admin]
socket = "{socket}"

[policy]
default = "drop"

[[policy.rules]]
name = "web-users"
sources = ["group:web"]
services = ["fastapi"]
action = "allow"
max_session_lifetime = "30m"
"#,
        iface = pair.srv_if,
        issuer = issuer.config_toml(),
        srv = Pair::srv_addr(false),
        cert = cert.cert.display(),
        key = cert.key.display(),
        socket = socket.display(),
    )
}
