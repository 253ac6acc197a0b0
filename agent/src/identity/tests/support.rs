//! Test fixtures: signing keys generated at run time, hand-built tokens (so that tests can forge
//! what a real library refuses to produce), and a real IdP on 127.0.0.1 that serves discovery and
//! the key set and counts requests.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{KeySize, PublicKeyComponents},
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
        RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair,
    },
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

pub(crate) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// A signing key with its key id and public JWK.
pub(crate) struct TestKey {
    pub(crate) kid: String,
    signer: Signer,
}

impl TestKey {
    pub(crate) fn rsa(kid: &str) -> Self {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation");
        Self {
            kid: kid.into(),
            signer: Signer::Rsa(key),
        }
    }

    pub(crate) fn es256(kid: &str) -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("P-256 key");
        Self {
            kid: kid.into(),
            signer: Signer::Ec(key),
        }
    }

    pub(crate) fn ed25519(kid: &str) -> Self {
        let key = Ed25519KeyPair::generate().expect("Ed25519 key");
        Self {
            kid: kid.into(),
            signer: Signer::Ed(key),
        }
    }

    /// The algorithm this key signs with by default.
    pub(crate) fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
            Signer::Ed(_) => "EdDSA",
        }
    }

    /// The public JWK, with extra members merged in (`alg`, `use`, ...).
    pub(crate) fn jwk_with(&self, extra: Value) -> Value {
        let mut jwk = match &self.signer {
            Signer::Rsa(k) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                json!({"kty": "RSA", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(k) => {
                let point = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            Signer::Ed(k) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key())}),
        };
        let o = jwk.as_object_mut().unwrap();
        o.insert("kid".into(), self.kid.clone().into());
        if let Value::Object(extra) = extra {
            o.extend(extra);
        }
        jwk
    }

    pub(crate) fn jwk(&self) -> Value {
        self.jwk_with(json!({}))
    }

    /// The RSA public key as DER (SubjectPublicKeyInfo), what a confused verifier would use as
    /// an HMAC secret.
    pub(crate) fn rsa_public_der(&self) -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer as _;
        match &self.signer {
            Signer::Rsa(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
            _ => panic!("not an RSA key"),
        }
    }

    /// Signs `input` with `alg` (which must suit the key).
    pub(crate) fn sign(&self, alg: &str, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match (&self.signer, alg) {
            (Signer::Rsa(k), "RS256" | "PS256") => {
                let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = if alg == "RS256" {
                    &RSA_PKCS1_SHA256
                } else {
                    &RSA_PSS_SHA256
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(padding, &rng, input, &mut sig).unwrap();
                sig
            }
            (Signer::Ec(k), "ES256") => k.sign(&rng, input).unwrap().as_ref().to_vec(),
            (Signer::Ed(k), "EdDSA") => k.sign(input).as_ref().to_vec(),
            _ => panic!("{alg} does not suit this key"),
        }
    }

    /// A token with this key's default algorithm and kid.
    pub(crate) fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"alg": self.alg(), "kid": self.kid, "typ": "at+jwt"}),
            claims,
        )
    }

    /// A token with an arbitrary header, signed with the header's `alg`.
    pub(crate) fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let alg = header["alg"].as_str().unwrap_or(self.alg());
        let sig = self.sign(alg, input.as_bytes());
        format!("{input}.{}", b64(sig))
    }
}

/// Joins encoded parts with an HMAC-SHA256 signature under `secret`.
pub(crate) fn hs256_token(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// Claims of a valid access token for `issuer`, audience `idgate`.
pub(crate) fn claims(issuer: &str) -> Value {
    let now = now_secs();
    json!({
        "iss": issuer,
        "aud": "idgate",
        "sub": "user-1",
        "exp": now + 300,
        "iat": now,
        "nbf": now,
        "client_id": "cli",
    })
}

struct IdpState {
    discovery_issuer: Mutex<String>,
    jwks_uri: Mutex<String>,
    jwks: Mutex<String>,
    discovery_hits: AtomicUsize,
    jwks_hits: AtomicUsize,
}

/// An IdP on an ephemeral loopback port. Dropping it (or `stop`) closes the listener and every
/// open connection, as a crashed IdP would.
pub(crate) struct TestIdp {
    pub(crate) issuer: String,
    pub(crate) base: String,
    state: Arc<IdpState>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestIdp {
    /// A plain-HTTP IdP serving `keys`.
    pub(crate) async fn start(keys: &[&TestKey]) -> Self {
        Self::start_inner(keys, None).await
    }

    /// An HTTPS IdP with a certificate for 127.0.0.1 from a fresh CA; returns the CA's PEM file.
    pub(crate) async fn start_tls(keys: &[&TestKey]) -> (Self, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "idgate test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();

        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ca_file = std::env::temp_dir().join(format!(
            "idgate-test-ca-{}-{}.pem",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        let idp = Self::start_inner(keys, Some(TlsAcceptor::from(Arc::new(config)))).await;
        (idp, ca_file)
    }

    async fn start_inner(keys: &[&TestKey], tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{addr}");
        let issuer = format!("{base}/realms/test");
        let state = Arc::new(IdpState {
            discovery_issuer: Mutex::new(issuer.clone()),
            jwks_uri: Mutex::new(format!("{base}/realms/test/certs")),
            jwks: Mutex::new(jwks(keys).to_string()),
            discovery_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
        });
        let serve_state = state.clone();
        let task = tokio::spawn(async move {
            // Owned here so that aborting this task drops every connection with the listener.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = serve_state.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(route(&state, &req)) }
                    });
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let io = TokioIo::new(stream);
                                let _ = http1::Builder::new().serve_connection(io, service).await;
                            }
                        }
                        None => {
                            let io = TokioIo::new(stream);
                            let _ = http1::Builder::new().serve_connection(io, service).await;
                        }
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            issuer,
            base,
            state,
            task: Some(task),
        }
    }

    /// Serves `keys` from now on.
    pub(crate) fn set_keys(&self, keys: &[&TestKey]) {
        self.set_jwks(jwks(keys));
    }

    /// Serves this document as the key set.
    pub(crate) fn set_jwks(&self, document: Value) {
        *self.state.jwks.lock().unwrap() = document.to_string();
    }

    /// Makes discovery name another issuer.
    pub(crate) fn set_discovery_issuer(&self, issuer: &str) {
        *self.state.discovery_issuer.lock().unwrap() = issuer.to_owned();
    }

    /// Makes discovery point at another key set URL.
    pub(crate) fn set_jwks_uri(&self, uri: &str) {
        *self.state.jwks_uri.lock().unwrap() = uri.to_owned();
    }

    pub(crate) fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    pub(crate) fn discovery_hits(&self) -> usize {
        self.state.discovery_hits.load(Ordering::SeqCst)
    }

    /// Stops serving and waits until the listener and connections are gone.
    pub(crate) async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn jwks(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

fn route(state: &IdpState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let body = if path == "/realms/test/.well-known/openid-configuration" {
        state.discovery_hits.fetch_add(1, Ordering::SeqCst);
        json!({
            "issuer": *state.discovery_issuer.lock().unwrap(),
            "jwks_uri": *state.jwks_uri.lock().unwrap(),
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        })
        .to_string()
    } else if path == "/realms/test/certs" {
        state.jwks_hits.fetch_add(1, Ordering::SeqCst);
        state.jwks.lock().unwrap().clone()
    } else {
        let mut not_found = Response::new(Full::new(Bytes::from_static(b"not found")));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return not_found;
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    response
}

/// Polls `check` until it holds or `within` has passed; returns whether it held.
pub(crate) async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
