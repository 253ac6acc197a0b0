//! `idgate run`: the daemon.
//!
//! Start-up order is chosen so that enforcement never waits for anything outside the host:
//! everything the configuration can get wrong (issuers, CA files, certificate, ports, the admin
//! and whois sockets, the session journal) is checked first; then the data plane is loaded, the
//! sessions an earlier run pinned are adopted (or removed) under this run's policy, its services
//! and CIDR rules are written and it is attached to every interface (from here on, protected
//! ports are closed to anyone without a session); only then are the IdP's keys fetched. An unreachable IdP is logged loudly and
//! retried in the background: meanwhile tokens are refused as `idp_unavailable` (503), and the
//! ports stay closed (fail closed).
//!
//! Shutdown (SIGINT/SIGTERM, or the future given to [`run`]) stops the endpoints, removes the
//! sockets, and drops the data plane: with a pin directory the programs stay attached and the
//! sessions stay (the next start adopts them); without one, dropping it detaches the programs.

pub mod cli;
pub mod reload;

use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use thiserror::Error;
use tokio::{task::JoinSet, time::MissedTickBehavior};

use crate::{
    api::{
        ApiError, App, Limits,
        admin::{Access, AdminSocket},
        endpoint::SessionEndpoint,
    },
    config::Config,
    dataplane::{AsyncEventReader, Dataplane, DataplaneError, DataplaneEvent, EventKind},
    exit,
    identity::{ConfigError, Verifier},
    metrics::{Metrics, MetricsServer},
    session::{
        Catalog, FailureLimiter, LIMITER_CAPACITY, SessionManager,
        audit::{AuditError, AuditEvent, AuditLog, FlowBudget},
        journal::{JournalError, SessionJournal},
    },
    wiring::{self, WiringError},
};

/// How often expired sessions are swept from the map and the table (the kernel refuses them on
/// its own already; this keeps the table, whois and the audit trail prompt).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Flow records written per second at most; the rest are counted in a `flows-suppressed` record.
pub const FLOW_RECORDS_PER_SEC: u64 = 50;
/// How often the kernel's own event losses are checked.
const EVENT_STATS_INTERVAL: Duration = Duration::from_secs(10);

/// Why the daemon could not start or had to stop.
#[derive(Debug, Error)]
pub enum RunError {
    /// An issuer's settings could not be built.
    #[error("issuer settings: {0}")]
    Wiring(#[from] WiringError),
    /// The verifier refused the issuers (a CA file, a URL).
    #[error("issuers: {0}")]
    Issuers(#[from] ConfigError),
    /// The session endpoint or the admin socket could not be set up.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The data plane could not be loaded, configured or attached.
    #[error("data plane: {0}")]
    Dataplane(#[from] DataplaneError),
    /// The audit stream could not be opened.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The User-ID firewalls' key or CA files could not be used.
    #[error(transparent)]
    UserId(#[from] crate::userid::UserIdError),
    /// The session journal could not be opened.
    #[error("session state: {0}")]
    Journal(#[from] JournalError),
    /// A task the daemon cannot run without ended.
    #[error("{0} stopped unexpectedly")]
    TaskEnded(&'static str),
}

impl RunError {
    /// The process exit code for this error ([`exit::CONFIG`] for what the configuration got
    /// wrong).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Wiring(_)
            | RunError::Issuers(_)
            | RunError::Audit(_)
            | RunError::UserId(_)
            | RunError::Journal(_) => exit::CONFIG,
            RunError::Api(ApiError::Tls { .. }) => exit::CONFIG,
            _ => exit::FAILURE,
        }
    }
}

/// Installs the `tracing` subscriber: `level` (a filter such as `info` or
/// `idgate=debug,idgate::audit=info`) if given, else `RUST_LOG`, else `info`.
pub fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))
}

/// Resolves at SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        }
        _ => {
            tracing::warn!("signal handlers unavailable; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs the daemon until `shutdown` resolves. Needs a multi-threaded Tokio runtime.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_from(config, None, shutdown).await
}

/// [`run`] for a configuration read from `config_path`: SIGHUP (and `POST /v1/reload` on the
/// admin socket) re-reads that file and applies it ([`reload::reload_file`]).
pub async fn run_from(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let notify = crate::notify::Notifier::from_env();
    notify.status("checking the configuration");
    // What the configuration can get wrong, before the kernel is touched.
    let verifier = Verifier::new(wiring::all_issuer_settings(&config.issuers)?)?;
    let endpoint = SessionEndpoint::bind(&config.session_endpoint).await?;
    let admin = AdminSocket::bind(&config.admin.socket, Access::Admin)?;
    let whois = match &config.admin.whois_socket {
        Some(path) => Some(AdminSocket::bind(path, Access::Whois)?),
        None => None,
    };
    let metrics_server = match config.admin.metrics {
        Some(addr) => Some(MetricsServer::bind(addr).await?),
        None => None,
    };
    let audit = AuditLog::open(&config.audit)?;
    let userid = wiring::userid_settings(config.userid.as_ref())?;
    // Metrics serve from here on: /live 200, /ready 503 until enforcement and the endpoints run.
    let metrics = Arc::new(Metrics::default());
    let app_cell = Arc::new(OnceLock::new());
    let mut tasks = JoinSet::new();
    let metrics_addr = metrics_server.as_ref().and_then(|m| m.local_addr().ok());
    let metrics_id =
        metrics_server.map(|m| tasks.spawn(m.serve(metrics.clone(), app_cell.clone())).id());

    // The owners of the sessions an earlier run left pinned, before the kernel is touched.
    let (journal, owners) = match &config.dataplane.session_state {
        Some(path) => {
            let (journal, replayed) = SessionJournal::open(path)?;
            if replayed.skipped > 0 {
                tracing::warn!(
                    path = %path.display(),
                    skipped = replayed.skipped,
                    "unreadable lines in the session journal were skipped"
                );
            }
            (Some(journal), replayed.records)
        }
        None => (None, Vec::new()),
    };

    // Enforcement: closed for everyone without a session from here on.
    notify.status("loading and attaching the data plane");
    let pinned = config.dataplane.pin_dir.is_some();
    let mut dp = Dataplane::load(config.dataplane.load_options())?;
    // Sessions pinned by an earlier run: adopted under their owners and re-evaluated against
    // this run's policy, before the new services are written (their ids follow the file order);
    // the rest are removed.
    let restored = {
        let policy = config.policy();
        SessionManager::restore(
            &mut dp,
            owners,
            config.dataplane.max_sessions as usize,
            config.dataplane.max_session_lifetime,
            crate::session::Now::current(),
            |source, record| reload::decide(&policy, source, record),
        )?
    };
    let (adopted, reevaluated) = (restored.adopted, restored.reevaluated);
    if adopted.unowned > 0 {
        tracing::warn!(
            removed = adopted.unowned,
            "pinned sessions no journal record names were removed; their clients must log in again"
        );
    }
    if adopted.sessions > 0 || adopted.expired > 0 {
        tracing::info!(
            sources = adopted.sources,
            sessions = adopted.sessions,
            expired = adopted.expired,
            revoked_by_policy = reevaluated.revoked,
            updated_by_policy = reevaluated.updated,
            "sessions adopted from the previous run"
        );
    }
    dp.set_services(&config.dataplane_services())?;
    dp.set_cidr_rules(&config.cidr_rules())?;
    for i in &config.dataplane.interfaces {
        dp.attach(&i.name, i.mode)?;
    }
    dp.spawn_log_forwarder()?;
    let events = dp.take_events()?.into_async()?;

    let catalog = Arc::new(Catalog::from_config(&config));
    let max_token_bytes = config
        .issuers
        .iter()
        .map(|i| i.max_token_bytes)
        .max()
        .unwrap_or(16 * 1024);
    let ep = &config.session_endpoint;
    let sessions = SessionManager::resume(
        Box::new(dp),
        catalog.clone(),
        restored,
        journal,
        audit.clone(),
    );
    let reload_state = reload::ReloadState {
        config: Some(config.clone()),
        path: config_path.clone(),
        tls: endpoint.tls_slot(),
        refresh: None,
    };
    let app = Arc::new(App {
        verifier: verifier.into(),
        policy: config.policy().into(),
        catalog: catalog.into(),
        sessions: Mutex::new(sessions),
        limiter: Mutex::new(FailureLimiter::new(
            ep.failed_attempts_per_minute,
            ep.failed_attempts_burst,
            LIMITER_CAPACITY,
        )),
        trusted_proxies: ep.trusted_proxies.clone(),
        limits: Limits::for_tokens(max_token_bytes),
        metrics: metrics.clone(),
        audit,
        reload: tokio::sync::Mutex::new(reload_state),
    });

    // User-ID sees every session change from here on (the endpoints do not serve yet); its
    // tasks stop when `_userid` is dropped, at the end of this function.
    let _userid = userid.map(|settings| {
        let pusher = crate::userid::UserIdPusher::start(settings);
        app.audit.set_observer(pusher.observer());
        app.metrics.set_userid(pusher.stats());
        pusher
    });
    let _ = app_cell.set(app.clone());
    let names = [
        (tasks.spawn(keep_keys(app.clone())).id(), "the key refresh"),
        (tasks.spawn(sweep(app.clone())).id(), "the session sweeper"),
        (
            tasks.spawn(forward_events(events, app.clone())).id(),
            "the event forwarder",
        ),
    ];
    let endpoint_addr = endpoint.local_addr().ok();
    let scheme = if endpoint.is_tls() { "https" } else { "http" };
    let admin_path = admin.path().to_owned();
    let endpoint_id = tasks.spawn(endpoint.serve(app.clone())).id();
    let admin_id = tasks.spawn(admin.serve(app.clone())).id();
    let whois_id = whois.map(|w| tasks.spawn(w.serve(app.clone())).id());
    // The data plane is attached and every listener is bound and served from here on.
    app.metrics.set_ready(true);
    tracing::info!(
        endpoint = %endpoint_addr.map_or_else(|| "?".to_owned(), |a| format!("{scheme}://{a}")),
        admin = %admin_path.display(),
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
        interfaces = config.dataplane.interfaces.len(),
        services = config.services.len(),
        "idgate running"
    );
    notify.ready(&format!(
        "enforcing on {} interface(s), {} service(s)",
        config.dataplane.interfaces.len(),
        config.services.len()
    ));

    // SIGHUP reloads the file; without a file it keeps its default action (not installed).
    let mut hangup = match config_path {
        Some(_) => tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "no SIGHUP handler: reload via the admin socket only"))
            .ok(),
        None => None,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutting down");
                break Ok(())
            }
            Some(()) = next_hangup(&mut hangup) => {
                tracing::info!("SIGHUP received: reloading the configuration");
                // Logged and counted inside; the daemon carries on either way.
                let _ = reload::reload_file(&app, "sighup").await;
            }
            Some(ended) = tasks.join_next_with_id() => {
                let id = match &ended {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                let name = if id == endpoint_id {
                    "the session endpoint"
                } else if id == admin_id {
                    "the admin socket"
                } else if Some(id) == whois_id {
                    "the whois socket"
                } else if Some(id) == metrics_id {
                    "the metrics endpoint"
                } else {
                    names.iter().find(|(i, _)| *i == id).map_or("a task", |(_, n)| n)
                };
                if let Err(e) = ended
                    && e.is_panic()
                {
                    tracing::error!(task = name, "panicked");
                }
                break Err(RunError::TaskEnded(name))
            }
        }
    };
    // Endpoints first (no login lands after this), then the data plane.
    notify.stopping("stopping");
    app.metrics.set_ready(false);
    tasks.shutdown().await;
    app.reload.lock().await.refresh = None;
    let left = app.sessions().table().entries();
    app.sessions().close();
    if pinned {
        tracing::info!(
            sessions = left,
            "idgate stopped; enforcement and sessions stay pinned"
        );
    } else {
        tracing::info!(sessions = left, "data plane detached; idgate stopped");
    }
    result
}

/// The next SIGHUP; never, without a handler.
async fn next_hangup(hangup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

/// Fetches the issuers' keys once (loudly reporting failures), then keeps them fresh.
async fn keep_keys(app: Arc<App>) {
    let verifier = app.verifier.get();
    for (issuer, result) in verifier.refresh_all().await {
        match result {
            Ok(keys) => tracing::info!(%issuer, keys, "signing keys fetched"),
            Err(e) => tracing::error!(
                %issuer,
                error = %e,
                "IdP UNREACHABLE: its tokens are refused (503 idp_unavailable) until its keys \
                 can be fetched; retrying in the background; protected ports stay closed"
            ),
        }
    }
    {
        // A reload that replaced the verifier meanwhile started its refresh already.
        let mut state = app.reload.lock().await;
        if state.refresh.is_none() && Arc::ptr_eq(&verifier, &app.verifier.get()) {
            state.refresh = Some(verifier.spawn_refresh());
        }
    }
    std::future::pending::<()>().await;
}

async fn sweep(app: Arc<App>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // systemd's watchdog is fed from here: a wedged sweeper (or session lock) stops the pings.
    let mut watchdog = crate::notify::Watchdog::from_env();
    loop {
        tick.tick().await;
        app.sessions().sweep();
        if let Some(w) = &mut watchdog {
            w.tick();
        }
    }
}

/// Writes data-plane events to the audit trail, naming users, within [`FLOW_RECORDS_PER_SEC`].
async fn forward_events(mut events: AsyncEventReader, app: Arc<App>) {
    let mut budget = FlowBudget::new(FLOW_RECORDS_PER_SEC);
    let mut window = tokio::time::interval(Duration::from_secs(1));
    window.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stats_due = tokio::time::Instant::now() + EVENT_STATS_INTERVAL;
    let mut last_stats = Default::default();
    loop {
        tokio::select! {
            batch = events.next_batch() => match batch {
                Ok(batch) => {
                    for e in &batch {
                        flow_record(&app, e, &mut budget);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading data-plane events failed");
                    return;
                }
            },
            _ = window.tick() => {
                let count = budget.roll();
                if count > 0 {
                    app.audit.record(&AuditEvent::FlowsSuppressed { count });
                }
                if tokio::time::Instant::now() >= stats_due {
                    stats_due += EVENT_STATS_INTERVAL;
                    let stats = app.sessions().store().event_stats();
                    if let Ok(s) = stats {
                        if s != last_stats {
                            tracing::warn!(
                                suppressed_total = s.suppressed,
                                lost_total = s.ring_full,
                                "the kernel suppressed or lost flow events (rate limit or full ring)"
                            );
                        }
                        last_stats = s;
                    }
                }
            }
        }
    }
}

fn flow_record(app: &App, e: &DataplaneEvent, budget: &mut FlowBudget) {
    let policy = app.policy.get();
    let catalog = app.catalog.get();
    let rule = (e.rule_id != 0).then(|| policy.rule(e.rule_id)).flatten();
    if rule.is_some_and(|r| !r.log) {
        return;
    }
    if !budget.admit() {
        return;
    }
    let (action, reason, reset) = match e.kind {
        EventKind::Denied { reason, reset } => ("deny", reason.as_str(), reset),
        EventKind::NewConnection { reason } => ("allow", reason.as_str(), false),
    };
    let user = app
        .sessions()
        .table()
        .identity_for(e.source.ip(), e.identity_id);
    let proto = match e.protocol {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        n => n.to_string(),
    };
    app.audit.record(&AuditEvent::Flow {
        action,
        reason,
        reset,
        src: e.source,
        dst: e.destination,
        proto: &proto,
        app: catalog.get_raw(e.service_id).map(|s| s.name.as_str()),
        srcuser: user.as_ref().map(|u| u.user.as_str()),
        rule: rule.map(|r| r.name.as_str()),
    });
}
