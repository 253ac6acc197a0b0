//! The admin API: HTTP/1.1 over a unix socket (mode 0660, so root and the socket's group), JSON
//! answers. The whois socket (mode 0666, for applications asking who a peer is) serves the same
//! `GET /v1/whois/{addr}` and nothing else: 403 for everything else.
//!
//! - `GET /v1/whois/{addr}`: who is behind an address, with each service's rule and expiry; 404
//!   if nobody is.
//! - `GET /v1/sessions`: every source with its sessions.
//! - `DELETE /v1/sessions?source=ADDR` or `?user=NAME`: revoke (user matches the user claim or
//!   the subject, from any issuer); answers how many sources and sessions were removed.
//! - `GET /v1/status`: interfaces with their attach mode and program id, sessions (and the
//!   map's capacity), identities, packet and byte counters per service and verdict reason,
//!   issuers' key status, data-plane event losses.

use std::{
    convert::Infallible,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use hyper::{Method, Request, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{net::UnixListener, task::JoinSet};

use super::{ApiError, App, HttpResponse, error, json};
use crate::session::{Removed, SessionView, rfc3339};

/// Permissions of the admin socket: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Permissions of the whois socket: any local user may ask who is behind an address.
pub const WHOIS_SOCKET_MODE: u32 = 0o666;

/// What a socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The whole admin API (mode 0660).
    Admin,
    /// `GET /v1/whois/{addr}` only (mode 0666).
    Whois,
}

impl Access {
    fn socket_mode(self) -> u32 {
        match self {
            Access::Admin => SOCKET_MODE,
            Access::Whois => WHOIS_SOCKET_MODE,
        }
    }
}

/// Permissions of a parent directory the agent creates: traversable by everyone, so that
/// applications reach the whois socket beside the admin socket (each file in it keeps its own,
/// stricter mode).
const DIR_MODE: u32 = 0o755;

/// The bound admin (or whois) socket; dropping it removes the socket file.
#[derive(Debug)]
pub struct AdminSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    access: Access,
}

impl AdminSocket {
    /// Creates the parent directory if needed, replaces a stale socket (one nobody listens on),
    /// binds, and sets the mode `access` calls for. Refuses to touch a path that is not a
    /// socket, or a socket that another process still serves.
    pub fn bind(path: &Path, access: Access) -> Result<AdminSocket, ApiError> {
        let fail = |reason: String| ApiError::Socket {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(fail(
                        "another process is serving it (is idgate already running?)".into(),
                    ));
                }
                std::fs::remove_file(path)
                    .map_err(|e| fail(format!("removing the stale socket: {e}")))?;
            }
            Ok(_) => return Err(fail("exists and is not a socket; not touching it".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let listener = UnixListener::bind(path).map_err(|e| fail(format!("binding: {e}")))?;
        let socket = AdminSocket {
            listener: Some(listener),
            path: path.to_owned(),
            access,
        };
        let mode = access.socket_mode();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail(format!("setting mode {mode:o}: {e}")))?;
        Ok(socket)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until the returned future is dropped (which also ends open connections); the
    /// socket file goes when `self` is dropped with it.
    pub async fn serve(mut self, app: Arc<App>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let mut connections = JoinSet::new();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let app = app.clone();
            let access = self.access;
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let app = app.clone();
                    async move {
                        Ok::<_, Infallible>(if access == Access::Whois && !is_whois(&req) {
                            error(
                                StatusCode::FORBIDDEN,
                                "forbidden",
                                "whois_only",
                                "this socket answers GET /v1/whois/{addr} only; the admin \
                                 socket serves the rest",
                            )
                        } else if req.uri().path() == RELOAD_PATH {
                            reload(&app, req.method()).await
                        } else {
                            handle(&app, req)
                        })
                    }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "removing the admin socket");
        }
    }
}

/// The list of sessions.
#[derive(Debug, Serialize)]
struct SessionList {
    count: usize,
    sessions: Vec<SessionView>,
}

/// What a revocation removed.
#[derive(Debug, Serialize)]
struct RevokeAnswer {
    removed: Removed,
}

/// One issuer's key status.
#[derive(Debug, Serialize)]
struct IssuerStatus {
    issuer: String,
    keys: usize,
    refreshes_ok: u64,
    refreshes_failed: u64,
    last_refresh_ok: Option<String>,
}

/// One interface enforcement is attached to.
#[derive(Debug, Serialize)]
struct InterfaceStatus {
    name: String,
    mode: String,
    program_id: u32,
}

/// Packets and bytes.
#[derive(Debug, Serialize)]
struct CountStatus {
    packets: u64,
    bytes: u64,
}

/// One service's counters, by verdict reason (reasons with no traffic left out).
#[derive(Debug, Serialize)]
struct ServiceStatus {
    service: String,
    reasons: std::collections::BTreeMap<&'static str, CountStatus>,
    rst_sent: CountStatus,
}

/// The agent's status.
#[derive(Debug, Serialize)]
struct Status {
    version: &'static str,
    interfaces: Vec<InterfaceStatus>,
    sources: usize,
    sessions: usize,
    capacity: Option<u32>,
    identities: usize,
    counters: Vec<ServiceStatus>,
    issuers: Vec<IssuerStatus>,
    events_suppressed: u64,
    events_lost: u64,
}

/// `POST` re-reads the configuration file and applies it (as SIGHUP does).
pub const RELOAD_PATH: &str = "/v1/reload";

/// `POST /v1/reload`: 200 with the report, or 422 with every error (nothing changed).
pub(crate) async fn reload(app: &App, method: &Method) -> HttpResponse {
    if method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method_not_allowed",
            "POST to reload the configuration",
        );
    }
    match crate::runtime::reload::reload_file(app, "admin").await {
        Ok(report) => json(StatusCode::OK, &report),
        Err(e) => json(StatusCode::UNPROCESSABLE_ENTITY, &e),
    }
}

fn is_whois<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && req.uri().path().starts_with(WHOIS_PREFIX)
}

const WHOIS_PREFIX: &str = "/v1/whois/";

/// Handles one admin request.
pub(crate) fn handle<B>(app: &App, req: Request<B>) -> HttpResponse {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    match (req.method(), path) {
        (&Method::GET, "/v1/sessions") => {
            let sessions = app.sessions().table().views();
            json(
                StatusCode::OK,
                &SessionList {
                    count: sessions.len(),
                    sessions,
                },
            )
        }
        (&Method::DELETE, "/v1/sessions") => revoke(app, query),
        (&Method::GET, "/v1/status") => status(app),
        (&Method::GET, p) if p.starts_with(WHOIS_PREFIX) => {
            let raw = &p[WHOIS_PREFIX.len()..];
            let Some(addr) = percent_decode(raw).and_then(|a| a.parse::<IpAddr>().ok()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "bad_address",
                    format!("{raw:?} is not an IP address"),
                );
            };
            match app.sessions().table().view(addr) {
                Some(view) => json(StatusCode::OK, &view),
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no_session",
                    format!("no identity is logged in from {}", addr.to_canonical()),
                ),
            }
        }
        (_, "/v1/sessions" | "/v1/status") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method_not_allowed",
            "see the admin API's documentation",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "not_found",
            "unknown path",
        ),
    }
}

fn revoke(app: &App, query: &str) -> HttpResponse {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let bad = |why: &str| error(StatusCode::BAD_REQUEST, "bad_request", "bad_query", why);
    let [(key, value)] = pairs.as_slice() else {
        return bad("give exactly one of ?source=ADDR or ?user=NAME");
    };
    let result = match key.as_str() {
        "source" => match value.parse::<IpAddr>() {
            Ok(addr) => app.sessions().revoke_source(addr),
            Err(_) => return bad("source is not an IP address"),
        },
        "user" if !value.is_empty() => app.sessions().revoke_user(value),
        _ => return bad("give exactly one of ?source=ADDR or ?user=NAME"),
    };
    match result {
        Ok(removed) => json(StatusCode::OK, &RevokeAnswer { removed }),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "dataplane_error",
            format!("{e}; the sweeper retries the removal"),
        ),
    }
}

fn status(app: &App) -> HttpResponse {
    let (sources, sessions, identities, stats, attachments, capacity, counters) = {
        let m = app.sessions();
        let t = m.table();
        let counters = m.store().counters().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "status: reading the data plane's counters failed");
            Vec::new()
        });
        (
            t.len(),
            t.entries(),
            t.identities(),
            m.store().event_stats().unwrap_or_default(),
            m.store().attachments(),
            m.store().capacity(),
            counters,
        )
    };
    let interfaces = attachments
        .into_iter()
        .map(|a| InterfaceStatus {
            name: a.interface,
            mode: a.mode.to_string(),
            program_id: a.program_id,
        })
        .collect();
    let catalog = app.catalog.get();
    let count = |c: crate::dataplane::Count| CountStatus {
        packets: c.packets,
        bytes: c.bytes,
    };
    let counters = counters
        .into_iter()
        .map(|c| ServiceStatus {
            service: match c.service_id {
                0 => "unattributed".to_owned(),
                id => catalog
                    .get_raw(id)
                    .map_or_else(|| format!("service-{id}"), |s| s.name.clone()),
            },
            reasons: c
                .by_reason
                .iter()
                .filter(|(_, n)| n.packets > 0)
                .map(|(r, n)| (r.as_str(), count(*n)))
                .collect(),
            rst_sent: count(c.rst_sent),
        })
        .collect();
    let mut issuers: Vec<IssuerStatus> = app
        .verifier
        .get()
        .stats()
        .into_iter()
        .map(|s| IssuerStatus {
            issuer: s.issuer,
            keys: s.keys,
            refreshes_ok: s.refreshes_ok,
            refreshes_failed: s.refreshes_failed,
            last_refresh_ok: s.last_refresh_ok.map(rfc3339),
        })
        .collect();
    issuers.sort_by(|a, b| a.issuer.cmp(&b.issuer));
    json(
        StatusCode::OK,
        &Status {
            version: env!("CARGO_PKG_VERSION"),
            interfaces,
            sources,
            sessions,
            capacity,
            identities,
            counters,
            issuers,
            events_suppressed: stats.suppressed,
            events_lost: stats.ring_full,
        },
    )
}

/// Decodes `%XX` escapes (clients escape the colons of IPv6 addresses, some do not).
fn percent_decode(s: &str) -> Option<String> {
    let bytes: Vec<u8> = url::form_urlencoded::parse(format!("a={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())?;
    String::from_utf8(bytes).ok()
}
