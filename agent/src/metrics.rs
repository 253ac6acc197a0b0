//! Prometheus metrics on the loopback admin address (`[admin] metrics`), plain HTTP:
//!
//! - `GET /metrics`: the text exposition format 0.0.4;
//! - `GET /live`: 200 while the process runs;
//! - `GET /ready`: 200 once the data plane is attached and the endpoints serve, 503 before (and
//!   while shutting down).
//!
//! Everything is read at scrape time (kernel counters, key caches, the session table), except
//! login outcomes, counted by the session endpoint in [`Metrics`]. No label names a user or an
//! address: services, verdict reasons, login results and reasons, and issuers are all bounded
//! by the configuration or the code.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};

use crate::{
    api::{ApiError, App, HttpResponse},
    dataplane::{EventStats, ServiceCounters},
    identity::IssuerStats,
    userid::{FirewallCounters, UserIdStats},
};

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Scrapes served at once; more connections are closed.
const MAX_CONNECTIONS: usize = 32;

/// How a login attempt ended, as the `result` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoginResult {
    /// Verified, and at least one service allowed.
    Ok,
    /// Verified, and the policy allowed nothing (403).
    Denied,
    /// Refused before the policy: a bad or missing token, a malformed request, rate limited,
    /// the IdP's keys missing.
    Failed,
    /// Verified, but the sessions could not be installed.
    Error,
}

impl LoginResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::Denied => "denied",
            LoginResult::Failed => "failed",
            LoginResult::Error => "error",
        }
    }
}

/// What the daemon counts itself (the rest is read at scrape time).
#[derive(Debug, Default)]
pub struct Metrics {
    logins: Mutex<BTreeMap<(LoginResult, String), u64>>,
    ready: AtomicBool,
    reloads: AtomicU64,
    reloads_failed: AtomicU64,
    userid: OnceLock<Arc<UserIdStats>>,
}

impl Metrics {
    /// Counts one login attempt. `reason` is machine-readable and from a fixed set (never a
    /// user or an address).
    pub fn login(&self, result: LoginResult, reason: &str) {
        let mut m = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&(result, reason.to_owned())) {
            *n += 1;
        } else {
            m.insert((result, reason.to_owned()), 1);
        }
    }

    /// Login attempts so far: (result, reason, count).
    pub fn logins(&self) -> Vec<(LoginResult, String, u64)> {
        self.logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((r, reason), n)| (*r, reason.clone(), *n))
            .collect()
    }

    /// Marks the daemon ready (data plane attached, endpoints serving) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Counts a configuration reload that was applied.
    pub fn reloaded(&self) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a configuration reload that was refused (the old configuration stays).
    pub fn reload_failed(&self) {
        self.reloads_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Configuration reloads applied so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Configuration reloads refused so far.
    pub fn reloads_failed(&self) -> u64 {
        self.reloads_failed.load(Ordering::Relaxed)
    }

    /// Shows the User-ID pusher's counters from now on (once; `false` if already set).
    pub fn set_userid(&self, stats: Arc<UserIdStats>) -> bool {
        self.userid.set(stats).is_ok()
    }

    /// The User-ID counters, when User-ID runs.
    pub fn userid(&self) -> Option<UserIdSnapshot> {
        self.userid.get().map(|u| UserIdSnapshot {
            firewalls: u.snapshot(),
            events_dropped: u.events_dropped(),
        })
    }
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The agent's version.
    pub version: String,
    /// Counters per service, named (`unattributed` for service 0).
    pub counters: Vec<(String, ServiceCounters)>,
    /// Sessions in the kernel map.
    pub active_sessions: u64,
    /// Login attempts: (result, reason, count).
    pub logins: Vec<(LoginResult, String, u64)>,
    /// Key caches per issuer.
    pub issuers: Vec<IssuerStats>,
    /// Events the kernel suppressed or lost (`None`: could not be read).
    pub events: Option<EventStats>,
    /// Flow records the audit trail left out.
    pub audit_flows_suppressed: u64,
    /// Audit records that could not be written.
    pub audit_write_errors: u64,
    /// Configuration reloads applied.
    pub reloads: u64,
    /// Configuration reloads refused.
    pub reloads_failed: u64,
    /// Whether the daemon is ready.
    pub ready: bool,
    /// User-ID counters (`None`: no firewalls configured).
    pub userid: Option<UserIdSnapshot>,
}

/// The User-ID pusher's counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct UserIdSnapshot {
    /// Per firewall, in configuration order (the `firewall` label is the index).
    pub firewalls: Vec<FirewallCounters>,
    /// Session events dropped before reaching the tracker.
    pub events_dropped: u64,
}

impl Snapshot {
    /// Reads everything from a running daemon.
    pub fn of(app: &App) -> Snapshot {
        let (counters, events, active) = {
            let sessions = app.sessions();
            let counters = sessions.store().counters().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "metrics: reading the data plane's counters failed");
                Vec::new()
            });
            (
                counters,
                sessions.store().event_stats().ok(),
                sessions.table().entries() as u64,
            )
        };
        let catalog = app.catalog.get();
        let counters = counters
            .into_iter()
            .map(|c| {
                let name = match c.service_id {
                    0 => "unattributed".to_owned(),
                    id => catalog
                        .get_raw(id)
                        .map_or_else(|| format!("service-{id}"), |s| s.name.clone()),
                };
                (name, c)
            })
            .collect();
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            counters,
            active_sessions: active,
            logins: app.metrics.logins(),
            issuers: app.verifier.get().stats(),
            events,
            audit_flows_suppressed: app.audit.flows_suppressed(),
            audit_write_errors: app.audit.write_errors(),
            reloads: app.metrics.reloads(),
            reloads_failed: app.metrics.reloads_failed(),
            ready: app.metrics.is_ready(),
            userid: app.metrics.userid(),
        }
    }
}

/// A label value, escaped as the exposition format wants (`\\`, `\"`, `\n`).
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The snapshot in the text exposition format 0.0.4.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "idgate_build_info",
        "gauge",
        "The agent's version (always 1).",
    );
    let _ = writeln!(
        out,
        "idgate_build_info{{version=\"{}\"}} 1",
        label(&s.version)
    );
    family(
        &mut out,
        "idgate_ready",
        "gauge",
        "1 once the data plane is attached and the endpoints serve.",
    );
    let _ = writeln!(out, "idgate_ready {}", u8::from(s.ready));

    for (name, help, bytes) in [
        (
            "idgate_packets_total",
            "Packets to protected services (service \"unattributed\": malformed traffic), by verdict reason.",
            false,
        ),
        (
            "idgate_bytes_total",
            "Bytes to protected services (service \"unattributed\": malformed traffic), by verdict reason.",
            true,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for (service, c) in &s.counters {
            for (reason, count) in &c.by_reason {
                let v = if bytes { count.bytes } else { count.packets };
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",reason=\"{}\"}} {v}",
                    label(service),
                    reason.as_str()
                );
            }
        }
    }
    family(
        &mut out,
        "idgate_rst_sent_total",
        "counter",
        "TCP resets sent for refused segments.",
    );
    for (service, c) in &s.counters {
        let _ = writeln!(
            out,
            "idgate_rst_sent_total{{service=\"{}\"}} {}",
            label(service),
            c.rst_sent.packets
        );
    }

    family(
        &mut out,
        "idgate_active_sessions",
        "gauge",
        "Sessions (source and service) in the kernel map.",
    );
    let _ = writeln!(out, "idgate_active_sessions {}", s.active_sessions);

    family(
        &mut out,
        "idgate_logins_total",
        "counter",
        "Token presentations at the session endpoint, by result and reason.",
    );
    for (result, reason, n) in &s.logins {
        let _ = writeln!(
            out,
            "idgate_logins_total{{result=\"{}\",reason=\"{}\"}} {n}",
            result.as_str(),
            label(reason)
        );
    }

    family(
        &mut out,
        "idgate_key_refreshes_total",
        "counter",
        "Fetches of an issuer's signing keys, by result.",
    );
    for i in &s.issuers {
        for (result, n) in [("ok", i.refreshes_ok), ("failed", i.refreshes_failed)] {
            let _ = writeln!(
                out,
                "idgate_key_refreshes_total{{issuer=\"{}\",result=\"{result}\"}} {n}",
                label(&i.issuer)
            );
        }
    }
    family(
        &mut out,
        "idgate_signing_keys",
        "gauge",
        "Usable signing keys per issuer.",
    );
    for i in &s.issuers {
        let _ = writeln!(
            out,
            "idgate_signing_keys{{issuer=\"{}\"}} {}",
            label(&i.issuer),
            i.keys
        );
    }

    if let Some(e) = s.events {
        family(
            &mut out,
            "idgate_events_suppressed_total",
            "counter",
            "Data-plane events the kernel's rate limit suppressed.",
        );
        let _ = writeln!(out, "idgate_events_suppressed_total {}", e.suppressed);
        family(
            &mut out,
            "idgate_events_ring_full_total",
            "counter",
            "Data-plane events lost to a full ring buffer.",
        );
        let _ = writeln!(out, "idgate_events_ring_full_total {}", e.ring_full);
    }
    family(
        &mut out,
        "idgate_audit_flows_suppressed_total",
        "counter",
        "Flow records the audit trail left out to bound its volume.",
    );
    let _ = writeln!(
        out,
        "idgate_audit_flows_suppressed_total {}",
        s.audit_flows_suppressed
    );
    family(
        &mut out,
        "idgate_audit_write_errors_total",
        "counter",
        "Audit records that could not be written to the audit stream.",
    );
    let _ = writeln!(
        out,
        "idgate_audit_write_errors_total {}",
        s.audit_write_errors
    );
    family(
        &mut out,
        "idgate_reloads_total",
        "counter",
        "Configuration reloads, by result (ok: applied; failed: refused, the old configuration \
         stays).",
    );
    let _ = writeln!(out, "idgate_reloads_total{{result=\"ok\"}} {}", s.reloads);
    let _ = writeln!(
        out,
        "idgate_reloads_total{{result=\"failed\"}} {}",
        s.reloads_failed
    );
    if let Some(u) = &s.userid {
        render_userid(&mut out, u);
    }
    out
}

/// The User-ID families (only when firewalls are configured).
fn render_userid(out: &mut String, u: &UserIdSnapshot) {
    family(
        out,
        "idgate_userid_requests_total",
        "counter",
        "User-ID API requests by firewall (index in the configuration) and result.",
    );
    for (i, f) in u.firewalls.iter().enumerate() {
        let _ = writeln!(
            out,
            "idgate_userid_requests_total{{firewall=\"{i}\",result=\"ok\"}} {}",
            f.requests_ok
        );
        let _ = writeln!(
            out,
            "idgate_userid_requests_total{{firewall=\"{i}\",result=\"failed\"}} {}",
            f.requests_failed
        );
    }
    for (name, kind, help, get) in [
        (
            "idgate_userid_updates_sent_total",
            "counter",
            "User-ID entries (login, logout, tags) a firewall accepted.",
            (|f: &FirewallCounters| f.updates_sent) as fn(&FirewallCounters) -> u64,
        ),
        (
            "idgate_userid_updates_dropped_total",
            "counter",
            "User-ID entries dropped because the firewall's queue was full.",
            |f: &FirewallCounters| f.updates_dropped,
        ),
        (
            "idgate_userid_queue_depth",
            "gauge",
            "User-ID entries waiting for a firewall.",
            |f: &FirewallCounters| f.queued,
        ),
    ] {
        family(out, name, kind, help);
        for (i, f) in u.firewalls.iter().enumerate() {
            let _ = writeln!(out, "{name}{{firewall=\"{i}\"}} {}", get(f));
        }
    }
    family(
        out,
        "idgate_userid_events_dropped_total",
        "counter",
        "Session events dropped before User-ID saw them (its channel was full).",
    );
    let _ = writeln!(
        out,
        "idgate_userid_events_dropped_total {}",
        u.events_dropped
    );
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Answers one request; `app` is `None` while the daemon is still starting.
pub fn handle<B>(metrics: &Metrics, app: Option<&App>, req: &Request<B>) -> HttpResponse {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "GET only\n".to_owned(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let snapshot = app.map_or_else(
                || Snapshot {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Snapshot::default()
                },
                Snapshot::of,
            );
            text(StatusCode::OK, CONTENT_TYPE, render(&snapshot))
        }
        "/live" => text(StatusCode::OK, PLAIN, "live\n".to_owned()),
        "/ready" if metrics.is_ready() && app.is_some() => {
            text(StatusCode::OK, PLAIN, "ready\n".to_owned())
        }
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            "not ready\n".to_owned(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: /metrics, /live, /ready\n".to_owned(),
        ),
    }
}

/// The metrics listener, bound before the data plane is loaded (so a taken port stops
/// start-up before anything is enforced).
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Listens on `addr` (the configuration allows loopback only).
    pub async fn bind(addr: SocketAddr) -> Result<MetricsServer, ApiError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiError::Bind { addr, source })?;
        Ok(MetricsServer { listener })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the returned future is dropped: from the start `/live` and `/ready`
    /// (503), the rest once `app` is set.
    pub async fn serve(self, metrics: Arc<Metrics>, app: Arc<OnceLock<Arc<App>>>) {
        let mut connections = JoinSet::new();
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_CONNECTIONS {
                continue;
            }
            let (metrics, app) = (metrics.clone(), app.clone());
            connections.spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (metrics, app) = (metrics.clone(), app.clone());
                    async move {
                        Ok::<_, Infallible>(handle(&metrics, app.get().map(|a| &**a), &req))
                    }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Count;
    use idgate_common::Reason;

    fn snapshot() -> Snapshot {
        let counters = |id: u32, session: u64| ServiceCounters {
            service_id: id,
            by_reason: Reason::ALL
                .iter()
                .map(|r| {
                    let packets = if *r == Reason::AllowSession {
                        session
                    } else {
                        0
                    };
                    (
                        *r,
                        Count {
                            packets,
                            bytes: packets * 60,
                        },
                    )
                })
                .collect(),
            rst_sent: Count {
                packets: 2,
                bytes: 0,
            },
        };
        let metrics = Metrics::default();
        metrics.login(LoginResult::Ok, "allowed");
        metrics.login(LoginResult::Ok, "allowed");
        metrics.login(LoginResult::Failed, "invalid_signature");
        Snapshot {
            version: "1.2.3".into(),
            counters: vec![
                ("unattributed".into(), counters(0, 0)),
                ("fast\"api".into(), counters(1, 7)),
            ],
            active_sessions: 3,
            logins: metrics.logins(),
            issuers: vec![IssuerStats {
                issuer: "https://idp.example/".into(),
                refreshes_ok: 4,
                refreshes_failed: 1,
                keys: 2,
                ..Default::default()
            }],
            events: Some(EventStats {
                suppressed: 5,
                ring_full: 6,
            }),
            audit_flows_suppressed: 9,
            audit_write_errors: 0,
            reloads: 0,
            reloads_failed: 3,
            ready: true,
            userid: Some(UserIdSnapshot {
                firewalls: vec![
                    FirewallCounters {
                        requests_ok: 4,
                        requests_failed: 2,
                        updates_sent: 40,
                        updates_dropped: 7,
                        queued: 3,
                    },
                    FirewallCounters::default(),
                ],
                events_dropped: 11,
            }),
        }
    }

    #[test]
    fn userid_families_are_per_firewall_index_and_only_when_configured() {
        let m = parse(&render(&snapshot()));
        let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(
            get(r#"idgate_userid_requests_total{firewall="0",result="ok"}"#),
            4.0
        );
        assert_eq!(
            get(r#"idgate_userid_requests_total{firewall="0",result="failed"}"#),
            2.0
        );
        assert_eq!(
            get(r#"idgate_userid_updates_sent_total{firewall="0"}"#),
            40.0
        );
        assert_eq!(
            get(r#"idgate_userid_updates_dropped_total{firewall="0"}"#),
            7.0
        );
        assert_eq!(get(r#"idgate_userid_queue_depth{firewall="0"}"#), 3.0);
        assert_eq!(get(r#"idgate_userid_queue_depth{firewall="1"}"#), 0.0);
        assert_eq!(get("idgate_userid_events_dropped_total"), 11.0);
        let without = render(&Snapshot {
            userid: None,
            ..snapshot()
        });
        assert!(!without.contains("idgate_userid"), "{without}");
    }

    /// Parses the exposition text into (series, value), checking every line's shape and that
    /// each family is declared (HELP, TYPE) before its samples.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut declared = Vec::new();
        let mut series = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(kind == "counter" || kind == "gauge", "{line}");
                declared.push(name.to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            let name = name_labels.split('{').next().unwrap();
            assert!(declared.iter().any(|d| d == name), "undeclared: {line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
            assert!(
                series.insert(name_labels.to_owned(), v).is_none(),
                "duplicate: {line}"
            );
        }
        series
    }

    #[test]
    fn renders_every_family_with_its_values() {
        let text = render(&snapshot());
        assert!(text.ends_with('\n'));
        let s = parse(&text);
        let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("missing {k} in\n{text}"));
        assert_eq!(get(r#"idgate_build_info{version="1.2.3"}"#), 1.0);
        assert_eq!(get("idgate_ready"), 1.0);
        assert_eq!(
            get(r#"idgate_packets_total{service="fast\"api",reason="session"}"#),
            7.0
        );
        assert_eq!(
            get(r#"idgate_bytes_total{service="fast\"api",reason="session"}"#),
            420.0
        );
        assert_eq!(
            get(r#"idgate_packets_total{service="unattributed",reason="malformed"}"#),
            0.0
        );
        assert_eq!(get(r#"idgate_rst_sent_total{service="fast\"api"}"#), 2.0);
        assert_eq!(get("idgate_active_sessions"), 3.0);
        assert_eq!(
            get(r#"idgate_logins_total{result="ok",reason="allowed"}"#),
            2.0
        );
        assert_eq!(
            get(r#"idgate_logins_total{result="failed",reason="invalid_signature"}"#),
            1.0
        );
        assert_eq!(
            get(r#"idgate_key_refreshes_total{issuer="https://idp.example/",result="ok"}"#),
            4.0
        );
        assert_eq!(
            get(r#"idgate_key_refreshes_total{issuer="https://idp.example/",result="failed"}"#),
            1.0
        );
        assert_eq!(get("idgate_events_suppressed_total"), 5.0);
        assert_eq!(get("idgate_events_ring_full_total"), 6.0);
        assert_eq!(get("idgate_audit_flows_suppressed_total"), 9.0);
        assert_eq!(get(r#"idgate_reloads_total{result="ok"}"#), 0.0);
        assert_eq!(get(r#"idgate_reloads_total{result="failed"}"#), 3.0);
        // Every reason of every service, packets and bytes.
        let per_family = Reason::ALL.len() * 2;
        assert_eq!(
            s.keys()
                .filter(|k| k.starts_with("idgate_packets_total{"))
                .count(),
            per_family
        );
    }

    #[test]
    fn live_at_once_ready_only_when_marked_and_running() {
        let m = Metrics::default();
        let get = |path: &str| Request::get(path).body(()).unwrap();
        assert_eq!(handle(&m, None, &get("/live")).status(), StatusCode::OK);
        assert_eq!(
            handle(&m, None, &get("/ready")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.set_ready(true);
        // Marked, but the daemon is not serving yet.
        assert_eq!(
            handle(&m, None, &get("/ready")).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let r = handle(&m, None, &get("/metrics"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            handle(&m, None, &get("/nope")).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(
            handle(&m, None, &post).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn not_ready_until_marked() {
        let m = Metrics::default();
        assert!(!m.is_ready());
        m.set_ready(true);
        assert!(m.is_ready());
        let text = render(&Snapshot::default());
        assert!(text.contains("\nidgate_ready 0\n"), "{text}");
    }
}
