//! User-ID: tells Palo Alto firewalls who is behind each address idgate has a session for.
//!
//! Every audit record passes [`UserIdPusher`]'s observer ([`AuditLog::set_observer`]); allowed
//! logins and session ends become [`tracker::Event`]s, handed over with a non-blocking
//! `try_send` into a bounded channel, so the session path never waits for a firewall (when the
//! channel is full the event is dropped and counted). One task turns events into updates
//! ([`tracker::Tracker`]): `login` with the time left until the address's last session ends
//! (minutes, rounded up) on login and refresh, `logout` when its last session ends (logout,
//! revocation, expiry, replacement, policy change), and, with `register_tags`, the user's groups
//! as user tags. Each firewall has its own bounded, coalescing queue ([`queue::Pending`]: only
//! the latest state of an address waits) and its own sender task, which batches what waits into
//! one `uid-message` per request and retries failures with exponential backoff.
//!
//! Requests are `POST <url>/api/` with the form fields `type=user-id`, `key`, optionally `vsys`,
//! and `cmd`: the API key travels in the body, never in a URL or a log line.
//!
//! [`AuditLog::set_observer`]: crate::session::audit::AuditLog::set_observer

pub mod queue;
#[cfg(test)]
mod tests;
pub mod tracker;
pub mod xml;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use thiserror::Error;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};

use self::{
    queue::Pending,
    tracker::{Event, Tracker},
    xml::Op,
};
use crate::{
    config::{TagConfig, UserIdConfig},
    session::audit::{AuditEvent, AuditObserver},
};

/// The first wait after a failed request; it doubles up to `max_backoff`.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// The most of a response body read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why the User-ID settings could not be built.
#[derive(Debug, Error)]
pub enum UserIdError {
    /// The API key file could not be read.
    #[error("userid firewall {url}: api_key_file {}: {source}", path.display())]
    KeyFile {
        /// The firewall.
        url: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API key file is empty or holds more than one line.
    #[error("userid firewall {url}: api_key_file {}: expected the API key on one line", path.display())]
    KeyFormat {
        /// The firewall.
        url: String,
        /// The file.
        path: PathBuf,
    },
    /// The CA file could not be read.
    #[error("userid firewall {url}: ca_file {}: {source}", path.display())]
    CaFile {
        /// The firewall.
        url: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate.
    #[error("userid firewall {url}: ca_file {}: no PEM certificate in it", path.display())]
    CaParse {
        /// The firewall.
        url: String,
        /// The file.
        path: PathBuf,
    },
    /// The HTTP client could not be built.
    #[error("userid firewall {url}: building the HTTPS client: {source}")]
    Client {
        /// The firewall.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The URL could not be parsed (configuration validation refuses it first).
    #[error("userid firewall {url}: invalid URL")]
    Url {
        /// The firewall.
        url: String,
    },
}

/// A firewall's API key: never printed.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The key in force, and the file it came from (read again when its modification time
/// changes, so that a rotated key needs neither a restart nor a reload).
#[derive(Debug)]
struct KeySource {
    key: ApiKey,
    file: Option<(PathBuf, Option<SystemTime>)>,
}

/// One firewall, ready to be sent to.
#[derive(Clone, Debug)]
pub struct Firewall {
    /// `https://host[:port]`, for logs.
    pub url: String,
    /// Where requests go (`<url>/api/`).
    pub api_url: reqwest::Url,
    /// The API key, and where it is read from.
    key: Arc<Mutex<KeySource>>,
    /// The virtual system, if not the default.
    pub vsys: Option<String>,
    /// The HTTPS client (the configured CA only, when one is given).
    pub client: reqwest::Client,
}

impl Firewall {
    /// A firewall at `url` (`https://host[:port]`) with this key and optional CA bundle.
    pub fn new(
        url: &str,
        key: ApiKey,
        ca_file: Option<&std::path::Path>,
        vsys: Option<String>,
        timeout: Duration,
    ) -> Result<Firewall, UserIdError> {
        let api_url = reqwest::Url::parse(&format!("{}/api/", url.trim_end_matches('/')))
            .map_err(|_| UserIdError::Url { url: url.into() })?;
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("idgate/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|source| UserIdError::CaFile {
                url: url.into(),
                path: path.into(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| UserIdError::CaParse {
                    url: url.into(),
                    path: path.into(),
                })?;
            // Only the configured CA: firewalls usually carry certificates from a private CA,
            // and nothing else should be able to receive the API key.
            builder = builder.tls_certs_only(certs);
        }
        if api_url.host().is_some_and(|h| {
            matches!(h, url::Host::Ipv4(a) if a.is_loopback())
                || matches!(h, url::Host::Ipv6(a) if a.is_loopback())
        }) {
            builder = builder.no_proxy();
        }
        let client = builder.build().map_err(|source| UserIdError::Client {
            url: url.into(),
            source,
        })?;
        Ok(Firewall {
            url: url.to_owned(),
            api_url,
            key: Arc::new(Mutex::new(KeySource { key, file: None })),
            vsys,
            client,
        })
    }

    /// [`Firewall::new`] with the key read from `key_file`, and read again whenever the file's
    /// modification time changes.
    pub fn with_key_file(
        url: &str,
        key_file: &std::path::Path,
        ca_file: Option<&std::path::Path>,
        vsys: Option<String>,
        timeout: Duration,
    ) -> Result<Firewall, UserIdError> {
        let modified = modified(key_file);
        let key = read_key(url, key_file)?;
        let fw = Firewall::new(url, key, ca_file, vsys, timeout)?;
        fw.key.lock().unwrap_or_else(|p| p.into_inner()).file =
            Some((key_file.to_owned(), modified));
        Ok(fw)
    }

    /// The key to send: read again first if its file changed. A file that cannot be read (or
    /// holds no key) leaves the previous key in force, loudly.
    fn current_key(&self) -> ApiKey {
        let mut k = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((path, seen)) = &k.file {
            let now = modified(path);
            if now != *seen {
                let path = path.clone();
                match read_key(&self.url, &path) {
                    Ok(key) => {
                        tracing::info!(firewall = %self.url, file = %path.display(), "User-ID: API key read again");
                        k.key = key;
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "User-ID: the changed API key file cannot be used; keeping the previous key"
                    ),
                }
                k.file = Some((path, now));
            }
        }
        k.key.clone()
    }

    /// The form body of a request carrying `cmd`.
    pub fn form(&self, cmd: &str) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("type", "user-id");
        form.append_pair("key", &self.current_key().0);
        if let Some(v) = &self.vsys {
            form.append_pair("vsys", v);
        }
        form.append_pair("cmd", cmd);
        form.finish()
    }

    /// Sends `ops` in one request; `Err` says why the firewall did not take them.
    pub async fn send(&self, ops: &[Op]) -> Result<(), String> {
        let body = self.form(&xml::uid_message(ops));
        let mut resp = self
            .client
            .post(self.api_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = resp.status();
        let mut text = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
            let room = MAX_RESPONSE_BYTES - text.len();
            text.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if text.len() >= MAX_RESPONSE_BYTES {
                break;
            }
        }
        let text = String::from_utf8_lossy(&text);
        if !status.is_success() {
            return Err(format!(
                "HTTP {status}: {}",
                xml::check_response(&text).err().unwrap_or_default()
            ));
        }
        xml::check_response(&text)
    }
}

/// An error with its causes (reqwest's own message omits the TLS or connection reason).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Everything the pusher runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where updates go.
    pub firewalls: Vec<Firewall>,
    /// User tags from groups, if wanted.
    pub tags: Option<TagConfig>,
    /// Entries per request at most.
    pub batch_size: usize,
    /// Updates waiting per firewall at most (and events waiting for the tracker).
    pub queue_size: usize,
    /// How long an update waits for others to share its request.
    pub flush_interval: Duration,
    /// The first wait after a failure.
    pub initial_backoff: Duration,
    /// The longest wait between retries.
    pub max_backoff: Duration,
}

impl Settings {
    /// Reads the key and CA files the configuration names and builds the clients.
    pub fn from_config(c: &UserIdConfig) -> Result<Settings, UserIdError> {
        let firewalls = c
            .firewalls
            .iter()
            .map(|f| {
                Firewall::with_key_file(
                    &f.url,
                    &f.api_key_file,
                    f.ca_file.as_deref(),
                    f.vsys.clone(),
                    c.request_timeout,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Settings {
            firewalls,
            tags: c.register_tags.clone(),
            batch_size: c.batch_size,
            queue_size: c.queue_size,
            flush_interval: c.flush_interval,
            initial_backoff: INITIAL_BACKOFF.min(c.max_backoff),
            max_backoff: c.max_backoff,
        })
    }
}

/// The modification time of `path`, if it can be read.
fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The API key in `path`: one line, surrounding whitespace ignored.
pub fn read_key(url: &str, path: &std::path::Path) -> Result<ApiKey, UserIdError> {
    let text = std::fs::read_to_string(path).map_err(|source| UserIdError::KeyFile {
        url: url.into(),
        path: path.into(),
        source,
    })?;
    let key = text.trim();
    if key.is_empty() || key.contains(['\n', '\r']) {
        return Err(UserIdError::KeyFormat {
            url: url.into(),
            path: path.into(),
        });
    }
    Ok(ApiKey::new(key))
}

/// Counters of one firewall.
#[derive(Debug, Default)]
pub struct FirewallStats {
    /// Requests the firewall accepted.
    pub requests_ok: AtomicU64,
    /// Requests that failed (connection, TLS, HTTP status, or an error response).
    pub requests_failed: AtomicU64,
    /// Entries (login, logout, tag updates) delivered.
    pub updates_sent: AtomicU64,
    /// Entries dropped because the queue was full.
    pub updates_dropped: AtomicU64,
    /// Entries waiting now.
    pub queued: AtomicU64,
}

/// The pusher's counters, read by the metrics endpoint. Labels are firewall indexes (in
/// configuration order), never users or addresses.
#[derive(Debug, Default)]
pub struct UserIdStats {
    /// Per firewall, in configuration order.
    pub firewalls: Vec<FirewallStats>,
    /// Session events dropped before the tracker because its channel was full.
    pub events_dropped: AtomicU64,
}

/// One firewall's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirewallCounters {
    /// Requests accepted.
    pub requests_ok: u64,
    /// Requests failed.
    pub requests_failed: u64,
    /// Entries delivered.
    pub updates_sent: u64,
    /// Entries dropped (queue full).
    pub updates_dropped: u64,
    /// Entries waiting.
    pub queued: u64,
}

impl UserIdStats {
    /// The counters of every firewall, in configuration order.
    pub fn snapshot(&self) -> Vec<FirewallCounters> {
        self.firewalls
            .iter()
            .map(|f| FirewallCounters {
                requests_ok: f.requests_ok.load(Ordering::Relaxed),
                requests_failed: f.requests_failed.load(Ordering::Relaxed),
                updates_sent: f.updates_sent.load(Ordering::Relaxed),
                updates_dropped: f.updates_dropped.load(Ordering::Relaxed),
                queued: f.queued.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Session events dropped before the tracker.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }
}

/// A firewall's queue, shared by the tracker task (which fills it) and its sender.
#[derive(Debug)]
struct Queue {
    pending: Mutex<Pending>,
    ready: Notify,
}

/// What the audit log calls: converts and hands over without waiting.
#[derive(Debug)]
struct Sink {
    tx: mpsc::Sender<Event>,
    stats: Arc<UserIdStats>,
}

impl AuditObserver for Sink {
    fn observe(&self, e: &AuditEvent<'_>) {
        let Some(event) = Event::from_audit(e) else {
            return;
        };
        if self.tx.try_send(event).is_err() {
            let n = self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                tracing::warn!(
                    dropped_total = n + 1,
                    "User-ID: the update channel is full; session events dropped"
                );
            }
        }
    }
}

/// The running User-ID pusher; its tasks stop when it is dropped.
#[derive(Debug)]
pub struct UserIdPusher {
    sink: Arc<Sink>,
    stats: Arc<UserIdStats>,
    _tasks: JoinSet<()>,
}

impl UserIdPusher {
    /// Starts the tracker and one sender per firewall on the current Tokio runtime.
    pub fn start(settings: Settings) -> UserIdPusher {
        let stats = Arc::new(UserIdStats {
            firewalls: settings
                .firewalls
                .iter()
                .map(|_| FirewallStats::default())
                .collect(),
            events_dropped: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(settings.queue_size.max(1));
        let queues: Vec<Arc<Queue>> = settings
            .firewalls
            .iter()
            .map(|_| {
                Arc::new(Queue {
                    pending: Mutex::new(Pending::new(settings.queue_size)),
                    ready: Notify::new(),
                })
            })
            .collect();
        let mut tasks = JoinSet::new();
        tasks.spawn(track(
            rx,
            Tracker::new(settings.tags.clone()),
            queues.clone(),
            stats.clone(),
        ));
        for (i, (fw, q)) in settings.firewalls.iter().zip(&queues).enumerate() {
            tasks.spawn(send_loop(
                fw.clone(),
                i,
                q.clone(),
                stats.clone(),
                settings.clone(),
            ));
        }
        tracing::info!(
            firewalls = settings.firewalls.len(),
            tags = settings.tags.is_some(),
            "User-ID updates enabled"
        );
        UserIdPusher {
            sink: Arc::new(Sink {
                tx,
                stats: stats.clone(),
            }),
            stats,
            _tasks: tasks,
        }
    }

    /// The observer to install on the audit log.
    pub fn observer(&self) -> Arc<dyn AuditObserver> {
        self.sink.clone()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<UserIdStats> {
        self.stats.clone()
    }
}

/// Turns events into updates for every firewall's queue.
async fn track(
    mut rx: mpsc::Receiver<Event>,
    mut tracker: Tracker,
    queues: Vec<Arc<Queue>>,
    stats: Arc<UserIdStats>,
) {
    let mut events = Vec::new();
    while rx.recv_many(&mut events, 256).await > 0 {
        let now = SystemTime::now();
        let ops: Vec<Op> = events
            .drain(..)
            .flat_map(|e| tracker.apply(e, now))
            .collect();
        if ops.is_empty() {
            continue;
        }
        for (i, (q, s)) in queues.iter().zip(&stats.firewalls).enumerate() {
            let (dropped, len) = {
                let mut p = q.pending.lock().unwrap_or_else(|p| p.into_inner());
                let dropped: usize = ops.iter().map(|op| p.push(op.clone())).sum();
                (dropped, p.len())
            };
            s.queued.store(len as u64, Ordering::Relaxed);
            if dropped > 0 {
                let before = s
                    .updates_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                // Once per streak of drops would need a reset signal; every power of two of
                // the total keeps the log readable under a sustained overload.
                let total = before + dropped as u64;
                if before == 0 || total.ilog2() != before.ilog2() {
                    tracing::warn!(
                        firewall = i,
                        dropped_total = total,
                        "User-ID: the firewall's queue is full; oldest updates dropped"
                    );
                }
            }
            q.ready.notify_one();
        }
    }
}

/// Sends one firewall's queue, batching and retrying.
async fn send_loop(
    fw: Firewall,
    index: usize,
    q: Arc<Queue>,
    stats: Arc<UserIdStats>,
    settings: Settings,
) {
    let s = &stats.firewalls[index];
    let mut backoff = settings.initial_backoff;
    let mut failures: u64 = 0;
    let len = |q: &Queue| q.pending.lock().unwrap_or_else(|p| p.into_inner()).len();
    loop {
        while len(&q) == 0 {
            q.ready.notified().await;
        }
        if len(&q) < settings.batch_size && !settings.flush_interval.is_zero() {
            // Let what arrives meanwhile share the request.
            tokio::time::sleep(settings.flush_interval).await;
        }
        let (ops, left) = {
            let mut p = q.pending.lock().unwrap_or_else(|p| p.into_inner());
            (p.take(settings.batch_size), p.len())
        };
        s.queued.store(left as u64, Ordering::Relaxed);
        if ops.is_empty() {
            continue;
        }
        match fw.send(&ops).await {
            Ok(()) => {
                s.requests_ok.fetch_add(1, Ordering::Relaxed);
                s.updates_sent
                    .fetch_add(ops.len() as u64, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(
                        firewall = %fw.url,
                        failed_requests = failures,
                        "User-ID updates reach the firewall again"
                    );
                }
                failures = 0;
                backoff = settings.initial_backoff;
            }
            Err(e) => {
                s.requests_failed.fetch_add(1, Ordering::Relaxed);
                if failures == 0 {
                    tracing::warn!(
                        firewall = %fw.url,
                        error = %e,
                        updates = ops.len(),
                        "User-ID update failed; retrying with backoff"
                    );
                } else {
                    tracing::debug!(firewall = %fw.url, error = %e, "User-ID update failed again");
                }
                failures += 1;
                let (dropped, left) = {
                    let mut p = q.pending.lock().unwrap_or_else(|p| p.into_inner());
                    (p.requeue(ops), p.len())
                };
                s.queued.store(left as u64, Ordering::Relaxed);
                s.updates_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(settings.max_backoff);
            }
        }
    }
}
