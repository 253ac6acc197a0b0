//! idgate's token verifier against an independent OpenID provider (node-oidc-provider, see
//! `idgate_tests::oidc`): client-credentials JWT access tokens with a `groups` claim, key
//! rotation, and expiry, on loopback; and once inside a network namespace under a
//! non-loopback issuer (root). Needs Node.js and `cargo xtask setup`.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use idgate::identity::{IssuerSettings, VerifiedToken, Verifier, VerifyError};
use idgate_tests::{
    netns::{NetNs, unique_id},
    oidc::{DEFAULT_AUDIENCE, OidcClient, OidcProvider, ProviderOptions},
    run::require_root,
};
use serde_json::Value;
use tokio::runtime::Runtime;

/// Upper bound for polling on a condition (a token's expiry).
const DEADLINE: Duration = Duration::from_secs(15);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

/// Settings for the provider as a deployment would write them: audience, `groups`, `at+jwt`
/// required. No leeway, so that expiry is observed when it happens.
fn settings(provider: &OidcProvider) -> IssuerSettings {
    let mut s = IssuerSettings::new(provider.issuer(), [DEFAULT_AUDIENCE]);
    s.require_typ_at_jwt = true;
    s.leeway = Duration::ZERO;
    s
}

/// A verifier whose keys have been fetched once (through discovery).
fn ready_verifier(rt: &Runtime, settings: IssuerSettings) -> Verifier {
    let verifier = Verifier::new([settings]).expect("valid settings");
    for (issuer, result) in rt.block_on(verifier.refresh_all()) {
        result.unwrap_or_else(|e| panic!("{issuer}: {e}"));
    }
    verifier
}

fn header(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').next().unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url header");
    serde_json::from_slice(&json).expect("JSON header")
}

fn verify(rt: &Runtime, verifier: &Verifier, token: &str) -> Result<VerifiedToken, VerifyError> {
    rt.block_on(verifier.verify(token))
}

#[test]
fn client_credentials_tokens_verify_with_user_and_groups() -> Result<()> {
    let provider = OidcProvider::start(&ProviderOptions::loopback(vec![
        OidcClient::new("alice", &["engineering", "ssh-users"]).with_scope("ssh admin"),
        OidcClient::new("bob", &["ops"]),
    ]))?;
    let rt = runtime();
    let verifier = ready_verifier(&rt, settings(&provider));

    let token = provider.token_with_scope("alice", Some("ssh"))?;
    let h = header(&token);
    assert_eq!(h["typ"], "at+jwt", "{h}");
    assert_eq!(h["alg"], "ES256", "{h}");
    assert_eq!(h["kid"], provider.kid(), "{h}");
    let alice = verify(&rt, &verifier, &token)?;
    assert_eq!(&*alice.issuer, provider.issuer());
    assert_eq!(alice.user, "alice");
    assert_eq!(alice.subject, "alice");
    assert_eq!(alice.groups, ["engineering", "ssh-users"]);
    assert_eq!(alice.scopes, ["ssh"]);
    assert_eq!(alice.claims["client_id"], "alice");
    assert_eq!(alice.claims["aud"], DEFAULT_AUDIENCE);
    assert!(alice.expires_at > SystemTime::now());

    // Another client, other groups: the claim is per client, not a constant.
    let bob = verify(&rt, &verifier, &provider.token("bob")?)?;
    assert_eq!(bob.user, "bob");
    assert_eq!(bob.groups, ["ops"]);
    assert!(bob.scopes.is_empty(), "{:?}", bob.scopes);

    // The provider is a real one: a wrong secret gets no token.
    let refused = provider.request_token("alice", "not-the-secret", None)?;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(refused.body["error"], "invalid_client");

    // And the verifier is selective: the same token is refused for another audience.
    let elsewhere = ready_verifier(
        &rt,
        IssuerSettings {
            audiences: vec!["api://something-else".into()],
            ..settings(&provider)
        },
    );
    let e = verify(&rt, &elsewhere, &token).unwrap_err();
    assert_eq!(e.reason(), "wrong_audience");
    Ok(())
}

#[test]
fn every_signing_algorithm_verifies() -> Result<()> {
    for alg in ["RS256", "EdDSA"] {
        let provider = OidcProvider::start(&ProviderOptions {
            alg: alg.to_owned(),
            ..ProviderOptions::loopback(vec![OidcClient::new("carol", &["dev"])])
        })?;
        let rt = runtime();
        let verifier = ready_verifier(&rt, settings(&provider));
        let token = provider.token("carol")?;
        assert_eq!(header(&token)["alg"], alg);
        let carol = verify(&rt, &verifier, &token)
            .unwrap_or_else(|e| panic!("{alg}: {e}; provider stderr:\n{}", provider.stderr()));
        assert_eq!(
            (carol.user.as_str(), carol.groups.as_slice()),
            ("carol", &["dev".to_owned()][..])
        );
    }
    Ok(())
}

#[test]
fn a_rotated_key_is_fetched_on_its_first_token_and_the_old_one_still_verifies() -> Result<()> {
    let mut provider = OidcProvider::start(&ProviderOptions::loopback(vec![OidcClient::new(
        "alice",
        &["engineering"],
    )]))?;
    let rt = runtime();
    let verifier = ready_verifier(&rt, settings(&provider));
    let old_kid = provider.kid().to_owned();
    let before = provider.token("alice")?;
    verify(&rt, &verifier, &before)?;

    let new_kid = provider.rotate()?;
    assert_ne!(new_kid, old_kid);
    let after = provider.token("alice")?;
    assert_eq!(header(&after)["kid"], new_kid.as_str());
    let stats = |v: &Verifier| v.stats().remove(0);
    assert_eq!(stats(&verifier).unknown_kid_refetches, 0);

    let token = verify(&rt, &verifier, &after)?;
    assert_eq!(token.groups, ["engineering"]);
    let s = stats(&verifier);
    assert_eq!(
        s.unknown_kid_refetches, 1,
        "the new kid was fetched on demand: {s:?}"
    );
    assert_eq!(s.keys, 2, "old and new key are both published: {s:?}");
    // Tokens signed before the rotation stay valid until they expire.
    verify(&rt, &verifier, &before)?;
    assert_eq!(stats(&verifier).unknown_kid_refetches, 1);
    Ok(())
}

#[test]
fn an_expired_token_is_refused_as_expired() -> Result<()> {
    // Three seconds: whole-second `iat`/`exp` leave at least two for the first check.
    let provider = OidcProvider::start(&ProviderOptions::loopback(vec![
        OidcClient::new("brief", &["temps"]).with_ttl(Duration::from_secs(3)),
    ]))?;
    let rt = runtime();
    let verifier = ready_verifier(&rt, settings(&provider));
    let token = provider.token("brief")?;
    let valid = verify(&rt, &verifier, &token)?;
    assert_eq!(valid.groups, ["temps"]);

    let deadline = Instant::now() + DEADLINE;
    let refused = loop {
        match verify(&rt, &verifier, &token) {
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(t) => panic!("still accepted at the deadline, exp {:?}", t.expires_at),
            Err(e) => break e,
        }
    };
    assert_eq!(refused.reason(), "expired", "{refused}");
    assert!(
        SystemTime::now() >= valid.expires_at,
        "refused before its exp"
    );
    Ok(())
}

#[test]
fn a_provider_inside_a_network_namespace_is_trusted_under_its_own_address() -> Result<()> {
    require_root();
    let ns = NetNs::new(&format!("idg-{}-{}-oidc", std::process::id(), unique_id()))?;
    // A documentation address that exists only inside this namespace.
    ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])?;
    // Declared after `ns`, so dropped (killed) before the namespace is deleted.
    let provider = OidcProvider::start(&ProviderOptions {
        listen: "192.0.2.1:9500".to_owned(),
        netns: Some(ns.name().to_owned()),
        ..ProviderOptions::loopback(vec![OidcClient::new("alice", &["engineering"])])
    })?;
    assert_eq!(provider.issuer(), "http://192.0.2.1:9500");

    let mut s = settings(&provider);
    assert!(
        Verifier::new([s.clone()]).is_err(),
        "plain http to a non-loopback issuer needs allow_insecure_http"
    );
    s.allow_insecure_http = true;
    // Minting and verifying from a thread inside the namespace: nothing leaves it.
    let alice = ns.run_in(|| -> Result<VerifiedToken> {
        let token = provider.token("alice")?;
        let rt = runtime();
        let verifier = ready_verifier(&rt, s);
        Ok(verify(&rt, &verifier, &token)?)
    })?;
    assert_eq!(alice.user, "alice");
    assert_eq!(alice.groups, ["engineering"]);
    Ok(())
}

#[test]
fn a_provider_that_cannot_start_is_reported_with_its_stderr() {
    let started = Instant::now();
    let e = OidcProvider::start(&ProviderOptions {
        alg: "HS256".to_owned(),
        ..ProviderOptions::loopback(vec![OidcClient::new("alice", &[])])
    })
    .unwrap_err();
    let message = format!("{e:#}");
    assert!(message.contains("exited"), "{message}");
    assert!(message.contains("--alg HS256"), "{message}");
    assert!(
        started.elapsed() < DEADLINE,
        "reported at once, not at a deadline"
    );
}
