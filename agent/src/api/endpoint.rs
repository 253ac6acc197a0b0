//! The session endpoint: clients present a bearer token to open sessions for their address
//! (`POST /v1/sessions`) or to close them (`DELETE /v1/sessions`).
//!
//! Statuses: 200 (some service allowed), 403 (valid token, no service allowed; the body lists
//! every decision), 401 (token refused; RFC 6750 `WWW-Authenticate`), 503 (IdP keys unavailable,
//! or the sessions map is full), 429 (too many failed attempts from the source), 400 (malformed
//! request), 413 (headers or body too large). A refused request changes nothing.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::{Method, Request, StatusCode, header, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};

use super::{ApiError, App, HttpResponse, Shared, client_addr::client_address, error, json, tls};
use crate::{
    config::SessionEndpointConfig,
    identity::{VerifiedToken, VerifyError, bearer_token},
    metrics::LoginResult,
    policy::{Action, MatchedRule, ServiceDecision},
    session::{LoginOutcome, NewIdentity, SessionError, TableError, audit::AuditEvent, rfc3339},
};

/// The path of both operations.
pub const SESSIONS_PATH: &str = "/v1/sessions";

/// Seconds a client is told to wait after a 503 for missing IdP keys.
const IDP_RETRY_AFTER_SECS: u64 = 5;

/// The endpoint's TLS configuration, which a reload replaces (new connections use the new one).
pub type TlsSlot = Arc<Shared<ServerConfig>>;

/// The bound session endpoint, ready to serve.
pub struct SessionEndpoint {
    listener: TcpListener,
    tls: Option<TlsSlot>,
}

impl std::fmt::Debug for SessionEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEndpoint")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl SessionEndpoint {
    /// Loads the certificate (if configured) and binds the listen address.
    pub async fn bind(config: &SessionEndpointConfig) -> Result<SessionEndpoint, ApiError> {
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(Shared::new(tls::server_config(files)?))),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ApiError::Bind {
                addr: config.listen,
                source,
            })?;
        Ok(SessionEndpoint { listener, tls })
    }

    /// The address actually bound (the configured port may be 0 in tests).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether the endpoint speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS configuration's slot, for reloads to replace.
    pub fn tls_slot(&self) -> Option<TlsSlot> {
        self.tls.clone()
    }

    /// Serves until the returned future is dropped; dropping it also ends open connections.
    pub async fn serve(self, app: Arc<App>) {
        let permits = Arc::new(Semaphore::new(app.limits.max_connections));
        let mut connections = JoinSet::new();
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "session endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let app = app.clone();
            let tls = self.tls.as_ref().map(|t| TlsAcceptor::from(t.get()));
            connections.spawn(async move {
                let limit = app.limits.connection_timeout;
                let _ = tokio::time::timeout(limit, connection(app, tls, stream, peer)).await;
                drop(permit);
            });
            while connections.try_join_next().is_some() {}
        }
    }
}

async fn connection(app: Arc<App>, tls: Option<TlsAcceptor>, stream: TcpStream, peer: SocketAddr) {
    let handshake_timeout = app.limits.header_timeout;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.limits.header_timeout)
        .max_buf_size(app.limits.max_buf_bytes)
        // One request per connection: clients call once per login, and a connection that cannot
        // linger cannot be held open to exhaust the endpoint.
        .keep_alive(false);
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(handle(&app, peer, req).await) }
    });
    let result = match tls {
        Some(acceptor) => {
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await;
            match handshake {
                Ok(Ok(stream)) => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            }
        }
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "session endpoint connection ended with an error");
    }
}

/// Handles one request from `peer`.
pub(crate) async fn handle<B>(app: &App, peer: SocketAddr, req: Request<B>) -> HttpResponse
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer_ip = peer.ip().to_canonical();
    let forwarded: Result<Vec<&str>, _> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str())
        .collect();
    let src = match forwarded
        .map_err(|_| "X-Forwarded-For is not visible ASCII".to_owned())
        .and_then(|f| client_address(peer_ip, &app.trusted_proxies, &f).map_err(|e| e.to_string()))
    {
        Ok(a) => a,
        Err(e) => {
            // The proxy's fault, not the client's: nothing is counted against anyone.
            audit_failure(app, peer_ip, None, "bad_forwarded_for", 400);
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "bad_forwarded_for",
                e,
            );
        }
    };
    let via = (src != peer_ip).then_some(peer_ip);

    if req.uri().path() != SESSIONS_PATH {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "not_found",
            format!("the session endpoint serves {SESSIONS_PATH} only"),
        );
    }
    let login = match *req.method() {
        Method::POST => true,
        Method::DELETE => false,
        _ => {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method_not_allowed",
                "POST presents a token, DELETE logs out",
            );
            r.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static("POST, DELETE"),
            );
            return r;
        }
    };

    if let Err(wait) = app.limiter().check(src, Instant::now()) {
        // Not audited: the failures that exhausted the budget were, and a client hammering the
        // endpoint must not be able to flood the audit trail.
        tracing::debug!(%src, "login refused: rate limited");
        app.metrics.login(LoginResult::Failed, "rate_limited");
        let secs = wait.as_secs() + 1;
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "rate_limited",
            format!("too many failed attempts from this address; retry in {secs} s"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        return r;
    }

    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > app.limits.max_header_bytes {
        return failed(
            app,
            src,
            via,
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "headers_too_large",
                format!(
                    "request headers exceed {} bytes",
                    app.limits.max_header_bytes
                ),
            ),
            "headers_too_large",
        );
    }
    let mut auth = req.headers().get_all(header::AUTHORIZATION).iter();
    let (first, second) = (auth.next(), auth.next());
    if second.is_some() {
        return failed(
            app,
            src,
            via,
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "duplicate_authorization",
                "more than one Authorization header",
            ),
            "duplicate_authorization",
        );
    }
    let authorization = match first.map(|v| v.to_str()).transpose() {
        Ok(a) => a.map(str::to_owned),
        Err(_) => {
            return failed(
                app,
                src,
                via,
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "bad_authorization",
                    "the Authorization header is not visible ASCII",
                ),
                "bad_authorization",
            );
        }
    };

    // The endpoint takes no body, but reads (a bounded) one so that an oversized upload is
    // answered with 413 instead of a reset.
    let too_large_body = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "body_too_large",
            format!(
                "the request body exceeds {} bytes",
                app.limits.max_body_bytes
            ),
        )
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > app.limits.max_body_bytes as u64) {
        return failed(app, src, via, too_large_body(), "body_too_large");
    }
    if let Err(e) = Limited::new(req.into_body(), app.limits.max_body_bytes)
        .collect()
        .await
    {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            return failed(app, src, via, too_large_body(), "body_too_large");
        }
        return failed(
            app,
            src,
            via,
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "bad_body",
                "the request body could not be read",
            ),
            "bad_body",
        );
    }

    let token = match bearer_token(authorization.as_deref()) {
        Ok(t) => t,
        Err(e) => return refused(app, src, via, &e),
    };
    let verified = match app.verifier.get().verify(token).await {
        Ok(v) => v,
        Err(e) => return refused(app, src, via, &e),
    };
    if verified.expires_at <= SystemTime::now() {
        // Accepted within the leeway, but a session would end before it began.
        return refused(app, src, via, &VerifyError::Expired);
    }
    if login {
        login_response(app, src, &verified)
    } else {
        logout_response(app, src, &verified)
    }
}

fn audit_failure(app: &App, src: IpAddr, peer: Option<IpAddr>, reason: &str, status: u16) {
    app.metrics.login(LoginResult::Failed, reason);
    app.audit.record(&AuditEvent::LoginFailed {
        src,
        peer,
        reason,
        status,
    });
}

/// Counts a failed attempt against `src`, audits it and answers `response`.
fn failed(
    app: &App,
    src: IpAddr,
    via: Option<IpAddr>,
    response: HttpResponse,
    reason: &str,
) -> HttpResponse {
    app.limiter().failure(src, Instant::now());
    audit_failure(app, src, via, reason, response.status().as_u16());
    response
}

/// A refused token: 401 with the RFC 6750 challenge, or 503 when the IdP's keys are missing
/// (not the client's fault, so not counted against it).
fn refused(app: &App, src: IpAddr, via: Option<IpAddr>, e: &VerifyError) -> HttpResponse {
    if e.http_status() == 503 {
        audit_failure(app, src, via, e.reason(), 503);
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            e.reason(),
            e.to_string(),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(IDP_RETRY_AFTER_SECS),
        );
        return r;
    }
    let code = if *e == VerifyError::MissingToken {
        "unauthorized"
    } else {
        "invalid_token"
    };
    let mut r = error(StatusCode::UNAUTHORIZED, code, e.reason(), e.to_string());
    if let Ok(v) = header::HeaderValue::from_str(&e.www_authenticate()) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    failed(app, src, via, r, e.reason())
}

/// One service in a login answer.
#[derive(Debug, Serialize)]
struct ServiceAnswer<'a> {
    service: &'a str,
    protocol: Option<String>,
    port: Option<u16>,
    /// `allow` or `deny`.
    decision: &'static str,
    /// The rule's (or default's) action: `allow`, `drop`, `reset`.
    action: Action,
    /// The rule that decided; `null` when the policy default did.
    rule: Option<&'a MatchedRule>,
    /// Whether a session was installed (static allow rules need none).
    session: bool,
    expires_at: Option<String>,
}

/// Who replaced whom.
#[derive(Debug, Serialize)]
struct Replaced<'a> {
    user: &'a str,
    issuer: &'a str,
}

/// The answer to a login (200 and 403 alike).
#[derive(Debug, Serialize)]
struct LoginAnswer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    source: IpAddr,
    user: &'a str,
    subject: &'a str,
    issuer: &'a str,
    groups: &'a [String],
    identity_id: u32,
    /// The latest expiry of the sessions installed; `null` if none.
    expires_at: Option<String>,
    token_expires_at: String,
    services: Vec<ServiceAnswer<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaced: Option<Replaced<'a>>,
}

fn login_response(app: &App, src: IpAddr, token: &VerifiedToken) -> HttpResponse {
    let identity = crate::wiring::identity_of(token);
    let who = NewIdentity {
        issuer: identity.issuer.clone(),
        subject: token.subject.clone(),
        user: identity.user.clone(),
        groups: identity.groups.clone(),
    };
    // The policy is read under the sessions lock, which a reload holds while it swaps the
    // policy: a login is decided and installed wholly under the old policy (and then
    // re-evaluated by the reload) or wholly under the new one.
    let (decisions, outcome) = {
        let mut sessions = app.sessions();
        let decisions = app.policy.get().evaluate(&identity, src);
        let o = sessions.login(src, who, token.expires_at, &decisions);
        if o.is_ok() {
            sessions.set_policy_identity(src, Arc::new(identity));
        }
        (decisions, o)
    };
    match outcome {
        Ok(o) => login_answer(app, src, token, &decisions, &o),
        Err(SessionError::Table(TableError::Full { capacity })) => {
            app.metrics.login(LoginResult::Error, "sessions_full");
            tracing::error!(capacity, "the sessions map is full; login refused");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "sessions_full",
                "no room for more sessions",
            )
        }
        Err(e) => {
            app.metrics.login(LoginResult::Error, "dataplane_error");
            tracing::error!(%src, error = %e, "installing sessions failed; the source was cleared");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "dataplane_error",
                "the sessions could not be installed",
            )
        }
    }
}

fn login_answer(
    app: &App,
    src: IpAddr,
    token: &VerifiedToken,
    decisions: &[ServiceDecision],
    o: &LoginOutcome,
) -> HttpResponse {
    let catalog = app.catalog.get();
    let services: Vec<ServiceAnswer<'_>> = decisions
        .iter()
        .map(|d| {
            let grant = o.granted.iter().find(|g| g.service == d.service_id);
            let info = catalog.get(d.service_id);
            // Allowed means the source can reach it now: by a session, or by a static rule
            // (whose kernel CIDR entry needs no session).
            let allowed = d.action == Action::Allow && (!d.needs_session || grant.is_some());
            ServiceAnswer {
                service: &d.service,
                protocol: info.map(|i| i.protocol.to_string()),
                port: info.map(|i| i.port),
                decision: if allowed { "allow" } else { "deny" },
                action: d.action,
                rule: d.rule.as_ref(),
                session: grant.is_some(),
                expires_at: grant.map(|g| rfc3339(g.expires_at)),
            }
        })
        .collect();
    let any_allowed = services.iter().any(|s| s.decision == "allow");
    if any_allowed {
        app.metrics.login(LoginResult::Ok, "allowed");
    } else {
        app.metrics.login(LoginResult::Denied, "no_service_allowed");
    }
    let answer = LoginAnswer {
        error: (!any_allowed).then_some("no_service_allowed"),
        source: src,
        user: &token.user,
        subject: &token.subject,
        issuer: &token.issuer,
        groups: &token.groups,
        identity_id: o.identity.id,
        expires_at: o.granted.iter().map(|g| g.expires_at).max().map(rfc3339),
        token_expires_at: rfc3339(token.expires_at),
        services,
        replaced: o.replaced.as_ref().map(|r| Replaced {
            user: &r.user,
            issuer: &r.issuer,
        }),
    };
    let status = if any_allowed {
        StatusCode::OK
    } else {
        StatusCode::FORBIDDEN
    };
    json(status, &answer)
}

/// The answer to a logout.
#[derive(Debug, Serialize)]
struct LogoutAnswer<'a> {
    source: IpAddr,
    user: &'a str,
    removed: crate::session::Removed,
}

fn logout_response(app: &App, src: IpAddr, token: &VerifiedToken) -> HttpResponse {
    let result = app.sessions().logout(src);
    match result {
        Ok(removed) => json(
            StatusCode::OK,
            &LogoutAnswer {
                source: src,
                user: &token.user,
                removed,
            },
        ),
        Err(e) => {
            tracing::error!(%src, error = %e, "removing sessions failed; the sweeper retries");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "dataplane_error",
                "the sessions could not be removed; retrying",
            )
        }
    }
}
