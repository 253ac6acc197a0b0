//! Per-issuer settings. The struct deserializes (e.g. from the agent's TOML configuration) with
//! defaults for everything but the issuer and its audiences; the configuration loader owns the
//! file, this module owns the meaning and the validation.

use std::{path::PathBuf, time::Duration};

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use reqwest::Url;
use serde::Deserialize;

use super::error::ConfigError;

/// How a claim's value becomes a list of strings.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClaimFormat {
    /// A JSON array of strings; a lone string counts as one element (some IdPs collapse
    /// single-valued claims).
    #[default]
    Array,
    /// A space-separated string as in `scope`; an array of strings is accepted too (Okta's `scp`).
    SpaceSeparated,
}

/// A claim that contributes group names: `groups`, `roles`, Keycloak's `realm_access.roles`, ...
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClaimSource {
    /// Dotted path to the claim. A top-level claim whose whole name matches wins first, so
    /// namespaced claims such as `https://example.com/groups` work too.
    pub claim: String,
    /// How the value is read.
    #[serde(default)]
    pub format: ClaimFormat,
}

impl ClaimSource {
    /// A claim holding an array of strings.
    pub fn array(claim: impl Into<String>) -> Self {
        Self {
            claim: claim.into(),
            format: ClaimFormat::Array,
        }
    }

    /// A claim holding a space-separated string.
    pub fn space_separated(claim: impl Into<String>) -> Self {
        Self {
            claim: claim.into(),
            format: ClaimFormat::SpaceSeparated,
        }
    }
}

/// Everything idgate needs to know to trust one issuer.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// The issuer identifier, compared byte for byte with `iss` and the discovery document.
    pub issuer: String,
    /// Accepted audiences; a token's `aud` must contain at least one.
    pub audiences: Vec<String>,
    /// Accepted signing algorithms; HMAC algorithms are refused at validation.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", with = "duration")]
    pub leeway: Duration,
    /// Require the RFC 9068 header `typ: at+jwt`, so that ID tokens are refused.
    #[serde(default)]
    pub require_typ_at_jwt: bool,
    /// Longest accepted token in bytes, checked before any parsing.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// The claim naming the user (dotted path), `sub` by default.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// Claims whose values become the token's groups.
    #[serde(default = "default_group_claims")]
    pub group_claims: Vec<ClaimSource>,
    /// Key set URL; when set, OIDC discovery is skipped.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// PEM file of the CA certificates to trust for this issuer instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow plain `http://` to hosts other than loopback addresses (development only).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// How often the key set is refetched in the background.
    #[serde(default = "default_refresh_interval", with = "duration")]
    pub jwks_refresh_interval: Duration,
    /// Least time between two refetches triggered by unknown key ids.
    #[serde(default = "default_min_refetch_interval", with = "duration")]
    pub jwks_min_refetch_interval: Duration,
    /// Timeout of one HTTP request to the IdP.
    #[serde(default = "default_http_timeout", with = "duration")]
    pub http_timeout: Duration,
}

/// Largest `max_token_bytes` accepted; more would only help an attacker.
pub const MAX_TOKEN_BYTES_LIMIT: usize = 64 * 1024;

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
}
fn default_leeway() -> Duration {
    Duration::from_secs(60)
}
fn default_max_token_bytes() -> usize {
    8 * 1024
}
fn default_user_claim() -> String {
    "sub".to_owned()
}
fn default_group_claims() -> Vec<ClaimSource> {
    vec![ClaimSource::array("groups")]
}
fn default_refresh_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_min_refetch_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}

impl IssuerSettings {
    /// Settings with every default, for the given issuer and audiences.
    pub fn new(
        issuer: impl Into<String>,
        audiences: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            issuer: issuer.into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            algorithms: default_algorithms(),
            leeway: default_leeway(),
            require_typ_at_jwt: false,
            max_token_bytes: default_max_token_bytes(),
            user_claim: default_user_claim(),
            group_claims: default_group_claims(),
            jwks_uri: None,
            ca_file: None,
            allow_insecure_http: false,
            jwks_refresh_interval: default_refresh_interval(),
            jwks_min_refetch_interval: default_min_refetch_interval(),
            http_timeout: default_http_timeout(),
        }
    }

    /// Checks the settings as a whole; the agent should call this when it loads its configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            issuer: self.issuer.clone(),
            reason,
        };
        let url = Url::parse(&self.issuer)
            .map_err(|e| invalid(format!("the issuer is not a URL: {e}")))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("the issuer must have no query or fragment".into()));
        }
        check_url(&url, self.allow_insecure_http).map_err(|r| invalid(format!("issuer: {r}")))?;
        if let Some(jwks_uri) = &self.jwks_uri {
            let url =
                Url::parse(jwks_uri).map_err(|e| invalid(format!("jwks_uri is not a URL: {e}")))?;
            check_url(&url, self.allow_insecure_http)
                .map_err(|r| invalid(format!("jwks_uri: {r}")))?;
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(invalid(
                "at least one non-empty audience is required".into(),
            ));
        }
        if self.algorithms.is_empty() {
            return Err(invalid("at least one algorithm is required".into()));
        }
        if let Some(alg) = self
            .algorithms
            .iter()
            .find(|a| a.family() == AlgorithmFamily::Hmac)
        {
            return Err(invalid(format!(
                "{alg:?} is a shared-secret algorithm and never accepted"
            )));
        }
        if self.max_token_bytes == 0 || self.max_token_bytes > MAX_TOKEN_BYTES_LIMIT {
            return Err(invalid(format!(
                "max_token_bytes must be between 1 and {MAX_TOKEN_BYTES_LIMIT}"
            )));
        }
        if self.user_claim.is_empty() || self.group_claims.iter().any(|c| c.claim.is_empty()) {
            return Err(invalid("claim paths must not be empty".into()));
        }
        if self.jwks_refresh_interval.is_zero() || self.http_timeout.is_zero() {
            return Err(invalid(
                "jwks_refresh_interval and http_timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Plain HTTP is allowed only to loopback address literals unless `allow_insecure_http` says
/// otherwise: a token verified with keys fetched in clear text is only as good as the network.
pub(crate) fn check_url(url: &Url, allow_insecure_http: bool) -> Result<(), &'static str> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_http || is_loopback(url) => Ok(()),
        "http" => Err("plain http is allowed only to loopback addresses"),
        _ => Err("the scheme must be https"),
    }
}

/// Whether the URL's host is a loopback address literal.
pub(crate) fn is_loopback(url: &Url) -> bool {
    // A name could resolve anywhere; only address literals are trusted to be local.
    url.host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

/// Durations in the configuration: a number of seconds, or a string with a unit (`500ms`, `30s`,
/// `5m`, `1h`, `1d`).
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => parse(&t).ok_or_else(|| {
                D::Error::custom(format!(
                    "invalid duration {t:?}: expected e.g. 500ms, 30s, 5m, 1h, 1d"
                ))
            }),
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().ok()?;
        let millis = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        n.checked_mul(millis).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(duration::parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(duration::parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(duration::parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(duration::parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(duration::parse("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(duration::parse("30"), None);
        assert_eq!(duration::parse("s"), None);
        assert_eq!(duration::parse("5 weeks"), None);
    }

    #[test]
    fn deserializes_with_defaults_and_refuses_unknown_fields() {
        let s: IssuerSettings = serde_json::from_value(serde_json::json!({
            "issuer": "https://idp.example/realms/corp",
            "audiences": ["idgate"],
            "leeway": "30s",
            "jwks_refresh_interval": 600,
            "group_claims": [
                {"claim": "realm_access.roles"},
                {"claim": "scope", "format": "space_separated"}
            ],
        }))
        .unwrap();
        assert_eq!(s.leeway, Duration::from_secs(30));
        assert_eq!(s.jwks_refresh_interval, Duration::from_secs(600));
        assert_eq!(s.algorithms, default_algorithms());
        assert_eq!(s.max_token_bytes, 8192);
        assert_eq!(s.user_claim, "sub");
        assert_eq!(
            s.group_claims,
            [
                ClaimSource::array("realm_access.roles"),
                ClaimSource::space_separated("scope")
            ]
        );
        s.validate().unwrap();

        let unknown = serde_json::from_value::<IssuerSettings>(serde_json::json!({
            "issuer": "https://idp.example", "audiences": ["a"], "audience": "typo"
        }));
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn validation_refuses_unsafe_settings() {
        let ok = IssuerSettings::new("https://idp.example", ["idgate"]);
        ok.validate().unwrap();

        let mut s = ok.clone();
        s.algorithms = vec![Algorithm::RS256, Algorithm::HS256];
        assert!(s.validate().unwrap_err().to_string().contains("HS256"));

        let mut s = ok.clone();
        s.audiences.clear();
        assert!(s.validate().is_err());

        let mut s = ok.clone();
        s.issuer = "http://idp.example".into();
        assert!(s.validate().unwrap_err().to_string().contains("loopback"));
        s.allow_insecure_http = true;
        s.validate().unwrap();

        let mut s = ok.clone();
        s.issuer = "http://127.0.0.1:8080/realms/x".into();
        s.validate().unwrap();
        s.issuer = "http://[::1]:8080".into();
        s.validate().unwrap();
        s.issuer = "http://localhost:8080".into();
        assert!(s.validate().is_err());

        let mut s = ok.clone();
        s.jwks_uri = Some("ftp://idp.example/keys".into());
        assert!(s.validate().is_err());

        let mut s = ok.clone();
        s.max_token_bytes = 0;
        assert!(s.validate().is_err());

        let mut s = ok;
        s.issuer = "https://idp.example/?tenant=x".into();
        assert!(s.validate().is_err());
    }
}
