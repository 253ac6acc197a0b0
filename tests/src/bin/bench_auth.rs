//! `cargo xtask bench auth`: what authentication costs, in one run.
//!
//! 1. Verifications per second on one core, for RS256, ES256 and EdDSA tokens from idgate's own
//!    dev IdP: idgate's `Verifier::verify` (every RFC 8725 / RFC 9068 check, key lookup by kid)
//!    next to bare `jsonwebtoken::decode` of the same token with the same key, audience and issuer.
//! 2. Login to first accepted SYN: the daemon in a network namespace (native XDP on veth), a client
//!    in another; the time from sending `POST /v1/sessions` to the protected port's TCP handshake
//!    completing, p50 and p99 over many logins (each followed by a logout).

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use idgate::{
    devidp::{DevIdp, DevIdpConfig, EXAMPLE, Options, SigningAlg},
    identity::{Algorithm, IssuerSettings, Verifier},
};
use idgate_tests::{
    daemon::{Daemon, ENDPOINT, Hello, PROTECTED, config},
    idp::{Issuer, TestCa, TestIdp},
    netns::{Pair, unique_id},
};
use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};
use serde_json::Value;

struct Plan {
    verifications: u32,
    runs: usize,
    logins: usize,
}

fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_none() {
        // The daemon's audit lines (one per login and logout) would bury the figures.
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    let smoke = std::env::args().any(|a| a == "--smoke");
    let plan = if smoke {
        Plan {
            verifications: 200,
            runs: 1,
            logins: 10,
        }
    } else {
        Plan {
            verifications: 20_000,
            runs: 5,
            logins: 300,
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "idgate auth benchmark: {} verifications per run, median of {} runs, one core",
        plan.verifications, plan.runs
    );
    println!(
        "{:<7} {:>14} {:>14} {:>8}",
        "alg", "idgate /s", "jsonwebtoken /s", "ratio"
    );
    for alg in [SigningAlg::Rs256, SigningAlg::Es256, SigningAlg::EdDsa] {
        let (ours, bare) = runtime.block_on(verify_rates(alg, &plan))?;
        println!(
            "{:<7} {ours:>14.0} {bare:>14.0} {:>7.2}x",
            format!("{alg:?}"),
            bare / ours
        );
    }
    println!("# ratio: time per verification in idgate's path / bare jsonwebtoken (goal ≤ 1.2)");
    login_to_syn(&plan)
}

/// (idgate verifications/s, bare jsonwebtoken decodes/s) for one token of `alg`.
async fn verify_rates(alg: SigningAlg, plan: &Plan) -> Result<(f64, f64)> {
    let idp = DevIdp::start(
        DevIdpConfig::parse(EXAMPLE).map_err(anyhow::Error::msg)?,
        Options {
            listen: "127.0.0.1:0".parse()?,
            alg,
            ..Options::default()
        },
    )
    .await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let answer: Value = http
        .post(idp.token_endpoint())
        .basic_auth("alice", Some("alice-dev-secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await?
        .json()
        .await?;
    let token = answer["access_token"]
        .as_str()
        .context("no access token")?
        .to_owned();
    let algorithm = match alg {
        SigningAlg::Rs256 => Algorithm::RS256,
        SigningAlg::Es256 => Algorithm::ES256,
        SigningAlg::EdDsa => Algorithm::EdDSA,
    };

    let mut settings = IssuerSettings::new(idp.issuer(), ["api://idgate"]);
    settings.algorithms = vec![algorithm];
    settings.require_typ_at_jwt = true;
    let verifier = Verifier::new([settings])?;
    for (issuer, result) in verifier.refresh_all().await {
        result.with_context(|| format!("fetching the keys of {issuer}"))?;
    }
    let verified = verifier.verify(&token).await?;
    ensure!(verified.user == "alice", "verified as {}", verified.user);

    // The bare library, given what idgate is given: the key from the same JWKS, the same
    // audience and issuer checks.
    let jwks: JwkSet = http
        .get(format!("{}/jwks", idp.issuer()))
        .send()
        .await?
        .json()
        .await?;
    let key = DecodingKey::from_jwk(jwks.keys.first().context("empty key set")?)?;
    let mut validation = Validation::new(algorithm);
    validation.set_audience(&["api://idgate"]);
    validation.set_issuer(&[idp.issuer()]);
    jsonwebtoken::decode::<Value>(&token, &key, &validation)?;

    let ours = median(plan.runs, || async {
        let start = Instant::now();
        for _ in 0..plan.verifications {
            std::hint::black_box(verifier.verify(std::hint::black_box(&token)).await?);
        }
        Ok(plan.verifications as f64 / start.elapsed().as_secs_f64())
    })
    .await?;
    let bare = median(plan.runs, || async {
        let start = Instant::now();
        for _ in 0..plan.verifications {
            std::hint::black_box(jsonwebtoken::decode::<Value>(
                std::hint::black_box(&token),
                &key,
                &validation,
            )?);
        }
        Ok(plan.verifications as f64 / start.elapsed().as_secs_f64())
    })
    .await?;
    idp.shutdown().await;
    Ok((ours, bare))
}

async fn median<F, Fut>(runs: usize, mut f: F) -> Result<f64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<f64>>,
{
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        v.push(f().await?);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// p50/p99 from `POST /v1/sessions` to the first completed handshake on the protected port.
fn login_to_syn(plan: &Plan) -> Result<()> {
    let pair = Pair::new()?;
    let ca = TestCa::new()?;
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca)?;
    let _hello = Hello::start(&pair.srv, SocketAddr::new(srv, PROTECTED))?;
    let cert = ca.server_cert("endpoint", srv)?;
    let socket = ca
        .dir()
        .join(format!("bench-{}", unique_id()))
        .join("admin.sock");
    let daemon = Daemon::start(&pair.srv, &config(&pair, &idp, &cert, &socket))?;
    let token = pair
        .srv
        .run_in(|| idp.mint("alice", &["web"], Duration::from_secs(3600)))?;
    let ca_pem = ca.ca_pem();
    let protected = SocketAddr::new(srv, PROTECTED);
    let url = format!("https://{srv}:{ENDPOINT}/v1/sessions");

    let mut samples = pair.cli.run_in(|| -> Result<Vec<Duration>> {
        let client = reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut samples = Vec::with_capacity(plan.logins);
        for _ in 0..plan.logins {
            let start = Instant::now();
            let status = client.post(&url).bearer_auth(&token).send()?.status();
            ensure!(status.is_success(), "login answered {status}");
            // The endpoint answers once the session is in the map: this SYN is the first one.
            TcpStream::connect_timeout(&protected, Duration::from_secs(1))
                .context("the protected port after a successful login")?;
            samples.push(start.elapsed());
            let status = client.delete(&url).bearer_auth(&token).send()?.status();
            ensure!(status.is_success(), "logout answered {status}");
        }
        Ok(samples)
    })?;
    daemon.stop()?;
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "login → first accepted SYN over {} logins: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         (HTTPS, a new TLS connection per login; goal p99 ≤ 1 ms)",
        samples.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    Ok(())
}
