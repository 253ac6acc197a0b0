//! Talking to the IdP: the HTTP client (custom CA, http only on loopback, bounded redirects and
//! bodies), OIDC discovery, and fetching the key set.

use std::time::Duration;

use reqwest::{Client, Url, redirect};
use serde::Deserialize;

use super::{
    error::{ConfigError, FetchError},
    settings::{IssuerSettings, check_url, is_loopback},
};

/// Largest discovery document or key set accepted; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Redirects followed per request.
const MAX_REDIRECTS: usize = 3;

/// Fetches one issuer's metadata and keys.
#[derive(Debug)]
pub(crate) struct Fetcher {
    client: Client,
    issuer: String,
    configured_jwks_uri: Option<Url>,
    allow_insecure_http: bool,
}

#[derive(Deserialize)]
struct ProviderMetadata {
    issuer: String,
    jwks_uri: String,
}

impl Fetcher {
    /// Builds the client from validated settings.
    pub(crate) fn new(settings: &IssuerSettings) -> Result<Self, ConfigError> {
        let issuer = settings.issuer.clone();
        let allow_insecure_http = settings.allow_insecure_http;
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if let Err(reason) = check_url(attempt.url(), allow_insecure_http) {
                attempt.error(reason)
            } else {
                attempt.follow()
            }
        });
        let mut builder = Client::builder()
            .user_agent(concat!("idgate/", env!("CARGO_PKG_VERSION")))
            .redirect(policy)
            .timeout(settings.http_timeout)
            .connect_timeout(settings.http_timeout.min(Duration::from_secs(5)));
        if Url::parse(&settings.issuer).is_ok_and(|u| is_loopback(&u)) {
            // A loopback IdP must not be reached through a proxy taken from the environment.
            builder = builder.no_proxy();
        }
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::CaFile {
                issuer: issuer.clone(),
                path: path.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| ConfigError::CaParse {
                    issuer: issuer.clone(),
                    path: path.clone(),
                })?;
            // Only the configured CA: a corporate IdP's certificate chains to it, and nothing
            // else should be able to impersonate the IdP.
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().map_err(|source| ConfigError::HttpClient {
            issuer: issuer.clone(),
            source,
        })?;
        let configured_jwks_uri = match &settings.jwks_uri {
            Some(u) => Some(Url::parse(u).map_err(|e| ConfigError::Invalid {
                issuer: issuer.clone(),
                reason: format!("jwks_uri is not a URL: {e}"),
            })?),
            None => None,
        };
        Ok(Self {
            client,
            issuer,
            configured_jwks_uri,
            allow_insecure_http,
        })
    }

    /// The key set URL from the settings, if discovery is skipped.
    pub(crate) fn configured_jwks_uri(&self) -> Option<&Url> {
        self.configured_jwks_uri.as_ref()
    }

    /// OIDC discovery: the document must name exactly the configured issuer (OIDC Discovery
    /// §4.3), else a look-alike IdP could hand out its own keys.
    pub(crate) async fn discover(&self) -> Result<Url, FetchError> {
        let url = discovery_url(&self.issuer);
        let parsed = Url::parse(&url).map_err(|_| FetchError::UrlNotAllowed {
            url: url.clone(),
            reason: "not a URL",
        })?;
        let body = self.get(&parsed).await?;
        let meta: ProviderMetadata =
            serde_json::from_slice(&body).map_err(|source| FetchError::Json {
                url: url.clone(),
                source,
            })?;
        if meta.issuer != self.issuer {
            return Err(FetchError::IssuerMismatch {
                expected: self.issuer.clone(),
                found: meta.issuer,
            });
        }
        let jwks = Url::parse(&meta.jwks_uri).map_err(|_| FetchError::UrlNotAllowed {
            url: meta.jwks_uri.clone(),
            reason: "not a URL",
        })?;
        check_url(&jwks, self.allow_insecure_http).map_err(|reason| FetchError::UrlNotAllowed {
            url: meta.jwks_uri,
            reason,
        })?;
        Ok(jwks)
    }

    /// GETs a JSON document with a bounded body.
    pub(crate) async fn get(&self, url: &Url) -> Result<Vec<u8>, FetchError> {
        let http = |source| FetchError::Http {
            url: url.to_string(),
            source,
        };
        let mut response = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(http)?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let too_large = || FetchError::TooLarge {
            url: url.to_string(),
            max: MAX_DOCUMENT_BYTES,
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// OIDC Discovery §4: the issuer without a trailing slash, then the well-known path.
pub(crate) fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_url_appends_the_well_known_path() {
        assert_eq!(
            discovery_url("https://idp.example/realms/corp"),
            "https://idp.example/realms/corp/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://idp.example/"),
            "https://idp.example/.well-known/openid-configuration"
        );
    }
}
