//! Token verification: OIDC access tokens (JWTs, RFC 9068) from the configured issuers become a
//! [`VerifiedToken`] naming the user, their groups and scopes, following the JWT BCP (RFC 8725).
//!
//! A [`Verifier`] holds several issuers. It picks one by the token's (unverified) `iss`, finds the
//! signing key in that issuer's key set (fetched through OIDC discovery, refreshed in the
//! background, refetched on an unknown `kid` at most once per interval), verifies the signature
//! with `jsonwebtoken`, and only then checks the claims. Every refusal is a [`VerifyError`] with
//! a stable [`reason`](VerifyError::reason) and an RFC 6750 challenge.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use idgate::identity::{IssuerSettings, Verifier};
//! let verifier = Verifier::new([IssuerSettings::new("https://idp.example/realms/corp", ["idgate"])])?;
//! for (issuer, result) in verifier.refresh_all().await {
//!     if let Err(e) = result { eprintln!("{issuer}: {e}"); }
//! }
//! let _refresh = verifier.spawn_refresh(); // keep it: dropping it stops the refresh
//! let token = verifier.verify("eyJ...").await?;
//! println!("{} in {:?}", token.user, token.groups);
//! # Ok(()) }
//! ```

mod cache;
mod discovery;
mod error;
mod jwks;
mod settings;
#[cfg(test)]
pub(crate) mod tests;
mod verify;

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use serde_json::Value;

pub use self::{
    cache::IssuerStats,
    error::{ConfigError, FetchError, REALM, VerifyError},
    settings::{ClaimFormat, ClaimSource, IssuerSettings, MAX_TOKEN_BYTES_LIMIT},
    verify::VerifiedToken,
};
/// The signing algorithms, as named in [`IssuerSettings::algorithms`].
pub use jsonwebtoken::Algorithm;

use self::{cache::KeyCache, discovery::Fetcher, verify::Issuer};

/// Verifies tokens from a fixed set of issuers.
pub struct Verifier {
    issuers: HashMap<String, Issuer>,
    /// The largest per-issuer limit, checked before anything is parsed.
    max_token_bytes: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.issuers.keys())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Validates the settings and builds the HTTP clients; fetches nothing yet.
    pub fn new(settings: impl IntoIterator<Item = IssuerSettings>) -> Result<Self, ConfigError> {
        let mut issuers = HashMap::new();
        let mut max_token_bytes = 0;
        for s in settings {
            s.validate()?;
            if issuers.contains_key(&s.issuer) {
                return Err(ConfigError::DuplicateIssuer(s.issuer));
            }
            let keys = Arc::new(KeyCache::new(&s, Fetcher::new(&s)?));
            max_token_bytes = max_token_bytes.max(s.max_token_bytes);
            let issuer = Issuer {
                name: Arc::from(s.issuer.as_str()),
                settings: s,
                keys,
            };
            issuers.insert(issuer.settings.issuer.clone(), issuer);
        }
        if issuers.is_empty() {
            return Err(ConfigError::NoIssuers);
        }
        Ok(Self {
            issuers,
            max_token_bytes,
        })
    }

    /// Fetches every issuer's key set now, concurrently (discovery first where needed). A failed
    /// issuer keeps its previous keys; its tokens are refused as `idp_unavailable` until a fetch
    /// succeeds.
    pub async fn refresh_all(&self) -> Vec<(String, Result<usize, FetchError>)> {
        let tasks: Vec<_> = self
            .issuers
            .values()
            .map(|i| {
                let keys = i.keys.clone();
                (
                    i.settings.issuer.clone(),
                    tokio::spawn(async move { keys.refresh().await }),
                )
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for (issuer, task) in tasks {
            let result = match task.await {
                Ok(result) => result,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                Err(_) => continue,
            };
            results.push((issuer, result));
        }
        results
    }

    /// Starts one background task per issuer that refreshes its keys every
    /// `jwks_refresh_interval` (at once for an issuer never fetched). Needs a Tokio runtime.
    #[must_use = "dropping the handle stops the refresh tasks"]
    pub fn spawn_refresh(&self) -> RefreshTasks {
        let handles = self
            .issuers
            .values()
            .map(|i| tokio::spawn(i.keys.clone().run_refresh_loop()))
            .collect();
        RefreshTasks { handles }
    }

    /// Verifies a token now.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, VerifyError> {
        self.verify_at(token, SystemTime::now()).await
    }

    /// Verifies a token as of `now`.
    pub async fn verify_at(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<VerifiedToken, VerifyError> {
        if token.is_empty() {
            return Err(VerifyError::MissingToken);
        }
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TokenTooLarge {
                max: self.max_token_bytes,
            });
        }
        let parts = verify::split(token)?;
        let header_json = verify::decode_part(parts.header, "header is not base64url")?;
        let header = verify::parse_header(&header_json)?;
        let alg = header.algorithm()?;
        let claims = verify::parse_claims(parts.payload)?;
        let issuer = claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| self.issuers.get(iss))
            .ok_or(VerifyError::UnknownIssuer)?;
        issuer.verify(&parts, &header, alg, claims, now).await
    }

    /// The configured issuers.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.keys().map(String::as_str)
    }

    /// Key cache counters per issuer.
    pub fn stats(&self) -> Vec<IssuerStats> {
        self.issuers.values().map(|i| i.keys.stats()).collect()
    }
}

/// The background refresh tasks; dropping this stops them.
#[derive(Debug)]
pub struct RefreshTasks {
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RefreshTasks {
    fn drop(&mut self) {
        for handle in &self.handles {
            handle.abort();
        }
    }
}

/// The token in an `Authorization` header value (RFC 6750 §2.1: scheme `Bearer`, any case, then
/// the token). No header, another scheme or an empty token count as no token at all.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, VerifyError> {
    let value = authorization.ok_or(VerifyError::MissingToken)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(VerifyError::MissingToken)?;
    let token = token.trim_start();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(VerifyError::MissingToken);
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
    {
        return Err(VerifyError::Malformed(
            "the bearer token has characters outside b64token",
        ));
    }
    Ok(token)
}
