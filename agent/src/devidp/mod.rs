//! `idgate dev-idp`: a development OpenID provider, so that the demo and local experiments need
//! nothing else installed. **Not for production**: no persistence, secrets in a plain file,
//! keys that change at every start, plain HTTP.
//!
//! It implements exactly what idgate's clients need: OIDC discovery, a JWK Set, and the token
//! endpoint for the client credentials grant (RFC 6749 §4.4) with `client_secret_basic` and
//! `client_secret_post`. Tokens are RFC 9068 JWT access tokens (`typ: at+jwt`) carrying `sub`,
//! `client_id`, `groups` and `scope`, signed with a key generated at start (ES256 by default,
//! EdDSA or RS256 on request). With [`Options::allow_rotate`], `POST /rotate` replaces the
//! signing key and keeps the old one published for a grace period.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idgate::devidp::{DevIdp, DevIdpConfig, Options};
//! let idp = DevIdp::start(DevIdpConfig::example(), Options::default()).await?;
//! println!("issuer {}", idp.issuer());
//! # Ok(()) }
//! ```

pub mod cli;
mod config;
mod keys;
mod server;
#[cfg(test)]
mod tests;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use url::Url;

pub use self::{
    config::{Client, DevIdpConfig, EXAMPLE},
    keys::SigningAlg,
};
use self::{
    keys::{KeyRing, SigningKey},
    server::State,
};

/// Where the dev IdP listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9400);

/// Extra time a retired key stays published beyond the longest token lifetime: idgate's default
/// clock-skew leeway, during which a verifier may still accept such a token.
const GRACE_MARGIN: Duration = Duration::from_secs(60);

/// The warning printed and logged at start.
pub const WARNING: &str = "idgate dev-idp is a DEVELOPMENT identity provider: client secrets sit \
    in a plain file, signing keys live only in memory and change at every start, nothing is \
    persisted, and it speaks plain HTTP. Never let a production idgate trust it.";

/// How the dev IdP runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The issuer identifier; `None` means `http://<the address listened on>`. Its path, if
    /// any, prefixes every endpoint.
    pub issuer: Option<String>,
    /// The signing algorithm.
    pub alg: SigningAlg,
    /// Serve `POST /rotate`.
    pub allow_rotate: bool,
    /// How long a retired key stays published; `None` means the longest token lifetime plus a
    /// minute, after which nothing it signed can still be valid.
    pub rotation_grace: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            issuer: None,
            alg: SigningAlg::default(),
            allow_rotate: false,
            rotation_grace: None,
        }
    }
}

/// Why the dev IdP could not start or do what was asked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DevIdpError {
    /// The clients file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The clients file is not valid.
    #[error("{origin}:\n{message}")]
    Config {
        /// Where the text came from.
        origin: String,
        /// Every problem found, one per line.
        message: String,
    },
    /// The issuer identifier is not usable.
    #[error("issuer {issuer:?}: {reason}")]
    Issuer {
        /// The issuer given.
        issuer: String,
        /// Why it is refused.
        reason: String,
    },
    /// The listening socket could not be opened.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The crypto library failed to generate a key.
    #[error("generating a {0} signing key failed")]
    KeyGeneration(SigningAlg),
}

/// A running dev IdP; dropping it stops serving and closes every connection.
#[derive(Debug)]
pub struct DevIdp {
    state: Arc<State>,
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DevIdp {
    /// Generates the signing key, binds the listener and starts serving in the background; logs
    /// the [`WARNING`]. Needs a Tokio runtime.
    pub async fn start(config: DevIdpConfig, options: Options) -> Result<Self, DevIdpError> {
        if let Some(issuer) = &options.issuer {
            check_issuer(issuer)?;
        } else if options.listen.ip().is_unspecified() {
            return Err(DevIdpError::Issuer {
                issuer: format!("http://{}", options.listen),
                reason: "a wildcard listen address names no host: give --issuer with the \
                         address clients use"
                    .into(),
            });
        }
        let key = generate(options.alg).await?;
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| DevIdpError::Bind {
                addr: options.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| DevIdpError::Bind {
            addr: options.listen,
            source,
        })?;
        let issuer = options
            .issuer
            .clone()
            .unwrap_or_else(|| format!("http://{local_addr}"));
        let grace = options
            .rotation_grace
            .unwrap_or_else(|| config.longest_lifetime() + GRACE_MARGIN);
        tracing::warn!("{WARNING}");
        tracing::info!(%issuer, alg = %options.alg, kid = %key.kid, clients = config.clients.len(),
            rotate = options.allow_rotate, "dev-idp listening on {local_addr}");
        let state = Arc::new(State::new(
            issuer,
            config,
            options.alg,
            KeyRing::new(key),
            options.allow_rotate,
            grace,
        ));
        let task = tokio::spawn(server::serve(listener, state.clone()));
        Ok(Self {
            state,
            local_addr,
            task,
        })
    }

    /// The issuer identifier, as in every token's `iss`.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The address actually listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The token endpoint's URL.
    pub fn token_endpoint(&self) -> String {
        self.state.url("/token")
    }

    /// The discovery document's URL.
    pub fn discovery_url(&self) -> String {
        self.state.url("/.well-known/openid-configuration")
    }

    /// The key id new tokens are signed with.
    pub fn active_kid(&self) -> String {
        self.state.keys().active().kid.clone()
    }

    /// The signing algorithm.
    pub fn alg(&self) -> SigningAlg {
        self.state.alg
    }

    /// The clients served.
    pub fn config(&self) -> &DevIdpConfig {
        &self.state.config
    }

    /// Replaces the signing key, as `POST /rotate` does (allowed or not); returns the new key
    /// id. The previous key stays published for the grace period.
    pub async fn rotate(&self) -> Result<String, DevIdpError> {
        server::rotate(&self.state).await.map(|r| r.kid)
    }

    /// The URL where `POST` rotates the signing key, when [`Options::allow_rotate`] is set.
    pub fn rotation_endpoint(&self) -> Option<String> {
        self.state.allow_rotate.then(|| self.state.url("/rotate"))
    }

    /// How long a rotated-out key stays published.
    pub fn rotation_grace(&self) -> Duration {
        self.state.grace
    }

    /// Stops serving and waits until the listener and every connection are closed.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for DevIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A new key, generated off the runtime threads (RSA takes a while).
async fn generate(alg: SigningAlg) -> Result<SigningKey, DevIdpError> {
    tokio::task::spawn_blocking(move || SigningKey::generate(alg))
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or(DevIdpError::KeyGeneration(alg))
}

/// The issuer must be an absolute http(s) URL without query or fragment (OIDC Discovery §2).
fn check_issuer(issuer: &str) -> Result<(), DevIdpError> {
    let refuse = |reason: &str| DevIdpError::Issuer {
        issuer: issuer.to_owned(),
        reason: reason.to_owned(),
    };
    let url = Url::parse(issuer).map_err(|e| refuse(&format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("the scheme must be http or https"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(refuse("an issuer has no query or fragment"));
    }
    if url.host_str().is_none() {
        return Err(refuse("an issuer has a host"));
    }
    Ok(())
}
