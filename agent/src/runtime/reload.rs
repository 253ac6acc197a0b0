//! Configuration reload (SIGHUP, or `POST /v1/reload` on the admin socket).
//!
//! A reload is all or nothing. The file is read and validated, then everything that can fail is
//! prepared without touching what is in force: settings that need a restart are compared (any
//! change refuses the reload, naming each setting; fail safe rather than half-applied), a new
//! verifier is built if the issuers changed, and the session endpoint's certificate and key are
//! read again (so a renewed certificate is picked up by new connections). Any error refuses the
//! whole reload: every error is logged and returned, `idgate_reloads_total{result="failed"}`
//! counts it, and the old configuration stays in force.
//!
//! **Issuers.** When the `[[issuers]]` changed, the new verifier fetches every issuer's keys
//! before it is swapped in. An issuer the running verifier has keys for must succeed (otherwise
//! the reload is refused: a reload never makes a working IdP's tokens fail). A new issuer, or
//! one whose keys could not be fetched so far, may fail: its tokens get 503 `idp_unavailable`
//! until the background refresh reaches it, exactly as at start-up (a warning in the report).
//! When the issuers did not change, the running verifier and its keys are kept.
//!
//! **Commit**, under the sessions lock (so no login is decided by one policy and installed under
//! the other): every session is re-evaluated against the new policy with the identity it logged
//! in with (groups, scopes, claims); sessions no longer allowed are removed from the kernel and
//! audited as `session-end` with reason `policy-changed`; then the data plane gets the new
//! services and CIDR rules (ordered so that a port that stays protected never opens); then
//! sessions still allowed get the new rule id and an expiry capped by a lowered rule or global
//! lifetime (counted from when they were granted). Finally the policy, the services, the verifier
//! and the TLS configuration are swapped. If the data plane refuses the new services or rules,
//! the old ones are written back and the reload fails; sessions ended by it stay ended (fail
//! closed).

use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::{
    api::{App, endpoint::TlsSlot, tls},
    config::{Config, LoadError},
    identity::{RefreshTasks, Verifier},
    policy::{Identity, Policy, ServiceDecision},
    session::{Catalog, DataplaneUpdate, Reevaluated, SourceRecord, audit::AuditEvent},
    wiring,
};

/// What a reload needs besides the [`App`]: the configuration in force and where it came from.
#[derive(Default)]
pub struct ReloadState {
    /// The configuration in force (`None` before the daemon set it).
    pub config: Option<Config>,
    /// The file it was read from (`None`: given as a value, nothing to re-read).
    pub path: Option<PathBuf>,
    /// The session endpoint's TLS configuration, if it speaks TLS.
    pub tls: Option<TlsSlot>,
    /// The running verifier's background key refresh (replaced with the verifier).
    pub refresh: Option<RefreshTasks>,
}

impl std::fmt::Debug for ReloadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadState")
            .field("path", &self.path)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// What an applied reload did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadReport {
    /// The file read, if any.
    pub path: Option<PathBuf>,
    /// The configuration's warnings, and issuers whose keys could not be fetched yet.
    pub warnings: Vec<String>,
    /// Whether the issuers changed (a new verifier is in force).
    pub issuers_changed: bool,
    /// Whether the TLS certificate and key were read again.
    pub tls_reloaded: bool,
    /// What happened to the sessions.
    pub sessions: Reevaluated,
}

/// Why a reload was refused; nothing changed.
#[derive(Clone, Debug, Serialize, thiserror::Error)]
#[error("configuration reload refused ({} error{}); the running configuration stays in force:\n  {}",
    errors.len(), if errors.len() == 1 { "" } else { "s" }, errors.join("\n  "))]
pub struct ReloadError {
    /// Always `reload_failed` (for the admin API's JSON).
    pub error: &'static str,
    /// Every error found.
    pub errors: Vec<String>,
}

impl ReloadError {
    fn new(errors: Vec<String>) -> Self {
        ReloadError {
            error: "reload_failed",
            errors,
        }
    }
}

/// Re-reads the configuration file the daemon was started with and applies it (see the module
/// documentation); logs, counts and audits the outcome (`trigger`: what asked, e.g. `sighup`).
pub async fn reload_file(app: &App, trigger: &str) -> Result<ReloadReport, ReloadError> {
    let mut state = app.reload.lock().await;
    let result = match state.path.clone() {
        None => Err(ReloadError::new(vec![
            "the daemon was not started from a configuration file; nothing to re-read".into(),
        ])),
        Some(path) => match Config::load(&path) {
            Ok((config, warnings)) => {
                let warnings = warnings.iter().map(|w| format!("{}: {w}", path.display()));
                apply(app, &mut state, config, warnings.collect()).await
            }
            Err(LoadError::Invalid { path, errors }) => Err(ReloadError::new(
                errors
                    .0
                    .iter()
                    .map(|d| format!("{}: {d}", path.display()))
                    .collect(),
            )),
            Err(e) => Err(ReloadError::new(vec![e.to_string()])),
        },
    };
    let path = state.path.clone();
    drop(state);
    outcome(app, trigger, path.as_deref(), result)
}

/// Applies `config` (already validated, e.g. by [`Config::parse`]) in place of the running
/// configuration; logs, counts and audits the outcome.
pub async fn reload(app: &App, config: Config) -> Result<ReloadReport, ReloadError> {
    let mut state = app.reload.lock().await;
    let result = apply(app, &mut state, config, Vec::new()).await;
    drop(state);
    outcome(app, "api", None, result)
}

fn outcome(
    app: &App,
    trigger: &str,
    path: Option<&std::path::Path>,
    result: Result<ReloadReport, ReloadError>,
) -> Result<ReloadReport, ReloadError> {
    let (sessions, errors) = match &result {
        Ok(r) => (r.sessions, &[][..]),
        Err(e) => (Reevaluated::default(), &e.errors[..]),
    };
    app.audit.record(&AuditEvent::Reload {
        trigger,
        path,
        result: if result.is_ok() { "applied" } else { "refused" },
        revoked: sessions.revoked,
        updated: sessions.updated,
        errors,
    });
    match &result {
        Ok(r) => {
            app.metrics.reloaded();
            for w in &r.warnings {
                tracing::warn!("reload: {w}");
            }
            tracing::info!(
                revoked = r.sessions.revoked,
                updated = r.sessions.updated,
                issuers_changed = r.issuers_changed,
                tls_reloaded = r.tls_reloaded,
                "configuration reloaded"
            );
        }
        Err(e) => {
            app.metrics.reload_failed();
            for err in &e.errors {
                tracing::error!("reload refused: {err}");
            }
            tracing::error!(
                errors = e.errors.len(),
                "configuration reload refused; the running configuration stays in force"
            );
        }
    }
    result
}

/// The decisions of `policy` for the identity logged in at `source`, as it logged in (groups,
/// scopes and claims); without those (an identity recorded before they were kept), the groups
/// alone. Shared by reloads and by a restart re-evaluating the sessions it adopts.
pub fn decide(policy: &Policy, source: IpAddr, record: &SourceRecord) -> Vec<ServiceDecision> {
    let fallback = || Identity {
        issuer: record.identity.issuer.clone(),
        user: record.identity.user.clone(),
        groups: record.identity.groups.clone(),
        ..Identity::default()
    };
    let identity = record
        .policy_identity
        .as_deref()
        .cloned()
        .unwrap_or_else(fallback);
    policy.evaluate(&identity, source)
}

/// Settings only a restart can change: each one that differs is an error.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    let mut check = |changed: bool, what: &str| {
        if changed {
            errors.push(format!(
                "{what} changed: this setting cannot change while idgate runs; restart idgate \
                 (systemctl restart idgate) to apply it"
            ));
        }
    };
    let (o, n) = (&old.dataplane, &new.dataplane);
    check(o.interfaces != n.interfaces, "dataplane.interfaces");
    check(o.pin_dir != n.pin_dir, "dataplane.pin_dir");
    check(
        o.session_state != n.session_state,
        "dataplane.session_state",
    );
    check(o.max_sessions != n.max_sessions, "dataplane.max_sessions");
    check(
        o.events_per_sec != n.events_per_sec || o.events_burst != n.events_burst,
        "dataplane.events_per_sec/events_burst",
    );
    let (o, n) = (&old.session_endpoint, &new.session_endpoint);
    check(o.listen != n.listen, "session_endpoint.listen");
    check(
        o.tls.is_some() != n.tls.is_some(),
        "session_endpoint.tls (on or off)",
    );
    check(
        o.trusted_proxies != n.trusted_proxies,
        "session_endpoint.trusted_proxies",
    );
    check(
        o.failed_attempts_per_minute != n.failed_attempts_per_minute
            || o.failed_attempts_burst != n.failed_attempts_burst,
        "session_endpoint.failed_attempts_per_minute/failed_attempts_burst",
    );
    check(old.admin.socket != new.admin.socket, "admin.socket");
    check(
        old.admin.whois_socket != new.admin.whois_socket,
        "admin.whois_socket",
    );
    check(old.admin.metrics != new.admin.metrics, "admin.metrics");
    check(old.audit != new.audit, "audit");
    check(old.userid != new.userid, "userid");
    let max_token = |c: &Config| c.issuers.iter().map(|i| i.max_token_bytes).max();
    check(
        max_token(old) != max_token(new),
        "the largest issuers.max_token_bytes (it sizes the session endpoint's buffers)",
    );
    errors
}

async fn apply(
    app: &App,
    state: &mut ReloadState,
    new: Config,
    warnings: Vec<String>,
) -> Result<ReloadReport, ReloadError> {
    let Some(old) = state.config.as_ref() else {
        return Err(ReloadError::new(vec![
            "no configuration is in force yet".into(),
        ]));
    };
    let mut errors = restart_only_changes(old, &new);
    let issuers_changed = old.issuers != new.issuers;
    let verifier = if issuers_changed {
        match wiring::all_issuer_settings(&new.issuers)
            .map_err(|e| e.to_string())
            .and_then(|s| Verifier::new(s).map_err(|e| e.to_string()))
        {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(format!("issuers: {e}"));
                None
            }
        }
    } else {
        None
    };
    let tls_config = match (&new.session_endpoint.tls, &state.tls) {
        (Some(files), Some(_)) => match tls::server_config(files) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(format!("session_endpoint.tls: {e}"));
                None
            }
        },
        _ => None,
    };
    if !errors.is_empty() {
        return Err(ReloadError::new(errors));
    }

    let mut report = ReloadReport {
        path: state.path.clone(),
        warnings,
        issuers_changed,
        tls_reloaded: tls_config.is_some(),
        sessions: Reevaluated::default(),
    };
    if let Some(v) = &verifier {
        let had_keys: HashMap<String, usize> = app
            .verifier
            .get()
            .stats()
            .into_iter()
            .map(|s| (s.issuer, s.keys))
            .collect();
        for (issuer, result) in v.refresh_all().await {
            if let Err(e) = result {
                if had_keys.get(&issuer).is_some_and(|k| *k > 0) {
                    errors.push(format!(
                        "issuer {issuer}: fetching its keys failed ({e}); it works with the \
                         running configuration, so the reload is refused rather than break it"
                    ));
                } else {
                    report.warnings.push(format!(
                        "issuer {issuer}: fetching its keys failed ({e}); its tokens are refused \
                         (503) until a background refresh succeeds"
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(ReloadError::new(errors));
        }
    }

    // Commit.
    let policy = Arc::new(new.policy());
    let catalog = Arc::new(Catalog::from_config(&new));
    let services = policy.dataplane_services();
    let cidr_rules = policy.cidr_rules();
    let (old_services, old_cidr_rules) = (old.dataplane_services(), old.cidr_rules());
    {
        let mut sessions = app.sessions();
        let decide = |source, record: &SourceRecord| decide(&policy, source, record);
        report.sessions = sessions
            .reload(
                catalog.clone(),
                new.dataplane.max_session_lifetime,
                DataplaneUpdate {
                    services: &services,
                    cidr_rules: &cidr_rules,
                    old_services: &old_services,
                    old_cidr_rules: &old_cidr_rules,
                },
                decide,
            )
            .map_err(|e| {
                ReloadError::new(vec![format!(
                    "the data plane refused the new services or CIDR rules: {e}"
                )])
            })?;
        app.policy.replace(policy.clone());
        app.catalog.replace(catalog);
        if let Some(v) = verifier {
            let v = Arc::new(v);
            app.verifier.replace(v.clone());
            // Dropping the old refresh tasks stops them.
            state.refresh = Some(v.spawn_refresh());
        }
    }
    if let (Some(slot), Some(c)) = (&state.tls, tls_config) {
        slot.replace(c);
    }
    state.config = Some(new);
    Ok(report)
}
