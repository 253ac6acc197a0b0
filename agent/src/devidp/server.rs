//! The dev IdP's HTTP side: routing under the issuer's path, discovery, the key set, the token
//! endpoint (RFC 6749 §4.4 with the errors of §5.2) and key rotation.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{constant_time::verify_slices_are_equal, rand::SecureRandom as _};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use url::{Url, form_urlencoded};

use super::{
    DevIdpError,
    config::{Client, DevIdpConfig},
    keys::{KeyRing, SigningAlg},
};

/// Largest token request body read; a client credentials request is a few hundred bytes.
const MAX_BODY: usize = 16 * 1024;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The `WWW-Authenticate` challenge sent with `invalid_client`.
const CHALLENGE: &str = "Basic realm=\"idgate dev-idp\"";

type Body = Full<Bytes>;

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) issuer: String,
    /// The issuer without a trailing slash: endpoint URLs are this plus their path.
    base: String,
    /// The issuer's path without a trailing slash (empty at the root): routes live under it.
    prefix: String,
    pub(crate) config: DevIdpConfig,
    pub(crate) alg: SigningAlg,
    keys: RwLock<KeyRing>,
    pub(crate) allow_rotate: bool,
    pub(crate) grace: Duration,
}

/// The outcome of one rotation.
#[derive(Debug)]
pub(crate) struct Rotation {
    pub(crate) kid: String,
    pub(crate) previous: String,
}

impl State {
    /// Shared state for an issuer already checked by the caller.
    pub(crate) fn new(
        issuer: String,
        config: DevIdpConfig,
        alg: SigningAlg,
        keys: KeyRing,
        allow_rotate: bool,
        grace: Duration,
    ) -> Self {
        let prefix = Url::parse(&issuer)
            .map(|u| u.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        Self {
            base: issuer.trim_end_matches('/').to_owned(),
            issuer,
            prefix,
            config,
            alg,
            keys: RwLock::new(keys),
            allow_rotate,
            grace,
        }
    }

    /// The URL of an endpoint (`path` starts with `/`).
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The key ring; writers only swap keys in and out, so a poisoned lock is still consistent.
    pub(crate) fn keys(&self) -> RwLockReadGuard<'_, KeyRing> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn discovery(&self) -> Value {
        let mut scopes: Vec<&str> = Vec::new();
        for s in self.config.clients.iter().flat_map(|c| &c.scopes) {
            if !scopes.contains(&s.as_str()) {
                scopes.push(s);
            }
        }
        // Only what this server does: no authorization endpoint, so no response types.
        json!({
            "issuer": self.issuer,
            "jwks_uri": self.url("/jwks"),
            "token_endpoint": self.url("/token"),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "id_token_signing_alg_values_supported": [self.alg.name()],
            "scopes_supported": scopes,
            "subject_types_supported": ["public"],
            "claims_supported": [
                "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "groups", "scope",
            ],
        })
    }
}

/// Accepts connections until the task is aborted; aborting drops every open connection too.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "dev-idp: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req, peer).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "dev-idp: connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn route(state: &State, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let Some(path) = req.uri().path().strip_prefix(state.prefix.as_str()) else {
        return status_only(StatusCode::NOT_FOUND);
    };
    let get = req.method() == Method::GET;
    let post = req.method() == Method::POST;
    match path {
        "/.well-known/openid-configuration" if get => {
            json_response(StatusCode::OK, &state.discovery())
        }
        "/jwks" if get => json_response(StatusCode::OK, &state.keys().jwks(Instant::now())),
        "/token" if post => match token(state, req, peer).await {
            Ok(body) => {
                let mut response = json_response(StatusCode::OK, &body);
                no_store(&mut response);
                response
            }
            Err(e) => e.response(),
        },
        "/rotate" if post && state.allow_rotate => match rotate(state).await {
            Ok(r) => {
                let body = json!({
                    "kid": r.kid,
                    "previous": r.previous,
                    "grace_seconds": state.grace.as_secs(),
                });
                json_response(StatusCode::OK, &body)
            }
            Err(e) => {
                tracing::error!(error = %e, "dev-idp: rotation failed");
                OAuthError::ServerError.response()
            }
        },
        "/.well-known/openid-configuration" | "/jwks" => method_not_allowed("GET"),
        "/token" => method_not_allowed("POST"),
        "/rotate" if state.allow_rotate => method_not_allowed("POST"),
        _ => status_only(StatusCode::NOT_FOUND),
    }
}

/// Replaces the signing key; the previous one stays published for the grace period.
pub(crate) async fn rotate(state: &State) -> Result<Rotation, DevIdpError> {
    let key = super::generate(state.alg).await?;
    let kid = key.kid.clone();
    let previous = {
        let mut ring = state.keys.write().unwrap_or_else(|p| p.into_inner());
        let previous = ring.active().kid.clone();
        ring.rotate(key, state.grace, Instant::now());
        previous
    };
    tracing::warn!(%kid, %previous, grace_seconds = state.grace.as_secs(),
        "dev-idp: signing key rotated; the previous key stays published for the grace period");
    Ok(Rotation { kid, previous })
}

/// RFC 6749 §5.2 errors, with fixed descriptions: nothing the client sent is echoed back.
#[derive(Debug, PartialEq, Eq)]
enum OAuthError {
    InvalidRequest(&'static str),
    InvalidClient(&'static str),
    UnsupportedGrantType,
    InvalidScope,
    ServerError,
}

impl OAuthError {
    fn response(&self) -> Response<Body> {
        let (status, code, description) = match self {
            Self::InvalidRequest(d) => (StatusCode::BAD_REQUEST, "invalid_request", *d),
            Self::InvalidClient(d) => (StatusCode::UNAUTHORIZED, "invalid_client", *d),
            Self::UnsupportedGrantType => (
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only the client_credentials grant is supported",
            ),
            Self::InvalidScope => (
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "a requested scope is not allowed for this client",
            ),
            Self::ServerError => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the token could not be issued",
            ),
        };
        let mut response = json_response(
            status,
            &json!({"error": code, "error_description": description}),
        );
        if status == StatusCode::UNAUTHORIZED {
            // §5.2: required when the client tried the Authorization header, harmless otherwise.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(CHALLENGE),
            );
        }
        no_store(&mut response);
        response
    }
}

/// The token request: checks it, authenticates the client, and returns the RFC 6749 §5.1 body.
async fn token(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Value, OAuthError> {
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(OAuthError::InvalidRequest(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let basic = match req.headers().get(header::AUTHORIZATION) {
        Some(value) => basic_credentials(value)?,
        None => None,
    };
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| OAuthError::InvalidRequest("the body is unreadable or too large"))?
        .to_bytes();
    let params = parameters(&body)?;

    match params.get("grant_type").map(String::as_str) {
        None => return Err(OAuthError::InvalidRequest("grant_type is missing")),
        Some("client_credentials") => {}
        Some(_) => return Err(OAuthError::UnsupportedGrantType),
    }
    let (client_id, secret, method) =
        match (basic, params.get("client_id"), params.get("client_secret")) {
            (Some(_), _, Some(_)) => {
                return Err(OAuthError::InvalidRequest(
                    "use one client authentication method, not both",
                ));
            }
            (Some((id, _)), Some(form_id), None) if *form_id != id => {
                return Err(OAuthError::InvalidRequest(
                    "client_id differs from the authenticated client",
                ));
            }
            (Some((id, secret)), _, None) => (id, secret, "client_secret_basic"),
            (None, Some(id), Some(secret)) => (id.clone(), secret.clone(), "client_secret_post"),
            (None, Some(_), None) => {
                return Err(OAuthError::InvalidClient("the client sent no secret"));
            }
            (None, None, _) => return Err(OAuthError::InvalidClient("no client authentication")),
        };
    // Debug-formatted where the value is the client's: quoting keeps it from forging log lines.
    let Some(client) = authenticate(&state.config, &client_id, &secret) else {
        tracing::warn!(%peer, ?client_id, method, "dev-idp: client authentication failed");
        return Err(OAuthError::InvalidClient("client authentication failed"));
    };
    let requested = params.get("scope").map(String::as_str);
    let scopes = granted_scopes(client, requested).inspect_err(|_| {
        tracing::info!(%peer, %client_id, ?requested, "dev-idp: scope refused");
    })?;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let lifetime = client.token_lifetime.as_secs();
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut jti)
        .map_err(|_| OAuthError::ServerError)?;
    let audience = match client.audiences.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    let mut claims = json!({
        "iss": state.issuer,
        "sub": client.subject,
        "aud": audience,
        "exp": now + lifetime,
        "iat": now,
        "nbf": now,
        "jti": URL_SAFE_NO_PAD.encode(jti),
        "client_id": client.client_id,
        "groups": client.groups,
    });
    if !scopes.is_empty() {
        claims["scope"] = scopes.join(" ").into();
    }
    let key = state.keys().active();
    let access_token = key.sign_jwt(&claims).map_err(|_| {
        tracing::error!(kid = %key.kid, "dev-idp: signing failed");
        OAuthError::ServerError
    })?;
    tracing::info!(%peer, %client_id, sub = %client.subject, kid = %key.kid, method,
        expires_in = lifetime, "dev-idp: issued an access token");
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": lifetime,
    });
    if !scopes.is_empty() {
        body["scope"] = scopes.join(" ").into();
    }
    Ok(body)
}

/// HTTP Basic client credentials (RFC 6749 §2.3.1: both parts form-urlencoded, then base64).
/// Another scheme is no Basic credentials; a broken Basic header fails authentication.
fn basic_credentials(value: &HeaderValue) -> Result<Option<(String, String)>, OAuthError> {
    const BROKEN: OAuthError = OAuthError::InvalidClient("malformed Basic credentials");
    let value = value.to_str().map_err(|_| BROKEN)?.trim();
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| BROKEN)?;
    let decoded = String::from_utf8(decoded).map_err(|_| BROKEN)?;
    let (id, secret) = decoded.split_once(':').ok_or(BROKEN)?;
    Ok(Some((form_decode(id), form_decode(secret))))
}

/// Decodes one form-urlencoded value (`+` is a space, `%XX` a byte).
fn form_decode(value: &str) -> String {
    form_urlencoded::parse(
        format!("v={}", value.replace('&', "%26").replace('=', "%3D")).as_bytes(),
    )
    .next()
    .map(|(_, v)| v.into_owned())
    .unwrap_or_default()
}

/// The request parameters; empty ones count as absent (RFC 6749 §3.2), repeated ones are an
/// error (§3.2 too).
fn parameters(body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let mut params = HashMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if value.is_empty() {
            continue;
        }
        if params
            .insert(name.into_owned(), value.into_owned())
            .is_some()
        {
            return Err(OAuthError::InvalidRequest("a parameter is repeated"));
        }
    }
    Ok(params)
}

/// The client with this id and secret; the secret is compared in constant time.
fn authenticate<'c>(config: &'c DevIdpConfig, client_id: &str, secret: &str) -> Option<&'c Client> {
    config
        .client(client_id)
        .filter(|c| verify_slices_are_equal(c.client_secret.as_bytes(), secret.as_bytes()).is_ok())
}

/// The scopes to grant: all the client's when it asks for none, else exactly those asked for,
/// each of which must be allowed (RFC 6749 §3.3).
fn granted_scopes(client: &Client, requested: Option<&str>) -> Result<Vec<String>, OAuthError> {
    let Some(requested) = requested else {
        return Ok(client.scopes.clone());
    };
    let mut granted: Vec<String> = Vec::new();
    for scope in requested.split(' ').filter(|s| !s.is_empty()) {
        if !client.scopes.iter().any(|s| s == scope) {
            return Err(OAuthError::InvalidScope);
        }
        if !granted.iter().any(|s| s == scope) {
            granted.push(scope.to_owned());
        }
    }
    Ok(granted)
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// RFC 6749 §5.1: token responses must not be cached.
fn no_store(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = status_only(StatusCode::METHOD_NOT_ALLOWED);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(scopes: &[&str]) -> Client {
        Client {
            client_id: "c".into(),
            client_secret: "s".into(),
            subject: "c".into(),
            groups: vec![],
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            audiences: vec!["a".into()],
            token_lifetime: Duration::from_secs(60),
        }
    }

    #[test]
    fn scopes_default_to_all_and_must_be_allowed() {
        let c = client(&["ssh", "metrics"]);
        assert_eq!(granted_scopes(&c, None).unwrap(), ["ssh", "metrics"]);
        assert_eq!(
            granted_scopes(&c, Some("metrics  metrics")).unwrap(),
            ["metrics"]
        );
        assert!(granted_scopes(&c, Some("")).unwrap().is_empty());
        assert_eq!(
            granted_scopes(&c, Some("ssh admin")),
            Err(OAuthError::InvalidScope)
        );
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let header =
            |raw: &str| HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(raw))).unwrap();
        assert_eq!(
            basic_credentials(&header("my%20client:p%3Ass+word%26")).unwrap(),
            Some(("my client".into(), "p:ss word&".into()))
        );
        assert_eq!(
            basic_credentials(&header("id:a=b&c")).unwrap(),
            Some(("id".into(), "a=b&c".into())),
            "raw reserved characters survive"
        );
        assert_eq!(
            basic_credentials(&HeaderValue::from_static("Bearer abc")).unwrap(),
            None
        );
        for broken in ["Basic !!!", "Basic bm9jb2xvbg=="] {
            assert_eq!(
                basic_credentials(&HeaderValue::from_static(broken)),
                Err(OAuthError::InvalidClient("malformed Basic credentials")),
                "{broken}"
            );
        }
    }

    #[test]
    fn repeated_parameters_are_refused_and_empty_ones_ignored() {
        let p = parameters(b"grant_type=client_credentials&scope=&client_id=x").unwrap();
        assert_eq!(p.len(), 2);
        assert!(!p.contains_key("scope"));
        assert_eq!(
            parameters(b"scope=a&scope=b"),
            Err(OAuthError::InvalidRequest("a parameter is repeated"))
        );
    }
}
