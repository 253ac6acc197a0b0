//! Errors of the identity layer: why a token was refused, why a configuration was rejected, and why
//! fetching an issuer's metadata or keys failed.

use std::path::PathBuf;

use thiserror::Error;

/// The realm every `WWW-Authenticate` challenge names.
pub const REALM: &str = "idgate";

/// Why a token was refused.
///
/// The `Display` text doubles as the RFC 6750 `error_description`, so it is fixed text: it never
/// carries anything taken from the token, which an attacker controls.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// No bearer token was presented.
    #[error("no bearer token was presented")]
    MissingToken,
    /// The token is longer than the configured limit.
    #[error("the token is longer than {max} bytes")]
    TokenTooLarge {
        /// The limit in force, in bytes.
        max: usize,
    },
    /// The token is not a well-formed signed JWT; the text says which part is wrong.
    #[error("the token is malformed: {0}")]
    Malformed(&'static str),
    /// The header carries a critical extension (`crit`) that idgate does not implement.
    #[error("the token header has a critical extension that is not supported")]
    UnsupportedHeader,
    /// The header's `alg` is `none`, an HMAC algorithm, unknown, or not allowed for the issuer.
    #[error("the token's signing algorithm is not accepted")]
    AlgNotAllowed,
    /// The token names no key but the issuer publishes several.
    #[error("the token names no key id and the issuer publishes several keys")]
    MissingKid,
    /// No key of the issuer has the token's `kid`, even after refetching the key set.
    #[error("the token's key id is not among the issuer's keys")]
    UnknownKid,
    /// The key named by the token does not fit the token's algorithm (type, curve, `alg`, `use`).
    #[error("the token's key does not fit its signing algorithm")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The token's `nbf` is still ahead.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// The token's `iat` is ahead of the clock by more than the leeway.
    #[error("the token was issued in the future")]
    IssuedInFuture,
    /// The token's `iss` is not the issuer whose keys verified it.
    #[error("the token's issuer is wrong")]
    WrongIssuer,
    /// The token's `aud` contains none of the configured audiences.
    #[error("the token is not meant for this audience")]
    WrongAudience,
    /// The token has no `exp`.
    #[error("the token has no expiry")]
    MissingExp,
    /// The token lacks `sub` or the configured user claim (or it is not a non-empty string).
    #[error("the token lacks the subject or user claim")]
    MissingClaim,
    /// The header's `typ` is not `at+jwt` although the issuer requires it.
    #[error("the token is not a JWT access token")]
    WrongTyp,
    /// The token's `iss` names no configured issuer.
    #[error("the token's issuer is not trusted")]
    UnknownIssuer,
    /// The issuer's keys have never been fetched, so nothing can be verified yet.
    #[error("the identity provider's keys are unavailable")]
    IdpUnavailable,
}

impl VerifyError {
    /// A stable machine-readable reason, for logs, metrics and the session endpoint.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::TokenTooLarge { .. } => "token_too_large",
            Self::Malformed(_) => "malformed",
            Self::UnsupportedHeader => "unsupported_header",
            Self::AlgNotAllowed => "alg_not_allowed",
            Self::MissingKid => "missing_kid",
            Self::UnknownKid => "unknown_kid",
            Self::KeyMismatch => "key_mismatch",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingExp => "missing_exp",
            Self::MissingClaim => "missing_claim",
            Self::WrongTyp => "wrong_typ",
            Self::UnknownIssuer => "unknown_issuer",
            Self::IdpUnavailable => "idp_unavailable",
        }
    }

    /// The HTTP status to answer with: 401, or 503 when the IdP's keys could never be fetched
    /// (the client is not at fault and may retry).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::IdpUnavailable => 503,
            _ => 401,
        }
    }

    /// The RFC 6750 `WWW-Authenticate` value: `Bearer realm="idgate"` alone for a missing token
    /// (§3.1 says to send no error code then), otherwise with `error="invalid_token"` and a
    /// description.
    pub fn www_authenticate(&self) -> String {
        match self {
            Self::MissingToken => format!("Bearer realm=\"{REALM}\""),
            other => {
                let description = sanitize_description(&other.to_string());
                format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_token\", \
                     error_description=\"{description}\""
                )
            }
        }
    }
}

/// Keeps only the characters RFC 6750 §3 allows in `error_description` (%x20-21 / %x23-5B /
/// %x5D-7E). Backslash-escaping a quote would still put a forbidden character on the wire, so
/// `"` becomes `'` and `\` becomes `/`; control and non-ASCII characters are dropped.
pub(crate) fn sanitize_description(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            '"' => Some('\''),
            '\\' => Some('/'),
            ' '..='~' => Some(c),
            _ => None,
        })
        .collect()
}

/// Why an issuer's settings were rejected.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No issuer was configured.
    #[error("no issuer is configured")]
    NoIssuers,
    /// The same issuer appears twice.
    #[error("issuer {0:?} is configured twice")]
    DuplicateIssuer(String),
    /// A setting is out of range or inconsistent.
    #[error("issuer {issuer:?}: {reason}")]
    Invalid {
        /// The issuer whose settings are wrong.
        issuer: String,
        /// What is wrong.
        reason: String,
    },
    /// The CA file could not be read.
    #[error("issuer {issuer:?}: reading CA file {path}: {source}")]
    CaFile {
        /// The issuer whose CA file failed.
        issuer: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA file holds no usable PEM certificate.
    #[error("issuer {issuer:?}: CA file {path} holds no usable PEM certificate")]
    CaParse {
        /// The issuer whose CA file failed.
        issuer: String,
        /// The file.
        path: PathBuf,
    },
    /// The HTTP client could not be built.
    #[error("issuer {issuer:?}: building the HTTP client: {source}")]
    HttpClient {
        /// The issuer whose client failed.
        issuer: String,
        /// The client error.
        source: reqwest::Error,
    },
}

/// Why fetching an issuer's discovery document or key set failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The request failed (connection, TLS, timeout, redirect policy).
    #[error("GET {url}: {source}")]
    Http {
        /// The URL requested.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The server answered with a non-success status.
    #[error("GET {url}: HTTP status {status}")]
    Status {
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The body is larger than idgate accepts.
    #[error("GET {url}: the response is larger than {max} bytes")]
    TooLarge {
        /// The URL requested.
        url: String,
        /// The limit, in bytes.
        max: usize,
    },
    /// The body is not the JSON document expected.
    #[error("GET {url}: unexpected document: {source}")]
    Json {
        /// The URL requested.
        url: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The discovery document names another issuer (OIDC Discovery §4.3).
    #[error("the discovery document names issuer {found:?}, expected {expected:?}")]
    IssuerMismatch {
        /// The configured issuer.
        expected: String,
        /// The issuer the document names.
        found: String,
    },
    /// A URL (the `jwks_uri`, a redirect target) is not acceptable.
    #[error("URL {url:?} is not allowed: {reason}")]
    UrlNotAllowed {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// The key set holds no key idgate could verify with; the previous keys are kept.
    #[error("the key set at {url} holds no usable signing key")]
    NoUsableKeys {
        /// The URL of the key set.
        url: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_token_challenge_has_no_error_code() {
        assert_eq!(
            VerifyError::MissingToken.www_authenticate(),
            "Bearer realm=\"idgate\""
        );
    }

    #[test]
    fn challenge_names_invalid_token_with_fixed_description() {
        assert_eq!(
            VerifyError::Expired.www_authenticate(),
            "Bearer realm=\"idgate\", error=\"invalid_token\", \
             error_description=\"the token has expired\""
        );
        assert_eq!(VerifyError::Expired.http_status(), 401);
        assert_eq!(VerifyError::IdpUnavailable.http_status(), 503);
    }

    #[test]
    fn description_keeps_only_rfc6750_characters() {
        assert_eq!(sanitize_description("a\"b\\c\r\nd\u{e9}e"), "a'b/cde");
    }

    #[test]
    fn every_challenge_is_header_safe() {
        let all = [
            VerifyError::TokenTooLarge { max: 8192 },
            VerifyError::Malformed("header is not base64url"),
            VerifyError::UnsupportedHeader,
            VerifyError::AlgNotAllowed,
            VerifyError::MissingKid,
            VerifyError::UnknownKid,
            VerifyError::KeyMismatch,
            VerifyError::BadSignature,
            VerifyError::Expired,
            VerifyError::NotYetValid,
            VerifyError::IssuedInFuture,
            VerifyError::WrongIssuer,
            VerifyError::WrongAudience,
            VerifyError::MissingExp,
            VerifyError::MissingClaim,
            VerifyError::WrongTyp,
            VerifyError::UnknownIssuer,
            VerifyError::IdpUnavailable,
        ];
        let mut reasons = std::collections::HashSet::new();
        for e in &all {
            assert!(
                reasons.insert(e.reason()),
                "duplicate reason {}",
                e.reason()
            );
            let h = e.www_authenticate();
            let description = h
                .split_once("error_description=\"")
                .and_then(|(_, rest)| rest.strip_suffix('"'))
                .unwrap_or_else(|| panic!("no description in {h}"));
            assert!(!description.is_empty());
            assert!(
                description
                    .chars()
                    .all(|c| matches!(c, ' '..='!' | '#'..='[' | ']'..='~')),
                "{h}"
            );
        }
    }
}
