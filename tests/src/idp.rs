//! Token issuers for the session-layer suite, behind one trait so that a scenario runs against
//! any of them: [`TestIdp`] (in-process, keys made at run time, serves discovery and JWKS over
//! HTTPS) here, and a real provider such as node-oidc-provider ([`crate::oidc`]) through an
//! adapter.
//!
//! Also [`TestCa`]: a throw-away CA issuing server certificates for IP addresses, for the IdP and
//! for idgate's session endpoint.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{KeySize, PublicKeyComponents},
    signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::aws_lc_rs::default_provider,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

use crate::netns::{NetNs, unique_id};

/// What a scenario needs of an identity provider.
pub trait Issuer: Send + Sync {
    /// The issuer URL, exactly as tokens carry it in `iss`.
    fn issuer(&self) -> &str;
    /// The `[[issuers]]` table for idgate's configuration (audiences, CA file, group claims).
    fn config_toml(&self) -> String;
    /// An access token for `user` with these groups, valid for `ttl` from now. An issuer whose
    /// clients are fixed (a real provider) maps `user` to one of them and checks the groups.
    /// Blocking; call it from a thread that can reach the issuer.
    fn mint(&self, user: &str, groups: &[&str], ttl: Duration) -> Result<String>;
    /// Rotates the signing key if this issuer can; `Ok(false)` if it cannot. Blocking.
    fn rotate_keys(&self) -> Result<bool> {
        Ok(false)
    }
}

/// A CA whose certificates live in a temporary directory, deleted on drop.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

/// A server certificate and key, as PEM files.
#[derive(Clone, Debug)]
pub struct ServerCert {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// The same certificate, DER.
    pub cert_der: Vec<u8>,
    /// The same key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// A fresh CA; its certificate is written to [`TestCa::ca_file`].
    pub fn new() -> Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "idgate session-test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key)?;
        let dir =
            std::env::temp_dir().join(format!("idgate-ca-{}-{}", std::process::id(), unique_id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("ca.pem"), issuer.pem())?;
        Ok(TestCa { issuer, dir })
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA certificate (PEM text).
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `ip`, written as `<name>.pem` and `<name>-key.pem`.
    pub fn server_cert(&self, name: &str, ip: IpAddr) -> Result<ServerCert> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
        let cert = params.signed_by(&key, &self.issuer)?;
        let out = ServerCert {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        };
        std::fs::write(&out.cert, cert.pem())?;
        std::fs::write(&out.key, key.serialize_pem())?;
        Ok(out)
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The audience [`TestIdp`] tokens carry.
pub const TEST_AUDIENCE: &str = "idgate";

/// An IdP serving OIDC discovery and its key set over HTTPS from a thread inside a namespace;
/// mints RS256 tokens itself. Stops (and joins its thread) on drop.
pub struct TestIdp {
    issuer: String,
    ca_file: PathBuf,
    key: RsaKeyPair,
    kid: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestIdp {
    /// Starts serving on `addr` (port 0: any) in `ns`, with a certificate from `ca`.
    pub fn start(ns: &NetNs, addr: SocketAddr, ca: &TestCa) -> Result<TestIdp> {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).context("generating the RSA key")?;
        let kid = format!("k{}", unique_id());
        let cert = ca.server_cert("idp", addr.ip())?;
        let tls = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
            )?;
        let listener = ns
            .run_in(|| std::net::TcpListener::bind(addr))
            .with_context(|| format!("binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        let host = match bound.ip() {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let issuer = format!("https://{host}:{}/realms/test", bound.port());
        let c = PublicKeyComponents::<Vec<u8>>::from(key.public_key());
        let jwks = json!({"keys": [{
            "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": b64(&c.n), "e": b64(&c.e),
        }]})
        .to_string();
        let discovery = json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/certs"),
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let thread = thread::Builder::new()
            .name("test-idp".into())
            .spawn(move || serve(listener, acceptor, discovery, jwks, stopped))?;
        Ok(TestIdp {
            issuer,
            ca_file: ca.ca_file(),
            key,
            kid,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A token with exactly these claims (merged over `iss`, `aud`, `iat`).
    pub fn token_with(&self, claims: Value) -> String {
        let mut all = json!({"iss": self.issuer, "aud": TEST_AUDIENCE, "iat": now_secs()});
        if let (Some(a), Value::Object(extra)) = (all.as_object_mut(), claims) {
            a.extend(extra);
        }
        let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": self.kid});
        let input = format!("{}.{}", b64(header.to_string()), b64(all.to_string()));
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{input}.{}", b64(sig))
    }
}

impl Issuer for TestIdp {
    fn issuer(&self) -> &str {
        &self.issuer
    }

    fn config_toml(&self) -> String {
        format!(
            "[[issuers]]\nissuer = \"{}\"\naudiences = [\"{TEST_AUDIENCE}\"]\n\
             algorithms = [\"RS256\"]\nca_file = \"{}\"\ngroup_claims = [{{ path = \"groups\" }}]\n",
            self.issuer,
            self.ca_file.display()
        )
    }

    fn mint(&self, user: &str, groups: &[&str], ttl: Duration) -> Result<String> {
        Ok(self.token_with(json!({
            "sub": user,
            "groups": groups,
            "exp": now_secs() + ttl.as_secs(),
        })))
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    discovery: String,
    jwks: String,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the IdP's runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let docs = Arc::new((discovery, jwks));
        let accept = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, docs) = (acceptor.clone(), docs.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let docs = docs.clone();
                        async move { Ok::<_, Infallible>(route(&docs, &req)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        };
        tokio::select! {
            () = accept => {}
            _ = stopped => {}
        }
    });
}

fn route(docs: &(String, String), req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match req.uri().path() {
        "/realms/test/.well-known/openid-configuration" => docs.0.clone(),
        "/realms/test/certs" => docs.1.clone(),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
