//! The agent's two HTTP surfaces:
//!
//! - the **session endpoint** ([`endpoint`]): HTTPS (or loopback HTTP behind a proxy), where
//!   clients present tokens (`POST /v1/sessions`) and log out (`DELETE /v1/sessions`);
//! - the **admin API** ([`admin`]): HTTP/1.1 over a local unix socket (mode 0660) for whois,
//!   listing and revoking sessions, and status; [`client`] speaks it for the command line.
//!
//! Both answer JSON and share one [`App`].

pub mod admin;
pub mod client;
pub mod client_addr;
pub mod endpoint;
#[cfg(test)]
mod tests;
pub mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};
use ipnet::IpNet;
use serde::Serialize;
use thiserror::Error;

use crate::{
    identity::Verifier,
    metrics::Metrics,
    policy::Policy,
    session::{Catalog, FailureLimiter, SessionManager, audit::AuditLog},
};

/// A response with a complete body.
pub type HttpResponse = Response<Full<Bytes>>;

/// Errors starting or using the HTTP surfaces.
#[derive(Debug, Error)]
pub enum ApiError {
    /// Binding the session endpoint failed.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate or key could not be used.
    #[error("TLS {what} {}: {reason}", path.display())]
    Tls {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The admin socket could not be set up or reached.
    #[error("admin socket {}: {reason}", path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An admin request failed on the way.
    #[error("admin request: {0}")]
    Client(String),
}

/// Size and time limits of the session endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request headers above this many bytes get 413 (the largest token plus room).
    pub max_header_bytes: usize,
    /// hyper's read buffer: headers that do not even fit get hyper's 431.
    pub max_buf_bytes: usize,
    /// Request bodies above this get 413 (the endpoint reads none).
    pub max_body_bytes: usize,
    /// TLS handshake and request headers must arrive within this.
    pub header_timeout: Duration,
    /// A whole connection may last this long.
    pub connection_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Limits {
    /// Limits for tokens of at most `max_token_bytes`.
    pub fn for_tokens(max_token_bytes: usize) -> Limits {
        let max_header_bytes = max_token_bytes + 8 * 1024;
        Limits {
            max_header_bytes,
            max_buf_bytes: (2 * max_header_bytes).max(16 * 1024),
            max_body_bytes: 4 * 1024,
            header_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// A value a configuration reload replaces whole: readers take the current one (an `Arc`, so no
/// lock is held while they use it), a reload swaps in the next.
pub struct Shared<T>(RwLock<Arc<T>>);

impl<T> Shared<T> {
    /// Holds `value`.
    pub fn new(value: impl Into<Arc<T>>) -> Self {
        Shared(RwLock::new(value.into()))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the value; returns the previous one.
    pub fn replace(&self, value: impl Into<Arc<T>>) -> Arc<T> {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *g, value.into())
    }
}

impl<T> From<T> for Shared<T> {
    fn from(value: T) -> Self {
        Shared::new(value)
    }
}

impl<T> From<Arc<T>> for Shared<T> {
    fn from(value: Arc<T>) -> Self {
        Shared::new(value)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// What both HTTP surfaces share: the verifier, the policy, the sessions.
pub struct App {
    /// Verifies tokens (replaced by a reload that changes the issuers).
    pub verifier: Shared<Verifier>,
    /// Decides per service (replaced by a reload).
    pub policy: Shared<Policy>,
    /// The configured services (replaced by a reload).
    pub catalog: Shared<Catalog>,
    /// The session table and the data plane.
    pub sessions: Mutex<SessionManager>,
    /// Failed attempts per source.
    pub limiter: Mutex<FailureLimiter>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The endpoint's limits.
    pub limits: Limits,
    /// Login outcomes and readiness, for the metrics endpoint.
    pub metrics: Arc<Metrics>,
    /// The audit trail (the same one the session manager records to).
    pub audit: AuditLog,
    /// What a configuration reload needs (the running configuration, its file); also
    /// serialises reloads.
    pub reload: tokio::sync::Mutex<crate::runtime::reload::ReloadState>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl App {
    /// The session manager, locked. The lock is only ever held for synchronous work (table
    /// updates and map system calls), never across an await.
    pub fn sessions(&self) -> MutexGuard<'_, SessionManager> {
        // A panic while holding the lock leaves a consistent table (every change is applied
        // before the table is touched again), so carrying on is safe.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The failure limiter, locked.
    pub fn limiter(&self) -> MutexGuard<'_, FailureLimiter> {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The JSON body of every refusal.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody<'a> {
    /// The category (an RFC 6750 code for token errors).
    pub error: &'a str,
    /// The machine-readable reason.
    pub reason: &'a str,
    /// For people.
    pub description: String,
}

/// A refusal with a JSON body.
pub(crate) fn error(
    status: StatusCode,
    error: &str,
    reason: &str,
    description: impl Into<String>,
) -> HttpResponse {
    json(
        status,
        &ErrorBody {
            error,
            reason,
            description: description.into(),
        },
    )
}
